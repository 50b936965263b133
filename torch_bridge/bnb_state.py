"""The serialized form of a bitsandbytes 4-bit weight, as numpy arrays (no torch needed).

A ``bnb.nn.Linear4bit`` weight saved in a state dict or a pre-quantized checkpoint is a group of
tensors under the weight's key (formats.md C.1-C.3)::

    <p>                                   uint8 [(n+1)//2, 1]   packed codes
    <p>.absmax                            float32 [nblocks] | uint8 [nblocks] (double quant)
    <p>.quant_map                         float32 [16]
    <p>.nested_absmax                     float32 [ceil(nblocks/256)]   (double quant only)
    <p>.nested_quant_map                  float32 [256]                 (double quant only)
    <p>.quant_state.bitsandbytes__nf4     uint8 [len(json)]  (or __fp4)

where the JSON is ``json.dumps`` of quant_type, blocksize, dtype, shape and, with double
quantization, nested_blocksize, nested_dtype, nested_offset, in that order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from jaxlora.quant import DYNAMIC_MAP, QuantizedTensor, SUPPORTED_BLOCKSIZES, SUPPORTED_QUANT_TYPES
from jaxlora.quant.codebooks import CODE_4BIT, NESTED_BLOCKSIZE

_DTYPE_NAMES = {"float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}


class BnbStateError(ValueError):
    """A bitsandbytes 4-bit state that is missing keys, inconsistent, or not supported."""


def quant_state_keys(prefix: str, quant_type: str, double_quant: bool) -> list[str]:
    """The keys a 4-bit weight occupies under ``prefix`` (e.g. ``model.layers.0.mlp.up_proj.weight``)."""
    keys = [prefix, f"{prefix}.absmax", f"{prefix}.quant_map"]
    if double_quant:
        keys += [f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"]
    keys.append(f"{prefix}.quant_state.bitsandbytes__{quant_type}")
    return keys


def quant_state_json(quant_type: str, blocksize: int, dtype: str, shape, offset=None) -> bytes:
    """The UTF-8 JSON bitsandbytes stores in ``quant_state.bitsandbytes__<type>``, byte for byte.

    ``offset`` is the double-quantization offset (None without double quantization).
    """
    state = {"quant_type": quant_type, "blocksize": int(blocksize), "dtype": dtype, "shape": [int(d) for d in shape]}
    if offset is not None:
        state["nested_blocksize"] = NESTED_BLOCKSIZE
        state["nested_dtype"] = "float32"
        state["nested_offset"] = float(np.float32(np.asarray(offset)))  # the exact decimal of the f32
    return json.dumps(state).encode("utf-8")


def quant_state_to_arrays(q: QuantizedTensor, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The state-dict tensors of a bitsandbytes ``Linear4bit`` weight for ``q``, as numpy arrays."""
    packed = np.asarray(q.packed, dtype=np.uint8).reshape(-1, 1)
    out = {
        prefix: packed,
        f"{prefix}.absmax": np.asarray(q.absmax),
        f"{prefix}.quant_map": CODE_4BIT[q.quant_type].copy(),
    }
    if q.double_quant:
        out[f"{prefix}.nested_absmax"] = np.asarray(q.nested_absmax, dtype=np.float32)
        out[f"{prefix}.nested_quant_map"] = DYNAMIC_MAP.copy()
    text = quant_state_json(q.quant_type, q.blocksize, q.dtype.name, q.shape, q.offset if q.double_quant else None)
    out[f"{prefix}.quant_state.bitsandbytes__{q.quant_type}"] = np.frombuffer(text, dtype=np.uint8).copy()
    return out


def _expect(array: np.ndarray, key: str, dtype, shape: tuple[int, ...], source: str) -> np.ndarray:
    if array.dtype != np.dtype(dtype) or tuple(array.shape) != shape:
        raise BnbStateError(
            f"{source}: {key} has dtype {array.dtype} and shape {tuple(array.shape)}; "
            f"expected {np.dtype(dtype).name} {shape}"
        )
    return array


