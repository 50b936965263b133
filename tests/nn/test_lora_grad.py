"""The custom gradient of `jaxlora.nn.lora.project_up` against autodiff of ``h @ B^T``.

Bounds: tests/error_bounds.py. ``grad_h = g B`` sums ``out`` products per element, ``grad_B = g^T h``
sums one product per token; each is one `jaxlora.nn.matmul.dot`, so its error is at most
``gamma(n) |g| |B|`` (resp. ``|g|^T |h|``) for the float32 (float64) accumulation, plus for bfloat16
one rounding of the result, 2^-8 of it (`dot_bound`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxlora.nn.lora import lora_update, project_up
from tests.error_bounds import abs_einsum, assert_within, dot_bound, exact, random_array


def reference_project_up(h, lora_b):
    return h @ lora_b.T


def exact_gradients(h, lora_b, g):
    with jax.enable_x64(True):
        _, vjp = jax.vjp(reference_project_up, jnp.asarray(exact(h)), jnp.asarray(exact(lora_b)))
        return tuple(np.asarray(a) for a in vjp(jnp.asarray(exact(g))))


# (batch, seq, rank, out): odd sizes, batch > 1, a rank-1 adapter.
SHAPES = [(2, 7, 3, 13), (3, 5, 1, 11), (1, 9, 8, 6)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_project_up_gradient_matches_autodiff(shape, dtype):
    batch, seq, rank, out = shape
    rng = np.random.default_rng(sum(shape))
    h = random_array(rng, (batch, seq, rank), dtype)
    lora_b = random_array(rng, (out, rank), dtype, 0.3)
    g = random_array(rng, (batch, seq, out), dtype)
    y, vjp = jax.vjp(project_up, h, lora_b)
    assert y.dtype == dtype
    grad_h, grad_b = vjp(g)
    assert grad_h.dtype == dtype and grad_b.dtype == dtype
    exact_h, exact_b = exact_gradients(h, lora_b, g)
    sharp = 1e-4 if dtype == jnp.float32 else 2e-2
    bound_h = dot_bound(out, dtype, abs_einsum("bso,or->bsr", g, lora_b), exact_h)
    bound_b = dot_bound(batch * seq, dtype, abs_einsum("bso,bsr->or", g, h), exact_b)
    assert_within(grad_h, exact_h, bound_h, "dL/dh", sharp=sharp)
    assert_within(grad_b, exact_b, bound_b, "dL/dB", sharp=sharp)


def test_project_up_float64_gradient_is_exact_to_float64_rounding():
    """The rule's algebra, with rounding out of the way: float64 in, float64 bounds (u = 2^-53)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        h, lora_b, g = (jnp.asarray(rng.standard_normal(s)) for s in ((2, 7, 3), (13, 3), (2, 7, 13)))
        grad_h, grad_b = jax.vjp(project_up, h, lora_b)[1](g)
        exact_h, exact_b = exact_gradients(h, lora_b, g)
        bound_h = dot_bound(13, jnp.float64, abs_einsum("bso,or->bsr", g, lora_b), exact_h)
        bound_b = dot_bound(14, jnp.float64, abs_einsum("bso,bsr->or", g, h), exact_b)
        assert_within(grad_h, exact_h, bound_h, "dL/dh", sharp=1e-12)
        assert_within(grad_b, exact_b, bound_b, "dL/dB", sharp=1e-12)


def test_project_up_check_grads_float64():
    """Finite differences in float64 (jax's check_grads, reverse mode, order 1): central differences
    with eps = 1e-4 of a bilinear function have no truncation error and a rounding error near
    u64 |f| / eps ~ 1e-12, far below check_grads' float64 tolerance (1e-5); a wrong rule is off by O(1)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        h, lora_b = jnp.asarray(rng.standard_normal((2, 7, 3))), jnp.asarray(rng.standard_normal((13, 3)))
        check_grads(project_up, (h, lora_b), order=1, modes=["rev"])
        x, lora_a = jnp.asarray(rng.standard_normal((2, 7, 10))), jnp.asarray(rng.standard_normal((3, 10)))
        check_grads(lambda x, a, b: lora_update(x, a, b, 0.75), (x, lora_a, lora_b), order=1, modes=["rev"])


def test_bfloat16_products_take_bfloat16_operands():
    """With a bfloat16 adapter (``lora_dtype``) the up-projection and both of its gradient products are
    16-bit products accumulated in float32 (`jaxlora.nn.matmul.dot`), which the bounds above assume."""
    rng = np.random.default_rng(3)
    h, lora_b, g = (random_array(rng, s, jnp.bfloat16) for s in ((2, 7, 3), (13, 3), (2, 7, 13)))

    def forward_and_gradients(h, b, g):
        y, vjp = jax.vjp(project_up, h, b)
        return y, vjp(g)

    text = jax.jit(forward_and_gradients).lower(h, lora_b, g).as_text()
    products = [line for line in text.splitlines() if "dot_general" in line]
    assert len(products) == 3, text
    for line in products:
        assert "xbf16>, tensor<" in line and "xf32>" in line.split("->")[-1], line
