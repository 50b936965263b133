"""experiments/big_model.py's checkpoint writer on its tiny shape: the file layout of a Hugging Face
checkpoint, the distribution it claims, reproducibility, and reuse of a complete directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import big_model  # noqa: E402
from torch_bridge.checkpoint import SafetensorsReader, parameter_shapes, read_llama_config  # noqa: E402


def test_written_checkpoint_is_the_shape_it_claims(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path))
    opts = argparse.Namespace(shape="tiny", max_shard_size="1MB")
    first = big_model.stage_write(opts)
    path = big_model.cache_dir("tiny")
    assert Path(first["path"]) == path and not first["cached"] and big_model.is_complete(path)
    assert (path / "model.safetensors.index.json").is_file()  # 2.6 MB in 1 MB shards
    config = read_llama_config(path)
    assert config == big_model.llama_config("tiny")
    reader = SafetensorsReader(path)
    shapes = parameter_shapes(config)
    assert sorted(reader.keys()) == sorted(shapes)
    for index, (key, shape) in enumerate(shapes.items()):
        array = reader.get(key)
        assert array.shape == shape and array.dtype == ml_dtypes.bfloat16, key
        values = array.astype(np.float32)
        if key.endswith("norm.weight"):
            assert np.all(values == 1.0), key
        else:
            # std of n draws of N(0, 0.02): 0.02 * (1 +- a few / sqrt(2n)); bf16 rounding is 2^-9 relative
            assert abs(values.std() / big_model.INIT_STD - 1) < 5 / np.sqrt(2 * values.size) + 2**-8, key
            assert abs(values.mean()) < 5 * big_model.INIT_STD / np.sqrt(values.size), key
            np.testing.assert_array_equal(array, big_model.random_tensor(key, shape, index))  # seeded per tensor
    second = big_model.stage_write(opts)
    assert second["cached"] and second["disk_bytes"] == first["disk_bytes"]
