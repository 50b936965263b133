"""jaxlora.peft: PEFT's target matching, patterns, parameter counts, errors (against PEFT where it applies)."""

from __future__ import annotations

import contextlib
import io

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.models import LlamaConfig
from jaxlora.nn import Linear4bit, LoraLinear
from jaxlora.peft import AdapterError, target_names
from tests.models.test_llama import hf_model, jax_from_hf

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

CASES = [
    dict(target_modules=None),
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "mlp.down_proj"]),
    dict(target_modules=r"model\.layers\.1\..*_proj"),
    dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1]),
    dict(target_modules="all-linear", exclude_modules=["o_proj", "up_proj"]),
    dict(target_modules=["v_proj"], rank_pattern={"layers.0.self_attn.v_proj": 2}, alpha_pattern={"v_proj": 5}),
]


def peft_targets(model):
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}" for k in c))
def test_targets_ranks_and_counts_match_peft(case):
    theirs = peft.get_peft_model(hf_model("gqa-untied"), peft.LoraConfig(r=4, lora_alpha=8, **case))
    ours = jaxlora.get_peft_model(jax_from_hf(hf_model("gqa-untied")), jaxlora.LoraConfig(r=4, lora_alpha=8, **case))
    assert sorted(ours.lora_layers()) == peft_targets(theirs)
    for name, layer in ours.lora_layers().items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert layer.r["default"] == peft_layer.r["default"], name
        assert layer.scaling["default"] == pytest.approx(peft_layer.scaling["default"]), name
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    out, expected = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out):
        ours.print_trainable_parameters()
    with contextlib.redirect_stdout(expected):
        theirs.print_trainable_parameters()
    assert out.getvalue() == expected.getvalue()


def test_only_lora_parameters_train_and_base_is_frozen():
    model = jaxlora.get_peft_model(jax_from_hf(hf_model("gqa-untied")), jaxlora.LoraConfig(r=2, init_lora_weights=False))
    import optax

    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
    before = {k: np.asarray(v.get_value()).copy() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    ids = jnp.asarray(np.arange(12).reshape(2, 6))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(ids) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)

    step(model, optimizer)
    changed = {k for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if not np.array_equal(np.asarray(v.get_value()), before[k])}
    assert changed and all("lora_" in ".".join(map(str, k)) for k in changed)


def test_qlora_injection_wraps_4bit_layers(tmp_path):
    from torch_bridge import load_llama

    hf_model("gqa-64").save_pretrained(tmp_path / "hf")
    model = jaxlora.get_peft_model(load_llama(tmp_path / "hf", quantize="nf4"), jaxlora.LoraConfig(r=4, target_modules="all-linear"))
    layer = model.base_model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base, Linear4bit)
    trainable, total = model.get_nb_trainable_parameters()
    dense_total = sum(int(np.prod(p.shape)) for p in hf_model("gqa-64").parameters())
    assert total == dense_total + trainable


def test_errors():
    with pytest.raises(AdapterError, match=r"match no linear layer.*available.*q_proj"):
        jaxlora.get_peft_model(jax_from_hf(hf_model("gqa-untied")), jaxlora.LoraConfig(target_modules=["foo_proj"]))
    with pytest.raises(AdapterError, match="bias"):
        jaxlora.LoraConfig(bias="all")
    with pytest.raises(AdapterError, match="modules_to_save"):
        jaxlora.get_peft_model(jax_from_hf(hf_model("gqa-untied")), jaxlora.LoraConfig(modules_to_save=["nothing_here"]))
    with pytest.raises(AdapterError, match="layers_to_transform"):
        jaxlora.LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])
    model = jaxlora.get_peft_model(jax_from_hf(hf_model("gqa-untied")), jaxlora.LoraConfig())
    with pytest.raises(AdapterError, match="already exists"):
        model.add_adapter("default", jaxlora.LoraConfig())
    with pytest.raises(AdapterError, match="is active"):
        model.delete_adapter("default")
    assert target_names(model.base_model, jaxlora.LoraConfig()) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_legacy_rope_config_keys():
    legacy = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=96,
                  vocab_size=10, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    config = LlamaConfig.from_hf_dict(legacy)
    assert (config.rope_type, config.rope_theta, config.rope_factor) == ("llama3", 500000.0, 8.0)
    assert LlamaConfig.from_hf_dict(dict(model_type="llama")).rope_theta == 10000.0
    round_trip = LlamaConfig.from_hf_dict(config.to_hf_dict())
    assert round_trip == config
