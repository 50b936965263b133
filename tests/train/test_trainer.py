"""The trainer end to end on a tiny random Llama with SmolLM2's tokenizer: loss falls, files appear,
the adapter loads in PEFT; SIGINT saves and exits; a NaN loss stops with the last checkpoint intact."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlora.train.config import config_from_dict
from jaxlora.train.trainer import TrainingError, train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def write_data(path: Path, n: int = 24):
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cyan", "gold", "gray"]
    with open(path, "w") as f:
        for _ in range(n):
            word = words[rng.integers(len(words))]
            f.write(json.dumps({"instruction": f"Say the color {word}.", "output": f"Color: {word}."}) + "\n")


def make_config(model_dir, tmp_path, **run):
    write_data(tmp_path / "train.jsonl")
    return config_from_dict({
        "model": {"path": str(model_dir)},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "data": {"train_file": str(tmp_path / "train.jsonl"), "max_seq_length": 64, "eval_size": 4},
        "optim": {"learning_rate": 5e-2, "warmup_steps": 2, "lr_scheduler_type": "cosine"},
        "run": {"output_dir": str(tmp_path / "run"), "max_steps": 30, "batch_size": 4, "gradient_accumulation_steps": 2,
                "eval_every": 10, "save_every": 10, "log_every": 5, **run},
    })


def test_training_run_end_to_end(tiny_model_dir, tmp_path):
    import peft

    summary = train(make_config(tiny_model_dir, tmp_path))
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert losses[-1] < 0.75 * losses[0], losses
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert summary["steps"] == 30 and summary["best_eval_loss"] == min(evals)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "best_adapter/adapter_config.json",
                 "loss.png", "summary.json"):
        assert (run / name).exists(), name
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft.PeftModel.from_pretrained(base, run / "adapter")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, tmp_path, save_every=2, eval_every=100)
    train(config)  # 30 good steps
    from jaxlora.train.checkpointing import TrainCheckpointer

    bad = config_from_dict({**json.loads(json.dumps(config, default=lambda o: o.__dict__)),
                            "optim": {"learning_rate": 1e30, "warmup_steps": 0, "lr_scheduler_type": "constant"},
                            "run": {**config.run.__dict__, "max_steps": 40, "save_every": 2, "eval_every": 100}})
    with pytest.raises(TrainingError, match="loss is (nan|inf)"):
        train(bad)
    assert TrainCheckpointer(tmp_path / "run" / "checkpoints").latest_step() == 30


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, tmp_path, max_steps=400, save_every=1000, eval_every=1000)
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(config, default=lambda o: o.__dict__))
    code = ("import json, sys; from jaxlora.train.config import config_from_dict; from jaxlora.train.trainer import train; "
            "train(config_from_dict(json.load(open(sys.argv[1]))))")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(config_path)], cwd=repo, stderr=subprocess.PIPE)
    seen = b""
    deadline = time.time() + 300
    while b"step 5/" not in seen and time.time() < deadline:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        seen += chunk
    assert b"step 5/" in seen, seen[-2000:]
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, (seen + rest)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] and 5 <= summary["steps"] < 400
    from jaxlora.train.checkpointing import TrainCheckpointer

    assert TrainCheckpointer(tmp_path / "run" / "checkpoints").latest_step() == summary["steps"]


def _losses_by_step(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]  # a step logged again after a resume: the later line wins
    return out


def test_trainer_killed_with_sigkill_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    code = ("import json, sys; from jaxlora.train.config import config_from_dict; from jaxlora.train.trainer import train; "
            "train(config_from_dict(json.load(open(sys.argv[1]))))")

    def config_file(name):
        config = make_config(tiny_model_dir, tmp_path / name, max_steps=12, save_every=1, eval_every=100, log_every=1)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config, default=lambda o: o.__dict__))
        return path

    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight = subprocess.run([sys.executable, "-c", code, str(config_file("straight"))], cwd=repo, capture_output=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-c", code, str(config_file("killed"))], cwd=repo, stderr=subprocess.PIPE)
    seen = b""
    while b"step 6/" not in seen:
        chunk = proc.stderr.read1(4096)
        assert chunk, seen[-2000:]
        seen += chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "killed.json")], cwd=repo, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert b"resuming from step" in resumed.stderr
    expected, got = _losses_by_step(tmp_path / "straight" / "run"), _losses_by_step(tmp_path / "killed" / "run")
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    assert got == expected  # floats from the same bits: identical


def test_full_finetuning_writes_the_model(tiny_model_dir, tmp_path):
    summary = train(make_config(tiny_model_dir, tmp_path, max_steps=6, full_finetune=True, eval_every=100))
    assert summary["steps"] == 6
    assert (tmp_path / "run" / "model" / "model.safetensors").exists() and not (tmp_path / "run" / "adapter").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert rows[-1]["loss"] < rows[0]["loss"]
