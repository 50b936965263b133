"""The custom gradient of jaxlora/models/llama.py's `swiglu` against autodiff of a textbook reference:
exact (float64) gradients, each element within a rounding bound derived below (model and notation:
tests/error_bounds.py), in float32, bfloat16 and float64, plus finite differences (check_grads) in
float64. (The attention kernels' gradients: tests/nn/test_attention.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxlora.models.llama import swiglu
from tests.error_bounds import assert_within, exact, fn_error, make_inputs, unit_roundoff, value_and_vjp, vjp_exactly

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float64]


# -- SwiGLU --------------------------------------------------------------------------------------------

def reference_swiglu(gate, up):
    return jax.nn.silu(gate) * up


def swiglu_bounds(gate, up, grad, dtype):
    """First-order bounds of ``silu(gate) * up`` and of the custom gradient, element by element.

    With S = sigmoid(gate), L = |gate| S = |silu(gate)|, e_s = fn_error (the sigmoid's relative error)
    and u the roundoff of ``dtype`` (16-bit elementwise arithmetic rounds to 16 bits at worst after
    each operation): output ``silu * up``: |up| L (e_s + 2u). ``grad_up = grad * silu``:
    |grad| L (e_s + 2u). ``grad_gate = grad * up * (S + silu (1 - S))``: the bracket's error is
    e_s (S + L |1 - S| + L S) + u (S + 4 L |1 - S|) (the sigmoid's error reaches it three times: in
    S, in silu and in 1 - S, where it is multiplied by silu; then the roundings of 1 - S, the product
    and the sum), and the two outer products add 2u of |grad up| |bracket|.
    """
    u, e_s = unit_roundoff(dtype), fn_error(dtype)
    g, up, grad = exact(gate), exact(up), exact(grad)
    sig = 1 / (1 + np.exp(-g))
    silu_mag = np.abs(g) * sig
    bracket = sig + silu_mag * (1 - sig)
    bracket_err = e_s * (sig + silu_mag * (1 - sig) + silu_mag * sig) + u * (sig + 4 * silu_mag * (1 - sig))
    return (np.abs(up) * silu_mag * (e_s + 2 * u), np.abs(grad * up) * (bracket_err + 2 * u * np.abs(bracket)),
            np.abs(grad) * silu_mag * (e_s + 2 * u))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(2, 7, 13), (3, 5, 6)], ids=str)
def test_swiglu_gradient_matches_autodiff(shape, dtype):
    """Gate values from N(0, 4^2): saturated, linear and negative regions of the sigmoid."""
    rng = np.random.default_rng(sum(shape))
    with jax.enable_x64(dtype == jnp.float64):
        make = make_inputs(dtype)
        gate, up, grad = make(rng, shape, 4.0), make(rng, shape), make(rng, shape)
        out, (grad_gate, grad_up) = value_and_vjp(swiglu, (gate, up), grad)
    assert out.dtype == grad_gate.dtype == grad_up.dtype == dtype
    exact_out, (exact_gate, exact_up) = vjp_exactly(reference_swiglu, (gate, up), grad)
    out_bound, gate_bound, up_bound = swiglu_bounds(gate, up, grad, dtype)
    sharp = {jnp.float32: 1e-5, jnp.bfloat16: 0.1, jnp.float64: 1e-13}[dtype]
    assert_within(out, exact_out, out_bound, "output", sharp=sharp)
    assert_within(grad_gate, exact_gate, gate_bound, "dL/dgate", sharp=sharp)
    assert_within(grad_up, exact_up, up_bound, "dL/dup", sharp=sharp)


def test_swiglu_check_grads_float64():
    """Finite differences in float64 (check_grads, reverse mode): SwiGLU is smooth, its third derivative
    O(1) for O(1) gates, so the error of central differences with eps = 1e-4 is ~1e-9, far below
    check_grads' float64 tolerance (1e-5)."""
    rng = np.random.default_rng(13)
    with jax.enable_x64(True):
        gate, up = jnp.asarray(rng.standard_normal((2, 7, 13)) * 2), jnp.asarray(rng.standard_normal((2, 7, 13)))
        check_grads(swiglu, (gate, up), order=1, modes=["rev"])
