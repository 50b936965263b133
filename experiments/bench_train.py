"""python experiments/bench_train.py --markdown experiments/results/train.md --plot experiments/results/train.png

Training and generation throughput, jaxlora against transformers + PEFT (+ bitsandbytes), all measured in
one run on the same machine, each configuration in a fresh subprocess (so that its peak RSS, ru_maxrss,
and on a GPU its peak device memory, is its own; the parent imports nothing heavy).

Where: ``--device cpu`` (default) or ``--device cuda`` (torch on "cuda", jax on its default backend,
which must then be "gpu"). What: SmolLM2-135M-Instruct (`torch_bridge.smollm2.ensure_smollm2`), or the
Hugging Face Llama checkpoint directory given with ``--model DIR`` (safetensors; no tokenizer needed).
``--train-only`` leaves out the generation cases. On cuda the run keeps to a time budget (270 s; a
configuration gets at most 120 s), runs the matmul ceilings and the main pairs first, does not wait for a
quiet machine, and takes 20 steps after 5 warm-up steps. The cases themselves are in bench_train_cases.py;
without bitsandbytes the PEFT+bnb cases are reported as skipped.

Training: batch 4 x 256 random token ids (seed 0, the same batch every step, every position in the loss),
float32, LoRA r=16 / alpha 32 on q,k,v,o,gate,up,down, dropout 0, AdamW lr 1e-4 (torch's defaults
otherwise: betas 0.9/0.999, eps 1e-8, weight decay 0.01; no clipping). jaxlora runs
`jaxlora.train.step.make_train_step` (the trainer's step); torch runs ``loss = model(ids, labels=ids).loss;
loss.backward(); opt.step(); opt.zero_grad()``. tokens/s = 1024 / median step time after the warm-up
steps (jaxlora's first call compiles; its time is reported separately). On CUDA float32 matmuls are true
float32 in both frameworks (torch's default; jax's GPU default would be TF32) unless ``--tf32``.

Generation: batch 1, 256-token random prompt, greedy, float32, no EOS stop. Decode rate = 64 / (t(65 new
tokens) - t(1 new token)), medians of repeated calls after a warm-up call: jaxlora's `Generator` against
transformers' ``generate`` (with ``min_new_tokens`` so that it never stops early).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ, RANK, ALPHA, LR = 4, 256, 16, 32, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT, NEW = 256, 64

# name: (framework, method, gradient checkpointing, compute dtype); table order = CPU run order (pairs adjacent).
TRAIN = {
    "jaxlora LoRA": ("jax", "lora", False, "fp32"), "PEFT LoRA": ("torch", "lora", False, "fp32"),
    "jaxlora LoRA ckpt": ("jax", "lora", True, "fp32"), "PEFT LoRA ckpt": ("torch", "lora", True, "fp32"),
    "jaxlora QLoRA": ("jax", "qlora", False, "fp32"), "PEFT+bnb QLoRA": ("torch", "qlora", False, "fp32"),
    "jaxlora QLoRA ckpt": ("jax", "qlora", True, "fp32"), "PEFT+bnb QLoRA ckpt": ("torch", "qlora", True, "fp32"),
    "jaxlora QLoRA bf16": ("jax", "qlora", False, "bf16"), "PEFT+bnb QLoRA bf16": ("torch", "qlora", False, "bf16"),
    "jaxlora QLoRA bf16 ckpt": ("jax", "qlora", True, "bf16"),
    "PEFT+bnb QLoRA bf16 ckpt": ("torch", "qlora", True, "bf16"),
    "jaxlora full FT": ("jax", "full", False, "fp32"), "torch full FT": ("torch", "full", False, "fp32"),
}
GENERATE = ["jaxlora generate", "transformers generate"]
OTHER = ["matmul", *GENERATE]
# On CUDA the run has a time budget: the main pairs first, so that a cut-off run still compares like with like.
CUDA_ORDER = ["matmul", *(n for pair in ["LoRA", "QLoRA", "QLoRA bf16", "LoRA ckpt", "QLoRA ckpt", "QLoRA bf16 ckpt"]
                          for n in (f"jaxlora {pair}", f"{'PEFT+bnb' if 'QLoRA' in pair else 'PEFT'} {pair}")),
              "jaxlora full FT", "torch full FT", *GENERATE]
# Per device: (steps, warm-up steps, generation repetitions) for (full run, --quick); matmul repetitions.
STEPS = {"cpu": ((5, 2, 5), (2, 1, 2)), "cuda": ((20, 5, 10), (5, 2, 3))}
MATMUL = {"cpu": (2048, 15, 5), "cuda": (8192, 30, 10)}  # (size, reps, --quick reps)
# Defaults that differ per device: seconds a configuration may take, total time budget, waiting for a quiet machine.
DEVICE_DEFAULTS = {"cpu": {"case_timeout": 1800, "time_budget": None, "max_wait": 300, "retries": 2},
                   "cuda": {"case_timeout": 120, "time_budget": 270, "max_wait": 0, "retries": 0}}
PROBE_TIMEOUT = 120  # seconds for the child process that reports versions, the GPU and bitsandbytes
MIN_CASE_S = 20  # a configuration is not started with less time than this left in the budget
# Reference figures measured on the CPU development machine before (tok/s, GB); None = not measured then.
REFERENCE = {"PEFT LoRA": (178, 3.9), "PEFT LoRA ckpt": ("124-135", 2.7), "PEFT+bnb QLoRA": (174, 4.0),
             "PEFT+bnb QLoRA ckpt": (100, 3.1), "PEFT+bnb QLoRA bf16": (222, 3.9),
             "PEFT+bnb QLoRA bf16 ckpt": (160, 2.8), "torch full FT": (121, 4.3), "transformers generate": (15.6, 1.0)}


def model_config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg


PROBE = """
import json, jax, flax, optax, torch, transformers, peft
out = {"versions": f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, torch {torch.__version__} "
       f"(threads {torch.get_num_threads()}), transformers {transformers.__version__}, peft {peft.__version__}",
       "jax_backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind,
       "torch_cuda": torch.cuda.is_available(), "torch_version": torch.__version__}
