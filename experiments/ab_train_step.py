"""python experiments/ab_train_step.py --variants before:lora before:attention before:scheduler

Before/after measurements of the training-step changes in experiments/results/train.md, in one process:
each variant is the current jaxlora with one piece put back as it was at commit ``BEFORE`` (read with
``git show``), compiled side by side with the current code on the same model (SmolLM2-135M-Instruct, LoRA
r=16 on all linear layers, batch 4 x 256 unless --batch / --seq say otherwise, AdamW), then timed interleaved (current, variant, current,
variant, ...) so that load from other processes on the machine hits both alike. Reports the median step
time of each, the median of the paired ratios, and XLA's temporary buffer size of each compiled step.

Pieces (``before:NAME``): ``lora`` (LoraLinear.__call__: autodiff's B gradient), ``attention``
(LlamaAttention.__call__: 5-D einsums, autodiff), ``mlp`` (jax.nn.silu(gate) * up, autodiff), ``loss``
(whole [b, s, vocab] logits sliced at the shift), ``scheduler`` (XLA's default CPU scheduler), ``dense``
(the dense attention kernel instead of the blockwise one; not from ``BEFORE``), ``plain16``
(16-bit products written plainly instead of `jaxlora.nn.matmul`'s float32-accumulating form; this piece
is not from ``BEFORE``; use it with ``--compute bf16``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BEFORE = "022a750"  # the commit before the speed work
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def old_module(path: str, name: str) -> types.ModuleType:
    source = subprocess.run(["git", "-C", ROOT, "show", f"{BEFORE}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType(name)
    module.__file__ = f"{BEFORE}:{path}"
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 (our own file at an older commit)
    return module


def patches(name: str) -> list[tuple[object, str, object]]:
    import jax

    import jaxlora.models.llama as llama
    import jaxlora.nn.lora as lora
    import jaxlora.train.step as step
    if name == "lora":
        return [(lora.LoraLinear, "__call__", old_module("jaxlora/nn/lora.py", "old_lora").LoraLinear.__call__)]
    if name == "attention":
        old = old_module("jaxlora/models/llama.py", "old_llama").LlamaAttention.__call__

        def old_call(self, x, cos, sin, mask, cache_kv=None, implementation="blockwise"):
            same_segment = None if mask.query_segments is None else (
                mask.query_segments[:, :, None] == mask.key_segments[:, None, :])
            return old(self, x, cos, sin, mask.key_mask, mask.query_positions, mask.key_positions, cache_kv, same_segment)

        return [(llama.LlamaAttention, "__call__", old_call)]
    if name == "dense":  # the dense attention kernel instead of the blockwise one (training: no cache)
        dense = lambda q, k, v, mask, **blocks: llama.grouped_attention(q, k, v, mask.dense())
        return [(llama, "blockwise_attention", dense)]
    if name == "mlp":
        return [(llama, "swiglu", lambda gate, up: jax.nn.silu(gate) * up)]
    if name == "loss":
        return [(step, "_forward_loss", old_module("jaxlora/train/step.py", "old_step")._forward_loss)]
    if name == "scheduler":
        return [(step, "compiler_options", lambda: None)]
    if name == "plain16":  # 16-bit products written plainly (XLA converts them to float32 products)
        import jax.numpy as jnp

        import jaxlora.nn.attention as attention
        import jaxlora.nn.linear as linear
        import jaxlora.nn.linear4bit as linear4bit

        def plain_dot(a, b, contracting, out_dtype=None):
            out = jax.lax.dot_general(a, b, (((contracting[0] % a.ndim,), (contracting[1] % b.ndim,)), ((), ())))
            return out if out_dtype is None else out.astype(out_dtype)

        def plain_einsum(spec, a, b, out_dtype=None):
            out = jnp.einsum(spec, a, b)
            return out if out_dtype is None else out.astype(out_dtype)

        return [(linear4bit, "dot", plain_dot), (step, "dot", plain_dot), (attention, "batched_einsum", plain_einsum),
                (llama, "linear_matmul", lambda x, w: x @ w.T), (linear, "linear_matmul", lambda x, w: x @ w.T)]
    raise SystemExit(f"unknown piece {name!r}")


@contextlib.contextmanager
def patched(pairs):
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in pairs]
    for obj, attr, value in pairs:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def make_runner(model, method: str, batch: int, seq: int):
    """A compiled train step on its own copy of the trainable state; returns (run, temp bytes)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxlora.train.step import make_train_step, split_trainable
    graphdef, trainable, rest = split_trainable(model)
    trainable = jax.tree.map(jnp.copy, trainable)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    state = [trainable, rest, tx.init(trainable)]
    step = make_train_step(graphdef, tx, wrt=nnx.LoRAParam)
    ids = jax.random.randint(jax.random.key(0), (1, batch, seq), 0, 49152)
    batch = {"input_ids": ids, "labels": ids}
    temp = step.lower(*state, batch).compile().memory_analysis().temp_size_in_bytes

    def run():
        state[0], state[1], state[2], metrics = step(*state, batch)
        return float(metrics["loss"])

    return run, temp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["before:lora"], help="before:PIECE ... (see above)")
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--compute", choices=["fp32", "bf16"], default="fp32", help="activation / matmul dtype")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    import jax  # noqa: F401

    import jaxlora
    from torch_bridge import load_llama
    from torch_bridge.smollm2 import ensure_smollm2
    model = load_llama(ensure_smollm2(), compute_dtype="bfloat16" if args.compute == "bf16" else None,
                       **({"quantize": "nf4", "double_quant": True} if args.method == "qlora" else {}))
    model.gradient_checkpointing = args.ckpt
    model = jaxlora.get_peft_model(model, jaxlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    names = ["current", *args.variants]
    runs, temps, losses = {}, {}, {}
    for name in names:
        pairs = [] if name == "current" else [p for piece in name.split(":", 1)[1].split("+") for p in patches(piece)]
        with patched(pairs):
            runs[name], temps[name] = make_runner(model, args.method, args.batch, args.seq)
            losses[name] = runs[name]()  # compiles (inside the patch) and runs once
    times = {n: [] for n in names}
    for _ in range(args.reps):
        for name in names:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    print(f"{args.method} {args.compute}{' ckpt' if args.ckpt else ''}, batch {args.batch} x {args.seq}, {args.reps} "
          f"interleaved repetitions, load {os.getloadavg()}")
    for name in names:
        ratio = statistics.median(b / a for a, b in zip(times["current"], times[name]))
        print(f"{name:28s} step {statistics.median(times[name]):6.2f} s  (x{ratio:.3f} of current, paired median)  "
              f"XLA temp {temps[name] / 2**20:7.0f} MiB  first loss {losses[name]:.4f}")


if __name__ == "__main__":
    main()
