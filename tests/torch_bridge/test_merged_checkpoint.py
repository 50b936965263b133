"""The streamed merged export against the path it replaces (load the whole base in float32, load the
adapter, merge_and_unload, save_llama) and against PEFT's merge_and_unload in transformers.

Adapters are made by PEFT itself on tiny random Llamas, with nonzero B (and DoRA magnitudes and a
modules_to_save copy that differ from the base), so every merged tensor differs from the base's.
"""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxlora.nn import Linear4bit

from tests.models.test_llama import hf_model
from tests.torch_bridge.test_checkpoint_writer import LiveArrays

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from torch_bridge import AdapterFileError, CheckpointError, load_llama, load_peft_adapter, save_llama  # noqa: E402
from torch_bridge import merged_checkpoint  # noqa: E402
from torch_bridge.merged_checkpoint import write_merged_checkpoint  # noqa: E402

ADAPTERS = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora-patterns": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"layers.0.self_attn.v_proj": 2}, alpha_pattern={"^model.layers.0.self_attn.q_proj": 3}),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "o_proj", "up_proj"]),
    "modules-to-save": dict(r=2, lora_alpha=4, target_modules=["gate_proj"], modules_to_save=["lm_head"]),
}
IDS = np.random.default_rng(0).integers(0, 97, size=(2, 8))


