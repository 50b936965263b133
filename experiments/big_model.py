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

Results: experiments/results/big_model.md.
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


# ---------------------------------------------------------------- load, train, generate, export (jaxlora)


def load_nf4(opts):
    """The checkpoint as a QLoRA base: bf16 dense parts, NF4 + double quantization projections."""
    from torch_bridge import load_llama

    return load_llama(cache_dir(opts.shape), dtype="bfloat16", quantize="nf4", compute_dtype=opts.compute)


def storage_bytes(model) -> dict:
    """Bytes of the loaded arrays: 4-bit projections (codes + constants) and the dense rest."""
    import jax
    from flax import nnx

    from jaxlora.nn.linear4bit import QuantizedWeight

    quantized = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, QuantizedWeight)))
    dense = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"quantized_bytes": int(quantized), "dense_bytes": int(dense)}


def stage_load(opts) -> dict:
    start = time.perf_counter()
    model = load_nf4(opts)
    return {"load_s": time.perf_counter() - start, **storage_bytes(model), "rss_after_gib": rss_gib()}


def lora_config(rank: int):
    from jaxlora.peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS)


def random_batch(opts, vocab: int):
    """One micro-batch ``[accumulation=1, batch=1, seq]`` of seeded random tokens (same ids as the peft stage)."""
    import numpy as np

    ids = np.random.default_rng(SEED).integers(0, vocab, (1, 1, opts.seq), dtype=np.int32)
    return {"input_ids": ids, "labels": ids}


