"""Training configs from TOML/YAML: the dataclass tree, overrides, strict keys and types."""

from __future__ import annotations

import pytest

from jaxlora.train.config import TrainConfig, TrainConfigError, load_config

TOML = '''
[model]
path = "smollm2"
quantize = "nf4"

[lora]
r = 16
lora_alpha = 32
target_modules = "all-linear"

[data]
train_file = "train.jsonl"
max_seq_length = 256

[optim]
learning_rate = 2e-4
warmup_ratio = 0.03
lr_scheduler_type = "cosine"

[run]
output_dir = "runs/x"
max_steps = 100
'''

YAML = '''
model: {path: smollm2, quantize: nf4}
lora: {r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}
optim: {learning_rate: 0.0002, max_grad_norm: null}
run: {batch_size: 2, gradient_accumulation_steps: 8}
'''


def test_toml_and_yaml_build_the_tree(tmp_path):
    (tmp_path / "c.toml").write_text(TOML)
    config = load_config(tmp_path / "c.toml")
    assert isinstance(config, TrainConfig)
    assert config.model.quantize == "nf4" and config.lora.r == 16 and config.lora.target_modules == "all-linear"
    assert config.optim.warmup_ratio == 0.03 and config.run.max_steps == 100 and config.data.max_seq_length == 256
    assert config.run.batch_size == 4  # default
    (tmp_path / "c.yaml").write_text(YAML)
    config = load_config(tmp_path / "c.yaml")
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.optim.max_grad_norm is None
    assert config.run.gradient_accumulation_steps == 8


def test_overrides(tmp_path):
    (tmp_path / "c.toml").write_text(TOML)
    config = load_config(tmp_path / "c.toml", ["optim.learning_rate=1e-4", "lora.r=8", "model.quantize=fp4", "run.output_dir=runs/y"])
    assert config.optim.learning_rate == 1e-4 and config.lora.r == 8 and config.model.quantize == "fp4"
    assert config.run.output_dir == "runs/y"
    with pytest.raises(TrainConfigError, match="section.key=value"):
        load_config(tmp_path / "c.toml", ["learning_rate=1"])


@pytest.mark.parametrize("text,match", [
    ("[model]\npaht = 'x'\n", r"unknown key\(s\) model\.paht"),
    ("[modle]\npath = 'x'\n", r"unknown section"),
    ("[lora]\nr = 'sixteen'\n", r"lora\.r.*'sixteen'"),
    ("[optim]\nlr_scheduler_type = 'polynomial'\n", "lr_scheduler_type"),
    ("[run]\nmax_steps = 1.5\n", r"run\.max_steps"),
    ("[data]\noverlong = 'wrap'\n", "overlong"),
    ("[model]\npath = \n", "c.toml"),
])
def test_errors_name_the_file_and_key(tmp_path, text, match):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(TrainConfigError, match=match):
        load_config(tmp_path / "c.toml")


def test_unreadable_and_unknown_format(tmp_path):
    with pytest.raises(TrainConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(TrainConfigError, match=".toml, .yaml or .yml"):
        load_config(tmp_path / "c.json")


@pytest.mark.parametrize("split,keys", [
    ("eval_size = 4", r"data\.eval_size = 4"),
    ("eval_fraction = 0.1", r"data\.eval_fraction = 0\.1"),
    ("eval_fraction = 0.1\neval_size = 4", r"data\.eval_fraction = 0\.1 and data\.eval_size = 4"),
])
def test_eval_file_with_a_split_of_train_file_is_ambiguous(tmp_path, split, keys):
    """With eval_file the whole file is the eval set and train_file is not split: asking for a split too is an error."""
    (tmp_path / "c.toml").write_text(f"[data]\ntrain_file = 't.jsonl'\neval_file = 'e.jsonl'\n{split}\n")
    with pytest.raises(TrainConfigError, match=rf"c\.toml: \[data\] data\.eval_file = 'e\.jsonl' and {keys} are both set"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "ok.toml").write_text("[data]\ntrain_file = 't.jsonl'\neval_file = 'e.jsonl'\neval_fraction = 0.0\n")
    assert load_config(tmp_path / "ok.toml").data.eval_file == "e.jsonl"
    (tmp_path / "split.toml").write_text(f"[data]\ntrain_file = 't.jsonl'\n{split.splitlines()[0]}\n")
    assert load_config(tmp_path / "split.toml").data.eval_file is None
    with pytest.raises(TrainConfigError, match="data.eval_file = 'e.jsonl' and"):
        load_config(tmp_path / "split.toml", ["data.eval_file='e.jsonl'"])
