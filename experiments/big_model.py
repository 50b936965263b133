"""QLoRA on a Llama-2-7B-shaped model on a machine whose RAM cannot hold it in float32.

    python experiments/big_model.py --shape 7b --stage all --rank 16          # every stage, r=16
    python experiments/big_model.py --shape 7b --stage train --rank 64 --compute float32
    python experiments/big_model.py --shape tiny --stage all                  # the same code, a few-MB model

Stages (each measured in its own child process: peak RSS as the child's ru_maxrss and as /proc's
VmHWM sampled by the parent, wall times; results appended to ``--results``, JSON lines):

- write: a random-weight checkpoint with Llama-2-7B's exact shapes (weights ~N(0, 0.02), norms
  ones, seeded per tensor) as sharded bf16 safetensors with model.safetensors.index.json and
  config.json, written tensor by tensor through `torch_bridge.checkpoint_writer.write_checkpoint`
  (one shard in memory, atomic), once: a complete directory is reused.
- load: `torch_bridge.load_llama(path, dtype="bfloat16", quantize="nf4")` (double quantization).
- train: QLoRA (all linear layers, gradient checkpointing, AdamW, batch 1 x seq random tokens)
  with the trainer's own step (`make_train_step` around `skip_nonfinite_updates(make_optimizer(...))`,
  as `jaxlora.train.trainer.train` builds it); compile time, s/step, loss; the adapter is saved
  with `save_peft_adapter` for the stages below.
- generate: the base in NF4 plus that adapter, 16 greedy tokens with `jaxlora.generate`.
- export: the streamed merged bf16 checkpoint (`torch_bridge.merged_checkpoint.write_merged_checkpoint`).
- peft: the same fine-tune with transformers + bitsandbytes (NF4, double quantization) + PEFT.
- memory: `jaxlora memory`'s estimate for the train stage's setting (printed by the CLI itself).

This file writes the checkpoint and runs the stages; experiments/big_model_stages.py holds what the
other stages measure. Results: experiments/results/big_model.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("write", "load", "train", "generate", "export", "peft", "memory")
SEED = 0
INIT_STD = 0.02

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json), and a few-MB model of the same family for debugging.
SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
}
COMMON = dict(rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cache_dir(shape: str) -> Path:
    return Path(os.environ.get("JAXLORA_CACHE", Path.home() / ".cache" / "jaxlora")) / f"llama2-{shape}-shaped"


def work_dir(opts) -> Path:
    return Path(opts.work) / opts.shape


def adapter_dir(opts) -> Path:
    return work_dir(opts) / f"adapter-r{opts.rank}-{opts.compute}"


def status_kib() -> dict[str, int]:
    """VmHWM / VmRSS of this process, KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def reset_peak() -> None:
    """Start a new VmHWM (peak RSS) measurement for this process (Linux: clear_refs 5); ru_maxrss keeps
    the peak of the whole process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_gib() -> float:
    return status_kib()["VmRSS"] / 2**20


def hwm_gib() -> float:
    return status_kib()["VmHWM"] / 2**20


# ---------------------------------------------------------------- write


def llama_config(shape: str):
    from jaxlora.models import LlamaConfig

    return LlamaConfig(**SHAPES[shape], **COMMON)


def is_complete(path: Path) -> bool:
    """A checkpoint directory that a finished write left (the writer renames it into place last)."""
    return (path / "config.json").is_file() and ((path / "model.safetensors.index.json").is_file()
                                                 or (path / "model.safetensors").is_file())


def random_tensor(key: str, shape: tuple[int, ...], index: int):
    """Tensor ``key`` of the random checkpoint in bfloat16: ones for norms, N(0, 0.02) otherwise.

    Seeded by (SEED, index): every tensor is reproducible on its own. Generated in row blocks so that
    the float32 draw never exists for a whole [vocab, hidden] or [intermediate, hidden] matrix.
    """
    import ml_dtypes
    import numpy as np

    if key.endswith("norm.weight"):
        return np.ones(shape, ml_dtypes.bfloat16)
    rng = np.random.default_rng([SEED, index])
    out = np.empty(shape, ml_dtypes.bfloat16)
    rows = max(1, (1 << 22) // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        block = rng.standard_normal((min(rows, shape[0] - start),) + shape[1:], dtype=np.float32)
        block *= INIT_STD
        out[start:start + block.shape[0]] = block.astype(ml_dtypes.bfloat16)
    return out


def stage_write(opts) -> dict:
    from torch_bridge.checkpoint import parameter_shapes
    from torch_bridge.checkpoint_writer import dense_group, hf_config, write_checkpoint

    path = cache_dir(opts.shape)
    if is_complete(path):
        return {"path": str(path), "cached": True, "disk_bytes": disk_bytes(path)}
    config = llama_config(opts.shape)
    shapes = parameter_shapes(config)
    groups = (dense_group(key, shape, "bfloat16", lambda key=key, shape=shape, i=i: random_tensor(key, shape, i))
              for i, (key, shape) in enumerate(shapes.items()))
    start = time.perf_counter()
    write_checkpoint(path, hf_config(config, "bfloat16", None, True), groups, max_shard_size=opts.max_shard_size)
    return {"path": str(path), "cached": False, "write_s": time.perf_counter() - start, "disk_bytes": disk_bytes(path),
            "tensors": len(shapes), "parameters": sum(math.prod(s) for s in shapes.values())}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# ---------------------------------------------------------------- the parent: one child per stage


def run_child(opts, stage: str) -> dict:
    """Run ``stage`` in a fresh process; its result plus peak RSS (ru_maxrss, sampled VmHWM) and wall time."""
    out = work_dir(opts) / f".result-{stage}-{os.getpid()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, __file__, "--child", stage, "--child-out", str(out)] + forwarded(opts)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=child_env())
    sampled = {"VmHWM": 0}

    def sample():
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        sampled["VmHWM"] = max(sampled["VmHWM"], int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    record = {"stage": stage, "shape": opts.shape, "rank": opts.rank, "compute": opts.compute, "seq": opts.seq,
              "steps": opts.steps, "exit": proc.returncode, "wall_s": time.perf_counter() - start,
              "peak_rss_gib": usage.ru_maxrss / 2**20, "sampled_vmhwm_gib": sampled["VmHWM"] / 2**20,
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_version()}
    if out.exists():
        record.update(json.loads(out.read_text()))
        out.unlink()
    with open(opts.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def code_version() -> str:
    """The checkout's commit, with "-dirty" for uncommitted changes."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or "unknown"


