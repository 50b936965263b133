"""python experiments/bench_train.py --markdown experiments/results/train.md --plot experiments/results/train.png

Training and generation throughput on CPU, jaxlora against transformers + PEFT (+ bitsandbytes), all
measured in one run on the same machine, each configuration in a fresh subprocess (so that its peak
RSS, ru_maxrss, is its own; the parent imports nothing heavy).

Training: SmolLM2-135M-Instruct, batch 4 x 256 random token ids (seed 0, the same batch every step,
every position in the loss), float32, LoRA r=16 / alpha 32 on q,k,v,o,gate,up,down, dropout 0, AdamW lr
1e-4 (torch's defaults otherwise: betas 0.9/0.999, eps 1e-8, weight decay 0.01; no clipping). jaxlora runs
`jaxlora.train.step.make_train_step` (the trainer's step); torch runs ``loss = model(ids, labels=ids).loss;
loss.backward(); opt.step(); opt.zero_grad()``. tokens/s = 1024 / median step time after the warm-up
steps (jaxlora's first call compiles; its time is reported separately).

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
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ, RANK, ALPHA, LR = 4, 256, 16, 32, 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT, NEW = 256, 64

# name: (framework, method, gradient checkpointing, compute dtype); table order = run order (pairs adjacent).
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
OTHER = ["matmul", "jaxlora generate", "transformers generate"]
# Reference figures measured on this machine before (tok/s, GB); None = not measured then.
REFERENCE = {"PEFT LoRA": (178, 3.9), "PEFT LoRA ckpt": ("124-135", 2.7), "PEFT+bnb QLoRA": (174, 4.0),
             "PEFT+bnb QLoRA ckpt": (100, 3.1), "PEFT+bnb QLoRA bf16": (222, 3.9),
             "PEFT+bnb QLoRA bf16 ckpt": (160, 2.8), "torch full FT": (121, 4.3), "transformers generate": (15.6, 1.0)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def timed(fn, reps: int) -> list[float]:
    """Wall times of ``reps`` calls of ``fn`` (which blocks until its result is ready)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def step_flops(cfg: dict, lora_params: int, method: str, ckpt: bool) -> dict:
    """FLOPs of one training step (formula in the results file): matmul parameters N (decoder
    projections + lm_head), tokens T, attention A = 4*b*heads*s^2*head_dim per layer forward."""
    layer = cfg["hidden_size"] * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * cfg["head_dim"] \
        + 3 * cfg["hidden_size"] * cfg["intermediate_size"]
    n_layers, n_head = cfg["num_hidden_layers"] * layer, cfg["vocab_size"] * cfg["hidden_size"]
    tokens = BATCH * SEQ
    attn_fwd = cfg["num_hidden_layers"] * 4 * BATCH * cfg["num_attention_heads"] * SEQ * SEQ * cfg["head_dim"]
    n = n_layers + n_head
    if method == "full":
        flops = 6 * n * tokens + 3 * attn_fwd
    else:
        flops = 4 * n * tokens + 6 * lora_params * tokens + 3 * attn_fwd
    if ckpt:  # one more forward of the decoder layers (the lm_head is not recomputed)
        flops += 2 * n_layers * tokens + 2 * lora_params * tokens + attn_fwd
    return {"flops": flops, "n_matmul": n, "n_layers": n_layers, "n_head": n_head, "attn_fwd": attn_fwd}


