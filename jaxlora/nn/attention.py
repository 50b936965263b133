"""Blockwise grouped-query attention: linear memory, online softmax, its own backward pass.

It computes ``O = softmax(Q K^T / sqrt(d) + mask) V`` for grouped-query attention in head-major layout:
q ``[b, kv_heads, groups, s, d]`` (query head = kv_head * groups + group, as transformers' repeat_kv),
k and v ``[b, kv_heads, t, d]``, without repeating k and v per group.

`blockwise_attention` is the FlashAttention algorithm (Dao et al. 2022, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness"; the backward pass of FlashAttention-2, Dao 2023) in
plain JAX: queries in blocks of ``block_q`` rows, keys in blocks of ``block_k``, and for each query row
a running maximum ``m`` and sum ``l`` of the exponentials (the online softmax), so that no ``[s, t]``
array exists: memory O((s + t) d). The backward pass recomputes each block's probabilities from q, k
and the saved row logsumexp ``lse = m + log l``: ``P = exp(S - lse)``, ``D = rowsum(dO * O)``,
``dS = P (dO V^T - D)``, ``dQ = dS K``, ``dK = dS^T Q``, ``dV = P^T dO`` (each times 1/sqrt(d) where it
belongs). Block pairs in which the mask allows nothing are skipped (a `lax.cond`), which with causal
masking and positions increasing with the token index halves the work.

The mask is given by what generates it (`AttentionMask`), never as an ``[s, t]`` array: query i may
see key j when ``key_positions[j] <= query_positions[i]``, ``key_mask[j]`` and, for packed rows,
``query_segments[i] == key_segments[j]``. Each block computes its own part.

A query row that may see no key at all (left padding: a pad token sees nothing) gets output 0 and
passes no gradient to q, k or v. (The dense kernel, `jaxlora.nn.dense_attention`, instead lets such a row attend uniformly to every
key, as a masked softmax with the float32 minimum does.) Such rows are padding; their loss is masked.

Dtypes: scores and the softmax statistics in float32 (float64 for float64 inputs, `softmax_dtype`);
the products take 16-bit operands with float32 accumulation (`jaxlora.nn.matmul`): the probabilities
and score gradients are rounded to the input dtype for them, as in FlashAttention. Unlike the dense
kernel the scores are never rounded to 16 bits. Output and gradients are accumulated in float32 across
blocks and rounded to the input dtype once.

Blocks. Sequence lengths need not be multiples of the block sizes: the last block starts at
``length - block`` and so overlaps the one before; rows it shares with that block are masked out of
it where they would count twice (keys in the forward, queries and keys in the backward). No input is
padded or copied whole, which matters for decoding, where k and v are a KV cache.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.nn.matmul import batched_einsum
from jaxlora.nn.ordering import zeros_after

# Measured on the project's 2-core CPU (experiments/results/attention.md): larger blocks amortize the
# loop and the block copies, smaller ones keep a block's scores in cache and skip more of the triangle.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256


def softmax_dtype(dtype) -> jnp.dtype:
    """float32 for 16- and 32-bit activations; float64 stays float64 (so that gradients can be checked
    against finite differences in float64)."""
    return jnp.promote_types(dtype, jnp.float32)


class AttentionMask(NamedTuple):
    """What generates an attention mask, in O(s + t) memory: query i may see key j when
    ``key_positions[j] <= query_positions[i]`` and ``key_mask[j]`` and (when segments are given)
    ``query_segments[i] == key_segments[j]``.

    Fields: query_positions ``[b, s]`` int32; key_positions ``[b, t]`` int32; key_mask ``[b, t]`` bool
    (False for padding and empty cache slots); query_segments ``[b, s]`` / key_segments ``[b, t]`` int32
    or None (packed rows: several examples in one row).
    """

    query_positions: jax.Array
    key_positions: jax.Array
    key_mask: jax.Array
    query_segments: jax.Array | None = None
    key_segments: jax.Array | None = None

    def dense(self) -> jax.Array:
        """The mask as ``allowed [b, s, t]`` bool (O(s t) memory: for the dense kernel and tests)."""
        return _allowed(self.query_positions, self.key_positions, self.key_mask, self.query_segments,
                        self.key_segments)


def _allowed(query_positions, key_positions, key_mask, query_segments, key_segments):
    allowed = (key_positions[:, None, :] <= query_positions[:, :, None]) & key_mask[:, None, :]
    if query_segments is not None:
        allowed = allowed & (query_segments[:, :, None] == key_segments[:, None, :])
    return allowed


# -- blockwise -------------------------------------------------------------------------------------

class _Rows(NamedTuple):
    """One block's share of an `AttentionMask`, for queries or keys: positions ``[b, n]``, ``ok [b, n]``
    (keys: valid and not counted by an earlier block; queries: not counted by an earlier block where
    that matters), segments ``[b, n]`` or None."""

    positions: jax.Array
    ok: jax.Array
    segments: jax.Array | None


def _blocks(length: int, block: int) -> tuple[int, int]:
    """``(size, count)`` of the blocks covering ``length`` rows; block i starts at `_block_start`."""
    size = max(1, min(block, length))
    return size, -(-length // size)


def _block_start(index, size: int, length: int):
    return jnp.minimum(index * size, length - size)


def _rows(positions, segments, valid, index, start, size: int, exclusive: bool) -> _Rows:
    """Block ``index`` (starting at ``start``) of per-row mask data; with ``exclusive`` the rows an
    earlier block covers (only the last block overlaps) are not ok."""
    take = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)
    b = positions.shape[0]
    ok = jnp.ones((b, size), bool) if valid is None else take(valid)
    if exclusive:
        ok = ok & (start + jnp.arange(size)[None, :] >= index * size)
    return _Rows(take(positions), ok, take(segments))


def _block_allowed(queries: _Rows, keys: _Rows) -> jax.Array:
    """``[b, 1, 1, bq, bk]`` bool: the block's mask, broadcastable over kv heads and groups."""
    allowed = _allowed(queries.positions, keys.positions, keys.ok, queries.segments, keys.segments)
    return (allowed & queries.ok[:, :, None])[:, None, None]


