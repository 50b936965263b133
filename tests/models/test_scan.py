"""`jaxlora.models.scan`: stacked layers run as one scanned body give the loop's logits, gradients, dropout
masks and RNG state (LoRA, QLoRA, DoRA; with and without gradient checkpointing; packed rows and padding);
layers that LoRA made different keep the loop and say why; stacking and unstacking is exact and keeps the
per-layer modules and APIs; checkpoints of a stacked run are per layer; no copy of the frozen weights."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from jaxlora.adapters.model import get_submodule, set_submodule
from jaxlora.generate import GenerationConfig, Generator
from jaxlora.models import KVCache, LlamaConfig, LlamaForCausalLM
from jaxlora.models.scan import (STACKED_KEY, LayerStacking, ScanFallbackWarning, StackedLayers, StackedLayersError,
                                 per_layer_view, stack_layers, stacked, unstack_layers)
from jaxlora.nn import Linear4bit, LoraLinear
from jaxlora.train.checkpointing import TrainCheckpointer
from jaxlora.train.step import make_train_step, split_trainable

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def make_model(kind: str = "lora", *, config: LlamaConfig = CONFIG, gradient_checkpointing: bool = False,
               lora_dropout: float = 0.1, compute_dtype=jnp.float32, **lora):
    """A random tiny Llama (float32 weights) with adapters on every linear layer; ``kind``: lora, qlora (NF4
    base) or dora. The same arguments give the same model (fixed seeds)."""
    model = LlamaForCausalLM(config, compute_dtype=compute_dtype, gradient_checkpointing=gradient_checkpointing,
                             rngs=nnx.Rngs(0))
    if kind == "qlora":
        for i in range(config.num_hidden_layers):
            for projection in PROJECTIONS:
                name = f"model.layers.{i}.{projection}"
                weight = get_submodule(model, name).weight[...]
                set_submodule(model, name, Linear4bit.from_weight(weight, compute_dtype=compute_dtype))
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=lora_dropout, use_dora=kind == "dora",
                    init_lora_weights=False)  # random B: the adapters change the outputs
    return jaxlora.get_peft_model(model, jaxlora.LoraConfig(**{**settings, **lora}), rngs=nnx.Rngs(params=1, dropout=2))


def packed_batch():
    """Two rows, ``[accum=1, 2, 16]``: row 0 packs three examples (segment ids, positions restarting at 0),
    row 1 is one example with 5 positions of right padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, size=(2, 16))
    segments = np.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 11 + [0] * 5])
    positions = np.array([list(range(5)) + list(range(7)) + list(range(4)), list(range(16))])
    mask = (segments > 0).astype(np.int32)
    labels = np.where(mask > 0, ids, -100)
    batch = dict(input_ids=ids, attention_mask=mask, segment_ids=segments, position_ids=positions, labels=labels)
    return {k: jnp.asarray(v)[None] for k, v in batch.items()}


def leaves_close(actual, expected, rel: float) -> None:
    actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(np.max(np.abs(e)), 1e-30)
        assert np.max(np.abs(a - e)) <= rel * scale, (np.max(np.abs(a - e)), scale)


def rng_data(tree):
    """The leaves of ``tree`` as numpy arrays (PRNG keys as their key data)."""
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


# An "optimizer" whose state is the last gradient (and which changes nothing): the step's gradients, exactly.
KEEP_GRADIENT = optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                             lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def gradient_step(model):
    """One training step on `packed_batch`: ``(gradients, RNG state afterwards, loss)``, per layer
    (converted from the stacked form when the model is stacked)."""
    graphdef, trainable, rest = split_trainable(model)
    tx = KEEP_GRADIENT
    _, rest, gradients, metrics = make_train_step(graphdef, tx)(trainable, rest, tx.init(trainable), packed_batch())
    rng = nnx.split_state(rest, nnx.RngState, ...)[0]
    stacking = LayerStacking.of(model)
    if stacking is not None:
        gradients, rng = stacking.per_layer(gradients), stacking.per_layer(rng)
    return gradients, rng, float(metrics["loss"])


# Float32 throughout; scan and loop run the same operations, but XLA may fuse them differently: a few
# float32 roundings apart (relative to the largest element of each array).
REL = 1e-5


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "remat"])
@pytest.mark.parametrize("kind", ["lora", "qlora", "dora"])
def test_scanned_training_step_matches_the_loop(kind, gradient_checkpointing):
    loop, scan = (make_model(kind, gradient_checkpointing=gradient_checkpointing) for _ in range(2))
    assert stack_layers(scan) is None
    assert isinstance(scan.base_model.model.layers, StackedLayers)
    loop.train()
    scan.train()
    expected_grads, expected_rng, expected_loss = gradient_step(loop)
    grads, rng, loss = gradient_step(scan)
    assert loss == pytest.approx(expected_loss, rel=REL)
    assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
    leaves_close(grads, expected_grads, REL)
    # Dropout: each layer's stream (nnx.Dropout forks one per module) is stacked like the weights and
    # advanced by the body, so the same RNG state gives the same masks and the same state afterwards.
    assert all(np.array_equal(a, b) for a, b in zip(rng_data(rng), rng_data(expected_rng), strict=True))


