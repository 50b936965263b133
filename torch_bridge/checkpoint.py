"""Hugging Face Llama checkpoints <-> jaxlora models, with safetensors' numpy API (no torch).

`load_llama` reads ``config.json`` and ``model.safetensors`` (or a sharded set with
``model.safetensors.index.json``), one tensor at a time; with ``quantize="nf4"``/``"fp4"`` each
decoder projection is quantized as soon as it is read, so the full-precision model never exists in
memory. A bitsandbytes pre-quantized checkpoint (formats.md C.3) loads its 4-bit tensors as stored.
`save_llama` writes the inverse, sharded with an index above ``max_shard_size``, atomically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxlora.models import LlamaConfig, LlamaForCausalLM
from jaxlora.nn import Linear4bit
from jaxlora.peft import set_submodule
from jaxlora.quant import QuantizedTensor, quantize_4bit
from torch_bridge.bnb_state import quant_state_from_arrays

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64, "U8": np.uint8}
# The decoder projections that QLoRA quantizes (not embeddings, norms or lm_head).
QUANTIZABLE = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not match the model it should build."""


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: not found") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


class SafetensorsReader:
    """Access to the tensors of a single-file or sharded safetensors checkpoint, one at a time, as numpy.

    Each tensor is read by opening its file, copying the tensor out and closing it again: holding
    the files memory-mapped for the whole load would keep every page read so far in the process's
    resident memory (measured in experiments/results/load.md: +874 MiB vs +362 MiB peak RSS for an
    NF4 load of SmolLM2-135M), which is what loading in 4 bits is meant to avoid.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files, weight_map = ["model.safetensors"], None
        else:
            raise CheckpointError(f"{directory}: neither model.safetensors nor model.safetensors.index.json")
        dtypes_of = {name: self._dtypes(name) for name in files}
        if weight_map is None:
            weight_map = {key: "model.safetensors" for key in dtypes_of["model.safetensors"]}
        else:
            for key, name in weight_map.items():
                if key not in dtypes_of[name]:
                    raise CheckpointError(f"{directory / name}: the index lists '{key}' but the file does not hold it")
        self.weight_map = weight_map
        self._stored_dtypes = {key: dtypes_of[name][key] for key, name in weight_map.items()}

    def _dtypes(self, name: str) -> dict[str, str]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.directory / name), framework="numpy") as f:
                return {key: f.get_slice(key).get_dtype() for key in f.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated/malformed files
            raise CheckpointError(f"{self.directory / name}: cannot be read as safetensors ({err})") from err

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def stored_dtype(self, key: str) -> np.dtype:
        """The dtype ``key`` is stored in, from the file's header (nothing is read)."""
        code = self._stored_dtypes[key]
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.directory / self.weight_map[key]}: tensor '{key}' has dtype {code}; "
                                  f"expected one of {sorted(_SAFETENSORS_DTYPES)}")
        return np.dtype(_SAFETENSORS_DTYPES[code])

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        name = self.weight_map.get(key)
        if name is None:
            raise CheckpointError(f"{self.directory}: no tensor '{key}'")
        try:
            with safe_open(str(self.directory / name), framework="numpy") as f:
                return f.get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"{self.directory / name}: tensor '{key}' cannot be read ({err})") from err


