"""The dense grouped-query attention kernel: the whole ``[s, t]`` score matrix at once.

`grouped_attention` (training and prefill, with its own backward pass) and `cached_attention` (decoding
over a KV cache, forward only) take the mask as a boolean ``[b, s, t]`` array (`AttentionMask.dense`).
Memory O(s t) per head; `jaxlora.nn.attention.blockwise_attention` is the linear-memory kernel the
decoder uses by default. Layouts as there: q ``[b, kv_heads, groups, s, d]`` (query head = kv_head *
groups + group, as transformers' repeat_kv), k and v ``[b, kv_heads, t, d]``, without repeating k and
v per group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.nn.attention import softmax_dtype
from jaxlora.nn.matmul import batched_einsum


def _attention_probs(q, k, allowed):
    """Softmax attention weights ``[b, kv, groups, s, k]`` in `softmax_dtype` (masked entries exactly 0)."""
    b, kv, groups, s, d = q.shape
    acc = softmax_dtype(q.dtype)
    scores = batched_einsum("bkqd,bktd->bkqt", q.reshape(b, kv, groups * s, d), k) * (d**-0.5)
    scores = scores.reshape(b, kv, groups, s, k.shape[2]).astype(acc)
    scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(acc).min)
    return jax.nn.softmax(scores, axis=-1)


@jax.custom_vjp
def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(d), masked) v`` for grouped-query attention, in head-major layout.

    Shapes: q ``[b, kv_heads, groups, s, d]`` (query head = kv_head * groups + group, as transformers'
    repeat_kv), k and v ``[b, kv_heads, k, d]``, allowed ``[b, s, k]`` bool -> ``[b, kv_heads, groups, s, d]``.
    Scores and softmax in float32 (float64 for float64 inputs); a row with no allowed key attends
    uniformly (as a masked softmax with the float32 minimum does).

    The custom gradient orders each backward matmul so that the large ``[.., s, k]`` arrays enter
    with their contracted axis where XLA's CPU matmuls want it (``dk = (q^T dS)^T``,
    ``dv = (dO^T P)^T``); with autodiff's order XLA copied the probabilities and score gradients
    into transposed layouts first (experiments/results/train.md).
    """
    return _attention_fwd(q, k, v, allowed)[0]


def _attention_fwd(q, k, v, allowed):
    b, kv, groups, s, d = q.shape
    probs = _attention_probs(q, k, allowed)
    flat = probs.reshape(b, kv, groups * s, k.shape[2]).astype(v.dtype)
    out = batched_einsum("bkqt,bktd->bkqd", flat, v).reshape(q.shape)
    return out, (q, k, v, allowed, probs)


def _attention_bwd(residuals, grad_out):
    q, k, v, allowed, probs = residuals
    b, kv, groups, s, d = q.shape
    t = k.shape[2]
    p = probs.reshape(b, kv, groups * s, t)
    grad_out = grad_out.reshape(b, kv, groups * s, d)
    grad_p = batched_einsum("bkqd,bktd->bkqt", grad_out, v).astype(probs.dtype)
    grad_scores = p * (grad_p - jnp.sum(grad_p * p, axis=-1, keepdims=True))
    mask = jnp.broadcast_to(allowed[:, None, None, :, :], (b, kv, groups, s, t)).reshape(b, kv, groups * s, t)
    grad_scores = (jnp.where(mask, grad_scores, 0.0) * (d**-0.5)).astype(q.dtype)
    q_flat = q.reshape(b, kv, groups * s, d)
    grad_q = batched_einsum("bkqt,bktd->bkqd", grad_scores, k).reshape(q.shape)
    # [d, k] products, transposed after the barrier (which keeps XLA from folding the transposes back).
    grad_k_t, grad_v_t = jax.lax.optimization_barrier((
        batched_einsum("bkqd,bkqt->bkdt", q_flat, grad_scores),
        batched_einsum("bkqd,bkqt->bkdt", grad_out, p.astype(grad_out.dtype))))
    return (grad_q, grad_k_t.swapaxes(2, 3).astype(k.dtype), grad_v_t.swapaxes(2, 3).astype(v.dtype),
            np.zeros(allowed.shape, jax.dtypes.float0))


grouped_attention.defvjp(_attention_fwd, _attention_bwd)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array) -> jax.Array:
    """`grouped_attention` over a KV cache, forward only, with batch and kv-heads as one leading axis.

    Shapes: q ``[b, kv, groups, s, d]``; keys/values ``[b * kv, max_len, d]`` (the cache's layout);
    allowed ``[b, s, max_len]`` -> ``[b, kv, groups, s, d]``.

    The cache has no unit axis for XLA to drop: with ``[b, kv, max_len, d]`` arrays and ``b = 1``
    XLA fused the cache update twice (into the returned cache and, through the reshape that drops
    the unit axis, into the attention product), each on its own copy of the layer's cache: four
    copies per layer and token.
    """
    b, kv, groups, s, d = q.shape
    t = keys.shape[1]
    q_flat = q.reshape(b * kv, groups * s, d)
    scores = batched_einsum("nqd,ntd->nqt", q_flat, keys.astype(q.dtype)) * (d**-0.5)
    scores = scores.reshape(b, kv, groups, s, t).astype(jnp.float32)
    scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b * kv, groups * s, t).astype(q.dtype)
    return batched_einsum("nqt,ntd->nqd", probs, values.astype(q.dtype)).reshape(q.shape)