if out["torch_cuda"]:
    p = torch.cuda.get_device_properties(0)
    out["gpu"] = f"{p.name}, {p.total_memory / 2**30:.1f} GiB"
try:
    import bitsandbytes
    out["bnb"] = bitsandbytes.__version__
except ImportError as err:
    out["bnb"], out["bnb_error"] = None, f"{type(err).__name__}: {err}"
print("PROBE " + json.dumps(out))
"""


def probe_environment(opts) -> dict:
    """Library versions, the GPU, whether bitsandbytes imports: one child process (the parent stays light)."""
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=child_env(opts),
                              timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        sys.exit(f"bench_train.py: the environment check (importing jax, torch, ...) took over {PROBE_TIMEOUT} s")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE ")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"bench_train.py: the environment check failed (rc {proc.returncode}): {tail}")
    probe = json.loads(line[len("PROBE "):])
    if opts.device == "cuda" and not (probe["torch_cuda"] and probe["jax_backend"] == "gpu"):
        sys.exit(f"bench_train.py: --device cuda needs a GPU for torch and jax; here torch.cuda.is_available() is "
                 f"{probe['torch_cuda']} (torch {probe['torch_version']}) and jax.default_backend() is "
                 f"{probe['jax_backend']!r}")
    return probe


def machine_info(probe: dict) -> list[str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    with open("/proc/meminfo") as f:
        mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20
    bnb = f"bitsandbytes {probe['bnb']}" if probe["bnb"] else f"bitsandbytes not installed ({probe['bnb_error']})"
    lines = [f"CPU: {cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM ({platform.machine()}, Linux {platform.release()})",
             f"python {platform.python_version()}, {probe['versions']}, {bnb}"]
    if "gpu" in probe:
        lines.insert(1, f"GPU: {probe['gpu']} (torch); jax backend {probe['jax_backend']}, {probe['jax_device']}")
    return lines


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine (all cores) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_others: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use at most max_others cores over 5 s; seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        busy = busy_seconds()
        time.sleep(5)
        if (busy_seconds() - busy) / 5 <= max_others:
            break
    return time.perf_counter() - start


def child_env(opts) -> dict:
    env = dict(os.environ)
    if opts.device == "cpu":  # on a machine with a GPU, jax would otherwise take it
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_configuration(name: str, opts, timeout: float) -> dict:
    """Run one configuration in a fresh process; adds the cores other processes used meanwhile.
    A failure or timeout is returned as {"error": ...} (the other configurations still run)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--device", opts.device] \
        + (["--model", opts.model] if opts.model else []) + (["--quick"] if opts.quick else []) \
        + (["--tf32"] if opts.tf32 else [])
    busy, own, start = busy_seconds(), children_seconds(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, env=child_env(opts))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(f"configuration {name!r} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr)
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"failed (rc {proc.returncode}): {tail[-300:]}"}
    others = max(0.0, (busy_seconds() - busy) - (children_seconds() - own)) / wall
    return {**json.loads(line[len("RESULT "):]), "others_cores": others}


