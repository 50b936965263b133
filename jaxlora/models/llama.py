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
`LoraLinear` in its place). The layers are an ``nnx.List``: LoRA injection may give layers different
structures (layers_to_transform, rank_pattern). Identical layers can be stacked in place and run as one
scanned body, whose compile time hardly grows with depth (`jaxlora.models.scan`; the trainer and
``jaxlora generate`` do this); a stacked model decodes with a stacked `KVCache` carried through the scan.

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
from jaxlora.models.scan import StackedLayers, each_layer, run_layers
from jaxlora.nn.attention import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, AttentionMask, blockwise_attention
from jaxlora.nn.dense_attention import cached_attention, grouped_attention
from jaxlora.nn.linear import Linear, broadcast_last
from jaxlora.nn.matmul import linear_matmul


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    keys/values: per layer (a tuple), one ``[batch * kv_heads, max_len, head_dim]`` array per layer
    (head-major, the layout attention multiplies in, with no unit axis for XLA to drop; each layer's
    array is its own buffer, so a decoding step writes its new position in place); or stacked, one
    ``[layers, batch * kv_heads, max_len, head_dim]`` array, for layers that run as one scanned body
    (`jaxlora.models.scan.StackedLayers`, which writes each layer's new positions into it in place).
    `stacked_keys` / `stacked_values` give ``[layers, batch, kv_heads, max_len, head_dim]`` either way.
    ``length``: int32 scalar, how many positions are filled; ``mask``: ``[batch, max_len]`` bool, which
    cached positions are real tokens.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array
    mask: jax.Array

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32, *,
               stacked: bool = False) -> "KVCache":
        """An empty cache; ``stacked``: one array for all layers (for a scanned model), else one per layer."""
        shape = (batch * config.num_key_value_heads, max_len, config.head_dim)
        n = config.num_hidden_layers
        if stacked:
            keys, values = jnp.zeros((n, *shape), dtype), jnp.zeros((n, *shape), dtype)
        else:
            keys, values = tuple(jnp.zeros(shape, dtype) for _ in range(n)), tuple(jnp.zeros(shape, dtype) for _ in range(n))
        return cls(keys, values, jnp.zeros((), jnp.int32), jnp.zeros((batch, max_len), bool))

    @property
    def is_stacked(self) -> bool:
        return not isinstance(self.keys, tuple)

    def _stacked(self, arrays) -> jax.Array:
        batch, max_len = self.mask.shape
        stack = arrays if self.is_stacked else jnp.stack(arrays)
        return stack.reshape(stack.shape[0], batch, -1, max_len, stack.shape[-1])

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


ATTENTION_IMPLEMENTATIONS = ("blockwise", "dense")


