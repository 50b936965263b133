"""Peak memory of real jaxlora training runs on this machine against `jaxlora.cli.memory`.

    python experiments/calibrate_memory.py --markdown experiments/results/memory.md

Eight runs on SmolLM2-135M-Instruct (float32, LoRA r=16 on all linear layers): LoRA and QLoRA
(NF4 + double quantization), with and without gradient checkpointing, batch 2x256 and 8x256 tokens.
Each run is a fresh subprocess (so its peak is its own) that does what the trainer does: load the
model, inject LoRA, build `make_train_step` with `make_optimizer`, and run 3 steps on random tokens,
keeping the model object alive as `jaxlora.train.trainer.train` does. It reports the RSS right after
importing jax (the bare runtime), after loading, after compiling, the peak RSS (``ru_maxrss``) and
XLA's own memory analysis of the compiled step. The parent prints the comparison with
`estimate_memory(platform="cpu")`, then the 7B/13B/65B/70B tables for a GPU (bf16, r=64, batch 1 x
512, checkpointing, offloaded optimizer state) against which the QLoRA paper's claim can be held.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [{"method": m, "grad_ckpt": c, "batch": b, "seq": 256} for m in ("lora", "qlora") for c in (False, True) for b in (2, 8)]
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def child(spec: dict, steps: int) -> dict:
    """One training run in this (fresh) process; returns its measurements."""
    import jax

    jax.devices()
    out = {"rss_jax": rss_bytes()}
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxlora.peft import LoraConfig, get_peft_model
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import make_train_step
    from torch_bridge import load_llama
    from torch_bridge.smollm2 import ensure_smollm2

    out["rss_imports"] = rss_bytes()
    t0 = time.time()
    model = load_llama(ensure_smollm2(), dtype="float32", quantize="nf4" if spec["method"] == "qlora" else None,
                       double_quant=True, blocksize=64)
    model.gradient_checkpointing = spec["grad_ckpt"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                                rngs=nnx.Rngs(params=0, dropout=1))
    peft_model.train()
    graphdef, trainable, rest = nnx.split(peft_model, nnx.LoRAParam, ...)
    tx = make_optimizer(OptimizerConfig(), steps)
    opt_state = tx.init(trainable)
    nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
    out.update(trainable_bytes=nbytes(trainable), rest_bytes=nbytes(rest), opt_bytes=nbytes(opt_state),
               load_s=time.time() - t0, rss_loaded=rss_bytes())

    step = make_train_step(graphdef, tx, wrt=nnx.LoRAParam)
    b, s, vocab = spec["batch"], spec["seq"], peft_model.base_model.config.vocab_size
    rng = np.random.default_rng(0)

    def micro_batch():
        ids = jnp.asarray(rng.integers(0, vocab, (1, b, s), dtype=np.int32))
        return {"input_ids": ids, "attention_mask": jnp.ones((1, b, s), jnp.int32), "labels": ids}

    t0 = time.time()
    compiled = step.lower(trainable, rest, opt_state, micro_batch()).compile()
    analysis = compiled.memory_analysis()
    out.update(compile_s=time.time() - t0, rss_compiled=rss_bytes(), xla_temp=analysis.temp_size_in_bytes,
               xla_argument=analysis.argument_size_in_bytes, xla_output=analysis.output_size_in_bytes,
               xla_alias=analysis.alias_size_in_bytes)
    out["peak_compiled"] = peak_bytes()
    losses, times, peaks = [], [], []
    for _ in range(steps):  # ``model`` keeps the loaded arrays alive, as in the trainer
        t0 = time.time()
        trainable, rest, opt_state, metrics = compiled(trainable, rest, opt_state, micro_batch())
        losses.append(float(metrics["loss"]))
        times.append(time.time() - t0)
        peaks.append(peak_bytes())
    out.update(losses=losses, step_s=times, peak_steps=peaks, peak=peak_bytes(), rss_end=rss_bytes(),
               jax_version=jax.__version__)
    return out


def run_child(spec: dict, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--steps", str(steps)],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def estimate_for(spec: dict):
    from jaxlora.cli.memory import ModelShape, estimate_memory

    return estimate_memory(ModelShape.preset("135m"), method=spec["method"], rank=16, targets="all-linear",
                           batch=spec["batch"], seq=spec["seq"], grad_ckpt=spec["grad_ckpt"], dtype="float32",
                           quant="nf4", double_quant=True, blocksize=64, platform="cpu")


def fit_constants(results: list[tuple[dict, dict]]) -> tuple[float, float]:
    """The two calibrated constants of `jaxlora.cli.memory` for the CPU, from these runs:
    the activation factor (geometric mean over the runs without checkpointing of XLA's temporaries
    over the unscaled activation model) and the runtime (the middle of the range over all runs of the
    peak RSS minus every other term of the estimate, with the fitted factor: the runs' checkpointed
    QLoRA programs leave ~300 MiB more compiler heap than the others, and the middle of the range
    keeps every run within half of that, the tolerance tests/cli/test_memory.py derives)."""
    from jaxlora.cli.memory import ACTIVATION_FACTOR

    logs = [math.log(m["xla_temp"] * ACTIVATION_FACTOR["cpu"] / estimate_for(s).activations) for s, m in results if not s["grad_ckpt"]]
    factor = math.exp(sum(logs) / len(logs))
    residuals = []
    for spec, m in results:
        est = estimate_for(spec)
        others = est.total() - est.runtime - est.activations
        residuals.append(m["peak"] - others - est.activations * factor / ACTIVATION_FACTOR["cpu"])
    return factor, (min(residuals) + max(residuals)) / 2


def calibration_table(results: list[tuple[dict, dict]]) -> tuple[list[str], float]:
    """Markdown rows and the worst |ratio - 1|."""
    rows = [("| run | peak RSS (MiB) | estimate (MiB) | ratio | XLA temp (MiB) | estimated activations (MiB) | "
            "RSS after import jax (MiB) | after load | after compile | peak after step 1, 2, 3 | step s | loss 1 -> 3 |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for spec, m in results:
        est = estimate_for(spec)
        ratio = m["peak"] / est.total()
        worst = max(worst, abs(ratio - 1))
        name = f"{spec['method']} {'ckpt' if spec['grad_ckpt'] else 'no ckpt'} {spec['batch']}x{spec['seq']}"
        rows.append(f"| {name} | {m['peak'] / MIB:,.0f} | {est.total() / MIB:,.0f} | {ratio:.3f} | {m['xla_temp'] / MIB:,.0f} | "
                    f"{est.activations / MIB:,.0f} | {m['rss_jax'] / MIB:,.0f} | {m['rss_loaded'] / MIB:,.0f} | "
                    f"{m['rss_compiled'] / MIB:,.0f} | {', '.join(f'{p / MIB:,.0f}' for p in m['peak_steps'])} | "
                    f"{statistics.median(m['step_s']):.1f} | {m['losses'][0]:.2f} -> {m['losses'][-1]:.2f} |")
    return rows, worst


def exact_parts_check(results: list[tuple[dict, dict]]) -> list[str]:
    """The estimate's storage terms against the arrays of the loaded runs (bytes, must be equal)."""
    lines = []
    for spec, m in results[:: 4]:  # one LoRA and one QLoRA run suffice: storage does not depend on batch
        est = estimate_for(spec)
        pairs = [("frozen state (weights + constants)", est.weights + est.quant_constants, m["rest_bytes"]),
                 ("adapters", est.adapters, m["trainable_bytes"]),
                 ("AdamW state", est.optimizer_states, m["opt_bytes"])]
        for what, ours, real in pairs:
            lines.append(f"- {spec['method']}: {what}: estimate {ours:,d} B, loaded arrays {real:,d} B"
                         f"{'' if ours == real else '  **DIFFERENT**'}")
    return lines


