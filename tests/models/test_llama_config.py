"""`LlamaConfig.from_file` / `to_hf_dict`: config.json read and written (both RoPE forms), errors that name the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxlora.models.llama_config import ConfigError, LlamaConfig


def test_from_file_reads_config_json(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    assert LlamaConfig.from_file(tmp_path / "config.json") == config


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"hidden_size": 8}', "model_type is None"),
    ('{"model_type": "llama", "rope_parameters": {"rope_type": "llama3"}}', "lack 'factor'"),
])
def test_from_file_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        LlamaConfig.from_file(path)
    assert str(path) in str(info.value)


def test_from_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read") as info:
        LlamaConfig.from_file(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(info.value)


def legacy_rope(config: dict) -> tuple[float, dict | None]:
    """RoPE as a reader that knows only the pre-transformers-5 keys sees it (transformers 4, mlx-lm):
    top-level rope_theta (default 10000) and rope_scaling."""
    return float(config.get("rope_theta", 10000.0)), config.get("rope_scaling")


def legacy_inv_freq(config: dict) -> np.ndarray:
    """Inverse RoPE frequencies from the legacy keys alone, in float64 (llama3 scaling: Meta's formula)."""
    theta, scaling = legacy_rope(config)
    dim = config["head_dim"]
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if scaling is None:
        return inv_freq
    assert scaling["rope_type"] == "llama3"
    original = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelen > original / low, inv_freq / factor, np.where(wavelen < original / high, inv_freq, blended))


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16384)
LLAMA3 = dict(rope_theta=500000.0, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
              rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192)


def smollm2_config() -> LlamaConfig:
    from torch_bridge.smollm2 import ensure_smollm2

    return LlamaConfig.from_file(ensure_smollm2() / "config.json")


@pytest.mark.parametrize("make, theta", [
    (smollm2_config, 1e5),
    (lambda: LlamaConfig(**SMALL, **LLAMA3), 5e5),
    (lambda: LlamaConfig(**SMALL), 1e4),
], ids=["smollm2", "llama3-scaled", "default"])
def test_config_json_carries_both_rope_forms_and_they_agree(tmp_path, make, theta):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = make()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_hf_dict()))
    written = json.loads(path.read_text())

    legacy_theta, legacy_scaling = legacy_rope(written)
    assert legacy_theta == theta == written["rope_parameters"]["rope_theta"]
    if config.rope_type == "llama3":
        assert legacy_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
        assert written["rope_parameters"] == {**legacy_scaling, "rope_theta": theta}
    else:
        assert legacy_scaling is None and written["rope_parameters"] == {"rope_type": "default", "rope_theta": theta}
    assert LlamaConfig.from_file(path) == config  # jaxlora reads it back (from rope_parameters)
    del written["rope_parameters"]  # ... and from the legacy keys alone
    assert LlamaConfig.from_hf_dict(written) == config

    # transformers 5 loads the file and builds the frequencies the legacy keys describe.
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters["rope_theta"] == theta and loaded.rope_parameters["rope_type"] == config.rope_type
    small = transformers.AutoConfig.from_pretrained(tmp_path, num_hidden_layers=1, vocab_size=64, hidden_size=32,
                                                    intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                                                    head_dim=config.head_dim)
    ours = legacy_inv_freq(json.loads(path.read_text()))
    theirs = transformers.LlamaForCausalLM(small).model.rotary_emb.inv_freq.double().numpy()
    # torch computes theta ** (2i/d) in float32: a few ulp of relative error.
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=0)
