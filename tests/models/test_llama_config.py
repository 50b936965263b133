"""`LlamaConfig.from_file`: a config.json read into a LlamaConfig, and errors that name the file."""

from __future__ import annotations

import json

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
