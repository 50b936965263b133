"""LoRA: a frozen base linear layer plus trainable low-rank updates, with PEFT's exact semantics.

    y = base(x) + s * ((dropout(x) A^T) B^T + b_B),   s = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

(``b_B`` only with ``lora_bias``, PEFT's bias on lora_B.)

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685); rsLoRA:
Kalajdzievski, arXiv:2312.03732; DoRA: Liu et al., arXiv:2402.09353. Names, shapes and
initialisation follow PEFT (formats.md A.4-A.8), including its in-memory layout with named
adapters: ``lora_A[name]`` ``[r, in]``, ``lora_B[name]`` ``[out, r]``, and for DoRA
``lora_magnitude_vector[name]`` ``[out]``, and with ``lora_bias`` ``lora_B_bias[name]`` ``[out]``
(PEFT's ``lora_B[name].bias``). One adapter is active at a time (`set_adapter`), and adapters can be
disabled for a forward pass (``disable_adapters = True``).

The base is any layer with ``in_features``, ``out_features``, ``dense_weight(dtype)`` and an
optional ``bias``: `jaxlora.nn.Linear` (LoRA) or `jaxlora.nn.Linear4bit` (QLoRA). The active
adapter's parameters are ``nnx.LoRAParam`` variables, so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``
and ``nnx.state(model, nnx.LoRAParam)`` select exactly them; the base and the other adapters hold
plain ``nnx.Param`` (frozen), as PEFT trains the active adapter only (`set_adapter` moves that).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.nn.linear import Linear, broadcast_last, torch_linear_uniform
from jaxlora.nn.linear4bit import Linear4bit
from jaxlora.nn.matmul import dot
from jaxlora.quant import quantize_4bit

InitLoraWeights = bool | Literal["gaussian"]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@jax.custom_vjp
def project_up(h: jax.Array, lora_b: jax.Array) -> jax.Array:
    """``h B^T``: h ``[..., r]``, B ``[out, r]`` -> ``[..., out]``.

    Its gradient for B, ``g^T h`` ``[out, r]``, is computed as ``(h^T g)^T``: XLA's CPU matmuls
    want the contracted (token) axis last on the left operand, and written ``g^T h`` XLA transposes
    the large ``g`` ``[tokens, out]`` to get there, as a separate strided copy; written ``h^T g``
    it transposes the small ``h`` ``[tokens, r]`` instead. The optimization barrier keeps XLA from
    folding the final (tiny, ``[r, out]``) transpose back into the product. Measured on the
    SmolLM2-135M LoRA train step (all 7 projections, r=16): the 210 transposes of output
    gradients took ~16% of the step (experiments/results/train.md).

    The products go through `jaxlora.nn.matmul.dot`: float32 operands take the plain product, and
    16-bit adapters (``lora_dtype`` bfloat16) accumulate in float32.
    """
    return dot(h, lora_b, (-1, 1))


def _project_up_fwd(h, lora_b):
    return dot(h, lora_b, (-1, 1)), (h, lora_b)


def _project_up_bwd(residuals, g):
    h, lora_b = residuals
    g = g.astype(h.dtype)
    grad_h = dot(g, lora_b, (-1, 0))
    rank, out = lora_b.shape[1], lora_b.shape[0]
    grad_b_t = jax.lax.optimization_barrier(dot(h.reshape(-1, rank), g.reshape(-1, out), (0, 0)))  # [r, out]
    return grad_h, grad_b_t.T.astype(lora_b.dtype)


project_up.defvjp(_project_up_fwd, _project_up_bwd)


def lora_update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scaling: float) -> jax.Array:
    """``s * (x A^T) B^T`` with the scaling applied on the small ``[..., r]`` side.

    Shapes: x ``[..., in]``, A ``[r, in]``, B ``[out, r]`` -> ``[..., out]``.
    """
    return project_up(dot(x, lora_a, (-1, 1)) * jnp.asarray(scaling, x.dtype), lora_b)


class LoraLinear(nnx.Module):
    """A base linear layer with LoRA adapters (PEFT's ``lora.Linear`` / ``lora.Linear4bit``).

    Args:
      base: the frozen layer, ``Linear`` or ``Linear4bit``.
      adapter_name: name of the first adapter (default "default"); more via `add_adapter`.
      r: rank (> 0).
      lora_alpha: scaling numerator (default 8, as PEFT).
      lora_dropout: dropout rate on the LoRA input (default 0.0); active in ``model.train()`` mode.
      use_rslora: scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
      use_dora: weight-decomposed LoRA, with a trainable magnitude ``[out]``.
      init_lora_weights: ``True`` (A kaiming-uniform a=sqrt(5), B = 0), ``"gaussian"`` (A ~ N(0, 1/r),
        B = 0) or ``False`` (B random too: the adapter is not a no-op; for tests).
      lora_bias: a trainable bias on lora_B, ``[out]`` (zero at init unless ``init_lora_weights=False``).
      lora_dtype: dtype of the adapter parameters (default float32, as PEFT's autocast_adapter_dtype).
      rngs: random streams (``params`` for the init, ``dropout`` for dropout).

    Shapes: x ``[..., in_features]`` -> ``[..., out_features]`` (the base's output dtype).
    """

    def __init__(self, base: Linear | Linear4bit, *, adapter_name: str = "default", r: int, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
                 init_lora_weights: InitLoraWeights = True, lora_bias: bool = False, lora_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_dtype = jnp.dtype(lora_dtype)
        self.lora_A = nnx.Dict()
        self.lora_B = nnx.Dict()
        self.lora_magnitude_vector = nnx.Dict()
        self.lora_B_bias = nnx.Dict()
        self.lora_dropout = nnx.Dict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.merged = False
        self.unmerged_base = nnx.data(None)
        self.add_adapter(adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                         use_dora=use_dora, init_lora_weights=init_lora_weights, lora_bias=lora_bias, rngs=rngs)

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, *, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, init_lora_weights: InitLoraWeights = True,
                    lora_bias: bool = False, rngs: nnx.Rngs) -> None:
        """Create adapter ``name`` (arguments as in the constructor); the active adapter is unchanged, and
        a new adapter that is not the active one is frozen until `set_adapter` selects it."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists; adapters: {list(self.lora_A.keys())}")
        if lora_bias and use_dora:
            raise ValueError("lora_bias cannot be combined with use_dora (as in PEFT)")
        shape_a, shape_b = (r, self.in_features), (self.out_features, r)
        if init_lora_weights == "gaussian":
            a = jax.random.normal(rngs.params(), shape_a, self.lora_dtype) / r
        else:
            a = torch_linear_uniform(rngs.params(), shape_a, self.in_features, self.lora_dtype)
        if init_lora_weights is False:
            b = torch_linear_uniform(rngs.params(), shape_b, r, self.lora_dtype)
        else:
            b = jnp.zeros(shape_b, self.lora_dtype)
        param = nnx.LoRAParam if name == self.active_adapter else nnx.Param
        self.lora_A[name] = param(a)
        self.lora_B[name] = param(b)
        if lora_bias:  # nn.Linear's bias: zero for PEFT's initialisations, torch's uniform with init False
            bias = (torch_linear_uniform(rngs.params(), (self.out_features,), r, self.lora_dtype) if init_lora_weights is False
                    else jnp.zeros((self.out_features,), self.lora_dtype))
            self.lora_B_bias[name] = param(bias)
        if lora_dropout > 0:
            self.lora_dropout[name] = nnx.Dropout(lora_dropout, rngs=rngs)
        # New dict objects (not in-place updates): these are static attributes of the module.
        self.r = {**self.r, name: r}
        self.lora_alpha = {**self.lora_alpha, name: lora_alpha}
        self.scaling = {**self.scaling, name: lora_scaling(r, lora_alpha, use_rslora)}
        self.use_dora = {**self.use_dora, name: use_dora}
        self.lora_bias = {**self.lora_bias, name: lora_bias}
        if use_dora:
            self.lora_magnitude_vector[name] = param(self._weight_norm(name))

    def set_adapter(self, name: str, *, allow_missing: bool = False) -> None:
        """Make adapter ``name`` the one that runs (and trains).

        With ``allow_missing`` (used model-wide, as PEFT does) a layer without that adapter runs its
        base alone while it is active.
        """
        if name not in self.lora_A and not allow_missing:
            raise ValueError(f"adapter {name!r} not found; adapters: {list(self.lora_A.keys())}")
        if self.merged:
            raise ValueError("cannot switch adapters while merged; call unmerge() first")
        self.active_adapter = name
        for table in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_B_bias):
            for adapter, variable in list(table.items()):
                wanted = nnx.LoRAParam if adapter == name else nnx.Param
                if type(variable) is not wanted:
                    table[adapter] = wanted(variable.get_value())

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; the active adapter cannot be deleted while others exist."""
        if name not in self.lora_A:
            raise ValueError(f"adapter {name!r} not found; adapters: {list(self.lora_A.keys())}")
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is active; set_adapter() to another one before deleting it")
        for table in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_B_bias, self.lora_dropout):
            if name in table:
                del table[name]
        self.r, self.lora_alpha, self.scaling, self.use_dora, self.lora_bias = (
            {k: v for k, v in d.items() if k != name}
            for d in (self.r, self.lora_alpha, self.scaling, self.use_dora, self.lora_bias)
        )

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    # -- the math ------------------------------------------------------------------------------
    def delta_weight(self, name: str | None = None) -> jax.Array:
        """``s * B @ A``, ``[out, in]``, in the adapter dtype."""
        name = name or self.active_adapter
        return self.scaling[name] * (self.lora_B[name][...] @ self.lora_A[name][...])

    def _weight_norm(self, name: str) -> jax.Array:
        """Row norms of ``W + s B A`` (DoRA's denominator), with no gradient through them."""
        w = self.base.dense_weight(self.lora_dtype)
        direction = w + self.scaling[name] * jax.lax.stop_gradient(self.lora_B[name][...] @ self.lora_A[name][...])
        return jax.lax.stop_gradient(jnp.linalg.norm(direction, axis=1))

    def _bias(self):
        return None if self.base.bias is None else self.base.bias[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        result = self.base(x)
        name = self.active_adapter
        if self.merged or self.disable_adapters or name not in self.lora_A:
            return result
        scaling = self.scaling[name]
        lora_x = x.astype(self.lora_dtype)
        dropout = self.lora_dropout[name] if name in self.lora_dropout else None
        dropped = dropout(lora_x) if dropout is not None else lora_x
        lora_out = lora_update(dropped, self.lora_A[name][...], self.lora_B[name][...], scaling)
        if name in self.lora_B_bias:  # PEFT: lora_B(lora_A(x)) * scaling, the bias inside the scaling
            lora_out = lora_out + broadcast_last(scaling * self.lora_B_bias[name][...], lora_out.ndim)
        if not self.use_dora[name]:
            return result + lora_out.astype(result.dtype)
        # DoRA (formats.md A.8): base_out + (m/n - 1) * x W^T + (m/n) * s * x A^T B^T, n detached.
        mag_norm_scale = broadcast_last(self.lora_magnitude_vector[name][...] / self._weight_norm(name), x.ndim)
        if dropout is not None and not dropout.deterministic:
            # PEFT recomputes the base product on the dropped input; the base layer's own forward keeps
            # QLoRA's memory property (no dense weight saved for the backward pass).
            base_out = self.base(dropped.astype(x.dtype)).astype(self.lora_dtype)
        else:
            base_out = result.astype(self.lora_dtype)
        bias = self._bias()
        if bias is not None:
            base_out = base_out - broadcast_last(bias.astype(self.lora_dtype), base_out.ndim)
        dora = (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out
        return result + dora.astype(result.dtype)

    # -- merging -------------------------------------------------------------------------------
    def merged_weight(self, name: str | None = None) -> jax.Array:
        """The dense ``[out, in]`` weight with adapter ``name`` (default: the active one) folded in.

        LoRA: ``W + s B A``. DoRA: ``(m / ||W + s B A||_row)[:, None] * (W + s B A)``. In the adapter dtype.
        """
        name = name or self.active_adapter
        w = self.base.dense_weight(self.lora_dtype) + self.delta_weight(name)
        if self.use_dora[name]:
            w = (self.lora_magnitude_vector[name][...] / jnp.linalg.norm(w, axis=1))[:, None] * w
        return w

    def merged_bias(self, name: str | None = None) -> jax.Array | None:
        """The base bias with adapter ``name``'s lora_B bias folded in: ``b + s * b_B`` (adapter dtype).

        Raises ValueError when the adapter has a lora_B bias and the base has none (as PEFT).
        """
        name = name or self.active_adapter
        bias = self._bias()
        if name not in self.lora_B_bias:
            return bias
        if bias is None:
            raise ValueError("cannot merge an adapter with lora_bias=True into a base layer without bias "
                             f"(in_features={self.in_features}, out_features={self.out_features}), as in PEFT")
        return bias.astype(self.lora_dtype) + self.scaling[name] * self.lora_B_bias[name][...]

    def merge(self, *, requantize: bool = True) -> None:
        """Fold the active adapter into the base weight; the forward pass then runs the base alone.

        Full-precision base: ``W <- W + s B A`` computed in float32 and cast to W's dtype (with
        lora_bias also ``b <- b + s b_B``, see `merged_bias`).
        4-bit base: like PEFT with bitsandbytes, the weight is dequantized, merged, and re-quantized
        with the same quant type, blocksize and double quantization (``requantize=True``, default);
        with ``requantize=False`` the merged weight stays dense (original dtype).
        The original base is kept, so `unmerge` restores it bit for bit (PEFT instead subtracts the
        delta again, which is not exact in floating point).
        """
        if self.merged:
            raise ValueError("adapter is already merged; call unmerge() first")
        if self.active_adapter not in self.lora_A:
            raise ValueError(f"active adapter {self.active_adapter!r} is not in this layer; adapters: {self.adapter_names}")
        base = self.base
        merged = self.merged_weight()
        bias = self.merged_bias()
        if bias is not None:  # in the base bias's own dtype, as PEFT
            bias = bias.astype(self._bias().dtype)
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
