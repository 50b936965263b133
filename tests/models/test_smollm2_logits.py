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


# Both sides run 30 layers in float32 with their own summation orders. Rounding errors of random sign grow
# like sqrt(K) u per K-term product (K <= 1536, the MLP's down projection: 2.3e-6 of the magnitudes) and
# add up over the 30 layers' residual stream: at most ~30 x 2.3e-6 = 7e-5 of the logits' scale; bound 1e-4
# of the largest logit (measured: 6e-6). A wrong RoPE theta, norm epsilon or tied head is off by O(1e-2..1).
RELATIVE = 1e-4


def test_logits_and_greedy_tokens_match_transformers(checkpoint):
    path, tokenizer, reference = checkpoint
    model = load_llama(path)
    ids = tokenizer(PROMPT, return_tensors="np")["input_ids"]
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    logits = np.asarray(model(jnp.asarray(ids)))
    scale = np.abs(expected).max()
    err = np.abs(logits - expected).max()
    assert err <= RELATIVE * scale, f"max abs logit difference {err} ({err / scale:.1e} of the largest logit)"

    # Greedy continuation, 6 tokens, both sides.
    with torch.no_grad():
        theirs = reference.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    tokens = jnp.asarray(ids)
    ours = []
    for _ in range(6):
        next_token = int(jnp.argmax(model(tokens)[0, -1]))
        ours.append(next_token)
        tokens = jnp.concatenate([tokens, jnp.asarray([[next_token]])], axis=1)
    assert "Paris" in tokenizer.decode(ours)
    # The same tokens, unless transformers' choice was a near tie that the two sides' rounding can flip:
    # along transformers' continuation, each token it chose is within twice the bound of our best logit,
    # and where its lead over the runner-up exceeds that, ours is the same token.
    continuation = np.concatenate([ids[0], theirs])[None, :]
    with torch.no_grad():
        their_logits = reference(torch.tensor(continuation)).logits.numpy()[0, ids.shape[1] - 1: -1]
    our_logits = np.asarray(model(jnp.asarray(continuation)))[0, ids.shape[1] - 1: -1]
    tolerance = 2 * RELATIVE * np.abs(their_logits).max()
    for step, token in enumerate(theirs):
        assert our_logits[step, token] >= our_logits[step].max() - tolerance, (step, tokenizer.decode([token]))
        lead = np.sort(their_logits[step])[-1] - np.sort(their_logits[step])[-2]
        if lead > tolerance and ours[: step] == theirs[: step]:
            assert ours[step] == token, (step, tokenizer.decode(ours), tokenizer.decode(theirs))
