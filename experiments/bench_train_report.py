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
GENERATORS = ("jaxlora generate", "transformers generate")


def tok_s(r: dict) -> float:
    return BATCH * SEQ / statistics.median(r["times"])


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _memory(r: dict, cuda: bool) -> float:
    """The memory a target compares: GPU peak on CUDA (host RSS where it is missing), else peak RSS."""
    return r["gpu_peak_gb"] if cuda and r.get("gpu_peak_gb") is not None else r["peak_rss_gb"]


def _ceilings(mm: dict | None, cuda: bool) -> dict:
    """Matmul ceiling (GFLOP/s) per compute dtype: the higher of the two frameworks' medians."""
    if not mm:
        return {}
    peaks = {"fp32": max(mm["jax"]["median"], mm["torch"]["median"])}
    if cuda and "jax_bf16" in mm:
        peaks["bf16"] = max(mm["jax_bf16"]["median"], mm["torch_bf16"]["median"])
    return peaks


def _model_text(setup: dict) -> tuple[str, str]:
    """(description for the setup paragraph, short name for the FLOPs section)."""
    if not setup.get("model"):
        return "SmolLM2-135M-Instruct", "SmolLM2"
    c = setup["model_config"]
    return (f"the checkpoint `{setup['model']}` ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} key-value heads, intermediate "
            f"{c['intermediate_size']}, vocab {c['vocab_size']})"), "this model"


