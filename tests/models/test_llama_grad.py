"""The custom gradients of jaxlora/models/llama.py, `grouped_attention` and `swiglu`, against autodiff
of textbook references: exact (float64) gradients, each element within a rounding bound derived
below (model and notation: tests/error_bounds.py), in float32, bfloat16 and float64, plus
finite differences (check_grads) in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxlora.models.llama import grouped_attention, swiglu
from tests.error_bounds import (abs_einsum, accumulation_roundoff, assert_within, dot_bound, exact, fn_error, gamma,
                                narrowing, random_array, unit_roundoff)

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float64]
# Largest bound, as a share of the gradient's scale, that still makes a useful check (see `assert_within`).
# float32: the worst-case bounds of the attention gradients reach 6e-5 of the scale here (measured
# errors: ~1e-7). bfloat16 attention rounds its scores to 8 bits before the softmax, as transformers does
# in bfloat16: with scores up to ~4 here that is a worst-case perturbation of ~0.05, which the bound
# carries through the softmax and the backward pass, so the largest elements' bounds reach 0.75x the
# gradient's scale. Most elements' bounds are far smaller: each of a missing 1/sqrt(d) in the backward
# pass, a missing softmax Jacobian term, a missing mask or a wrong operand in dk fails every bfloat16
# case (checked by editing the code), as it fails the float32 and float64 ones.
SHARP = {jnp.float32: 1e-4, jnp.bfloat16: 1.0, jnp.float64: 1e-12}


def _value_and_vjp(fn, primals, cotangent):
    """``(fn(*primals), vjp(cotangent))``, jitted (one compilation instead of one per primitive)."""

    def run(primals, cotangent):
        out, vjp = jax.vjp(fn, *primals)
        return out, vjp(cotangent)

    return jax.jit(run)(tuple(primals), cotangent)


def _vjp_exactly(fn, primals, cotangent):
    """``fn(*primals)`` and its VJP of ``cotangent``, autodiff in float64, as numpy."""
    with jax.enable_x64(True):
        out, grads = _value_and_vjp(fn, [jnp.asarray(exact(a)) for a in primals], jnp.asarray(exact(cotangent)))
        return np.asarray(out), tuple(np.asarray(a) for a in grads)


def _inputs(dtype):
    """Random inputs, made in float32 and rounded to ``dtype`` (float64 inside an x64 context)."""
    if dtype == jnp.float64:
        return lambda rng, shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale)
    return lambda rng, shape, scale=1.0: random_array(rng, shape, dtype, scale)


# -- attention -----------------------------------------------------------------------------------------

def reference_attention(q, k, v, allowed):
    """Textbook grouped-query attention: transformers' repeat_kv, masked softmax, no custom gradient."""
    b, kv, groups, s, d = q.shape
    heads = q.reshape(b, kv * groups, s, d)  # head h = kv_head * groups + group
    keys, values = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
    scores = jnp.einsum("bhqd,bhtd->bhqt", heads, keys) / jnp.sqrt(jnp.asarray(d, heads.dtype))
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqt,bhtd->bhqd", jax.nn.softmax(scores, axis=-1), values).reshape(q.shape)


