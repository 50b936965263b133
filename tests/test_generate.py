"""Generation with a KV cache against transformers' ``generate`` and logits processors (tiny random
Llama models in float32), against a full-forward argmax loop (LoRA and NF4 models), and on SmolLM2."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.models import KVCache, LlamaConfig, LlamaForCausalLM
from jaxlora.peft import LoraConfig, get_peft_model
from jaxlora.generate import (
    GenerationConfig,
    Generator,
    SamplingParams,
    Switches,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    generate,
    process_logits,
)
from tests.helpers import assert_rel_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.models.test_llama import hf_model, jax_from_hf

PAD = 0
PROMPTS = [[5, 17, 33, 2, 81, 40, 9, 12, 60], [71, 3, 44],
           [8, 90, 23, 11, 64, 1, 50, 27, 36, 19, 4, 88, 15, 72, 30, 6, 55]]


@pytest.fixture(scope="module")
def tiny():
    """(transformers model, jaxlora model, a Generator for it shared by the tests: one compilation per shape)."""
    hf = hf_model("gqa-untied")
    hf.generation_config.eos_token_id = None  # the tiny config's default EOS (2) must not stop transformers
    model = jax_from_hf(hf)
    return hf, model, Generator(model)


def hf_generate(hf, prompts, max_new_tokens, eos=None, **kwargs):
    """transformers' generate on a left-padded batch; per row the new tokens cut at the first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos,
                          **kwargs)
    rows = out[:, width:].tolist()
    return [row[: row.index(eos)] if eos is not None and eos in row else row for row in rows]


