"""Attention kernels alone: blockwise (jaxlora.nn.attention.blockwise_attention) vs dense (grouped_attention).

    python experiments/bench_attention.py --unmasked --decode 256 1024 4096 --markdown experiments/results/attention.md

Times forward + backward (``jax.vjp`` with a fixed cotangent, one jitted call) at SmolLM2-135M's
attention shape (9 query heads, 3 kv heads, head_dim 64, batch 1) for each sequence length, causal
mask from positions; runs are interleaved (every variant once per round) and the medians reported.
Memory: XLA's temporary bytes of each compiled call (``.lower().compile().memory_analysis()``),
against the ``heads * s^2 * 4`` bytes of one float32 score matrix. Also: block-size variants, the
blockwise kernel with no mask (``--unmasked``: nothing to skip, which shows what skipping the causal
triangle saves), and one decoding step (``--decode``: 1 query over a KV cache) for both kernels.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.nn.attention import AttentionMask, blockwise_attention, computed_blocks
from jaxlora.nn.dense_attention import cached_attention, grouped_attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
MARKER = "<!-- hand-written below: kept when the script rewrites this file -->"


def inputs(s: int, t: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = HEADS // KV_HEADS
    make = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    return make((1, KV_HEADS, groups, s, HEAD_DIM)), make((1, KV_HEADS, t, HEAD_DIM)), make((1, KV_HEADS, t, HEAD_DIM))


def causal_mask(s: int) -> AttentionMask:
    positions = jnp.arange(s, dtype=jnp.int32)[None, :]
    return AttentionMask(positions, positions, jnp.ones((1, s), bool))


def train_call(kernel: str, s: int, dtype, block_q: int = 0, block_k: int = 0, masked: bool = True):
    """(compiled fwd+bwd function, its arguments)."""
    q, k, v = inputs(s, s, dtype)
    grad = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32).astype(dtype)
    mask = causal_mask(s)
    if not masked:  # every key visible to every query: no block can be skipped
        mask = mask._replace(key_positions=jnp.zeros_like(mask.key_positions))
    if kernel == "dense":
        def attend(q, k, v, mask):  # the model builds the [b, s, s] mask once for all layers: an input here
            return grouped_attention(q, k, v, mask)
        mask = mask.dense()
    else:
        def attend(q, k, v, mask):
            return blockwise_attention(q, k, v, mask, block_q=block_q, block_k=block_k)

    def step(q, k, v, mask, grad):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
        return out, vjp(grad)

    args = (q, k, v, mask, grad)
    return jax.jit(step).lower(*args).compile(), args


def decode_call(kernel: str, length: int, dtype, block_k: int = 0):
    """One query over a ``[kv, length, d]`` cache whose slots are all filled."""
    q, k, v = inputs(1, length, dtype)
    keys, values = k.reshape(KV_HEADS, length, HEAD_DIM), v.reshape(KV_HEADS, length, HEAD_DIM)
    mask = AttentionMask(jnp.full((1, 1), length - 1, jnp.int32), jnp.arange(length, dtype=jnp.int32)[None, :],
                         jnp.ones((1, length), bool))
    if kernel == "dense":
        step = lambda q, keys, values, mask: cached_attention(q, keys, values, mask.dense())
    else:
        step = lambda q, keys, values, mask: blockwise_attention(q, keys, values, mask, block_k=block_k)
    args = (q, keys, values, mask)
    return jax.jit(step).lower(*args).compile(), args


def timed(compiled, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def interleaved(variants: dict, rounds: int) -> dict:
    """Median seconds per variant over ``rounds`` rounds, each running every variant once (after one warm-up)."""
    times = {name: [] for name in variants}
    for compiled, args in variants.values():
        timed(compiled, args)
    for _ in range(rounds):
        for name, (compiled, args) in variants.items():
            times[name].append(timed(compiled, args))
    return {name: statistics.median(ts) for name, ts in times.items()}


def temp_mib(compiled) -> float:
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def machine() -> list[str]:
    """lscpu's first lines, the load, and the other processes using CPU (the machine is shared)."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True)
    ps = ps.stdout.splitlines()[1:]
    others = [line.split(None, 1)[1][:110] for line in ps
              if float(line.split()[1]) >= 10 and int(line.split()[0]) != os.getpid()][:6]
    load = os.getloadavg()
    return (["`lscpu | head`:", "", "```", *lscpu, "```", "",
             f"python {platform.python_version()}, jax {jax.__version__}; load average (1/5/15 min) at the start "
             f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", "", "Other processes at >= 10% CPU at the start (`ps`):", ""]
            + [f"- `{line}`" for line in others] + [""])


def train_table(seqs, blocks, dtype, rounds, unmasked) -> list[str]:
    header = ["s", "dense ms"] + [f"blockwise {bq}x{bk} ms" for bq, bk in blocks]
    header += ["dense / blockwise"] + (["blockwise no mask ms", "block pairs computed (causal)"] if unmasked else [])
    header += ["dense temp MiB"] + [f"blockwise {bq}x{bk} temp MiB" for bq, bk in blocks] + ["heads s^2 4B MiB"]
    rows = []
    for s in seqs:
        variants = {"dense": train_call("dense", s, dtype)}
        for bq, bk in blocks:
            variants[f"{bq}x{bk}"] = train_call("blockwise", s, dtype, bq, bk)
        if unmasked:
            variants["unmasked"] = train_call("blockwise", s, dtype, *blocks[0], masked=False)
        med = interleaved(variants, rounds)
        first = f"{blocks[0][0]}x{blocks[0][1]}"
        row = [str(s), f"{med['dense'] * 1e3:.1f}"] + [f"{med[f'{bq}x{bk}'] * 1e3:.1f}" for bq, bk in blocks]
        row += [f"{med['dense'] / med[first]:.2f}"]
        if unmasked:
            computed = computed_blocks(causal_mask(s), *blocks[0])
            row += [f"{med['unmasked'] * 1e3:.1f}", f"{computed.sum()} / {computed.size}"]
        row += [f"{temp_mib(variants[name][0]):.1f}" for name in ["dense"] + [f"{bq}x{bk}" for bq, bk in blocks]]
        row += [f"{HEADS * s * s * 4 / 2**20:.1f}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    title = (f"Forward + backward, {dtype.name}, batch 1, {HEADS} heads / {KV_HEADS} kv heads, head_dim {HEAD_DIM}, "
             f"causal; medians of {rounds} interleaved rounds (ratio: dense over the first blockwise column):")
    return [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows] + [""]


def decode_table(lengths, blocks, dtype, rounds) -> list[str]:
    block_ks = sorted({bk for _, bk in blocks}) + ["t"]
    rows = []
    for length in lengths:
        variants = {"dense": decode_call("dense", length, dtype)}
        for bk in block_ks:
            variants[str(bk)] = decode_call("blockwise", length, dtype, length if bk == "t" else bk)
        med = interleaved(variants, rounds)
        row = [str(length), f"{med['dense'] * 1e6:.0f}"] + [f"{med[str(bk)] * 1e6:.0f}" for bk in block_ks]
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["cache length t", "dense us"] + [f"blockwise block_k {bk} us" for bk in block_ks]
    return [f"One decoding step (1 query over one layer's cache, all slots filled), {dtype.name}; medians of {rounds} "
            "interleaved rounds:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows] + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--blocks", nargs="+", default=["128x256", "256x256", "512x512"],
                        help="blockwise variants as QxK block sizes; the first is the reference one")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--unmasked", action="store_true", help="also time the blockwise kernel with nothing to skip")
    parser.add_argument("--decode", type=int, nargs="*", default=[], help="cache lengths for the decoding step")
    parser.add_argument("--markdown", help="write the tables to this file (keeping its hand-written part)")
    args = parser.parse_args()
    blocks = [tuple(int(x) for x in spec.split("x")) for spec in args.blocks]
    out = ["# Attention kernels alone: blockwise vs dense on CPU", "",
           f"Command: `python experiments/bench_attention.py {shlex.join(sys.argv[1:])}`", ""] + machine()
    for name in args.dtypes:
        out += train_table(args.seqs, blocks, jnp.dtype(name), args.rounds, args.unmasked)
    if args.decode:
        out += decode_table(args.decode, blocks, jnp.dtype(args.dtypes[0]), args.rounds * 4)
    load = os.getloadavg()
    out += [f"Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", ""]
    text = "\n".join(out)
    print(text)
    if args.markdown:
        kept = ""
        if os.path.exists(args.markdown):
            with open(args.markdown) as f:
                old = f.read()
            kept = old[old.index(MARKER):] if MARKER in old else ""
        with open(args.markdown, "w") as f:
            f.write(text + "\n" + (kept or MARKER + "\n"))


if __name__ == "__main__":
    main()
