"""Exact values that XLA cannot compute before some data exists: how work is kept in its place.

XLA may compute whatever depends only on constants or weights as early as it likes (its scheduler),
once before a loop (loop-invariant code motion), and once for two equal computations
(common-subexpression elimination). Three places need work to wait for the data it is used with:

- `jaxlora.nn.linear4bit`: each dequantization waits for the activations (forward) or the cotangent
  (backward) it multiplies, or all layers' dense weights would be alive at once;
- `jaxlora.models.recompute`: a checkpointed layer's recomputation waits for its output's cotangent;
- `jaxlora.nn.attention`: the loop accumulators (zeros) wait for the attention's inputs, or every
  layer's would be allocated at the start of the program.

The device is the first element of the data, ``x[0]``: ``1 + 0 * x[0]`` and ``0 * x[0]`` are no constants
to XLA (it does not assume ``x[0]`` is finite), but exactly 1.0 and 0.0 for a finite ``x[0]``, so no
number changes. ``optimization_barrier`` does not do this on XLA's CPU backend (it is expanded before
scheduling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def first_element(tree) -> jax.Array:
    """The first element of the first floating-point leaf of ``tree``, as float32."""
    leaf = next((leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)), None)
    if leaf is None:
        raise TypeError("first_element: the tree has no floating-point leaf to depend on")
    return leaf.reshape(-1)[0].astype(jnp.float32)


def one_after(tree) -> jax.Array:
    """``1 + 0 * x[0]`` (float32 scalar): 1.0 for a finite ``x[0]``, NaN otherwise (a non-finite input
    makes the result it scales non-finite, as it would be anyway)."""
    return 1.0 + 0.0 * first_element(tree)


def zeros_after(tree, shape, dtype) -> jax.Array:
    """Zeros of ``shape`` and ``dtype`` that follow ``tree``: zeros even when ``x[0]`` is not finite (loop
    accumulators, which must start at zero whatever the data)."""
    first = first_element(tree)
    return jnp.broadcast_to(jnp.where(jnp.isfinite(first), jnp.abs(first) * 0.0, 0.0).astype(dtype), shape)  # +0.0


__all__ = ["first_element", "one_after", "zeros_after"]
