"""LoRA: a frozen base linear layer plus a trainable low-rank update, with PEFT's exact semantics.

    y = base(x) + s * (dropout(x) A^T) B^T,   s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685); rsLoRA:
Kalajdzievski, arXiv:2312.03732; DoRA: Liu et al., arXiv:2402.09353. Names, shapes and
initialisation follow PEFT (formats.md A.4-A.8): ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``,
``lora_magnitude_vector`` ``[out]`` for DoRA.

The base is any layer with ``in_features``, ``out_features``, ``dense_weight(dtype)`` and an
optional ``bias``: `jaxlora.nn.Linear` (LoRA) or `jaxlora.nn.Linear4bit` (QLoRA). The LoRA
parameters are ``nnx.LoRAParam`` variables, so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
``nnx.state(model, nnx.LoRAParam)`` select exactly them; the base stays frozen.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.nn.linear import Linear, broadcast_last, torch_linear_uniform
from jaxlora.nn.linear4bit import Linear4bit
from jaxlora.quant import quantize_4bit

InitLoraWeights = bool | Literal["gaussian"]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoraLinear(nnx.Module):
    """A base linear layer with a LoRA adapter (PEFT's ``lora.Linear`` / ``lora.Linear4bit``).

    Args:
      base: the frozen layer, ``Linear`` or ``Linear4bit``.
      r: rank (> 0).
      lora_alpha: scaling numerator (default 8, as PEFT).
      lora_dropout: dropout rate on the LoRA input (default 0.0); active in ``model.train()`` mode.
      use_rslora: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
      use_dora: weight-decomposed LoRA, with a trainable magnitude ``[out]``.
      init_lora_weights: ``True`` (A kaiming-uniform a=sqrt(5), B = 0), ``"gaussian"`` (A ~ N(0, 1/r),
        B = 0) or ``False`` (B random too: the adapter is not a no-op; for tests).
      lora_dtype: dtype of the adapter parameters (default float32, as PEFT's autocast_adapter_dtype).
      rngs: random streams (``params`` for the init, ``dropout`` for dropout).

    Shapes: x ``[..., in_features]`` -> ``[..., out_features]`` (the base's output dtype).
    """

    def __init__(
        self,
        base: Linear | Linear4bit,
        *,
        r: int,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: InitLoraWeights = True,
        lora_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_dtype = jnp.dtype(lora_dtype)
        shape_a, shape_b = (r, self.in_features), (self.out_features, r)
        if init_lora_weights == "gaussian":
            a = jax.random.normal(rngs.params(), shape_a, self.lora_dtype) / r
        else:
            a = torch_linear_uniform(rngs.params(), shape_a, self.in_features, self.lora_dtype)
        if init_lora_weights is False:
            b = torch_linear_uniform(rngs.params(), shape_b, r, self.lora_dtype)
        else:
            b = jnp.zeros(shape_b, self.lora_dtype)
        self.lora_A = nnx.LoRAParam(a)
        self.lora_B = nnx.LoRAParam(b)
        self.lora_dropout = nnx.data(nnx.Dropout(lora_dropout, rngs=rngs) if lora_dropout > 0 else None)
        # nnx.data: these attributes may switch between None and a variable/module later.
        self.lora_magnitude_vector = nnx.data(None)
        if use_dora:
            self.lora_magnitude_vector = nnx.LoRAParam(self._weight_norm())
        self.merged = False
        self.unmerged_base = nnx.data(None)

    # -- the math ------------------------------------------------------------------------------
    def delta_weight(self) -> jax.Array:
        """``s * B @ A``, ``[out, in]``, in the adapter dtype."""
        return self.scaling * (self.lora_B[...] @ self.lora_A[...])

    def _weight_norm(self) -> jax.Array:
        """Row norms of ``W + s B A`` (DoRA's denominator), with no gradient through them."""
        w = self.base.dense_weight(self.lora_dtype)
        direction = w + self.scaling * jax.lax.stop_gradient(self.lora_B[...] @ self.lora_A[...])
        return jax.lax.stop_gradient(jnp.linalg.norm(direction, axis=1))

    def _bias(self):
        return None if self.base.bias is None else self.base.bias[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        result = self.base(x)
        if self.merged:
            return result
        lora_x = x.astype(self.lora_dtype)
        dropped = self.lora_dropout(lora_x) if self.lora_dropout is not None else lora_x
        lora_out = (dropped @ self.lora_A[...].T) @ self.lora_B[...].T
        if not self.use_dora:
            return result + (lora_out * self.scaling).astype(result.dtype)
        # DoRA (formats.md A.8): base_out + (m/n - 1) * x W^T + (m/n) * s * x A^T B^T, n detached.
        mag_norm_scale = broadcast_last(self.lora_magnitude_vector[...] / self._weight_norm(), x.ndim)
        dropout_active = self.lora_dropout is not None and not self.lora_dropout.deterministic
        if dropout_active:
            # PEFT recomputes the base product on the dropped input; the base layer's own forward keeps
            # QLoRA's memory property (no dense weight saved for the backward pass).
            base_out = self.base(dropped.astype(x.dtype)).astype(self.lora_dtype)
        else:
            base_out = result.astype(self.lora_dtype)
        bias = self._bias()
        if bias is not None:
            base_out = base_out - broadcast_last(bias.astype(self.lora_dtype), base_out.ndim)
        dora = (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out * self.scaling
        return result + dora.astype(result.dtype)

    # -- merging -------------------------------------------------------------------------------
    def merged_weight(self) -> jax.Array:
        """The dense ``[out, in]`` weight with the adapter folded in, in float32 (or the adapter dtype).

        LoRA: ``W + s B A``. DoRA: ``(m / ||W + s B A||_row)[:, None] * (W + s B A)``.
        """
        w = self.base.dense_weight(self.lora_dtype) + self.delta_weight()
        if self.use_dora:
            w = (self.lora_magnitude_vector[...] / jnp.linalg.norm(w, axis=1))[:, None] * w
        return w

    def merge(self, *, requantize: bool = True) -> None:
        """Fold the adapter into the base weight; the forward pass then runs the base alone.

        Full-precision base: ``W <- W + s B A`` computed in float32 and cast to W's dtype.
        4-bit base: like PEFT with bitsandbytes, the weight is dequantized, merged, and re-quantized
        with the same quant type, blocksize and double quantization (``requantize=True``, default);
        with ``requantize=False`` the merged weight stays dense (original dtype).
        The original base is kept, so `unmerge` restores it bit for bit (PEFT instead subtracts the
        delta again, which is not exact in floating point).
        """
        if self.merged:
            raise ValueError("adapter is already merged; call unmerge() first")
        base = self.base
        merged = self.merged_weight()
        bias = self._bias()
        if isinstance(base, Linear4bit):
            q = base.quantized
            merged = merged.astype(q.dtype)
            if requantize:
                q_new = quantize_4bit(merged, blocksize=q.blocksize, quant_type=q.quant_type, double_quant=q.double_quant)
                new_base = Linear4bit(q_new, bias, compute_dtype=base.compute_dtype)
            else:
                new_base = Linear.from_weight(merged, bias)
        else:
            new_base = Linear.from_weight(merged.astype(base.weight[...].dtype), bias)
        self.unmerged_base = base
        self.base = new_base
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge`: restore the original base exactly."""
        if not self.merged:
            raise ValueError("adapter is not merged")
        self.base = self.unmerged_base
        self.unmerged_base = None
        self.merged = False