def stage_train(opts) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxlora.peft import get_peft_model
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import make_train_step, split_trainable
    from jaxlora.train.trainer import skip_nonfinite_updates
    from torch_bridge import save_peft_adapter

    t0 = time.perf_counter()
    model = load_nf4(opts)
    load_s, rss_loaded, peak_load = time.perf_counter() - t0, rss_gib(), hwm_gib()
    model.gradient_checkpointing = True
    peft_model = get_peft_model(model, lora_config(opts.rank), rngs=nnx.Rngs(params=SEED, dropout=SEED + 1))
    graphdef, trainable, rest = split_trainable(peft_model, nnx.LoRAParam)
    trainable_params = sum(int(x.size) for x in jax.tree.leaves(trainable))
    # As jaxlora.train.trainer.train builds it: skip_nonfinite_updates(make_optimizer(config.optim, total)).
    tx = skip_nonfinite_updates(make_optimizer(OptimizerConfig(learning_rate=2e-4, lr_scheduler_type="constant"),
                                               opts.steps))
    opt_state = tx.init(trainable)
    step = make_train_step(graphdef, tx, wrt=nnx.LoRAParam)
    batch = {k: jax.numpy.asarray(v) for k, v in random_batch(opts, model.config.vocab_size).items()}

    compile_events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compile_events.append(secs) if event.startswith("/jax/core/compile/") else None)
    times, losses, grad_norms, peaks = [], [], [], []
    peak_setup = hwm_gib()  # load, LoRA injection, optimizer state
    for _ in range(opts.steps):
        reset_peak()
        start = time.perf_counter()
        # The first call traces, lowers and compiles (the trainer's path: _TrainStep), then runs.
        trainable, rest, opt_state, metrics = step(trainable, rest, opt_state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
        times.append(time.perf_counter() - start)
        peaks.append(hwm_gib())
        print(f"step {len(times)}: {times[-1]:.1f} s loss {losses[-1]:.4f} peak RSS in the step {peaks[-1]:.2f} GiB",
              file=sys.stderr, flush=True)
    compile_s = sum(compile_events)
    rss_after = rss_gib()
    temp_bytes = None
    if opts.memory_analysis:  # one more compilation: after the measured steps
        temp_bytes = int(step.lower(trainable, rest, opt_state, batch).compile().memory_analysis().temp_size_in_bytes)
    nnx.update(peft_model, trainable)
    t1 = time.perf_counter()
    save_peft_adapter(peft_model, adapter_dir(opts), base_model_name_or_path=str(cache_dir(opts.shape)))
    adapter_s = time.perf_counter() - t1
    return {"load_s": load_s, "rss_loaded_gib": rss_loaded, "peak_load_gib": peak_load, "peak_setup_gib": peak_setup,
            "peak_gib": max(peak_setup, *peaks), "compile_s": compile_s,
            "first_step_s": times[0], "step_s": times[1:], "peak_step_gib": peaks, "rss_after_steps_gib": rss_after,
            "xla_temp_bytes": temp_bytes, "loss": losses, "grad_norm": grad_norms,
            "loss_finite": bool(np.all(np.isfinite(losses))), "trainable": trainable_params, "adapter_save_s": adapter_s,
            "adapter_bytes": disk_bytes(adapter_dir(opts)), **storage_bytes(model)}


def stage_generate(opts) -> dict:
    import numpy as np

    from jaxlora.generate import GenerationConfig, Generator
    from torch_bridge import load_peft_adapter

    t0 = time.perf_counter()
    model = load_peft_adapter(load_nf4(opts), adapter_dir(opts))
    load_s = time.perf_counter() - t0
    prompt = np.random.default_rng(SEED + 1).integers(3, model.base_model.config.vocab_size, 16).tolist()
    generator = Generator(model)
    t0 = time.perf_counter()
    tokens = generator([prompt], GenerationConfig(max_new_tokens=16))[0]
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = generator([prompt], GenerationConfig(max_new_tokens=16))[0]
    return {"load_s": load_s, "first_call_s": first_s, "second_call_s": time.perf_counter() - t0, "tokens": tokens,
            "deterministic": tokens == again}


def stage_export(opts) -> dict:
    from torch_bridge.merged_checkpoint import write_merged_checkpoint

    out = work_dir(opts) / f"merged-r{opts.rank}-{opts.compute}"
    t0 = time.perf_counter()
    write_merged_checkpoint(cache_dir(opts.shape), adapter_dir(opts), out, dtype="bfloat16",
                            max_shard_size=opts.max_shard_size, overwrite=True)
    result = {"export_s": time.perf_counter() - t0, "merged_bytes": disk_bytes(out),
              "shards": len(list(out.glob("*.safetensors")))}
    if not opts.keep_merged:
        import shutil

        shutil.rmtree(out)
    return result


# ---------------------------------------------------------------- peft: transformers + bitsandbytes + PEFT


def stage_peft(opts) -> dict:
    import numpy as np
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(SEED)
    compute = getattr(torch, opts.compute)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(cache_dir(opts.shape), dtype=torch.bfloat16,
                                                              quantization_config=quantization, device_map="cpu")
    load_s, rss_loaded = time.perf_counter() - t0, rss_gib()
    linear4bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    rss_prepared = rss_gib()
    model = get_peft_model(model, LoraConfig(r=opts.rank, lora_alpha=2 * opts.rank, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    ids = torch.from_numpy(random_batch(opts, model.config.vocab_size)["input_ids"][0].astype(np.int64))
    times, losses, hwm = [], [], []
    peak_setup = hwm_gib()  # loading (quantization while loading), k-bit preparation, LoRA injection
    for _ in range(opts.steps):
        reset_peak()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
        hwm.append(hwm_gib())
        print(f"step {len(times)}: {times[-1]:.1f} s loss {losses[-1]:.4f} peak RSS in the step {hwm[-1]:.2f} GiB",
              file=sys.stderr, flush=True)
    return {"load_s": load_s, "rss_loaded_gib": rss_loaded, "rss_prepared_gib": rss_prepared, "linear4bit": linear4bit,
            "peak_setup_gib": peak_setup, "peak_gib": max(peak_setup, *hwm), "first_step_s": times[0],
            "step_s": times[1:], "loss": losses, "loss_finite": bool(np.all(np.isfinite(losses))),
            "peak_step_gib": hwm, "trainable": sum(p.numel() for p in params),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
            "peft": __import__("peft").__version__}


def stage_memory(opts) -> dict:
    """`jaxlora memory` as a user runs it, for the train stage's setting, on CPU."""
    argv = [sys.executable, "-c", "import sys; from jaxlora.cli import main; sys.exit(main())", "memory", "--model", str(cache_dir(opts.shape)),
            "--method", "qlora", "--rank", str(opts.rank), "--targets", ",".join(TARGETS), "--batch", "1",
            "--seq", str(opts.seq), "--grad-ckpt", "--dtype", "bfloat16", "--compute-dtype", opts.compute,
            "--platform", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=child_env())
    from jaxlora.cli.memory import ModelShape, estimate_memory

    estimate = estimate_memory(ModelShape.from_config(llama_config(opts.shape)), method="qlora", rank=opts.rank,
                               targets=TARGETS, batch=1, seq=opts.seq, grad_ckpt=True, dtype="bfloat16",
                               compute_dtype=opts.compute, platform="cpu")
    return {"command": "jaxlora " + " ".join(argv[3:]), "exit": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-2000:],
            "estimate_gib": {name: gib for name, gib in estimate.rows()}}


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


CHILD_STAGES = {"write": stage_write, "load": stage_load, "train": stage_train, "generate": stage_generate,
                "export": stage_export, "peft": stage_peft, "memory": stage_memory}


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
        result = CHILD_STAGES[opts.child](opts)
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
