"""jaxlora/nn/attention.py: the blockwise (FlashAttention) and dense kernels, values and custom gradients,
against autodiff in float64 of a textbook reference (repeat_kv, masked softmax), each element within a
rounding bound derived in `attention_bounds` (model and notation: tests/error_bounds.py), in float32,
bfloat16 and float64; finite differences (check_grads) in float64; the blockwise kernel against the
dense one; which blocks it skips; its memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxlora.nn.attention import AttentionMask, blockwise_attention, computed_blocks
from jaxlora.nn.dense_attention import grouped_attention
from tests.error_bounds import (abs_einsum, accumulation_roundoff, assert_within, dot_bound, exact, fn_error, gamma,
                                make_inputs, narrowing, random_array, unit_roundoff, value_and_vjp, vjp_exactly)

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float64]


def reference_attention(q, k, v, allowed, empty_rows: str):
    """Textbook grouped-query attention: transformers' repeat_kv, masked softmax, no custom gradient. A
    row with no allowed key: "uniform" (a masked softmax with the dtype's minimum) or "zero"."""
    b, kv, groups, s, d = q.shape
    heads = q.reshape(b, kv * groups, s, d)  # head h = kv_head * groups + group
    keys, values = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
    scores = jnp.einsum("bhqd,bhtd->bhqt", heads, keys) / jnp.sqrt(jnp.asarray(d, heads.dtype))
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if empty_rows == "zero":
        probs = jnp.where(jnp.any(allowed, axis=-1)[:, None, :, None], probs, 0.0)
    return jnp.einsum("bhqt,bhtd->bhqd", probs, values).reshape(q.shape)


def self_attention_mask(s: int, kinds: str, rng: np.random.Generator) -> AttentionMask:
    """One batch row per letter of ``kinds`` (numpy arrays): "r" causal and right-padded (its last 2
    keys); "l" causal and left-padded (its first 2 keys, so that its first 2 queries see no key at all);
    "p" two examples packed causally (segments ``[1, 1, 1, 2, 2, 2, 0]`` for 7 tokens; 0 = padding, which
    sees nothing); "s" causal by positions that are a random permutation of the token order (no block
    structure: nothing can be skipped), the key with the smallest position masked (its query sees
    nothing). Segments are given when there is a "p" row."""
    order = np.arange(s)
    rows = []
    for kind in kinds:
        positions, valid, segments = order, np.ones(s, bool), np.ones(s, int)
        if kind == "r":
            valid[-2:] = False
        elif kind == "l":
            valid[:2] = False
        elif kind == "p":
            segments = np.array([1] * (s // 2) + [2] * (s - s // 2 - 1) + [0])
            valid = segments != 0
        else:
            positions = rng.permutation(s)
            valid[np.argmin(positions)] = False
        rows.append((positions, valid, segments))
    positions, valid, segments = (np.stack(x) for x in zip(*rows))
    segments = segments.astype(np.int32) if "p" in kinds else None
    return AttentionMask(positions.astype(np.int32), positions.astype(np.int32), valid, segments, segments)


def cache_mask(batch: int, s: int, t: int) -> AttentionMask:
    """``s`` new queries over ``t`` cache slots, as the model decodes: the new tokens sit at slots
    ``t - s - 2 .. t - 3`` (the last two slots are not written yet), causality by slot; row 1 is
    left-padded (its first 2 slots are padding)."""
    start = t - s - 2
    valid = np.broadcast_to(np.arange(t) < start + s, (batch, t)).copy()
    valid[1, :2] = False
    return AttentionMask(np.broadcast_to(start + np.arange(s), (batch, s)).astype(np.int32),
                         np.broadcast_to(np.arange(t), (batch, t)).astype(np.int32), valid)


def attention_bounds(q, k, v, allowed, grad_out, dtype, kernel: str, key_blocks: int = 1):
    """First-order rounding bounds of the output and of dq, dk, dv of ``kernel`` ("dense": `grouped_attention`;
    "blockwise": `blockwise_attention` over ``key_blocks`` key blocks), element by element.

    Both kernels, step by step (u: roundoff of ``dtype``; u_a: of the float32 (float64) type the softmax
    and the sums run in; n: rounding a result to 16 bits, 0 in float32/float64; c = d^-1/2; `dot_bound`:
    accumulation over its n terms plus the 16-bit rounding of the result; P the exact probabilities, m
    the row maximum, l = sum exp(S - m), lse = m + log l):
      scores  S = c Q K^T. dense: the product is rounded to dtype, then scaled in dtype:
              eS = c dot_bound(d) + 2u |S|. blockwise: the product stays in u_a, scaled there:
              eS = c gamma(d, u_a) |Q||K| + u_a |S|. (Masked entries are exact constants.)
      weights W = exp(S - m) up to a factor common to the row (which the normalization cancels): the
              score's error eS, the rounding of the shift, exp (fn_error). Blockwise subtracts the running
              maximum m_j of the blocks so far (|S - m_j| <= |S - m|, and the later maxima add up to at most
              m - m_j <= |S - m|: 2 u_a |S - m| for the shifts), and rescales the block's sums by each later
              block's exp(m_j - m_j+1), up to key_blocks - 1 times, each an exp and a product for the
              sum and the output: relW = eS + k u_a |S - m| + fn + (key_blocks - 1)(fn + 2 u_a), k = 1
              dense, 2 blockwise.
      P       = W / sum W: rel_P = relW + sum_t P relW (the normalizer) + gamma(t) (its sum, in any order
              or blocking) + u_a (the division).
      output  O = (P -> dtype) V: eO = (eP + n P)|V| + dot_bound(t) (blockwise: the t terms summed in
              u_a across blocks and rounded once, the same bound).
      dense backward: P is kept from the forward pass; dP = dO V^T rounded to dtype: e_dP = dot_bound(d);
              r = sum_t P dP: e_r = sum_t (e_dP P + |dP| eP) + gamma(t + 1) sum_t P |dP|.
      blockwise backward: P = exp(S - lse) recomputed: besides rel_P, lse's log (fn |log l|), the sum
              m + log l (u_a |lse|), the shift (u_a |S - lse|); dP stays in u_a: e_dP = gamma(d, u_a)|dO||V|;
              r = D = rowsum(dO * O) with O the rounded output: e_r = sum_d |dO| eO + gamma(d, u_a) sum_d |dO||O|.
      dS      = mask * c * P (dP - r) -> dtype: c (eP |dP - r| + P (e_dP + e_r + u_a |dP - r|)) for the
              inputs and the subtraction, 3 u_a c P |dP - r| for the products and the scaling, n |dS|.
      dQ      = dS K (over t), dK = dS^T Q and dV = (P -> dtype)^T dO (over the groups x s queries of a
              kv head): each the error of its operand times the other's magnitude, plus its dot_bound
              (blockwise: summed in u_a across blocks, rounded once: the same bound).
    A row with no allowed key: dense, uniform weights 1/t (exact but for the sum and the division);
    blockwise, exactly 0 (bounds 0). Returns the bounds of ``(out, dq, dk, dv)``.
    """
    b, kv, groups, s, d = q.shape
    t = k.shape[2]
    u, u_a, n = unit_roundoff(dtype), accumulation_roundoff(dtype), narrowing(dtype)
    fn = fn_error(jnp.promote_types(dtype, jnp.float32))
    c = d**-0.5
    Q, dO = (exact(a).reshape(b, kv, groups * s, d) for a in (q, grad_out))
    K, V = exact(k), exact(v)
    M = np.broadcast_to(np.asarray(allowed)[:, None, None], (b, kv, groups, s, t)).reshape(b, kv, groups * s, t)
    has_key = M.any(axis=-1, keepdims=True)
    raw = np.einsum("bkqd,bktd->bkqt", Q, K)
    S = c * raw
    m = np.where(has_key, np.max(np.where(M, S, -np.inf), axis=-1, keepdims=True, initial=-np.inf), 0.0)
    e = np.where(M, np.exp(S - m), 0.0)
    l = np.maximum(e.sum(-1, keepdims=True), 1e-300)
    empty_weight = 1.0 / t if kernel == "dense" else 0.0
    P = np.where(has_key, e / l, empty_weight)
    magnitude = abs_einsum("bkqd,bktd->bkqt", Q, K)
    if kernel == "dense":
        eS = c * dot_bound(d, dtype, magnitude, raw) + 2 * u * np.abs(S)
        shift, rescalings = 1, 0
    else:
        eS = c * gamma(d, u_a) * magnitude + u_a * np.abs(S)
        shift, rescalings = 2, key_blocks - 1
    rel_w = np.where(M, eS + shift * u_a * np.abs(S - m), 0.0) + fn + rescalings * (fn + 2 * u_a)
    rel_p = rel_w + np.sum(P * rel_w, -1, keepdims=True) + gamma(t, u_a) + u_a
    err_p = P * rel_p
    out = (err_p + n * P) @ np.abs(V) + dot_bound(t, dtype, P @ np.abs(V), P @ V)
    dP = np.einsum("bkqd,bktd->bkqt", dO, V)
    dP_magnitude = abs_einsum("bkqd,bktd->bkqt", dO, V)
    if kernel == "dense":
        err_dP = dot_bound(d, dtype, dP_magnitude, dP)
        r = np.sum(P * dP, -1, keepdims=True)
        err_r = (np.sum(err_dP * P + np.abs(dP) * err_p, -1, keepdims=True)
                 + gamma(t + 1, u_a) * np.sum(P * np.abs(dP), -1, keepdims=True))
    else:
        lse = m + np.log(l)
        err_p = P * (rel_p + fn * np.abs(np.log(l)) + u_a * (np.abs(lse) + np.abs(S - lse)))
        err_dP = gamma(d, u_a) * dP_magnitude
        O = P @ V
        r = np.sum(dO * O, -1, keepdims=True)
        err_r = np.sum(np.abs(dO) * out, -1, keepdims=True) + gamma(d, u_a) * np.sum(np.abs(dO * O), -1, keepdims=True)
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


# Largest bound, as a share of the gradient's scale, that still makes a useful check (see `assert_within`).
# float32: the worst-case bounds reach 6e-5 (dense) and 1.2e-4 (blockwise: P recomputed from lse, D from the
# rounded output) of the scale here; measured errors are ~1e-7. The dense kernel in bfloat16 rounds its
# scores to 8 bits before the softmax, as transformers does in bfloat16: with scores up to ~4 that is a
# worst-case perturbation of ~0.05, which the bound carries through the softmax and the backward pass, so
# the largest elements' bounds reach 0.75x the gradient's scale (most are far smaller: each of a missing
# 1/sqrt(d) in the backward pass, a missing softmax Jacobian term, a missing mask or a wrong operand in dk
# fails every bfloat16 case, checked by editing the code). The blockwise kernel keeps the scores in
# float32: its bfloat16 bounds come from rounding P, dS and the results to 8 bits, up to 0.12 of the
# scale (measured errors: 2-6e-3).
SHARP = {("dense", jnp.float32): 1e-4, ("dense", jnp.bfloat16): 1.0, ("dense", jnp.float64): 1e-12,
         ("blockwise", jnp.float32): 2e-4, ("blockwise", jnp.bfloat16): 0.2, ("blockwise", jnp.float64): 1e-12}


def _check_against_exact(kernel, q, k, v, mask, grad_out, dtype, **blocks):
    allowed = np.asarray(mask.dense())
    if kernel == "dense":
        attend = lambda q, k, v: grouped_attention(q, k, v, jnp.asarray(allowed))
    else:
        attend = lambda q, k, v: blockwise_attention(q, k, v, mask, **blocks)
    with jax.enable_x64(dtype == jnp.float64):
        out, grads = value_and_vjp(attend, (q, k, v), grad_out)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    exact_out, exact_grads = vjp_exactly(
        lambda q, k, v: reference_attention(q, k, v, jnp.asarray(allowed), "uniform" if kernel == "dense" else "zero"),
        (q, k, v), grad_out)
    t = k.shape[2]
    key_blocks = -(-t // min(blocks.get("block_k", t), t))
    bounds = attention_bounds(q, k, v, allowed, grad_out, dtype, kernel, key_blocks)
    for name, actual, expected, bound in zip(("output", "dL/dq", "dL/dk", "dL/dv"), (out, *grads),
                                             (exact_out, *exact_grads), bounds, strict=True):
        assert_within(actual, expected, bound, f"{kernel} {name}", sharp=SHARP[kernel, dtype])


def _random_inputs(rng, shape, t, dtype):
    b, kv, groups, s, d = shape
    make = make_inputs(dtype)
    return make(rng, shape), make(rng, (b, kv, t, d)), make(rng, (b, kv, t, d)), make(rng, shape)


# (kv_heads, groups, seq, head_dim), mask kinds (one batch row each, `self_attention_mask`), blocks:
# groups 1, 2 and 4, a single kv head, odd sizes; block sizes (query, key) that do not divide the lengths
# (the last block overlaps the one before), that leave blocks to skip (all but the shuffled rows), and
# one block for all.
SELF_ATTENTION = [((2, 1, 7, 6), "rlp", (2, 3)), ((2, 2, 7, 6), "rlps", (3, 2)), ((1, 4, 9, 8), "rlp", (4, 4)),
                  ((1, 2, 7, 6), "rls", (512, 512))]
# (batch, kv_heads, groups, new tokens, head_dim), cache slots, blocks: decoding 1 token, prefilling 3.
OVER_A_CACHE = [((2, 2, 2, 1, 8), 9, (1, 4)), ((2, 1, 3, 3, 8), 10, (2, 4))]


def _case_id(case):
    return "x".join(map(str, case[0])) + f"-{case[1]}-blocks%dx%d" % case[-1]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", SELF_ATTENTION, ids=_case_id)
def test_blockwise_matches_exact_attention(case, dtype):
    (kv, groups, s, d), kinds, (block_q, block_k) = case
    shape = (len(kinds), kv, groups, s, d)
    rng = np.random.default_rng(sum(shape))
    mask = self_attention_mask(s, kinds, rng)
    allowed = np.asarray(mask.dense())
    assert (~allowed.any(axis=-1)).any() and not allowed[0].all(axis=-1).any()  # rows with no key; padding
    assert computed_blocks(mask, block_q, block_k).all() == ("s" in kinds or block_q >= s)  # blocks skipped
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v, grad_out = _random_inputs(rng, shape, shape[3], dtype)
    _check_against_exact("blockwise", q, k, v, mask, grad_out, dtype, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", OVER_A_CACHE, ids=lambda c: "x".join(map(str, c[0])) + f"-cache{c[1]}")
def test_blockwise_over_a_cache_matches_exact_attention(case, dtype):
    """Fewer queries than keys (s != t): decoding 1 token and prefilling 3 over a partly filled cache,
    the keys given in the cache's ``[b * kv, t, d]`` layout."""
    shape, t, (block_q, block_k) = case
    rng = np.random.default_rng(sum(shape) + t)
    mask = cache_mask(shape[0], shape[3], t)
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v, grad_out = _random_inputs(rng, shape, t, dtype)
    _check_against_exact("blockwise", q, k, v, mask, grad_out, dtype, block_q=block_q, block_k=block_k)
    flat = lambda x: x.reshape(-1, t, shape[-1])
    with jax.enable_x64(dtype == jnp.float64):
        np.testing.assert_array_equal(blockwise_attention(q, flat(k), flat(v), mask, block_q=block_q, block_k=block_k),
                                      blockwise_attention(q, k, v, mask, block_q=block_q, block_k=block_k))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", SELF_ATTENTION[:3], ids=_case_id)
def test_dense_matches_exact_attention(case, dtype):
    (kv, groups, s, d), kinds, _ = case
    shape = (len(kinds), kv, groups, s, d)
    rng = np.random.default_rng(sum(shape))
    mask = self_attention_mask(s, kinds, rng)
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v, grad_out = _random_inputs(rng, shape, shape[3], dtype)
    _check_against_exact("dense", q, k, v, mask, grad_out, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_blockwise_matches_dense(dtype):
    """Both kernels on the rows that see a key (the cotangent of the others is 0: there the kernels
    differ by design): each is within its bound of the exact values (`attention_bounds`), so they are
    within the sum of the two bounds of each other."""
    (kv, groups, s, d), kinds, (block_q, block_k) = SELF_ATTENTION[1]
    shape = (len(kinds), kv, groups, s, d)
    rng = np.random.default_rng(5)
    mask = self_attention_mask(s, kinds, rng)
    allowed = np.asarray(mask.dense())
    q, k, v, grad_out = _random_inputs(rng, shape, shape[3], dtype)
    grad_out = grad_out * jnp.asarray(allowed.any(-1)[:, None, None, :, None], dtype)
    blockwise = value_and_vjp(lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=block_q, block_k=block_k),
                              (q, k, v), grad_out)
    dense = value_and_vjp(lambda q, k, v: grouped_attention(q, k, v, jnp.asarray(allowed)), (q, k, v), grad_out)
    bounds = [a + b for a, b in zip(attention_bounds(q, k, v, allowed, grad_out, dtype, "blockwise", 4),
                                    attention_bounds(q, k, v, allowed, grad_out, dtype, "dense"), strict=True)]
    has_key = allowed.any(-1)[:, None, None, :, None]
    outputs = [np.where(has_key, exact(o), 0.0) for o in (blockwise[0], dense[0])]
    for name, a, b, bound in zip(("output", "dL/dq", "dL/dk", "dL/dv"), (outputs[0], *blockwise[1]),
                                 (outputs[1], *dense[1]), bounds, strict=True):
        assert_within(a, b, bound, name, sharp=SHARP["dense", dtype])


def test_rows_without_keys():
    """A query that may see no key: the blockwise kernel gives it output 0 and no gradient anywhere
    (finite); the dense one averages all values (its output is the mean of v, and dv gets grad_out / t
    from it). Keys a query may not see get no gradient from it in both."""
    rng = np.random.default_rng(11)
    q, k, v = (random_array(rng, s, jnp.float32) for s in ((1, 1, 1, 3, 4), (1, 1, 5, 4), (1, 1, 5, 4)))
    # Row 0 sees keys 0-1 (key 4 is padding), row 1 nothing (no key of its segment), row 2 key 0 (by position).
    mask = AttentionMask(jnp.asarray([[1, 3, 0]]), jnp.asarray([[0, 1, 2, 3, 4]]), jnp.asarray([[True] * 4 + [False]]),
                         jnp.asarray([[1, 3, 1]]), jnp.asarray([[1, 1, 2, 2, 1]]))
    allowed = mask.dense()
    np.testing.assert_array_equal(np.asarray(allowed[0]), [[1, 1, 0, 0, 0], [0] * 5, [1, 0, 0, 0, 0]])
    only_row_1 = jnp.zeros(q.shape).at[0, 0, 0, 1].set(1.0)
    only_row_0 = jnp.zeros(q.shape).at[0, 0, 0, 0].set(1.0)
    out, vjp = jax.vjp(lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=2, block_k=2), q, k, v)
    assert not np.any(np.asarray(out[0, 0, 0, 1]))
    for grad in vjp(only_row_1):
        assert not np.any(np.asarray(grad))
    _, dk, dv = vjp(only_row_0)
    assert not np.any(np.asarray(dk[0, 0, 2:])) and not np.any(np.asarray(dv[0, 0, 2:]))

    out, vjp = jax.vjp(lambda q, k, v: grouped_attention(q, k, v, allowed), q, k, v)
    # Row 1's weights are exactly fl(1/5) (exp(0) = 1, a sum of five ones, one division): its output is a
    # 5-term float32 dot product, within gamma(5) + u (the weight's rounding) of mean(|v|).
    u = unit_roundoff(jnp.float32)
    bound = (gamma(5, u) + u) * np.abs(exact(v[0, 0])).mean(axis=0)
    assert_within(out[0, 0, 0, 1], exact(v[0, 0]).mean(axis=0), bound, "output of a row with no allowed key",
                  sharp=1e-5)
    dq, dk, dv = vjp(only_row_1)
    assert not np.any(np.asarray(dq)) and not np.any(np.asarray(dk))  # constant scores: nothing to move
    np.testing.assert_array_equal(np.asarray(dv[0, 0]), np.full((5, 4), np.float32(0.2)))  # fl(1/5) * 1
    _, dk, dv = vjp(only_row_0)
    assert not np.any(np.asarray(dk[0, 0, 2:])) and not np.any(np.asarray(dv[0, 0, 2:]))


@pytest.mark.parametrize("kernel", ["blockwise", "dense"])
def test_check_grads_float64(kernel):
    """Finite differences in float64 (check_grads, reverse mode, order 1) on GQA with every kind of mask
    and small, overlapping blocks: central differences with eps = 1e-4 have truncation error
    ~eps^2 |f'''| / 6 ~ 1e-9 for O(1) scores and rounding error ~u64 |f| / eps ~ 1e-12, far below
    check_grads' float64 tolerance (1e-5); a wrong gradient is off by O(1)."""
    rng = np.random.default_rng(12)
    mask = self_attention_mask(7, "rlps", rng)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(rng.standard_normal(s)) for s in ((4, 1, 2, 7, 6), (4, 1, 7, 6), (4, 1, 7, 6)))
        if kernel == "dense":
            attend = lambda q, k, v: grouped_attention(q, k, v, mask.dense())
        else:
            attend = lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=3, block_k=2)
        check_grads(attend, (q, k, v), order=1, modes=["rev"])


def test_skipped_blocks():
    """With positions that increase with the token index, the forward and backward passes compute only the
    block pairs on or below the diagonal; packed rows whose segments meet block boundaries, only the
    blocks within a segment; an empty key block (cache slots not written yet) is never computed."""
    s = 16
    order = np.arange(s, dtype=np.int32)[None, :]
    causal = AttentionMask(order, order, np.ones((1, s), bool))
    for backward in (False, True):
        np.testing.assert_array_equal(computed_blocks(causal, 4, 4, backward=backward), np.tril(np.ones((4, 4), bool)))
    # Blocks of 4 over 18 tokens: the last block (tokens 14-17) overlaps the one before.
    order18 = np.arange(18, dtype=np.int32)[None, :]
    expected = np.tril(np.ones((5, 5), bool))
    expected[4, 3] = True  # tokens 14-15 of the last query block see block 3's keys
    causal18 = AttentionMask(order18, order18, np.ones((1, 18), bool))
    np.testing.assert_array_equal(computed_blocks(causal18, 4, 4), expected)
    segments = np.repeat(np.arange(1, 5, dtype=np.int32), 4)[None, :]
    packed = AttentionMask(order, order, np.ones((1, s), bool), segments, segments)
    np.testing.assert_array_equal(computed_blocks(packed, 4, 4), np.eye(4, dtype=bool))
    decode = AttentionMask(np.array([[5]], np.int32), order, order <= 5)
    np.testing.assert_array_equal(computed_blocks(decode, 4, 4), [[True, True, False, False]])


def test_blockwise_memory_is_linear_in_the_sequence():
    """XLA's temporary memory of the compiled forward + backward pass at SmolLM2's attention shape (9
    heads, 3 kv heads, head_dim 64) and 4096 tokens: far below one float32 score matrix (heads * s^2 * 4
    bytes = 576 MiB), and doubling the tokens from 2048 at most doubles it (plus the block buffers,
    which do not grow): a quadratic term would quadruple it."""
    def temp_bytes(s):
        q = jax.ShapeDtypeStruct((1, 3, 3, s, 64), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, 3, s, 64), jnp.float32)
        positions = jax.ShapeDtypeStruct((1, s), jnp.int32)
        mask = AttentionMask(positions, positions, jax.ShapeDtypeStruct((1, s), bool))

        def step(q, k, v, mask, grad):
            out, vjp = jax.vjp(lambda q, k, v: blockwise_attention(q, k, v, mask), q, k, v)
            return out, vjp(grad)

        return jax.jit(step).lower(q, kv, kv, mask, q).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2048), temp_bytes(4096)
    scores = 9 * 4096**2 * 4
    # Linear terms: the float32 dq, dk and dv accumulators, the row statistics: ~(9 + 3 + 3) * 4096 * 64 * 4
    # bytes = 15 MiB; the blocks' scores and probabilities a few MiB more.
    assert large < scores / 16, (large, scores)
    assert large - small <= small + 2**20, (small, large)


