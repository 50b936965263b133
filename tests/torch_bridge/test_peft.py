"""Adapters both ways between jaxlora and PEFT, on tiny random Llamas (fp32), and 4-bit / merged checks."""

from __future__ import annotations

import json
import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from tests.models.test_llama import hf_model, jax_from_hf

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from torch_bridge import AdapterFileError, load_llama, load_peft_adapter, save_llama, save_peft_adapter  # noqa: E402


def compare_logits(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    # Summation order only (two float32 stacks): ~sqrt(K) 2^-24 per layer of the logits' scale, as in
    # tests/models/test_llama.py; a bound relative to that scale, not an absolute one.
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= 1e-5, f"relative {rel:.2e}"


IDS = np.random.default_rng(0).integers(0, 64, size=(2, 8))  # below every test model's vocabulary


def peft_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def perturb_copies(peft_model):
    """Make every modules_to_save copy differ from its original (jaxlora side)."""
    from flax import nnx

    for wrapper in peft_model.modules_to_save().values():
        for _, variable in nnx.to_flat_state(nnx.state(wrapper.modules_to_save[peft_model.active_adapter])):
            variable.set_value(variable.get_value() * 1.5 + 0.01)


def perturb_peft_copies(theirs):
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
                for p in module.modules_to_save["default"].parameters():
                    p.mul_(1.5).add_(0.01)


def randomize_lora_bias(theirs):
    """PEFT zeroes lora_B's bias unless init_lora_weights=False; give it values that show in the logits."""
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("lora_B.default.bias"):
                p.copy_(torch.randn_like(p) * 0.1)


EXPECTED_PEFT_WARNINGS = re.compile(r".*(tie_word_embeddings=True. and a tied layer|lora_bias=True. was passed but the targeted layer).*",
                                    re.DOTALL)
"""PEFT's warnings about its own semantics (tied modules_to_save, lora_bias without a base bias), not about the files."""


def load_in_peft(adapter_dir, base):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter_dir)
    peft_warnings = [str(w.message) for w in caught if ("peft" in (w.filename or "") or "adapter" in str(w.message).lower())
                     and not EXPECTED_PEFT_WARNINGS.match(str(w.message))]
    assert peft_warnings == [], peft_warnings
    return model.eval()


TO_PEFT = [
    ("gqa-untied", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("gqa-untied", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gqa-untied", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "o_proj", "up_proj"])),
    ("gqa-untied", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.0.self_attn.v_proj": 2},
                        alpha_pattern={"^model.layers.0.self_attn.q_proj": 3}, layers_to_transform=[0])),
    ("gqa-untied", dict(r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj")),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules=["gate_proj"], modules_to_save=["lm_head"])),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules=["o_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    ("mha-tied", dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    ("mha-tied", dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("bias", dict(r=2, lora_alpha=4, target_modules="all-linear", lora_bias=True)),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], lora_bias=True)),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["o_proj", "layers.1.mlp.up_proj"])),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=r".*layers\.0\..*")),
]
TO_PEFT_IDS = ["all-linear", "rslora", "dora", "patterns", "regex", "modules_to_save", "modules_to_save-two",
               "modules_to_save-tied", "modules_to_save-tied-lm_head", "lora_bias", "lora_bias-no-base-bias", "exclude-list",
               "exclude-regex"]


@pytest.mark.parametrize("name,config", TO_PEFT, ids=TO_PEFT_IDS)
def test_jaxlora_adapter_loads_in_peft(tmp_path, name, config):
    hf = hf_model(name)
    peft_model = jaxlora.get_peft_model(jax_from_hf(hf), jaxlora.LoraConfig(init_lora_weights=False, **config))
    perturb_copies(peft_model)  # the saved copies differ from the base
    save_peft_adapter(peft_model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(written) == set(json.loads(json.dumps(peft.LoraConfig().to_dict(), default=str))) | {"peft_version", "auto_mapping"} - {"runtime_config"}
    theirs = load_in_peft(tmp_path / "adapter", hf_model(name))
    compare_logits(peft_model(jnp.asarray(IDS)), peft_logits(theirs))


FROM_PEFT = [
    ("gqa-untied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("gqa-untied", dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear")),
    ("gqa-untied", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj", "down_proj"])),
    ("gqa-untied", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"layers.0.self_attn.v_proj": 2}, alpha_pattern={"^model.layers.0.self_attn.q_proj": 3})),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules=["o_proj"], modules_to_save=["lm_head"])),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules=["o_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    ("mha-tied", dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    ("bias", dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"], lora_bias=True)),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules="all-linear", lora_bias=True)),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["k_proj", "layers.0.mlp.gate_proj"])),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], exclude_modules=r"model\.layers\.1\..*")),
    ("gqa-untied", dict(r=2, lora_alpha=4, target_modules=["q_proj", "model.layers.0.mlp.up_proj"], layers_to_transform=1,
                        layers_pattern="layers")),
]
FROM_PEFT_IDS = ["plain", "rslora-all-linear", "dora", "patterns", "modules_to_save", "modules_to_save-two",
                 "modules_to_save-tied", "lora_bias", "lora_bias-no-base-bias", "exclude-list", "exclude-regex",
                 "layers_pattern-full-name"]