def build_llama(
    config: LlamaConfig,
    get_array: Callable[[str], np.ndarray],
    available: Callable[[str], bool],
    *,
    dtype: str = "float32",
    quantize: str | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype=None,
    source: str = "checkpoint",
) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` whose parameters come from ``get_array(hf_key)``, one tensor at a time.

    Decoder projections are quantized on the fly with ``quantize``; keys that are stored in
    bitsandbytes' 4-bit form (``<key>.quant_state.bitsandbytes__*`` present) load as stored.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    if quantize not in (None, "nf4", "fp4"):
        raise CheckpointError(f"quantize {quantize!r} is not supported; expected None, 'nf4' or 'fp4'")
    compute = jnp.dtype(compute_dtype or dtype)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=jnp.dtype(dtype), compute_dtype=compute, rngs=nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(str(p) for p in path)
        module_path = path[:-1]
        stored = read_parameter(key, tuple(variable.shape), get_array, available, source=source)
        if isinstance(stored, QuantizedTensor):
            # Device arrays now: numpy leaves would be copied to the device again at every jitted call.
            q = jax.device_put(stored)
            set_submodule(model, ".".join(map(str, module_path)), Linear4bit(q, _bias_of(key, get_array, available), compute_dtype=compute))
            continue
        array = np.asarray(stored).astype(DTYPES[dtype], copy=False)
        if quantize is not None and QUANTIZABLE.match(key):
            try:
                q = quantize_4bit(jnp.asarray(array), blocksize=blocksize, quant_type=quantize, double_quant=double_quant, name=key)
            except ValueError as err:
                raise CheckpointError(f"{source}: {err}") from err
            set_submodule(model, ".".join(map(str, module_path)), Linear4bit(q, _bias_of(key, get_array, available), compute_dtype=compute))
            continue
        variable.set_value(jnp.asarray(array))
    return model


def stored_4bit(key: str, available: Callable[[str], bool]) -> bool:
    """Whether parameter ``key`` is stored in bitsandbytes' 4-bit form (its quant_state key is present)."""
    return QUANTIZABLE.match(key) is not None and any(available(f"{key}.quant_state.bitsandbytes__{t}") for t in ("nf4", "fp4"))


def stored_keys(key: str, available: Callable[[str], bool]) -> list[str]:
    """The checkpoint keys that hold parameter ``key``: its 4-bit group, or the key itself."""
    if not stored_4bit(key, available):
        return [key]
    suffixes = ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"]
    return [key + s for s in suffixes if available(key + s)]


def read_parameter(key: str, expected: tuple[int, ...], get_array: Callable[[str], np.ndarray],
                   available: Callable[[str], bool], *, source: str) -> np.ndarray | QuantizedTensor:
    """The stored value of parameter ``key`` (its HF name), checked against the ``expected`` shape.

    Returns a `QuantizedTensor` with numpy leaves when the checkpoint holds it in bitsandbytes' 4-bit
    form, else the numpy array as stored (its own dtype).

    Raises:
      CheckpointError: the tensor is missing or has another shape (naming ``source``, key, module, shapes).
    """
    if stored_4bit(key, available):
        q = quant_state_from_arrays({k: get_array(k) for k in stored_keys(key, available)}, key, source=source)
        if q.shape != expected:
            raise CheckpointError(f"{source}: {key} is stored 4-bit with shape {q.shape}; the config needs {expected}")
        return q
    if not available(key):
        raise CheckpointError(f"{source}: missing tensor '{key}' (shape {expected}) for module '{key.rsplit('.', 1)[0]}'")
    array = get_array(key)
    if tuple(array.shape) != expected:
        raise CheckpointError(f"{source}: tensor '{key}' has shape {tuple(array.shape)}; the config needs {expected}")
    return array


def parameter_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of every parameter of a `LlamaForCausalLM` of ``config``, in state-dict order."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def shape_only_llama(config: LlamaConfig) -> LlamaForCausalLM:
    """A float32 `LlamaForCausalLM` of ``config`` whose parameters take no memory.

    Each parameter is a read-only numpy view of a single zero, broadcast to its shape: enough for
    everything that reads only shapes and dtypes (injecting LoRA, loading an adapter strictly
    against the model), without the base weights. Not for running the model.
    """
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        abstract = variable.get_value()
        variable.set_value(np.broadcast_to(np.zeros((), abstract.dtype), abstract.shape))
    return model


def check_all_used(source: str, keys, used: set[str], config: LlamaConfig) -> None:
    """Raise if a checkpoint holds tensors that no parameter of the model takes (a wrong or corrupt base)."""
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unused = sorted(k for k in keys if k not in used and k not in ignorable and "rotary_emb.inv_freq" not in k)
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} tensors match no parameter of the model, e.g. {unused[:5]}")


def _bias_of(weight_key: str, get_array, available):
    bias_key = weight_key[: -len("weight")] + "bias"
    return jnp.asarray(get_array(bias_key)) if available(bias_key) else None


def read_llama_config(directory: Path) -> LlamaConfig:
    """The `LlamaConfig` of a checkpoint directory's config.json (CheckpointError / ConfigError naming it)."""
    return LlamaConfig.from_hf_dict(_read_json(directory / "config.json"), source=str(directory / "config.json"))


def load_llama(path, *, dtype: str = "float32", quantize: str | None = None, double_quant: bool = True,
               blocksize: int = 64, compute_dtype=None) -> LlamaForCausalLM:
    """Load a Hugging Face Llama directory (config.json + safetensors) as a jaxlora model.

    Args:
      path: the checkpoint directory.
      dtype: parameter dtype, "float32" (default), "bfloat16" or "float16"; tensors are converted.
      quantize: None, "nf4" or "fp4": quantize the decoder projections while loading (QLoRA).
      double_quant, blocksize: quantization settings (QLoRA's defaults: True, 64).
      compute_dtype: activation dtype (default: ``dtype``).

    Raises:
      CheckpointError / ConfigError naming the file, key and shapes.
    """
    directory = Path(path)
    config = read_llama_config(directory)
    reader = SafetensorsReader(directory)
    consumed: set[str] = set()

    def get_array(key: str) -> np.ndarray:
        consumed.add(key)
        return reader.get(key)

    model = build_llama(config, get_array, reader.__contains__, dtype=dtype, quantize=quantize,
                        double_quant=double_quant, blocksize=blocksize, compute_dtype=compute_dtype, source=str(directory))
    check_all_used(str(directory), reader.keys(), consumed, config)
    return model


__all__ = ["CheckpointError", "SafetensorsReader", "build_llama", "load_llama", "parameter_shapes", "read_parameter",
           "shape_only_llama"]