class LlamaAttention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        h, kv, d, hidden = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.q_proj = _linear(hidden, h * d, config.attention_bias, dtype, rngs)
        self.k_proj = _linear(hidden, kv * d, config.attention_bias, dtype, rngs)
        self.v_proj = _linear(hidden, kv * d, config.attention_bias, dtype, rngs)
        self.o_proj = _linear(h * d, hidden, config.attention_bias, dtype, rngs)

    def __call__(self, x, cos, sin, mask: AttentionMask, cache_kv=None, implementation: str = "blockwise"):
        """x ``[b, s, hidden]``; mask: `AttentionMask` over the ``k`` keys (the s new ones, or the cache's
        slots); implementation: "blockwise" (`blockwise_attention`) or "dense" (`grouped_attention`).

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
        q = q.reshape(b, s, self.num_kv_heads, groups, self.head_dim).transpose(0, 2, 3, 1, 4)
        new_cache = None
        if cache_kv is not None:
            cached_k, cached_v, start = cache_kv
            new_k = k.reshape(b * self.num_kv_heads, s, self.head_dim).astype(cached_k.dtype)
            new_v = v.reshape(b * self.num_kv_heads, s, self.head_dim).astype(cached_v.dtype)
            new_cache = (jax.lax.dynamic_update_slice(cached_k, new_k, (0, start, 0)),
                         jax.lax.dynamic_update_slice(cached_v, new_v, (0, start, 0)))
            k, v = new_cache
        if implementation == "blockwise":
            # Over a cache, queries that fit one block (decoding, short prompts) take the cache as one key
            # block: with one query row a loop over key blocks costs more per block than the block's
            # products (experiments/results/attention.md).
            single = cache_kv is not None and s <= DEFAULT_BLOCK_Q
            out = blockwise_attention(q, k, v, mask, block_k=k.shape[1] if single else DEFAULT_BLOCK_K)
        elif implementation == "dense":
            dense = grouped_attention if cache_kv is None else cached_attention
            out = dense(q, k, v, mask.dense())
        else:
            raise ValueError(f"attention implementation {implementation!r}: expected one of "
                             f"{ATTENTION_IMPLEMENTATIONS}")
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

    def __call__(self, x, cos, sin, mask: AttentionMask, cache_kv=None, implementation: str = "blockwise"):
        attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, implementation)
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
      gradient_checkpointing: recompute each decoder layer in the backward pass
        (`jaxlora.models.recompute.recomputed_call` per layer, or a remat policy on the scanned body),
        trading one extra forward for not storing the layer's activations.
      attention_implementation: "blockwise" (default; `jaxlora.nn.attention.blockwise_attention`,
        memory linear in the sequence length) or "dense" (`grouped_attention`, the ``[s, s]`` scores
        whole). An attribute: set it on a built model to switch.
      rngs: random streams for initialisation (random weights are for tests; real weights come
        from `torch_bridge.load_llama`).
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, compute_dtype=jnp.float32,
                 gradient_checkpointing: bool = False, attention_implementation: str = "blockwise", rngs: nnx.Rngs):
        if attention_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention_implementation {attention_implementation!r}: expected one of "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.gradient_checkpointing = gradient_checkpointing
        self.attention_implementation = attention_implementation
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
        mask_spec = _attention_mask(mask, position_ids, segment_ids, cache, start)
        implementation = self.attention_implementation
        if cache is None:
            x = run_layers(self.model.layers, x, cos, sin, mask_spec, None, implementation=implementation,
                           remat=self.gradient_checkpointing)
            return self.model.norm(x), None
        layers = self.model.layers
        if cache.is_stacked:
            if not isinstance(layers, StackedLayers):
                raise TypeError("a stacked KVCache (KVCache.create(..., stacked=True)) is for decoder layers stacked "
                                "for scanning (jaxlora.models.scan.stack_layers); these run per layer: create the "
                                "cache with stacked=False")
            x, keys, values = layers.with_cache(x, cache.keys, cache.values, start, cos, sin, mask_spec,
                                                implementation=implementation)
            return self.model.norm(x), KVCache(keys, values, start + s, mask_spec.key_mask)
        keys, values = list(cache.keys), list(cache.values)
        for i, layer in enumerate(each_layer(layers)):
            x, layer_cache = layer(x, cos, sin, mask_spec, (keys[i], values[i], start), implementation=implementation)
            # Each layer's array is its own buffer (a loop carry in decoding), updated in place;
            # re-stacking the layers into one [layers, ...] array copied the whole cache every token.
            keys[i], values[i] = layer_cache
        return self.model.norm(x), KVCache(tuple(keys), tuple(values), start + s, mask_spec.key_mask)


def _attention_mask(mask, position_ids, segment_ids, cache: KVCache | None, start) -> AttentionMask:
    """What generates the attention mask of ``[b, s]`` new tokens: over themselves, or over the cache's slots."""
    b, s = mask.shape
    order = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
    if cache is None:
        if segment_ids is None:
            return AttentionMask(position_ids, position_ids, mask)
        # Causality needs the token order, not position_ids (which restart in each segment).
        return AttentionMask(order, order, mask, segment_ids, segment_ids)
    if segment_ids is not None:
        raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
    max_len = cache.mask.shape[1]
    slots = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32)[None, :], (b, max_len))
    # Causality by cache slot, not by position_ids (which only drive RoPE): a left-padded row has
    # positions cumsum(mask) - 1 that lag its slots, and must still see its own tokens. Slots beyond
    # what has been written are masked (False in the cache's mask).
    return AttentionMask(order, slots, jax.lax.dynamic_update_slice(cache.mask, mask, (0, start)))


def count_parameters(model: nnx.Module, filter=nnx.Param) -> int:
    """Number of elements of the variables selected by ``filter``."""
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, filter))))