@pytest.mark.parametrize("name,config", FROM_PEFT, ids=FROM_PEFT_IDS)
def test_peft_adapter_loads_in_jaxlora(tmp_path, name, config):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(tie_word_embeddings|has no bias).*")
        theirs = peft.get_peft_model(hf_model(name), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    perturb_peft_copies(theirs)
    randomize_lora_bias(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_peft_adapter(jax_from_hf(hf_model(name)), tmp_path / "adapter")
    compare_logits(ours(jnp.asarray(IDS)), peft_logits(theirs))
    # And back: what jaxlora writes is what PEFT wrote, tensor for tensor.
    save_peft_adapter(ours, tmp_path / "again")
    from safetensors.numpy import load_file

    a, b = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")), load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("name,config", [
    ("gqa-untied", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("bias", dict(r=4, lora_alpha=8, target_modules="all-linear", lora_bias=True, modules_to_save=["lm_head"])),
    ("mha-tied", dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    ("mha-tied", dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
], ids=["all-linear", "lora_bias-modules_to_save", "tied-embed_tokens", "tied-lm_head"])
def test_merged_export_matches_peft_merge_and_unload(tmp_path, name, config):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        theirs = peft.get_peft_model(hf_model(name), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    perturb_peft_copies(theirs)
    randomize_lora_bias(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_peft_adapter(jax_from_hf(hf_model(name)), tmp_path / "adapter")
    merged = ours.merge_and_unload()
    save_llama(merged, tmp_path / "merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = theirs.merge_and_unload()
    compare_logits(peft_logits(exported), peft_logits(reference))
    compare_logits(merged(jnp.asarray(IDS)), peft_logits(reference))


def test_named_adapters_set_disable_delete(tmp_path):
    hf = hf_model("gqa-untied")
    base_logits = np.asarray(jax_from_hf(hf)(jnp.asarray(IDS)))
    model = jaxlora.get_peft_model(jax_from_hf(hf), jaxlora.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]))
    model.add_adapter("second", jaxlora.LoraConfig(r=4, init_lora_weights=False, target_modules=["v_proj"]))
    first = np.asarray(model(jnp.asarray(IDS)))
    model.set_adapter("second")
    second = np.asarray(model(jnp.asarray(IDS)))
    assert not np.allclose(first, second)
    with model.disable_adapter():
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), base_logits, rtol=1e-6, atol=1e-6)
    save_peft_adapter(model, tmp_path / "second")
    assert json.loads((tmp_path / "second" / "adapter_config.json").read_text())["target_modules"] == ["v_proj"]
    model.set_adapter("default")
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), first, rtol=1e-6)
    reloaded = load_peft_adapter(model, tmp_path / "second", adapter_name="again")
    np.testing.assert_allclose(np.asarray(reloaded(jnp.asarray(IDS))), second, rtol=1e-6)


def test_qlora_adapter_on_the_same_4bit_weights_as_bitsandbytes(tmp_path, torch_device):
    """transformers + bitsandbytes (NF4, double quant, fp32 compute) + a PEFT adapter, against jaxlora
    loading the same pre-quantized checkpoint and adapter: identical 4-bit weights on both sides.
    (A config whose rows are whole blocks: bitsandbytes' CPU dequantizer is wrong otherwise.)"""
    hf = hf_model("gqa-64")
    hf.save_pretrained(tmp_path / "hf")
    qconfig = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.float32)
    q_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", quantization_config=qconfig, device_map=torch_device)
    q_hf.save_pretrained(tmp_path / "bnb")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(q_hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                       target_modules="all-linear")).train()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_peft_adapter(load_llama(tmp_path / "bnb"), tmp_path / "adapter")
    # train mode: bitsandbytes' CPU eval path repacks weights and needs in_features % blocksize == 0 (formats.md C.4)
    with torch.no_grad():
        expected = theirs(torch.tensor(IDS, device=torch_device)).logits.cpu().numpy()
    compare_logits(ours(jnp.asarray(IDS)), expected)


