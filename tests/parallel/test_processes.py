"""`jaxlora train` over two processes on this machine (4 simulated CPU devices each, a free port, gloo
collectives): the losses of one process with 8 devices; its checkpoint resumes in one process on a
(fsdp 4) mesh and goes on with the same losses; when one process dies, the other stops with an error
within the heartbeat timeout instead of hanging."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.parallel.test_mesh_trainer import SCRIPT, losses, write_config

pytest.importorskip("torch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env_with(devices: int) -> dict:
    return {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices)}


def start_two(config: Path, *flags: str) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen([SCRIPT, "train", str(config), "--coordinator", f"localhost:{port}", "--num-processes", "2",
                              "--process-id", str(i), *flags], env=env_with(4), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Wait for every process (killing all of them at the timeout, or when one fails); ``(returncode, stderr)``."""
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in processes):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.5)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    return [(p.wait(), p.stderr.read()) for p in processes]


def test_two_processes_train_as_one_and_resume_in_one(tiny_model_dir, tmp_path):
    mesh = ["--data", "2", "--fsdp", "4"]
    one = subprocess.run([SCRIPT, "train", str(write_config(tmp_path, tiny_model_dir, "one", 6)), *mesh],
                         env=env_with(8), capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    results = finish(start_two(write_config(tmp_path, tiny_model_dir, "two", 3), *mesh), timeout=900)
    for code, err in results:
        assert code == 0, err[-3000:]
    assert "over 8 cpu devices in 2 process(es)" in results[0][1]
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3]  # process 0 alone logged
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], rtol=1e-5)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").exists()
    # The two processes' checkpoint, in one process on 4 devices.
    resumed = subprocess.run([SCRIPT, "train", str(tmp_path / "two.toml"), "--fsdp", "4", "--set", "run.max_steps=6"],
                             env=env_with(4), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 3" in resumed.stderr
    got = losses(tmp_path / "two")
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)


def test_when_a_process_dies_the_other_stops_with_an_error(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, "dies", 500)
    processes = start_two(config, "--fsdp", "8", "--set", "parallel.heartbeat_timeout=5", "--set", "run.save_every=1000")
    metrics = tmp_path / "dies" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.5)
    assert all(p.poll() is None for p in processes), "a process ended before training started"
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    processes[1].wait()
    (code, err), = finish(processes[:1], timeout=120)  # process 0 alone: it must stop by itself
    assert code != 0
    assert time.time() - killed_at < 60, "process 0 went on (or hung) after process 1 died"
    assert "heartbeat" in err or "another task died" in err, err[-2000:]
