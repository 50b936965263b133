"""jaxlora.peft (jaxlora.adapters): PEFT's target matching, patterns, config validation, modules_to_save,
parameter counts, errors (against PEFT's own functions and models wherever PEFT has them)."""

from __future__ import annotations

import contextlib
import io
import random
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.models import LlamaConfig
from jaxlora.models.llama import count_parameters
from jaxlora.nn import Linear4bit, LoraLinear
from jaxlora.adapters.matching import EXCLUDED, pattern_key, rank_and_alpha, target_module_matches
from jaxlora.peft import AdapterError, ModulesToSaveParam, ModulesToSaveWrapper, target_names
from tests.models.test_llama import hf_model, jax_from_hf

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

CASES = [
    dict(target_modules=None),
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "mlp.down_proj"]),
    dict(target_modules=r"model\.layers\.1\..*_proj"),
    dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1]),
    dict(target_modules="all-linear", exclude_modules=["o_proj", "up_proj"]),
    dict(target_modules=["v_proj"], rank_pattern={"layers.0.self_attn.v_proj": 2}, alpha_pattern={"v_proj": 5}),
    dict(target_modules=["q_proj", "model.layers.0.mlp.up_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["down_proj", "o_proj"], layers_to_transform=[0], layers_pattern=""),
    dict(target_modules="all-linear", exclude_modules=r".*layers\.0\..*"),
    dict(target_modules=["o_proj", "gate_proj"], modules_to_save=["mlp"], exclude_modules=["nothing"]),
]


def peft_targets(model):
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


def assert_counts_equal(ours, theirs):
    """get_nb_trainable_parameters and the printed line, jaxlora against PEFT."""
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    out, expected = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out):
        ours.print_trainable_parameters()
    with contextlib.redirect_stdout(expected):
        theirs.print_trainable_parameters()
    assert out.getvalue() == expected.getvalue()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}" for k in c))
def test_targets_ranks_and_counts_match_peft(case):
    theirs = peft.get_peft_model(hf_model("gqa-untied"), peft.LoraConfig(r=4, lora_alpha=8, **case))
    ours = jaxlora.get_peft_model(jax_from_hf(hf_model("gqa-untied")), jaxlora.LoraConfig(r=4, lora_alpha=8, **case))
    assert sorted(ours.lora_layers()) == peft_targets(theirs)
    for name, layer in ours.lora_layers().items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert layer.r["default"] == peft_layer.r["default"], name
        assert layer.scaling["default"] == pytest.approx(peft_layer.scaling["default"]), name
    assert_counts_equal(ours, theirs)


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


# -- matching against PEFT's own functions, on generated module paths ----------------------------------
PREFIXES = ["", "model.", "model.decoder.", "transformer.", "base.model."]
CONTAINERS = ["layers", "h", "blocks", "layer", "encoder.layers", "layers_x"]
MIDDLES = ["self_attn", "mlp", "attn", "block.sub", "experts.3", "experts.11.w", "h.2", ""]
NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "proj", "q", "lm_head"]
REGEXES = [r".*\.(q|v)_proj", r"model\.layers\.\d\.mlp\..*", ".*proj", r".*layers\.1[0-9]?\..*", "lm_head", r"(?!.*mlp).*_proj"]
RANK_PATTERNS = ["q_proj", "layers.0.self_attn.q_proj", "^model.layers.1.*", r"layers\.(1|2)\..*v_proj", "mlp.*", "proj",
                 r"h\.\d+\.attn\.c_attn", "model.layers.3"]


def random_path(rng: random.Random, targets=None) -> str:
    """A module path; half the time ending in one of ``targets`` (a list) so that the layer rules are reached."""
    kind = rng.random()
    if kind < 0.1:
        return rng.choice(["lm_head", "model.embed_tokens", "model.norm", "q_proj", "layers.3.q_proj"])
    if kind < 0.15:
        return f"{rng.choice(PREFIXES)}{rng.choice(CONTAINERS)}.{rng.randrange(13)}"
    middle = rng.choice(MIDDLES)
    parts = [rng.choice(PREFIXES) + rng.choice(CONTAINERS), str(rng.randrange(13))] + ([middle] if middle else [])
    name = rng.choice(targets) if isinstance(targets, list) and rng.random() < 0.5 else rng.choice(NAMES)
    return ".".join(parts + [name])


