"""Test configuration: loud dtype/rank promotion, float32 matmuls at full precision."""

import jax
import pytest

# Silent rank promotion hides shape bugs; make it an error everywhere in the tests.
jax.config.update("jax_numpy_rank_promotion", "raise")
# CPU matmuls are exact float32 anyway; this keeps GPU runs of the same tests comparable.
jax.config.update("jax_default_matmul_precision", "highest")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


CUDA = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def torch_device(request):
    """Run a bitsandbytes/torch check on the CPU, and again on CUDA when a GPU is present."""
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (HF directory) with SmolLM2's vocabulary, tokenizer and chat template."""
    import shutil

    import torch
    import transformers

    from torch_bridge.smollm2 import ensure_smollm2

    smol = ensure_smollm2()
    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # N(0, 0.02) embeddings cap the (tied) logits below ~1 after the final RMSNorm:
        model.model.embed_tokens.weight.mul_(25.0)  # scale them so that a few steps can move the loss
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (smol / name).exists():
            shutil.copy(smol / name, out / name)
    return out