def attention_mask(batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    """``allowed [batch, seq, seq]``, one kind of mask per batch row, in turn: causal and right-padded
    (its last 2 keys); causal and left-padded (its first 2 keys, so that its first 2 queries see no
    key at all); packed, causal within segments (``[1, 1, 1, 2, 2, 2, 0]`` for 7 tokens; 0 = padding,
    which sees nothing); random keys per query with one query row that sees none.
    """
    causal = np.tril(np.ones((seq, seq), bool))
    segments = np.array([1] * (seq // 2) + [2] * (seq - seq // 2 - 1) + [0])
    packed = causal & (segments[:, None] == segments[None, :]) & (segments[None, :] != 0)
    random = rng.random((seq, seq)) < 0.6
    random[seq // 2] = False
    right, left = causal.copy(), causal.copy()
    right[:, -2:] = False
    left[:, :2] = False
    kinds = [right, left, packed, random]
    return np.stack([kinds[row % len(kinds)] for row in range(batch)])


def attention_gradient_bounds(q, k, v, allowed, grad_out, dtype):
    """First-order rounding bounds of `grouped_attention`'s output and gradients, element by element.

    The custom code, step by step (u: roundoff of ``dtype``; u_a: of the float32 (float64) type the
    softmax and the sums run in; n: rounding a result to 16 bits, 0 in float32/float64; c = d^-1/2;
    `dot_bound`: accumulation over n terms plus the 16-bit rounding of the result):
      scores  S = (Q K^T -> dtype) * c: a dot over d, then c and the product rounded in dtype:
              eS = c dot_bound(d) + 2u |S| (masked entries are an exact constant).
      softmax P = exp(S - m) / sum: relative error of P_ij at most eS_ij + sum_j P_ij eS_ij (its own
              score, and the normalizer, whose log moves by the P-weighted mean of the score errors),
              the same two terms for the rounding of the shift, u_a |S - m|, then exp (fn_error, own
              and in the normalizer), gamma(t) for the normalizer's sum and u_a for the division.
              Masked entries are exactly 0; a row with no allowed key is uniform up to the sum and
              division.
      output  O = (P -> dtype) V: eO = (eP + n P)|V| + dot_bound(t).
      dP      = dO V^T: e_dP = dot_bound(d).
      r       = sum_t P dP (t products and a t-term sum in u_a):
              e_r = sum_t (e_dP P + |dP| eP) + gamma(t + 1) sum_t P |dP|.
      dS      = mask * c * P (dP - r) -> dtype: c (eP |dP - r| + P (e_dP + e_r + u_a |dP - r|)) for the
              inputs and the subtraction, 3 u_a c P |dP - r| for the product and the scaling, n |dS|.
      dQ      = dS K (over t), dK = dS^T Q and dV = (P -> dtype)^T dO (over the groups x s queries of a
              kv head): each the error of its operand times the other's magnitude, plus its dot_bound.
    Returns the bounds of ``(out, dq, dk, dv)``.
    """
    b, kv, groups, s, d = q.shape
    t = k.shape[2]
    u, u_a, n = unit_roundoff(dtype), accumulation_roundoff(dtype), narrowing(dtype)
    c = d**-0.5
    Q, dO = (exact(a).reshape(b, kv, groups * s, d) for a in (q, grad_out))
    K, V = exact(k), exact(v)
    M = np.broadcast_to(allowed[:, None, None], (b, kv, groups, s, t)).reshape(b, kv, groups * s, t)
    has_key = M.any(axis=-1, keepdims=True)
    raw = np.einsum("bkqd,bktd->bkqt", Q, K)
    S = c * raw
    m = np.where(has_key, np.max(np.where(M, S, -np.inf), axis=-1, keepdims=True, initial=-np.inf), 0.0)
    e = np.where(M, np.exp(S - m), 0.0)
    P = np.where(has_key, e / np.maximum(e.sum(-1, keepdims=True), 1e-300), 1.0 / t)
    eS = np.where(M, c * dot_bound(d, dtype, abs_einsum("bkqd,bktd->bkqt", Q, K), raw) + 2 * u * np.abs(S), 0.0)
    shift = np.where(M, u_a * np.abs(S - m), 0.0)
    rel_p = (eS + np.sum(P * eS, -1, keepdims=True) + shift + np.sum(P * shift, -1, keepdims=True)
             + 2 * fn_error(jnp.promote_types(dtype, jnp.float32)) + gamma(t, u_a) + u_a)
    err_p = P * rel_p
    out = (err_p + n * P) @ np.abs(V) + dot_bound(t, dtype, P @ np.abs(V), P @ V)
    dP = np.einsum("bkqd,bktd->bkqt", dO, V)
    err_dP = dot_bound(d, dtype, abs_einsum("bkqd,bktd->bkqt", dO, V), dP)
    r = np.sum(P * dP, -1, keepdims=True)
    err_r = (np.sum(err_dP * P + np.abs(dP) * err_p, -1, keepdims=True)
             + gamma(t + 1, u_a) * np.sum(P * np.abs(dP), -1, keepdims=True))
    diff = np.abs(dP - r)
    dS = np.where(M, c * P * (dP - r), 0.0)
    err_dS = (np.where(M, c * (err_p * diff + P * (err_dP + err_r + u_a * diff) + 3 * u_a * P * diff), 0.0)
              + n * np.abs(dS))
    err_dQ = err_dS @ np.abs(K) + dot_bound(t, dtype, np.abs(dS) @ np.abs(K), dS @ K)
    err_dK = (np.einsum("bkqt,bkqd->bktd", err_dS, np.abs(Q))
              + dot_bound(groups * s, dtype, np.einsum("bkqt,bkqd->bktd", np.abs(dS), np.abs(Q)),
                          np.einsum("bkqt,bkqd->bktd", dS, Q)))
    err_dV = (np.einsum("bkqt,bkqd->bktd", err_p + n * P, np.abs(dO))
              + dot_bound(groups * s, dtype, np.einsum("bkqt,bkqd->bktd", P, np.abs(dO)),
                          np.einsum("bkqt,bkqd->bktd", P, dO)))
    return out.reshape(q.shape), err_dQ.reshape(q.shape), err_dK, err_dV


# (batch, kv_heads, groups, seq, head_dim): groups 1, 2 and 4, a single kv head, odd sizes; a batch of 3
# or 4 rows holds each kind of mask (`attention_mask`).
ATTENTION_SHAPES = [(4, 2, 1, 7, 6), (4, 2, 2, 7, 6), (3, 1, 4, 7, 6), (4, 1, 2, 5, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_gradient_matches_autodiff(shape, dtype):
    b, kv, groups, s, d = shape
    rng = np.random.default_rng(sum(shape))
    allowed_np = attention_mask(b, s, rng)
    with jax.enable_x64(dtype == jnp.float64):
        make = _inputs(dtype)
        q, k = make(rng, shape), make(rng, (b, kv, s, d))
        v, grad_out = make(rng, (b, kv, s, d)), make(rng, shape)
        allowed = jnp.asarray(allowed_np)
        out, grads = _value_and_vjp(lambda q, k, v: grouped_attention(q, k, v, allowed), (q, k, v), grad_out)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert not allowed_np.all(axis=-1).all() and (~allowed_np.any(axis=-1)).any()  # padding, and a row with no key
    exact_out, exact_grads = _vjp_exactly(lambda q, k, v: reference_attention(q, k, v, jnp.asarray(allowed_np)),
                                          (q, k, v), grad_out)
    bounds = attention_gradient_bounds(q, k, v, allowed_np, grad_out, dtype)
    for name, actual, expected, bound in zip(("output", "dL/dq", "dL/dk", "dL/dv"), (out, *grads),
                                             (exact_out, *exact_grads), bounds, strict=True):
        assert_within(actual, expected, bound, name, sharp=SHARP[dtype])


def test_attention_gives_no_gradient_to_masked_keys_and_uniform_weights_to_empty_rows():
    """Keys a query may not see get no gradient from it; a query with no allowed key averages all
    values (so its output is the mean of v, and dv gets grad_out / t from it)."""
    rng = np.random.default_rng(11)
    q, k, v = (random_array(rng, s, jnp.float32) for s in ((1, 1, 1, 3, 4), (1, 1, 5, 4), (1, 1, 5, 4)))
    rows = [[True, True, False, False, False], [False] * 5, [True, False, True, False, False]]
    allowed = jnp.asarray(np.array([rows]))
    out, vjp = jax.vjp(lambda q, k, v: grouped_attention(q, k, v, allowed), q, k, v)
    # Row 1's weights are exactly fl(1/5) (exp(0) = 1, a sum of five ones, one division): its output is a
    # 5-term float32 dot product, within gamma(5) + u (the weight's rounding) of mean(|v|).
    u = unit_roundoff(jnp.float32)
    mean_v = exact(v[0, 0]).mean(axis=0)
    bound = (gamma(5, u) + u) * np.abs(exact(v[0, 0])).mean(axis=0)
    assert_within(out[0, 0, 0, 1], mean_v, bound, "output of a row with no allowed key", sharp=1e-5)
    only_row_1 = jnp.zeros_like(out).at[0, 0, 0, 1].set(1.0)
    dq, dk, dv = vjp(only_row_1)
    assert not np.any(np.asarray(dq)) and not np.any(np.asarray(dk))  # constant scores: nothing to move
    np.testing.assert_array_equal(np.asarray(dv[0, 0]), np.full((5, 4), np.float32(0.2)))  # fl(1/5) * 1
    only_row_0 = jnp.zeros_like(out).at[0, 0, 0, 0].set(1.0)
    _, dk, dv = vjp(only_row_0)
    assert not np.any(np.asarray(dk[0, 0, 2:])) and not np.any(np.asarray(dv[0, 0, 2:]))


def test_attention_check_grads_float64():
    """Finite differences in float64 (check_grads, reverse mode, order 1) on GQA with every kind of
    mask: central differences with eps = 1e-4 have truncation error ~eps^2 |f'''| / 6 ~ 1e-9 for O(1)
    scores and rounding error ~u64 |f| / eps ~ 1e-12, far below check_grads' float64 tolerance (1e-5);
    a wrong gradient is off by O(1)."""
    rng = np.random.default_rng(12)
    allowed = jnp.asarray(attention_mask(4, 7, rng))
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(rng.standard_normal(s)) for s in ((4, 1, 2, 7, 6), (4, 1, 7, 6), (4, 1, 7, 6)))
        check_grads(lambda q, k, v: grouped_attention(q, k, v, allowed), (q, k, v), order=1, modes=["rev"])


# -- SwiGLU --------------------------------------------------------------------------------------------

def reference_swiglu(gate, up):
    return jax.nn.silu(gate) * up


def swiglu_bounds(gate, up, grad, dtype):
    """First-order bounds of ``silu(gate) * up`` and of the custom gradient, element by element.

    With S = sigmoid(gate), L = |gate| S = |silu(gate)|, e_s = fn_error (the sigmoid's relative error)
    and u the roundoff of ``dtype`` (16-bit elementwise arithmetic rounds to 16 bits at worst after
    each operation): output ``silu * up``: |up| L (e_s + 2u). ``grad_up = grad * silu``:
    |grad| L (e_s + 2u). ``grad_gate = grad * up * (S + silu (1 - S))``: the bracket's error is
    e_s (S + L |1 - S| + L S) + u (S + 4 L |1 - S|) (the sigmoid's error reaches it three times: in
    S, in silu and in 1 - S, where it is multiplied by silu; then the roundings of 1 - S, the product
    and the sum), and the two outer products add 2u of |grad up| |bracket|.
    """
    u, e_s = unit_roundoff(dtype), fn_error(dtype)
    g, up, grad = exact(gate), exact(up), exact(grad)
    sig = 1 / (1 + np.exp(-g))
    silu_mag = np.abs(g) * sig
    bracket = sig + silu_mag * (1 - sig)
    bracket_err = e_s * (sig + silu_mag * (1 - sig) + silu_mag * sig) + u * (sig + 4 * silu_mag * (1 - sig))
    return (np.abs(up) * silu_mag * (e_s + 2 * u), np.abs(grad * up) * (bracket_err + 2 * u * np.abs(bracket)),
            np.abs(grad) * silu_mag * (e_s + 2 * u))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(2, 7, 13), (3, 5, 6)], ids=str)
def test_swiglu_gradient_matches_autodiff(shape, dtype):
    """Gate values from N(0, 4^2): saturated, linear and negative regions of the sigmoid."""
    rng = np.random.default_rng(sum(shape))
    with jax.enable_x64(dtype == jnp.float64):
        make = _inputs(dtype)
        gate, up, grad = make(rng, shape, 4.0), make(rng, shape), make(rng, shape)
        out, (grad_gate, grad_up) = _value_and_vjp(swiglu, (gate, up), grad)
    assert out.dtype == grad_gate.dtype == grad_up.dtype == dtype
    exact_out, (exact_gate, exact_up) = _vjp_exactly(reference_swiglu, (gate, up), grad)
    out_bound, gate_bound, up_bound = swiglu_bounds(gate, up, grad, dtype)
    sharp = {jnp.float32: 1e-5, jnp.bfloat16: 0.1, jnp.float64: 1e-13}[dtype]
    assert_within(out, exact_out, out_bound, "output", sharp=sharp)
    assert_within(grad_gate, exact_gate, gate_bound, "dL/dgate", sharp=sharp)
    assert_within(grad_up, exact_up, up_bound, "dL/dup", sharp=sharp)


def test_swiglu_check_grads_float64():
    """Finite differences in float64 (check_grads, reverse mode): SwiGLU is smooth, its third derivative
    O(1) for O(1) gates, so the error of central differences with eps = 1e-4 is ~1e-9, far below
    check_grads' float64 tolerance (1e-5)."""
    rng = np.random.default_rng(13)
    with jax.enable_x64(True):
        gate, up = jnp.asarray(rng.standard_normal((2, 7, 13)) * 2), jnp.asarray(rng.standard_normal((2, 7, 13)))
        check_grads(swiglu, (gate, up), order=1, modes=["rev"])
