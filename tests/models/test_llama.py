"""The Llama model against transformers' LlamaForCausalLM on tiny random configs (fp32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models import LlamaConfig
from tests.helpers import assert_rel_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch_bridge.checkpoint import build_llama  # noqa: E402

CONFIGS = {
    "gqa-untied": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "mha-tied": dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
                     num_key_value_heads=3, tie_word_embeddings=True),
    "llama3-rope-odd": dict(vocab_size=101, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
                            num_key_value_heads=1, head_dim=12, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Every in_features a multiple of 64: bitsandbytes' CPU 4-bit kernels are only right for such rows.
    "gqa-64": dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False),
    "bias": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, attention_bias=True, mlp_bias=True),
}


def hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**CONFIGS[name])
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def jax_from_hf(model, **kwargs):
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = LlamaConfig.from_hf_dict(model.config.to_dict())
    return build_llama(config, state.__getitem__, state.__contains__, **kwargs)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, padding):
    hf = hf_model(name)
    ours = jax_from_hf(hf)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hf.config.vocab_size, size=(2, 11))
    mask = np.ones((2, 11), np.int64)
    if padding == "right":
        mask[1, 8:] = 0
    else:
        mask[1, :3] = 0
    with torch.no_grad():
        expected = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    logits = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    # Both sides are float32 with their own summation orders. Rounding errors of random sign grow like
    # sqrt(K) u per K-term product (K <= 128 here: ~7e-7 of the magnitudes) and add up over the <= 3
    # layers' products: ~2e-6 of the logits' scale; 1e-5 (measured: 2-4e-7) leaves room for the
    # |a||b| / |a b| ratios of the products, and a wrong RoPE, mask, bias or norm is off by O(1e-2..1).
    # (The comparison is relative to the largest logit: an absolute bound would depend on their scale.)
    assert_rel_close(logits[real], expected[real], 1e-5, "logits")


def test_kv_cache_decoding_equals_full_forward():
    hf = hf_model("gqa-untied")
    ours = jax_from_hf(hf)
    from jaxlora.models import KVCache

    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, size=(2, 9)))
    full = ours(ids)
    cache = KVCache.create(ours.config, batch=2, max_len=16)
    logits, cache = ours(ids[:, :5], cache=cache)
    steps = [logits]
    for t in range(5, 9):
        logits, cache = ours(ids[:, t : t + 1], cache=cache)
        steps.append(logits)
    incremental = jnp.concatenate(steps, axis=1)
    assert int(cache.length) == 9
    # The same products over the same keys, in other shapes (one query at a time against a longer,
    # masked cache): summation order and masked zeros only, as for the comparison with transformers.
    assert_rel_close(incremental, full, 1e-5, "cached decoding")


def test_gradient_checkpointing_gives_the_same_gradients():
    """Every gradient leaf with remat equals the one without, after the two trees are checked to have the
    same structure (no leaf can be skipped), and the recomputation path is shown to be taken.

    Remat evaluates the same primitives on the same values again; what may differ is only the order in
    which the backward pass adds the contributions to a value used in several places (the residual
    stream): one float32 rounding (u = 6e-8) of those contributions, carried linearly through at most
    two layers' backward pass to the weights. 1e-5 of each leaf's largest gradient leaves ~170 u of
    room; a layer whose gradient is missing, stale or taken from other activations is off by O(1).
    (Here, run eagerly, the two are bit for bit equal.)
    """
    import jax
    from flax import nnx

    hf = hf_model("gqa-untied")
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 97, size=(2, 7)))

    def loss(model):
        return jnp.mean(model(ids) ** 2)

    plain = nnx.grad(loss)(jax_from_hf(hf))
    remat = jax_from_hf(hf)
    remat.gradient_checkpointing = True
    # Each layer goes through jaxlora.models.recompute's custom VJP (the model has no other one in float32).
    custom_vjp = jax.custom_vjp(lambda x: x)
    custom_vjp.defvjp(lambda x: (x, None), lambda _, g: (g,))
    custom_vjp_name = jax.make_jaxpr(custom_vjp)(1.0).eqns[0].primitive.name
    graphdef, state = nnx.split(remat)
    eqns = jax.make_jaxpr(lambda state: loss(nnx.merge(graphdef, state)))(state).eqns
    assert sum(eqn.primitive.name == custom_vjp_name for eqn in eqns) == hf.config.num_hidden_layers
    checkpointed = nnx.grad(loss)(remat)
    assert jax.tree.structure(checkpointed) == jax.tree.structure(plain)
    leaves = jax.tree.leaves(plain)
    assert len(leaves) == 9 * hf.config.num_hidden_layers + 3  # 7 projections + 2 norms per layer; embed, norm, lm_head
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(checkpointed), strict=True):
        assert_rel_close(b, a, 1e-5, jax.tree_util.keystr(path))


def test_packed_segments_do_not_attend_across_examples():
    hf = hf_model("gqa-untied")
    ours = jax_from_hf(hf)
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 97, size=5), rng.integers(0, 97, size=4)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None, :])
    segment_ids = jnp.asarray([[1] * 5 + [2] * 4 + [0, 0]])
    position_ids = jnp.asarray([list(range(5)) + list(range(4)) + [0, 0]])
    mask = jnp.asarray([[1] * 9 + [0, 0]])
    logits = np.asarray(ours(packed, mask, position_ids=position_ids, segment_ids=segment_ids))
    alone_a = np.asarray(ours(jnp.asarray(a[None, :])))
    alone_b = np.asarray(ours(jnp.asarray(b[None, :])))
    assert_rel_close(logits[0, :5], alone_a[0], 1e-5, "first packed example")
    assert_rel_close(logits[0, 5:9], alone_b[0], 1e-5, "second packed example")


def test_blockwise_and_dense_attention_give_the_same_logits():
    """The two attention kernels in the whole model, on the tokens that are real: padded rows (right and
    left), packed rows, and decoding over a KV cache. Both are float32 with their own summation orders
    (blockwise: per key block, rescaled; dense: whole rows): rounding only, as against transformers
    above (1e-5 of the logits' scale). Padding queries differ by design (the blockwise kernel gives a
    row that sees no key 0, the dense one the mean of the values) and never reach a real token."""
    from jaxlora.models import KVCache

    hf = hf_model("gqa-untied")
    blockwise, dense = jax_from_hf(hf), jax_from_hf(hf)
    assert blockwise.attention_implementation == "blockwise"
    dense.attention_implementation = "dense"
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(0, 97, size=(3, 11)))
    mask = np.ones((3, 11), np.int32)
    mask[1, 8:], mask[2, :3] = 0, 0
    real = mask.astype(bool)
    assert_rel_close(np.asarray(blockwise(ids, jnp.asarray(mask)))[real], np.asarray(dense(ids, jnp.asarray(mask)))[real],
                     1e-5, "padded rows")
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0, 0]] * 3)
    positions = jnp.asarray([list(range(5)) + list(range(4)) + [0, 0]] * 3)
    packed = [np.asarray(model(ids, segments > 0, position_ids=positions, segment_ids=segments))[:, :9]
              for model in (blockwise, dense)]
    assert_rel_close(packed[0], packed[1], 1e-5, "packed rows")
    decoded = []
    for model in (blockwise, dense):
        cache = KVCache.create(model.config, batch=3, max_len=16)
        logits, cache = model(ids[:, :6], jnp.asarray(mask[:, :6]), cache=cache)
        steps = [logits]
        for t in range(6, 8):
            logits, cache = model(ids[:, t : t + 1], cache=cache)
            steps.append(logits)
        decoded.append(np.asarray(jnp.concatenate(steps, axis=1))[real[:, :8]])
    assert_rel_close(decoded[0], decoded[1], 1e-5, "decoding over a cache")


def test_unknown_attention_implementation_is_an_error():
    from flax import nnx

    from jaxlora.models import LlamaForCausalLM

    with pytest.raises(ValueError, match="'flash'.*blockwise"):
        LlamaForCausalLM(LlamaConfig(**CONFIGS["bias"]), attention_implementation="flash", rngs=nnx.Rngs(0))