@pytest.mark.parametrize("kind", ["lora", "qlora", "dora"])
def test_scanned_logits_match_the_loop_with_padding_packing_and_dropout(kind):
    loop, scan = make_model(kind), make_model(kind)
    stack_layers(scan)
    batch = {k: v[0] for k, v in packed_batch().items() if k != "labels"}
    args = (batch["input_ids"], batch["attention_mask"])
    kwargs = dict(position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    for mode in ("eval", "train", "train"):  # train twice: the dropout streams advance alike
        getattr(loop, mode)()
        getattr(scan, mode)()
        leaves_close(scan(*args, **kwargs), loop(*args, **kwargs), REL)
    loop.eval()
    scan.eval()
    leaves_close(scan(args[0], args[1]), loop(args[0], args[1]), REL)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
@pytest.mark.parametrize("decode_loop", ["while_loop", "python"])
def test_generation_on_a_stacked_model_matches_the_loop(kind, decode_loop):
    loop, scan = make_model(kind), make_model(kind)
    stack_layers(scan)
    prompts, config = [[5, 6, 7], [9, 10, 11, 12, 13]], GenerationConfig(max_new_tokens=6)
    expected = Generator(loop, bucket=8, decode_loop=decode_loop)(prompts, config)
    assert Generator(scan, bucket=8, decode_loop=decode_loop)(prompts, config) == expected


@pytest.mark.parametrize("implementation", ["blockwise", "dense"])
def test_a_stacked_cache_is_filled_as_the_per_layer_one(implementation):
    """Prefill then two decoding steps (left-padded rows): the scanned body writes each layer's keys and values
    into the stacked cache where the loop writes them into its per-layer arrays, and gives the same logits;
    a stacked model also still takes a per-layer cache (each layer's slice, in a loop)."""
    loop, scan = make_model(), make_model()
    stack_layers(scan)
    for model in (loop, scan):
        model.eval()
        model.base_model.attention_implementation = implementation
    ids = jnp.asarray([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
    mask = ids > 0
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)

    def run(model, stacked_cache):
        cache = KVCache.create(CONFIG, 2, 8, stacked=stacked_cache)
        out = []
        logits, cache = model(ids, mask, position_ids=positions, cache=cache)
        out.append(logits)
        for token in ([[3], [4]], [[8], [2]]):
            positions_now = jnp.max(positions, axis=1, keepdims=True) + len(out)
            logits, cache = model(jnp.asarray(token), jnp.ones((2, 1), bool), position_ids=positions_now, cache=cache)
            out.append(logits)
        return out, cache

    expected, per_layer = run(loop, False)
    for stacked_cache in (True, False):
        got, cache = run(scan, stacked_cache)
        assert cache.is_stacked == stacked_cache
        leaves_close(got, expected, REL)
        assert int(cache.length) == int(per_layer.length) == 7
        np.testing.assert_array_equal(cache.mask, per_layer.mask)
        leaves_close((cache.stacked_keys, cache.stacked_values), (per_layer.stacked_keys, per_layer.stacked_values),
                     REL)
    with pytest.raises(TypeError, match="stacked=False"):
        loop(ids, mask, position_ids=positions, cache=KVCache.create(CONFIG, 2, 8, stacked=True))


def test_stack_and_unstack_are_exact_and_keep_the_per_layer_modules():
    model = make_model("qlora")
    modules = {name: id(layer) for name, layer in model.lora_layers().items()}
    structure, before = jax.tree.structure(nnx.state(model)), rng_data(nnx.state(model))
    stack_layers(model)
    stack = model.base_model.model.layers
    q_proj = getattr(stack, STACKED_KEY).self_attn.q_proj
    assert q_proj.lora_A["default"].shape == (3, 4, 64)
    quantized = q_proj.base.quantized  # one QuantizedTensor per projection, the layer axis on its leaves
    assert quantized.shape == (64, 64) and quantized.packed.shape == (3, 64 * 64 // 2)
    with pytest.raises(StackedLayersError, match="unstack_layers"):
        get_submodule(model.base_model, "model.layers.1.self_attn.q_proj")
    unstack_layers(model)
    assert isinstance(model.base_model.model.layers, nnx.List)
    assert {name: id(layer) for name, layer in model.lora_layers().items()} == modules
    assert jax.tree.structure(nnx.state(model)) == structure
    assert all(np.array_equal(a, b) for a, b in zip(rng_data(nnx.state(model)), before, strict=True))


def test_per_layer_apis_after_a_scanned_step(tmp_path):
    from torch_bridge import load_peft_adapter, save_peft_adapter

    model = make_model(lora_dropout=0.0)
    ids = packed_batch()["input_ids"][0]
    with stacked(model) as reason:
        assert reason is None
        graphdef, trainable, rest = split_trainable(model)
        tx = optax.adamw(1e-2)
        trainable, rest, _, _ = make_train_step(graphdef, tx)(trainable, rest, tx.init(trainable), packed_batch())
        nnx.update(model, trainable)
        save_peft_adapter(per_layer_view(model), tmp_path / "from_stacked")
        assert isinstance(model.base_model.model.layers, StackedLayers)  # the view left the model as it was
    assert sorted(model.lora_layers()) == sorted(f"model.layers.{i}.{p}" for i in range(3) for p in PROJECTIONS)
    save_peft_adapter(model, tmp_path / "per_layer")
    written = [(tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("from_stacked", "per_layer")]
    assert written[0] == written[1]
    model.eval()
    expected = model(ids)
    fresh = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    loaded = load_peft_adapter(fresh, tmp_path / "per_layer")
    loaded.eval()
    leaves_close(loaded(ids), expected, 1e-6)
    layer = get_submodule(model.base_model, "model.layers.2.mlp.down_proj")
    assert isinstance(layer, LoraLinear)
    layer.merge()
    leaves_close(model(ids), expected, 1e-5)
    layer.unmerge()
    assert np.array_equal(model(ids), expected)


def test_checkpoints_of_a_stacked_run_are_per_layer(tmp_path):
    loop, scan = make_model(), make_model()
    stack_layers(scan)
    tx = optax.adamw(1e-2)

    def state_of(model):
        _, trainable, rest = split_trainable(model)
        return {"trainable": trainable, "opt_state": tx.init(trainable), "rng": nnx.split_state(rest, nnx.RngState, ...)[0]}

    stacking = LayerStacking.of(scan)
    state, expected = state_of(scan), state_of(loop)
    per_layer = stacking.per_layer(state)
    assert jax.tree.structure(per_layer) == jax.tree.structure(expected)
    assert all(np.array_equal(a, b) for a, b in zip(rng_data(per_layer), rng_data(expected), strict=True))
    checkpointer = TrainCheckpointer(tmp_path / "checkpoints")
    checkpointer.save(1, per_layer, {"step": 1})
    restored, _ = checkpointer.restore(1, expected)  # a per-layer run restores what a stacked run saved
    assert all(np.array_equal(a, b) for a, b in zip(rng_data(restored), rng_data(expected), strict=True))
    back = stacking.stacked(restored)  # and a stacked run too
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert all(np.array_equal(a, b) for a, b in zip(rng_data(back), rng_data(state), strict=True))
    checkpointer.close()


@pytest.mark.parametrize("lora, reason", [
    (dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
     "layer 1 differs from layer 0: mlp.down_proj is LoraLinear vs Linear"),
    (dict(rank_pattern={"layers.1.self_attn.q_proj": 2}), "layer 1 differs from layer 0: self_attn.q_proj.r is"),
    (dict(alpha_pattern={"layers.2.mlp.up_proj": 3}), "layer 2 differs from layer 0: mlp.up_proj.lora_alpha is"),
])
def test_layers_that_differ_keep_the_loop_and_say_why_once(lora, reason):
    model = make_model(**lora)
    with pytest.warns(ScanFallbackWarning, match="Python loop, not one scanned body") as record:
        got = stack_layers(model)
    assert got.startswith(reason) and str(record[0].message).endswith(got)
    assert isinstance(model.base_model.model.layers, nnx.List)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with stacked(model) as again:  # the same reason is not warned twice
            assert again == got
    model.eval()
    model(packed_batch()["input_ids"][0])  # and the loop runs


def test_different_adapter_sets_keep_the_loop():
    model = make_model()
    model.add_adapter("other", jaxlora.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]))
    reason = stack_layers(model, warn=False)
    assert reason.startswith("layer 1 differs from layer 0: self_attn.q_proj.")
    model.delete_adapter("other")
    assert stack_layers(model) is None


def frozen_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam))))


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "remat"])
@pytest.mark.parametrize("kind, compute_dtype", [("lora", jnp.float32), ("qlora", jnp.float32), ("lora", jnp.bfloat16)],
                         ids=["lora", "qlora", "lora-bf16"])
def test_the_scanned_step_keeps_no_copy_of_the_frozen_weights(kind, compute_dtype, gradient_checkpointing):
    """Temporary memory of the compiled step, loop against scan, with weights much larger than the
    activations (hidden 256, 8 tokens): the scan may add one layer's weights (the slice its body
    reads), not a copy of all of them (which stacked residuals such as ``W.T`` or W cast to bfloat16
    were, at first)."""
    config = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    batch = {k: v[:, :1, :8] for k, v in packed_batch().items()}
    temps = {}
    for form in ("loop", "scan"):
        model = make_model(kind, config=config, gradient_checkpointing=gradient_checkpointing, lora_dropout=0.0,
                           compute_dtype=compute_dtype)
        if form == "scan":
            stack_layers(model)
        graphdef, trainable, rest = split_trainable(model)
        tx = optax.sgd(1.0)
        compiled = make_train_step(graphdef, tx).lower(trainable, rest, tx.init(trainable), batch).compile()
        temps[form] = compiled.memory_analysis().temp_size_in_bytes
    one_layer = frozen_bytes(make_model(kind, config=config)) / config.num_hidden_layers
    assert temps["scan"] <= temps["loop"] + 1.25 * one_layer, (temps, one_layer)
