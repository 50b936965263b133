"""jaxlora's 4-bit quantizer against bitsandbytes' own, on many shapes, dtypes and blocksizes.

On CUDA, bitsandbytes' kernel is the semantics jaxlora implements: codes and scales must be equal.
On CPU, bitsandbytes runs a generic PyTorch path that differs from its CUDA kernel in exactly the
cases of formats.md B.4 and B.6.2; each mismatch here must belong to one of those cases, checked
element by element (`classify_cpu_mismatch`), and anything else fails.

One CPU difference is not in formats.md and was found here: an all-zero *partial final* block gets
absmax 1e-38 on CPU (its partial-block path stores ``absmax.clamp(min=1e-38)``), 0.0 on CUDA; and
since the CPU divides by that, its codes are the code of zero (NF4 7) where CUDA's NaN path gives 0.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnbF = pytest.importorskip("bitsandbytes.functional")

import jax.numpy as jnp  # noqa: E402

from tests.error_bounds import gamma, unit_roundoff  # noqa: E402
from jaxlora.quant import block_scales, dequantize_4bit, quantize_4bit  # noqa: E402
from jaxlora.quant.codebooks import (  # noqa: E402
    DYNAMIC_MAP,
    FP4_CODE,
    FP4_THRESHOLDS,
    NF4_CODE,
    SUPPORTED_BLOCKSIZES,
)
from jaxlora.quant.fourbit import unpack_codes  # noqa: E402
from jaxlora.quant.tensor import QuantizedTensor  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Exact float32 midpoints between neighbouring FP4 magnitudes (sorted), next to CUDA's literals.
_FP4_MAGNITUDES = np.sort(np.unique(np.abs(FP4_CODE)))
FP4_MIDPOINTS = ((_FP4_MAGNITUDES[:-1] + _FP4_MAGNITUDES[1:]) * np.float32(0.5)).astype(np.float32)


def make_input(rng: np.random.Generator, n: int, blocksize: int, kind: str) -> np.ndarray:
    """float32 test data: normal, with outliers, with all-zero blocks, or on exact tie grids."""
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "outliers":
        x[rng.integers(n, size=max(1, n // 500))] *= np.float32(rng.choice([50.0, 1e3, 1e4]))
    elif kind == "zero_blocks":
        nblocks = -(-n // blocksize)
        for b in rng.choice(nblocks, size=max(1, nblocks // 3), replace=False):
            x[b * blocksize : (b + 1) * blocksize] = 0.0
    elif kind == "ties":
        # Multiples of 1/24 (exactly representable in bf16/fp16 for small k): x/absmax lands on the
        # NF4/FP4 midpoints (e.g. 7/24 = 0.29166...) and on exact code values.
        x = rng.integers(-24, 25, size=n).astype(np.float32) / np.float32(8.0)
        x[:: max(1, blocksize)] = 3.0  # absmax 3.0 in most blocks -> x/absmax = k/24
    elif kind == "tiny":
        x *= np.float32(1e-30)
    return x


def cases(count: int, seed: int):
    rng = np.random.default_rng(seed)
    kinds = ["normal", "outliers", "zero_blocks", "ties", "tiny"]
    out = []
    for i in range(count):
        blocksize = int(SUPPORTED_BLOCKSIZES[i % len(SUPPORTED_BLOCKSIZES)])
        dtype = ["float32", "bfloat16", "float16"][i % 3]
        quant_type = ["nf4", "fp4"][(i // 3) % 2]
        kind = kinds[(i // 2) % len(kinds)]
        if dtype == "float16" and kind == "tiny":
            kind = "normal"  # 1e-30 underflows in fp16
        shape = [(int(rng.integers(1, 9000)),), (int(rng.integers(1, 90)), int(rng.integers(1, 130)))][i % 2]
        if i % 8 == 5:
            shape = (int(rng.integers(2, 40)), 16 * int(rng.integers(1, 12)))  # rows that straddle blocks
        out.append(pytest.param(shape, dtype, blocksize, quant_type, kind, i, id=f"{i}-{quant_type}-{dtype}-b{blocksize}-{kind}-{'x'.join(map(str, shape))}"))
    return out


def quantize_both(shape, dtype, blocksize, quant_type, kind, seed, device, double_quant=False):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    x32 = make_input(rng, n, blocksize, kind).reshape(shape)
    t = torch.from_numpy(x32).to(TORCH_DTYPES[dtype])
    x = np.asarray(t.float().numpy())  # the exact values after rounding to dtype
    packed_b, state_b = bnbF.quantize_4bit(
        t.to(device), blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    q = quantize_4bit(jnp.asarray(x).astype(JAX_DTYPES[dtype]), blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    return x.reshape(-1), packed_b.cpu(), state_b, q


def bnb_reference_dequantize(packed_b, state_b, device):
    """bitsandbytes' dequantization of its own state.

    On CPU, bitsandbytes 0.50.2's native kernel applies the wrong block scales when rows are not a
    whole number of blocks (e.g. shape (30, 96) at blocksize 64: max error 2.0 on N(0,1) data). For
    those shapes the reference is bitsandbytes' generic PyTorch implementation of the same formula.
    """
    shape = tuple(state_b.shape)
    if device == "cpu" and len(shape) >= 2 and shape[-1] % state_b.blocksize != 0:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        absmax = state_b.absmax
        if state_b.nested:
            absmax = bnbF.dequantize_blockwise(state_b.absmax, state_b.state2) + state_b.offset
        out = _dequantize_4bit_compute(packed_b.reshape(-1), absmax.float(), state_b.code, state_b.blocksize, shape, state_b.dtype)
    else:
        out = bnbF.dequantize_4bit(packed_b.to(device), state_b)
    return out.cpu().float().numpy().reshape(-1)


def classify_cpu_mismatch(quant_type, ours, theirs, x, absmax_of_elem, last_partial):
    """Name the documented CPU-vs-CUDA difference (formats.md B.4) that explains one mismatch, or None.

    x is the element, absmax_of_elem its block's absmax, last_partial whether the element is in a
    final partial block (where bitsandbytes' CPU path divides instead of multiplying by 1/absmax).
    """
    if absmax_of_elem == 0:
        # CUDA: 0 * (1/0) = NaN -> code 0 (both types); CPU: 0 -> the code of zero (NF4 7).
        if quant_type == "nf4" and ours == 0 and theirs == 7:
            return "nf4_all_zero_block"
        return None
    if x == 0 and quant_type == "nf4" and ours == theirs:
        return None
    scaled = np.float32(x) * (np.float32(1.0) / np.float32(absmax_of_elem))
    scaled_cpu = np.float32(x) / np.float32(absmax_of_elem) if last_partial else scaled
    if quant_type == "nf4":
        # The CPU bucketizes over the same midpoints; only a differently rounded quotient can differ.
        t = (NF4_CODE[:-1] + NF4_CODE[1:]) * np.float32(0.5)
        lo, hi = min(scaled, scaled_cpu), max(scaled, scaled_cpu)
        if last_partial and scaled != scaled_cpu and np.any((t >= lo) & (t <= hi)) and abs(int(ours) - int(theirs)) == 1:
            return "partial_block_division"
        return None
    # FP4.
    sign_ours, sign_theirs = ours & 8, theirs & 8
    mag = np.abs(FP4_CODE)
    if 0 < abs(scaled) <= FP4_THRESHOLDS[0] and theirs == ours ^ 8 and mag[ours] == 0 and mag[theirs] == 0:
        return "fp4_tiny_zero_sign"  # B.4 (i): both are zero codes, the CPU picks the other one
    if sign_ours == sign_theirs or (mag[ours] == 0 and mag[theirs] == 0):
        a = abs(scaled)
        for k in range(1, len(FP4_THRESHOLDS)):
            lit, mid = FP4_THRESHOLDS[k], FP4_MIDPOINTS[k]
            lo, hi = min(lit, mid), max(lit, mid)
            if last_partial:
                lo, hi = min(lo, abs(scaled_cpu)), max(hi, abs(scaled_cpu))
            neighbours = {float(_FP4_MAGNITUDES[k]), float(_FP4_MAGNITUDES[k + 1])}
            if lo <= a <= hi and {float(mag[ours]), float(mag[theirs])} == neighbours:
                return "fp4_tie_threshold"  # B.4 (ii): CUDA literal vs exact midpoint
    return None


def assert_absmax_match(q, state_b, device):
    ours = np.asarray(q.absmax)
    theirs = state_b.absmax.cpu().numpy()
    differ = np.nonzero(ours.view(np.uint32) != theirs.view(np.uint32))[0]
    if device == "cpu" and q.size % q.blocksize and differ.size:
        # Only the all-zero partial final block, clamped to 1e-38 on CPU (see the module docstring).
        assert differ.tolist() == [q.nblocks - 1], differ
        assert ours[-1] == 0 and theirs[-1] == np.float32(1e-38), (ours[-1], theirs[-1])
        return
    assert differ.size == 0, f"absmax differs at blocks {differ[:5]}: {ours[differ[:5]]} vs {theirs[differ[:5]]}"


def assert_codes_match(x, packed_b, state_b, q, quant_type, blocksize, device):
    # Compare every nibble, including the padding nibble of an odd-length tensor (which quantizes 0.0).
    n = 2 * packed_b.numel()
    x = np.concatenate([x, np.zeros(n - x.size, np.float32)])
    ours = np.asarray(unpack_codes(q.packed, n))
    theirs = np.asarray(unpack_codes(jnp.asarray(packed_b.numpy().reshape(-1)), n))
    absmax = np.asarray(block_scales(q))
    mismatch = np.nonzero(ours != theirs)[0]
    if device == "cuda":
        assert mismatch.size == 0, f"{mismatch.size} codes differ from bitsandbytes' CUDA kernel, first at {mismatch[:5]}"
        return {}
    nblocks = -(-n // blocksize)
    counts: dict[str, int] = {}
    for e in mismatch:
        block = e // blocksize
        last_partial = block == nblocks - 1 and q.size % blocksize != 0
        why = classify_cpu_mismatch(quant_type, int(ours[e]), int(theirs[e]), x[e], absmax[block], last_partial)
        assert why is not None, (
            f"element {e}: jaxlora code {ours[e]}, bitsandbytes CPU code {theirs[e]}, x={x[e]!r}, "
            f"absmax={absmax[block]!r}: not a documented CPU/CUDA difference"
        )
        counts[why] = counts.get(why, 0) + 1
    return counts


@pytest.mark.parametrize("shape,dtype,blocksize,quant_type,kind,seed", cases(64, seed=1))
def test_codes_and_absmax_match_bitsandbytes(shape, dtype, blocksize, quant_type, kind, seed, torch_device):
    x, packed_b, state_b, q = quantize_both(shape, dtype, blocksize, quant_type, kind, seed, torch_device)
    assert tuple(packed_b.shape) == ((x.size + 1) // 2, 1)
    assert_absmax_match(q, state_b, torch_device)
    assert_codes_match(x, packed_b, state_b, q, quant_type, blocksize, torch_device)


def test_cpu_exceptions_are_exercised():
    """The exception classes above are not vacuous: each one occurs on data built to trigger it."""
    seen: dict[str, int] = {}
    for quant_type, dtype, kind, blocksize, shape in [
        ("nf4", "float32", "zero_blocks", 64, (1000,)),
        ("fp4", "bfloat16", "ties", 64, (4000,)),
        ("fp4", "float32", "normal", 64, (20000,)),
    ]:
        x, packed_b, state_b, q = quantize_both(shape, dtype, blocksize, quant_type, kind, 7, "cpu")
        for k, v in assert_codes_match(x, packed_b, state_b, q, quant_type, blocksize, "cpu").items():
            seen[k] = seen.get(k, 0) + v
    assert {"nf4_all_zero_block", "fp4_tiny_zero_sign", "fp4_tie_threshold"} <= set(seen), seen


@pytest.mark.parametrize("shape,dtype,blocksize,quant_type,kind,seed", cases(24, seed=2))
def test_dequantize_of_bitsandbytes_state_is_bit_identical(shape, dtype, blocksize, quant_type, kind, seed, torch_device):
    """Our dequantizer reads bitsandbytes' codes and scales and gives its exact output."""
    for double_quant in (False, True):
        x, packed_b, state_b, _ = quantize_both(shape, dtype, blocksize, quant_type, kind, seed, torch_device, double_quant)
        expected = bnb_reference_dequantize(packed_b, state_b, torch_device)
        q = QuantizedTensor(
            jnp.asarray(packed_b.numpy().reshape(-1)),
            jnp.asarray(state_b.absmax.cpu().numpy()),
            jnp.asarray(state_b.state2.absmax.cpu().numpy()) if double_quant else None,
            jnp.asarray(state_b.offset.cpu().numpy()) if double_quant else None,
            shape=shape,
            dtype=JAX_DTYPES[dtype],
            blocksize=blocksize,
            quant_type=quant_type,
        )
        ours = np.asarray(dequantize_4bit(q).astype(jnp.float32)).reshape(-1)
        differ = np.nonzero(ours.view(np.uint32) != expected.view(np.uint32))[0]
        if differ.size and torch_device == "cpu" and quant_type == "fp4":
            # FP4 code 8 is "-0": bitsandbytes' CUDA kernel and scalar CPU kernel decode it as -0.0, as
            # jaxlora does; its generic and AVX512 CPU paths read the stored table, +0.0. Equal values,
            # other sign bit, and nothing else may differ.
            # (With double quantization a reconstructed scale can be negative, flipping both signs.)
            codes = np.asarray(unpack_codes(q.packed, q.size))
            assert np.all(codes[differ] == 8)
            assert np.all(ours[differ] == 0) and np.all(expected[differ] == 0)
            assert np.all((ours[differ].view(np.uint32) ^ expected[differ].view(np.uint32)) == 0x80000000)
            continue
        assert differ.size == 0, f"{differ.size} values differ from bitsandbytes' dequantization, first at {differ[:5]}"


@pytest.mark.parametrize("shape,dtype,blocksize,quant_type,kind,seed", cases(24, seed=3))
def test_double_quantization_matches_bitsandbytes(shape, dtype, blocksize, quant_type, kind, seed, torch_device):
    x, packed_b, state_b, q = quantize_both(shape, dtype, blocksize, quant_type, kind, seed, torch_device, double_quant=True)
    _, _, plain_b, _ = quantize_both(shape, dtype, blocksize, quant_type, kind, seed, torch_device)
    absmax_true = plain_b.absmax.cpu().numpy()
    offset_b = np.float32(state_b.offset.cpu().numpy())
    # The offset is a float32 mean of the (positive) block scales: each side's sum, in its own order, is
    # within gamma(n) of the exact one, and the division adds one rounding, so the two agree to
    # 2 gamma(n + 1) relative. (atol covers the CPU's 1e-38 clamp of an all-zero partial final block,
    # see the module docstring.)
    rtol = 2 * gamma(absmax_true.size + 1, unit_roundoff(jnp.float32))
    np.testing.assert_allclose(np.asarray(q.offset), offset_b, rtol=rtol, atol=1e-38)

    # Run our 8-bit step with bitsandbytes' offset so the codes can be compared one by one.
    from jaxlora.quant.blockwise8 import dequantize_scales, quantize_scales

    codes, nested, offset = quantize_scales(jnp.asarray(absmax_true), offset=offset_b)
    nested_b = state_b.state2.absmax.cpu().numpy()
    codes_b = state_b.absmax.cpu().numpy()
    np.testing.assert_array_equal(np.asarray(nested).view(np.uint32), nested_b.view(np.uint32))
    rec = np.asarray(dequantize_scales(codes, nested, offset))
    rec_b = np.asarray(dequantize_scales(jnp.asarray(codes_b), jnp.asarray(nested_b), jnp.asarray(offset_b)))
    differ = np.nonzero(np.asarray(codes) != codes_b)[0]
    if torch_device == "cuda":
        assert differ.size == 0, f"double-quant codes differ from CUDA at {differ[:5]}"
    for e in differ:
        # B.6.2: the CPU lookup table picked a non-nearest code. Ours must be nearest, theirs the
        # neighbour, and the reconstructed scales must differ by at most that code step.
        c_ours, c_theirs = int(codes[e]), int(codes_b[e])
        scale = nested_b[e // 256]
        target = (absmax_true[e] - offset_b) * (np.float32(1) / scale)
        assert abs(c_ours - c_theirs) == 1, (e, c_ours, c_theirs)
        assert abs(DYNAMIC_MAP[c_ours] - target) <= abs(DYNAMIC_MAP[c_theirs] - target)
        step = abs(DYNAMIC_MAP[c_ours] - DYNAMIC_MAP[c_theirs]) * scale
        assert abs(rec[e] - rec_b[e]) <= step * (1 + 1e-6)
    same = np.ones(codes_b.shape, bool)
    same[differ] = False
    # XLA's CPU backend flushes subnormal float32 results to zero (its GPU backend keeps them); only the
    # CPU's 1e-38 clamp produces such a scale.
    rec_bnb = (bnbF.dequantize_blockwise(state_b.absmax, state_b.state2).cpu().numpy() + offset_b).astype(np.float32)
    subnormal = (np.abs(rec_bnb) < np.finfo(np.float32).tiny) & (rec_bnb != 0)
    assert np.all((rec[same & subnormal] == 0) | (rec[same & subnormal] == rec_bnb[same & subnormal]))
    same &= ~subnormal
    np.testing.assert_array_equal(rec[same].view(np.uint32), rec_b[same].view(np.uint32))
    # bitsandbytes' reconstruction (its dequantize_blockwise) equals ours bit for bit.
    np.testing.assert_array_equal(rec_b[~subnormal].view(np.uint32), rec_bnb[~subnormal].view(np.uint32))
    assert np.all((rec_b[subnormal] == 0) | (rec_b[subnormal] == rec_bnb[subnormal]))
    # Nibbles are the same with or without double quantization.
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(quantize_4bit(jnp.asarray(x.reshape(shape)).astype(JAX_DTYPES[dtype]), blocksize=blocksize, quant_type=quant_type).packed))
