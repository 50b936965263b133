"""Write Hugging Face checkpoint directories (config.json + safetensors), shard by shard, atomically.

Full precision, or bitsandbytes' pre-quantized 4-bit form (``quantization="bnb-nf4"``/``"bnb-fp4"``,
formats.md C.3) that transformers loads with bitsandbytes. Large models are sharded with an index,
as ``save_pretrained`` does.

The writer streams: its input is a sequence of `TensorGroup` s, each computing its tensors only when
the writer asks, and a shard is written and released as soon as the next tensor would overflow it.
Host memory holds one shard (plus the small statistics of one 4-bit weight), never the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models import LlamaConfig, LlamaForCausalLM
from jaxlora.nn import Linear4bit, LoraLinear
from jaxlora.quant import QuantizedTensor, dequantize_4bit, quantize_4bit
from torch_bridge.bnb_state import quant_state_to_arrays
from torch_bridge.checkpoint import DTYPES, QUANTIZABLE, CheckpointError

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
QUANTIZATIONS = (None, "bnb-nf4", "bnb-fp4")


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5e9 bytes (decimal units like transformers; "GiB" etc. are binary)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '500MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclasses.dataclass(frozen=True)
class TensorGroup:
    """Output tensors that are computed together, in file order: one dense tensor, or the packed codes
    and statistics of one bitsandbytes 4-bit weight.

    ``first_nbytes`` is the exact size of the first tensor, known from its shape and dtype before
    ``compute`` runs, so that a full shard is written and released before anything new exists.
    """

    first_nbytes: int
    compute: Callable[[], dict[str, np.ndarray]]


def dense_group(key: str, shape, dtype, compute: Callable[[], np.ndarray]) -> TensorGroup:
    """A group of one tensor ``key`` of ``shape`` and ``dtype``, made by ``compute()``."""
    return TensorGroup(math.prod(shape) * np.dtype(dtype).itemsize, lambda: {key: compute()})


def quantized_group(key: str, shape, compute: Callable[[], QuantizedTensor]) -> TensorGroup:
    """The bitsandbytes tensors of a 4-bit weight ``key`` of ``shape`` (formats.md C.1), made by ``compute()``;
    the first is the packed codes, ``ceil(n / 2)`` bytes."""
    return TensorGroup((math.prod(shape) + 1) // 2, lambda: quant_state_to_arrays(compute().to_numpy(), key))


def write_shards(directory: Path, groups: Iterable[TensorGroup], limit: int) -> None:
    """Write ``groups`` into ``directory`` as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors``
    with ``model.safetensors.index.json`` when they exceed ``limit`` bytes.

    A shard takes tensors in order until the next one would pass ``limit`` (a tensor larger than the
    limit gets a shard of its own), as transformers' ``save_pretrained`` splits. Each shard is written
    as soon as it is full, under a temporary name (the number of shards is known only at the end,
    because a double-quantized weight's JSON state has a data-dependent length), and renamed last.
    """
    from safetensors.numpy import save_file

    shard: dict[str, np.ndarray] = {}
    size = 0
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal shard, size
        part = directory / f".shard-{len(written) + 1:05d}.safetensors"
        save_file(shard, str(part), metadata={"format": "pt"})
        written.append((part, list(shard)))
        shard, size = {}, 0

    def add(key: str, array: np.ndarray) -> None:
        # A function, so that no local name keeps a tensor alive after its shard is written.
        nonlocal size, total
        if shard and size + array.nbytes > limit:
            flush()
        shard[key] = np.ascontiguousarray(array)  # safetensors writes the raw buffer
        size += array.nbytes
        total += array.nbytes

    for group in groups:
        if shard and size + group.first_nbytes > limit:
            flush()
        arrays = group.compute()
        first = next(iter(arrays))
        if arrays[first].nbytes != group.first_nbytes:
            raise RuntimeError(f"'{first}' has {arrays[first].nbytes} bytes; its group planned {group.first_nbytes}")
        for key in list(arrays):  # popped, so that a member is released with the shard it is written in
            add(key, arrays.pop(key))
    if shard or not written:
        flush()
    if len(written) == 1:
        os.replace(written[0][0], directory / "model.safetensors")
        return
    weight_map = {}
    for i, (part, keys) in enumerate(written, 1):
        name = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(part, directory / name)
        weight_map.update(dict.fromkeys(keys, name))
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def hf_config(config: LlamaConfig, dtype: str, quantization: str | None, double_quant: bool) -> dict:
    """The config.json of a checkpoint stored in ``dtype`` (with bitsandbytes' quantization_config when
    ``quantization`` is "bnb-nf4"/"bnb-fp4")."""
    out = config.to_hf_dict()
    out["dtype"] = dtype
    if quantization is not None:
        out["quantization_config"] = {
            "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quantization.split("-")[1],
            "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
        }
    return out


def check_write_options(dtype: str | None, quantization: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not supported; expected None, 'bnb-nf4' or 'bnb-fp4'")


def write_checkpoint(path, config: dict, groups: Iterable[TensorGroup], *, max_shard_size: int | str = "5GB",
                     overwrite: bool = False, extra_files: Iterable[Path] = ()) -> Path:
    """Write a checkpoint directory: the tensors of ``groups`` (see `write_shards`), ``config`` as
    config.json and copies of ``extra_files`` (e.g. the tokenizer's), in a temporary sibling that is
    renamed into place at the end; on any error it is removed and ``path`` is left as it was."""
    target = Path(path)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    limit = parse_size(max_shard_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_shards(tmp, groups, limit)
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for extra in extra_files:
            shutil.copyfile(extra, tmp / Path(extra).name)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def model_tensor_groups(model: LlamaForCausalLM, dtype: str | None, quantization: str | None, double_quant: bool,
                        blocksize: int) -> Iterator[TensorGroup]:
    """The `TensorGroup` s of ``model``'s checkpoint, in state-dict order, each converted only when written."""
    target = None if dtype is None else DTYPES[dtype]
    quant_type = None if quantization is None else quantization.split("-")[1]
    settings = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(map(str, path))
        value = variable.get_value()
        if quant_type is not None and QUANTIZABLE.match(key):
            yield quantized_group(key, value.shape, lambda value=value, key=key: quantize_4bit(value, **settings, name=key))
        else:
            yield dense_group(key, value.shape, target or value.dtype, lambda value=value: _convert(np.asarray(value), target))
    # 4-bit weights are not nnx.Param: visit the Linear4bit modules.
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, Linear4bit):
            continue
        key = ".".join(map(str, path)) + ".weight"
        q = module.quantized
        if quant_type is None:
            yield dense_group(key, q.shape, target or q.dtype, lambda q=q: _convert(np.asarray(dequantize_4bit(q)), target))
        elif q.quant_type == quant_type and q.blocksize == blocksize and q.double_quant == double_quant:
            yield quantized_group(key, q.shape, lambda q=q: q)  # written byte for byte
        else:
            yield quantized_group(key, q.shape, lambda q=q, key=key: quantize_4bit(dequantize_4bit(q), **settings, name=key))


def checkpoint_tensors(model: LlamaForCausalLM, dtype: str | None, quantization: str | None, double_quant: bool,
                       blocksize: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, numpy array)`` in the order `save_llama` writes them, converting one group at a time."""
    for group in model_tensor_groups(model, dtype, quantization, double_quant, blocksize):
        yield from group.compute().items()


def _convert(array: np.ndarray, target) -> np.ndarray:
    return array if target is None else array.astype(target)


def save_llama(model: LlamaForCausalLM, path, *, dtype: str | None = None, max_shard_size: int | str = "5GB",
               quantization: str | None = None, double_quant: bool = True, blocksize: int = 64,
               overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face Llama directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    Tensors are converted and written shard by shard: host memory holds one shard, not the model.

    Args:
      model: a jaxlora `LlamaForCausalLM` (dense or with `Linear4bit` layers; no unmerged LoRA).
      path: target directory; written in a temporary sibling and renamed into place.
      dtype: convert tensors to "float32", "bfloat16" or "float16" (default: as they are; 4-bit
        layers are dequantized to their original dtype).
      max_shard_size: shard above this size (default "5GB"), with model.safetensors.index.json.
      quantization: None, or "bnb-nf4" / "bnb-fp4" to write bitsandbytes' pre-quantized 4-bit form
        of the decoder projections (with ``double_quant`` and ``blocksize``); 4-bit layers that
        already have these settings are written byte for byte.
      overwrite: replace an existing non-empty directory.
    """
    check_write_options(dtype, quantization)
    for path_, module in nnx.iter_graph(model):
        if isinstance(module, LoraLinear):
            raise CheckpointError(
                f"module '{'.'.join(map(str, path_))}' holds a LoRA adapter: merge_and_unload() first, "
                "or save the adapter with save_peft_adapter"
            )
    stored_dtype = dtype or jnp.dtype(model.model.embed_tokens.weight.get_value().dtype).name
    config = hf_config(model.config, stored_dtype, quantization, double_quant)
    groups = model_tensor_groups(model, dtype, quantization, double_quant, blocksize)
    return write_checkpoint(path, config, groups, max_shard_size=max_shard_size, overwrite=overwrite)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing target is moved aside first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(backup)
    os.replace(target, backup)
    os.replace(new, target)
    shutil.rmtree(backup, ignore_errors=True)


__all__ = ["QUANTIZABLE", "TensorGroup", "parse_size", "save_llama", "write_checkpoint"]
