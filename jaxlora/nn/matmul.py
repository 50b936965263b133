"""Matrix products that keep bfloat16 / float16 operands in their own dtype, accumulating in float32.

XLA's CPU backend multiplies 16-bit operands natively (YNNPACK's bfloat16 kernels, AVX512-BF16 where
the CPU has it) only when the product is asked for in float32 (``preferred_element_type``). Written
as a plain ``bf16 @ bf16 -> bf16`` product, or as ``jnp.matmul`` with a preferred type, XLA converts
both operands to float32 first, multiplies in float32 and converts back: slower than float32 itself.
Measured on this project's CPU machine (2 cores), ``[1024, 576] @ [576, 1536]``: 330 GFLOP/s as
written plainly, 700 with `dot` below, 380 in float32 (experiments/results/train.md).

Numerics are those of the plain product: the products of 16-bit numbers are exact in float32, the
sum is accumulated in float32 and the result is rounded to the operands' dtype once (as torch's
bfloat16 matmul does). float32 operands take the plain product, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_low_precision(dtype) -> bool:
    """True for bfloat16 and float16, the dtypes whose products `dot` accumulates in float32."""
    return jnp.dtype(dtype) in _LOW_PRECISION


def _accumulates_in_float32(a: jax.Array, b: jax.Array) -> bool:
    return is_low_precision(a.dtype) and a.dtype == b.dtype


def dot(a: jax.Array, b: jax.Array, contracting: tuple[int, int], out_dtype=None) -> jax.Array:
    """``dot_general`` of ``a`` and ``b`` over one axis each (no batch axes).

    Shapes: contracting ``(i, j)`` multiplies ``a``'s axis ``i`` with ``b``'s axis ``j``; the result
    has ``a``'s other axes, then ``b``'s. 16-bit operands (both the same dtype) accumulate in float32
    and the result is cast to ``out_dtype`` (default: the operands' dtype).
    """
    axes = (contracting[0] % a.ndim, contracting[1] % b.ndim)
    if _accumulates_in_float32(a, b):
        out = jax.lax.dot_general(a, b, ((axes[:1], axes[1:]), ((), ())), preferred_element_type=jnp.float32)
        return out.astype(out_dtype or a.dtype)
    out = _plain_product(a, b, axes)
    return out if out_dtype is None else out.astype(out_dtype)


def _plain_product(a, b, axes):
    # Written as the matmul forms the layers always used, so that float32 results stay bit for bit
    # what they were: XLA picks its kernel (and summation order) from the HLO it is given.
    if b.ndim == 2 and axes == (a.ndim - 1, 1):
        return a @ b.T
    if b.ndim == 2 and axes == (a.ndim - 1, 0):
        return a @ b
    if a.ndim == 2 and b.ndim == 2 and axes == (0, 0):
        return a.T @ b
    return jax.lax.dot_general(a, b, ((axes[:1], axes[1:]), ((), ())))


def batched_einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` with `dot`'s float32 accumulation for 16-bit operands."""
    if _accumulates_in_float32(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype or a.dtype)
    out = jnp.einsum(spec, a, b)
    return out if out_dtype is None else out.astype(out_dtype)


def linear_matmul(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``x @ weight^T``: x ``[..., in]``, weight ``[out, in]`` (same dtype) -> ``[..., out]`` in x's dtype.

    For 16-bit operands the gradient is a custom VJP built from `dot` as well: autodiff would
    multiply the float32 cotangent of the accumulated product with the 16-bit operands, and XLA
    would convert those to float32 again.
    """
    if is_low_precision(x.dtype):
        return _low_precision_linear(x, weight)
    return dot(x, weight, (-1, 1))


@jax.custom_vjp
def _low_precision_linear(x, weight):
    return dot(x, weight, (-1, 1))


def _low_precision_linear_fwd(x, weight):
    return dot(x, weight, (-1, 1)), (x, weight)


def _low_precision_linear_bwd(residuals, g):
    x, weight = residuals
    g = g.astype(x.dtype)
    grad_x = dot(g, weight.astype(x.dtype), (-1, 0))
    grad_w = dot(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]), (0, 0), out_dtype=weight.dtype)
    return grad_x, grad_w


_low_precision_linear.defvjp(_low_precision_linear_fwd, _low_precision_linear_bwd)
