"""Linear4bit: forward, gradients, and the QLoRA memory property (no dense weight kept for backward)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from jaxlora.nn import Linear4bit, LoraLinear, quantized_matmul
from jaxlora.quant import dequantize_4bit, quantize_4bit
from tests.error_bounds import abs_einsum, assert_within, dot_bound, exact, gamma, random_array, unit_roundoff


def random_weight(out_f, in_f, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal((out_f, in_f)) * 0.05).astype(dtype)


def _cast_error(from_dtype, to_dtype) -> float:
    """Relative error of casting ``from_dtype`` values to ``to_dtype`` (0 unless it narrows)."""
    return unit_roundoff(to_dtype) if unit_roundoff(to_dtype) > unit_roundoff(from_dtype) else 0.0


# (x shape, out, blocksize, double_quant): batch > 1, in/out features not multiples of 8, weights
# whose size is not a multiple of the blocksize (a partial last block; with double quantization a
# partial nested block of scales too), and a layer of whole blocks.
LAYERS = [((2, 3, 64), 24, 64, False), ((2, 7, 37), 13, 64, True), ((3, 5, 19), 11, 32, True),
          ((1, 4, 200), 9, 128, False)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("x_shape, out, blocksize, double_quant", LAYERS, ids=str)
def test_forward_and_input_gradient(x_shape, out, blocksize, double_quant, quant_type, compute_dtype):
    """``y = cast_x(cast_c(x) @ W^T + b)`` and its custom gradient against the exact values, W the dequantized
    weight in the compute dtype c (the reference: float64 autodiff of ``x @ dequantize_4bit(q).T + b``).

    Bounds (tests/error_bounds.py): the product is one `dot` over ``in`` terms (``dL/dx = g W``: over
    ``out`` terms), `dot_bound`; with c = bfloat16 the casts of x (or g) and of the bias to c each add
    2^-8 of their magnitude; the bias addition rounds once more in c.
    """
    in_f = x_shape[-1]
    rng = np.random.default_rng(in_f + out)
    w = random_weight(out, in_f)
    bias = np.linspace(-1, 1, out).astype(np.float32)
    layer = Linear4bit.from_weight(jnp.asarray(w), jnp.asarray(bias), quant_type=quant_type, blocksize=blocksize,
                                   double_quant=double_quant, compute_dtype=compute_dtype)
    w_dq = dequantize_4bit(layer.quantized, compute_dtype)
    x = random_array(rng, x_shape, jnp.float32)
    g = random_array(rng, x_shape[:-1] + (out,), jnp.float32)
    y, vjp = jax.vjp(layer, x)
    (dx,) = vjp(g)
    assert y.dtype == jnp.float32 and y.shape == x_shape[:-1] + (out,) and dx.dtype == jnp.float32

    def reference(x, w, b):
        return x @ w.T + b[None, None, :]

    with jax.enable_x64(True):
        exact_y, exact_vjp = jax.vjp(reference, *(jnp.asarray(exact(a)) for a in (x, w_dq, bias)))
        exact_dx = np.asarray(exact_vjp(jnp.asarray(exact(g)))[0])
    to_c = _cast_error(jnp.float32, compute_dtype)
    u_c = unit_roundoff(compute_dtype)
    x_w = abs_einsum("bsi,oi->bso", x, w_dq)
    x_w_exact = np.einsum("bsi,oi->bso", exact(x), exact(w_dq))
    y_bound = (to_c * (x_w + np.abs(bias)[None, None, :]) + dot_bound(in_f, compute_dtype, x_w, x_w_exact)
               + u_c * np.abs(np.asarray(exact_y)))
    # The bound grows with ``in`` (the cast of x, |x| |W|^T against |x W^T|): for bfloat16 it reaches 4.5%
    # of the output's scale at in = 200, still far below what a wrong weight, transpose or bias gives.
    sharp = 1e-4 if compute_dtype == jnp.float32 else 0.06
    assert_within(y, np.asarray(exact_y), y_bound, "forward", sharp=sharp)
    g_w = abs_einsum("bso,oi->bsi", g, w_dq)
    dx_bound = to_c * g_w + dot_bound(out, compute_dtype, g_w, exact_dx)
    assert_within(dx, exact_dx, dx_bound, "dL/dx", sharp=sharp)


@pytest.mark.parametrize("double_quant", [False, True])
def test_no_gradient_flows_to_the_quantized_weight(double_quant):
    """The cotangent of every leaf of the QuantizedTensor is zero (float0 for the integer codes and,
    with double quantization, the 8-bit scale codes)."""
    q = quantize_4bit(jnp.asarray(random_weight(13, 37)), double_quant=double_quant)
    rng = np.random.default_rng(6)
    x, g = random_array(rng, (2, 7, 37), jnp.float32), random_array(rng, (2, 7, 13), jnp.float32)
    _, vjp = jax.vjp(lambda x, q: quantized_matmul(x, q, jnp.float32), x, q)
    dx, dq = vjp(g)
    assert np.any(np.asarray(dx) != 0)
    assert jax.tree.structure(dq) == jax.tree.structure(q)
    names = [name for name in ("packed", "absmax", "nested_absmax", "offset") if getattr(q, name) is not None]
    for name, stored, cotangent in zip(names, jax.tree.leaves(q), jax.tree.leaves(dq), strict=True):
        if jnp.issubdtype(stored.dtype, jnp.integer):  # codes: integer leaves get float0, "no cotangent"
            assert cotangent.dtype == jax.dtypes.float0, name
        else:
            assert cotangent.shape == stored.shape and not np.any(np.asarray(cotangent)), name


def test_quantized_matmul_check_grads_float64():
    """Finite differences in float64 (check_grads, reverse mode): x -> x @ W^T is linear, so central
    differences have no truncation error and ~u64 |y| / eps = 1e-12 of rounding, far below
    check_grads' float64 tolerance (1e-5). The quantized weight is closed over (not differentiable)."""
    q = quantize_4bit(jnp.asarray(random_weight(13, 37)), blocksize=32, double_quant=True)
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 7, 37)))
        check_grads(lambda x: quantized_matmul(x, q, jnp.float64), (x,), order=1, modes=["rev"])


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


