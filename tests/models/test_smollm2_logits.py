"""The real model: SmolLM2-135M-Instruct in jaxlora against transformers, on a real prompt (runs in CI)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch_bridge import load_llama  # noqa: E402
from torch_bridge.smollm2 import ensure_smollm2, hub_offline  # noqa: E402

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def checkpoint():
    path = ensure_smollm2()
    with hub_offline():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, tokenizer, reference


def test_logits_and_greedy_tokens_match_transformers(checkpoint):
    path, tokenizer, reference = checkpoint
    model = load_llama(path)
    ids = tokenizer(PROMPT, return_tensors="np")["input_ids"]
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    logits = np.asarray(model(jnp.asarray(ids)))
    err = np.abs(logits - expected).max()
    # 30 layers in fp32 with different summation orders, logits up to ~27: measured 1.7e-4 absolute,
    # 6e-6 relative to the largest logit.
    assert err <= 5e-4, f"max abs logit difference {err}"
    assert err / np.abs(expected).max() <= 1e-5

    # Greedy continuation, 6 tokens, both sides.
    with torch.no_grad():
        theirs = reference.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    tokens = jnp.asarray(ids)
    ours = []
    for _ in range(6):
        next_token = int(jnp.argmax(model(tokens)[0, -1]))
        ours.append(next_token)
        tokens = jnp.concatenate([tokens, jnp.asarray([[next_token]])], axis=1)
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert "Paris" in tokenizer.decode(ours)
