"""NF4/FP4 blockwise 4-bit quantization (`jaxlora.quant.fourbit`) and `QuantizedTensor` (`tensor.py`).

Expectations are literal values from formats.md (B.1 tables, B.3 thresholds, B.7 worked examples) or are
computed here with numpy from those literals; bitsandbytes itself is compared in
tests/torch_bridge/test_bnb_quantize.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlora.quant import QuantizedTensor, block_scales, dequantize_4bit, quantize_4bit
from jaxlora.quant.fourbit import unpack_codes


def f32(bits) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


# formats.md B.1: the code tables as float32 bit patterns (index = nibble).
NF4 = f32([
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
])
_FP4_POS = [0x00000000, 0x3BAAAAAB, 0x3F2AAAAB, 0x3F800000, 0x3EAAAAAB, 0x3F000000, 0x3E2AAAAB, 0x3E800000]
# What the dequantizer produces: code 8 is -0.0 (CUDA computes lut[0] * -1), the others mirror 0..7.
FP4_DECODE = f32(_FP4_POS + [b | 0x80000000 for b in _FP4_POS])
DECODE = {"nf4": NF4, "fp4": FP4_DECODE}
# formats.md B.3: NF4 decision thresholds (exact float32 midpoints) and CUDA's FP4 literals.
NF4_T = f32([
    0xBF591CD8, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF,
    0x3DF64862, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D04, 0x3F248DAF, 0x3F5C89DA,
])
FP4_LITERALS = f32([0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555])
FP4_MIDPOINTS = f32([0x3B2AAAAB, 0x3DB00000, 0x3E555556, 0x3E955556, 0x3ED55556, 0x3F155556, 0x3F555556])
FP4_RANK_TO_CODE = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011]

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

_unpack = jax.jit(unpack_codes, static_argnums=1)
_scales = jax.jit(block_scales)


def codes_of(q: QuantizedTensor, n: int | None = None) -> np.ndarray:
    """All codes of q (n defaults to q.size; 2 * len(packed) includes the padding nibble)."""
    return np.asarray(_unpack(q.packed, q.size if n is None else n))


def np_unpack(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    return np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def q4(x, **kw) -> QuantizedTensor:
    return quantize_4bit(jnp.asarray(np.asarray(x, dtype=np.float32)), **kw)


# --------------------------------------------------------------------------------------------------
# formats.md B.7 worked examples and B.2 step 6 (padding)
# --------------------------------------------------------------------------------------------------

B7_X = [0.5, -0.25, 0.1, 1.0, -2.0, 0.0, 0.3, 0.03]


def test_tables_of_the_reference_are_consistent():
    # Sanity of the literals above (formats.md B.1): NF4 sorted with 0 at index 7; FP4 = raw / 12.
    assert np.all(np.diff(NF4) > 0) and NF4[7] == 0
    raw = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], np.float32)
    np.testing.assert_array_equal(bits(FP4_DECODE[:8]), bits(raw / np.float32(12)))
    np.testing.assert_array_equal(bits(NF4_T), bits((NF4[:-1] + NF4[1:]) * np.float32(0.5)))


def test_b7_nf4_example():
    q = q4(B7_X, blocksize=64, quant_type="nf4")
    assert codes_of(q).tolist() == [10, 6, 8, 12, 0, 7, 9, 7]
    assert np.asarray(q.packed).tolist() == [0xA6, 0x8C, 0x07, 0x97]
    assert np.asarray(q.packed).dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(q.absmax), np.float32([2.0]))
    expected = np.float32([0.49222460, -0.18210007, 0.15916060, 0.88141966, -2.0, 0.0, 0.32186040, 0.0])
    out = np.asarray(dequantize_4bit(q))
    assert out.dtype == np.float32 and out.shape == (8,)
    np.testing.assert_array_equal(out, expected)
    # The literals are table[code] * 2 in float32.
    np.testing.assert_array_equal(bits(out), bits(NF4[[10, 6, 8, 12, 0, 7, 9, 7]] * np.float32(2)))


def test_b7_fp4_example():
    q = q4(B7_X, blocksize=64, quant_type="fp4")
    assert codes_of(q).tolist() == [7, 14, 1, 5, 11, 0, 6, 1]
    assert np.asarray(q.packed).tolist() == [0x7E, 0x15, 0xB0, 0x61]
    expected = np.float32([0.5, -0.33333334, 0.010416667, 1.0, -2.0, 0.0, 0.33333334, 0.010416667])
    np.testing.assert_array_equal(np.asarray(dequantize_4bit(q)), expected)


def test_b7_nf4_double_quant_example():
    x = np.zeros(128, np.float32)
    x[0], x[1], x[2], x[64], x[65] = 2.0, -0.5, 0.3, -1.0, 0.25
    q = q4(x, blocksize=64, quant_type="nf4", double_quant=True)
    assert q.double_quant
    packed = np.asarray(q.packed)
    assert packed[:3].tolist() == [0xF4, 0x97, 0x77] and packed[32:34].tolist() == [0x0A, 0x77]
    assert codes_of(q)[:4].tolist() == [15, 4, 9, 7] and codes_of(q)[64:67].tolist() == [0, 10, 7]
    assert np.asarray(q.offset) == np.float32(1.5) and np.asarray(q.offset).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), np.float32([0.5]))
    assert np.asarray(q.absmax).dtype == np.uint8
    assert np.asarray(q.absmax).tolist() == [255, 0]
    scales = np.asarray(block_scales(q))
    np.testing.assert_array_equal(scales, np.float32([2.0, 1.0035156]))
    out = np.asarray(dequantize_4bit(q))
    assert out[64] == np.float32(-1.0035156)
    assert out[1] == np.float32(-0.56888276)
    # Without double quantization the nibbles are the same.
    np.testing.assert_array_equal(packed, np.asarray(q4(x, blocksize=64, quant_type="nf4").packed))


@pytest.mark.parametrize("quant_type,pad", [("nf4", 0x7), ("fp4", 0x0)])
def test_odd_length_padding_nibble_is_the_code_of_zero(quant_type, pad):
    # One partial block: [1.0, 0.5, -1.0] -> NF4 [15, 12, 0] (0.5 < t_12 = 0.50166), FP4 [3, 5, 11], then
    # the padding nibble.
    q = q4([1.0, 0.5, -1.0], blocksize=64, quant_type=quant_type)
    first = {"nf4": [0xFC, 0x00 | pad], "fp4": [0x35, 0xB0 | pad]}[quant_type]
    assert np.asarray(q.packed).tolist() == first
    assert np.asarray(q.packed).shape == (2,)
    # The padding slot lies in a partial block after a full one, and in a 2-D (odd x odd) tensor.
    rng = np.random.default_rng(0)
    for shape, blocksize in [((65,), 64), ((5, 7), 32), ((1,), 4096), ((3, 333), 256)]:
        x = rng.standard_normal(shape).astype(np.float32) + np.float32(3.0)  # no zeros
        q = q4(x, blocksize=blocksize, quant_type=quant_type)
        assert np.asarray(q.packed).shape == ((x.size + 1) // 2,)
        assert int(np.asarray(q.packed)[-1]) & 0xF == pad, shape


def test_single_zero_element_gets_the_all_zero_block_code():
    # A lone 0.0 is an all-zero block: code 0 for the element and, through the same NaN, the padding.
    for quant_type in ("nf4", "fp4"):
        q = q4([0.0], quant_type=quant_type)
        assert np.asarray(q.packed).tolist() == [0x00]
        assert np.asarray(dequantize_4bit(q)).tolist() == [0.0]


# --------------------------------------------------------------------------------------------------
# formats.md B.3: thresholds and tie rules
# --------------------------------------------------------------------------------------------------


def test_nf4_ties_go_to_the_lower_index_and_next_float_goes_up():
    t = NF4_T
    up = np.nextafter(t, np.float32(np.inf))
    down = np.nextafter(t, np.float32(-np.inf))
    # absmax 1.0 (first element): x * (1 / 1.0) == x exactly, so each x is its own normalised value.
    x = np.concatenate([np.float32([1.0]), t, up, down]).astype(np.float32)
    q = q4(x, blocksize=64, quant_type="nf4")
    assert np.asarray(q.absmax).tolist() == [1.0]
    codes = codes_of(q)
    k = np.arange(15)
    assert codes[0] == 15
    np.testing.assert_array_equal(codes[1:16], k)  # on t_k -> lower index k
    np.testing.assert_array_equal(codes[16:31], k + 1)  # one ulp above -> k + 1
    np.testing.assert_array_equal(codes[31:46], k)  # one ulp below -> k


def test_fp4_literal_thresholds():
    x = np.float32([1.0, 0.20833334, 0.20833333, 0.4166667, -0.20833334, -0.20833333, -0.4166667, -0.0, 0.0])
    assert x.view(np.uint32)[1] == 0x3E555556 and x.view(np.uint32)[2] == 0x3E555555
    assert x.view(np.uint32)[3] == 0x3ED55556
    codes = codes_of(q4(x, quant_type="fp4"))
    # 0.20833334 is the exact midpoint of 1/6 (code 6) and 1/4 (code 7), above the literal: rounds up.
    # 0.4166667 equals its literal, the midpoint of 1/3 (code 4) and 1/2 (code 5): rounds down.
    # Negative values mirror with the sign bit; -0.0 is not < 0, so it gets sign 0.
    assert codes.tolist() == [3, 7, 6, 4, 15, 14, 12, 0, 0]


def test_fp4_every_literal_and_midpoint():
    # On each literal: not exceeded (strict >), lower magnitude; one ulp above: the next magnitude.
    # On each exact midpoint: the magnitude the literal puts it on (up where literal < midpoint).
    up = np.nextafter(FP4_LITERALS, np.float32(np.inf))
    pos = np.concatenate([FP4_LITERALS, up, FP4_MIDPOINTS])
    x = np.concatenate([np.float32([1.0]), pos, -pos]).astype(np.float32)
    codes = codes_of(q4(x, blocksize=64, quant_type="fp4"))
    r = np.arange(7)
    rank_mid = np.array([int(np.sum(m > FP4_LITERALS)) for m in FP4_MIDPOINTS])
    np.testing.assert_array_equal(rank_mid, [0, 1, 3, 4, 4, 6, 7])  # B.3: up at .2083 .2917 .5833 .8333
    expected = np.concatenate([r, r + 1, rank_mid])
    expected = np.array([FP4_RANK_TO_CODE[k] for k in expected])
    np.testing.assert_array_equal(codes[1:22], expected)
    np.testing.assert_array_equal(codes[22:43], expected | 8)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_zero_block_takes_cudas_nan_path(quant_type, dtype):
    # Block 1 of 3 is all zero (including -0.0): 0 * (1/0) = NaN -> code 0 (NF4 -1.0 * 0, FP4 +0).
    x = np.ones(96, np.float32)
    x[32:64] = 0.0
    x[40] = -0.0
    q = quantize_4bit(jnp.asarray(x).astype(DTYPES[dtype]), blocksize=32, quant_type=quant_type)
    assert np.asarray(q.absmax).tolist() == [1.0, 0.0, 1.0]
    codes = codes_of(q)
    assert np.all(codes[32:64] == 0)
    out = np.asarray(dequantize_4bit(q)).astype(np.float32)
    assert np.all(out[32:64] == 0.0)
    np.testing.assert_array_equal(out[:32], np.ones(32, np.float32))


# --------------------------------------------------------------------------------------------------
# Argument and value errors
# --------------------------------------------------------------------------------------------------


# Where a bad value can sit, as flat indices, with blocksize 64: (5, 40) has 200 elements, so blocks
# [0, 64), [64, 128), [128, 192) and a partial last block [192, 200); (64, 64) has 64 full blocks.
# XLA's fused max drops a NaN unless it is the last element of its block, so each class is tested.
NON_FINITE_POSITIONS = {
    (5, 40): {
        "first element of the first block": 0, "middle of the first block": 29, "last of the first block": 63,
        "first of a middle block": 64, "middle of a middle block": 101, "last of a middle block": 127,
        "first of the partial last block": 192, "middle of the partial last block": 195,
        "last element (partial last block)": 199,
    },
    (64, 64): {"[0, 0]": 0, "[3, 5]": 3 * 64 + 5, "[63, 0]": 63 * 64, "[63, 63]": 64 * 64 - 1},
}


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bad,word", [(np.nan, "1 NaN and 0 Inf"), (np.inf, "0 NaN and 1 Inf"), (-np.inf, "0 NaN and 1 Inf")],
                         ids=["nan", "+inf", "-inf"])
def test_a_non_finite_value_anywhere_is_rejected(bad, word, dtype, quant_type, double_quant):
    for shape, positions in NON_FINITE_POSITIONS.items():
        for where, flat_index in positions.items():
            x = np.full(shape, 0.5, np.float32)
            x.reshape(-1)[flat_index] = bad
            with pytest.raises(ValueError) as err:
                quantize_4bit(jnp.asarray(x).astype(DTYPES[dtype]), quant_type=quant_type, double_quant=double_quant,
                              name="model.layers.0.mlp.up_proj.weight")
            message = str(err.value)
            index = [int(i) for i in np.unravel_index(flat_index, shape)]
            assert "'model.layers.0.mlp.up_proj.weight'" in message, (where, message)
            assert f"shape {shape}" in message and word in message and "finite" in message, (where, message)
            assert f"first at index {index}" in message, (where, message)


def test_the_first_bad_index_is_reported_in_row_major_order():
    x = np.ones((3, 40), np.float32)
    x[2, 5], x[1, 39], x[0, 7] = np.inf, np.nan, np.nan
    with pytest.raises(ValueError, match=r"an array of shape \(3, 40\) with 2 NaN and 1 Inf values \(first at index \[0, 7\]\)"):
        quantize_4bit(jnp.asarray(x))


def test_double_quantization_whose_scales_overflow_is_rejected():
    # Finite values, but the float32 sum behind the mean of five block scales of 8e37 overflows: the
    # 8-bit scales would be garbage. Without double quantization the same tensor quantizes and
    # reconstructs (8e37 keeps 1/absmax a normal float32, which XLA's CPU code does not flush to 0).
    x = np.full((5, 64), 8e37, np.float32)
    with pytest.raises(ValueError, match=r"block scales of 'w' of shape \(5, 64\).*mean \(inf\) is not finite"):
        quantize_4bit(jnp.asarray(x), double_quant=True, name="w")
    q = quantize_4bit(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(dequantize_4bit(q)), x)


def test_inside_jit_a_non_finite_block_gets_a_nan_scale():
    # An outer jit cannot raise; the block's scale shows the damage instead of a finite stand-in.
    x = np.full((4, 64), 0.5, np.float32)
    x[1, 0], x[2, 17] = np.nan, -np.inf
    absmax = jax.jit(lambda a: quantize_4bit(a).absmax)(jnp.asarray(x))
    assert np.isnan(np.asarray(absmax)).tolist() == [False, True, True, False]


@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0)])
def test_empty_array_is_rejected(shape):
    with pytest.raises(ValueError, match="empty") as err:
        quantize_4bit(jnp.zeros(shape, jnp.float32))
    assert str(shape) in str(err.value)


@pytest.mark.parametrize("blocksize", [16, 8192, 63, 0])
def test_unsupported_blocksize(blocksize):
    with pytest.raises(ValueError) as err:
        q4(np.ones(64), blocksize=blocksize)
    msg = str(err.value)
    assert f"blocksize {blocksize}" in msg
    assert "32, 64, 128, 256, 512, 1024, 2048, 4096" in msg


def test_unsupported_quant_type():
    with pytest.raises(ValueError) as err:
        q4(np.ones(64), quant_type="int4")
    msg = str(err.value)
    assert "'int4'" in msg and "'nf4'" in msg and "'fp4'" in msg


def test_int32_is_rejected():
    with pytest.raises(ValueError) as err:
        quantize_4bit(jnp.ones(64, jnp.int32))
    msg = str(err.value)
    assert "int32" in msg and "float32" in msg and "bfloat16" in msg and "float16" in msg
    with pytest.raises(ValueError, match="int32"):
        quantize_4bit(np.ones(64, np.int32))


def test_float64_is_rejected():
    # Checked before jnp.asarray, which (x64 disabled) would silently make it float32.
    with pytest.raises(ValueError) as err:
        quantize_4bit(np.ones(64, np.float64))
    msg = str(err.value)
    assert "float64" in msg and "float32" in msg and "bfloat16" in msg


# --------------------------------------------------------------------------------------------------
# Storage accounting
# --------------------------------------------------------------------------------------------------


def leaves_nbytes(q: QuantizedTensor) -> int:
    return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(q))


def test_bits_per_parameter_without_double_quant():
    q = q4(np.random.default_rng(0).standard_normal((4096, 64)), blocksize=64)
    assert q.bits_per_parameter == 4.5
    assert q.nbytes == 4096 * 64 // 2 + 4 * 4096 == leaves_nbytes(q)


def test_bits_per_parameter_with_double_quant():
    x = np.random.default_rng(1).standard_normal((4096, 4096), dtype=np.float32)
    q = quantize_4bit(jnp.asarray(x).astype(jnp.bfloat16), blocksize=64, double_quant=True)
    n = 4096 * 4096
    nblocks = n // 64
    expected_bytes = (n + 1) // 2 + nblocks + 4 * math.ceil(nblocks / 256) + 4
    assert q.nbytes == expected_bytes == leaves_nbytes(q)
    assert q.bits_per_parameter == expected_bytes * 8 / n
    assert 4.126 <= q.bits_per_parameter <= 4.128


@pytest.mark.parametrize(
    "shape,blocksize,double_quant",
    [
        ((7,), 32, True),
        ((3, 333), 64, False),
        ((600, 130), 256, True),
        ((1,), 4096, False),
        ((300, 300), 32, True),
    ],
)
def test_nbytes_is_the_sum_of_the_leaves(shape, blocksize, double_quant):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    q = q4(x, blocksize=blocksize, double_quant=double_quant)
    n = x.size
    nblocks = -(-n // blocksize)
    assert q.size == n and q.nblocks == nblocks
    assert np.asarray(q.packed).shape == ((n + 1) // 2,)
    assert np.asarray(q.absmax).shape == (nblocks,)
    if double_quant:
        assert np.asarray(q.nested_absmax).shape == (-(-nblocks // 256),)
        assert np.asarray(q.offset).shape == ()
    else:
        assert q.nested_absmax is None and q.offset is None
    assert q.nbytes == leaves_nbytes(q)
    assert q.bits_per_parameter == 8 * leaves_nbytes(q) / n


# --------------------------------------------------------------------------------------------------
# QuantizedTensor as a pytree
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_pytree_leaves_and_flatten_roundtrip(double_quant):
    x = np.random.default_rng(3).standard_normal((10, 33)).astype(np.float32)
    xd = jnp.asarray(x).astype(jnp.float16)
    q = quantize_4bit(xd, blocksize=32, quant_type="fp4", double_quant=double_quant)
    leaves = jax.tree.leaves(q)
    expected = [q.packed, q.absmax] + ([q.nested_absmax, q.offset] if double_quant else [])
    assert len(leaves) == len(expected)
    for a, b in zip(leaves, expected, strict=True):
        assert a is b
    flat, treedef = jax.tree_util.tree_flatten(q)
    r = jax.tree_util.tree_unflatten(treedef, flat)
    assert isinstance(r, QuantizedTensor)
    meta = (r.shape, r.dtype, r.blocksize, r.quant_type, r.double_quant)
    assert meta == ((10, 33), jnp.dtype(jnp.float16), 32, "fp4", double_quant)
    # tree.map keeps the metadata and makes numpy copies.
    m = q.to_numpy()
    assert isinstance(m.packed, np.ndarray)
    assert (m.shape, m.dtype, m.blocksize, m.quant_type) == (r.shape, r.dtype, 32, "fp4")
    np.testing.assert_array_equal(bits(dequantize_4bit(m)), bits(dequantize_4bit(q)))


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_tensor_passes_through_jit(double_quant):
    x = np.random.default_rng(4).standard_normal((8, 100)).astype(np.float32)
    q = quantize_4bit(jnp.asarray(x).astype(jnp.bfloat16), blocksize=64, double_quant=double_quant)
    eager = np.asarray(dequantize_4bit(q))

    @jax.jit
    def f(t: QuantizedTensor):
        return dequantize_4bit(t), t

    out, same = f(q)
    assert out.dtype == jnp.bfloat16 and out.shape == (8, 100)
    np.testing.assert_array_equal(bits(out), bits(eager))
    assert isinstance(same, QuantizedTensor)
    meta = (same.shape, same.dtype, same.blocksize, same.quant_type)
    assert meta == (q.shape, q.dtype, q.blocksize, q.quant_type)
    np.testing.assert_array_equal(np.asarray(same.packed), np.asarray(q.packed))


def test_quantize_inside_jit_matches_eager():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 96)).astype(np.float32))
    eager = quantize_4bit(x, blocksize=32, double_quant=True)
    traced = jax.jit(lambda a: quantize_4bit(a, blocksize=32, double_quant=True))(x)
    assert jax.tree.structure(eager) == jax.tree.structure(traced)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------------
# dequantize_4bit(dtype=...)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quant_type,double_quant,src", [("nf4", True, "bfloat16"), ("fp4", False, "float32")]
)
def test_dequantize_dtype_argument_is_one_rounding_of_the_float32_product(quant_type, double_quant, src):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((16, 130)) * 3).astype(np.float32)
    xd = jnp.asarray(x).astype(DTYPES[src])
    q = quantize_4bit(xd, blocksize=64, quant_type=quant_type, double_quant=double_quant)
    # Independent float32 product: table[code] * scale.
    codes = np_unpack(q.packed)[: x.size]
    scales = np.repeat(np.asarray(block_scales(q)), 64)[: x.size]
    product = (DECODE[quant_type][codes] * scales).astype(np.float32).reshape(x.shape)
    f32_out = np.asarray(dequantize_4bit(q, dtype=jnp.float32))
    np.testing.assert_array_equal(bits(f32_out), bits(product))
    for name in ("float32", "bfloat16", "float16"):
        out = np.asarray(dequantize_4bit(q, dtype=DTYPES[name]))
        assert out.dtype == np.dtype(NP_DTYPES[name]) and out.shape == x.shape
        expected = product.astype(NP_DTYPES[name])  # numpy / ml_dtypes: round to nearest even
        np.testing.assert_array_equal(bits(out), bits(expected), err_msg=name)
    # Default: the dtype the tensor was quantized from.
    assert np.asarray(dequantize_4bit(q)).dtype == np.dtype(NP_DTYPES[src])
    # Not a double rounding through the source dtype: some float32 products are not bf16 values.
    assert np.any(product.astype(ml_dtypes.bfloat16).astype(np.float32) != product)


# --------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------------------

NF4_MAX_GAP = float(np.max(np.diff(NF4.astype(np.float64))))
FP4_MAX_GAP = float(np.max(np.diff(np.sort(FP4_DECODE.astype(np.float64)))))
# Largest distance between a CUDA FP4 literal and the exact midpoint it replaces (0.583333 vs 0.5833334).
FP4_TIE_SLACK = 2 * float(np.max(np.abs(FP4_LITERALS.astype(np.float64) - FP4_MIDPOINTS)))


@st.composite
def cases(draw):
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 3000)),)
    else:
        shape = (draw(st.integers(1, 60)), draw(st.integers(1, 50)))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        blocksize=draw(st.sampled_from(BLOCKSIZES)),
        quant_type=draw(st.sampled_from(["nf4", "fp4"])),
        double_quant=draw(st.booleans()),
        kind=draw(st.sampled_from(["normal", "zero_block", "grid", "outliers"])),
        exponent=draw(st.integers(-3, 3)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_data(c) -> np.ndarray:
    """Exact values (float32) of a test tensor in the case's dtype."""
    rng = np.random.default_rng(c["seed"])
    n = math.prod(c["shape"])
    x = rng.standard_normal(n) * 10.0 ** c["exponent"]
    if c["kind"] == "zero_block":
        x[: c["blocksize"]] = 0.0
        x[rng.integers(n)] = -0.0
    elif c["kind"] == "grid":  # multiples of 1/24 of the block max: lands on ties and on code values
        x = rng.integers(-24, 25, size=n) * 2.0 ** c["exponent"]
        x[:: c["blocksize"]] = 24 * 2.0 ** c["exponent"]
    elif c["kind"] == "outliers":
        x[rng.integers(n, size=1 + n // 200)] *= 50.0
    x = np.clip(x, -6e4, 6e4).astype(np.float32)
    return np.asarray(jnp.asarray(x).astype(DTYPES[c["dtype"]])).astype(np.float32).reshape(c["shape"])


def np_block_scales(q: QuantizedTensor) -> np.ndarray:
    """float32 per-block scales, reconstructed in numpy (formats.md B.6: two float32 roundings)."""
    if not q.double_quant:
        return np.asarray(q.absmax)
    from jaxlora.quant.codebooks import DYNAMIC_MAP

    codes = np.asarray(q.absmax).astype(np.int64)
    nested = np.repeat(np.asarray(q.nested_absmax), 256)[: codes.size]
    return ((DYNAMIC_MAP[codes] * nested).astype(np.float32) + np.asarray(q.offset)).astype(np.float32)


@settings(max_examples=30, deadline=None, database=None)
@given(cases())
def test_properties_of_quantize_and_dequantize(c):
    x = make_data(c)
    n, bs, qt = x.size, c["blocksize"], c["quant_type"]
    xd = jnp.asarray(x).astype(DTYPES[c["dtype"]])
    q = quantize_4bit(xd, blocksize=bs, quant_type=qt, double_quant=c["double_quant"])
    nblocks = -(-n // bs)
    flat = x.reshape(-1)
    blocks = np.pad(flat, (0, nblocks * bs - n)).reshape(nblocks, bs)
    absmax = np.max(np.abs(blocks), axis=1)  # the true float32 block maxima

    # (a) codes are nibbles, two per byte, padding nibble included.
    packed = np.asarray(q.packed)
    assert packed.dtype == np.uint8 and packed.shape == ((n + 1) // 2,)
    all_codes = codes_of(q, 2 * packed.size)
    np.testing.assert_array_equal(all_codes, np_unpack(packed))
    assert all_codes.min() >= 0 and all_codes.max() <= 15
    codes = all_codes[:n]
    if n % 2:
        last_block_zero = absmax[-1] == 0
        assert all_codes[-1] == (0 if last_block_zero or qt == "fp4" else 7)
    if not c["double_quant"]:
        np.testing.assert_array_equal(bits(q.absmax), bits(absmax))

    # (b) dequantized values are table[code] * scale, cast once to the dtype.
    table = DECODE[qt]
    scales = np_block_scales(q)
    np.testing.assert_array_equal(bits(_scales(q)), bits(scales))
    scale_of = np.repeat(scales, bs)[:n]
    true_of = np.repeat(absmax, bs)[:n]
    product = (table[codes] * scale_of).astype(np.float32)
    deq = np.asarray(dequantize_4bit(q))
    assert deq.shape == x.shape and deq.dtype == np.dtype(NP_DTYPES[c["dtype"]])
    np.testing.assert_array_equal(bits(deq.reshape(-1)), bits(product.astype(NP_DTYPES[c["dtype"]])))

    # ... and the code is a nearest table entry to x / absmax (NF4 exactly; FP4 up to CUDA's literals).
    live = true_of > 0
    assert np.all(codes[~live] == 0)  # all-zero blocks: the NaN path
    s = (flat[live] * (np.float32(1) / true_of[live])).astype(np.float32).astype(np.float64)
    dist = np.abs(s[:, None] - table.astype(np.float64)[None, :])
    chosen = dist[np.arange(s.size), codes[live]]
    if qt == "nf4":
        # A value exactly on a float32 threshold t_k goes to k (B.3); six t_k lie a few ulps above the
        # real midpoint, so there the lower index can be (by those ulps) the farther one.
        on_t = s[:, None] == NF4_T.astype(np.float64)[None, :]
        tie = np.any(on_t, axis=1)
        np.testing.assert_array_equal(codes[live][tie], np.argmax(on_t[tie], axis=1))
        assert np.all(chosen[~tie] <= dist.min(axis=1)[~tie]), np.max(chosen - dist.min(axis=1))
    else:
        assert np.all(chosen <= dist.min(axis=1) + FP4_TIE_SLACK), np.max(chosen - dist.min(axis=1))
    if qt == "fp4":  # the sign bit is the sign of x (-0.0 and +0 both get 0)
        assert np.all((codes[live] >= 8) == (s < 0))

    # (c) reconstruction error within half the largest table gap, plus the double-quant scale error and
    # the final rounding to the dtype.
    gap = NF4_MAX_GAP if qt == "nf4" else FP4_MAX_GAP
    eps = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}[c["dtype"]]
    d64 = deq.reshape(-1).astype(np.float64)
    # (2**-25 absolute: float16 results can be subnormal.)
    bound = true_of * (gap / 2 + 1e-6) + np.abs(true_of - scale_of) + np.abs(d64) * eps + 2.0**-25
    err = np.abs(flat.astype(np.float64) - d64)
    assert np.all(err <= bound), np.max(err - bound)

    # (d) re-quantizing the dequantized tensor gives the same codes (no double quant). The one
    # exception: FP4 code 8 decodes to -0.0, which re-quantizes to code 0 (-0.0 is not < 0).
    if not c["double_quant"]:
        q2 = quantize_4bit(jnp.asarray(deq), blocksize=bs, quant_type=qt)
        codes2 = codes_of(q2, 2 * packed.size)
        np.testing.assert_array_equal(bits(q2.absmax), bits(q.absmax))
        differ = codes2 != all_codes
        if qt == "fp4":
            assert np.all(all_codes[differ] == 8) and np.all(codes2[differ] == 0)
        else:
            assert not np.any(differ)
