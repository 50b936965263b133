"""The measured configurations of experiments/bench_train.py, each run in its own process by
``bench_train.py --case NAME`` (run that script; this module holds what one child process measures)."""

from __future__ import annotations

import resource
import statistics
import sys
import time

from bench_train import (ALPHA, BATCH, LR, MATMUL, NEW, PROMPT, RANK, ROOT, SEQ, STEPS, TARGETS, TRAIN,
                         model_config)


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


def model_dir(opts) -> str:
    """The checkpoint every case uses: ``--model DIR``, else the cached SmolLM2-135M-Instruct."""
    if opts.model:
        return opts.model
    from torch_bridge.smollm2 import ensure_smollm2
    return str(ensure_smollm2())


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


def check_jax_backend(opts) -> None:
    import jax
    if opts.device == "cuda" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device cuda: jax.default_backend() is {jax.default_backend()!r}, not 'gpu' "
                         "(is a CUDA build of jaxlib installed? is JAX_PLATFORMS set?)")


def torch_device(opts):
    import torch
    if opts.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__})")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts.tf32
    return torch.device(opts.device)


def gpu_peak_gb(framework: str) -> float | None:
    """Peak device memory of this process: torch's allocator, or XLA's allocator on jax's device 0."""
    if framework == "torch":
        import torch
        return torch.cuda.max_memory_allocated() / 1e9
    import jax
    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 1e9 if stats and "peak_bytes_in_use" in stats else None


def run_jax_train(name: str, opts, steps: int, warmup: int, *, spec=None, shape=(BATCH, SEQ),
                  xla_temp: bool = True) -> dict:
    """One jaxlora configuration: ``spec`` = (framework, method, checkpointing, compute) (default TRAIN[name]),
    ``shape`` = (batch, seq) of the random token batch; ``xla_temp``: also report XLA's temporary buffer size
    (one more compilation, after the peak RSS is taken)."""
    import jax
    from flax import nnx

    from jaxlora.peft import LoraConfig, get_peft_model
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import make_train_step, split_trainable
    from torch_bridge import load_llama
    check_jax_backend(opts)
    _, method, ckpt, compute = spec or TRAIN[name]
    batch_size, seq = shape
    if opts.device == "cuda" and compute == "fp32":  # jax's GPU default for float32 matmuls is TF32
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if opts.tf32 else "float32")
    path = model_dir(opts)
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
    ids = jax.random.randint(jax.random.key(0), (1, batch_size, seq), 0, model_config(path)["vocab_size"])
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
    temp = None  # XLA's temporary buffers: one more compilation, left out on CUDA (the GPU peak is measured there)
    if opts.device == "cpu" and xla_temp:
        temp = step.lower(*state, batch).compile().memory_analysis().temp_size_in_bytes / 1e9
    return {"times": times, "first_call_s": first, "compile_s": compile_s, "loss_first": losses[0],
            "loss_last": losses[-1], "trainable": trainable_params, "xla_temp_gb": temp, "peak_rss_gb": peak}


def run_torch_train(name: str, opts, steps: int, warmup: int, *, spec=None, shape=(BATCH, SEQ)) -> dict:
    """One transformers + PEFT configuration; ``spec`` and ``shape`` as for `run_jax_train`."""
    _, method, ckpt, compute = spec or TRAIN[name]
    batch_size, seq = shape
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            return {"skipped": f"bitsandbytes not installed ({type(err).__name__}: {err})"}
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = torch_device(opts)
    cuda = device.type == "cuda"
    path = model_dir(opts)
    torch.manual_seed(0)
    kwargs = {}
    if method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if compute == "bf16" else torch.float32)
        if cuda:  # bitsandbytes quantizes while loading onto the GPU
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    if cuda and method != "qlora":
        model = model.to(device)
    if method == "qlora" and not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise RuntimeError(f"{name}: no bitsandbytes Linear4bit in the loaded model")
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    devices = sorted({p.device.type for p in model.parameters()})
    if devices != [device.type]:
        raise RuntimeError(f"{name}: parameters on {devices}, expected all on {device.type}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_config(path)["vocab_size"], (batch_size, seq), generator=gen).to(device)
    losses = []

    def one_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()

    first = timed(one_step, 1)[0]
    timed(one_step, warmup)
    times = timed(one_step, steps)
    return {"times": times, "first_call_s": first, "loss_first": losses[0], "loss_last": losses[-1],
            "trainable": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


def run_matmul(opts, reps: int) -> dict:
    """Matmul ceiling in GFLOP/s: float32 (true float32 on CUDA unless --tf32), and bfloat16 on CUDA."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    check_jax_backend(opts)
    device, cuda = torch_device(opts), opts.device == "cuda"
    size = MATMUL[opts.device][0]
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    flops = 2 * size**3
    precision = ("tensorfloat32" if opts.tf32 else "float32") if cuda else None
    out = {"size": size}
    for dtype in ["fp32", "bf16"] if cuda else ["fp32"]:
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
        if dtype == "bf16":
            ja, jb, ta, tb = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16), ta.bfloat16(), tb.bfloat16()
        mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision if dtype == "fp32" else None))

        def torch_mm():
            ta @ tb
            if cuda:
                torch.cuda.synchronize()

        for label, fn in [("jax", lambda: mm(ja, jb).block_until_ready()), ("torch", torch_mm)]:
            timed(fn, 3)
            times = timed(fn, reps)
            key = label if dtype == "fp32" else f"{label}_{dtype}"  # "jax"/"torch": float32, as on CPU
            out[key] = {"median": flops / statistics.median(times) / 1e9, "best": flops / min(times) / 1e9}
    return out


def run_generate(name: str, opts, reps: int) -> dict:
    import numpy as np
    path = model_dir(opts)
    prompt = np.random.default_rng(0).integers(0, model_config(path)["vocab_size"], PROMPT).tolist()
    if name.startswith("jaxlora"):
        from jaxlora.generate import GenerationConfig, Generator
        from torch_bridge import load_llama
        check_jax_backend(opts)
        generator = Generator(load_llama(path))

        def generate(n):
            return generator([prompt], GenerationConfig(max_new_tokens=n))[0]
    else:
        import torch
        import transformers
        device = torch_device(opts)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        ids = torch.tensor([prompt], device=device)

        def generate(n):
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            return out[0, PROMPT:].tolist()  # .tolist() waits for the device

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


def run_case(name: str, opts) -> dict:
    sys.path.insert(0, ROOT)
    steps, warmup, reps = STEPS[opts.device][opts.quick]
    start = time.perf_counter()
    if name in TRAIN:
        framework, method, ckpt, _ = TRAIN[name]
        result = (run_jax_train if framework == "jax" else run_torch_train)(name, opts, steps, warmup)
        if "skipped" in result:
            return result
        lora = result["trainable"] if method != "full" else 0
        result.update(step_flops(model_config(model_dir(opts)), lora, method, ckpt))
    elif name == "matmul":
        result = run_matmul(opts, MATMUL[opts.device][2 if opts.quick else 1])
    else:
        result = run_generate(name, opts, reps)
    if opts.device == "cuda" and name != "matmul":
        result["gpu_peak_gb"] = gpu_peak_gb("jax" if name.startswith("jaxlora") else "torch")
    return {"peak_rss_gb": peak_rss_gb(), **result, "wall_s": time.perf_counter() - start}
