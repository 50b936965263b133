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
from jaxlora.models.rope import apply_rotary, inverse_frequencies, rotary_cos_sin
from jaxlora.nn.linear import Linear, broadcast_last


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    keys/values: ``[layers, batch, max_len, kv_heads, head_dim]``; ``length``: int32 scalar, how many
    positions are filled; ``mask``: ``[batch, max_len]`` bool, which cached positions are real tokens.
    """

    keys: jax.Array
    values: jax.Array
    length: jax.Array
    mask: jax.Array

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), jnp.zeros((batch, max_len), bool))


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
        the cached ``[b, max_len, kv, d]`` arrays, attention runs over all cached positions, and the
        updated arrays are returned too.
        """
        b, s, _ = x.shape
        q = apply_rotary(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        new_cache = None
        if cache_kv is not None:
            cached_k, cached_v, start = cache_kv
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, start, 0, 0))
            new_cache = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, s, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) * (self.head_dim**-0.5)
        allowed = (key_positions[:, None, :] <= query_positions[:, :, None]) & key_mask[:, None, :]  # [b, q, k]
        if same_segment is not None:
            allowed = allowed & same_segment
        scores = jnp.where(allowed[:, None, None, :, :], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out), new_cache


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(hidden, inter, config.mlp_bias, dtype, rngs)
        self.up_proj = _linear(hidden, inter, config.mlp_bias, dtype, rngs)
        self.down_proj = _linear(inter, hidden, config.mlp_bias, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


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
            query_positions = position_ids
            # Positions beyond what has been written are masked by key_mask (False there).
        new_keys, new_values = [], []
        for i, layer in enumerate(self.model.layers):
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i], start)
            if self.gradient_checkpointing and cache is None:
                x, _ = nnx.remat(lambda layer, *args: layer(*args))(layer, x, cos, sin, key_mask, query_positions, key_positions,
                                                                    None, same_segment)
            else:
                x, layer_cache = layer(x, cos, sin, key_mask, query_positions, key_positions, cache_kv, same_segment)
                if layer_cache is not None:
                    new_keys.append(layer_cache[0])
                    new_values.append(layer_cache[1])
        x = self.model.norm(x)
        if self.lm_head is None:
            logits = x @ self.model.embed_tokens.weight[...].astype(x.dtype).T
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, KVCache(jnp.stack(new_keys), jnp.stack(new_values), start + s, key_mask)


def count_parameters(model: nnx.Module, filter=nnx.Param) -> int:
    """Number of elements of the variables selected by ``filter``."""
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, filter))))