def _nothing_allowed(queries: _Rows, keys: _Rows) -> jax.Array:
    """Scalar bool, True when the block's mask is certainly all False in every batch row: every key
    comes after every query, or the segments of the keys and of the queries do not meet (O(bq + bk))."""
    high, low = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
    first_key = jnp.min(jnp.where(keys.ok, keys.positions, high), axis=1)
    last_query = jnp.max(jnp.where(queries.ok, queries.positions, low), axis=1)
    empty = first_key > last_query
    if queries.segments is not None:
        def span(rows):
            return (jnp.min(jnp.where(rows.ok, rows.segments, high), axis=1),
                    jnp.max(jnp.where(rows.ok, rows.segments, low), axis=1))
        (q_lo, q_hi), (k_lo, k_hi) = span(queries), span(keys)
        empty = empty | (k_hi < q_lo) | (k_lo > q_hi)
    return jnp.all(empty)


def computed_blocks(mask: AttentionMask, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                    *, backward: bool = False) -> np.ndarray:
    """``[query blocks, key blocks]`` bool: which block pairs `blockwise_attention` computes (the others
    it skips) for this mask, in the forward pass or (``backward``) the backward pass."""
    s, t = mask.query_positions.shape[1], mask.key_positions.shape[1]
    (bq, nq), (bk, nk) = _blocks(s, block_q), _blocks(t, block_k)
    computed = np.zeros((nq, nk), bool)
    for i in range(nq):
        queries = _rows(mask.query_positions, mask.query_segments, None, i, _block_start(i, bq, s), bq, backward)
        for j in range(nk):
            keys = _rows(mask.key_positions, mask.key_segments, mask.key_mask, j, _block_start(j, bk, t), bk, True)
            computed[i, j] = not bool(_nothing_allowed(queries, keys))
    return computed


