"""`jaxlora.nn.ordering`: the data-dependent ones and zeros change no number. (What they are for, keeping
dequantization, recomputation and loop accumulators in their place in XLA's schedule, is measured by the
peak-memory tests of tests/nn/test_linear4bit.py, tests/models/test_recompute.py and tests/nn/test_attention*.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.nn.ordering import first_element, one_after, zeros_after


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_finite_data_gives_exact_ones_and_zeros(dtype):
    x = jnp.asarray([[-3.5, 2.0], [7.0, 1e-3]], dtype)
    assert first_element(x).dtype == jnp.float32 and float(first_element(x)) == -3.5
    one = jax.jit(one_after)(x)
    assert one.dtype == jnp.float32 and float(one) == 1.0
    zeros = jax.jit(lambda x: zeros_after(x, (3, 5), jnp.bfloat16))(x)
    assert zeros.shape == (3, 5) and zeros.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(zeros, np.float32), 0.0)
    assert not np.signbit(np.asarray(zeros, np.float32)).any()  # +0.0, though x[0] < 0


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_data(bad):
    x = jnp.asarray([bad, 1.0], jnp.float32)
    assert np.isnan(float(one_after(x)))  # a scaled result turns NaN, as it would from x anyway
    np.testing.assert_array_equal(np.asarray(zeros_after(x, (4,), jnp.float32)), 0.0)  # accumulators start at 0


def test_the_first_floating_leaf_of_a_tree_is_used():
    tree = {"a": jnp.arange(3, dtype=jnp.int32), "b": jnp.asarray([4.0, 5.0])}
    assert float(first_element(tree)) == 4.0
    with pytest.raises(TypeError, match="no floating-point leaf"):
        first_element({"ids": jnp.arange(3)})
