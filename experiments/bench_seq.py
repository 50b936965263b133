"""python experiments/bench_seq.py --json experiments/results/train_seq.json --markdown experiments/results/train_seq.md --plot experiments/results/train_seq.png

Training throughput and peak memory against sequence length, jaxlora against transformers + PEFT (+
bitsandbytes; torch's default SDPA attention), both measured in one run on the same machine: for each
length the jaxlora configuration and its PEFT counterpart run back to back, each in a fresh process (its
peak RSS, ru_maxrss, is its own). Lengths: 4 x 256, then batch 1 x 512 ... 8192 tokens; LoRA and QLoRA
(NF4, double quantization), with and without gradient checkpointing; float32; LoRA r=16 / alpha 32 on
q,k,v,o,gate,up,down, AdamW (the cases of bench_train_cases.py). tokens/s = tokens per step / median
step time after the warm-up steps.

A process whose resident memory passes ``--mem-limit-gb`` (default 20 GB of this machine's 24) is killed
and reported as out of memory, at the length it reached; so is one that fails with an allocation error.
``--longest`` instead searches, for QLoRA with checkpointing, the longest sequence each side trains one
step on within the memory limit (doubling from ``--longest-start``, 2048; a length that passes the time
limit is reported as such, not as out of memory). ``--json`` keeps the rows: several invocations (some
lengths, some configurations, the search) add to one report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import ROOT, child_env, load_average, machine_info, probe_environment  # noqa: E402

SHAPES = [(4, 256), (1, 512), (1, 1024), (1, 2048), (1, 4096), (1, 8192)]
CONFIGS = [("lora", True), ("qlora", True), ("lora", False), ("qlora", False)]
OOM_MARKERS = ("out of memory", "RESOURCE_EXHAUSTED", "MemoryError", "Cannot allocate memory", "std::bad_alloc")


def label(framework: str, method: str, ckpt: bool) -> str:
    side = "jaxlora" if framework == "jax" else ("PEFT+bnb" if method == "qlora" else "PEFT")
    return f"{side} {'QLoRA' if method == 'qlora' else 'LoRA'}{' ckpt' if ckpt else ''}"


def run_child(case: dict) -> dict:
    """In the child process: one configuration, as bench_train_cases measures it."""
    sys.path.insert(0, ROOT)
    from bench_train_cases import peak_rss_gb, run_jax_train, run_torch_train
    opts = argparse.Namespace(device="cpu", model=case["model"], tf32=False, quick=False)
    spec = (case["framework"], case["method"], case["ckpt"], "fp32")
    shape = (case["batch"], case["seq"])
    name = label(case["framework"], case["method"], case["ckpt"])
    if case["framework"] == "jax":
        result = run_jax_train(name, opts, case["steps"], case["warmup"], spec=spec, shape=shape, xla_temp=False)
    else:
        result = run_torch_train(name, opts, case["steps"], case["warmup"], spec=spec, shape=shape)
    return {"peak_rss_gb": peak_rss_gb(), **result}


def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024 / 1e9
    except (OSError, StopIteration):
        return 0.0


def run_case(case: dict, mem_limit_gb: float, timeout: float) -> dict:
    """Run one configuration in a fresh process, killing it past the memory or time limit."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    start, sampled = time.perf_counter(), 0.0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(argparse.Namespace(device="cpu")))
    outcome = None
    while proc.poll() is None:
        sampled = max(sampled, _rss_gb(proc.pid))
        if sampled > mem_limit_gb:
            outcome = {"oom": f"killed at {sampled:.1f} GB resident (limit {mem_limit_gb:g} GB)"}
        elif time.perf_counter() - start > timeout:
            outcome = {"timeout": f"killed after {timeout:.0f} s"}
        if outcome:
            proc.kill()
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if outcome:
        return {**outcome, "wall_s": wall, "sampled_rss_gb": sampled}
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1][-300:]
        if proc.returncode in (-9, 137) or any(m in stderr for m in OOM_MARKERS):
            return {"oom": f"failed allocating (rc {proc.returncode}): {tail}", "wall_s": wall, "sampled_rss_gb": sampled}
        print(stderr[-4000:], file=sys.stderr)
        return {"error": f"failed (rc {proc.returncode}): {tail}", "wall_s": wall}
    return {**json.loads(line[len("RESULT "):]), "wall_s": wall, "sampled_rss_gb": sampled, "load": load_average()}


