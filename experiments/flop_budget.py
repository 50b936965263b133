"""python experiments/flop_budget.py --json experiments/results/train_seq.json --markdown experiments/results/flop_budget.md

Where a training step's time goes against what this machine's matrix products can do: how close each
side of experiments/bench_seq.py comes to a step made of nothing but its matrix products, and so how
much faster than PEFT any implementation could be here.

1. The step's matrix-product FLOPs, counted from the model's shapes (`step_flops`): the frozen
   projections (forward, the input gradient, and with gradient checkpointing the recomputed forward;
   no weight gradient), the output layer (forward and input gradient), the LoRA branches (forward,
   input gradient, both weight gradients, recomputed forward) and attention (QK^T and PV forward,
   dP, dV, dQ, dK backward, the recomputed forward; causal: s (s + 1) / 2 query-key pairs). Work an
   algorithm adds beyond that (FlashAttention's backward recomputes QK^T, the blockwise kernel computes
   whole diagonal blocks) is not counted: the FLOPs are the same for both sides.
2. The machine's speed at those products, measured here: float32 products of the decoder's projection
   shapes, ``[tokens, in] x [in, out]`` and the input gradient's ``[tokens, out] x [out, in]``, in XLA
   (jax.jit) and in torch, interleaved, 2 threads each, the median of the repetitions.
3. From the benchmark's rows (``--json`` of bench_seq.py): each side's step time, its FLOP rate, and the
   matmul-bound step (FLOPs / the faster library's rate), whose ratio to PEFT's step time is the
   most any implementation's speed-up over PEFT could be on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import ROOT, machine_info, probe_environment  # noqa: E402

def step_flops(shape, batch: int, seq: int, rank: int, ckpt: bool) -> dict[str, float]:
    """Matrix-product FLOPs of one LoRA training step on all 7 projections (module docstring, 1.);
    ``shape``: `jaxlora.cli.memory.ModelShape`."""
    layers, tokens = shape.num_hidden_layers, batch * seq
    projections = shape.projection_shapes().values()
    recompute = 1 if ckpt else 0
    base = sum(o * i for o, i in projections) * layers * tokens * (2 + recompute)
    lora = sum(o + i for o, i in projections) * rank * layers * tokens * (4 + recompute)
    head = shape.vocab_size * shape.hidden_size * tokens * 2
    pairs = batch * seq * (seq + 1) // 2
    attention = pairs * shape.num_attention_heads * shape.head_dim * layers * (6 + 2 * recompute)
    return {name: 2.0 * macs for name, macs in
            (("projections", base), ("output layer", head), ("LoRA", lora), ("attention", attention))}


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rates(shape, tokens: int, reps: int) -> dict[str, float]:
    """GFLOP/s of XLA and torch over the decoder's projection products (forward and input gradient)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    seconds, flops = {"XLA": 0.0, "torch": 0.0}, 0.0
    for o, i in shape.projection_shapes().values():
        for a_shape, b_shape in (((tokens, i), (i, o)), ((tokens, o), (o, i))):
            a, b = rng.standard_normal(a_shape, np.float32), rng.standard_normal(b_shape, np.float32)
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            product = jax.jit(jnp.matmul)
            product(ja, jb).block_until_ready()
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            torch.matmul(ta, tb)
            # Interleaved: each library's repetitions alternate with the other's.
            for _ in range(2):
                seconds["XLA"] += _median_time(lambda: product(ja, jb).block_until_ready(), reps)
                seconds["torch"] += _median_time(lambda: torch.matmul(ta, tb), reps)
            flops += 2 * 2.0 * tokens * i * o
    return {name: flops / s / 1e9 for name, s in seconds.items()}


def report(rows: list[dict], shape, rates: dict[str, float], *, info, command, tokens) -> str:
    best = max(rates.values())
    lines = ["# The step's matrix products against this machine's matrix speed", "",
             f"Command: `{command}`", "", "Machine: " + "; ".join(info), "",
             f"Float32 products of SmolLM2-135M's projection shapes at {tokens} tokens (forward and input "
             "gradient), 2 threads: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()) + ".", "",
             "FLOPs: what the step must multiply (experiments/flop_budget.py's docstring). Step times: the "
             "median step of experiments/bench_seq.py's rows. matmul-bound step: FLOPs / "
             f"{best:.0f} GFLOP/s. Ceiling: PEFT's step time / the matmul-bound step, the most any "
             "implementation could gain over PEFT here.", "",
             "| tokens | configuration | TFLOP / step (attention share) | jaxlora s/step | jaxlora GFLOP/s | "
             "PEFT s/step | PEFT GFLOP/s | matmul-bound s/step | ceiling over PEFT | jaxlora over PEFT |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for jax_row, torch_row in zip(rows[::2], rows[1::2], strict=True):
        b, s = jax_row["batch"], jax_row["seq"]
        parts = step_flops(shape, b, s, 16, jax_row["ckpt"])
        total = sum(parts.values())
        times = [statistics.median(r["result"]["times"]) if "times" in r["result"] else None
                 for r in (jax_row, torch_row)]
        bound = total / best / 1e9
        cells = [f"{b} x {s}", f"{'QLoRA' if jax_row['method'] == 'qlora' else 'LoRA'}{' ckpt' if jax_row['ckpt'] else ''}",
                 f"{total / 1e12:.2f} ({parts['attention'] / total:.0%})"]
        for t in times:
            cells += [f"{t:.1f}", f"{total / t / 1e9:.0f}"] if t else ["-", "-"]
        cells += [f"{bound:.1f}", f"{times[1] / bound:.2f}x" if times[1] else "-",
                  f"{times[1] / times[0]:.2f}x" if all(times) else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="experiments/bench_seq.py's rows")
    parser.add_argument("--tokens", type=int, default=2048, help="token count of the measured products")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--markdown", metavar="PATH")
    opts = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    from torch_bridge.smollm2 import ensure_smollm2
    from jaxlora.cli.memory import ModelShape
    from jaxlora.models import LlamaConfig
    shape = ModelShape.from_config(LlamaConfig.from_file(Path(ensure_smollm2()) / "config.json"))
    rows = json.loads(Path(opts.json).read_text())["rows"]
    info = machine_info(probe_environment(argparse.Namespace(device="cpu")))
    rates = matmul_rates(shape, opts.tokens, opts.reps)
    text = report(rows, shape, rates, info=info, command="python " + " ".join(sys.argv), tokens=opts.tokens)
    print(text)
    if opts.markdown:
        from jaxlora.atomic import atomic_write
        atomic_write(opts.markdown, text)


if __name__ == "__main__":
    main()
