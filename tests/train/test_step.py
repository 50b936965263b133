"""`jaxlora.train.step.chunked_cross_entropy`: its value and custom gradient (for the hidden states and
for the output weight) against autodiff of the textbook loss, exact (float64), element by element within
a rounding bound derived below (model and notation: tests/error_bounds.py); ignored targets get no
gradient; finite differences (check_grads) in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxlora.data.sft import IGNORE_INDEX
from jaxlora.train.step import chunked_cross_entropy
from tests.error_bounds import abs_einsum, assert_within, dot_bound, exact, fn_error, gamma, narrowing, unit_roundoff


def reference_loss(hidden, weight, targets):
    """``-sum over counted tokens of log softmax(hidden W^T)[target]``, the textbook way."""
    logits = jnp.einsum("bsd,vd->bsv", hidden, weight)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    counted = targets != IGNORE_INDEX
    picked = jnp.take_along_axis(log_probs, jnp.where(counted, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(counted, picked, 0.0))


def loss_bounds(hidden, weight, targets, g, chunk, hidden_dtype, weight_dtype):
    """First-order rounding bounds of the loss, dL/dhidden and dL/dweight, element by element.

    Per token (u_h: roundoff of the hidden states' dtype, u_a: of float32 (float64 for float64 inputs),
    in which the softmax and the sums run; n: rounding a result to 16 bits, 0 otherwise):
      logits  L = h (W -> dtype)^T: the weight's cast (u_h |h||W| when it narrows) and a `dot` over dim:
              eL = cast |h||W| + dot_bound(dim).
      log Z   = m + log(sum exp(L - m)): the P-weighted mean of eL and of the shift's rounding
              u_a |L - m|, exp (fn_error), gamma(V) for the sum, log (fn_error of log(sum) <= log V)
              and the final addition (u_a |log Z|).
      loss    = sum over counted tokens of (log Z - L_target): each term within
              elogZ + eL_target + u_a |term|, summed over a chunk and then over the chunks:
              gamma(chunk + chunks) sum |term|.
      D       = p - onehot on counted tokens, p = exp(L - log Z): p (eL + elogZ + u_a |L - log Z| + fn_error),
              then the subtraction (u_a |D|) and the cast to the hidden dtype (n |D|).
      dL/dh   = g * (D (W -> dtype)): eD |W| + cast |D||W| + dot_bound(V), then g's cast to the hidden
              dtype and the product: (n + u_h) |g D W|.
      dL/dW   = g * sum over chunks of (D^T h -> dtype): |eD|^T |h| + gamma(chunk) |D|^T |h| for each
              chunk's dot, n |D_c^T h_c| for its rounding, gamma(chunks) for the sum of the chunks, and
              u_a + (weight's 16-bit rounding) for the product with g and the cast.
    """
    acc = jnp.promote_types(hidden_dtype, jnp.float32)
    u_h, u_a, n, e_fn = unit_roundoff(hidden_dtype), unit_roundoff(acc), narrowing(hidden_dtype), fn_error(acc)
    cast = unit_roundoff(hidden_dtype) if unit_roundoff(hidden_dtype) > unit_roundoff(weight_dtype) else 0.0
    dim = hidden.shape[-1]
    h, w, g = exact(hidden).reshape(-1, dim), exact(weight), float(g)
    vocab = w.shape[0]
    t = np.asarray(targets).reshape(-1)
    counted = t != IGNORE_INDEX
    onehot = (np.arange(vocab)[None, :] == t[:, None]) & counted[:, None]
    L = h @ w.T
    m = L.max(-1, keepdims=True)
    sum_exp = np.exp(L - m).sum(-1, keepdims=True)
    log_z = m + np.log(sum_exp)
    p = np.exp(L - log_z)
    e_logits = cast * abs_einsum("td,vd->tv", h, w) + dot_bound(dim, hidden_dtype, abs_einsum("td,vd->tv", h, w), L)
    e_log_z = (np.sum(p * (e_logits + u_a * np.abs(L - m)), -1, keepdims=True) + e_fn + gamma(vocab, u_a)
               + e_fn * np.log(sum_exp) + u_a * np.abs(log_z))
    token_loss = np.where(counted, (log_z - np.sum(np.where(onehot, L, 0.0), -1, keepdims=True))[:, 0], 0.0)
    e_target = np.sum(np.where(onehot, e_logits, 0.0), -1)
    chunks = -(-t.size // chunk)
    loss = np.sum(np.where(counted, e_log_z[:, 0] + e_target + u_a * np.abs(token_loss), 0.0))
    loss += gamma(chunk + chunks, u_a) * np.sum(np.abs(token_loss))
    D = np.where(counted[:, None], p - onehot, 0.0)
    rel_p = e_logits + e_log_z + u_a * np.abs(L - log_z) + e_fn
    e_D = np.where(counted[:, None], p * rel_p + (u_a + n) * np.abs(D), 0.0)
    d_w = D @ w
    e_h = (e_D @ np.abs(w) + cast * np.abs(D) @ np.abs(w) + dot_bound(vocab, hidden_dtype, np.abs(D) @ np.abs(w), d_w)
           + (n + u_h) * np.abs(d_w))
    padded = np.zeros((chunks * chunk,) + D.shape[1:])
    padded[: t.size] = D
    h_padded = np.zeros((chunks * chunk, dim))
    h_padded[: t.size] = h
    partials = np.einsum("ctv,ctd->cvd", padded.reshape(chunks, chunk, vocab), h_padded.reshape(chunks, chunk, dim))
    e_w = (np.abs(e_D).T @ np.abs(h) + gamma(chunk, u_a) * np.abs(D).T @ np.abs(h) + n * np.abs(partials).sum(0)
           + gamma(chunks, u_a) * np.abs(partials).sum(0) + (u_a + narrowing(weight_dtype)) * np.abs(D.T @ h))
    return loss, abs(g) * e_h.reshape(hidden.shape), abs(g) * e_w


def _targets(rng, batch, seq, vocab):
    """Random targets with ignored positions: the last of each row (as after the shift) and a "prompt"."""
    targets = rng.integers(0, vocab, size=(batch, seq))
    targets[:, -1] = IGNORE_INDEX
    targets[0, :3] = IGNORE_INDEX
    return jnp.asarray(targets, jnp.int32)


# (hidden dtype, weight dtype): float32, bfloat16 (tied embeddings in bfloat16), bfloat16 hidden states
# with a float32 weight (cast to bfloat16 for the product), and float64.
DTYPES = [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
          (jnp.float64, jnp.float64)]
# Worst-case bounds as a share of the gradient's scale that still make a useful check; bfloat16 rounds the
# logits to 8 bits (as the unchunked bfloat16 model does), which moves probabilities by a few percent.
SHARP = {jnp.float32: 1e-4, jnp.bfloat16: 0.5, jnp.float64: 1e-12}


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(jnp.dtype(x).name for x in d))
@pytest.mark.parametrize("chunk", [4, 5, 256])
def test_chunked_cross_entropy_matches_autodiff(chunk, dtypes):
    """14 tokens (2 x 7) in chunks of 4 and 5 (not a divisor: the last chunk is padded) and of 256
    (one chunk, mostly padding); dim 6, vocabulary 11; a random cotangent for the loss."""
    hidden_dtype, weight_dtype = dtypes
    batch, seq, dim, vocab = 2, 7, 6, 11
    rng = np.random.default_rng(chunk)
    targets = _targets(rng, batch, seq, vocab)
    g_value = float(rng.uniform(0.5, 2.0)) * (-1) ** chunk
    with jax.enable_x64(hidden_dtype == jnp.float64):
        hidden = jnp.asarray(rng.standard_normal((batch, seq, dim)) * 2.0).astype(hidden_dtype)
        weight = jnp.asarray(rng.standard_normal((vocab, dim)) * 0.5).astype(weight_dtype)
        g = jnp.asarray(g_value, jnp.promote_types(hidden_dtype, jnp.float32))
        loss, vjp = jax.vjp(lambda h, w: chunked_cross_entropy(h, w, targets, chunk), hidden, weight)
        grad_h, grad_w = vjp(g)
    assert grad_h.dtype == hidden_dtype and grad_w.dtype == weight_dtype
    with jax.enable_x64(True):
        exact_loss, exact_vjp = jax.vjp(lambda h, w: reference_loss(h, w, targets),
                                        jnp.asarray(exact(hidden)), jnp.asarray(exact(weight)))
        exact_h, exact_w = (np.asarray(a) for a in exact_vjp(jnp.asarray(g_value)))
        exact_loss = np.asarray(exact_loss)
    loss_bound, h_bound, w_bound = loss_bounds(hidden, weight, targets, g_value, chunk, hidden_dtype, weight_dtype)
    sharp = SHARP[hidden_dtype]
    assert_within(loss, exact_loss, loss_bound, "loss", sharp=sharp)
    assert_within(grad_h, exact_h, h_bound, "dL/dhidden", sharp=sharp)
    assert_within(grad_w, exact_w, w_bound, "dL/dweight", sharp=sharp)
    ignored = np.asarray(targets) == IGNORE_INDEX
    assert not np.any(np.asarray(grad_h)[ignored]), "a token without a target got a gradient"
    assert np.all(np.any(np.asarray(grad_h)[~ignored] != 0, axis=-1))


def test_chunked_cross_entropy_check_grads_float64():
    """Finite differences in float64 (check_grads, reverse mode, order 1) for the hidden states and the
    weight, chunks of 4 over 14 tokens: central differences with eps = 1e-4 have truncation error
    ~eps^2 |f'''| / 6 ~ 1e-8 for O(1) logits and rounding error ~u64 |f| / eps ~ 1e-11, far below
    check_grads' float64 tolerance (1e-5); a wrong gradient is off by O(1)."""
    rng = np.random.default_rng(21)
    targets = _targets(rng, 2, 7, 11)
    with jax.enable_x64(True):
        hidden, weight = jnp.asarray(rng.standard_normal((2, 7, 6))), jnp.asarray(rng.standard_normal((11, 6)) * 0.5)
        check_grads(lambda h, w: chunked_cross_entropy(h, w, targets, 4), (hidden, weight), order=1, modes=["rev"])