def run_jax_train(name: str, steps: int, warmup: int) -> dict:
    import jax
    from flax import nnx

    from jaxlora.peft import LoraConfig, get_peft_model
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import make_train_step, split_trainable
    from torch_bridge import load_llama
    from torch_bridge.smollm2 import ensure_smollm2
    _, method, ckpt, compute = TRAIN[name]
    path = ensure_smollm2()
    kwargs = {"quantize": "nf4", "double_quant": True} if method == "qlora" else {}
    model = load_llama(path, compute_dtype="bfloat16" if compute == "bf16" else None, **kwargs)
    model.gradient_checkpointing = ckpt
    wrt = nnx.Param if method == "full" else nnx.LoRAParam
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS),
                               rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, trainable, rest = split_trainable(model, wrt)
    trainable_params = sum(int(x.size) for x in jax.tree.leaves(trainable))
    tx = make_optimizer(OptimizerConfig(learning_rate=LR, weight_decay=0.01, max_grad_norm=None,
                                        lr_scheduler_type="constant"), steps + warmup + 1)
    opt_state = tx.init(trainable)
    step = make_train_step(graphdef, tx, wrt=wrt)
    ids = jax.random.randint(jax.random.key(0), (1, BATCH, SEQ), 0, model_config(path)["vocab_size"])
    batch = {"input_ids": ids, "labels": ids}
    state = [trainable, rest, opt_state]
    losses = []

    def one_step():
        state[0], state[1], state[2], metrics = step(*state, batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done

    compile_events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compile_events.append(secs) if event.startswith("/jax/core/compile/") else None)
    first = timed(one_step, 1)[0]  # trace + lower + compile + the first run, as in the trainer
    compile_s = sum(compile_events)
    timed(one_step, warmup)
    times = timed(one_step, steps)
    peak = peak_rss_gb()  # before the extra compilation below
    temp = step.lower(*state, batch).compile().memory_analysis().temp_size_in_bytes
    return {"times": times, "first_call_s": first, "compile_s": compile_s, "loss_first": losses[0],
            "loss_last": losses[-1], "trainable": trainable_params, "xla_temp_gb": temp / 1e9, "peak_rss_gb": peak}


def model_config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg


