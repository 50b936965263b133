"""Learning-rate schedules with transformers' names and values (``transformers.get_scheduler``).

``lr(step)`` for step = 0, 1, ... (the number of updates already applied): the first update uses
``lr(0)``, as HF's Trainer does (it builds a ``LambdaLR``, whose value at construction is
``lambda(0)``, and calls ``scheduler.step()`` after each ``optimizer.step()``). With ``p`` the peak
learning rate, ``w`` the warmup steps, ``N`` the total steps, ``d = max(1, N - w)`` and
``progress = (step - w) / d``, every schedule but "constant" warms up linearly,
``lr = p * step / max(1, w)`` for ``step < w``, and then:

- "constant": ``p`` from step 0 (no warmup: a configured warmup is an error, see `check_schedule`);
- "constant_with_warmup": ``p``;
- "linear": ``p * max(0, (N - step) / d)``;
- "cosine": ``p * max(0, (1 + cos(2 pi c progress)) / 2)``, ``c = num_cycles`` (0.5: one half-cosine
  to 0 at ``N``; past ``N`` the curve rises again, as in transformers);
- "cosine_with_min_lr": the cosine factor ``f`` mapped to ``max(0, f (1 - m) + m)``, ``m = min_lr_rate``
  (or ``min_lr / p``);
- "cosine_with_restarts": ``p * (1 + cos(pi frac(c progress))) / 2`` for ``progress < 1``, 0 after,
  ``c = num_cycles`` hard restarts (an integer, default 1);
- "polynomial": ``(p - e) * ((N - step) / (N - w))^power + e`` up to ``N``, ``e`` after (``e = lr_end``,
  default 1e-7, below ``p``; ``power`` default 1.0);
- "inverse_sqrt": ``p / sqrt((step + t - w) / t)``, ``t = timescale`` (default ``w``, or 10000
  when there is no warmup); independent of ``N``.

Schedule-specific arguments are transformers' ``scheduler_specific_kwargs`` (TrainingArguments'
``lr_scheduler_kwargs``) with the same names and defaults; an argument a schedule does not take is an
error (transformers ignores some, e.g. everything given to "constant_with_warmup").

Precision: the values are computed in float32 (transformers computes in float64). Integer parts stay
exact: the restart phase ``frac(c progress)`` is computed as ``(c (step - w) mod d) / d`` in
integers, so a restart starts at exactly ``p`` (a float product can land just below the integer
there, and the ``frac`` at the other end of the cycle); ``N - step`` is formed before dividing. What
remains is a handful of float32 roundings (2^-24 relative each) and, for the cosine family,
cos's error on an argument of size up to ``2 pi c``: tests/train/test_schedules.py states the bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

SCHEDULE_KWARGS: dict[str, dict[str, Any]] = {
    "linear": {},
    "cosine": {"num_cycles": 0.5},
    "cosine_with_restarts": {"num_cycles": 1},
    "polynomial": {"lr_end": 1e-7, "power": 1.0},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {"timescale": None},
    "cosine_with_min_lr": {"num_cycles": 0.5, "min_lr": None, "min_lr_rate": None},
}
"""Each supported schedule and its arguments with transformers' defaults (None: derived)."""
SCHEDULES = tuple(SCHEDULE_KWARGS)
INVERSE_SQRT_DEFAULT_TIMESCALE = 10_000


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(name: str, kwargs: Mapping[str, Any], learning_rate: float, warmup_steps: int,
                   warmup_ratio: float) -> None:
    """Raise ValueError, naming the keys, for a schedule that transformers would run differently or not at all."""
    if name not in SCHEDULE_KWARGS:
        raise ValueError(f"lr_scheduler_type {name!r} is not supported; expected one of {list(SCHEDULES)}")
    if name == "constant" and (warmup_steps > 0 or warmup_ratio > 0):
        raise ValueError(f"lr_scheduler_type 'constant' has no warmup (transformers' get_constant_schedule), but "
                         f"warmup_steps = {warmup_steps} and warmup_ratio = {warmup_ratio} ask for one; use "
                         f"lr_scheduler_type 'constant_with_warmup', or set both to 0")
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"lr_scheduler_kwargs must be a table of arguments, got {kwargs!r}")
    accepted = SCHEDULE_KWARGS[name]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = f"takes {sorted(accepted)}" if accepted else "takes none"
        raise ValueError(f"lr_scheduler_kwargs {unknown} are not arguments of lr_scheduler_type {name!r}, which {takes}")

    def bad(key, expected):
        return ValueError(f"lr_scheduler_kwargs.{key} = {kwargs[key]!r} for lr_scheduler_type {name!r}: expected {expected}")

    if "num_cycles" in kwargs:
        c = kwargs["num_cycles"]
        if name == "cosine_with_restarts" and not (_is_integer(c) and c >= 1):
            raise bad("num_cycles", "a whole number of restarts >= 1")
        if not (_is_number(c) and c > 0):
            raise bad("num_cycles", "a positive number of cosine waves")
    if "power" in kwargs and not (_is_number(kwargs["power"]) and kwargs["power"] > 0):
        raise bad("power", "a positive number")
    if "lr_end" in kwargs and not (_is_number(kwargs["lr_end"]) and kwargs["lr_end"] >= 0):
        raise bad("lr_end", "a number >= 0")
    if name == "polynomial":
        lr_end = kwargs.get("lr_end", accepted["lr_end"])
        if not lr_end < learning_rate:  # transformers' get_polynomial_decay_schedule_with_warmup raises too
            raise ValueError(f"lr_scheduler_kwargs.lr_end ({lr_end}) must be smaller than learning_rate ({learning_rate}) "
                             f"for lr_scheduler_type 'polynomial'")
    if "timescale" in kwargs and not (_is_integer(kwargs["timescale"]) and kwargs["timescale"] >= 1):
        raise bad("timescale", "a whole number of steps >= 1")
    if name == "cosine_with_min_lr":
        given = [k for k in ("min_lr", "min_lr_rate") if kwargs.get(k) is not None]
        if len(given) != 1:
            raise ValueError("lr_scheduler_type 'cosine_with_min_lr' needs exactly one of lr_scheduler_kwargs.min_lr and "
                             f"lr_scheduler_kwargs.min_lr_rate, got {given or 'neither'}")
        if given == ["min_lr"] and not (_is_number(kwargs["min_lr"]) and 0 <= kwargs["min_lr"] <= learning_rate):
            raise bad("min_lr", f"a number in [0, learning_rate = {learning_rate}]")
        if given == ["min_lr_rate"] and not (_is_number(kwargs["min_lr_rate"]) and 0 <= kwargs["min_lr_rate"] <= 1):
            raise bad("min_lr_rate", "a number in [0, 1]")