def argmax_loop(model, prompts, max_new_tokens, width=32):
    """Greedy decoding by a full forward over the whole sequence for every token (no cache), jitted
    at one padded width (padding after the tokens does not change a causal model's earlier logits)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    results = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(max_new_tokens):
            ids = np.zeros((1, width), np.int32)
            ids[0, : len(tokens)] = tokens
            tokens.append(int(jnp.argmax(forward(state, jnp.asarray(ids))[0, len(tokens) - 1])))
        results.append(tokens[len(prompt):])
    return results


def test_greedy_batch_matches_transformers(tiny):
    hf, _, gen = tiny
    expected = hf_generate(hf, PROMPTS, 12, do_sample=False)
    assert gen(PROMPTS, GenerationConfig(max_new_tokens=12)) == expected
    # A padded row computes what it computes alone.
    assert [gen([p], GenerationConfig(max_new_tokens=12))[0] for p in PROMPTS] == expected


def test_each_row_caches_its_prompt_as_if_alone(tiny):
    """Left padding: row i's prompt fills the slots P-len..P-1 with positions 0..len-1, so its cached keys
    (rotated by their positions) and values equal those of the prompt run alone without padding."""
    _, model, gen = tiny
    graphdef, state = nnx.split(model)
    ids, mask, lengths = gen.batch(PROMPTS, PAD)
    config = GenerationConfig(max_new_tokens=4)
    decoding = gen._compiled(graphdef, state).prefill(state, ids, mask, lengths, SamplingParams.from_config(config),
                                                      cache_len=64, out_len=32, switches=Switches.from_config(config))
    def run_alone(state, ids):
        return nnx.merge(graphdef, state)(ids, cache=KVCache.create(model.config, 1, ids.shape[1]))

    run_alone = jax.jit(run_alone)
    for i, prompt in enumerate(PROMPTS):
        _, alone = run_alone(state, jnp.asarray([prompt]))
        width, first = ids.shape[1], ids.shape[1] - len(prompt)
        assert int(decoding.cache.length) == width
        slots = np.arange(64)
        np.testing.assert_array_equal(np.asarray(decoding.cache.mask[i]), (slots >= first) & (slots < width))
        # stacked: [layers, batch, kv_heads, slots, head_dim]. The same float32 products in other shapes
        # (a padded batch against one row): errors of random sign, ~sqrt(K) u per K-term product (K <= 128:
        # ~7e-7), over the 2 layers that feed the last layer's keys: 1e-5 (measured: 2-3e-7); a position or
        # padding off by one is off by O(1).
        assert_rel_close(decoding.cache.stacked_keys[:, i, :, first:width], alone.stacked_keys[:, 0], 1e-5, f"row {i} keys")
        assert_rel_close(decoding.cache.stacked_values[:, i, :, first:width], alone.stacked_values[:, 0], 1e-5,
                         f"row {i} values")


def test_greedy_stops_at_eos_like_transformers(tiny):
    hf, _, gen = tiny
    free = gen(PROMPTS, GenerationConfig(max_new_tokens=12))
    eos = free[0][4]  # a token the first row emits mid-way, so stopping is exercised
    expected = hf_generate(hf, PROMPTS, 12, eos=eos, do_sample=False)
    got = gen(PROMPTS, GenerationConfig(max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD))
    assert got == expected
    assert len(got[0]) == free[0].index(eos) < 12 and eos not in got[0]
    for row, unstopped in zip(got, free, strict=True):
        assert row == unstopped[: len(row)]
    # Several EOS ids: the earliest of either ends the row.
    eos2 = free[1][2]
    got2 = gen(PROMPTS, GenerationConfig(max_new_tokens=12, eos_token_id=(eos, eos2)))
    for row, unstopped in zip(got2, free, strict=True):
        stop = min([unstopped.index(t) for t in (eos, eos2) if t in unstopped], default=12)
        assert row == unstopped[:stop]


def test_repetition_penalty_matches_transformers(tiny):
    hf, _, gen = tiny
    got = gen(PROMPTS, GenerationConfig(max_new_tokens=12, repetition_penalty=1.3))
    # transformers would also penalize its left padding tokens: compare with each prompt alone.
    expected = [hf_generate(hf, [p], 12, do_sample=False, repetition_penalty=1.3)[0] for p in PROMPTS]
    assert got == expected
    assert got != gen(PROMPTS, GenerationConfig(max_new_tokens=12))  # the penalty changes the output


def test_logits_processors_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 97)) * 3).astype(np.float32)
    logits[1, [10, 20, 30]] = 9.0  # ties at the top-k boundary stay
    input_ids = rng.integers(0, 97, size=(4, 15))
    seen = np.zeros((4, 97), bool)
    seen[np.arange(4)[:, None], input_ids] = True
    cases = [
        (RepetitionPenaltyLogitsProcessor(1.3), lambda x: apply_repetition_penalty(x, jnp.asarray(seen), 1.3)),
        (RepetitionPenaltyLogitsProcessor(0.7), lambda x: apply_repetition_penalty(x, jnp.asarray(seen), 0.7)),
        (TemperatureLogitsWarper(0.7), lambda x: apply_temperature(x, 0.7)),
        (TopKLogitsWarper(2), lambda x: apply_top_k(x, 2)),
        (TopKLogitsWarper(5), lambda x: apply_top_k(x, jnp.int32(5))),
        (TopKLogitsWarper(500), lambda x: apply_top_k(x, 500)),
        (TopPLogitsWarper(0.8), lambda x: apply_top_p(x, 0.8)),
        (TopPLogitsWarper(0.05), lambda x: apply_top_p(x, 0.05)),
    ]
    for processor, ours in cases:
        expected = processor(torch.tensor(input_ids), torch.tensor(logits)).numpy()
        got = np.asarray(ours(jnp.asarray(logits)))
        name = type(processor).__name__
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected), err_msg=f"{name}: filtered tokens differ")
        finite = np.isfinite(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6, atol=0, err_msg=name)
        assert np.isfinite(got).sum(axis=-1).min() >= 1, name
    # The chain, in transformers' order.
    chain = [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(20),
             TopPLogitsWarper(0.9)]
    expected = torch.tensor(logits)
    for processor in chain:
        expected = processor(torch.tensor(input_ids), expected)
    params = SamplingParams.from_config(GenerationConfig(do_sample=True, repetition_penalty=1.2, temperature=0.8,
                                                         top_k=20, top_p=0.9))
    got = np.asarray(process_logits(jnp.asarray(logits), jnp.asarray(seen), params, do_sample=True, use_top_k=True,
                                    use_top_p=True))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected.numpy()))
    assert 1 < np.isfinite(got).sum(axis=-1).max() < 20


def test_sampling_is_seeded_and_stays_in_the_filtered_set(tiny):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    hf, _, gen = tiny
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=8, top_p=0.85, seed=3)
    first = gen(PROMPTS, config)
    assert gen(PROMPTS, config) == first
    assert any(gen(PROMPTS, dataclasses.replace(config, seed=s)) != first for s in (4, 5))
    # top_k = 1 leaves the argmax only.
    greedy = gen(PROMPTS, GenerationConfig(max_new_tokens=10))
    assert gen(PROMPTS, dataclasses.replace(config, top_k=1, seed=7)) == greedy
    # Each sampled token survives transformers' warpers applied to transformers' logits at its step.
    warpers = [TemperatureLogitsWarper(0.9), TopKLogitsWarper(8), TopPLogitsWarper(0.85)]
    kept_sizes = []
    for prompt, sampled in zip(PROMPTS, first, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + sampled])).logits[0, len(prompt) - 1: -1]
        for step, token in enumerate(sampled):
            scores = logits[step: step + 1]
            for warper in warpers:
                scores = warper(None, scores)
            kept = torch.isfinite(scores[0])
            assert kept[token], f"step {step}: sampled {token} outside the kept set {kept.nonzero().ravel().tolist()}"
            kept_sizes.append(int(kept.sum()))
    assert max(kept_sizes) > 1  # the filters left a real choice somewhere


def test_compiles_once_and_sees_new_lora_weights(tiny):
    _, model, base_gen = tiny
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
    peft = get_peft_model(nnx.clone(model), lora_config)
    peft.eval()
    gen = Generator(peft, bucket=32)
    base = gen(PROMPTS, GenerationConfig(max_new_tokens=8))
    assert base == base_gen(PROMPTS, GenerationConfig(max_new_tokens=8))  # B = 0: the base model's output
    # Other prompt lengths inside the bucket (32) and max_new_tokens inside the output bucket: no new trace.
    for prompts, n in [([[1, 2, 3]] * 3, 8), ([list(range(3, 30)), [5], [6, 7]], 5), (PROMPTS, 30)]:
        gen(prompts, GenerationConfig(max_new_tokens=n, eos_token_id=7))
    assert gen.trace_counts == {"prefill": 1, "decode": 1}, gen.trace_counts
    gen(PROMPTS[:1], GenerationConfig(max_new_tokens=8))  # another batch size is another shape
    assert gen.trace_counts == {"prefill": 2, "decode": 2}, gen.trace_counts

    # New LoRA weights, as a training step would produce them.
    lora = nnx.state(peft, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(lora))))
    nnx.update(peft, jax.tree.map(lambda w: w + 0.5 * jax.random.normal(next(keys), w.shape, w.dtype), lora))
    peft.train()  # training mode (dropout active) must not change what generation computes or compiles
    updated = gen(PROMPTS, GenerationConfig(max_new_tokens=8))
    assert gen.trace_counts == {"prefill": 2, "decode": 2}, gen.trace_counts
    peft.eval()
    assert updated == argmax_loop(peft, PROMPTS, 8)
    assert updated != base
    # Another model of the same structure, passed per call: its weights, the same compiled functions.
    other = nnx.clone(peft)
    nnx.update(other, jax.tree.map(jnp.zeros_like, nnx.state(other, nnx.LoRAParam)))  # a no-op adapter again
    assert gen(PROMPTS, GenerationConfig(max_new_tokens=8), model=other) == base
    assert gen.trace_counts == {"prefill": 2, "decode": 2}, gen.trace_counts


def test_python_decode_loop_gives_the_same_tokens(tiny):
    _, model, gen = tiny
    config = GenerationConfig(max_new_tokens=12, eos_token_id=gen(PROMPTS, GenerationConfig(max_new_tokens=6))[2][3])
    python_loop = Generator(model, decode_loop="python")
    assert python_loop(PROMPTS, config) == gen(PROMPTS, config)
    assert python_loop.trace_counts == {"prefill": 1, "decode": 1}


@pytest.mark.parametrize("kind", ["nf4", "nf4+lora"])
def test_nf4_models_equal_full_forward_argmax(kind):
    hf = hf_model("gqa-64", seed=1)
    model = jax_from_hf(hf, quantize="nf4")
    if kind == "nf4+lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False), rngs=nnx.Rngs(params=2, dropout=3))
    assert generate(model, PROMPTS, GenerationConfig(max_new_tokens=8)) == argmax_loop(model, PROMPTS, 8)


def test_bad_input_raises(tiny):
    _, model, _ = tiny
    gen = Generator(model)
    with pytest.raises(ValueError, match="prompts is empty"):
        gen([], GenerationConfig())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen([[1, 2], []], GenerationConfig())
    with pytest.raises(ValueError, match=r"prompt 0 has token ids \[97\] outside \[0, 97\)"):
        gen([[1, 97]], GenerationConfig())
    with pytest.raises(ValueError, match=r"prompt length 2040 \+ max_new_tokens 10 = 2050 exceeds max_position_emb"):
        gen([[1] * 2040], GenerationConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="pad_token_id 200"):
        gen([[1]], GenerationConfig(pad_token_id=200))
    assert gen.trace_counts == {"prefill": 0, "decode": 0}
    for field, value in [("temperature", 0.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                         ("repetition_penalty", 0.0),
                         ("max_new_tokens", 0)]:
        with pytest.raises(ValueError, match=field):
            GenerationConfig(do_sample=True, **{field: value})
    GenerationConfig(temperature=0.0)  # greedy ignores the temperature
    other = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocab_size=50.*this Generator was built for"):
        gen([[1]], GenerationConfig(), model=other)
    with pytest.raises(TypeError, match="LlamaConfig"):
        Generator(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_smollm2_greedy_matches_transformers():
    from tokenizers import Tokenizer

    from torch_bridge import load_llama
    from torch_bridge.smollm2 import ensure_smollm2, hub_offline

    path = ensure_smollm2()
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode("The capital of France is").ids
    with hub_offline():
        reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    del reference
    assert generate(load_llama(path), [ids], GenerationConfig(max_new_tokens=6, eos_token_id=2)) == [expected]