def random_config(rng: random.Random) -> dict:
    config = {}
    if rng.random() < 0.3:
        config["target_modules"] = rng.choice(REGEXES)
    else:
        pool = NAMES + ["self_attn.q_proj", "mlp.up_proj", "model.layers.1.self_attn.q_proj", "layers.0.mlp.down_proj"]
        config["target_modules"] = rng.sample(pool, rng.randint(1, 4))
        if rng.random() < 0.6:
            config["layers_to_transform"] = rng.choice([rng.randrange(13), rng.sample(range(13), rng.randint(0, 4))])
            config["layers_pattern"] = rng.choice([None, "", "layers", "h", ["h", "layers"], [], "layer", "encoder.layers",
                                                   ["blocks"], r"lay\w+"])
    exclude = rng.random()
    if exclude < 0.25:
        config["exclude_modules"] = rng.sample(NAMES + ["mlp.down_proj", "layers.2.self_attn.q_proj"], rng.randint(1, 2))
    elif exclude < 0.4:
        config["exclude_modules"] = rng.choice([r".*layers\.0\..*", ".*k_proj", r"model\..*"])
    if rng.random() < 0.2:
        config["modules_to_save"] = rng.sample(["lm_head", "mlp", "embed_tokens", "q"], rng.randint(1, 2))
    return config


def peft_category(result) -> str:
    return "excluded" if isinstance(result, _ExcludedModule) else str(bool(result))


