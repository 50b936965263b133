"""Training on a device mesh (8 simulated CPU devices, in a process of its own: tests/parallel/mesh_steps.py):
the same losses and LoRA weights as one device, the frozen weights split 1/(fsdp x tensor) per device on
whole quantization blocks, optimizer moments sharded like their parameters and in pinned_host memory
when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MESHES = ("2,4,1", "1,8,1", "2,2,2")


def run_steps(kind: str, offload: bool, meshes=MESHES) -> dict:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.parallel.mesh_steps", kind, "offload" if offload else "no",
                           *meshes], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind,offload", [("lora", False), ("qlora", True)])
def test_meshes_train_as_one_device(kind, offload):
    results = run_steps(kind, offload)
    zero = results.pop("zero")  # ZeRO: moments split like their parameters, counts replicated
    assert zero == {"w": ["P('tensor', 'fsdp')"] * 2, "b": ["P()"], "count": "P()",
                    "count_devices": 8}
    single = results.pop("single")
    assert single["devices"] == 8 and single["scalars_finite"]
    assert single["losses"][2] < single["losses"][0]  # it trains (steps 1 and 3 see the same batch)
    for mesh, r in results.items():
        data, fsdp, tensor = map(int, mesh.split(","))
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5, err_msg=mesh)
        assert len(r["trainable"]) == len(single["trainable"])
        # Each weight within 1e-5 relative, in norm: sums split over devices round differently (float32), and
        # AdamW's g / sqrt(v) carries that rounding into an element whose gradient is near 0 at full size
        # (one element of 1536 moved by 1.2e-5 of the largest on the tensor-parallel mesh).
        for got, want in zip(r["trainable"], single["trainable"], strict=True):
            got, want = np.asarray(got), np.asarray(want)
            assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), mesh
        # Every projection's frozen weight (dense, or NF4 codes + scale codes) is split over fsdp x tensor.
        assert len(r["frozen"]) == 7
        for weight in r["frozen"]:
            assert weight["device_bytes"] * fsdp * tensor == weight["total_bytes"], (mesh, weight)
        # The vocabulary (97) does not split over tensor: kept whole on that axis, and said so.
        if tensor > 1:
            assert any("embed_tokens" in w and "not a multiple of tensor=2" in w for w in r["warnings"]), r["warnings"]
        else:
            assert r["warnings"] == []
        assert r["moment_memory"] == (["pinned_host"] if offload else ["device"])
    assert single["moment_memory"] == (["pinned_host"] if offload else ["device"])


def test_4bit_weights_are_never_gathered_as_floats_on_fsdp_meshes():
    """On (fsdp 8) and (data 2, fsdp 4) no float array that could be a piece of a projection weight (2-D or
    flat, every dimension a power of two: the tiny model's widths) is all-gathered: each device
    dequantizes its own rows and GSPMD gathers activations instead. (With tensor parallelism, 64 x 32
    and 64 x 16 float pieces are gathered: to be removed with the 2-D layout of the 4-bit codes.)"""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.parallel.mesh_steps", "gathers", "1,8,1", "2,4,1"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])

    def weight_like(dtype, shape):
        dims = shape[1:] if len(shape) == 3 and shape[0] == 3 else shape  # a stacked [layers, ...] array
        power_of_two = all(d >= 4 and d & (d - 1) == 0 for d in dims)
        return dtype.startswith(("f", "bf")) and power_of_two and (len(dims) == 2 or (len(dims) == 1 and dims[0] >= 256))

    for mesh, gathered in found.items():
        assert gathered, mesh  # the activations are gathered: the step is really split
        assert not [g for g in gathered if weight_like(*g)], (mesh, gathered)