def make_schedule(name: str, peak: float, warmup: int, total_steps: int, kwargs: Mapping[str, Any] | None = None):
    """``lr(step)`` (float32) of schedule ``name`` (module docstring), checked with `check_schedule` first.

    Args:
      name: a key of `SCHEDULE_KWARGS` (transformers' ``SchedulerType`` value).
      peak: the learning rate after warmup (the optimizer's ``lr`` in transformers).
      warmup: warmup steps (transformers' ``num_warmup_steps``; 0 for "constant").
      total_steps: ``num_training_steps``.
      kwargs: ``scheduler_specific_kwargs``; missing ones take transformers' defaults.
    """
    kwargs = dict(kwargs or {})
    check_schedule(name, kwargs, peak, warmup, 0.0)
    options = {**SCHEDULE_KWARGS[name], **{k: v for k, v in kwargs.items() if v is not None}}
    decay = max(1, total_steps - warmup)
    after = _AFTER_WARMUP[name]

    def schedule(step):
        step = jnp.asarray(step).astype(jnp.int32)
        ramp = jnp.float32(peak) * (step.astype(jnp.float32) / jnp.float32(max(1, warmup)))
        return jnp.where(step < warmup, ramp, after(step, peak, warmup, total_steps, decay, options))

    return schedule


def _constant(step, peak, warmup, total, decay, options):
    return jnp.full(step.shape, peak, jnp.float32)


def _linear(step, peak, warmup, total, decay, options):
    return jnp.float32(peak) * jnp.maximum(0.0, (total - step).astype(jnp.float32) / jnp.float32(decay))


def _cosine(step, peak, warmup, total, decay, options):
    progress = (step - warmup).astype(jnp.float32) / jnp.float32(decay)
    factor = 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi * options["num_cycles"] * 2.0) * progress))
    if options.get("min_lr") is not None or options.get("min_lr_rate") is not None:
        rate = options["min_lr"] / peak if options.get("min_lr") is not None else options["min_lr_rate"]
        factor = factor * jnp.float32(1.0 - rate) + jnp.float32(rate)
    return jnp.float32(peak) * jnp.maximum(0.0, factor)


def _cosine_with_restarts(step, peak, warmup, total, decay, options):
    elapsed = step - warmup
    # frac(num_cycles * elapsed / decay) from integers, so that each restart is exactly at phase 0.
    phase = ((elapsed % decay) * options["num_cycles"] % decay).astype(jnp.float32) / jnp.float32(decay)
    factor = 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * phase))
    return jnp.where(elapsed >= decay, 0.0, jnp.float32(peak) * factor)


def _polynomial(step, peak, warmup, total, decay, options):
    lr_end, power = options["lr_end"], options["power"]
    # transformers divides by total - warmup unguarded (ZeroDivisionError at step == total == warmup);
    # max(1, .) gives the limit, lr_end, there.
    remaining = jnp.maximum(total - step, 0).astype(jnp.float32) / jnp.float32(max(1, total - warmup))
    exponent = int(power) if float(power).is_integer() else jnp.float32(power)  # whole powers: exact products
    decayed = jnp.float32(peak - lr_end) * remaining**exponent + jnp.float32(lr_end)
    return jnp.where(step > total, jnp.float32(lr_end), decayed)


def _inverse_sqrt(step, peak, warmup, total, decay, options):
    timescale = options["timescale"] or (warmup or INVERSE_SQRT_DEFAULT_TIMESCALE)
    shifted = jnp.maximum(step + (timescale - warmup), 1)  # >= timescale wherever it is used (step >= warmup)
    return jnp.float32(peak) / jnp.sqrt(shifted.astype(jnp.float32) / jnp.float32(timescale))


_AFTER_WARMUP = {
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "constant": _constant,
    "constant_with_warmup": _constant,
    "inverse_sqrt": _inverse_sqrt,
    "cosine_with_min_lr": _cosine,
}