class Interrupted(Exception):
    pass


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="(internal) run one configuration in this process, print its JSON")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this configuration (repeatable; names as in the table, e.g. 'PEFT LoRA')")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu (default) or cuda: torch on the GPU, jax on its default backend (must be gpu)")
    parser.add_argument("--model", metavar="DIR", help="Hugging Face Llama checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--train-only", action="store_true", help="leave out the generation cases")
    parser.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 for float32 matmuls in both frameworks")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer steps and repetitions")
    parser.add_argument("--markdown", metavar="PATH", help="write the results to this markdown file")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (tokens/s and peak memory) to this PNG")
    parser.add_argument("--max-others", type=float, default=0.25,
                        help="rerun a configuration when other processes used more cores than this meanwhile (default 0.25)")
    parser.add_argument("--retries", type=int, help="reruns per configuration (default: cpu 2, cuda 0)")
    parser.add_argument("--max-wait", type=float,
                        help="seconds to wait for a quiet machine before each run (default: cpu 300, cuda 0)")
    parser.add_argument("--case-timeout", type=float, help="seconds one configuration may take (default: cpu 1800, cuda 120)")
    parser.add_argument("--time-budget", type=float,
                        help="seconds for the whole run; configurations that no longer fit are reported as not run "
                             "(default: cpu none, cuda 270)")
    args = parser.parse_args()
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.case:
        from bench_train_cases import run_case
        print("RESULT " + json.dumps(run_case(args.case, args)), flush=True)
        return
    if args.model:
        args.model = os.path.abspath(args.model)
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            sys.exit(f"bench_train.py: --model {args.model}: no config.json there (expected a Hugging Face checkpoint directory)")
    default = CUDA_ORDER if args.device == "cuda" else [*TRAIN, *OTHER]
    names = [n for n in args.only or default if not (args.train_only and n in GENERATE)]
    unknown = [n for n in names if n not in TRAIN and n not in OTHER]
    if unknown:
        sys.exit(f"unknown configuration(s) {unknown}; choose from {[*TRAIN, *OTHER]}")
    command = "python " + " ".join(sys.argv)
    start = time.perf_counter()
    probe = probe_environment(args)
    info, load_start, results = machine_info(probe), load_average(), {}
    print("\n".join(info), file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # e.g. from `timeout`: the running child is killed, the report written
    waited, stopped = 0.0, None
    for name in names:
        if stopped:
            results[name] = {"skipped": f"not run: {stopped}"}
            continue
        if name in TRAIN and TRAIN[name][:2] == ("torch", "qlora") and not probe["bnb"]:
            results[name] = {"skipped": f"bitsandbytes not installed ({probe['bnb_error']})"}
            print(f"{name}: skipped, {results[name]['skipped']}", file=sys.stderr, flush=True)
            continue
        result, attempts = None, 0
        try:
            for attempt in range(args.retries + 1):
                waited += wait_for_quiet(args.max_others, args.max_wait)
                timeout = args.case_timeout
                if args.time_budget is not None:
                    left = args.time_budget - (time.perf_counter() - start)
                    if left < MIN_CASE_S:
                        stopped = f"the time budget ({args.time_budget:.0f} s) was spent"
                        break
                    timeout = min(timeout, left)
                result, attempts = run_configuration(name, args, timeout), attempt + 1
                if "error" in result or "skipped" in result or result["others_cores"] <= args.max_others \
                        or attempt == args.retries:
                    break
                print(f"{name}: other processes used {result['others_cores']:.2f} cores meanwhile; again", file=sys.stderr)
        except Interrupted as err:
            stopped = f"the run was stopped ({err})"
        if result is None:  # a rerun cut short keeps the run before it
            results[name] = {"skipped": f"not run: {stopped}"}
            continue
        results[name] = r = {**result, "load": load_average(), "attempts": attempts}
        detail = r.get("error") or r.get("skipped") or \
            (f"{BATCH * SEQ / statistics.median(r['times']):.1f} tok/s" if "times" in r else
             f"{r['decode_tok_s']:.1f} decode tok/s" if "decode_tok_s" in r else json.dumps(r))
        if "peak_rss_gb" in r:
            gpu = f", GPU peak {r['gpu_peak_gb']:.2f} GB" if r.get("gpu_peak_gb") is not None else ""
            detail += f", peak RSS {r['peak_rss_gb']:.2f} GB{gpu}, {r['wall_s']:.0f} s, others " \
                      f"{r['others_cores']:.2f} cores, load {r['load']}"
        print(f"{name}: {detail}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    elapsed = time.perf_counter() - start
    from bench_train_report import write_plot, write_report  # the tables, targets and plot
    steps, warmup, _ = STEPS[args.device][args.quick]
    setup = {"device": args.device, "model": args.model, "model_config": model_config(args.model) if args.model else None,
             "steps": steps, "warmup": warmup, "tf32": args.tf32, "max_wait": args.max_wait, "retries": args.retries,
             "max_others": args.max_others, "matmul_size": MATMUL[args.device][0]}
    text = write_report(results, command=command, info=info, load=(load_start, load_average()), elapsed=elapsed,
                        waited=waited, setup=setup, path=args.markdown)
    print(text)
    if args.plot:
        write_plot(results, args.plot, setup)
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