def machine() -> str:
    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text().splitlines(), Path("/proc/meminfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal")), 0)
    return f"{cpu}, {os.cpu_count()} CPUs, {mem / 2**30:.0f} GiB RAM, {platform.system()} {platform.release()}"


def qlora_65b_verdict() -> str:
    from jaxlora.cli.memory import GIB, ModelShape, estimate_memory

    kw = {"method": "qlora", "rank": 64, "batch": 1, "seq": 512, "grad_ckpt": True, "offload": True, "dtype": "bfloat16", "platform": "gpu"}
    now, fixed = (estimate_memory(ModelShape.preset("65b"), frozen_state_copies=n, **kw).total() / GIB for n in (2, 0))
    return (f"65B QLoRA (NF4 + DQ, r=64 on all linear layers, batch 1 x 512, checkpointing, paged/offloaded AdamW): "
            f"**{fixed:.1f} GiB**, which supports the QLoRA paper's claim (65B fine-tuned on one 48 GB GPU) with "
            f"{48 - fixed:.1f} GiB to spare (not measured on a GPU; see the notes). With the earlier train step that "
            f"copied the frozen state every step it would have been {now:.1f} GiB.")


def big_model_table(frozen_copies: int) -> list[str]:
    from jaxlora.cli.memory import GIB, ModelShape, estimate_memory

    rows = [("| model | params | method | weights + constants | adapters | grads | optimizer (host) | activations | "
            "update transient | frozen copies | runtime | **total (GPU)** | <= 48 GiB | <= 79.6 GiB (H100 80GB) |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("7b", "13b", "65b", "70b"):
        shape = ModelShape.preset(name)
        for method in ("full", "lora", "qlora"):
            e = estimate_memory(shape, method=method, rank=64, targets="all-linear", batch=1, seq=512, grad_ckpt=True,
                                offload=True, dtype="bfloat16", platform="gpu", frozen_state_copies=frozen_copies)
            g = lambda v: f"{v / GIB:.1f}"
            rows.append(f"| {name.upper()} | {shape.parameter_count() / 1e9:.2f} B | {method} | {g(e.weights + e.quant_constants)} | "
                        f"{g(e.adapters)} | {g(e.gradients)} | {g(e.optimizer_states_host)} | {g(e.activations)} | "
                        f"{g(e.optimizer_transient)} | {g(e.frozen_copies)} | {g(e.runtime)} | **{g(e.total())}** | "
                        f"{'yes' if e.total() <= 48 * GIB else 'no'} | {'yes' if e.total() <= 81559 * MIB else 'no'} |")
    return rows


def notes(results: list[tuple[dict, dict]]) -> list[str]:
    """What the runs show beyond the table, with the figures computed from them."""
    by = {(s["method"], s["grad_ckpt"], s["batch"]): m for s, m in results}
    ckpt = [f"{method} {b}x256 {by[method, True, b]['xla_temp'] / by[method, False, b]['xla_temp']:.2f}"
            for method in ("lora", "qlora") for b in (2, 8) if (method, True, b) in by and (method, False, b) in by]
    peak_ckpt = [by[k, True, b]["peak"] / by[k, False, b]["peak"] for k in ("lora", "qlora") for b in (2, 8)
                 if (k, True, b) in by and (k, False, b) in by]
    act = [m["xla_temp"] / estimate_for(s).activations for s, m in results]
    loader = [(m["rss_loaded"] - m["rss_imports"] - m["rest_bytes"] - m["trainable_bytes"] - m["opt_bytes"]) / MIB for _, m in results]
    compiler = [(m["rss_compiled"] - m["rss_loaded"]) / MIB for _, m in results]
    from jaxlora.cli.memory import GIB, ModelShape, estimate_memory

    big = [estimate_memory(ModelShape.preset("65b"), method="qlora", rank=64, batch=1, seq=512, grad_ckpt=True, offload=True,
                           dtype="bfloat16", platform="gpu", frozen_state_copies=n).total() / GIB for n in (2, 0)]
    creep = [f"{s['method']} {'ckpt' if s['grad_ckpt'] else 'no ckpt'} {s['batch']}x256: +{(m['peak_steps'][-1] - m['peak_steps'][0]) / MIB:,.0f}"
             f" MiB for a frozen state of {m['rest_bytes'] / MIB:,.0f} MiB" for s, m in results if s["batch"] == 2]
    return [
        "## Notes", "",
        "- **The train step no longer copies the frozen model.** An earlier `make_train_step` returned `rest` (base "
        "weights, 4-bit codes and constants) as new buffers each step; driven as the trainer drives it, two extra "
        "copies were alive from step 2 on and the peak crept up after step 1. It now returns only the dropout RNG "
        "state (jaxlora/train/step.py) and the estimator's `frozen_state_copies` is 0. The same 8 runs before the "
        "fix are kept in experiments/results/memory_runs_before_fix.json. On a GPU this is the difference between "
        f"{big[0]:.0f} and {big[1]:.0f} GiB for 65B QLoRA.",
        "- **Gradient checkpointing.** XLA's temporaries with checkpointing over without: " + ", ".join(ckpt)
        + f"; peak RSS with over without: {min(peak_ckpt):.2f}-{max(peak_ckpt):.2f}. Checkpointed layers recompute "
        "behind a data dependency on their gradient (jaxlora/models/recompute.py) and the step is compiled with XLA's "
        "default scheduler; with `nnx.remat` and the memory-optimized scheduler these ratios were 0.96-1.04 and "
        "1.01-1.04 (experiments/results/memory_runs_remat.json) and the estimator counted checkpointed CPU runs as "
        "unchecked.",
        "- **The activation term counts what XLA keeps.** The estimator's per-layer term is the bytes a decoder layer "
        "keeps in XLA's compiled step, to the byte in float32 (experiments/results/memory_activations.md); the "
        "fitted factor stands for the working set at the peak (the last layer's gradients), about the same amount at "
        "both token counts, so XLA's temporaries are " + f"{min(act):.2f}-{max(act):.2f}" + "x the fitted estimate "
        "(column XLA temp vs estimated activations, checkpointed runs included).",
        (f"- **Runtime constant.** RSS after importing jax: {results[0][1]['rss_jax'] / MIB:,.0f} MiB; loading leaves "
        f"{min(loader):,.0f}-{max(loader):,.0f} MiB beyond the arrays, compiling adds {min(compiler):,.0f}-{max(compiler):,.0f} "
        "MiB of compiler heap that the allocator keeps; the fitted constant is all of that plus fragmentation. It is "
        "a CPU figure for a 30-layer model. QLoRA's and checkpointed programs leave a bigger compiler heap, which one "
        "constant cannot follow: the LoRA runs come out below the estimate, the QLoRA runs above it "
        "(tests/cli/test_memory.py derives its tolerance from these spreads)."),
        ("- **GPU rows are not measured** (no GPU for this study): the runtime (1 GiB) is an assumption and the "
        "activation factor is the CPU one. Weights, constants, adapters, gradients and optimizer state are exact. "
        "The update transient assumes the offloaded AdamW moments are all on the device during the update "
        "(`offloaded_update` moves the whole state); streaming them would remove it. Full fine-tuning keeps AdamW "
        "moments in the parameter dtype (bf16 here: 4 bytes/param); the QLoRA paper's >780 GB for 65B is ~12 "
        "bytes/param, i.e. 16-bit weights and gradients with 32-bit optimizer state."),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", type=int, nargs="*", help="indices of RUNS to measure (default: all 8)")
    parser.add_argument("--markdown", type=Path, help="write the tables to this markdown file")
    parser.add_argument("--save-json", type=Path, help="also write the raw measurements to this file")
    parser.add_argument("--from-json", type=Path, help="skip the runs: tabulate measurements saved with --save-json")
    parser.add_argument("--note", default="", help="a line for the markdown (e.g. which code version was measured)")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child), args.steps)), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    from jaxlora.cli.memory import ACTIVATION_FACTOR, RUNTIME_BYTES

    results = []
    if args.from_json:
        results = [(spec, m) for spec, m in json.loads(args.from_json.read_text())]
    for i, spec in enumerate([] if args.from_json else RUNS):
        if args.only is not None and i not in args.only:
            continue
        t0 = time.time()
        m = run_child(spec, args.steps)
        results.append((spec, m))
        print(f"{spec}: peak {m['peak'] / MIB:,.0f} MiB, XLA temp {m['xla_temp'] / MIB:,.0f} MiB ({time.time() - t0:.0f} s)",
              flush=True)
        if args.save_json:
            args.save_json.write_text(json.dumps(results, indent=1))
    rows, worst = calibration_table(results)
    factor, runtime = fit_constants(results)
    text = [(f"Machine: {machine()}; shared with other jobs during the runs. jax {results[0][1].get('jax_version', '?')}, "
            "CPU backend. Each run: a fresh process, SmolLM2-135M-Instruct float32, LoRA r=16 alpha=32 on all linear "
            "layers, AdamW (clipping 1.0), 3 steps on random tokens, the model object kept alive as in the trainer."), "",
            "## SmolLM2-135M on this CPU: measured peak RSS vs estimate", "", *rows, "",
            (f"Calibrated constants (`jaxlora.cli.memory`, CPU): activation factor {ACTIVATION_FACTOR['cpu']:.3f}, runtime "
            f"{RUNTIME_BYTES['cpu'] / MIB:,.0f} MiB; fitted on these runs: {factor:.3f} and {runtime / MIB:,.0f} MiB "
            f"(`fit_constants`). Largest |ratio - 1|: {worst:.3f}."), "",
            "Storage terms against the loaded arrays:", *exact_parts_check(results), "",
            ("## Large models on one GPU (bf16 base and compute, LoRA r=64 on all linear layers, batch 1 x 512 tokens, "
            "gradient checkpointing, AdamW state offloaded to host), GiB"), "",
            *big_model_table(0), "", "For comparison, the earlier train step that returned the frozen state (frozen_state_copies=2):", "",
            *big_model_table(2), "", qlora_65b_verdict(), "", *notes(results)]
    print("\n".join(text))
    if args.markdown:
        source = args.from_json or args.save_json
        header = ["# Training memory: measured on this machine vs `jaxlora.cli.memory`", "",
                  f"Generated {datetime.date.today()} by `python experiments/calibrate_memory.py "
                  + (f"--from-json {source} " if args.from_json else (f"--save-json {source} " if source else ""))
                  + f"--markdown {args.markdown}`"
                  + (f"; the runs were measured by `python experiments/calibrate_memory.py --save-json {source}` "
                     "(raw figures in that file)." if args.from_json else "."), ""] + ([args.note, ""] if args.note else [])
        raw = [] if source else ["", "Raw measurements (bytes):", "", "```json",
                                 json.dumps([{**s, **m} for s, m in results], indent=1), "```", ""]
        args.markdown.write_text("\n".join(header + text + raw) + "\n")


if __name__ == "__main__":
    main()