class _Layout(NamedTuple):
    """Static sizes: batch, kv heads, groups, queries, keys, head dim, query/key block size and count."""

    b: int
    kv: int
    groups: int
    s: int
    t: int
    d: int
    bq: int
    nq: int
    bk: int
    nk: int

    @classmethod
    def of(cls, q, keys, block_q, block_k):
        b, kv, groups, s, d = q.shape
        t = keys.shape[1]
        return cls(b, kv, groups, s, t, d, *_blocks(s, block_q), *_blocks(t, block_k))

    def query_block(self, x, start):
        """``[b, kv, groups, s, ...]`` -> the block's ``[b * kv, groups * bq, ...]``."""
        block = jax.lax.dynamic_slice_in_dim(x, start, self.bq, axis=3)
        return block.reshape(self.b * self.kv, self.groups * self.bq, *x.shape[4:])

    def add_query_block(self, total, block, start):
        """``total [b, kv, groups, s, ...]`` with ``block [b * kv, groups * bq, ...]`` added at ``start``."""
        block = block.reshape(self.b, self.kv, self.groups, self.bq, *total.shape[4:])
        current = jax.lax.dynamic_slice_in_dim(total, start, self.bq, axis=3)
        return jax.lax.dynamic_update_slice_in_dim(total, current + block, start, axis=3)

    def per_group(self, x):
        """``[b * kv, groups * bq, bk]`` -> ``[b, kv, groups, bq, bk]`` (to apply a `_block_allowed` mask)."""
        return x.reshape(self.b, self.kv, self.groups, self.bq, x.shape[-1])

    def per_row(self, x):
        return x.reshape(self.b * self.kv, self.groups * self.bq, x.shape[-1])


def _scores(layout, q_block, k_block, allowed, dtype):
    """Scaled scores ``[b, kv, groups, bq, bk]`` in ``dtype``, -inf where not allowed."""
    scores = batched_einsum("nqd,ntd->nqt", q_block, k_block, out_dtype=dtype) * (layout.d**-0.5)
    return jnp.where(allowed, layout.per_group(scores), -jnp.inf)


def _forward(q, keys, values, mask: AttentionMask, block_q, block_k):
    """``(out [b, kv, groups, s, d], lse [b, kv, groups, s])``; keys/values ``[b * kv, t, d]``."""
    lay = _Layout.of(q, keys, block_q, block_k)
    acc = softmax_dtype(q.dtype)
    n, rows = lay.b * lay.kv, lay.groups * lay.bq

    def query_block(i, carry):
        out, lse = carry
        q_start = _block_start(i, lay.bq, lay.s)
        q_block = lay.query_block(q, q_start)
        queries = _rows(mask.query_positions, mask.query_segments, None, i, q_start, lay.bq, exclusive=False)

        def key_block(j, state):
            k_start = _block_start(j, lay.bk, lay.t)
            keys_j = _rows(mask.key_positions, mask.key_segments, mask.key_mask, j, k_start, lay.bk, exclusive=True)

            def attend(state):
                m, l, o = state
                k_block, v_block = (jax.lax.dynamic_slice_in_dim(x, k_start, lay.bk, axis=1).astype(q.dtype)
                                    for x in (keys, values))
                scores = lay.per_row(_scores(lay, q_block, k_block, _block_allowed(queries, keys_j), acc))
                m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
                # Rows that have seen no allowed key yet keep m = -inf; exponentiate against 0 there.
                base = jnp.where(m_new == -jnp.inf, 0.0, m_new).astype(acc)
                p = jnp.exp(scores - base[..., None])
                rescale = jnp.exp(m - base)
                pv = batched_einsum("nqt,ntd->nqd", p.astype(q.dtype), v_block, out_dtype=acc)
                return m_new, rescale * l + jnp.sum(p, axis=-1), rescale[..., None] * o + pv

            return jax.lax.cond(_nothing_allowed(queries, keys_j), lambda state: state, attend, state)

        start = (jnp.full((n, rows), -jnp.inf, acc), jnp.zeros((n, rows), acc), jnp.zeros((n, rows, lay.d), acc))
        m, l, o = jax.lax.fori_loop(0, lay.nk, key_block, start)
        seen = l > 0
        block_out = jnp.where(seen[..., None], o / jnp.where(seen, l, 1.0)[..., None], 0.0).astype(q.dtype)
        block_lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        # The overlapping last block writes its shared rows again, with the same values.
        write = lambda total, block: jax.lax.dynamic_update_slice_in_dim(
            total, block.reshape(lay.b, lay.kv, lay.groups, lay.bq, *total.shape[4:]), q_start, axis=3)
        return write(out, block_out), write(lse, block_lse)

    # Zeros made from a constant would be allocated at the start of the program and live until this loop
    # runs: with gradient checkpointing, every layer's accumulators (4 arrays of q's size a layer) were
    # alive through the whole step. These follow q.
    init = (zeros_after(q, q.shape, q.dtype), zeros_after(q, q.shape[:4], acc))
    return jax.lax.fori_loop(0, lay.nq, query_block, init)


