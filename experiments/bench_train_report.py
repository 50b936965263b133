"""Tables, targets and plot of experiments/bench_train.py (run that script; this module only formats)."""

from __future__ import annotations

import os
import statistics

from bench_train import ALPHA, BATCH, LR, NEW, PROMPT, RANK, REFERENCE, SEQ, TARGETS, TRAIN

MARKER = "<!-- hand-written below: kept when the script rewrites this file -->"
PAIRS = [("LoRA fp32", "jaxlora LoRA", "PEFT LoRA", 1.4, None), ("LoRA fp32 ckpt", "jaxlora LoRA ckpt", "PEFT LoRA ckpt", 1.4, None),
         ("QLoRA fp32", "jaxlora QLoRA", "PEFT+bnb QLoRA", 1.2, 0.6),
         ("QLoRA fp32 ckpt", "jaxlora QLoRA ckpt", "PEFT+bnb QLoRA ckpt", 1.8, 0.6),
         ("QLoRA bf16", "jaxlora QLoRA bf16", "PEFT+bnb QLoRA bf16", 1.0, None),
         ("QLoRA bf16 ckpt", "jaxlora QLoRA bf16 ckpt", "PEFT+bnb QLoRA bf16 ckpt", 1.0, None),
         ("full FT fp32", "jaxlora full FT", "torch full FT", None, None)]


def tok_s(r: dict) -> float:
    return BATCH * SEQ / statistics.median(r["times"])


def write_report(results: dict, *, command, info, load, elapsed, waited, quick, path) -> str:
    mm = results.get("matmul")
    peak = max(mm["jax"]["median"], mm["torch"]["median"]) if mm else None
    lines = ["# Training and generation throughput on CPU: jaxlora vs transformers + PEFT + bitsandbytes", "",
             f"Command: `{command}`", "", "Machine:", "", *[f"- {x}" for x in info],
             f"- load average (1/5/15 min) at the start {load[0]}, at the end {load[1]}", "",
             ("The machine is shared: before each configuration the script waits for other processes to use at most "
              "0.25 cores (5 s sample), and reruns a configuration (up to twice) when they used more during it. "
              "Column 'others' = cores used by other processes during the configuration's run (its load average "
              "after it in brackets). torch's OpenMP threads are hit much harder by such load than XLA's "
              "(measured 10x slower steps at load ~4)."), "",
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
              "| XLA temp GB | loss first -> last | reference tok/s, GB | others (load) |", "|---|" + "---|" * 11]
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
            f"| {r['others_cores']:.2f} ({r['load']}) |")
    gens = [n for n in ("jaxlora generate", "transformers generate") if n in results]
    if gens:
        lines += ["", f"Generation, batch 1, {PROMPT}-token prompt, greedy, fp32 (medians; t(1) includes the prefill):", "",
                  "| generator | t(1 new token) s | t(65 new tokens) s | decode tok/s | first call s (1 / 65) | peak RSS GB "
                  "| reference | others (load) |", "|---|---|---|---|---|---|---|---|"]
        for n in gens:
            r = results[n]
            ref = REFERENCE.get(n)
            lines.append(f"| {n} | {statistics.median(r['times_1']):.3f} | {statistics.median(r['times_65']):.3f} | "
                         f"{r['decode_tok_s']:.1f} | {r['first_1']:.1f} / {r['first_65']:.1f} | {r['peak_rss_gb']:.2f} | "
                         f"{'' if ref is None else f'{ref[0]} tok/s, {ref[1]} GB'} | {r['others_cores']:.2f} ({r['load']}) |")
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
              "", f"Benchmark wall time: {elapsed:.0f} s, of which {waited:.0f} s waiting for a quiet machine."]
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
