"""A Llama decoder in Flax NNX with transformers' parameter names and numerics (formats.md E).

Module tree (attribute names = the Hugging Face state-dict paths, so ``model.layers.0.self_attn.q_proj``
is the same object on both sides):

    LlamaForCausalLM
      model: LlamaModel
        embed_tokens: Embedding [vocab, hidden]
        layers: [LlamaDecoderLayer] * num_hidden_layers
          input_layernorm, post_attention_layernorm: RMSNorm
          self_attn: LlamaAttention (q_proj, k_proj, v_proj, o_proj)
          mlp: LlamaMLP (gate_proj, up_proj, down_proj)
        norm: RMSNorm
      lm_head: Linear [vocab, hidden]   (absent when tie_word_embeddings)

Every projection is a `jaxlora.nn.Linear` (or, after quantization / LoRA injection, a `Linear4bit` or
`LoraLinear` in its place). The layers are a Python list, not a scanned stack: LoRA injection may
give layers different structures (layers_to_transform, rank_pattern). Compilation time grows with
depth; 30 layers (SmolLM2-135M) compile in seconds.

Dtypes: parameters keep the dtype they were loaded in; the compute dtype (``dtype``) is the dtype of
the activations: the embedding output is cast to it and each projection casts its weight to the
activation dtype. RMSNorm and softmax run in float32, as in transformers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.llama_config import LlamaConfig
from jaxlora.models.recompute import recomputed_call
from jaxlora.models.rope import apply_rotary, inverse_frequencies, rotary_cos_sin
from jaxlora.nn.linear import Linear, broadcast_last
from jaxlora.nn.matmul import batched_einsum, linear_matmul


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    keys/values: one ``[batch * kv_heads, max_len, head_dim]`` array per layer (head-major, the layout
    attention multiplies in, with no unit axis for XLA to drop; a tuple: each layer's array is its own
    buffer, so a decoding step writes its new position in place; `stacked_keys` / `stacked_values`
    give ``[layers, batch, kv_heads, max_len, head_dim]``); ``length``: int32 scalar, how many
    positions are filled; ``mask``: ``[batch, max_len]`` bool, which cached positions are real tokens.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array
    mask: jax.Array

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch * config.num_key_value_heads, max_len, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers),
                   jnp.zeros((), jnp.int32), jnp.zeros((batch, max_len), bool))

    def _stacked(self, arrays) -> jax.Array:
        batch, max_len = self.mask.shape
        return jnp.stack(arrays).reshape(len(arrays), batch, -1, max_len, arrays[0].shape[-1])

    @property
    def stacked_keys(self) -> jax.Array:
        return self._stacked(self.keys)

    @property
    def stacked_values(self) -> jax.Array:
        return self._stacked(self.values)


class Embedding(nnx.Module):
    """Token embedding ``weight [vocab, hidden]``; ``ids [...] -> [..., hidden]``."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, hidden_size), dtype) * 0.02)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, normalised in float32 then cast back (transformers' order)."""

    def __init__(self, hidden_size: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((hidden_size,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return broadcast_last(self.weight[...], normed.ndim).astype(x.dtype) * normed


def _linear(in_f, out_f, bias, dtype, rngs):
    return Linear(in_f, out_f, use_bias=bias, dtype=dtype, rngs=rngs)


def softmax_dtype(dtype) -> jnp.dtype:
    """float32 for 16- and 32-bit activations; float64 stays float64 (so that gradients can be checked
    against finite differences in float64)."""
    return jnp.promote_types(dtype, jnp.float32)


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


class LlamaAttention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        h, kv, d, hidden = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.q_proj = _linear(hidden, h * d, config.attention_bias, dtype, rngs)
        self.k_proj = _linear(hidden, kv * d, config.attention_bias, dtype, rngs)
        self.v_proj = _linear(hidden, kv * d, config.attention_bias, dtype, rngs)
        self.o_proj = _linear(h * d, hidden, config.attention_bias, dtype, rngs)

    def __call__(self, x, cos, sin, key_mask, query_positions, key_positions, cache_kv=None, same_segment=None):
        """x ``[b, s, hidden]``; key_mask ``[b, k]`` bool; positions ``[b, s]`` / ``[b, k]``;
        same_segment ``[b, s, k]`` bool or None (packed sequences: attend within one example only).

        With ``cache_kv = (keys, values, start)`` the new keys/values are written at ``start`` into
        the cached ``[b * kv, max_len, d]`` arrays, attention runs over all cached positions, and the
        updated arrays are returned too.
        """
        b, s, _ = x.shape
        q = apply_rotary(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        # Head-major layouts for the attention matmuls: queries [b, kv, groups, s, d], keys/values [b, kv, k, d]
        # (the cache is kept in that layout, so decoding does not transpose it at every token).
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        groups = self.num_heads // self.num_kv_heads
        allowed = (key_positions[:, None, :] <= query_positions[:, :, None]) & key_mask[:, None, :]  # [b, q, k]
        if same_segment is not None:
            allowed = allowed & same_segment
        q = q.reshape(b, s, self.num_kv_heads, groups, self.head_dim).transpose(0, 2, 3, 1, 4)
        new_cache = None
        if cache_kv is None:
            out = grouped_attention(q, k, v, allowed)
        else:
            cached_k, cached_v, start = cache_kv
            new_k = k.reshape(b * self.num_kv_heads, s, self.head_dim).astype(cached_k.dtype)
            new_v = v.reshape(b * self.num_kv_heads, s, self.head_dim).astype(cached_v.dtype)
            new_cache = (jax.lax.dynamic_update_slice(cached_k, new_k, (0, start, 0)),
                         jax.lax.dynamic_update_slice(cached_v, new_v, (0, start, 0)))
            out = cached_attention(q, *new_cache, allowed)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out), new_cache


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` (``silu(g) = g * sigmoid(g)``), elementwise.

    The custom gradient keeps only ``gate`` and ``up`` for the backward pass and recomputes the
    sigmoid there; JAX's own linearization kept sigmoid(gate), silu(gate) and the product as well
    (3 more ``[tokens, intermediate]`` arrays per layer) and split the work into more passes.
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, grad):
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    grad_gate = grad * up * (sig + silu * (1 - sig))
    return grad_gate, grad * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(hidden, inter, config.mlp_bias, dtype, rngs)
        self.up_proj = _linear(hidden, inter, config.mlp_bias, dtype, rngs)
        self.down_proj = _linear(inter, hidden, config.mlp_bias, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(config, dtype=dtype, rngs=rngs)
        self.mlp = LlamaMLP(config, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def __call__(self, x, cos, sin, key_mask, query_positions, key_positions, cache_kv=None, same_segment=None):
        attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, key_mask, query_positions, key_positions,
                                         cache_kv, same_segment)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_cache


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nnx.Module):
    """Llama with a language-model head: ``model(input_ids, attention_mask) -> logits [b, s, vocab]``.

    Args:
      config: the architecture.
      dtype: parameter dtype of a freshly initialised model (loaders set parameters directly).
      compute_dtype: activation dtype (default float32).
      gradient_checkpointing: recompute each decoder layer in the backward pass (``nnx.remat``),
        trading one extra forward for not storing the layer's activations.
      rngs: random streams for initialisation (random weights are for tests; real weights come
        from `torch_bridge.load_llama`).
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, compute_dtype=jnp.float32,
                 gradient_checkpointing: bool = False, rngs: nnx.Rngs):
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.gradient_checkpointing = gradient_checkpointing
        self.model = LlamaModel(config, dtype=dtype, rngs=rngs)
        self.lm_head = nnx.data(None if config.tie_word_embeddings else _linear(config.hidden_size, config.vocab_size, False, dtype, rngs))

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None, segment_ids=None, cache: KVCache | None = None):
        """Logits ``[batch, seq, vocab]`` (float32), or ``(logits, cache)`` when a cache is given.

        Args:
          input_ids: int ``[batch, seq]``.
          attention_mask: ``[batch, seq]``, 1 for tokens and 0 for padding (default all ones). With a
            cache it covers the new tokens only; the cache remembers earlier ones.
          position_ids: ``[batch, seq]``; default ``arange(seq)`` (offset by the cache length).
          segment_ids: ``[batch, seq]`` ints for packed rows (several examples in one row): a token
            attends only to earlier tokens of its own segment; pass position_ids restarting at 0 per
            segment. Not combined with a cache.
          cache: a `KVCache` to read and extend.
        """
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, position_ids=position_ids,
                                               segment_ids=segment_ids, cache=cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def output_weight(self) -> jax.Array | None:
        """The output layer's dense ``[vocab, hidden]`` weight when it is a plain bias-free projection
        (tied embeddings or a `Linear` lm_head), else None (e.g. LoRA on lm_head). Lets the training
        loss compute logits chunk by chunk (`jaxlora.train.step`)."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight[...]
        if type(self.lm_head) is Linear and self.lm_head.bias is None:
            return self.lm_head.weight[...]
        return None

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[..., vocab]`` of final hidden states ``[..., hidden]`` (from `hidden_states`)."""
        if self.lm_head is None:
            logits = linear_matmul(hidden, self.model.embed_tokens.weight[...].astype(hidden.dtype))
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def hidden_states(self, input_ids, attention_mask=None, *, position_ids=None, segment_ids=None,
                      cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """``(hidden [batch, seq, hidden] after the final norm, in the compute dtype; new cache or None)``:
        the model without its output layer. Arguments as for ``__call__``."""
        b, s = input_ids.shape
        mask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        if position_ids is None:
            position_ids = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
        x = self.model.embed_tokens(input_ids).astype(self.compute_dtype)
        cos, sin = rotary_cos_sin(position_ids, inverse_frequencies(self.config), self.compute_dtype)
        same_segment = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            # Causality needs the token order, not position_ids (which restart in each segment).
            order = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
            same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
        if cache is None:
            key_mask, key_positions = mask, position_ids
            query_positions = position_ids if segment_ids is None else order
            if segment_ids is not None:
                key_positions = order
        else:
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, start))
            max_len = cache.mask.shape[1]
            key_positions = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32)[None, :], (b, max_len))
            # Causality by cache slot, not by position_ids (which only drive RoPE): a left-padded row
            # has positions cumsum(mask) - 1 that lag its slots, and must still see its own tokens.
            # Slots beyond what has been written are masked by key_mask (False there).
            query_positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
        keys, values = (None, None) if cache is None else (list(cache.keys), list(cache.values))
        for i, layer in enumerate(self.model.layers):
            cache_kv = None if cache is None else (keys[i], values[i], start)
            if self.gradient_checkpointing and cache is None:
                x, _ = recomputed_call(layer, x, cos, sin, key_mask, query_positions, key_positions, None, same_segment)
            else:
                x, layer_cache = layer(x, cos, sin, key_mask, query_positions, key_positions, cache_kv, same_segment)
                if layer_cache is not None:
                    # Each layer's array is its own buffer (a loop carry in decoding), updated in place;
                    # re-stacking the layers into one [layers, ...] array copied the whole cache every token.
                    keys[i], values[i] = layer_cache
        x = self.model.norm(x)
        if cache is None:
            return x, None
        return x, KVCache(tuple(keys), tuple(values), start + s, key_mask)


def count_parameters(model: nnx.Module, filter=nnx.Param) -> int:
    """Number of elements of the variables selected by ``filter``."""
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, filter))))
