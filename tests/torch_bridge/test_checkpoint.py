"""HF Llama checkpoints in and out: load_llama / save_llama against transformers (and bitsandbytes)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.models import ConfigError
from jaxlora.nn import Linear4bit
from jaxlora.quant import dequantize_4bit, quantize_4bit
from tests.helpers import assert_rel_close
from tests.models.test_llama import hf_model
from tests.torch_bridge.test_bnb_quantize import bnb_reference_dequantize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from torch_bridge import CheckpointError, load_llama, save_llama  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_all(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(safetensors_numpy.load_file(str(f)))
    return out


def logits_of(model, ids):
    return np.asarray(model(jnp.asarray(ids)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name,shard", [("gqa-untied", None), ("mha-tied", "20KB"), ("llama3-rope-odd", "30KB")])
def test_load_matches_transformers_and_round_trips_exactly(tmp_path, name, shard, dtype):
    hf = hf_model(name).to(TORCH_DTYPES[dtype])
    src = tmp_path / "hf"
    hf.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    assert (src / "model.safetensors.index.json").exists() == (shard is not None)
    model = load_llama(src, dtype=dtype)
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(2, 9))
    # The reference is the checkpoint as transformers loads it (``hf.to(bf16)`` would also round the
    # rotary inv_freq buffer, which from_pretrained recomputes in float32).
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=TORCH_DTYPES[dtype])
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.float().numpy()
    if dtype == "float32":  # summation order only: ~sqrt(K) 2^-24 per layer of the logits' scale (test_llama)
        assert_rel_close(logits_of(model, ids), expected, 1e-5, "float32 logits")
    else:  # both compute in 16 bits with different accumulation orders
        assert_rel_close(logits_of(model, ids), expected, 5e-2, f"{dtype} logits")

    out = save_llama(model, tmp_path / "out", max_shard_size=shard or "5GB")
    original, written = read_all(src), read_all(out)
    assert set(written) == set(original) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    for key, array in written.items():
        assert array.dtype == original[key].dtype and array.shape == original[key].shape, key
        assert array.tobytes() == original[key].tobytes(), f"{key} differs after the round trip"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=TORCH_DTYPES[dtype])
    with torch.no_grad():
        again = reloaded(torch.tensor(ids)).logits.float().numpy()
    np.testing.assert_array_equal(again, expected)


def test_dtype_conversion_on_load_and_save(tmp_path):
    hf = hf_model("gqa-untied")
    hf.save_pretrained(tmp_path / "hf")
    model = load_llama(tmp_path / "hf", dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.weight.get_value().dtype == jnp.bfloat16
    out = save_llama(model, tmp_path / "out", dtype="float16")
    written = read_all(out)
    assert {a.dtype for a in written.values()} == {np.dtype(np.float16)}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_while_loading(tmp_path, quant_type):
    hf = hf_model("gqa-untied")
    hf.save_pretrained(tmp_path / "hf")
    model = load_llama(tmp_path / "hf", quantize=quant_type, double_quant=True)
    state = read_all(tmp_path / "hf")
    q_proj = model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit)
    expected = quantize_4bit(jnp.asarray(state["model.layers.1.self_attn.q_proj.weight"]), quant_type=quant_type, double_quant=True)
    np.testing.assert_array_equal(np.asarray(q_proj.quantized.packed), np.asarray(expected.packed))
    np.testing.assert_array_equal(np.asarray(dequantize_4bit(q_proj.quantized)), np.asarray(dequantize_4bit(expected)))
    assert not isinstance(model.lm_head, Linear4bit) and not isinstance(model.model.embed_tokens, Linear4bit)
    ids = np.random.default_rng(0).integers(0, 97, size=(1, 6))
    with torch.no_grad():
        expected_logits = hf(torch.tensor(ids)).logits.numpy()
    assert_rel_close(logits_of(model, ids), expected_logits, 0.25, "4-bit logits vs full precision")


def test_bitsandbytes_prequantized_checkpoint_both_ways(tmp_path, torch_device):
    bnb = pytest.importorskip("bitsandbytes")
    hf = hf_model("gqa-untied").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    qconfig = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.bfloat16)
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", quantization_config=qconfig, device_map=torch_device)
    hf4.save_pretrained(tmp_path / "bnb")
    stored = read_all(tmp_path / "bnb")

    model = load_llama(tmp_path / "bnb", dtype="bfloat16")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Linear4bit) and layer.quantized.double_quant
    key = "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(np.asarray(layer.quantized.packed), stored[key].reshape(-1))
    np.testing.assert_array_equal(np.asarray(layer.quantized.absmax), stored[key + ".absmax"])
    np.testing.assert_array_equal(np.asarray(layer.quantized.nested_absmax), stored[key + ".nested_absmax"])

    # Every leaf of every stored 4-bit weight is on the device, not a numpy array copied at each call.
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * hf.config.num_hidden_layers
    for module in layers:
        leaves = jax.tree.leaves(module.quantized)
        assert len(leaves) == 4 and all(isinstance(leaf, jax.Array) for leaf in leaves), [type(x) for x in leaves]

    out = save_llama(model, tmp_path / "out", quantization="bnb-nf4")
    written = read_all(out)
    for k in stored:
        assert written[k].tobytes() == stored[k].tobytes(), f"{k} differs from the bitsandbytes checkpoint"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, device_map=torch_device)
    proj = reloaded.model.layers[0].mlp.down_proj
    assert isinstance(proj, bnb.nn.Linear4bit)
    theirs = bnb_reference_dequantize(proj.weight.data, proj.weight.quant_state, torch_device)
    ours = np.asarray(dequantize_4bit(layer.quantized).astype(jnp.float32))
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.reshape(ours.shape).view(np.uint32))


@pytest.mark.parametrize("quantize", ["nf4", "fp4"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_projection_fails_to_quantize_naming_its_key(tmp_path, quantize, bad):
    hf = hf_model("gqa-untied")
    hf.save_pretrained(tmp_path / "hf")
    state = read_all(tmp_path / "hf")
    key = "model.layers.1.mlp.down_proj.weight"
    state[key][3, 5] = bad  # not the last element of its block: a check on block maxima misses it
    safetensors_numpy.save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / 'hf'))}: cannot quantize '{re.escape(key)}' of shape \(64, 96\).*first at index \[3, 5\]"):
        load_llama(tmp_path / "hf", quantize=quantize)


def test_save_dense_model_as_bitsandbytes_4bit(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    hf = hf_model("mha-tied")
    hf.save_pretrained(tmp_path / "hf")
    model = load_llama(tmp_path / "hf")
    out = save_llama(model, tmp_path / "q", quantization="bnb-fp4", double_quant=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    proj = reloaded.model.layers[2].self_attn.o_proj
    assert isinstance(proj, bnb.nn.Linear4bit) and proj.weight.quant_state.quant_type == "fp4"
    w = np.asarray(model.model.layers[2].self_attn.o_proj.weight.get_value())
    ours = np.asarray(dequantize_4bit(quantize_4bit(jnp.asarray(w), quant_type="fp4")))
    theirs = bnb_reference_dequantize(proj.weight.data, proj.weight.quant_state, "cpu").reshape(ours.shape)
    # Equal values; the only bit differences allowed are FP4 code 8's zero sign (-0.0 here, +0.0 in
    # bitsandbytes' generic CPU path; see tests/torch_bridge/test_bnb_quantize.py).
    np.testing.assert_array_equal(ours, theirs)
    differ = ours.view(np.uint32) != theirs.view(np.uint32)
    assert np.all(ours[differ] == 0)


def test_errors_name_the_file_key_and_shapes(tmp_path):
    hf = hf_model("gqa-untied")
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    state = read_all(src)

    bad = tmp_path / "shape"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    broken = dict(state)
    broken["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 64), np.float32)
    safetensors_numpy.save_file(broken, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(5, 64\).*\(32, 64\)"):
        load_llama(bad)

    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    safetensors_numpy.save_file(missing, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_llama(bad)

    extra = dict(state, **{"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)})
    safetensors_numpy.save_file(extra, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"match no parameter.*extra"):
        load_llama(bad)

    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_llama(bad)

    config = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    with pytest.raises(ConfigError, match="mistral"):
        load_llama(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_llama(bad)

    with pytest.raises(FileExistsError):
        save_llama(load_llama(src), src)