def test_target_matching_equals_peft_on_generated_paths():
    """jaxlora's rules against PEFT's check_target_module_exists on 4000 random (config, path) pairs: lists
    and regexes, exclude lists and regexes, modules_to_save, layers_to_transform as int / list / [],
    layers_pattern as str / list / None / "" / [] / regex."""
    rng = random.Random(0)
    seen = {"True": 0, "False": 0, "excluded": 0}
    for _ in range(500):
        config = random_config(rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.LoraConfig(**config)
        ours = jaxlora.LoraConfig(**config)
        for _ in range(8):
            key = random_path(rng, config["target_modules"])
            expected = peft_category(check_target_module_exists(theirs, key))
            got = target_module_matches(ours, key)
            assert ("excluded" if got is EXCLUDED else str(bool(got))) == expected, (config, key)
            seen[expected] += 1
    assert min(seen.values()) >= 300, seen  # every outcome exercised


def test_rank_and_alpha_patterns_equal_peft():
    rng = random.Random(1)
    for _ in range(300):
        patterns = {p: rng.randint(1, 64) for p in rng.sample(RANK_PATTERNS, rng.randint(0, 4))}
        alphas = {p: rng.randint(1, 64) for p in rng.sample(RANK_PATTERNS, rng.randint(0, 3))}
        config = jaxlora.LoraConfig(r=8, lora_alpha=16, rank_pattern=patterns, alpha_pattern=alphas)
        key = random_path(rng)
        assert pattern_key(patterns, key) == get_pattern_key(patterns.keys(), key), (patterns, key)
        expected = (patterns.get(get_pattern_key(patterns.keys(), key), 8), alphas.get(get_pattern_key(alphas.keys(), key), 16))
        assert rank_and_alpha(config, key) == expected


@pytest.mark.parametrize("config", [
    dict(target_modules=".*q_proj", layers_to_transform=[0]),
    dict(target_modules=".*q_proj", layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_pattern=["h"]),
    dict(lora_bias=True, use_dora=True),
    dict(lora_bias=True, init_lora_weights="gaussian"),
], ids=["regex+layers_to_transform", "regex+layers_pattern", "pattern-without-indices", "pattern-list-without-indices",
        "lora_bias+dora", "lora_bias+gaussian"])
def test_config_validation_equals_peft(config):
    with pytest.raises(ValueError):
        peft.LoraConfig(**config)
    with pytest.raises(AdapterError):
        jaxlora.LoraConfig(**config)


def test_config_combinations_peft_accepts():
    for config in [dict(target_modules=["q_proj"], layers_pattern=""), dict(target_modules=["q_proj"], layers_to_transform=[]),
                   dict(target_modules=["q_proj"], layers_to_transform=2, layers_pattern=["h", "layers"]),
                   dict(lora_bias=True, init_lora_weights=False)]:
        peft.LoraConfig(**config)
        jaxlora.LoraConfig(**config)


def test_lora_config_has_every_peft_field_and_default():
    import dataclasses

    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    ours = {f.name: f for f in dataclasses.fields(jaxlora.LoraConfig)}
    assert set(theirs) - set(ours) == {"peft_type", "auto_mapping", "peft_version", "runtime_config"}
    assert set(ours) <= set(theirs)
    defaults = peft.LoraConfig()
    for name in ours:
        if name not in ("target_modules", "inference_mode"):
            assert getattr(jaxlora.LoraConfig(), name) == getattr(defaults, name), name
    from jaxlora.adapters.config import IMPLEMENTED, METADATA, UNSUPPORTED

    assert set(IMPLEMENTED) | set(METADATA) | set(UNSUPPORTED) == set(ours) | {"peft_type", "auto_mapping", "peft_version"}


# -- modules_to_save: PEFT's ModulesToSaveWrapper ----------------------------------------------------------
IDS = np.random.default_rng(0).integers(0, 97, size=(2, 7))


def peft_with_copies(name: str, config: dict):
    """A PEFT model whose modules_to_save copies differ from the originals (and random LoRA B)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf_model(name), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
                for p in module.modules_to_save["default"].parameters():
                    p.mul_(1.5).add_(0.01)
    return theirs


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


MODULES_TO_SAVE = [
    ("gqa-untied", dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("gqa-untied", dict(r=2, target_modules=["v_proj"], modules_to_save=["embed_tokens"])),
    ("gqa-untied", dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens", "input_layernorm"])),
    ("mha-tied", dict(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    ("mha-tied", dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("mha-tied", dict(r=2, target_modules=["v_proj"], modules_to_save=["embed_tokens", "lm_head"])),
]


@pytest.mark.parametrize("name,config", MODULES_TO_SAVE, ids=["lm_head", "embed_tokens", "three", "tied-embed_tokens",
                                                              "tied-lm_head", "tied-both"])
def test_modules_to_save_matches_peft(tmp_path, name, config):
    """Logits with the adapter and with disable_adapter(), parameter counts and the printed line, against
    PEFT; the original stays frozen and untouched; merge_and_unload keeps the copy."""
    from tests.torch_bridge.test_peft import compare_logits
    from torch_bridge import load_peft_adapter

    theirs = peft_with_copies(name, config)
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(jax_from_hf(hf_model(name)), tmp_path)
    compare_logits(ours(jnp.asarray(IDS)), torch_logits(theirs))
    with ours.disable_adapter(), theirs.disable_adapter():
        compare_logits(ours(jnp.asarray(IDS)), torch_logits(theirs))
        compare_logits(ours(jnp.asarray(IDS)), torch_logits(hf_model(name)))
    assert_counts_equal(ours, theirs)
    base = hf_model(name).state_dict()
    base.setdefault("lm_head.weight", base["model.embed_tokens.weight"])  # tied
    for path, wrapper in ours.modules_to_save().items():
        assert isinstance(wrapper, ModulesToSaveWrapper)
        for key, variable in nnx.to_flat_state(nnx.state(wrapper.original_module)):
            assert type(variable) is nnx.Param  # frozen
            np.testing.assert_array_equal(np.asarray(variable.get_value()), base[f"{path}.{'.'.join(map(str, key))}"].numpy())
        assert all(type(v) is ModulesToSaveParam for _, v in nnx.to_flat_state(nnx.state(wrapper.modules_to_save["default"])))
    merged = ours.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = theirs.merge_and_unload()
    compare_logits(merged(jnp.asarray(IDS)), torch_logits(reference))
    assert count_parameters(merged, nnx.LoRAParam) == 0


def test_modules_to_save_per_adapter_copies(tmp_path):
    """Two adapters with their own lm_head copy: set_adapter switches copies, saving A writes only A's copy,
    loading B leaves A's copy alone, delete_adapter removes B's copy; counts as PEFT's after each step."""
    from torch_bridge import load_peft_adapter, save_peft_adapter
    from safetensors.numpy import load_file

    config = dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    ours = jaxlora.get_peft_model(jax_from_hf(hf_model("gqa-untied")), jaxlora.LoraConfig(**config), "a")
    ours.add_adapter("b", jaxlora.LoraConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf_model("gqa-untied"), peft.LoraConfig(**config), "a")
        theirs.add_adapter("b", peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    wrapper = ours.base_model.lm_head
    original = np.asarray(wrapper.original_module.weight.get_value()).copy()
    wrapper.modules_to_save["a"].weight.set_value(jnp.asarray(original * 2))
    wrapper.modules_to_save["b"].weight.set_value(jnp.asarray(original * 3))
    hidden, _ = ours.base_model.hidden_states(jnp.asarray(IDS))
    assert wrapper.active_adapter == "a"
    np.testing.assert_allclose(np.asarray(wrapper(hidden)), np.asarray(hidden @ (original * 2).T), rtol=1e-5, atol=1e-6)
    ours.set_adapter("b")
    theirs.set_adapter("b")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert wrapper.active_adapter == "b" and type(wrapper.modules_to_save["a"].weight) is nnx.Param
    np.testing.assert_allclose(np.asarray(wrapper(hidden)), np.asarray(hidden @ (original * 3).T), rtol=1e-5, atol=1e-6)
    save_peft_adapter(ours, tmp_path / "a", adapter_name="a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(saved["base_model.model.lm_head.weight"], original * 2)
    assert not any("original_module" in k or "modules_to_save" in k for k in saved)
    # Loading a as a third adapter gives it its own copy; b's and a's are untouched.
    load_peft_adapter(ours, tmp_path / "a", adapter_name="c")
    np.testing.assert_array_equal(np.asarray(wrapper.modules_to_save["c"].weight.get_value()), original * 2)
    np.testing.assert_array_equal(np.asarray(wrapper.modules_to_save["b"].weight.get_value()), original * 3)
    assert wrapper.modules_to_save["c"].weight.get_value() is not wrapper.modules_to_save["a"].weight.get_value()
    ours.set_adapter("a")
    ours.delete_adapter("b")
    ours.delete_adapter("c")
    assert wrapper.adapter_names == ["a"]
    np.testing.assert_array_equal(np.asarray(wrapper.original_module.weight.get_value()), original)
    theirs.set_adapter("a")
    theirs.delete_adapter("b")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_only_the_active_adapter_trains():
    """The trainer's step (wrt=nnx.LoRAParam) with AdamW and weight decay: the active adapter's LoRA weights
    and modules_to_save copy change; the inactive adapter, its copy and the originals do not."""
    import optax

    from jaxlora.train.step import make_train_step, split_trainable

    config = dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"], init_lora_weights=False)
    model = jaxlora.get_peft_model(jax_from_hf(hf_model("gqa-untied")), jaxlora.LoraConfig(**config), "a")
    model.add_adapter("b", jaxlora.LoraConfig(**config))
    model.set_adapter("b")
    before = {k: np.asarray(v.get_value()).copy() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    graphdef, trainable, rest = split_trainable(model)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    step = make_train_step(graphdef, tx)
    ids = jnp.asarray(IDS)[None]
    trainable, rest, _, _ = step(trainable, rest, tx.init(trainable), {"input_ids": ids, "labels": ids})
    nnx.update(model, trainable, rest)
    changed = {".".join(map(str, k)) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if not np.array_equal(np.asarray(v.get_value()), before[k])}
    assert changed == {"base_model.lm_head.modules_to_save.b.weight", "base_model.model.embed_tokens.modules_to_save.b.weight",
                       "base_model.model.layers.0.self_attn.q_proj.lora_A.b", "base_model.model.layers.0.self_attn.q_proj.lora_B.b",
                       "base_model.model.layers.1.self_attn.q_proj.lora_A.b", "base_model.model.layers.1.self_attn.q_proj.lora_B.b"}


def test_modules_to_save_errors():
    def fresh(name="gqa-untied"):
        return jax_from_hf(hf_model(name))

    for entry in ("embed_tokens", "lm_head"):
        with pytest.raises(AdapterError, match="ensure_weight_tying"):
            jaxlora.get_peft_model(fresh("mha-tied"), jaxlora.LoraConfig(modules_to_save=[entry], ensure_weight_tying=True))
    with pytest.raises(AdapterError, match="'nothing' matches no module"):
        jaxlora.get_peft_model(fresh(), jaxlora.LoraConfig(modules_to_save=["nothing"]))
    with pytest.raises(AdapterError, match="carries LoRA|target_modules also"):
        jaxlora.get_peft_model(fresh(), jaxlora.LoraConfig(target_modules=["up_proj"], modules_to_save=["p_proj"]))
    with pytest.raises(AdapterError, match="inside it"):
        jaxlora.get_peft_model(fresh(), jaxlora.LoraConfig(modules_to_save=["mlp", "down_proj"]))
    model = fresh()
    with pytest.raises(AdapterError, match="LlamaMLP.*linear layers only"):
        jaxlora.get_peft_model(model, jaxlora.LoraConfig(target_modules=["q_proj", "mlp"]))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # nothing changed


def test_tied_model_gets_its_tie_back():
    """A tied model whose modules_to_save copies are all deleted, or merged without a copy, is tied again."""
    model = jaxlora.get_peft_model(jax_from_hf(hf_model("mha-tied")), jaxlora.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    model.add_adapter("b", jaxlora.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head", "embed_tokens"]))
    llama = model.base_model
    assert isinstance(llama.lm_head, ModulesToSaveWrapper)
    assert llama.lm_head.original_module.weight is llama.model.embed_tokens.original_module.weight  # one variable
    model.delete_adapter("b")
    assert llama.lm_head is None and type(llama.model.embed_tokens).__name__ == "Embedding"
    model.add_adapter("c", jaxlora.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]))
    merged = model.merge_and_unload()  # "a" is active: no copy is kept
    assert merged.lm_head is None and merged.config.tie_word_embeddings