def test_bfloat16_products_take_bfloat16_operands():
    """In bfloat16 every product of the blockwise kernel, forward and backward, takes bfloat16 operands and
    accumulates in float32 (`jaxlora.nn.matmul`), which the bounds above assume, except D = rowsum(dO * O),
    a float32 product."""
    rng = np.random.default_rng(3)
    shape = (1, 2, 2, 5, 8)
    q, k, v, grad_out = _random_inputs(rng, shape, 5, jnp.bfloat16)
    order = np.arange(5, dtype=np.int32)[None]
    mask = AttentionMask(order, order, np.ones((1, 5), bool))
    text = jax.jit(lambda *a: value_and_vjp(lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=2, block_k=2),
                                            a[:3], a[3])).lower(q, k, v, grad_out).as_text()
    products = [line for line in text.splitlines() if "dot_general" in line]
    assert len(products) == 8, text  # forward: 2; backward: D, then 5
    for line in products:
        if "xbf16>, tensor<" not in line:
            assert line.count("xf32>") == 3, line
        else:
            assert "xf32>" in line.split("->")[-1], line


def test_shape_errors_name_the_array():
    q = jnp.zeros((1, 2, 2, 5, 8))
    k = jnp.zeros((1, 2, 7, 8))
    order = np.arange(7, dtype=np.int32)[None]
    good = AttentionMask(order[:, :5], order, np.ones((1, 7), bool))
    assert blockwise_attention(q, k.reshape(2, 7, 8), k, good).shape == q.shape  # the cache's layout is fine
    with pytest.raises(ValueError, match=r"key_mask has shape \(1, 5\), expected \(1, 7\)"):
        blockwise_attention(q, k, k, good._replace(key_mask=np.ones((1, 5), bool)))
    with pytest.raises(ValueError, match=r"v has shape \(1, 2, 6, 8\), expected \(1, 2, 7, 8\).*\(2, 7, 8\)"):
        blockwise_attention(q, k, k[:, :, :6], good)
