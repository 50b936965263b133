"""Resume after SIGKILL gives the same losses, bit for bit, as an uninterrupted run (real subprocesses)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlora.train.checkpointing import TrainCheckpointer

SCRIPT = Path(__file__).parent / "scripts" / "resumable_run.py"
STEPS = 6


def run(run_dir, *extra, **kwargs):
    return subprocess.run([sys.executable, str(SCRIPT), str(run_dir), str(STEPS), *extra], capture_output=True, text=True,
                          timeout=300, **kwargs)


def losses(run_dir) -> dict[int, str]:
    out = {}
    for line in (run_dir / "losses.txt").read_text().splitlines():
        step, value = line.split()
        out.setdefault(int(step), value)
    return out


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    result = run(straight)
    assert result.returncode == 0, result.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(killed), str(STEPS), "--sleep-after", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    line = ""
    while time.time() < deadline and "READY" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "READY" in line, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert TrainCheckpointer(killed / "checkpoints").latest_step() == 3

    result = run(killed)
    assert result.returncode == 0, result.stderr[-2000:]
    expected, got = losses(straight), losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # float.hex: bit for bit
    assert len(set(expected.values())) == STEPS


def test_keeps_the_last_k_and_restores_exact_arrays(tmp_path):
    checkpointer = TrainCheckpointer(tmp_path / "ck", keep=2)
    rng = np.random.default_rng(0)
    states = {}
    for step in (1, 2, 3):
        states[step] = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": {"c": rng.integers(0, 9, 5).astype(np.int32)}}
        checkpointer.save(step, states[step], {"step": step, "data_position": step * 10})
    assert checkpointer.all_steps() == [2, 3]
    state, meta = checkpointer.restore(None, states[1])
    assert meta == {"step": 3, "data_position": 30}
    np.testing.assert_array_equal(np.asarray(state["a"]), states[3]["a"])
    np.testing.assert_array_equal(np.asarray(state["b"]["c"]), states[3]["b"]["c"])
    with pytest.raises(FileNotFoundError):
        TrainCheckpointer(tmp_path / "empty").restore(None, states[1])


def test_restore_reads_only_shapes_and_puts_arrays_back_in_their_memory(tmp_path):
    """Restore builds its target from shapes, dtypes and shardings: deleted `like` arrays (whose values
    cannot be read, by np.asarray or anything else) restore fine; a pinned_host leaf comes back in
    pinned_host memory, a typed PRNG key comes back as a key."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    state = {"weights": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
             "moments": jax.device_put(jnp.linspace(0, 1, 5, dtype=jnp.float32), host),
             "key": jax.random.key(3), "count": jnp.asarray(7, jnp.int32)}
    checkpointer = TrainCheckpointer(tmp_path / "ck")
    checkpointer.save(1, state, {"step": 1})
    expected = {name: np.asarray(jax.random.key_data(x) if name == "key" else x) for name, x in state.items()}
    for name, x in state.items():
        x.delete()
        assert x.is_deleted()
    assert checkpointer.read_meta() == {"step": 1}
    restored, meta = checkpointer.restore(None, state)
    assert meta == {"step": 1}
    assert restored["moments"].sharding.memory_kind == "pinned_host"
    assert restored["weights"].sharding.memory_kind == "device"
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    for name, value in expected.items():
        got = jax.random.key_data(restored[name]) if name == "key" else restored[name]
        np.testing.assert_array_equal(np.asarray(got), value)
    abstract = {name: jax.ShapeDtypeStruct(x.shape, x.dtype) for name, x in restored.items() if name != "key"}
    again, _ = checkpointer.restore(1, {**abstract, "key": restored["key"]})
    np.testing.assert_array_equal(np.asarray(again["weights"]), expected["weights"])
