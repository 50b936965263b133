"""8-bit blockwise quantization with the signed dynamic map, used for double quantization.

Double quantization (QLoRA paper, section 3; formats.md B.6) stores the float32 per-block scales of a
4-bit tensor in 8 bits: subtract their mean (``offset``), split them into blocks of 256, scale each
block by the reciprocal of its absolute maximum (``nested_absmax``), and store the index of the
nearest value of the dynamic map. Exact midpoints go to the even index, as bitsandbytes' CUDA binary
search does (B.6.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora.quant.codebooks import DYNAMIC_MAP, DYNAMIC_MIDPOINTS, NESTED_BLOCKSIZE


def nearest_dynamic_code(x: jax.Array) -> jax.Array:
    """Index of the dynamic-map value nearest to each float32 in ``x`` (uint8, same shape).

    Ties (``x`` exactly on a float32 midpoint) go to the even index; NaN goes to index 0.
    """
    midpoints = jnp.asarray(DYNAMIC_MIDPOINTS)
    # side="left": idx = #{k : midpoint_k < x}, so a value on midpoint k gets index k ...
    idx = jnp.searchsorted(midpoints, x, side="left", method="scan_unrolled").astype(jnp.int32)
    # ... and moves to k + 1 when k is odd, so that ties land on the even neighbour.
    on_midpoint = midpoints[jnp.minimum(idx, midpoints.shape[0] - 1)] == x
    idx = jnp.where(on_midpoint & (idx % 2 == 1), idx + 1, idx)
    idx = jnp.where(jnp.isnan(x), 0, idx)
    return idx.astype(jnp.uint8)


def _blocks_of(values: jax.Array, blocksize: int) -> jax.Array:
    n = values.shape[0]
    nblocks = -(-n // blocksize)
    return jnp.pad(values, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)


def quantize_scales(absmax: jax.Array, offset: jax.Array | None = None):
    """Double-quantize a float32 vector of block scales.

    Args:
      absmax: float32 ``[nblocks]``.
      offset: float32 scalar to subtract; defaults to ``sum(absmax) / nblocks`` in float32, like
        torch's mean (a division, not a multiplication by 1/n). The summation order can still make
        the last bit differ from torch's, which is harmless to readers because the offset is stored.

    Returns:
      ``(codes uint8 [nblocks], nested_absmax float32 [ceil(nblocks/256)], offset float32 [])``.
      A NaN or Inf scale makes its block's ``nested_absmax`` NaN (and the default offset, a sum,
      non-finite), so a caller that checks ``nested_absmax`` cannot miss it.
    """
    absmax = absmax.astype(jnp.float32)
    if offset is None:
        offset = jnp.sum(absmax) / jnp.float32(absmax.shape[0])
    offset = jnp.asarray(offset, jnp.float32)
    centred = absmax - offset
    blocks = _blocks_of(centred, NESTED_BLOCKSIZE)
    # XLA's fused CPU max can drop a NaN that is not a block's last element: a block with a NaN or
    # Inf gets a NaN nested scale, so that the caller's finiteness check sees it.
    finite_blocks = jnp.all(jnp.isfinite(blocks), axis=1)
    nested_absmax = jnp.where(finite_blocks, jnp.max(jnp.abs(blocks), axis=1), jnp.nan)
    # Multiply by the float32 reciprocal, like the CUDA kernel. An all-zero block gives 0 * inf = NaN,
    # which maps to code 0 and reconstructs exactly (code * 0 + offset).
    scaled = blocks * (1.0 / nested_absmax)[:, None]
    codes = nearest_dynamic_code(scaled).reshape(-1)[: absmax.shape[0]]
    return codes, nested_absmax, offset


def _unfused(x: jax.Array) -> jax.Array:
    # XLA's CPU and GPU backends contract a multiply followed by an add into one FMA, which rounds once
    # instead of twice; bitsandbytes rounds the product first (B.6). A select between the two
    # operations keeps them apart (optimization_barrier and reduce_precision do not).
    return jnp.where(x == x, x, jnp.nan)


def dequantize_scales(codes: jax.Array, nested_absmax: jax.Array, offset: jax.Array) -> jax.Array:
    """Reconstruct float32 block scales: ``f32(f32(dyn[code] * nested_absmax) + offset)`` (B.6)."""
    nblocks = codes.shape[0]
    values = jnp.asarray(DYNAMIC_MAP)[codes.astype(jnp.int32)]
    scales = jnp.repeat(nested_absmax.astype(jnp.float32), NESTED_BLOCKSIZE, total_repeat_length=None)
    product = _unfused(values * scales[:nblocks])
    return product + jnp.asarray(offset, jnp.float32)


__all__ = ["nearest_dynamic_code", "quantize_scales", "dequantize_scales"]