def _decode_loop_temp_bytes(n_layers, size, double_quant):
    layers = nnx.List([Linear4bit(quantize_4bit(jnp.asarray(random_weight(size, size, seed=i)), double_quant=double_quant),
                                  compute_dtype=jnp.bfloat16) for i in range(n_layers)])
    graphdef, state = nnx.split(layers)

    def decode(state, x):
        model = nnx.merge(graphdef, state)

        def token(carry):
            step, x = carry
            for layer in model:
                x = jnp.tanh(layer(x))
            return step + 1, x

        return jax.lax.while_loop(lambda carry: carry[0] < 4, token, (0, x))[1]

    x = jnp.ones((1, size), jnp.bfloat16)
    return jax.jit(decode).lower(state, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("double_quant", [False, True])
def test_decode_loop_does_not_dequantize_before_the_loop(double_quant):
    """A token-by-token loop (``lax.while_loop``, as jaxlora.generate decodes) over a stack of 4-bit
    layers: whatever depends only on the weights is loop-invariant, and XLA computes it once before
    the loop, for every layer at once; the unpacked int32 code indices alone are 4 bytes per parameter
    (Llama-2-7B: a 27.8 GB allocation). Each added 1024x1024 layer may add at most a small fraction of
    one dense bf16 weight (2 MiB) to the temporaries, not 4 MiB of indices."""
    size, few, many = 1024, 2, 6
    temp = {n: _decode_loop_temp_bytes(n, size, double_quant) for n in (few, many)}
    print(f"decode-loop temporaries by layer count: {temp}")
    assert (temp[many] - temp[few]) / (many - few) < size * size * 2 / 8, temp


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
    # And the gradient of autodiff through a dense copy of the dequantized weight, computed exactly (float64).
    w_dq = dequantize_4bit(base.quantized, jnp.float32)
    scaling = layer.scaling["default"]

    def dense_loss(a, b, x, w):
        return jnp.sum((x @ w.T + scaling * (x @ a.T) @ b.T) ** 2)

    a, b = layer.lora_A["default"][...], layer.lora_B["default"][...]
    with jax.enable_x64(True):
        args = [jnp.asarray(exact(v)) for v in (a, b, x, w_dq)]
        exact_a, exact_b = (np.asarray(v) for v in jax.grad(dense_loss, argnums=(0, 1))(*args))
        # The loss is a polynomial with positive coefficients (scaling > 0), so its rounding error is at
        # most gamma(D) times the same computation on absolute values (Higham, 3.1), D the longest chain
        # of roundings: x A^T (64 terms), scaling, (.) B^T (4), + x W^T, then the gradient's products,
        # (2y) B (16 terms) and its product with x over the 3 tokens, scaling: D = 64 + 1 + 4 + 1 + 16 + 3 + 1.
        magnitude_a, magnitude_b = jax.grad(dense_loss, argnums=(0, 1))(*(jnp.abs(v) for v in args))
    depth = 64 + 1 + 4 + 1 + 16 + 3 + 1
    u = unit_roundoff(jnp.float32)
    for name, exact_grad, magnitude in (("lora_A", exact_a, magnitude_a), ("lora_B", exact_b, magnitude_b)):
        bound = gamma(depth, u) * np.asarray(magnitude)
        assert_within(grads[name]["default"][...], exact_grad, bound, f"dL/d{name}", sharp=1e-3)
