"""The pre-flight report counts what the run trains: the same matching as injection, on the model the
trainer builds (jaxlora.cli.preflight against PeftModel.get_nb_trainable_parameters)."""

from __future__ import annotations

import pytest
from flax import nnx

from jaxlora.adapters import AdapterError, get_peft_model
from jaxlora.cli.preflight import preflight
from jaxlora.train.config import config_from_dict

pytest.importorskip("torch")
from tests.models.test_llama import hf_model  # noqa: E402
from torch_bridge import load_llama  # noqa: E402

LORA_CONFIGS = [
    ("tied", dict(r=4, target_modules=r"model\.layers\.1\..*_proj")),
    ("tied", dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0])),
    ("tied", dict(r=4, target_modules=["q_proj", "v_proj", "model.layers.0.mlp.up_proj"], layers_to_transform=1,
                  layers_pattern="layers")),
    ("tied", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 2},
                  alpha_pattern={"q_proj": 3})),
    ("tied", dict(r=4, target_modules="all-linear")),
    ("tied", dict(r=4, target_modules="all-linear", exclude_modules=["o_proj"], use_dora=True)),
    ("tied", dict(r=4, target_modules=["down_proj"], lora_bias=True, modules_to_save=["embed_tokens"])),
    ("tied", dict(r=4, target_modules=["o_proj"], modules_to_save=["lm_head"])),
    ("untied", dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "input_layernorm"])),
    ("untied", dict(r=2, target_modules="all-linear")),
]


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("untied")
    hf_model("gqa-untied").save_pretrained(out)
    return out


def train_config(model_dir, lora: dict, **run):
    return config_from_dict({"model": {"path": str(model_dir)}, "lora": lora, "data": {"train_file": "unused.jsonl"},
                             "optim": {"learning_rate": 2e-4}, "run": {"seed": 3, **run}})


@pytest.mark.parametrize("which,lora", LORA_CONFIGS, ids=["regex", "layers_to_transform", "layers_pattern-full-name",
                                                         "rank_pattern", "all-linear", "exclude-dora", "lora_bias-embed_tokens", "tied-lm_head",
                                                         "lm_head-norms", "untied-all-linear"])
def test_preflight_counts_what_the_trainer_builds(which, lora, tiny_model_dir, untied_model_dir):
    model_dir = tiny_model_dir if which == "tied" else untied_model_dir
    config = train_config(model_dir, lora)
    report = preflight(config, model_dir, available_bytes=2**40, platform="cpu")
    built = get_peft_model(load_llama(model_dir), config.lora, rngs=nnx.Rngs(params=3, dropout=4))
    assert (report.trainable, report.total) == built.get_nb_trainable_parameters()
    assert report.report().startswith(f"trainable params: {report.trainable:,d} || all params: {report.total:,d}")


def test_preflight_full_finetune_and_errors(tiny_model_dir):
    config = train_config(tiny_model_dir, {}, full_finetune=True)
    report = preflight(config, tiny_model_dir, available_bytes=2**40, platform="cpu")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert report.trainable == report.total == sum(p.numel() for p in hf.parameters())  # tied: counted once
    with pytest.raises(AdapterError, match="match no linear layer"):
        preflight(train_config(tiny_model_dir, {"target_modules": ["qq_proj"]}), tiny_model_dir, platform="cpu")