def peft_model_of(hf, config: dict):
    torch.manual_seed(1)
    model = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:  # not the base's own values
                param.mul_(1.0 + 0.5 * torch.rand_like(param))
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Base checkpoints of the same random model: float32 (sharded), bfloat16, and bitsandbytes NF4."""
    root = tmp_path_factory.mktemp("bases")
    hf = hf_model("gqa-untied")
    hf.save_pretrained(root / "float32", max_shard_size="20KB")
    hf.to(torch.bfloat16).save_pretrained(root / "bfloat16")
    qconfig = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.bfloat16)
    transformers.AutoModelForCausalLM.from_pretrained(root / "bfloat16", quantization_config=qconfig).save_pretrained(root / "nf4")
    return root


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, config in ADAPTERS.items():
        peft_model_of(hf_model("gqa-untied"), config).save_pretrained(root / name)
    return root


def read_all(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(safetensors_numpy.load_file(str(f)))
    return out


def load_merge_save(base, adapter, out, **save_options):
    """The export this module replaces: the whole base in float32, merged in memory, then written."""
    merged = load_peft_adapter(load_llama(base, dtype="float32"), adapter).merge_and_unload()
    return save_llama(merged, out, **save_options)


def assert_same_tensors(ours: dict, expected: dict, cast=None):
    """Equal bytes, after casting the expected parameters (not 4-bit statistics) to ``cast``."""
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        if cast is not None and value.dtype.kind == "f" and key.endswith(".weight"):
            value = value.astype(cast)
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert ours[key].tobytes() == value.tobytes(), f"{key} differs"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_float32_streamed_merge_equals_loading_merging_and_saving(tmp_path, bases, adapters, adapter):
    # The merge is LoraLinear.merged_weight on the same float32 inputs: the same bits.
    ours = write_merged_checkpoint(bases / "float32", adapters / adapter, tmp_path / "ours", max_shard_size="20KB")
    expected = load_merge_save(bases / "float32", adapters / adapter, tmp_path / "expected", max_shard_size="20KB")
    assert_same_tensors(read_all(ours), read_all(expected))
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in expected.iterdir())
    for name in ("config.json", "model.safetensors.index.json"):
        assert (ours / name).read_bytes() == (expected / name).read_bytes(), name


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_merged_export_loads_in_transformers_like_peft_merge_and_unload(tmp_path, bases, adapters, adapter):
    ours = write_merged_checkpoint(bases / "float32", adapters / adapter, tmp_path / "ours")
    exported = transformers.AutoModelForCausalLM.from_pretrained(ours).eval()
    reference = peft_model_of(hf_model("gqa-untied"), ADAPTERS[adapter]).merge_and_unload()
    with torch.no_grad():
        got, expected = (m(torch.tensor(IDS)).logits.numpy() for m in (exported, reference))
    # Both sides merge in float32 with different summation orders (a few ulps per weight); through
    # two layers that stays below 1e-5 of the logits' scale (the bound used across test_peft.py).
    err = np.abs(got - expected).max()
    assert err <= 1e-5 * np.abs(expected).max() and err <= 1e-4, err


@pytest.mark.parametrize("adapter", ["all-linear", "dora", "modules-to-save"])
def test_a_bfloat16_checkpoint_exports_bfloat16(tmp_path, bases, adapters, adapter):
    # Default: the checkpoint's own dtype. The merge is still float32 (the bfloat16 weights are exact in
    # float32), so the result is the float32 path's output rounded once to bfloat16.
    ours = write_merged_checkpoint(bases / "bfloat16", adapters / adapter, tmp_path / "ours")
    expected = read_all(load_merge_save(bases / "bfloat16", adapters / adapter, tmp_path / "expected"))
    assert_same_tensors(read_all(ours), expected, cast=ml_dtypes.bfloat16)
    assert json.loads((ours / "config.json").read_text())["dtype"] == "bfloat16"
    # Asked for float32: exactly the float32 path.
    as_float32 = write_merged_checkpoint(bases / "bfloat16", adapters / adapter, tmp_path / "f32", dtype="float32")
    assert_same_tensors(read_all(as_float32), expected)


@pytest.mark.parametrize("adapter", ["all-linear", "dora", "modules-to-save"])
def test_a_bitsandbytes_4bit_base_is_dequantized_tensor_by_tensor(tmp_path, bases, adapters, adapter):
    # The old path merged the dequantized float32 weight and stored bfloat16 (the 4-bit dtype) for merged
    # projections, the original bfloat16 for untouched 4-bit ones, and float32 for everything it had
    # loaded in float32 (embeddings, norms): the streamed export writes all in bfloat16, the same values.
    ours = read_all(write_merged_checkpoint(bases / "nf4", adapters / adapter, tmp_path / "ours"))
    expected = read_all(load_merge_save(bases / "nf4", adapters / adapter, tmp_path / "expected"))
    assert {a.dtype for a in ours.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert_same_tensors(ours, expected, cast=ml_dtypes.bfloat16)


@pytest.mark.parametrize("base", ["float32", "nf4"])
def test_bnb_4bit_export_equals_the_old_path(tmp_path, bases, adapters, base):
    # float32 base: the float32 merge quantized, as before. NF4 base: adapted projections merged to
    # bfloat16 and quantized, untouched ones copied byte for byte, as before.
    options = dict(quantization="bnb-nf4", double_quant=True)
    ours = write_merged_checkpoint(bases / base, adapters / "rslora-patterns", tmp_path / "ours", **options)
    expected = load_merge_save(bases / base, adapters / "rslora-patterns", tmp_path / "expected", **options)
    stored = read_all(bases / base)
    written = read_all(ours)
    cast = ml_dtypes.bfloat16 if base == "nf4" else None
    packed = [k for k in written if re.fullmatch(r".*_proj\.weight", k)]
    assert len(packed) == 14 and all(written[k].dtype == np.uint8 for k in packed)
    assert_same_tensors(written, read_all(expected), cast=cast)
    if base == "nf4":
        untouched = "model.layers.1.mlp.up_proj.weight"
        assert written[untouched + ".absmax"].tobytes() == stored[untouched + ".absmax"].tobytes()
        assert written[untouched].tobytes() == stored[untouched].tobytes()
    config = json.loads((ours / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_a_bfloat16_bnb_export_quantizes_the_bfloat16_merge(tmp_path, bases, adapters):
    # What bitsandbytes does to a bfloat16 checkpoint: quantize its bfloat16 weights. Here, the merged
    # export's own tensors, so loading the merged export with quantize="nf4" gives the same 4-bit state.
    quantized = write_merged_checkpoint(bases / "bfloat16", adapters / "dora", tmp_path / "nf4", quantization="bnb-nf4")
    merged = write_merged_checkpoint(bases / "bfloat16", adapters / "dora", tmp_path / "merged")
    mine, theirs = (
        {".".join(map(str, p)): m.quantized for p, m in nnx.iter_graph(model) if isinstance(m, Linear4bit)}
        for model in (load_llama(quantized, dtype="bfloat16"), load_llama(merged, dtype="bfloat16", quantize="nf4"))
    )
    assert sorted(mine) == sorted(theirs) and len(mine) == 14
    for name, q in mine.items():
        r = theirs[name]
        assert q.dtype == r.dtype == np.dtype(ml_dtypes.bfloat16)
        for a, b in zip((q.packed, q.absmax, q.nested_absmax, q.offset), (r.packed, r.absmax, r.nested_absmax, r.offset), strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name


@pytest.mark.parametrize("quantization", [None, "bnb-nf4"])
def test_the_export_holds_one_shard_at_a_time(tmp_path, bases, adapters, monkeypatch, quantization):
    limit = 25_000  # above the largest tensor (the 97 x 64 float32 embedding, 24832 bytes)
    live = LiveArrays()
    original = merged_checkpoint._Merge.groups
    monkeypatch.setattr(merged_checkpoint._Merge, "groups", lambda self, settings: map(live.wrap, original(self, settings)))
    out = write_merged_checkpoint(bases / "float32", adapters / "all-linear", tmp_path / "out", quantization=quantization,
                                  max_shard_size=limit)
    sizes = {k: a.nbytes for k, a in read_all(out).items()}
    # A 4-bit weight's statistics (absmax, tables, JSON) are made with its packed codes: the allowance.
    statistics = max((sum(n for k, n in sizes.items() if k.startswith(w + ".")) for w in sizes), default=0)
    bound = limit + statistics
    assert sum(sizes.values()) > 3 * bound  # holding everything would fail
    assert 0 < live.peak <= bound, (live.peak, bound)


def test_errors_name_the_key_and_leave_nothing_behind(tmp_path, bases, adapters):
    from safetensors.numpy import load_file, save_file

    def variant(name, tensors):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "adapter_config.json").write_text((adapters / "all-linear" / "adapter_config.json").read_text())
        save_file(tensors(load_file(str(adapters / "all-linear" / "adapter_model.safetensors"))),
                  str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        return directory

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = [
        (variant("extra", lambda t: {**t, key.replace("q_proj", "extra_proj"): t[key]}), AdapterFileError, r"match no module.*extra_proj"),
        (variant("missing", lambda t: {k: v for k, v in t.items() if "layers.1.mlp" not in k}), AdapterFileError,
         r"no weights for targeted modules.*layers\.1\.mlp"),
        (variant("shape", lambda t: {**t, key: np.zeros((4, 32), np.float32)}), AdapterFileError,
         r"layers\.0\.self_attn\.q_proj\.lora_A\.weight.*\(4, 32\).*\(4, 64\)"),
    ]
    for adapter_dir, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            write_merged_checkpoint(bases / "float32", adapter_dir, tmp_path / "out")
    # A base that does not fit: a tensor of another shape, found when it is reached.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((bases / "bfloat16" / "config.json").read_text())
    state = read_all(bases / "bfloat16")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :32]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight' has shape \(96, 32\).*\(96, 64\)"):
        write_merged_checkpoint(broken, adapters / "all-linear", tmp_path / "out")
    # A tensor no parameter takes: refused before anything is written.
    state = read_all(bases / "bfloat16")
    state["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"match no parameter.*extra"):
        write_merged_checkpoint(broken, adapters / "all-linear", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "extra", "missing", "shape"]


def test_lora_bias_merges_into_the_base_bias(tmp_path):
    """lora_bias: b' = b + s b_B, as PEFT's merge; a base without that bias cannot take it (PEFT refuses too)."""
    hf_model("bias").save_pretrained(tmp_path / "base")
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"], lora_bias=True)
    theirs = peft_model_of(hf_model("bias"), config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                param.copy_(torch.randn_like(param))  # nonzero, so that the merged biases differ from the base's
    theirs.save_pretrained(tmp_path / "adapter")
    ours = write_merged_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "ours")
    expected = load_merge_save(tmp_path / "base", tmp_path / "adapter", tmp_path / "expected")
    assert_same_tensors(read_all(ours), read_all(expected))
    base = read_all(tmp_path / "base")
    assert not np.array_equal(read_all(ours)["model.layers.0.self_attn.q_proj.bias"], base["model.layers.0.self_attn.q_proj.bias"])
    exported = transformers.AutoModelForCausalLM.from_pretrained(ours).eval()
    reference = theirs.merge_and_unload()
    ids = torch.tensor(IDS % 64)
    with torch.no_grad():
        got, want = exported(ids).logits.numpy(), reference(ids).logits.numpy()
    err = np.abs(got - want).max()  # the same float32 summation-order bound as above
    assert err <= 1e-5 * np.abs(want).max() and err <= 1e-4, err

    hf_model("gqa-untied").save_pretrained(tmp_path / "base-untied")
    peft_model_of(hf_model("gqa-untied"), config).save_pretrained(tmp_path / "no-base-bias")
    with pytest.raises(AdapterFileError, match=r"lora_B\.bias' \(lora_bias\) cannot be merged.*has no bias"):
        write_merged_checkpoint(tmp_path / "base-untied", tmp_path / "no-base-bias", tmp_path / "out")
