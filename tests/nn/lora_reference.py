"""PEFT's LoRA / DoRA layer (formats.md A.4-A.8) evaluated exactly (float64), and the rounding bound of
any float32 evaluation of it: jaxlora and PEFT are each compared with the same exact values.

Bound (tests/error_bounds.py for the model): written with its subtractions as ``a + sign * b``, the
layer and its gradients are polynomials in (x, W, b, A, B, m, g) whose only other inputs, DoRA's row
norms n = ||W + s B A|| (detached, as PEFT and jaxlora both do), are positive constants. A polynomial
evaluated in floating point in any order is within ``gamma(D) * p~`` of its exact value, where p~ is
the same computation on absolute values with every subtraction made an addition (``sign = +1``) and
D the largest number of roundings that multiply into one term (Higham, "Accuracy and Stability of
Numerical Algorithms", 3.1; n's own computation, a norm, a square root and a division, counts as
its chain of roundings). `depth` bounds D for every output of the layer and its backward pass, in
any evaluation order: the contraction lengths that can chain into one term (x A^T and the norm
over ``in``, twice; the backward's sum over ``out``; B over ``r``, twice; the gradients' sum over
the tokens) plus 16 elementwise roundings (scaling, bias, dropout mask, DoRA's m / n, its
subtractions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.error_bounds import exact, gamma, unit_roundoff


def depth(in_features: int, out_features: int, r: int, tokens: int) -> int:
    """An upper bound of D (see the module docstring)."""
    return 2 * in_features + out_features + 2 * r + tokens + 16


def row_norms(w, a, b, scaling) -> np.ndarray:
    """DoRA's ``||W + s B A||`` per output row, exactly."""
    return np.linalg.norm(exact(w) + scaling * exact(b) @ exact(a), axis=1)


def lora_output(x, a, b, m, b_bias=None, *, w, bias, scaling, dora, norms, mask=None, sign=-1.0):
    """PEFT's output ``x W^T + bias + s ((x' A^T) B^T + b_B)`` (``b_B``: lora_bias, else 0); with DoRA
    ``x W^T + bias + (m / n - 1) (x' W^T + bias - bias) + (m / n) s (x' A^T) B^T``, in the form PEFT
    computes it (``x'``: x times the dropout mask, if any). ``sign = +1`` gives the magnitude p~."""
    def row(vector):  # [out] -> [1, ..., 1, out], explicit (rank promotion is an error in the tests)
        return vector.reshape((1,) * (x.ndim - 1) + vector.shape)

    dropped = x if mask is None else x * mask
    out = x @ w.T + row(bias)
    lora = scaling * (dropped @ a.T) @ b.T if b_bias is None else scaling * ((dropped @ a.T) @ b.T + row(b_bias))
    if not dora:
        return out + lora
    scale = row(m / norms)
    # The base output without its bias: x' W^T + b - b, as the implementations take it from the base layer.
    base = dropped @ w.T + row(bias) + sign * row(bias)
    return out + (scale + sign) * base + scale * lora


def exact_and_magnitudes(x, g, *, w, bias, a, b, m=None, b_bias=None, scaling, mask=None, norms=None):
    """``{name: (exact, p~)}`` for the output and the gradients of x, A, B (and m with DoRA, b_B with
    lora_bias) under the cotangent ``g``: the exact values and their magnitudes (the module docstring)."""
    dora = m is not None
    with_bias = b_bias is not None
    bias = np.zeros(np.shape(w)[0]) if bias is None else bias
    names = ["output", "dL/dx", "dL/dA", "dL/dB"] + (["dL/dm"] if dora else []) + (["dL/db_B"] if with_bias else [])
    if norms is None and dora:
        norms = row_norms(w, a, b, scaling)
    with jax.enable_x64(True):
        def evaluate(sign, transform):
            constants = {k: None if v is None else jnp.asarray(transform(exact(v)))
                         for k, v in dict(w=w, bias=bias, mask=mask).items()}
            primals = [jnp.asarray(transform(exact(v)))
                       for v in (x, a, b, m if dora else np.zeros(1), b_bias if with_bias else np.zeros(1))]

            def fn(x, a, b, m, b_bias):
                return lora_output(x, a, b, m, b_bias if with_bias else None, scaling=scaling, dora=dora, sign=sign,
                                   norms=None if norms is None else jnp.asarray(norms), **constants)

            out, vjp = jax.vjp(fn, *primals)
            grads = vjp(jnp.asarray(transform(exact(g))))
            return [np.asarray(v) for v in (out, *grads[: 3 + dora], *grads[4:4 + with_bias])]

        values = evaluate(-1.0, lambda v: v)
        magnitudes = evaluate(1.0, np.abs)
    return dict(zip(names, zip(values, magnitudes, strict=True), strict=True))


def float32_roundoff(x, w, a) -> float:
    """``gamma(D)`` for a float32 evaluation of the layer on these shapes (`depth`)."""
    tokens = int(np.prod(np.shape(x)[:-1]))
    return gamma(depth(np.shape(x)[-1], np.shape(w)[0], np.shape(a)[0], tokens), unit_roundoff(jnp.float32))


def exact_and_bounds(x, g, **weights):
    """``{name: (exact, bound)}``: `exact_and_magnitudes` with the float32 bound ``gamma(D) p~``."""
    relative = float32_roundoff(x, weights["w"], weights["a"])
    return {name: (value, relative * magnitude)
            for name, (value, magnitude) in exact_and_magnitudes(x, g, **weights).items()}