def write_report(results: dict, *, command, info, load, elapsed, waited, setup, path) -> str:
    cuda = setup["device"] == "cuda"
    refs = not cuda and not setup.get("model")  # the reference figures are SmolLM2 on the CPU machine
    measured = {n: r for n, r in results.items() if "times" in r or "decode_tok_s" in r or n == "matmul" and "jax" in r}
    mm = measured.get("matmul")
    ceilings = _ceilings(mm, cuda)
    gens = [n for n in GENERATORS if n in measured]
    what = "Training and generation" if any(n in results for n in GENERATORS) or not results else "Training"
    where = "GPU (CUDA)" if cuda else "CPU"
    model, model_short = _model_text(setup)
    lines = [f"# {what} throughput on {where}: jaxlora vs transformers + PEFT + bitsandbytes", "",
             f"Command: `{command}`", "", "Machine:", "", *[f"- {x}" for x in info],
             f"- load average (1/5/15 min) at the start {load[0]}, at the end {load[1]}", ""]
    if setup["max_wait"] > 0 or setup["retries"] > 0:
        reruns = {1: "once", 2: "twice"}.get(setup["retries"], f"{setup['retries']} times")
        lines += [(f"The machine is shared: before each configuration the script waits for other processes to use at most "
                   f"{setup['max_others']:g} cores (5 s sample), and reruns a configuration (up to {reruns}) when they "
                   "used more during it. Column 'others' = cores used by other processes during the configuration's run "
                   "(its load average after it in brackets).")
                  + ("" if cuda else " torch's OpenMP threads are hit much harder by such load than XLA's "
                                     "(measured 10x slower steps at load ~4)."), ""]
    else:
        lines += ["Configurations run back to back: no waiting for a quiet machine and no reruns (--max-wait 0, "
                  "--retries 0). Column 'others' = cores used by other processes during the configuration's run "
                  "(its load average after it in brackets).", ""]
    memory = ("Peak RSS = ru_maxrss of the configuration's own process (jaxlora's includes XLA compilation)."
              + (" GPU peak = the process's peak device memory in use: torch.cuda.max_memory_allocated() for torch, "
                 "XLA's peak_bytes_in_use on jax's device 0 for jaxlora (allocations, not the pool either allocator "
                 "reserves); XLA temp is not measured on CUDA (one more compilation per configuration)." if cuda else ""))
    lines += [(f"{model[0].upper()}{model[1:]}, batch {BATCH} x {SEQ} random tokens, all in the loss; LoRA r={RANK}, "
               f"alpha={ALPHA} on {', '.join(TARGETS)}, dropout 0; AdamW lr {LR}, weight decay 0.01. tok/s = "
               f"{BATCH * SEQ} / median step time over {setup['steps']} steps after {setup['warmup']} warm-up steps "
               f"(jaxlora: after compilation, reported apart). {memory} GB = 1e9 bytes.")
              + (" float32 matmuls: " + ("TF32 allowed in both frameworks (--tf32)" if setup["tf32"] else
                 "true float32 in both (torch's default; jaxlora's fp32 configurations set "
                 "jax_default_matmul_precision='float32', as jax's GPU default is TF32)") + "." if cuda else ""), ""]
    if mm and not cuda:
        peak = ceilings["fp32"]
        lines += [f"fp32 matmul {setup['matmul_size']}^3 (median / best of the repetitions): jax {mm['jax']['median']:.0f} / "
                  f"{mm['jax']['best']:.0f} GFLOP/s, torch {mm['torch']['median']:.0f} / {mm['torch']['best']:.0f} "
                  f"GFLOP/s. MFU below = achieved FLOP/s / {peak:.0f} GFLOP/s (the higher median).", ""]
    elif mm:
        parts = [f"{label} jax {mm[f'jax{key}']['median']:.0f} / {mm[f'jax{key}']['best']:.0f}, torch "
                 f"{mm[f'torch{key}']['median']:.0f} / {mm[f'torch{key}']['best']:.0f} GFLOP/s"
                 for label, key in [("float32" + (" (TF32 allowed)" if setup["tf32"] else ""), ""), ("bfloat16", "_bf16")]
                 if f"jax{key}" in mm]
        lines += [f"GPU matmul {setup['matmul_size']}^3 (median / best of the repetitions): {'; '.join(parts)}. MFU below "
                  "= achieved FLOP/s / the higher median for the configuration's compute dtype ("
                  + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ceilings.items()) + ").", ""]
    header = ["configuration", "tok/s", "step s (min-max)", "peak RSS GB", *(["GPU peak GB"] if cuda else []),
              "GFLOP/step", "GFLOP/s", "MFU", "compile s", "XLA temp GB", "loss first -> last",
              *(["reference tok/s, GB"] if refs else []), "others (load)"]
    lines += [_row(header), "|---|" + "---|" * (len(header) - 1)]
    for name in TRAIN:
        if name not in measured:
            continue
        r = measured[name]
        rate = r["flops"] / statistics.median(r["times"]) / 1e9
        peak = ceilings.get(TRAIN[name][3] if cuda else "fp32", ceilings.get("fp32"))
        ref = REFERENCE.get(name)
        gpu = r.get("gpu_peak_gb")
        lines.append(_row([
            name, f"{tok_s(r):.1f}", f"{statistics.median(r['times']):.2f} ({min(r['times']):.2f}-{max(r['times']):.2f})",
            f"{r['peak_rss_gb']:.2f}", *([f"{gpu:.2f}" if gpu is not None else "-"] if cuda else []),
            f"{r['flops'] / 1e9:.0f}", f"{rate:.0f}", "" if peak is None else f"{100 * rate / peak:.0f}%",
            f"{r['compile_s']:.0f}" if "compile_s" in r else "-",
            f"{r['xla_temp_gb']:.2f}" if r.get("xla_temp_gb") is not None else "-",
            f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
            *(["" if ref is None else f"{ref[0]}, {ref[1]}"] if refs else []), f"{r['others_cores']:.2f} ({r['load']})"]))
    missing = {n: r for n, r in results.items() if n not in measured}
    if missing:
        lines += ["", "Not measured:", ""]
        lines += [f"- {n}: {r.get('skipped') or r.get('error') or 'no result'}" for n, r in missing.items()]
    if gens:
        lines += ["", f"Generation, batch 1, {PROMPT}-token prompt, greedy, fp32 (medians; t(1) includes the prefill):", ""]
        header = ["generator", "t(1 new token) s", "t(65 new tokens) s", "decode tok/s", "first call s (1 / 65)",
                  "peak RSS GB", *(["GPU peak GB"] if cuda else []), *(["reference"] if refs else []), "others (load)"]
        lines += [_row(header), "|" + "---|" * len(header)]
        for n in gens:
            r = measured[n]
            ref, gpu = REFERENCE.get(n), r.get("gpu_peak_gb")
            lines.append(_row([n, f"{statistics.median(r['times_1']):.3f}", f"{statistics.median(r['times_65']):.3f}",
                               f"{r['decode_tok_s']:.1f}", f"{r['first_1']:.1f} / {r['first_65']:.1f}",
                               f"{r['peak_rss_gb']:.2f}", *([("-" if gpu is None else f"{gpu:.2f}")] if cuda else []),
                               *(["" if ref is None else f"{ref[0]} tok/s, {ref[1]} GB"] if refs else []),
                               f"{r['others_cores']:.2f} ({r['load']})"]))
        if len(gens) == 2:
            same = sum(a == b for a, b in zip(*(measured[n]["tokens_65"] for n in gens)))
            lines += ["", f"Greedy tokens agree in {same} of {NEW + 1} positions (the first divergence can come "
                          "from float32 rounding between two near-equal logits)."]
    lines += ["", "## Targets (like with like, both measured in this run)", ""]
    mem_label = "GPU peak" if cuda else "peak RSS"
    for label, ours, theirs, speed, target in PAIRS:
        if ours not in measured or theirs not in measured or speed is None:
            continue
        ratio = tok_s(measured[ours]) / tok_s(measured[theirs])
        text = f"- {label}: tok/s {ratio:.2f}x ({'met' if ratio >= speed else 'NOT met'}; target >= {speed}x)"
        if target is not None:
            mem = _memory(measured[ours], cuda) / _memory(measured[theirs], cuda)
            text += f"; {mem_label} {mem:.2f}x ({'met' if mem <= target else 'NOT met'}; target <= {target}x)"
        lines.append(text)
    if len(gens) == 2:
        ratio = measured[gens[0]]["decode_tok_s"] / measured[gens[1]]["decode_tok_s"]
        lines.append(f"- decode: {ratio:.2f}x transformers ({'met' if ratio >= 3 else 'NOT met'}; target >= 3x)")
    if "jaxlora full FT" in measured and "torch full FT" in measured:
        ratio = tok_s(measured["jaxlora full FT"]) / tok_s(measured["torch full FT"])
        lines.append(f"- full fine-tuning (no target): {ratio:.2f}x torch")
    if lines[-1] == "":
        lines.append("- no jaxlora/torch pair was measured in this run")
    lines += ["", "## FLOPs per step", "",
              (f"T = tokens per step, N = matmul parameters (decoder projections + lm_head; {model_short}: "
               f"{_first(measured, 'n_layers') / 1e6:.1f} M + {_first(measured, 'n_head') / 1e6:.1f} M), L = LoRA "
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


def write_plot(results: dict, path: str, setup: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cuda = setup["device"] == "cuda"
    results = {n: r for n, r in results.items() if "times" in r}
    pairs = [p for p in PAIRS if p[1] in results or p[2] in results]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, title in [(axes[0], "tok", "training tokens/s (higher is better)"),
                           (axes[1], "mem", f"{'GPU peak memory' if cuda else 'peak RSS'}, GB (lower is better)")]:
        for i, (label, ours, theirs, _, _) in enumerate(pairs):
            for j, (name, color) in enumerate([(ours, "tab:blue"), (theirs, "tab:orange")]):
                if name in results:
                    value = tok_s(results[name]) if key == "tok" else _memory(results[name], cuda)
                    ax.bar(i + (j - 0.5) * 0.38, value, 0.38, color=color, label=["jaxlora", "torch"][j] if i == 0 else None)
                    ax.text(i + (j - 0.5) * 0.38, value, f"{value:.0f}" if key == "tok" else f"{value:.1f}",
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(pairs)), [p[0] for p in pairs], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend()
    model = "SmolLM2-135M" if not setup.get("model") else os.path.basename(setup["model"].rstrip("/"))
    fig.suptitle(f"{model}, batch {BATCH}x{SEQ}, {'GPU' if cuda else f'CPU ({os.cpu_count()} cores)'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
