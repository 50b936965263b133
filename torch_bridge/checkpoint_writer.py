"""Write a jaxlora Llama as a Hugging Face checkpoint directory (config.json + safetensors), atomically.

Full precision, or bitsandbytes' pre-quantized 4-bit form (``quantization="bnb-nf4"``/``"bnb-fp4"``,
formats.md C.3) that transformers loads with bitsandbytes. Large models are sharded with an index,
as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models import LlamaForCausalLM
from jaxlora.nn import Linear4bit, LoraLinear
from jaxlora.quant import dequantize_4bit, quantize_4bit
from torch_bridge.bnb_state import quant_state_to_arrays
from torch_bridge.checkpoint import DTYPES, QUANTIZABLE, CheckpointError

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5e9 bytes (decimal units like transformers; "GiB" etc. are binary)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '500MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def checkpoint_tensors(model: LlamaForCausalLM, dtype: str | None, quantization: str | None, double_quant: bool, blocksize: int):
    """Yield ``(key, numpy array)`` in state-dict order, converting one tensor at a time."""
    if quantization not in (None, "bnb-nf4", "bnb-fp4"):
        raise ValueError(f"quantization {quantization!r} is not supported; expected None, 'bnb-nf4' or 'bnb-fp4'")
    target = None if dtype is None else DTYPES[dtype]
    quant_type = None if quantization is None else quantization.split("-")[1]
    modules = list(nnx.iter_graph(model))
    for path, module in modules:
        if isinstance(module, LoraLinear):
            raise CheckpointError(
                f"module '{'.'.join(map(str, path))}' holds a LoRA adapter: merge_and_unload() first, "
                "or save the adapter with save_peft_adapter"
            )
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(map(str, path))
        if quant_type is not None and QUANTIZABLE.match(key):
            q = quantize_4bit(variable.get_value(), blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
            yield from quant_state_to_arrays(q.to_numpy(), key).items()
        else:
            yield key, _convert(np.asarray(variable.get_value()), target)
    # 4-bit weights are not nnx.Param: visit the Linear4bit modules.
    for path, module in modules:
        if not isinstance(module, Linear4bit):
            continue
        key = ".".join(map(str, path)) + ".weight"
        q = module.quantized
        if quant_type is None:
            yield key, _convert(np.asarray(dequantize_4bit(q)), target)
        elif q.quant_type == quant_type and q.blocksize == blocksize and q.double_quant == double_quant:
            yield from quant_state_to_arrays(q.to_numpy(), key).items()
        else:
            q = quantize_4bit(dequantize_4bit(q), blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
            yield from quant_state_to_arrays(q.to_numpy(), key).items()


def _convert(array: np.ndarray, target) -> np.ndarray:
    return array if target is None else array.astype(target)


def save_llama(model: LlamaForCausalLM, path, *, dtype: str | None = None, max_shard_size: int | str = "5GB",
               quantization: str | None = None, double_quant: bool = True, blocksize: int = 64,
               overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face Llama directory that ``AutoModelForCausalLM.from_pretrained`` loads.

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
    target = Path(path)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    limit = parse_size(max_shard_size)
    config = model.config.to_hf_dict()
    stored_dtype = dtype or jnp.dtype(model.model.embed_tokens.weight.get_value().dtype).name
    config["dtype"] = stored_dtype
    if quantization is not None:
        config["quantization_config"] = {
            "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": stored_dtype,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quantization.split("-")[1],
            "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
            "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
        }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_shards(model, tmp, dtype, quantization, double_quant, blocksize, limit)
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_shards(model, directory: Path, dtype, quantization, double_quant, blocksize, limit) -> None:
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, array in checkpoint_tensors(model, dtype, quantization, double_quant, blocksize):
        if shards[-1] and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = np.ascontiguousarray(array)
        size += array.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        for key, array in shard.items():
            weight_map[key] = name
            total += array.nbytes
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


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


__all__ = ["QUANTIZABLE", "parse_size", "save_llama"]