def tokens_per_s(r: dict, batch: int, seq: int) -> float | None:
    return batch * seq / statistics.median(r["times"]) if "times" in r else None


def describe(r: dict, batch: int, seq: int) -> str:
    if "times" in r:
        return f"{tokens_per_s(r, batch, seq):.1f} tok/s, peak RSS {r['peak_rss_gb']:.2f} GB"
    return r.get("oom") or r.get("timeout") or r.get("error")


def sweep(opts, model: str) -> list[dict]:
    rows = []
    for batch, seq in opts.shapes:
        for method, ckpt in opts.configs:
            for framework in ("jax", "torch"):
                steps, warmup = (2, 1) if batch * seq >= 4096 else (3, 1)
                case = {"framework": framework, "method": method, "ckpt": ckpt, "batch": batch, "seq": seq,
                        "steps": steps, "warmup": warmup, "model": model}
                r = run_case(case, opts.mem_limit_gb, opts.case_timeout)
                rows.append({**case, "result": r})
                print(f"{batch}x{seq} {label(framework, method, ckpt)}: {describe(r, batch, seq)} ({r['wall_s']:.0f} s)",
                      file=sys.stderr, flush=True)
    return rows


def longest(opts, model: str) -> list[dict]:
    rows = []
    for framework in opts.longest_sides.split(","):
        seq = opts.longest_start
        while seq <= opts.longest_max:
            case = {"framework": framework, "method": "qlora", "ckpt": True, "batch": 1, "seq": seq,
                    "steps": 1, "warmup": 0, "model": model}
            r = run_case(case, opts.mem_limit_gb, opts.case_timeout)
            rows.append({**case, "result": r})
            print(f"longest, {label(framework, 'qlora', True)} 1x{seq}: {describe(r, 1, seq)} ({r['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
            if "times" not in r:
                break
            seq *= 2
    return rows


def report(rows, longest_rows, *, runs, info, opts) -> str:
    lines = ["# Training against sequence length: jaxlora vs transformers + PEFT (SDPA attention)", "",
             "Machine: " + "; ".join(info), "", f"Memory limit per process: {opts.mem_limit_gb:g} GB resident. "
             "Load average (1, 5, 15 min) at the start and end of each command (above 0.2 means other processes "
             "shared the machine):", ""]
    lines += [f"- `{run['command']}`: {run['elapsed_s']:.0f} s; load {run['load'][0]} -> {run['load'][1]}" for run in runs]
    lines += ["",
             "SmolLM2-135M-Instruct, float32, random tokens all in the loss, LoRA r=16 / alpha 32 on all 7 "
             "projections, AdamW; tokens/s = tokens per step / median step time (2-3 steps after 1 warm-up step).", ""]
    if rows:
        lines += ["| tokens | configuration | jaxlora tok/s | PEFT tok/s | speed ratio | jaxlora peak RSS GB | "
                  "PEFT peak RSS GB | memory ratio | jaxlora first call s |", "|---|---|---|---|---|---|---|---|---|"]
        for jax_row, torch_row in zip(rows[::2], rows[1::2], strict=True):
            b, s = jax_row["batch"], jax_row["seq"]
            jr, tr = jax_row["result"], torch_row["result"]
            jt, tt = tokens_per_s(jr, b, s), tokens_per_s(tr, b, s)
            both = jt is not None and tt is not None
            cells = [f"{b} x {s}", label("jax", jax_row["method"], jax_row["ckpt"]).replace("jaxlora ", ""),
                     f"{jt:.1f}" if jt else describe(jr, b, s), f"{tt:.1f}" if tt else describe(tr, b, s),
                     f"{jt / tt:.2f}x" if both else "-",
                     f"{jr['peak_rss_gb']:.2f}" if jt else "-", f"{tr['peak_rss_gb']:.2f}" if tt else "-",
                     f"{jr['peak_rss_gb'] / tr['peak_rss_gb']:.2f}x" if both else "-",
                     f"{jr['first_call_s']:.0f}" if jt else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    if longest_rows:
        lines += ["", "Longest sequence trained (QLoRA, checkpointing, batch 1, one step):", "",
                  "| side | tokens | outcome |", "|---|---|---|"]
        for row in longest_rows:
            r = row["result"]
            outcome = (f"trained: {r['times'][0]:.0f} s/step, peak RSS {r['peak_rss_gb']:.2f} GB" if "times" in r
                       else describe(r, 1, row["seq"]))
            lines.append(f"| {'jaxlora' if row['framework'] == 'jax' else 'PEFT+bnb'} | {row['seq']} | {outcome} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted({label(r["framework"], r["method"], r["ckpt"]) for r in rows})
    for name in names:
        pts = [(r["seq"], tokens_per_s(r["result"], r["batch"], r["seq"]), r["result"].get("peak_rss_gb"))
               for r in rows if label(r["framework"], r["method"], r["ckpt"]) == name and "times" in r["result"]]
        if not pts:
            continue
        style = "-" if name.startswith("jaxlora") else "--"
        ax_speed.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        ax_mem.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=name)
    for ax, title in ((ax_speed, "tokens/s"), (ax_mem, "peak RSS (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (batch 4 at 256, then batch 1)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="(internal) run one configuration (JSON) in this process")
    parser.add_argument("--model", metavar="DIR", help="Llama checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--seq", type=int, action="append", help="batch-1 sequence length (repeatable; 256 = 4 x 256; "
                        "default 256 512 1024 2048 4096 8192)")
    parser.add_argument("--configs", default="lora-ckpt,qlora-ckpt,lora,qlora",
                        help="comma-separated among lora-ckpt, qlora-ckpt, lora, qlora (default: all four)")
    parser.add_argument("--mem-limit-gb", type=float, default=20.0)
    parser.add_argument("--case-timeout", type=float, default=3600.0, help="seconds one configuration may take")
    parser.add_argument("--longest", action="store_true", help="search the longest trainable sequence instead")
    parser.add_argument("--longest-start", type=int, default=2048, help="the first length the search tries")
    parser.add_argument("--longest-max", type=int, default=65536)
    parser.add_argument("--longest-sides", default="jax,torch", choices=["jax,torch", "jax", "torch"],
                        help="whose longest sequence to search")
    parser.add_argument("--json", metavar="PATH", help="rows of earlier runs to report with this one's; this run's "
                        "rows are added to it")
    parser.add_argument("--markdown", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    opts = parser.parse_args()
    if opts.case:
        print("RESULT " + json.dumps(run_child(json.loads(opts.case))), flush=True)
        return
    opts.shapes = [(4, 256) if s == 256 else (1, s) for s in opts.seq] if opts.seq else SHAPES
    known = {"lora-ckpt": ("lora", True), "qlora-ckpt": ("qlora", True), "lora": ("lora", False), "qlora": ("qlora", False)}
    try:
        opts.configs = [known[c] for c in opts.configs.split(",")]
    except KeyError as err:
        sys.exit(f"bench_seq.py: unknown configuration {err}; choose from {sorted(known)}")
    if opts.model is None:
        sys.path.insert(0, ROOT)
        from torch_bridge.smollm2 import ensure_smollm2
        opts.model = str(ensure_smollm2())
    command = "python " + " ".join(sys.argv)
    info = machine_info(probe_environment(argparse.Namespace(device="cpu")))
    print("\n".join(info), file=sys.stderr)
    start, load_start = time.perf_counter(), load_average()
    rows = [] if opts.longest else sweep(opts, opts.model)
    longest_rows = longest(opts, opts.model) if opts.longest else []
    runs = [{"command": command, "load": (load_start, load_average()), "elapsed_s": time.perf_counter() - start}]
    if opts.json:  # earlier runs' rows first: one report over several invocations on the same machine
        from jaxlora.atomic import atomic_write
        earlier = json.loads(Path(opts.json).read_text()) if Path(opts.json).exists() else {}
        rows, longest_rows = earlier.get("rows", []) + rows, earlier.get("longest", []) + longest_rows
        runs = earlier.get("runs", []) + runs
        atomic_write(opts.json, json.dumps({"rows": rows, "longest": longest_rows, "runs": runs}, indent=1))
    text = report(rows, longest_rows, runs=runs, info=info, opts=opts)
    print(text)
    if opts.markdown:
        from jaxlora.atomic import atomic_write
        atomic_write(opts.markdown, text)
    if opts.plot and rows:
        plot(rows, opts.plot)


if __name__ == "__main__":
    main()
