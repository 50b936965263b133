"""The signed dynamic 8-bit map and double quantization (`jaxlora.quant.blockwise8`, `codebooks.py`).

Expectations come from formats.md B.3 / B.6 (literal values and hex patterns), from numpy float32
arithmetic, and, for the map itself, from bitsandbytes' own ``create_dynamic_map``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxlora.quant import DYNAMIC_MAP
from jaxlora.quant.blockwise8 import dequantize_scales, nearest_dynamic_code, quantize_scales
from jaxlora.quant.codebooks import DYNAMIC_MIDPOINTS, FP4_THRESHOLDS, NF4_THRESHOLDS


def f32(bits) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


_nearest = jax.jit(nearest_dynamic_code)


# --------------------------------------------------------------------------------------------------
# DYNAMIC_MAP (formats.md B.6.1)
# --------------------------------------------------------------------------------------------------


def test_dynamic_map_shape_order_and_symmetry():
    code = DYNAMIC_MAP
    assert code.dtype == np.float32 and code.shape == (256,)
    assert np.all(np.diff(code) > 0)  # sorted, distinct
    assert len(np.unique(code)) == 256
    assert code[0] == np.float32(-0.99296875)
    assert bits(code[0]) == 0xBF7E3333
    assert code[127] == 0 and bits(code[127]) == 0
    assert code[255] == np.float32(1.0)
    k = np.arange(127)
    np.testing.assert_array_equal(bits(code[k]), bits(-code[254 - k]))


def test_dynamic_map_decades():
    code = DYNAMIC_MAP
    positive = code[code > 0]
    assert positive.size == 128 and (code < 0).sum() == 127
    # Smallest non-zero magnitude: the float32 product f32(0.55) * f32(1e-6) (0x3513a3b7, i.e.
    # 5.5000004e-07; the nearest float32 to 5.5e-7, 0x3513a3b6, is one ulp lower).
    smallest = np.min(np.abs(code[code != 0]))
    assert smallest == np.float32(0.55) * np.float32(1e-6)
    assert bits(smallest) == 0x3513A3B7
    assert abs(float(smallest) - 5.5e-7) <= float(np.spacing(np.float32(5.5e-7)))
    # Decades 1e-6, 1e-5, ..., 1e-1, 1e0 hold 1, 2, 4, ..., 64 positive values (plus 1.0 itself).
    counts = [int(np.sum((positive >= 10.0**i) & (positive < 10.0 ** (i + 1)))) for i in range(-7, 0)]
    assert counts == [1, 2, 4, 8, 16, 32, 64]


def test_dynamic_map_equals_bitsandbytes():
    import bitsandbytes.functional as bnbF

    theirs = bnbF.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8).float().numpy()
    np.testing.assert_array_equal(bits(DYNAMIC_MAP), bits(theirs))


def test_dynamic_midpoints_are_float32_midpoints():
    expected = ((DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) * np.float32(0.5)).astype(np.float32)
    np.testing.assert_array_equal(bits(DYNAMIC_MIDPOINTS), bits(expected))
    assert np.all((DYNAMIC_MAP[:-1] < DYNAMIC_MIDPOINTS) & (DYNAMIC_MIDPOINTS < DYNAMIC_MAP[1:]))


# --------------------------------------------------------------------------------------------------
# nearest_dynamic_code (formats.md B.6.2)
# --------------------------------------------------------------------------------------------------


def test_every_code_value_maps_to_itself():
    out = np.asarray(_nearest(jnp.asarray(DYNAMIC_MAP)))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.arange(256))


def test_exact_midpoints_go_to_the_even_index():
    out = np.asarray(_nearest(jnp.asarray(DYNAMIC_MIDPOINTS))).astype(np.int64)
    k = np.arange(255)
    even = np.where(k % 2 == 0, k, k + 1)
    np.testing.assert_array_equal(out, even)
    # One ulp either side of a midpoint goes to that side's neighbour.
    up = np.asarray(_nearest(jnp.asarray(np.nextafter(DYNAMIC_MIDPOINTS, np.float32(2))))).astype(np.int64)
    down = np.asarray(_nearest(jnp.asarray(np.nextafter(DYNAMIC_MIDPOINTS, np.float32(-2))))).astype(np.int64)
    np.testing.assert_array_equal(up, k + 1)
    np.testing.assert_array_equal(down, k)


def test_special_values():
    x = np.float32([-1.0, 1.0, 0.0, -0.0, np.nan, -2.0, 2.0])
    out = np.asarray(_nearest(jnp.asarray(x))).tolist()
    assert out == [0, 255, 127, 127, 0, 0, 255]
    # Eager (unjitted) call on a 2-D input.
    two_d = nearest_dynamic_code(jnp.asarray(DYNAMIC_MAP.reshape(16, 16)))
    assert two_d.shape == (16, 16)
    np.testing.assert_array_equal(np.asarray(two_d).reshape(-1), np.arange(256))


@settings(max_examples=30, deadline=None, database=None)
@given(hnp.arrays(np.float32, 256, elements=st.floats(-1, 1, width=32)))
def test_nearest_code_property(x):
    out = np.asarray(_nearest(jnp.asarray(x))).astype(np.int64)
    dist = np.abs(x.astype(np.float64)[:, None] - DYNAMIC_MAP.astype(np.float64)[None, :])
    chosen = dist[np.arange(x.size), out]
    # A value exactly on a float32 midpoint goes to the even neighbour (checked above); 107 of those
    # midpoints are rounded, so there the even neighbour can be (by half an ulp) the farther one.
    on_mid = np.isin(x, DYNAMIC_MIDPOINTS)
    assert np.all(chosen[~on_mid] <= dist.min(axis=1)[~on_mid])
    idx = np.searchsorted(DYNAMIC_MIDPOINTS, x[on_mid])
    np.testing.assert_array_equal(out[on_mid], np.where(idx % 2 == 0, idx, idx + 1))


# --------------------------------------------------------------------------------------------------
# dequantize_scales / quantize_scales (formats.md B.6)
# --------------------------------------------------------------------------------------------------


def two_roundings(a, b, c) -> np.float32:
    return np.float32(np.float32(np.float32(a) * np.float32(b)) + np.float32(c))


def test_dequantize_scales_rounds_the_product_before_the_add():
    # code value * nested_absmax is inexact; the offset cancels its float32 rounding exactly, so the
    # two-rounding result is 0 while a fused multiply-add would return the product's rounding error.
    k = 200
    a, b = DYNAMIC_MAP[k], np.float32(0.1234567)
    c = -np.float32(a * b)
    expected = two_roundings(a, b, c)
    fused = np.float32(float(a) * float(b) + float(c))  # a*b is exact in float64
    assert expected == 0.0 and fused != 0.0  # the case does distinguish the two

    codes, nested, offset = jnp.asarray([k], jnp.uint8), jnp.asarray([b]), jnp.float32(c)
    eager = np.asarray(dequantize_scales(codes, nested, offset))
    jitted = np.asarray(jax.jit(dequantize_scales)(codes, nested, offset))
    np.testing.assert_array_equal(bits(eager), bits([expected]))
    np.testing.assert_array_equal(bits(jitted), bits([expected]))


def test_dequantize_scales_many_blocks_against_numpy():
    rng = np.random.default_rng(0)
    nblocks = 700  # three nested blocks, the last partial
    codes = rng.integers(0, 256, size=nblocks).astype(np.uint8)
    nested = rng.uniform(0.01, 2.0, size=3).astype(np.float32)
    offset = np.float32(0.3183099)
    product = (DYNAMIC_MAP[codes] * np.repeat(nested, 256)[:nblocks]).astype(np.float32)
    expected = (product + offset).astype(np.float32)
    out = np.asarray(jax.jit(dequantize_scales)(jnp.asarray(codes), jnp.asarray(nested), jnp.asarray(offset)))
    assert out.dtype == np.float32 and out.shape == (nblocks,)
    np.testing.assert_array_equal(bits(out), bits(expected))


@pytest.mark.parametrize("value,n", [(0.375, 1024), (2.0, 3), (0.375, 1000)])
def test_quantize_scales_all_equal_reconstructs_exactly(value, n):
    # Values whose float32 mean is exact: centred values are all zero, nested_absmax is 0, the NaN of
    # 0 * (1/0) picks code 0, and code * 0 + offset gives the value back. The mean is a sum divided by
    # n, like torch's: 375 / 1000 = 0.375 (multiplying by f32(1/1000) would give 0.37500003).
    absmax = jnp.full((n,), value, jnp.float32)
    codes, nested, offset = quantize_scales(absmax)
    assert np.asarray(offset) == np.float32(value)
    assert np.all(np.asarray(nested) == 0) and np.asarray(nested).shape == (-(-n // 256),)
    assert np.asarray(codes).dtype == np.uint8 and np.asarray(codes).shape == (n,)
    assert np.all(np.asarray(codes) == 0)
    rec = dequantize_scales(codes, nested, offset)
    np.testing.assert_array_equal(bits(rec), bits(np.full(n, value, np.float32)))


def test_quantize_scales_all_equal_with_explicit_offset():
    value = np.float32(0.1234567)
    codes, nested, offset = quantize_scales(jnp.full((1024,), value), offset=value)
    np.testing.assert_array_equal(np.asarray(nested), np.zeros(4, np.float32))
    np.testing.assert_array_equal(bits(dequantize_scales(codes, nested, offset)), bits(np.full(1024, value)))


def test_quantize_scales_round_trip_error_is_within_half_a_code_step():
    rng = np.random.default_rng(1)
    absmax = rng.uniform(0.5, 3.0, size=1000).astype(np.float32)  # 4 nested blocks, the last partial
    codes, nested, offset = quantize_scales(jnp.asarray(absmax))
    rec = np.asarray(dequantize_scales(codes, nested, offset)).astype(np.float64)
    scale = np.repeat(np.asarray(nested), 256)[:1000].astype(np.float64)
    c = np.asarray(codes).astype(np.int64)
    # Neighbouring map values bound the distance to the centred value, times the block scale.
    step = np.max(np.diff(DYNAMIC_MAP.astype(np.float64)))
    assert np.all(np.abs(rec - absmax) <= scale * step / 2 + 1e-6)
    # Each nested block's largest |centred| value is exactly +-1 -> codes 255 or 0 (-0.99296875).
    centred = absmax - np.float32(np.asarray(offset))
    for j in range(4):
        block = centred[256 * j : 256 * (j + 1)]
        arg = int(np.argmax(np.abs(block)))
        assert np.asarray(nested)[j] == np.abs(block[arg])
        assert c[256 * j + arg] == (255 if block[arg] > 0 else 0)


# --------------------------------------------------------------------------------------------------
# 4-bit thresholds (formats.md B.3)
# --------------------------------------------------------------------------------------------------


def test_nf4_thresholds_hex():
    expected = [
        0xBF591CD8, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF,
        0x3DF64862, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D04, 0x3F248DAF, 0x3F5C89DA,
    ]
    assert NF4_THRESHOLDS.dtype == np.float32
    assert bits(NF4_THRESHOLDS).tolist() == expected


def test_fp4_thresholds_are_cudas_literals():
    expected = [0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555]
    assert FP4_THRESHOLDS.dtype == np.float32
    assert bits(FP4_THRESHOLDS).tolist() == expected
    # ... which are the float32 values of the decimal literals in bitsandbytes' CUDA source.
    literals = np.float32([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333])
    assert bits(literals).tolist() == expected
    # Not the exact midpoints (formats.md B.3 table).
    midpoints = [0x3B2AAAAB, 0x3DB00000, 0x3E555556, 0x3E955556, 0x3ED55556, 0x3F155556, 0x3F555556]
    assert bits(f32(expected)).tolist() != midpoints


@pytest.mark.parametrize("offset", [None, 0.5], ids=["mean-offset", "given-offset"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
def test_a_non_finite_scale_makes_its_nested_scale_nan(bad, offset):
    # 600 scales: nested blocks [0, 256), [256, 512) and a partial [512, 600). XLA's fused max alone
    # would drop a NaN that is not the last of its block, and the caller (quantize_4bit) would store
    # finite garbage; a given (finite) offset does not propagate it either.
    quantize = jax.jit(quantize_scales)
    for index in (0, 100, 255, 256, 300, 511, 512, 550, 599):
        absmax = np.full(600, 0.5, np.float32)
        absmax[index] = bad
        _, nested, _ = quantize(jnp.asarray(absmax), None if offset is None else jnp.float32(offset))
        nested = np.asarray(nested)
        assert np.isnan(nested[index // 256]), (index, nested)
        if offset is not None:  # the other blocks are untouched
            assert np.all(np.delete(nested, index // 256) == 0.0), (index, nested)
