"""AdamW with torch's semantics, learning-rate schedules, clipping, and host-offloaded optimizer state.

The update (formats.md D.3), per trainable parameter, t = 1, 2, ...:

    g <- g * min(max_grad_norm / (||g||_global + 1e-6), 1)           (torch.nn.utils.clip_grad_norm_)
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    p <- p - lr_t * ( (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p )

which is torch.optim.AdamW's (decoupled weight decay scaled by the learning rate, eps outside the
square root) written as optax computes it; the two agree to ~1 ulp per step (D.4). Every
hyper-parameter is explicit: optax's own weight-decay default (1e-4) differs from torch's (1e-2) and
from HF's TrainingArguments (0.0), so nothing here relies on a library default. As in HF's Trainer,
biases and norm weights get no weight decay.

Schedules are transformers' (``get_scheduler``), name for name and value for value:
`jaxlora.train.schedules` has their formulas; the first update uses the schedule's value at step 0.

Host offload (the stand-in for bitsandbytes' paged optimizers): the AdamW moments live in host
memory (JAX memory kind ``pinned_host``) between steps; `offloaded_update` moves them to the device
for the update inside the jitted step and back afterwards. On a GPU this frees 8 bytes per trainable
parameter of device memory (two float32 moments) at the cost of copying them over PCIe twice per step
(16 bytes per parameter); for LoRA's few million parameters that is milliseconds. JAX's CPU backend
has the same memory kinds, so the code path runs (as a copy within host memory) and is tested here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora.parallel.rules import variable_path
from jaxlora.train.schedules import check_schedule, make_schedule

_NO_DECAY = re.compile(r"(bias|layernorm|rmsnorm|(^|\.)norm($|\.)|_norm($|\.))")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, schedule and clipping settings (HF TrainingArguments names)."""

    learning_rate: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (HF's default 0.0; torch.optim.AdamW's is 0.01)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    """Clip gradients to this global L2 norm (None: no clipping)."""
    lr_scheduler_type: str = "linear"
    """transformers' schedule names: "linear", "cosine", "cosine_with_restarts", "polynomial",
    "constant" (no warmup), "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr"
    (`jaxlora.train.schedules`)."""
    lr_scheduler_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The schedule's own arguments, as TrainingArguments.lr_scheduler_kwargs: cosine: num_cycles (0.5);
    cosine_with_restarts: num_cycles (1); polynomial: lr_end (1e-7), power (1.0); inverse_sqrt:
    timescale (the warmup steps, or 10000 without warmup); cosine_with_min_lr: num_cycles (0.5) and
    one of min_lr, min_lr_rate. Any other key is an error."""
    warmup_steps: int = 0
    """Linear warmup steps (not with "constant")."""
    warmup_ratio: float = 0.0
    """Warmup as a share of the total steps, rounded up as transformers does; not together with warmup_steps."""
    offload_optimizer_state: bool = False
    """Keep the AdamW moments in host memory between steps."""

    def __post_init__(self):
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_steps must be >= 0 and warmup_ratio in [0, 1); got {self.warmup_steps}, {self.warmup_ratio}")
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise ValueError(f"warmup_steps = {self.warmup_steps} and warmup_ratio = {self.warmup_ratio} both set the "
                             "warmup; set one of them")
        check_schedule(self.lr_scheduler_type, self.lr_scheduler_kwargs, self.learning_rate, self.warmup_steps,
                       self.warmup_ratio)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.warmup_ratio * total_steps)


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """``lr(step)`` for step = 0, 1, ... (the number of updates already applied): transformers'
    ``get_scheduler(lr_scheduler_type, num_warmup_steps=config.warmup(total_steps),
    num_training_steps=total_steps, scheduler_specific_kwargs=lr_scheduler_kwargs)``."""
    return make_schedule(config.lr_scheduler_type, config.learning_rate, config.warmup(total_steps), total_steps,
                         config.lr_scheduler_kwargs)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: multiply by ``min(max_norm / (norm + 1e-6), 1)`` (optax's own
    clip_by_global_norm divides by the norm, without the 1e-6)."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coefficient = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coefficient).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params):
    """True for parameters that get weight decay: all but biases and norm weights (HF Trainer's rule)."""

    def keep(path, _):
        name = variable_path(path).lower()
        return _NO_DECAY.search(name) is None

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping (if set) followed by AdamW with the schedule, every constant explicit."""
    adamw = optax.adamw(
        learning_rate_schedule(config, total_steps),
        b1=config.adam_beta1,
        b2=config.adam_beta2,
        eps=config.adam_epsilon,
        eps_root=0.0,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(clip_by_global_norm_torch(config.max_grad_norm), adamw)


def to_memory(tree, kind: str):
    """Place every array of ``tree`` in memory ``kind`` ("device" or "pinned_host"), outside jit."""

    def place(x):
        if not isinstance(x, jax.Array):
            return x
        return jax.device_put(x, x.sharding.with_memory_kind(kind))

    return jax.tree.map(place, tree)


def offloaded_update(tx: optax.GradientTransformation, grads, opt_state, params):
    """``tx.update`` for an ``opt_state`` kept in host memory; call inside jit.

    The state is brought to device memory for the update, and the new state is returned in host
    memory, so between steps only the parameters occupy the accelerator.
    """
    on_device = jax.device_put(opt_state, jax.memory.Space.Device)
    updates, new_state = tx.update(grads, on_device, params)
    return updates, jax.device_put(new_state, jax.memory.Space.Host)