def parse_quant_state_json(raw: np.ndarray, key: str, *, source: str = "state dict") -> dict:
    """The JSON object of a ``quant_state.bitsandbytes__<type>`` tensor (``key``), with its quant_type,
    blocksize, dtype and shape checked. Raises `BnbStateError` naming ``source`` and ``key``."""
    try:
        state = json.loads(bytes(np.asarray(raw, dtype=np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BnbStateError(f"{source}: {key} is not valid UTF-8 JSON: {err}") from err
    if not isinstance(state, dict):
        raise BnbStateError(f"{source}: {key} holds JSON {type(state).__name__}; expected an object")
    quant_type = state.get("quant_type")
    if quant_type not in SUPPORTED_QUANT_TYPES or key.rsplit("__", 1)[1] != quant_type:
        raise BnbStateError(f"{source}: {key} has quant_type {quant_type!r}; expected 'nf4' or 'fp4' matching the key")
    blocksize = state.get("blocksize")
    if type(blocksize) is not int or blocksize not in SUPPORTED_BLOCKSIZES:
        raise BnbStateError(f"{source}: {key} has blocksize {blocksize!r}; expected one of {SUPPORTED_BLOCKSIZES}")
    if state.get("dtype") not in _DTYPE_NAMES:
        raise BnbStateError(f"{source}: {key} has dtype {state.get('dtype')!r}; expected one of {sorted(_DTYPE_NAMES)}")
    raw_shape = state.get("shape")
    if not isinstance(raw_shape, list) or not raw_shape or not all(type(d) is int and d > 0 for d in raw_shape):
        raise BnbStateError(f"{source}: {key} has shape {raw_shape!r}; expected a non-empty list of positive integers")
    return state


def quant_state_from_arrays(arrays: Mapping[str, np.ndarray], prefix: str = "weight", *, source: str = "state dict") -> QuantizedTensor:
    """Read a bitsandbytes 4-bit weight from its serialized tensors (the inverse of `quant_state_to_arrays`).

    Args:
      arrays: mapping from key to numpy array (e.g. a safetensors file opened with numpy).
      prefix: the weight's key.
      source: what to call the mapping in error messages (e.g. the file name).

    Raises:
      BnbStateError: naming the key, what was found and what was expected.
    """
    json_keys = [k for k in arrays if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(json_keys) != 1:
        raise BnbStateError(
            f"{source}: expected exactly one '{prefix}.quant_state.bitsandbytes__<nf4|fp4>' key, found {json_keys}"
        )
    state = parse_quant_state_json(arrays[json_keys[0]], json_keys[0], source=source)
    quant_type, blocksize, dtype, shape = state["quant_type"], state["blocksize"], state["dtype"], tuple(state["shape"])
    n = math.prod(shape)
    nblocks = -(-n // blocksize)
    missing = [k for k in (prefix, f"{prefix}.absmax") if k not in arrays]
    double_quant = f"{prefix}.nested_absmax" in arrays
    if double_quant and f"{prefix}.nested_quant_map" not in arrays:
        missing.append(f"{prefix}.nested_quant_map")
    if missing:
        raise BnbStateError(f"{source}: missing keys {missing} for the 4-bit weight '{prefix}'")

    packed = np.asarray(arrays[prefix])
    if packed.dtype != np.uint8:  # another quant_storage dtype: the same bytes
        packed = packed.view(np.uint8)
    packed = packed.reshape(-1)
    if packed.size != (n + 1) // 2:
        raise BnbStateError(
            f"{source}: {prefix} holds {packed.size} bytes; a {list(shape)} tensor needs {(n + 1) // 2}"
        )
    if f"{prefix}.quant_map" in arrays:
        quant_map = np.asarray(arrays[f"{prefix}.quant_map"])
        if not np.array_equal(quant_map.astype(np.float32), CODE_4BIT[quant_type]):
            raise BnbStateError(f"{source}: {prefix}.quant_map is not bitsandbytes' {quant_type} table; custom code books are not supported")
    absmax_key = f"{prefix}.absmax"
    if not double_quant:
        absmax = _expect(np.asarray(arrays[absmax_key]), absmax_key, np.float32, (nblocks,), source)
        return QuantizedTensor(packed, absmax, shape=shape, dtype=_DTYPE_NAMES[dtype], blocksize=blocksize, quant_type=quant_type)
    codes = _expect(np.asarray(arrays[absmax_key]), absmax_key, np.uint8, (nblocks,), source)
    nested_key = f"{prefix}.nested_absmax"
    nested = _expect(np.asarray(arrays[nested_key]), nested_key, np.float32, (-(-nblocks // NESTED_BLOCKSIZE),), source)
    nested_map = np.asarray(arrays[f"{prefix}.nested_quant_map"])
    if not np.array_equal(nested_map.astype(np.float32), DYNAMIC_MAP):
        raise BnbStateError(f"{source}: {prefix}.nested_quant_map is not bitsandbytes' signed dynamic map")
    if state.get("nested_blocksize") != NESTED_BLOCKSIZE or state.get("nested_dtype") != "float32" or "nested_offset" not in state:
        raise BnbStateError(
            f"{source}: {json_keys[0]} needs nested_blocksize 256, nested_dtype 'float32' and nested_offset; "
            f"found {state.get('nested_blocksize')!r}, {state.get('nested_dtype')!r}, {state.get('nested_offset')!r}"
        )
    offset = np.float32(state["nested_offset"])
    return QuantizedTensor(packed, codes, nested, offset, shape=shape, dtype=_DTYPE_NAMES[dtype], blocksize=blocksize, quant_type=quant_type)
