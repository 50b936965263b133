"""python experiments/bench_compile.py --markdown experiments/results/compile.md

Compile time of the LoRA/QLoRA train step against depth, decoder layers in a Python loop against one
scanned body over stacked layers (`jaxlora.models.scan`), and the steady-state step time of both.

Tiny widths, so that compilation is what is measured: hidden 64, 4 heads (4 kv heads), intermediate 128,
vocab 256; LoRA r=8 / alpha 16 on all linear layers, dropout 0; QLoRA = the same with the decoder
projections in NF4 with double quantization; gradient checkpointing on; AdamW (the trainer's
`make_optimizer`); batch 2 x 64 random tokens. Depths 8, 16, 32, 64, 80 (``--depths``).

SmolLM2-135M's shape (30 layers, random weights with its config: experiments/gpu/smollm2_config.json),
batch 4 x 256 as in experiments/bench_train.py: LoRA r=16 on all linear layers without gradient
checkpointing, and QLoRA with it; loop against scan (``--no-smollm2`` leaves it out).

Generation (``--generate``): greedy decoding with the KV cache (`jaxlora.generate.Generator`, the jitted
prefill and the decode ``while_loop``) of the same models in eval mode, loop against scan (the scanned
body carries one stacked cache). Tiny depths: batch 2, prompts of 64 tokens, 32 new tokens; SmolLM2-135M's
shape: batch 4, prompts of 128 tokens, 64 new tokens. Reported: the first call (trace, lower, compile and
run), a second call with the same shapes (run only; median of ``--steps``) and decoded tokens/s of it.

Each configuration runs in a fresh subprocess (no compilation cache shared, its own memory). Reported:
lower s (trace + lower to StableHLO), compile s (XLA), step s (median over ``--steps`` steps after 2
warm-up steps), XLA temporary buffers (memory_analysis of the compiled step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's jaxlora, also in the per-configuration subprocesses
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def build_model(config: dict, method: str, ckpt: bool, rank: int):
    from flax import nnx

    import jaxlora
    from jaxlora.adapters.model import get_submodule, set_submodule
    from jaxlora.models import LlamaConfig, LlamaForCausalLM
    from jaxlora.nn import Linear4bit

    llama_config = LlamaConfig(**config)
    model = LlamaForCausalLM(llama_config, gradient_checkpointing=ckpt, rngs=nnx.Rngs(0))
    if method == "qlora":
        for i in range(llama_config.num_hidden_layers):
            for projection in PROJECTIONS:
                name = f"model.layers.{i}.{projection}"
                set_submodule(model, name, Linear4bit.from_weight(get_submodule(model, name).weight[...]))
    lora = jaxlora.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    return jaxlora.get_peft_model(model, lora, rngs=nnx.Rngs(params=0, dropout=1))


def run_case(case: dict) -> dict:
    """One configuration, in this process: build, lower, compile, run."""
    import jax

    from jaxlora.models.scan import stack_layers
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import make_train_step, split_trainable

    model = build_model(case["config"], case["method"], case["ckpt"], case["rank"])
    if case["form"] == "scan":
        reason = stack_layers(model)
        assert reason is None, reason
    model.train()
    graphdef, trainable, rest = split_trainable(model)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, lr_scheduler_type="constant"), 1000)
    opt_state = tx.init(trainable)
    step = make_train_step(graphdef, tx)
    batch_size, seq = case["batch"]
    ids = jax.random.randint(jax.random.key(0), (1, batch_size, seq), 0, case["config"]["vocab_size"])
    batch = {"input_ids": ids, "labels": ids}
    t0 = time.perf_counter()
    lowered = step.lower(trainable, rest, opt_state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    temp = compiled.memory_analysis().temp_size_in_bytes
    state = [trainable, rest, opt_state]
    times, losses = [], []
    for i in range(2 + case["steps"]):
        start = time.perf_counter()
        state[0], state[1], state[2], metrics = compiled(*state, batch)
        losses.append(float(metrics["loss"]))  # waits for the step
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "step_s": statistics.median(times), "step_min_s": min(times),
            "step_max_s": max(times), "xla_temp_mb": temp / 2**20, "loss_first": losses[0], "loss_last": losses[-1]}


def run_generate_case(case: dict) -> dict:
    """One generation configuration, in this process: the first call compiles, the next ones only run."""
    import jax
    import numpy as np

    from jaxlora.generate import GenerationConfig, Generator
    from jaxlora.models.scan import stack_layers

    model = build_model(case["config"], case["method"], False, case["rank"])
    if case["form"] == "scan":
        reason = stack_layers(model)
        assert reason is None, reason
    model.eval()
    batch, prompt, new = case["batch"], case["prompt"], case["new_tokens"]
    prompts = np.random.default_rng(0).integers(1, case["config"]["vocab_size"], size=(batch, prompt)).tolist()
    config = GenerationConfig(max_new_tokens=new)  # no EOS: every row decodes all new tokens
    generator = Generator(model)
    t0 = time.perf_counter()
    first = generator(prompts, config)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(case["steps"]):
        start = time.perf_counter()
        again = generator(prompts, config)
        times.append(time.perf_counter() - start)
        assert again == first
    run_s = statistics.median(times)
    assert generator.trace_counts == {"prefill": 1, "decode": 1}, generator.trace_counts
    return {"first_s": first_s, "run_s": run_s, "run_min_s": min(times), "run_max_s": max(times),
            "tokens_per_s": batch * new / run_s, "tokens": [row[:4] for row in first], "backend": jax.default_backend()}


def in_subprocess(case: dict, timeout: int) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> list[str]:
    lines = subprocess.run("lscpu | head", shell=True, capture_output=True, text=True).stdout.rstrip().splitlines()
    import flax
    import jax
    lines.append(f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
                 f"backend {jax.default_backend()}")
    return lines


def others() -> str:
    """The load average and the processes using the most CPU (what else was running)."""
    top = subprocess.run("ps -eo pcpu,etime,args --sort=-pcpu | head -6", shell=True, capture_output=True,
                         text=True).stdout.rstrip()
    return f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n{top}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--depths", default="8,16,32,64,80")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--markdown", help="write the results as markdown here")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per configuration")
    parser.add_argument("--generate", action="store_true", help="time generation instead of the train step")
    opts = parser.parse_args()
    if opts.case:
        case = json.loads(opts.case)
        print(json.dumps(run_generate_case(case) if case.get("generate") else run_case(case)))
        return
    if opts.generate:
        return generate_main(opts)

    command = "python " + " ".join(["experiments/bench_compile.py", *sys.argv[1:]])
    started = others()
    print(command, *machine(), started, sep="\n", flush=True)
    rows = []
    for method in opts.methods.split(","):
        for depth in [int(d) for d in opts.depths.split(",")]:
            for form in ("loop", "scan"):
                case = {"config": {**TINY, "num_hidden_layers": depth}, "method": method, "ckpt": True, "rank": 8,
                        "form": form, "batch": (2, 64), "steps": opts.steps}
                result = in_subprocess(case, opts.timeout)
                rows.append((f"tiny {method} ckpt", depth, form, result))
                print(rows[-1], flush=True)
    if not opts.no_smollm2:
        smollm2 = smollm2_config()
        for method, ckpt in (("lora", False), ("qlora", True)):
            for form in ("loop", "scan"):
                case = {"config": smollm2, "method": method, "ckpt": ckpt, "rank": 16, "form": form,
                        "batch": (4, 256), "steps": opts.steps}
                result = in_subprocess(case, opts.timeout)
                rows.append((f"SmolLM2-135M {method}{' ckpt' if ckpt else ''}", 30, form, result))
                print(rows[-1], flush=True)
    ended = others()
    print(ended)
    if opts.markdown:
        write_markdown(opts.markdown, command, machine(), started, ended, rows, opts.steps)


def smollm2_config() -> dict:
    with open(os.path.join(ROOT, "experiments", "gpu", "smollm2_config.json")) as f:
        return {k: v for k, v in json.load(f).items() if k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "rope_theta")}


def generate_main(opts) -> None:
    command = "python " + " ".join(["experiments/bench_compile.py", *sys.argv[1:]])
    started = others()
    print(command, *machine(), started, sep="\n", flush=True)
    cases = [(f"tiny {method}", {**TINY, "num_hidden_layers": depth}, depth, (2, 64, 32))
             for method in opts.methods.split(",") for depth in [int(d) for d in opts.depths.split(",")]]
    if not opts.no_smollm2:
        cases += [(f"SmolLM2-135M {method}", smollm2_config(), 30, (4, 128, 64)) for method in opts.methods.split(",")]
    rows = []
    for name, config, depth, (batch, prompt, new) in cases:
        method = name.split()[-1]
        for form in ("loop", "scan"):
            case = {"generate": True, "config": config, "method": method, "rank": 8 if name.startswith("tiny") else 16,
                    "form": form, "batch": batch, "prompt": prompt, "new_tokens": new, "steps": opts.steps}
            rows.append((name, depth, form, f"{batch} x {prompt} + {new}", in_subprocess(case, opts.timeout)))
            print(rows[-1], flush=True)
    ended = others()
    print(ended)
    if not opts.markdown:
        return
    write_table(opts.markdown, "Generation compile time against depth: decoder layers in a loop vs one scanned body",
                command, machine(), started, ended,
                f"run s = median over {opts.steps} calls after the first (min-max in brackets).",
                ["model", "layers", "form", "batch x prompt + new", "first call s", "run s", "first - run s",
                 "decoded tok/s", "first tokens of row 0"],
                [((name, depth, form, shape), r, lambda r: (
                    f"{r['first_s']:.1f}", f"{r['run_s']:.3f} ({r['run_min_s']:.3f}-{r['run_max_s']:.3f})",
                    f"{r['first_s'] - r['run_s']:.1f}", f"{r['tokens_per_s']:.1f}", str(r["tokens"][0])))
                 for name, depth, form, shape, r in rows])


def write_table(path, title, command, machine_lines, started, ended, note, header, rows) -> None:
    """A markdown report: the title, the command, the machine, what else ran, this script's description,
    ``note`` and one table; ``rows``: ``(leading cells, result, cells of the result)``, or an error cell."""
    out = [f"# {title}", "", f"Command: `{command}`", "", "Machine (`lscpu | head`):", "", "```", *machine_lines,
           "```", "", "What else was running, at the start:", "", "```", started, "```", "", "and at the end:", "",
           "```", ended, "```", "", __doc__.split("\n\n", 1)[1].strip(), "", note, "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for lead, r, cells in rows:
        tail = [f"error: {r['error']}"] + [""] * (len(header) - len(lead) - 1) if "error" in r else list(cells(r))
        out.append("| " + " | ".join([*map(str, lead), *tail]) + " |")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def write_markdown(path, command, machine_lines, started, ended, rows, steps) -> None:
    write_table(path, "Compile time against depth: decoder layers in a loop vs one scanned body",
                command, machine_lines, started, ended,
                f"step s = median over {steps} steps after 2 warm-up steps (min-max in brackets).",
                ["model", "layers", "form", "lower s", "compile s", "lower+compile s", "step s", "XLA temp MiB",
                 "loss first -> last"],
                [((name, depth, form), r, lambda r: (
                    f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}", f"{r['lower_s'] + r['compile_s']:.1f}",
                    f"{r['step_s']:.4f} ({r['step_min_s']:.4f}-{r['step_max_s']:.4f})", f"{r['xla_temp_mb']:.1f}",
                    f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}"))
                 for name, depth, form, r in rows])


if __name__ == "__main__":
    main()
