"""python experiments/bench_mesh.py --markdown experiments/results/scale.md

The training step on a device mesh of simulated CPU devices (``JAX_NUM_CPU_DEVICES``, one process per
configuration): per-device memory and the same losses on 1, 2, 4 and 8 devices. Not a speed claim: the
simulated devices share this machine's cores, so a step on 8 of them does the work of 8 devices on 2 cores.

Model: SmolLM2-135M's shape (30 layers, random weights, experiments/gpu/smollm2_config.json), QLoRA
(NF4 + double quantization) r=16 on all linear layers, gradient checkpointing, layers scanned, AdamW
(the trainer's `make_optimizer`), batch 8 x 256 random tokens (the global batch, the same everywhere),
meshes ``(data, fsdp, tensor)`` from ``--meshes``. Reported per configuration: lower + compile s, step s
(median of ``--steps`` after one warm-up step), the frozen weights' bytes on one device against their
total, XLA's per-device argument and temporary bytes (memory_analysis of the compiled step), the
process's peak RSS (all simulated devices live in it), and the first and last loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from bench_compile import build_model, machine, others, smollm2_config  # noqa: E402


def run_case(case: dict) -> dict:
    import jax
    import warnings

    from jaxlora.models.scan import stack_layers
    from jaxlora.parallel import (ParallelConfig, make_mesh, place_batch, place_optimizer_state, shard_model,
                                  step_shardings)
    from jaxlora.quant import QuantizedTensor
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import make_train_step, split_trainable

    model = build_model(smollm2_config(), "qlora", True, 16)
    assert stack_layers(model) is None
    model.train()
    mesh = make_mesh(ParallelConfig(*case["mesh"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shard_model(model, mesh)
    graphdef, trainable, rest = split_trainable(model)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, lr_scheduler_type="constant"), 1000)
    opt_state = place_optimizer_state(tx, tx.init(trainable), trainable, mesh)
    step = make_train_step(graphdef, tx, out_shardings=step_shardings(trainable, rest, opt_state, mesh))
    batch_size, seq = case["batch"]
    ids = jax.random.randint(jax.random.key(0), (1, batch_size, seq), 0, smollm2_config()["vocab_size"])
    batch = place_batch({"input_ids": ids, "labels": ids}, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(trainable, rest, opt_state, batch).compile()
    compile_s = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    leaves = jax.tree.leaves(rest, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    arrays = [a for x in leaves for a in ([x.packed, x.absmax] if isinstance(x, QuantizedTensor) else [x])
              if hasattr(a, "addressable_shards")]
    on_device = sum(a.addressable_shards[0].data.nbytes for a in arrays)
    total = sum(a.nbytes for a in arrays)
    state, times, losses = [trainable, rest, opt_state], [], []
    for i in range(1 + case["steps"]):
        start = time.perf_counter()
        state[0], state[1], state[2], metrics = compiled(*state, batch)
        losses.append(float(metrics["loss"]))
        if i >= 1:
            times.append(time.perf_counter() - start)
    return {"devices": mesh.size, "compile_s": compile_s, "step_s": statistics.median(times),
            "frozen_device_mb": on_device / 2**20, "frozen_total_mb": total / 2**20,
            "xla_argument_mb": analysis.argument_size_in_bytes / 2**20, "xla_temp_mb": analysis.temp_size_in_bytes / 2**20,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "loss_first": losses[0], "loss_last": losses[-1], "warnings": [str(w.message)[:300] for w in caught]}


def in_subprocess(case: dict, timeout: int) -> dict:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(math.prod(case["mesh"]))}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--meshes", default="1,1,1 1,2,1 1,4,1 1,8,1 2,4,1 2,2,2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--markdown")
    parser.add_argument("--timeout", type=int, default=1800)
    opts = parser.parse_args()
    if opts.case:
        print(json.dumps(run_case(json.loads(opts.case))))
        return
    command = "python " + " ".join(["experiments/bench_mesh.py", *sys.argv[1:]])
    started = others()
    print(command, started, sep="\n", flush=True)
    rows = []
    for mesh in opts.meshes.split():
        case = {"mesh": [int(s) for s in mesh.split(",")], "batch": [8, 256], "steps": opts.steps}
        rows.append((mesh, in_subprocess(case, opts.timeout)))
        print(rows[-1], flush=True)
    ended = others()
    if not opts.markdown:
        return
    out = ["# Training on a device mesh (simulated CPU devices)", "", f"Command: `{command}`", "",
           "Machine (`lscpu | head`):", "", "```", *machine(), "```", "", "At the start:", "", "```", started, "```", "",
           "At the end:", "", "```", ended, "```", "", __doc__.split("\n\n", 1)[1].strip(), "",
           "| data,fsdp,tensor | devices | lower+compile s | step s | frozen MiB per device / total | XLA arguments MiB | "
           "XLA temp MiB | peak RSS GB | loss first -> last |", "|---|---|---|---|---|---|---|---|---|"]
    for mesh, r in rows:
        if "error" in r:
            out.append(f"| {mesh} | error: {r['error']} | | | | | | | |")
            continue
        out.append(f"| {mesh} | {r['devices']} | {r['compile_s']:.1f} | {r['step_s']:.2f} | "
                   f"{r['frozen_device_mb']:.1f} / {r['frozen_total_mb']:.1f} | {r['xla_argument_mb']:.1f} | "
                   f"{r['xla_temp_mb']:.1f} | {r['peak_rss_gb']:.2f} | {r['loss_first']:.5f} -> {r['loss_last']:.5f} |")
    warned = sorted({w for _, r in rows for w in r.get("warnings", [])})
    if warned:
        out += ["", "Warnings:", "", *[f"- {w}" for w in warned]]
    with open(opts.markdown, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