def test_adapter_errors(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(hf_model("gqa-untied"), peft.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "ok")
    from safetensors.numpy import load_file, save_file

    def variant(name, config=None, tensors=None, raw=None):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(raw if raw is not None else json.dumps({**cfg, **(config or {})}))
        t = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
        save_file(tensors(t) if tensors else t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        return d

    def fresh():
        return jax_from_hf(hf_model("gqa-untied"))

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(AdapterFileError, match=r"match no module.*extra_proj"):
        load_peft_adapter(fresh(), variant("extra", tensors=lambda t: {**t, key.replace("q_proj", "extra_proj"): t[key]}))
    with pytest.raises(AdapterFileError, match=r"no weights for targeted modules.*layers\.1\.self_attn\.q_proj"):
        load_peft_adapter(fresh(), variant("missing", tensors=lambda t: {k: v for k, v in t.items() if "layers.1" not in k}))
    with pytest.raises(AdapterFileError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight.*\(4, 32\).*\(4, 64\)"):
        load_peft_adapter(fresh(), variant("shape", tensors=lambda t: {**t, key: np.zeros((4, 32), np.float32)}))
    with pytest.raises(AdapterFileError, match="MistralForCausalLM"):
        load_peft_adapter(fresh(), variant("arch", config={"auto_mapping": {"base_model_class": "MistralForCausalLM", "parent_library": "x"}}))
    with pytest.raises(AdapterFileError, match=r"match no linear layer.*available"):
        load_peft_adapter(fresh(), variant("target", config={"target_modules": ["c_attn"]}))
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_peft_adapter(fresh(), variant("json", raw="{"))
    with pytest.raises(AdapterFileError, match="peft_type"):
        load_peft_adapter(fresh(), variant("type", config={"peft_type": "IA3"}))
    with pytest.raises(AdapterFileError, match="not found"):
        load_peft_adapter(fresh(), tmp_path / "nowhere")
    d = variant("truncated")
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        load_peft_adapter(fresh(), d)


UNSUPPORTED_VALUES = {
    "megatron_config": {"hidden_size": 64}, "trainable_token_indices": [1, 2], "loftq_config": {"loftq_bits": 4},
    "eva_config": {"rho": 2.0}, "corda_config": {"corda_method": "ipm"}, "lora_ga_config": {"direction": "ArB2r"},
    "velora_config": {"rank": 4}, "alora_invocation_tokens": [5, 6], "monteclora_config": {"num_samples": 2},
    "layer_replication": [[0, 2], [1, 2]], "target_parameters": ["mlp.experts.down_proj"], "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2}, "kasa_config": {"beta": 1.0}, "init_lora_weights": "pissa", "bias": "all",
    "fan_in_fan_out": True, "use_qalora": True, "some_future_option": {"on": True},
}


def test_options_that_change_the_numbers_are_refused(tmp_path):
    """Every option of PEFT's LoraConfig that jaxlora does not implement (and an unknown one) is an error
    naming it, never a plain-LoRA load; each PiSSA/OLoRA/LoftQ/EVA/CorDA-style init too."""
    from jaxlora.adapters.config import UNSUPPORTED

    assert set(UNSUPPORTED) <= set(UNSUPPORTED_VALUES)
    torch.manual_seed(0)
    peft.get_peft_model(hf_model("gqa-untied"), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    cases = [(k, v) for k, v in UNSUPPORTED_VALUES.items()]
    cases += [("init_lora_weights", v) for v in ("olora", "pissa_niter_4", "loftq", "eva", "corda", "orthogonal", "mica", "lora_ga")]
    for key, value in cases:
        (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(AdapterFileError, match=rf"adapter_config.json.*{key}"):
            load_peft_adapter(jax_from_hf(hf_model("gqa-untied")), tmp_path / "ok")
    # An unknown key at an empty default and the harmless metadata load.
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({**config, "some_future_option": None, "revision": "main",
                                                                       "megatron_core": "x", "qalora_group_size": 8}))
    load_peft_adapter(jax_from_hf(hf_model("gqa-untied")), tmp_path / "ok")
