"""jaxlora.nn.matmul: 16-bit products accumulate in float32 without converting the operands first."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxlora.nn.matmul import _low_precision_linear, batched_einsum, dot, linear_matmul
from tests.error_bounds import abs_einsum, assert_within, dot_bound, exact, gamma, random_array, unit_roundoff


def _operands(dtype, shape_x=(2, 5, 64), shape_w=(24, 64)):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape_x), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal(shape_w) * 0.1, jnp.float32).astype(dtype)
    return x, w


def _ulp_close(actual, expected, dtype):
    """Within one unit in the last place of ``dtype`` (float32 sums in another order round differently).

    Both are float32 sums (within gamma(n, 2^-24) sum|a b| of each other, n <= 64 here) rounded once to
    ``dtype``: they differ by at most two roundings, 2u = eps of the value (rtol), plus the float32
    difference, ~1e-5 of the magnitudes, far inside eps * max|expected| (atol)."""
    eps = float(jnp.finfo(dtype).eps)
    a, e = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    np.testing.assert_allclose(a, e, rtol=eps, atol=eps * float(np.abs(e).max()))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_product_is_the_float32_product_rounded_once(dtype):
    x, w = _operands(dtype)
    out = linear_matmul(x, w)
    assert out.dtype == dtype and out.shape == (2, 5, 24)
    _ulp_close(out, (x.astype(jnp.float32) @ w.astype(jnp.float32).T).astype(dtype), dtype)
    out32 = dot(x, w, (-1, 1), out_dtype=jnp.float32)
    assert out32.dtype == jnp.float32
    # Kept in float32: the 64 products are exact there and only their sum rounds, gamma(64) |x| |w|^T at
    # most (tests/error_bounds.py), against the exact product of the same 16-bit values.
    exact_product = exact(x) @ exact(w).T
    bound = gamma(64, unit_roundoff(jnp.float32)) * abs_einsum("bsi,oi->bso", x, w)
    assert_within(out32, exact_product, bound, "float32 result", sharp=1e-4)


@pytest.mark.parametrize("fn", ["linear", "dot", "einsum"])
def test_16bit_operands_reach_the_product_unconverted(fn):
    """The point of the module: the lowered product takes bf16 operands and yields f32 (no f32 copies)."""
    x, w = _operands(jnp.bfloat16)
    f = {"linear": lambda x, w: linear_matmul(x, w),
         "dot": lambda x, w: dot(x, w, (-1, 1)),
         "einsum": lambda x, w: batched_einsum("bsd,od->bso", x, w)}[fn]
    text = jax.jit(f).lower(x, w).as_text()
    products = [line for line in text.splitlines() if "dot_general" in line]
    assert products, text
    for line in products:
        assert re.search(r"tensor<[0-9x]*xbf16>, tensor<[0-9x]*xbf16>\) -> tensor<[0-9x]*xf32>", line), line


def test_float32_is_the_plain_product_bit_for_bit():
    x, w = _operands(jnp.float32)
    np.testing.assert_array_equal(np.asarray(linear_matmul(x, w)), np.asarray(x @ w.T))
    g = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 24)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(dot(g, w, (-1, 0))), np.asarray(g @ w))
    a, b = g.reshape(-1, 24), x.reshape(-1, 64)
    np.testing.assert_array_equal(np.asarray(dot(a, b, (0, 0))), np.asarray(a.T @ b))


def test_16bit_gradients_match_the_float32_reference():
    x, w = _operands(jnp.bfloat16)
    g = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 24)), jnp.float32).astype(jnp.bfloat16)
    _, vjp = jax.vjp(linear_matmul, x, w)
    grad_x, grad_w = vjp(g)
    assert grad_x.dtype == jnp.bfloat16 and grad_w.dtype == jnp.bfloat16
    x32, w32, g32 = (a.astype(jnp.float32) for a in (x, w, g))
    _ulp_close(grad_x, (g32 @ w32).astype(jnp.bfloat16), jnp.bfloat16)
    _ulp_close(grad_w, (g32.reshape(-1, 24).T @ x32.reshape(-1, 64)).astype(jnp.bfloat16), jnp.bfloat16)
    text = jax.jit(lambda x, w, g: jax.vjp(linear_matmul, x, w)[1](g)).lower(x, w, g).as_text()
    for line in (line for line in text.splitlines() if "dot_general" in line):
        assert "xbf16>, tensor<" in line and "xf32>" in line.split("->")[-1], line


def _exact_linear_gradients(x, w, g):
    with jax.enable_x64(True):
        _, vjp = jax.vjp(lambda x, w: x @ w.T, jnp.asarray(exact(x)), jnp.asarray(exact(w)))
        return tuple(np.asarray(a) for a in vjp(jnp.asarray(exact(g))))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("x_shape, out", [((2, 7, 13), 11), ((3, 5, 6), 9), ((1, 9, 37), 5)], ids=str)
def test_16bit_linear_gradient_is_within_its_rounding_bound(x_shape, out, dtype):
    """The custom VJP of a 16-bit `linear_matmul` against the exact gradient of ``x @ w^T``.

    Each gradient element is one `dot`: ``grad_x = g w`` sums ``out`` products, ``grad_w = g^T x``
    one per token; float32 accumulation and one rounding to 16 bits bound its error by
    ``gamma(n, 2^-24) |g| |w| + u |g w|`` (`dot_bound`, tests/error_bounds.py), u = 2^-8 (bfloat16) or
    2^-11 (float16), whatever order the sums take.
    """
    rng = np.random.default_rng(len(x_shape) + out)
    x, w = random_array(rng, x_shape, dtype), random_array(rng, (out, x_shape[-1]), dtype, 0.3)
    g = random_array(rng, x_shape[:-1] + (out,), dtype)
    grad_x, grad_w = jax.vjp(linear_matmul, x, w)[1](g)
    assert grad_x.dtype == dtype and grad_w.dtype == dtype
    exact_x, exact_w = _exact_linear_gradients(x, w, g)
    tokens = int(np.prod(x_shape[:-1]))
    sharp = 2e-2 if dtype == jnp.bfloat16 else 3e-3
    bound_x = dot_bound(out, dtype, abs_einsum("...o,oi->...i", g, w), exact_x)
    bound_w = dot_bound(tokens, dtype, abs_einsum("to,ti->oi", g.reshape(tokens, out), x.reshape(tokens, -1)), exact_w)
    assert_within(grad_x, exact_x, bound_x, "dL/dx", sharp=sharp)
    assert_within(grad_w, exact_w, bound_w, "dL/dw", sharp=sharp)


def test_16bit_gradient_rule_passes_check_grads_in_float64():
    """The rule of the 16-bit custom VJP is dtype-agnostic; called directly on float64 it is checked
    against finite differences (check_grads, reverse mode). A bilinear function has no truncation
    error; rounding is ~u64 |f| / eps = 1e-12 against check_grads' float64 tolerance of 1e-5. (Finite
    differences in bfloat16 itself would measure rounding, not derivatives.)"""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x, w = jnp.asarray(rng.standard_normal((2, 7, 13))), jnp.asarray(rng.standard_normal((11, 13)))
        check_grads(_low_precision_linear, (x, w), order=1, modes=["rev"])


def test_float32_gradient_is_plain_autodiff():
    """float32 takes no custom VJP: its gradient is autodiff of ``x @ w^T``, the same computation, bit for bit."""
    rng = np.random.default_rng(5)
    x, w, g = (random_array(rng, s, jnp.float32) for s in ((2, 7, 13), (11, 13), (2, 7, 11)))
    ours = jax.vjp(linear_matmul, x, w)[1](g)
    plain = jax.vjp(lambda x, w: x @ w.T, x, w)[1](g)
    for a, b in zip(ours, plain, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
