"""Training configs from TOML/YAML: the dataclass tree, overrides, strict keys and types."""

from __future__ import annotations

import re

import pytest

from jaxlora.train.config import TrainConfig, TrainConfigError, load_config, read_config_tree

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
    ("[optim]\nlr_scheduler_type = 'cosine_annealing'\n", "lr_scheduler_type"),
    ("[optim]\nlr_scheduler_type = 'constant'\nwarmup_steps = 5\n", r"c.toml: \[optim\] .*warmup_steps = 5.*'constant_with_warmup'"),
    ("[optim]\nlr_scheduler_type = 'cosine'\nlr_scheduler_kwargs = {power = 2}\n", r"\['power'\] are not arguments"),
    ("[optim]\nlr_scheduler_kwargs = 3\n", r"optim\.lr_scheduler_kwargs"),
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


def test_scheduler_kwargs_from_toml_yaml_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text("[optim]\nlr_scheduler_type = 'cosine_with_restarts'\nlr_scheduler_kwargs = { num_cycles = 3 }\n")
    assert load_config(tmp_path / "c.toml").optim.lr_scheduler_kwargs == {"num_cycles": 3}
    config = load_config(tmp_path / "c.toml", ["optim.lr_scheduler_kwargs={num_cycles = 2}"])
    assert config.optim.lr_scheduler_kwargs == {"num_cycles": 2}
    (tmp_path / "c.yaml").write_text("optim: {lr_scheduler_type: polynomial, lr_scheduler_kwargs: {power: 2.0, lr_end: 1.0e-6}}\n")
    assert load_config(tmp_path / "c.yaml").optim.lr_scheduler_kwargs == {"power": 2.0, "lr_end": 1e-6}


@pytest.mark.parametrize("name, text, where, problem", [
    ("c.toml", "[model]\npath = \n", "2:8", "Invalid value"),  # the column where the value should start
    ("c.toml", "[run]\nseed = 1\n[run]\n", "3:5", "Cannot declare"),  # tomllib points after the name
    ("c.toml", "[optim]\nlearning_rate = [1,", "2:20", "Invalid value"),  # at the end of the document
    ("c.yaml", "model: {path: smollm2\nrun: {}\n", "2:4", "expected ',' or '}'"),
    ("c.yml", "run:\n  seed: 1\n   batch_size: 2\n", "3:14", "mapping values are not allowed here"),
    ("c.yaml", "run:\n  seed: 1\n  seed: 2\n", "3:3", r"duplicate key 'seed' \(first at 2:3\)"),
])
def test_syntax_errors_name_file_line_and_column(tmp_path, name, text, where, problem):
    (tmp_path / name).write_text(text)
    with pytest.raises(TrainConfigError, match=rf"^{re.escape(str(tmp_path / name))}:{where}: not valid (TOML|YAML): .*{problem}"):
        load_config(tmp_path / name)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    (tmp_path / "c.yaml").write_text("base: &run {seed: 1, batch_size: 2}\nrun:\n  <<: *run\n  seed: 3\n")
    assert read_config_tree(tmp_path / "c.yaml")["run"] == {"seed": 3, "batch_size": 2}


def test_non_utf8_file(tmp_path):
    (tmp_path / "c.toml").write_bytes(b"[model]\npath = '\xff'\n")
    with pytest.raises(TrainConfigError, match=r"c.toml: not UTF-8 text \(byte 16"):
        load_config(tmp_path / "c.toml")


@pytest.mark.parametrize("name, parser", [("c.toml", "tomllib.loads"), ("c.yaml", "yaml.load")])
def test_other_errors_are_not_relabelled(tmp_path, monkeypatch, name, parser):
    """A failure that is not the file's (a bug, a missing module) propagates as it is, not as a syntax error."""
    import tomllib

    import yaml

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the parser")

    module, attribute = parser.split(".")
    monkeypatch.setattr({"tomllib": tomllib, "yaml": yaml}[module], attribute, broken)
    (tmp_path / name).write_text("[run]\nseed = 1\n" if name.endswith(".toml") else "run: {seed: 1}\n")
    with pytest.raises(RuntimeError, match="a bug in the parser"):
        load_config(tmp_path / name)
