"""The README's main job (for now): quantize a weight matrix to NF4 and train a QLoRA layer on it.

    python experiments/demo_qlora_layer.py [--out 2048] [--in 2048] [--steps 200]

Prints the storage of the quantized weight (bits per parameter, with and without double
quantization), the quantization error, then trains a rank-16 LoRA adapter on the frozen 4-bit
weight towards a "fine-tuned" layer ``W + U V^T`` (a rank-8 change), printing the loss as it falls
to the floor set by the 4-bit quantization error.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlora.nn import Linear4bit, LoraLinear
from jaxlora.quant import dequantize_4bit, quantize_4bit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=int, default=2048, help="output features (default 2048)")
    parser.add_argument("--in", dest="in_features", type=int, default=2048, help="input features (default 2048)")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps on the LoRA parameters (default 200)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.out, args.in_features)) / np.sqrt(args.in_features)).astype(np.float32)
    print(f"weight {w.shape} float32: {w.nbytes / 2**20:.1f} MiB, 32 bits/param")
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            t0 = time.perf_counter()
            q = quantize_4bit(w, quant_type=quant_type, double_quant=double_quant)
            jax.block_until_ready(q.packed)
            err = np.asarray(dequantize_4bit(q)) - w
            rel = np.linalg.norm(err) / np.linalg.norm(w)
            print(
                f"  {quant_type} double_quant={double_quant!s:5}: {q.nbytes / 2**20:6.2f} MiB, "
                f"{q.bits_per_parameter:.3f} bits/param, relative error {rel:.4f}, "
                f"max |error| {np.abs(err).max():.4f}  ({(time.perf_counter() - t0) * 1e3:.0f} ms incl. compile)"
            )

    # QLoRA: the frozen NF4 (double-quantized) weight plus a rank-16 adapter, trained towards the
    # layer W + U V^T. The loss cannot go below the error of the 4-bit base itself (the floor).
    layer = LoraLinear(Linear4bit.from_weight(w, compute_dtype=jnp.float32), r=16, lora_alpha=32, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adam(3e-3), wrt=nnx.LoRAParam)
    u = rng.standard_normal((args.out, 8)).astype(np.float32)
    v = rng.standard_normal((args.in_features, 8)).astype(np.float32)
    delta = 0.5 * np.linalg.norm(w) * (u @ v.T) / np.linalg.norm(u @ v.T)
    w_true = jnp.asarray(w + delta)
    w_base = dequantize_4bit(layer.base.quantized, jnp.float32)

    def loss_fn(model, x):
        return jnp.mean((model(x) - x @ w_true.T) ** 2)

    @nnx.jit
    def train_step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x)
        optimizer.update(model, grads)
        return loss

    trainable = sum(v.size for v in jax.tree.leaves(nnx.state(layer, nnx.LoRAParam)))
    print(f"QLoRA layer: {trainable:,} trainable LoRA parameters ({100 * trainable / w.size:.2f}% of the weight)")
    x_eval = jnp.asarray(rng.standard_normal((256, args.in_features)).astype(np.float32))
    floor = float(jnp.mean((x_eval @ (w_base - jnp.asarray(w)).T) ** 2))
    print(f"  4-bit quantization error alone (the floor): eval loss {floor:.6f}")
    print(f"  step    0  eval loss {float(loss_fn(layer, x_eval)):.6f}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = jnp.asarray(rng.standard_normal((64, args.in_features)).astype(np.float32))
        loss = train_step(layer, optimizer, x)
        if step % 20 == 0 or step == args.steps:
            print(f"  step {step:4d}  train loss {float(loss):.6f}  eval loss {float(loss_fn(layer, x_eval)):.6f}")
    print(f"  {args.steps} forward/backward steps in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
