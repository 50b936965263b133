"""Rotary position embeddings in transformers' ``rotate_half`` convention (formats.md E.1).

    q' = q * cos + rotate_half(q) * sin,   rotate_half([a, b]) = [-b, a]   (halves of head_dim)

with ``cos, sin`` of ``position * inv_freq`` repeated over both halves (not interleaved), so HF
checkpoints load without permuting q_proj/k_proj rows. ``inv_freq = theta ** -(2i / d)``; the
llama3 variant rescales long wavelengths (Llama 3.1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.llama_config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """float32 ``[head_dim // 2]``, computed as transformers does (float32 exponent, then llama3 scaling)."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    if config.rope_type == "default":
        return inv_freq
    factor = config.rope_factor
    old_context = config.rope_original_max_position_embeddings
    low_freq_wavelen = old_context / config.rope_low_freq_factor
    high_freq_wavelen = old_context / config.rope_high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((old_context / wavelen - config.rope_low_freq_factor) / (config.rope_high_freq_factor - config.rope_low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[batch, seq, head_dim]`` for integer ``positions [batch, seq]``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x ``[batch, seq, heads, head_dim]``; cos/sin ``[batch, seq, head_dim]``."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