def run_torch_train(name: str, steps: int, warmup: int) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from torch_bridge.smollm2 import ensure_smollm2
    _, method, ckpt, compute = TRAIN[name]
    path = ensure_smollm2()
    torch.manual_seed(0)
    kwargs = {}
    if method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if compute == "bf16" else torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_config(path)["vocab_size"], (BATCH, SEQ), generator=gen)
    losses = []

    def one_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    first = timed(one_step, 1)[0]
    timed(one_step, warmup)
    times = timed(one_step, steps)
    return {"times": times, "first_call_s": first, "loss_first": losses[0], "loss_last": losses[-1],
            "trainable": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


def run_matmul(reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((2048, 2048), dtype=np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    mm = jax.jit(jnp.matmul)
    flops = 2 * 2048**3
    out = {}
    for label, fn in [("jax", lambda: mm(ja, jb).block_until_ready()), ("torch", lambda: ta @ tb)]:
        timed(fn, 3)
        times = timed(fn, reps)
        out[label] = {"median": flops / statistics.median(times) / 1e9, "best": flops / min(times) / 1e9}
    return out


def run_generate(name: str, reps: int) -> dict:
    import numpy as np

    from torch_bridge.smollm2 import ensure_smollm2
    path = ensure_smollm2()
    prompt = np.random.default_rng(0).integers(0, model_config(path)["vocab_size"], PROMPT).tolist()
    if name.startswith("jaxlora"):
        from jaxlora.train.generate import GenerationConfig, Generator
        from torch_bridge import load_llama
        generator = Generator(load_llama(path))

        def generate(n):
            return generator([prompt], GenerationConfig(max_new_tokens=n))[0]
    else:
        import torch
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])

        def generate(n):
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            return out[0, PROMPT:].tolist()

    result = {}
    for n in (1, NEW + 1):
        start = time.perf_counter()
        tokens = generate(n)
        result[f"first_{n}"] = time.perf_counter() - start
        assert len(tokens) == n, f"{name}: asked for {n} tokens, got {len(tokens)}"
        result[f"times_{n}"] = timed(lambda: generate(n), reps)
        result[f"tokens_{n}"] = tokens
    t1, t65 = (statistics.median(result[f"times_{n}"]) for n in (1, NEW + 1))
    result["decode_tok_s"] = NEW / (t65 - t1)
    result["prefill_s"] = t1
    return result


def run_case(name: str, quick: bool) -> dict:
    sys.path.insert(0, ROOT)
    steps, warmup, reps = (2, 1, 2) if quick else (5, 2, 5)
    start = time.perf_counter()
    if name in TRAIN:
        framework, method, ckpt, _ = TRAIN[name]
        result = (run_jax_train if framework == "jax" else run_torch_train)(name, steps, warmup)
        from torch_bridge.smollm2 import ensure_smollm2
        lora = result["trainable"] if method != "full" else 0
        result.update(step_flops(model_config(ensure_smollm2()), lora, method, ckpt))
    elif name == "matmul":
        result = run_matmul(5 if quick else 15)
    else:
        result = run_generate(name, reps)
    return {"peak_rss_gb": peak_rss_gb(), **result, "wall_s": time.perf_counter() - start}


def machine_info() -> list[str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    with open("/proc/meminfo") as f:
        mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20
    versions = subprocess.run([sys.executable, "-c", (
        "import jax, flax, optax, torch, transformers, peft, bitsandbytes as b; print(f'jax {jax.__version__}, "
        "flax {flax.__version__}, optax {optax.__version__}, torch {torch.__version__} "
        "(threads {torch.get_num_threads()}), transformers {transformers.__version__}, peft {peft.__version__}, "
        "bitsandbytes {b.__version__}')")], capture_output=True, text=True, check=True).stdout.strip()
    return [f"CPU: {cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM ({platform.machine()}, Linux {platform.release()})",
            f"python {platform.python_version()}, {versions}"]


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


MARKER = "<!-- hand-written below: kept when the script rewrites this file -->"
PAIRS = [("LoRA fp32", "jaxlora LoRA", "PEFT LoRA", 1.4, None), ("LoRA fp32 ckpt", "jaxlora LoRA ckpt", "PEFT LoRA ckpt", 1.4, None),
         ("QLoRA fp32", "jaxlora QLoRA", "PEFT+bnb QLoRA", 1.2, 0.6),
         ("QLoRA fp32 ckpt", "jaxlora QLoRA ckpt", "PEFT+bnb QLoRA ckpt", 1.8, 0.6),
         ("QLoRA bf16", "jaxlora QLoRA bf16", "PEFT+bnb QLoRA bf16", 1.0, None),
         ("QLoRA bf16 ckpt", "jaxlora QLoRA bf16 ckpt", "PEFT+bnb QLoRA bf16 ckpt", 1.0, None),
         ("full FT fp32", "jaxlora full FT", "torch full FT", None, None)]


def tok_s(r: dict) -> float:
    return BATCH * SEQ / statistics.median(r["times"])


def write_report(results: dict, *, command, info, load, elapsed, quick, path) -> str:
    mm = results.get("matmul")
    peak = max(mm["jax"]["median"], mm["torch"]["median"]) if mm else None
    lines = ["# Training and generation throughput on CPU: jaxlora vs transformers + PEFT + bitsandbytes", "",
             f"Command: `{command}`", "", "Machine:", "", *[f"- {x}" for x in info],
             f"- load average (1/5/15 min) at the start {load[0]}, at the end {load[1]}; per configuration below", "",
             (f"SmolLM2-135M-Instruct, batch {BATCH} x {SEQ} random tokens, all in the loss; LoRA r={RANK}, alpha={ALPHA} "
              f"on {', '.join(TARGETS)}, dropout 0; AdamW lr {LR}, weight decay 0.01. tok/s = {BATCH * SEQ} / median "
              f"step time over {'2' if quick else '5'} steps after {'1' if quick else '2'} warm-up steps (jaxlora: "
              "after compilation, reported apart). Peak RSS = ru_maxrss of the configuration's own process (jaxlora's "
              "includes XLA compilation). GB = 1e9 bytes."), ""]
    if mm:
        lines += [f"fp32 matmul 2048^3 (median / best of the repetitions): jax {mm['jax']['median']:.0f} / "
                  f"{mm['jax']['best']:.0f} GFLOP/s, torch {mm['torch']['median']:.0f} / {mm['torch']['best']:.0f} "
                  f"GFLOP/s. MFU below = achieved FLOP/s / {peak:.0f} GFLOP/s (the higher median).", ""]
    lines += ["| configuration | tok/s | step s (min-max) | peak RSS GB | GFLOP/step | GFLOP/s | MFU | compile s "
              "| XLA temp GB | loss first -> last | reference tok/s, GB | load |", "|---|" + "---|" * 11]
    for name in TRAIN:
        if name not in results:
            continue
        r = results[name]
        rate = r["flops"] / statistics.median(r["times"]) / 1e9
        ref, jax_only = REFERENCE.get(name), (f"{r['compile_s']:.0f} | {r['xla_temp_gb']:.2f}" if "compile_s" in r else "- | -")
        lines.append(
            f"| {name} | {tok_s(r):.1f} | {statistics.median(r['times']):.2f} ({min(r['times']):.2f}-{max(r['times']):.2f}) "
            f"| {r['peak_rss_gb']:.2f} | {r['flops'] / 1e9:.0f} | {rate:.0f} | {'' if peak is None else f'{100 * rate / peak:.0f}%'} "
            f"| {jax_only} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | {'' if ref is None else f'{ref[0]}, {ref[1]}'} "
            f"| {r['load']} |")
    gens = [n for n in ("jaxlora generate", "transformers generate") if n in results]
    if gens:
        lines += ["", f"Generation, batch 1, {PROMPT}-token prompt, greedy, fp32 (medians; t(1) includes the prefill):", "",
                  "| generator | t(1 new token) s | t(65 new tokens) s | decode tok/s | first call s (1 / 65) | peak RSS GB "
                  "| reference | load |", "|---|---|---|---|---|---|---|---|"]
        for n in gens:
            r = results[n]
            ref = REFERENCE.get(n)
            lines.append(f"| {n} | {statistics.median(r['times_1']):.3f} | {statistics.median(r['times_65']):.3f} | "
                         f"{r['decode_tok_s']:.1f} | {r['first_1']:.1f} / {r['first_65']:.1f} | {r['peak_rss_gb']:.2f} | "
                         f"{'' if ref is None else f'{ref[0]} tok/s, {ref[1]} GB'} | {r['load']} |")
        if len(gens) == 2:
            same = sum(a == b for a, b in zip(*(results[n]["tokens_65"] for n in gens)))
            lines += ["", f"Greedy tokens agree in {same} of {NEW + 1} positions (the first divergence can come "
                          "from float32 rounding between two near-equal logits)."]
    lines += ["", "## Targets (like with like, both measured in this run)", ""]
    for label, ours, theirs, speed, memory in PAIRS:
        if ours not in results or theirs not in results or speed is None:
            continue
        ratio = tok_s(results[ours]) / tok_s(results[theirs])
        text = f"- {label}: tok/s {ratio:.2f}x ({'met' if ratio >= speed else 'NOT met'}; target >= {speed}x)"
        if memory is not None:
            mem = results[ours]["peak_rss_gb"] / results[theirs]["peak_rss_gb"]
            text += f"; peak RSS {mem:.2f}x ({'met' if mem <= memory else 'NOT met'}; target <= {memory}x)"
        lines.append(text)
    if len(gens) == 2:
        ratio = results[gens[0]]["decode_tok_s"] / results[gens[1]]["decode_tok_s"]
        lines.append(f"- decode: {ratio:.2f}x transformers ({'met' if ratio >= 3 else 'NOT met'}; target >= 3x)")
    if "jaxlora full FT" in results and "torch full FT" in results:
        ratio = tok_s(results["jaxlora full FT"]) / tok_s(results["torch full FT"])
        lines.append(f"- full fine-tuning (no target): {ratio:.2f}x torch")
    lines += ["", "## FLOPs per step", "",
              ("T = tokens per step, N = matmul parameters (decoder projections + lm_head; SmolLM2: "
               f"{_first(results, 'n_layers') / 1e6:.1f} M + {_first(results, 'n_head') / 1e6:.1f} M), L = LoRA "
               "parameters, A = attention forward = layers * 4 * batch * heads * seq^2 * head_dim (score and value "
               "matmuls over the full square, causal masking not subtracted). Frozen base: 4 N T (forward 2N T + input "
               "gradient 2N T) + 6 L T + 3 A (forward + two backward matmuls each); full fine-tuning: 6 N T + 3 A. "
               "Gradient checkpointing adds one forward of the decoder layers: 2 (N - lm_head) T + 2 L T + A."),
              "", f"Benchmark wall time: {elapsed:.0f} s."]
    text = "\n".join(lines) + "\n"
    if path:
        kept = ""
        if os.path.exists(path):
            with open(path) as f:
                old = f.read()
            kept = old[old.index(MARKER):] if MARKER in old else ""
        with open(path, "w") as f:
            f.write(text + "\n" + (kept or MARKER + "\n"))
    return text


def _first(results: dict, key: str) -> float:
    return next((r[key] for r in results.values() if key in r), float("nan"))


def write_plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = [p for p in PAIRS if p[1] in results or p[2] in results]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, title in [(axes[0], "tok", "training tokens/s (higher is better)"),
                           (axes[1], "rss", "peak RSS, GB (lower is better)")]:
        for i, (label, ours, theirs, _, _) in enumerate(pairs):
            for j, (name, color) in enumerate([(ours, "tab:blue"), (theirs, "tab:orange")]):
                if name in results:
                    value = tok_s(results[name]) if key == "tok" else results[name]["peak_rss_gb"]
                    ax.bar(i + (j - 0.5) * 0.38, value, 0.38, color=color, label=["jaxlora", "torch"][j] if i == 0 else None)
                    ax.text(i + (j - 0.5) * 0.38, value, f"{value:.0f}" if key == "tok" else f"{value:.1f}",
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(pairs)), [p[0] for p in pairs], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M, batch {BATCH}x{SEQ}, CPU ({os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="(internal) run one configuration in this process, print its JSON")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this configuration (repeatable; names as in the table, e.g. 'PEFT LoRA')")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer steps and repetitions")
    parser.add_argument("--markdown", metavar="PATH", help="write the results to this markdown file")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (tokens/s and peak RSS) to this PNG")
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.quick)), flush=True)
        return
    names = args.only or [*TRAIN, *OTHER]
    unknown = [n for n in names if n not in TRAIN and n not in OTHER]
    if unknown:
        sys.exit(f"unknown configuration(s) {unknown}; choose from {[*TRAIN, *OTHER]}")
    command = "python " + " ".join(sys.argv)
    info, load_start, start, results = machine_info(), load_average(), time.perf_counter(), {}
    print("\n".join(info), file=sys.stderr)
    for name in names:
        env = dict(os.environ)
        cmd = [sys.executable, os.path.abspath(__file__), "--case", name] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"configuration {name!r} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        results[name] = {**json.loads(line[len("RESULT "):]), "load": load_average()}
        r = results[name]
        detail = f"{BATCH * SEQ / statistics.median(r['times']):.1f} tok/s" if "times" in r else \
            f"{r['decode_tok_s']:.1f} decode tok/s" if "decode_tok_s" in r else json.dumps(r)
        print(f"{name}: {detail}, peak RSS {r['peak_rss_gb']:.2f} GB, {r['wall_s']:.0f} s, load {r['load']}",
              file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    text = write_report(results, command=command, info=info, load=(load_start, load_average()), elapsed=elapsed,
                        quick=args.quick, path=args.markdown)
    print(text)
    if args.plot:
        write_plot(results, args.plot)


if __name__ == "__main__":
    main()