def _backward(q, keys, values, mask: AttentionMask, out, lse, grad_out, block_q, block_k):
    """``(dq, dk, dv)``, dk/dv ``[b * kv, t, d]``, all in the accumulation dtype: key blocks outside,
    query blocks inside (dk, dv of a key block are summed in the loop carry; dq in a full array)."""
    lay = _Layout.of(q, keys, block_q, block_k)
    acc = softmax_dtype(q.dtype)
    n = lay.b * lay.kv
    scale = lay.d**-0.5
    # D = rowsum(dO * O), as a product: XLA's CPU reduction of the elementwise product was 10x slower.
    row_dot = batched_einsum("...d,...d->...", grad_out.astype(acc), out.astype(acc))

    def key_block(j, carry):
        dq, dk, dv = carry
        k_start = _block_start(j, lay.bk, lay.t)
        k_block, v_block = (jax.lax.dynamic_slice_in_dim(x, k_start, lay.bk, axis=1).astype(q.dtype)
                            for x in (keys, values))
        keys_j = _rows(mask.key_positions, mask.key_segments, mask.key_mask, j, k_start, lay.bk, exclusive=True)

        def query_block(i, state):
            q_start = _block_start(i, lay.bq, lay.s)
            queries = _rows(mask.query_positions, mask.query_segments, None, i, q_start, lay.bq, exclusive=True)

            def contribute():
                q_block, do_block = lay.query_block(q, q_start), lay.query_block(grad_out, q_start)
                lse_block, d_block = (lay.query_block(x[..., None], q_start) for x in (lse, row_dot))
                scores = lay.per_row(_scores(lay, q_block, k_block, _block_allowed(queries, keys_j), acc))
                p = jnp.exp(scores - lse_block)
                dv_t = batched_einsum("nqd,nqt->ndt", do_block, p.astype(do_block.dtype), out_dtype=acc)
                dp = batched_einsum("nqd,ntd->nqt", do_block, v_block, out_dtype=acc)
                ds = (p * (dp - d_block) * scale).astype(q.dtype)
                dk_t = batched_einsum("nqd,nqt->ndt", q_block, ds, out_dtype=acc)
                return batched_einsum("nqt,ntd->nqd", ds, k_block, out_dtype=acc), dk_t, dv_t

            # The cond returns the block's contributions only: with the dq carry passed through it, XLA
            # copied the whole dq array (three times) at every block pair.
            def nothing():
                return jnp.zeros((n, lay.groups * lay.bq, lay.d), acc), *[jnp.zeros((n, lay.d, lay.bk), acc)] * 2

            dq_block, dk_block, dv_block = jax.lax.cond(_nothing_allowed(queries, keys_j), nothing, contribute)
            dq, dk_t, dv_t = state
            return lay.add_query_block(dq, dq_block, q_start), dk_t + dk_block, dv_t + dv_block

        # dk, dv of the key block in [d, bk] layout: XLA's CPU products of P^T dO and dS^T Q were 1.3-2x
        # slower than those of dO^T P and Q^T dS, transposed once per key block here.
        zeros = jnp.zeros((n, lay.d, lay.bk), acc)
        dq, dk_t, dv_t = jax.lax.fori_loop(0, lay.nq, query_block, (dq, zeros, zeros))

        def add(total, block_t):
            current = jax.lax.dynamic_slice_in_dim(total, k_start, lay.bk, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(total, current + block_t.swapaxes(1, 2), k_start, axis=1)
        return dq, add(dk, dk_t), add(dv, dv_t)

    init = tuple(zeros_after(grad_out, x.shape, acc) for x in (q, keys, values))
    return jax.lax.fori_loop(0, lay.nk, key_block, init)


def _flat(x):
    """k or v as ``[b * kv, t, d]`` (a KV cache's layout, and the kernel's)."""
    return x if x.ndim == 3 else x.reshape(-1, *x.shape[2:])


def _check(q, k, v, mask):
    b, kv, _, s, _ = q.shape
    t = k.shape[-2]
    expect = {"k": (k.shape, (b, kv, t, q.shape[-1])), "v": (v.shape, (b, kv, t, q.shape[-1])),
              "query_positions": (mask.query_positions.shape, (b, s)),
              "key_positions": (mask.key_positions.shape, (b, t)), "key_mask": (mask.key_mask.shape, (b, t))}
    if mask.query_segments is not None:
        expect |= {"query_segments": (mask.query_segments.shape, (b, s)),
                   "key_segments": (mask.key_segments.shape, (b, t))}
    for name, (shape, want) in expect.items():
        flat_ok = name in ("k", "v") and tuple(shape) == (b * kv, *want[2:])
        if tuple(shape) != want and not flat_ok:
            raise ValueError(f"blockwise_attention: {name} has shape {tuple(shape)}, expected {want} for q {q.shape}"
                             + (f" (or {(b * kv, *want[2:])})" if name in ("k", "v") else ""))


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                        block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
    """Masked grouped-query attention in O((s + t) d) memory (FlashAttention; module docstring).

    Args:
      q: ``[b, kv_heads, groups, s, d]``.
      k, v: ``[b, kv_heads, t, d]``, or ``[b * kv_heads, t, d]`` (a KV cache's layout).
      mask: `AttentionMask` with ``[b, s]`` query and ``[b, t]`` key data.
      block_q, block_k: rows per query / key block (default 256 / 256); any lengths work.
    Returns ``[b, kv_heads, groups, s, d]`` in q's dtype; 0 for a query row that may see no key.
    """
    _check(q, k, v, mask)
    as_int = lambda a: None if a is None else a.astype(jnp.int32)
    mask = AttentionMask(as_int(mask.query_positions), as_int(mask.key_positions), mask.key_mask.astype(bool),
                         as_int(mask.query_segments), as_int(mask.key_segments))
    return _blockwise(q, k, v, mask, block_q, block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, mask, block_q, block_k):
    return _forward(q, _flat(k), _flat(v), mask, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, mask, block_q, block_k):
    out, lse = _forward(q, _flat(k), _flat(v), mask, block_q, block_k)
    return out, (q, k, v, mask, out, lse)


def _blockwise_bwd(block_q, block_k, residuals, grad_out):
    q, k, v, mask, out, lse = residuals
    dq, dk, dv = _backward(q, _flat(k), _flat(v), mask, out, lse, grad_out, block_q, block_k)
    return dq.astype(q.dtype), dk.reshape(k.shape).astype(k.dtype), dv.reshape(v.shape).astype(v.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
