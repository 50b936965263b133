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


def run_configuration(name: str, quick: bool) -> dict:
    """Run one configuration in a fresh process; adds the cores other processes used meanwhile."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name] + (["--quick"] if quick else [])
    busy, own, start = busy_seconds(), children_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"configuration {name!r} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    others = max(0.0, (busy_seconds() - busy) - (children_seconds() - own)) / wall
    return {**json.loads(line[len("RESULT "):]), "others_cores": others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="(internal) run one configuration in this process, print its JSON")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this configuration (repeatable; names as in the table, e.g. 'PEFT LoRA')")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer steps and repetitions")
    parser.add_argument("--markdown", metavar="PATH", help="write the results to this markdown file")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (tokens/s and peak RSS) to this PNG")
    parser.add_argument("--max-others", type=float, default=0.25,
                        help="rerun a configuration when other processes used more cores than this meanwhile (default 0.25)")
    parser.add_argument("--retries", type=int, default=2, help="reruns per configuration (default 2)")
    parser.add_argument("--max-wait", type=float, default=300, help="seconds to wait for a quiet machine before each run")
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
    waited = 0.0
    for name in names:
        for attempt in range(args.retries + 1):
            waited += wait_for_quiet(args.max_others, args.max_wait)
            result = run_configuration(name, args.quick)
            if result["others_cores"] <= args.max_others or attempt == args.retries:
                break
            print(f"{name}: other processes used {result['others_cores']:.2f} cores meanwhile; again", file=sys.stderr)
        results[name] = r = {**result, "load": load_average(), "attempts": attempt + 1}
        detail = f"{BATCH * SEQ / statistics.median(r['times']):.1f} tok/s" if "times" in r else \
            f"{r['decode_tok_s']:.1f} decode tok/s" if "decode_tok_s" in r else json.dumps(r)
        print(f"{name}: {detail}, peak RSS {r['peak_rss_gb']:.2f} GB, {r['wall_s']:.0f} s, others "
              f"{r['others_cores']:.2f} cores, load {r['load']}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    from bench_train_report import write_plot, write_report  # the tables, targets and plot
    text = write_report(results, command=command, info=info, load=(load_start, load_average()), elapsed=elapsed,
                        waited=waited, quick=args.quick, path=args.markdown)
    print(text)
    if args.plot:
        write_plot(results, args.plot)


if __name__ == "__main__":
    main()
