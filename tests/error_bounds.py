"""Rounding-error bounds for the gradient tests: what floating point may change, and nothing more.

The custom gradients are compared with the exact gradient of a plain reference (autodiff in
float64 of the same inputs, whose own error, ~1e-16 relative, is negligible), element by element,
against a bound derived from the standard model of floating-point arithmetic (Higham, "Accuracy and
Stability of Numerical Algorithms", ch. 2-3):

- each +, -, *, / and each cast to a narrower type rounds with relative error at most the unit
  roundoff ``u`` of its result type: float64 2^-53, float32 2^-24, float16 2^-11, bfloat16 2^-8;
- a sum of n terms, in any order or blocking (XLA chooses; FMA included), is within
  ``gamma(n) * sum |terms|`` of the exact sum, ``gamma(n) = n u / (1 - n u)``; a dot product of
  length n is within ``gamma(n) * sum |a_i b_i|``;
- exp, log and the logistic function are within `C_FN` units of roundoff of the type they are
  evaluated in (XLA's float32 versions were measured within 2.5 ulps over [-80, 80]); XLA's CPU and
  GPU backends evaluate them for 16-bit inputs in float32 and round the result once (`fn_error`).

16-bit products go through `jaxlora.nn.matmul.dot`, which accumulates in float32 and rounds the
result to 16 bits once: its error is ``gamma(n, 2^-24) * sum|a_i b_i|`` plus one 16-bit rounding of
the result (`dot_bound`). Bounds are first order (terms in u^2 are dropped) and evaluated in float64
numpy on the exact values; `SAFETY` = 2 covers roundings a count can miss (a division done as a
reciprocal multiply, a different fusion). A bound that is too loose would hide bugs, so each check
also asserts that its bound is a small fraction of the gradient's scale (``sharp``).

Worst-case bounds are pessimistic (errors of random sign mostly cancel): measured float32 errors are
~1e-7 of the gradient's scale, 10x to 1000x below the bounds. A wrong rule shows up in the float64
checks, whose bounds are ~1e-13 of the scale; the float32 and 16-bit checks bound what each dtype's
casts and accumulations may cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

C_FN = 4.0
SAFETY = 2.0


def unit_roundoff(dtype) -> float:
    """``u``: half the machine epsilon of ``dtype`` (2^-24 for float32, 2^-8 for bfloat16)."""
    return float(jnp.finfo(dtype).eps) / 2


def accumulation_roundoff(dtype) -> float:
    """``u`` of the type that sums: float32 for 16-bit operands (`jaxlora.nn.matmul.dot`), else the dtype's own."""
    return unit_roundoff(jnp.promote_types(dtype, jnp.float32))


def gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n``: the relative error bound of an n-term sum or dot product."""
    assert n * u < 0.5, f"gamma({n}, {u}) is not a useful bound"
    return n * u / (1 - n * u)


def narrowing(dtype) -> float:
    """Roundoff of rounding a float32 accumulator's result to ``dtype``: ``u`` for 16-bit types, else 0."""
    u = unit_roundoff(dtype)
    return u if u > accumulation_roundoff(dtype) else 0.0


def dot_bound(n: int, dtype, magnitude, result) -> np.ndarray:
    """Error bound of an n-term `jaxlora.nn.matmul.dot` in ``dtype``: ``gamma(n) * magnitude`` for the
    accumulation (``magnitude`` = ``|a| |b|``) plus, for a 16-bit ``dtype``, one rounding of ``result``
    (the exact ``a b``)."""
    return gamma(n, accumulation_roundoff(dtype)) * np.asarray(magnitude) + narrowing(dtype) * np.abs(exact(result))


def fn_error(dtype) -> float:
    """Relative error of exp / log / logistic on ``dtype`` values: `C_FN` roundoffs of the type they are
    evaluated in, plus one rounding to a 16-bit ``dtype``."""
    return C_FN * accumulation_roundoff(dtype) + narrowing(dtype)


def exact(x) -> np.ndarray:
    """An array (jax, numpy or torch) as float64 numpy (exact for float16/bfloat16/float32 values)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x).astype(np.float64)


def abs_einsum(spec: str, *arrays) -> np.ndarray:
    """``einsum`` of the absolute values, in float64: the magnitude a rounding bound scales with."""
    return np.einsum(spec, *(np.abs(exact(a)) for a in arrays))


def assert_within(actual, expected, bound, what: str, *, sharp: float) -> float:
    """|actual - expected| <= SAFETY * bound + (underflow of actual's dtype), element by element.

    ``expected`` is exact (float64); ``bound`` the first-order rounding bound, broadcastable to it.
    ``sharp``: the bound must stay below ``sharp * max|expected|``, so that the check can still see a
    wrong gradient. Returns the largest error relative to max|expected| (for the record).
    """
    dtype = jnp.dtype(str(actual.dtype).removeprefix("torch.")) if hasattr(actual, "detach") else np.asarray(actual).dtype
    actual, expected = exact(actual), exact(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.max(np.abs(expected)))
    assert scale > 0, f"{what}: the reference gradient is all zeros, so the comparison says nothing"
    allowed = SAFETY * np.broadcast_to(bound, expected.shape) + float(jnp.finfo(dtype).smallest_subnormal)
    assert float(np.max(allowed)) <= sharp * scale, (
        f"{what}: the rounding bound {float(np.max(allowed)):.2e} is not below {sharp:.0e} of the gradient's "
        f"scale {scale:.2e}; the check would be too weak")
    err = np.abs(actual - expected)
    worst = np.unravel_index(int(np.argmax(err - allowed)), err.shape)
    assert np.all(err <= allowed), (
        f"{what}: element {tuple(int(i) for i in worst)} is {actual[worst]!r}, exact {expected[worst]!r}: error "
        f"{err[worst]:.3e} > bound {allowed[worst]:.3e} (largest error {float(err.max()) / scale:.2e} of max|exact|)")
    return float(err.max()) / scale


def random_array(rng: np.random.Generator, shape, dtype, scale: float = 1.0):
    """Standard normal values times ``scale``, rounded to ``dtype`` (the test's exact inputs)."""
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)


def make_inputs(dtype):
    """``make(rng, shape, scale=1.0)``: random inputs made in float32 and rounded to ``dtype`` (float64
    ones directly; call it inside an x64 context)."""
    if dtype == jnp.float64:
        return lambda rng, shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale)
    return lambda rng, shape, scale=1.0: random_array(rng, shape, dtype, scale)


def value_and_vjp(fn, primals, cotangent):
    """``(fn(*primals), vjp(cotangent))``, jitted (one compilation instead of one per primitive)."""

    def run(primals, cotangent):
        out, vjp = jax.vjp(fn, *primals)
        return out, vjp(cotangent)

    return jax.jit(run)(tuple(primals), cotangent)


def vjp_exactly(fn, primals, cotangent):
    """``fn(*primals)`` and its VJP of ``cotangent``, autodiff in float64 of the exact inputs, as numpy."""
    with jax.enable_x64(True):
        out, grads = value_and_vjp(fn, [jnp.asarray(exact(a)) for a in primals], jnp.asarray(exact(cotangent)))
        return np.asarray(out), tuple(np.asarray(a) for a in grads)
