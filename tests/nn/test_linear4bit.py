"""Linear4bit: forward, gradients, and the QLoRA memory property (no dense weight kept for backward)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.nn import Linear4bit, LoraLinear, quantized_matmul
from jaxlora.quant import dequantize_4bit, quantize_4bit
from tests.helpers import assert_rel_close


def random_weight(out_f, in_f, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal((out_f, in_f)) * 0.05).astype(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_input_gradient(quant_type, compute_dtype):
    w = random_weight(24, 64)
    bias = np.linspace(-1, 1, 24).astype(np.float32)
    layer = Linear4bit.from_weight(jnp.asarray(w), jnp.asarray(bias), quant_type=quant_type, compute_dtype=compute_dtype)
    w_dq = dequantize_4bit(layer.quantized, compute_dtype)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32))
    expected = ((x.astype(compute_dtype) @ w_dq.T) + jnp.asarray(bias).astype(compute_dtype)[None, None, :]).astype(jnp.float32)
    out = layer(x)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 24)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    g = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 24)).astype(np.float32))
    dx = jax.grad(lambda x: jnp.sum(layer(x) * g))(x)
    dx_ref = jax.grad(lambda x: jnp.sum(((x.astype(compute_dtype) @ w_dq.T).astype(jnp.float32)) * g))(x)
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_ref))


def dense_residuals(fn, x, min_elements):
    """Floating-point residuals of at least min_elements elements that jax.vjp keeps for the backward pass."""
    _, vjp_fn = jax.vjp(fn, x)
    return [leaf.shape for leaf in jax.tree.leaves(vjp_fn) if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size >= min_elements]


def test_backward_keeps_only_the_quantized_weight():
    w = random_weight(256, 512)
    q = quantize_4bit(jnp.asarray(w), double_quant=True)
    x = jnp.ones((4, 512))
    ours = dense_residuals(lambda x: quantized_matmul(x, q, jnp.float32), x, w.size)
    assert ours == [], f"a dense copy of the weight is kept for the backward pass: {ours}"
    # The check can fail: plain autodiff through the dequantization keeps the [out, in] weight.
    naive = dense_residuals(lambda x: x @ dequantize_4bit(q, jnp.float32).T, x, w.size)
    assert sorted(naive) in ([(256, 512)], [(512, 256)]), naive  # W or W^T


class _NaiveLinear4bit(Linear4bit):
    """Differentiates through the dequantization: keeps the dense weight alive until the backward."""

    def __call__(self, x):
        return x @ self.dense_weight(jnp.float32).T


def _peak_temp_bytes(base_cls, n_layers, size):
    rngs = nnx.Rngs(0)
    layers = [
        LoraLinear(base_cls(quantize_4bit(jnp.asarray(random_weight(size, size, seed=i)), double_quant=True), compute_dtype=jnp.float32), r=8, rngs=rngs)
        for i in range(n_layers)
    ]
    model = nnx.List(layers)
    x = jnp.ones((8, size), jnp.float32)

    def loss(model, x):
        for layer in model:
            x = jnp.tanh(layer(x))
        return jnp.sum(x)

    @nnx.jit
    def grad_step(model, x):
        return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x)

    compiled = grad_step.lower(model, x).compile() if hasattr(grad_step, "lower") else None
    if compiled is None:  # nnx.jit without .lower: go through jax.jit on the split state
        graphdef, state = nnx.split(model)

        def pure(state, x):
            return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(nnx.merge(graphdef, state), x)

        compiled = jax.jit(pure).lower(state, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_training_step_does_not_hold_dense_weights():
    """XLA's own memory analysis of a jitted QLoRA gradient step over a stack of 1024x1024 layers.

    A layer that keeps its dense float32 weight (4 MiB) for the backward pass adds 4 MiB of peak
    temporaries per layer; re-dequantizing keeps the peak flat as layers are added. Compared as a
    difference between 2 and 6 layers, so fixed costs (e.g. a GPU's matmul workspace) cancel.
    """
    size, few, many = 1024, 2, 6
    dense_bytes = size * size * 4
    ours = {n: _peak_temp_bytes(Linear4bit, n, size) for n in (few, many)}
    naive = {n: _peak_temp_bytes(_NaiveLinear4bit, n, size) for n in (few, many)}
    print(f"peak temporaries (bytes) by layer count: re-dequantizing {ours}, naive {naive}; one dense weight {dense_bytes}")
    added = many - few
    assert naive[many] - naive[few] >= 0.9 * added * dense_bytes, "the naive layer should keep a dense weight per layer"
    assert ours[many] - ours[few] < dense_bytes, f"peak grows with depth {ours}: dense weights are kept for the backward pass"


def test_rejects_bad_shapes():
    q = quantize_4bit(jnp.ones((64,)))
    with pytest.raises(ValueError, match="2-D"):
        Linear4bit(q)
    q2 = quantize_4bit(jnp.ones((8, 64)))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        Linear4bit(q2, jnp.ones((7,)))


def test_qlora_gradients_flow_to_lora_only():
    base = Linear4bit.from_weight(jnp.asarray(random_weight(16, 64)), compute_dtype=jnp.float32)
    layer = LoraLinear(base, r=4, init_lora_weights=False, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 64))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    assert set(grads.keys()) == {"lora_A", "lora_B"}
    # And the same gradient as autodiff through a dense copy of the dequantized weight.
    w_dq = dequantize_4bit(base.quantized, jnp.float32)

    def dense_loss(a, b):
        return jnp.sum((x @ w_dq.T + layer.scaling["default"] * (x @ a.T) @ b.T) ** 2)

    ga, gb = jax.grad(dense_loss, argnums=(0, 1))(layer.lora_A["default"][...], layer.lora_B["default"][...])
    assert_rel_close(grads["lora_A"]["default"][...], ga, 1e-6, "dL/dA")
    assert_rel_close(grads["lora_B"]["default"][...], gb, 1e-6, "dL/dB")
