"""`jaxlora train` on a mesh of 8 simulated CPU devices, end to end through the CLI (each run a process of
its own, JAX_NUM_CPU_DEVICES set before jax starts): a QLoRA run on (data 2, fsdp 4) that stops at a
checkpoint and resumes on (fsdp 8) logs the losses and writes the adapter of the same run on one device;
a batch that does not split over the mesh is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train.test_trainer import write_data

pytest.importorskip("torch")

SCRIPT = Path(sys.executable).parent / "jaxlora"


def write_config(tmp_path: Path, model_dir: Path, name: str, max_steps: int) -> Path:
    write_data(tmp_path / "train.jsonl")
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[model]
path = "{model_dir}"
quantize = "nf4"
gradient_checkpointing = true

[lora]
r = 8
lora_alpha = 16
target_modules = "all-linear"

[data]
train_file = "{tmp_path / 'train.jsonl'}"
max_seq_length = 64

[optim]
learning_rate = 5e-3
lr_scheduler_type = "constant"

[run]
output_dir = "{tmp_path / name}"
max_steps = {max_steps}
batch_size = 8
save_every = 3
eval_every = 100
log_every = 1
""")
    return path


def jaxlora_train(config: Path, *flags: str, devices: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    if devices:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return subprocess.run([SCRIPT, "train", str(config), *flags], env=env, capture_output=True, text=True, timeout=900)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_a_run_on_a_mesh_resumes_on_another_and_matches_one_device(tiny_model_dir, tmp_path):
    one = jaxlora_train(write_config(tmp_path, tiny_model_dir, "one", 6))
    assert one.returncode == 0, one.stderr[-3000:]
    first = jaxlora_train(write_config(tmp_path, tiny_model_dir, "mesh", 3), "--data", "2", "--fsdp", "4", devices=8)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "mesh: data 2 x fsdp 4 x tensor 1 over 8 cpu devices" in first.stderr
    resumed = jaxlora_train(tmp_path / "mesh.toml", "--fsdp", "8", "--set", "run.max_steps=6", devices=8)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 3" in resumed.stderr and "mesh: data 1 x fsdp 8 x tensor 1" in resumed.stderr
    assert "mesh:" not in one.stderr
    want, got = losses(tmp_path / "one"), losses(tmp_path / "mesh")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)
    assert want[6] < want[1]
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "mesh")
    assert sorted(a) == sorted(b) and any(".layers.1." in k for k in a)  # per-layer keys, as on one device
    for key in a:
        assert np.linalg.norm(b[key] - a[key]) <= 1e-4 * np.linalg.norm(a[key]), key


def test_a_batch_that_does_not_split_over_the_mesh_is_an_error(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, "bad", 2)
    done = jaxlora_train(config, "--fsdp", "8", "--set", "run.batch_size=4", devices=8)
    assert done.returncode == 2
    assert "jaxlora: error: run.batch_size = 4 does not split over parallel.data x parallel.fsdp = 8" in done.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