def child_env() -> dict:
    """This checkout first on the path (whatever jaxlora the interpreter has installed)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def forwarded(opts) -> list[str]:
    return ["--shape", opts.shape, "--rank", str(opts.rank), "--steps", str(opts.steps), "--seq", str(opts.seq),
            "--compute", opts.compute, "--work", str(opts.work), "--max-shard-size", opts.max_shard_size,
            "--results", str(opts.results)] + (["--keep-merged"] if opts.keep_merged else []) \
        + (["--memory-analysis"] if opts.memory_analysis else [])


def child_stage(name: str):
    """The function that measures stage ``name`` in a child process."""
    if name == "write":
        return stage_write
    import big_model_stages

    return getattr(big_model_stages, f"stage_{name}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", help=f"one of {', '.join(STAGES)}, all, or a comma-separated list")
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--compute", default="bfloat16", choices=["bfloat16", "float32"],
                   help="activation dtype of jaxlora and bitsandbytes' compute dtype (storage stays bf16 / 4-bit)")
    p.add_argument("--work", default="/tmp/jaxlora-big-model", help="adapters and exports")
    p.add_argument("--max-shard-size", default="5GB", help="shards of the written and the merged checkpoints")
    p.add_argument("--results", default=str(ROOT / "experiments" / "results" / "big_model_runs.jsonl"))
    p.add_argument("--memory-analysis", action="store_true",
                   help="train: compile the step once more after the steps for XLA's temporary bytes")
    p.add_argument("--keep-merged", action="store_true", help="keep the merged export (default: removed after measuring)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.child:
        sys.path.insert(0, str(ROOT))
        result = child_stage(opts.child)(opts)
        result.update(child_vmhwm_gib=hwm_gib())  # since the stage's last reset_peak, if it made one
        Path(opts.child_out).write_text(json.dumps(result))
        return 0
    stages = STAGES if opts.stage == "all" else opts.stage.split(",")
    for stage in stages:
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)} or all")
    failed = 0
    for stage in stages:
        record = run_child(opts, stage)
        failed += record["exit"] != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
