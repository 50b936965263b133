"""A frozen linear layer whose weight is stored in 4 bits (NF4/FP4), as bitsandbytes' Linear4bit.

    y = cast_x( cast_c(x) @ dequantize(W_q, c)^T ) + b      (c = compute dtype)

Memory: the backward pass needs ``W`` to compute ``dL/dx = g W``. A plain JAX implementation would
keep the dequantized ``W`` (4x-8x the size of ``W_q``) alive from the forward to the backward pass,
which is exactly what QLoRA must avoid. `quantized_matmul` is a custom VJP whose residual is the
quantized tensor itself; the backward pass dequantizes again.

Two XLA behaviours would undo that: a weight dequantization depends on no activation, so XLA is
free to schedule the dequantizations of all layers at the start of the program; and
common-subexpression elimination merges the backward's dequantization with the forward's; and in a
loop (token-by-token decoding is a ``lax.while_loop``), loop-invariant code motion computes whatever
depends only on the weights once, before the loop, for every layer at once: the unpacked int32 code
indices alone are 4 bytes per parameter (27.8 GB for Llama-2-7B, experiments/results/big_model.md).
Each brings long-lived dense copies back. All are blocked by making each dequantization depend on
the data it is used with: the code table and the block scales are multiplied by ``1 + 0 * x[0]`` in
the forward and ``1 + 0 * g[0]`` in the backward, an exact 1.0 that changes no bit for finite
inputs (a non-finite ``x[0]`` or ``g[0]`` turns the result into NaN), and the packed codes (and the
8-bit scale codes of double quantization) are XORed with ``x[0] != x[0]`` (0 unless ``x[0]`` is NaN). ``optimization_barrier`` does not prevent
any of this on XLA's CPU backend (`jaxlora.nn.ordering`); tests/nn/test_linear4bit.py measures the peak memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.nn.linear import broadcast_last
from jaxlora.nn.matmul import dot
from jaxlora.nn.ordering import first_element, one_after
from jaxlora.quant import QuantizedTensor, block_scales, dequantize_4bit, quantize_4bit
from jaxlora.quant.codebooks import DECODE_4BIT
from jaxlora.quant.fourbit import decode_4bit


class QuantizedWeight(nnx.Variable):
    """An NNX variable holding a `QuantizedTensor`: frozen, never selected by ``nnx.Param`` filters."""


def _zero_cotangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def quantized_matmul(x: jax.Array, q: QuantizedTensor, compute_dtype) -> jax.Array:
    """``x @ dequantize(q)^T`` in ``compute_dtype``; the backward pass re-dequantizes ``q``.

    Shapes: x ``[..., in]``, q ``[out, in]`` -> ``[..., out]`` in ``compute_dtype``.
    """
    return dot(x.astype(compute_dtype), _dequantize_after(q, x, compute_dtype), (-1, 1))


def _dequantize_after(q: QuantizedTensor, data: jax.Array, dtype) -> jax.Array:
    """Dequantize ``q``, with a data dependency on ``data`` (see the module docstring)."""
    first = first_element(data)
    one = one_after(data)
    table = jnp.asarray(DECODE_4BIT[q.quant_type]) * one
    flip = first != first  # False unless first is NaN (then the output is NaN anyway)

    def tie(leaf):  # the packed codes, and the 8-bit scale codes of double quantization
        return leaf ^ flip.astype(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.integer) else leaf

    tied = jax.tree.map(tie, q)
    return decode_4bit(tied, block_scales(tied) * one, table, dtype)


def _quantized_matmul_fwd(x, q, compute_dtype):
    # Residuals: the quantized weight (4.1-4.5 bits/param) and x's dtype; never the dense weight.
    return quantized_matmul(x, q, compute_dtype), (q, jnp.zeros((0,), x.dtype))


def _quantized_matmul_bwd(compute_dtype, residuals, g):
    q, x_dtype_marker = residuals
    w = _dequantize_after(q, g, compute_dtype)
    dx = dot(g.astype(compute_dtype), w, (-1, 0)).astype(x_dtype_marker.dtype)
    return dx, jax.tree.map(_zero_cotangent, q)


quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


class Linear4bit(nnx.Module):
    """Frozen 4-bit linear layer: bitsandbytes' ``Linear4bit`` semantics in Flax NNX.

    Args:
      quantized: the `QuantizedTensor` of the weight, shape ``[out_features, in_features]``.
      bias: optional ``[out_features]`` bias (frozen like the weight; stored as an ``nnx.Param``
        so that full fine-tuning can still select it).
      compute_dtype: dtype of the matmul (default: the weight's original dtype); the output is cast
        back to the input's dtype, as bitsandbytes does.

    Shapes: x ``[..., in_features]`` -> ``[..., out_features]``.
    """

    def __init__(self, quantized: QuantizedTensor, bias: jax.Array | None = None, *, compute_dtype=None):
        if len(quantized.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D [out, in] weight, got quantized shape {quantized.shape}")
        self.out_features, self.in_features = quantized.shape
        self.weight = QuantizedWeight(quantized)
        if bias is not None and tuple(jnp.shape(bias)) != (self.out_features,):
            raise ValueError(f"Linear4bit bias must have shape ({self.out_features},), got {tuple(jnp.shape(bias))}")
        self.bias = nnx.data(nnx.Param(jnp.asarray(bias)) if bias is not None else None)
        self.compute_dtype = jnp.dtype(compute_dtype if compute_dtype is not None else quantized.dtype)

    @classmethod
    def from_weight(
        cls,
        weight: jax.Array,
        bias: jax.Array | None = None,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype=None,
    ) -> "Linear4bit":
        """Quantize a dense ``[out, in]`` weight and wrap it (double quantization on by default, as in QLoRA)."""
        q = quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        return cls(q, bias, compute_dtype=compute_dtype)

    @property
    def quantized(self) -> QuantizedTensor:
        return self.weight.get_value()

    def dense_weight(self, dtype=None) -> jax.Array:
        """The dequantized weight ``[out, in]`` (in ``dtype``, default the original dtype)."""
        return dequantize_4bit(self.quantized, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = quantized_matmul(x, self.quantized, self.compute_dtype)
        if self.bias is not None:
            y = y + broadcast_last(self.bias[...].astype(y.dtype), y.ndim)
        return y.astype(x.dtype)
