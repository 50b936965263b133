"""GPU quantize/dequantize throughput: jaxlora (jit, XLA GPU) vs bitsandbytes' CUDA kernels, one run.

    python experiments/gpu/bench_quant_gpu.py     (run by experiments/gpu/run.sh)

Both sides get the same fp32 input on the GPU; each timing is the median of 20 runs after warm-up,
synchronised (block_until_ready / torch.cuda.synchronize) before the clock stops. The outputs are
compared too (packed codes and dequantized values), so the two sides do the same work.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import bitsandbytes.functional as bnbF

from jaxlora.quant import QuantizedTensor, block_scales, dequantize_4bit, quantize_4bit
from jaxlora.quant.codebooks import NF4_THRESHOLDS
from jaxlora.quant.fourbit import _quantize_core, unpack_codes


def code_differences(x_np, q, packed_b):
    """How many NF4 codes differ from bitsandbytes', and how far (in float32 ulps) each differing
    element's normalised value x * (1/absmax) lies from the nearest threshold."""
    n = x_np.size
    ours = np.asarray(unpack_codes(q.packed, n))
    theirs = np.asarray(unpack_codes(jnp.asarray(packed_b.cpu().numpy().reshape(-1)), n))
    differ = np.nonzero(ours != theirs)[0]
    if differ.size == 0:
        return "0 codes differ"
    absmax = np.asarray(block_scales(q))[differ // q.blocksize]
    scaled = x_np.reshape(-1)[differ] * (np.float32(1) / absmax)
    nearest = NF4_THRESHOLDS[np.argmin(np.abs(scaled[:, None] - NF4_THRESHOLDS[None, :]), axis=1)]
    ulps = np.abs(scaled.view(np.int32).astype(np.int64) - nearest.astype(np.float32).view(np.int32).astype(np.int64))
    return (f"{differ.size} of {n} codes differ ({differ.size / n:.1e}), all by one code: {bool(np.all(np.abs(ours[differ].astype(int) - theirs[differ]) == 1))}, "
            f"distance of x/absmax to the threshold: max {ulps.max()} ulp")


def dequantize_state_of_bnb(packed_b, state_b, shape):
    """jaxlora's dequantization of bitsandbytes' own state, compared bit for bit with bitsandbytes'."""
    dq = state_b.state2 is not None
    q = QuantizedTensor(
        jnp.asarray(packed_b.cpu().numpy().reshape(-1)),
        jnp.asarray(state_b.absmax.cpu().numpy()),
        jnp.asarray(state_b.state2.absmax.cpu().numpy()) if dq else None,
        jnp.asarray(state_b.offset.cpu().numpy()) if dq else None,
        shape=shape, dtype=jnp.float32, blocksize=64, quant_type="nf4",
    )
    ours = np.asarray(dequantize_4bit(q)).reshape(-1)
    theirs = bnbF.dequantize_4bit(packed_b, state_b).cpu().numpy().reshape(-1)
    return int(np.sum(ours.view(np.uint32) != theirs.view(np.uint32)))


def median_ms(fn, sync, reps=20):
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    print(f"device: {torch.cuda.get_device_name(0)}, jax {jax.__version__} on {jax.devices()[0]}")
    print("| shape | double quant | op | jaxlora ms | bitsandbytes ms | bnb / jaxlora | jaxlora GB/s |")
    print("|---|---|---|---|---|---|---|")
    for shape in [(4096, 4096), (8192, 8192), (1536, 576)]:
        x_np = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        x_j = jax.device_put(x_np)
        x_t = torch.from_numpy(x_np).cuda()
        for dq in (False, True):
            core = lambda: _quantize_core(x_j, blocksize=64, quant_type="nf4", double_quant=dq)  # noqa: E731
            t_q = median_ms(core, lambda: jax.block_until_ready(core()))
            t_qb = median_ms(lambda: bnbF.quantize_4bit(x_t, blocksize=64, quant_type="nf4", compress_statistics=dq), torch.cuda.synchronize)
            q = quantize_4bit(x_j, double_quant=dq)
            packed_b, state_b = bnbF.quantize_4bit(x_t, blocksize=64, quant_type="nf4", compress_statistics=dq)
            same_codes = code_differences(x_np, q, packed_b)
            bits_differ = dequantize_state_of_bnb(packed_b, state_b, shape)
            t_d = median_ms(lambda: dequantize_4bit(q), lambda: jax.block_until_ready(dequantize_4bit(q)))
            t_db = median_ms(lambda: bnbF.dequantize_4bit(packed_b, state_b), torch.cuda.synchronize)
            nbytes = x_np.nbytes
            name = "x".join(map(str, shape))
            print(f"| {name} | {dq} | quantize | {t_q:.3f} | {t_qb:.3f} | {t_qb / t_q:.2f}x | {nbytes / t_q / 1e6:.0f} |"
                  f"  ({same_codes})")
            print(f"| {name} | {dq} | dequantize | {t_d:.3f} | {t_db:.3f} | {t_db / t_d:.2f}x | {nbytes / t_d / 1e6:.0f} |"
                  f"  (jaxlora's dequantization of bitsandbytes' state: {bits_differ} values differ in any bit)")


if __name__ == "__main__":
    main()
