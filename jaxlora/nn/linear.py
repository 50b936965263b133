"""A plain linear layer with the weight stored ``[out_features, in_features]`` (torch's layout).

Hugging Face checkpoints store ``nn.Linear`` weights as ``[out, in]`` and compute ``y = x W^T + b``;
keeping that layout means checkpoints load without transposes (DESIGN.md, formats.md E).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.nn.matmul import linear_matmul


def torch_linear_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    """``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch's nn.Linear init."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def broadcast_last(vector: jax.Array, ndim: int) -> jax.Array:
    """A ``[features]`` vector shaped ``[1, ..., 1, features]`` to combine with an ``ndim``-D array
    (explicit, so code runs under ``jax_numpy_rank_promotion="raise"``)."""
    return vector.reshape((1,) * (ndim - 1) + vector.shape)


class Linear(nnx.Module):
    """``y = x W^T + b`` with ``W`` ``[out_features, in_features]``.

    Args:
      in_features, out_features: sizes.
      use_bias: add a bias ``[out_features]`` (default False, as in Llama).
      dtype: parameter dtype (default float32).
      rngs: random streams for torch-style uniform initialisation.

    Shapes: x ``[..., in_features]`` -> ``[..., out_features]``.
    Use `Linear.from_weight` to wrap existing arrays.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
        _weight: jax.Array | None = None,
        _bias: jax.Array | None = None,
    ):
        self.in_features = in_features
        self.out_features = out_features
        if _weight is None:
            if rngs is None:
                raise ValueError("Linear needs rngs to initialise its weight (or use Linear.from_weight)")
            _weight = torch_linear_uniform(rngs.params(), (out_features, in_features), in_features, dtype)
            if use_bias:
                _bias = torch_linear_uniform(rngs.params(), (out_features,), in_features, dtype)
        self.weight = nnx.Param(_weight)
        self.bias = nnx.data(nnx.Param(_bias) if _bias is not None else None)

    @classmethod
    def from_weight(cls, weight: jax.Array, bias: jax.Array | None = None) -> "Linear":
        """A layer holding the given ``[out, in]`` weight (and ``[out]`` bias), without copying."""
        weight = jnp.asarray(weight)
        if weight.ndim != 2:
            raise ValueError(f"Linear weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        if bias is not None and tuple(jnp.shape(bias)) != (weight.shape[0],):
            raise ValueError(f"Linear bias must have shape ({weight.shape[0]},), got {tuple(jnp.shape(bias))}")
        out_features, in_features = weight.shape
        bias = None if bias is None else jnp.asarray(bias)
        return cls(int(in_features), int(out_features), _weight=weight, _bias=bias)

    def dense_weight(self, dtype=None) -> jax.Array:
        """The weight ``[out, in]`` as a dense array (in ``dtype`` if given)."""
        w = self.weight[...]
        return w if dtype is None else w.astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # The activation dtype is the compute dtype: the weight is cast to it (a no-op when equal).
        y = linear_matmul(x, self.weight[...].astype(x.dtype))
        if self.bias is not None:
            y = y + broadcast_last(self.bias[...].astype(y.dtype), y.ndim)
        return y
