"""jaxlora.models.recompute: checkpointed layers recompute in the backward pass, and only there."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models import LlamaConfig, LlamaForCausalLM
from jaxlora.models.recompute import recomputed_call
from jaxlora.peft import LoraConfig, get_peft_model


def _model(layers: int, *, checkpointing: bool, dropout: float = 0.0):
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config, gradient_checkpointing=checkpointing, rngs=nnx.Rngs(0))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"),
                          rngs=nnx.Rngs(params=1, dropout=2))


def _loss(model, ids):
    return jnp.mean(model(ids) ** 2)


def _grad_step(model, ids):
    """Compiled ``(loss, LoRA gradients, model state after)`` of ``model`` on ``ids``, as a training step runs it."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def step(lora, rest, ids):
        def loss(lora, rest):
            inner = nnx.merge(graphdef, lora, rest)
            return _loss(inner, ids), nnx.state(inner, nnx.RngState)

        (value, rng_after), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True, allow_int=True)(lora, rest)
        return value, grads[0], rng_after

    return jax.jit(step), (lora, rest, ids)


def test_dropout_masks_are_the_same_in_the_recomputation():
    """With LoRA dropout, the gradients with checkpointing equal those without (the recomputation starts
    from the saved RNG counters, so it draws the forward pass's masks), and the counters advance as
    without checkpointing. A recomputation with fresh masks changes the gradients by O(1)."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 16)))
    results = {}
    for checkpointing in (False, True):
        model = _model(2, checkpointing=checkpointing, dropout=0.3)
        model.train()
        step, args = _grad_step(model, ids)
        results[checkpointing] = step(*args)
    (loss_plain, grads_plain, rng_plain), (loss_ckpt, grads_ckpt, rng_ckpt) = results[False], results[True]
    np.testing.assert_allclose(loss_ckpt, loss_plain, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_plain), jax.tree.leaves(grads_ckpt), strict=True):
        scale = float(jnp.max(jnp.abs(a))) or 1.0
        np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    for a, b in zip(jax.tree.leaves(rng_plain), jax.tree.leaves(rng_ckpt), strict=True):
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a),
                                      np.asarray(jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key) else b))


def _temp_bytes(layers: int, checkpointing: bool, seq: int) -> int:
    step, args = _grad_step(_model(layers, checkpointing=checkpointing), jnp.zeros((1, seq), jnp.int32))
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_checkpointed_layers_keep_only_their_input():
    """XLA's memory analysis of the compiled gradient: each added layer costs about its saved input
    (``seq * hidden`` float32 = 128 KiB here) with checkpointing, and its whole activation set (several
    times that: queries, keys, values, attention probabilities, three intermediate-size rows, LoRA
    inputs) without. With ``nnx.remat`` XLA's CPU scheduler hoisted every recomputation to the start of
    the backward pass and the two grew alike (jaxlora.models.recompute's docstring)."""
    seq, few, many = 512, 2, 6
    layer_input = seq * 64 * 4
    plain = {n: _temp_bytes(n, False, seq) for n in (few, many)}
    ckpt = {n: _temp_bytes(n, True, seq) for n in (few, many)}
    per_layer_plain = (plain[many] - plain[few]) / (many - few)
    per_layer_ckpt = (ckpt[many] - ckpt[few]) / (many - few)
    print(f"temporaries per added layer: {per_layer_plain:,.0f} B without checkpointing, {per_layer_ckpt:,.0f} B with")
    assert per_layer_plain > 4 * layer_input
    assert per_layer_ckpt <= 1.5 * layer_input


def test_recomputed_call_returns_the_module_output_and_its_gradients():
    layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(recomputed_call(layer, x), layer(x))
    grad_plain = nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))(layer, x)
    grad_ckpt = nnx.grad(lambda m, x: jnp.sum(jnp.sin(recomputed_call(m, x))), argnums=(0, 1))(layer, x)
    for a, b in zip(jax.tree.leaves(grad_plain), jax.tree.leaves(grad_ckpt), strict=True):
        np.testing.assert_array_equal(b, a)
