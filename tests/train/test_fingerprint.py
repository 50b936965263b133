"""Base model fingerprints: the same files agree wherever they are; a rewritten tensor, a changed shape or
dtype, another shard set, config or load setting is named; malformed files raise."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.train.fingerprint import (
    SAMPLE_BYTES,
    BaseModelMismatchError,
    FingerprintError,
    base_fingerprint,
    check_fingerprint,
    compare_fingerprints,
    load_settings,
)

NF4 = load_settings("float32", "nf4", True, 64)


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # "big" is 4 x SAMPLE_BYTES: its middle is not sampled; "small" is read whole.
    return {"big": rng.standard_normal(4 * SAMPLE_BYTES // 4).astype(np.float32).reshape(64, -1),
            "small": rng.standard_normal(10).astype(np.float32)}


def write_model(directory, weights, config=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64} if config is None else config))
    save_file(weights, str(directory / "model.safetensors"))
    return directory


def test_the_same_files_elsewhere_are_the_same_base(tmp_path):
    first = write_model(tmp_path / "a", tensors())
    moved = tmp_path / "b"
    shutil.copytree(first, moved)
    recorded, current = base_fingerprint(first, NF4), base_fingerprint(moved, NF4)
    assert recorded["path"] != current["path"]
    assert compare_fingerprints(recorded, current) == []
    check_fingerprint(recorded, json.loads(json.dumps(current)), checkpoint="ck/1")  # survives JSON (checkpoint meta)
    assert set(recorded["files"]["model.safetensors"]["tensors"]) == {"big", "small"}
    assert recorded["files"]["model.safetensors"]["tensors"]["big"]["shape"] == [64, 64]


@pytest.mark.parametrize("where", ["first", "last", "small"])
def test_a_rewritten_tensor_is_named(tmp_path, where):
    """Same names, shapes and dtypes (an identical header and size): only the sampled bytes differ."""
    weights = tensors()
    recorded = base_fingerprint(write_model(tmp_path / "a", weights), NF4)
    changed = {name: value.copy() for name, value in weights.items()}
    if where == "small":
        changed["small"][5] += 1.0
    else:
        changed["big"].reshape(-1)[0 if where == "first" else -1] += 1.0
    current = base_fingerprint(write_model(tmp_path / "b", changed), NF4)
    name = "small" if where == "small" else "big"
    file_old, file_new = recorded["files"]["model.safetensors"], current["files"]["model.safetensors"]
    assert file_old["header_sha256"] == file_new["header_sha256"] and file_old["bytes"] == file_new["bytes"]
    differences = compare_fingerprints(recorded, current)
    assert len(differences) == 1 and differences[0].startswith(f"files[model.safetensors].tensors.{name}: recorded")
    with pytest.raises(BaseModelMismatchError) as caught:
        check_fingerprint(recorded, current, checkpoint="run/checkpoints/3")
    message = str(caught.value)
    assert "run/checkpoints/3" in message and str(tmp_path / "a") in message and str(tmp_path / "b") in message
    assert f"tensors.{name}" in message
    assert caught.value.recorded is recorded and caught.value.current is current
    assert caught.value.differences == differences


def test_shape_dtype_config_load_settings_and_file_set_are_named(tmp_path):
    weights = tensors()
    recorded = base_fingerprint(write_model(tmp_path / "a", weights), NF4)
    reshaped = base_fingerprint(write_model(tmp_path / "b", {**weights, "big": weights["big"].reshape(128, 32)}), NF4)
    assert any(line.startswith("files[model.safetensors].tensors.big:") and "[128, 32]" in line
               for line in compare_fingerprints(recorded, reshaped))
    halved = base_fingerprint(write_model(tmp_path / "c", {**weights, "small": weights["small"].astype(np.float16)}), NF4)
    lines = compare_fingerprints(recorded, halved)
    assert any("tensors.small" in line and '"F16"' in line for line in lines)
    assert any(line.startswith("files[model.safetensors].bytes:") for line in lines)
    extra = base_fingerprint(write_model(tmp_path / "d", {**weights, "extra": np.zeros(3, np.float32)}), NF4)
    new_tensor = json.dumps(extra["files"]["model.safetensors"]["tensors"]["extra"], sort_keys=True)
    lines = compare_fingerprints(recorded, extra)
    assert lines[0] == f"files[model.safetensors].tensors.extra: not recorded, now {new_tensor}"
    assert lines[1:] == [f"files[model.safetensors].bytes: recorded {recorded['files']['model.safetensors']['bytes']}, "
                         f"now {extra['files']['model.safetensors']['bytes']}"]
    other_config = base_fingerprint(write_model(tmp_path / "e", weights, {"model_type": "llama", "hidden_size": 65}), NF4)
    assert compare_fingerprints(recorded, other_config) == ["config.hidden_size: recorded 64, now 65"]
    for settings, expected in ((load_settings("float32", None, True, 64), 'load.quantize: recorded "nf4", now null'),
                               (load_settings("float32", "nf4", False, 64), "load.double_quant: recorded true, now false"),
                               (load_settings("float32", "nf4", True, 128), "load.blocksize: recorded 64, now 128"),
                               (load_settings("bfloat16", "nf4", True, 64), 'load.dtype: recorded "float32", now "bfloat16"')):
        assert expected in compare_fingerprints(recorded, base_fingerprint(tmp_path / "a", settings))
    # Unquantized, double_quant and blocksize change nothing: they are not part of the fingerprint.
    assert load_settings("float32", None, True, 64) == load_settings("float32", None, False, 128)


def test_sharded_checkpoints_fingerprint_the_index_files(tmp_path):
    weights = tensors()
    directory = tmp_path / "sharded"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    save_file({"big": weights["big"]}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({"small": weights["small"]}, str(directory / "model-00002-of-00002.safetensors"))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "big": "model-00001-of-00002.safetensors", "small": "model-00002-of-00002.safetensors"}}))
    save_file({"unused": np.zeros(2, np.float32)}, str(directory / "adapter_model.safetensors"))  # not the base's
    recorded = base_fingerprint(directory, NF4)
    assert sorted(recorded["files"]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    single = base_fingerprint(write_model(tmp_path / "single", weights, {}), NF4)
    assert compare_fingerprints(recorded, single) == [
        "files: recorded ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'], now ['model.safetensors']"]


def test_unreadable_bases_raise(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    with pytest.raises(FingerprintError, match="neither model.safetensors nor"):
        base_fingerprint(tmp_path / "a", NF4)
    directory = write_model(tmp_path / "b", tensors())
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[:6])
    with pytest.raises(FingerprintError, match="too short for a safetensors header"):
        base_fingerprint(directory, NF4)
    (directory / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + data[8:100])
    with pytest.raises(FingerprintError, match="does not fit in the file"):
        base_fingerprint(directory, NF4)
    (directory / "model.safetensors").write_bytes(data)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(FingerprintError, match="config.json: cannot be read as JSON"):
        base_fingerprint(directory, NF4)
