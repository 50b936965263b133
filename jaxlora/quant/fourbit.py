"""NF4 / FP4 blockwise quantization with bitsandbytes' CUDA semantics (formats.md B.2-B.6).

    absmax_b = max_{e in block b} |x_e|                      (float32)
    code_e   = tree(f32(x_e) * f32(1 / absmax_b))            (threshold tree, B.3)
    x_e     ~= table[code_e] * absmax_b                      (dequantization, B.5)

NF4 is the 4-bit NormalFloat of the QLoRA paper (Dettmers et al., 2023, arXiv:2305.14314); FP4 is
bitsandbytes' e2m1 variant. Double quantization (``double_quant=True``) then stores the scales in
8 bits (`jaxlora.quant.blockwise8`).

The public functions validate concrete inputs (NaN/Inf, empty tensors) and call jit-compiled cores.
Finiteness is checked on the values themselves, in the core: a check on the block maxima would miss
most NaNs, because XLA's fused CPU max reduction drops a NaN unless it is the block's last element.
Inside an outer ``jax.jit`` the check cannot raise and is skipped; a block holding a NaN or Inf then
gets a NaN scale (set explicitly, for the same reason) and code 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant import blockwise8
from jaxlora.quant.codebooks import (
    DECODE_4BIT,
    FP4_THRESHOLDS,
    NF4_THRESHOLDS,
    SUPPORTED_BLOCKSIZES,
    SUPPORTED_QUANT_TYPES,
)
from jaxlora.quant.tensor import QuantizedTensor

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def nf4_codes(scaled: jax.Array) -> jax.Array:
    """NF4 index of each normalised float32 value: #{k : x > t_k} over the 15 midpoints (B.3).

    A value exactly on a midpoint goes to the lower index; NaN goes to 0.
    """
    idx = jnp.zeros(scaled.shape, jnp.uint8)
    for threshold in NF4_THRESHOLDS:  # unrolled: XLA fuses the 15 compares into one loop
        idx = idx + (scaled > threshold).astype(jnp.uint8)
    return idx


def fp4_codes(scaled: jax.Array) -> jax.Array:
    """FP4 code of each normalised float32 value, with CUDA's literal thresholds (B.3).

    Sign bit 8 for x < 0 (so -0.0 and NaN are positive); the magnitude rank r (how many thresholds
    |x| exceeds) maps to the 3-bit code [0, 1, 6, 7, 4, 5, 2, 3][r], i.e. r with bit 2 flipped
    whenever bit 1 is set.
    """
    magnitude = jnp.abs(scaled)
    rank = jnp.zeros(scaled.shape, jnp.uint8)
    for threshold in FP4_THRESHOLDS:
        rank = rank + (magnitude > threshold).astype(jnp.uint8)
    code = rank ^ ((rank & 2) << 1)
    return code | jnp.where(scaled < 0, jnp.uint8(8), jnp.uint8(0))


def _check_arguments(blocksize: int, quant_type: str) -> None:
    if quant_type not in SUPPORTED_QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not supported; expected one of {SUPPORTED_QUANT_TYPES}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r} is not supported; expected one of {SUPPORTED_BLOCKSIZES}")


@functools.partial(jax.jit, static_argnames=("blocksize", "quant_type", "double_quant"))
def _quantize_core(x, *, blocksize: int, quant_type: str, double_quant: bool):
    flat = x.reshape(-1).astype(jnp.float32)  # bf16/fp16 -> f32 is exact
    n = flat.shape[0]
    nblocks = -(-n // blocksize)
    blocks = jnp.pad(flat, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)
    # Finiteness of every value, reduced per block alongside the maximum (one pass over the data); the
    # maximum alone can drop a NaN (module docstring). A block with a NaN or Inf gets a NaN scale.
    finite_blocks = jnp.all(jnp.isfinite(blocks), axis=1)
    absmax = jnp.where(finite_blocks, jnp.max(jnp.abs(blocks), axis=1), jnp.nan)
    # Multiply by the reciprocal (B.2 step 4). The padding slot of an odd-length tensor holds 0.0 and
    # is quantized like any element (NF4 -> 7, FP4 -> 0), as CUDA does.
    inverse = (1.0 / absmax)[:, None]
    to_codes = nf4_codes if quant_type == "nf4" else fp4_codes
    # Blocksizes are even, so even elements of a block are even elements of the tensor: quantizing the
    # two strided halves separately yields the high and low nibbles without an interleaving copy.
    high = to_codes(blocks[:, 0::2] * inverse).reshape(-1)
    low = to_codes(blocks[:, 1::2] * inverse).reshape(-1)
    packed = ((high << 4) | low)[: (n + 1) // 2]
    values_finite = jnp.all(finite_blocks)
    if not double_quant:
        return packed, absmax, None, None, values_finite, jnp.bool_(True)
    qabsmax, nested_absmax, offset = blockwise8.quantize_scales(absmax)
    # Finite values can still overflow the float32 mean of their scales (two blocks of absmax 3e38).
    scales_finite = jnp.isfinite(offset) & jnp.all(jnp.isfinite(nested_absmax))
    return packed, qabsmax, nested_absmax, offset, values_finite, scales_finite


def _describe_non_finite(x) -> str:
    values = np.asarray(jnp.asarray(x).astype(jnp.float32))
    nan = int(np.isnan(values).sum())
    inf = int(np.isinf(values).sum())
    first = np.argwhere(~np.isfinite(values))[0].tolist()
    return f"{nan} NaN and {inf} Inf values (first at index {first})"


def _concrete_false(flag) -> bool:
    return not isinstance(flag, jax.core.Tracer) and not bool(flag)


def quantize_4bit(x, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False,
                  name: str | None = None) -> QuantizedTensor:
    """Quantize an array to 4 bits per element, blockwise, as bitsandbytes' CUDA kernel does.

    Args:
      x: float32, bfloat16 or float16 array of any shape (flattened row-major; a Linear weight
        ``[out, in]`` is quantized row after row, not transposed).
      blocksize: elements per scale, one of 32, 64 (default), 128, ..., 4096.
      quant_type: ``"nf4"`` (default) or ``"fp4"``.
      double_quant: also quantize the per-block scales to 8 bits (formats.md B.6).
      name: what to call the tensor in errors (e.g. its checkpoint key).

    Returns:
      A `QuantizedTensor` of the same shape and dtype.

    Raises:
      ValueError: unsupported blocksize, quant type or dtype; an empty tensor; a NaN or Inf anywhere
        (the message names the tensor, its shape and the first bad index); block scales whose
        double quantization overflows float32.
    """
    _check_arguments(blocksize, quant_type)
    # Check the dtype before jnp.asarray, which would silently turn float64 into float32.
    dtype = jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cannot quantize an array of dtype {dtype}; expected float32, bfloat16 or float16")
    x = jnp.asarray(x)
    if x.size == 0:
        raise ValueError(f"cannot quantize an empty array (shape {tuple(x.shape)}); it needs at least one element")
    packed, absmax, nested_absmax, offset, values_finite, scales_finite = _quantize_core(
        x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant
    )
    what = "an array" if name is None else f"'{name}'"
    if _concrete_false(values_finite):
        raise ValueError(
            f"cannot quantize {what} of shape {tuple(x.shape)} with {_describe_non_finite(x)}; "
            "4-bit quantization needs finite values"
        )
    if _concrete_false(scales_finite):
        raise ValueError(
            f"cannot double-quantize the block scales of {what} of shape {tuple(x.shape)}: their float32 mean "
            f"({float(offset)}) is not finite: the values are too large for double quantization (use double_quant=False)"
        )
    return QuantizedTensor(
        packed,
        absmax,
        nested_absmax,
        offset,
        shape=x.shape,
        dtype=x.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
    )


def unpack_codes(packed: jax.Array, n: int) -> jax.Array:
    """The ``n`` 4-bit codes of a packed uint8 vector (high nibble first), as uint8."""
    # One broadcast shift (not a stack of two halves) so that XLA fuses the unpacking into its consumer.
    shifts = jnp.array([4, 0], jnp.uint8)
    pairs = (packed[:, None] >> shifts[None, :]) & jnp.uint8(0xF)
    return pairs.reshape(-1)[:n]


def block_scales(q: QuantizedTensor) -> jax.Array:
    """The float32 scale of each block, reconstructed if double-quantized (B.6)."""
    if q.double_quant:
        return blockwise8.dequantize_scales(q.absmax, q.nested_absmax, q.offset)
    return q.absmax.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_4bit(q: QuantizedTensor, dtype=None) -> jax.Array:
    """Reconstruct the array: ``cast(table[code] * absmax)``, one float32 multiply and one cast (B.5).

    Bit-exact with bitsandbytes' dequantization of the same state, including FP4 code 8 decoding to
    -0.0 as its kernels do (the stored quant_map says +0.0; the values are equal).

    Args:
      q: the quantized tensor.
      dtype: output dtype; defaults to the dtype the tensor was quantized from.

    Returns:
      An array of shape ``q.shape``.
    """
    return decode_4bit(q, block_scales(q), jnp.asarray(DECODE_4BIT[q.quant_type]), dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def decode_4bit(q: QuantizedTensor, scales: jax.Array, table: jax.Array, dtype=None) -> jax.Array:
    """``cast(table[code] * scales[block])``: `dequantize_4bit` with the float32 block scales and the
    16-entry code table given as arrays (so that callers can control when XLA computes them)."""
    out_dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    n = q.size
    codes = unpack_codes(q.packed, n)
    values = table[codes.astype(jnp.int32)]
    nblocks = q.nblocks
    blocks = jnp.pad(values, (0, nblocks * q.blocksize - n)).reshape(nblocks, q.blocksize)
    out = (blocks * scales[:, None]).astype(out_dtype)
    return out.reshape(-1)[:n].reshape(q.shape)
