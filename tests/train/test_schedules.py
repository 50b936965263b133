"""Learning-rate schedules against transformers' ``get_scheduler``, step by step, and their config errors.

transformers is driven as its Trainer drives it: the learning rate an update uses is read from the
optimizer, then ``optimizer.step()`` and ``scheduler.step()`` (a ``LambdaLR`` starts at
``lambda(0)``), so the k-th update (k = 0, 1, ...) uses ``lr(k)``: jaxlora's convention.

Tolerance (jaxlora computes in float32, transformers in float64): every schedule is a handful of
float32 operations, each with a relative error of at most 2^-24 (the peak rounded to float32, one
division, a product, a square root, a sum); 1e-6 = 16.8 x 2^-24 bounds their sum with room for the
few-ulp error of pow. The cosine family also has an absolute error: the argument x = 2 pi c progress
is rounded three times (3 x 2^-24 |x|, which cos passes on as an absolute error), cos adds ~2 ulps
of 1 and 1 + cos one more; near the zeros of (1 + cos)/2 that is not small relative to the value.
So |ours - transformers| <= 1e-6 |transformers| + peak 2^-24 (3 max|x| + 4), the second term only
for the cosine family (max|x| over the steps compared).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.train.optim import OptimizerConfig, learning_rate_schedule
from jaxlora.train.schedules import SCHEDULES, make_schedule

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PEAK = 3e-4
EXTRA = 5  # steps compared beyond the total
ULP = 2.0**-24
COSINE_FAMILY = ("cosine", "cosine_with_min_lr", "cosine_with_restarts")


def transformers_learning_rates(name, peak, warmup, total, kwargs, steps):
    """The learning rate each of ``steps`` updates uses, with the Trainer's order of calls."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak)
    scheduler = transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                           scheduler_specific_kwargs=dict(kwargs))
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(rates, dtype=np.float64)


def absolute_bound(name, peak, warmup, total, kwargs, steps):
    """peak 2^-24 (3 max|x| + 4) for the cosine family (module docstring), else 0."""
    if name not in COSINE_FAMILY:
        return 0.0
    if name == "cosine_with_restarts":
        largest_argument = math.pi  # pi times a phase in [0, 1)
    else:
        cycles = kwargs.get("num_cycles", 0.5)
        largest_argument = 2 * math.pi * cycles * max(abs(steps - 1 - warmup), warmup) / max(1, total - warmup)
    return peak * ULP * (3 * largest_argument + 4)


CASES = [  # (name, kwargs); each runs over the (total, warmup) pairs below
    ("constant", {}),
    ("constant_with_warmup", {}),
    ("linear", {}),
    ("cosine", {}),
    ("cosine", {"num_cycles": 2.0}),
    ("cosine", {"num_cycles": 1.25}),
    ("cosine_with_restarts", {}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("cosine_with_restarts", {"num_cycles": 7}),
    ("polynomial", {}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-5}),
    ("polynomial", {"power": 0.5, "lr_end": 0.0}),
    ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 1e-5, "num_cycles": 1.0}),
]
TOTALS_AND_WARMUPS = [(1, 0), (7, 0), (7, 3), (20, 2), (21, 0), (100, 10), (30, 45)]


def test_every_schedule_is_covered():
    assert {name for name, _ in CASES} == set(SCHEDULES)


@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES])
def test_schedule_matches_transformers_at_every_step(name, kwargs):
    compared = 0
    for total, warmup in TOTALS_AND_WARMUPS:
        if name == "constant" and warmup:
            continue  # "constant" has no warmup (an error here, see below)
        steps = total + EXTRA
        expected = transformers_learning_rates(name, PEAK, warmup, total, kwargs, steps)
        schedule = make_schedule(name, PEAK, warmup, total, kwargs)
        bound = 1e-6 * np.abs(expected) + absolute_bound(name, PEAK, warmup, total, kwargs, steps)
        # Eager, as the trainer logs it, and jitted on a traced int32 step, as optax's AdamW calls it.
        for how, fn in (("eager", schedule), ("jit", jax.jit(schedule))):
            ours = np.array([float(fn(jnp.int32(step))) for step in range(steps)])
            error = np.abs(ours - expected)
            worst = int(np.argmax(error - bound))
            assert np.all(error <= bound), (f"{name} {kwargs} total={total} warmup={warmup} ({how}): step {worst} "
                                            f"ours {ours[worst]!r} transformers {expected[worst]!r}")
        compared += steps
    assert compared >= 44  # at least the warmup-free pairs (all that "constant" allows)


def test_restarts_begin_at_the_peak():
    """frac(c progress) is computed from integers: every restart is exactly at the peak (step 2 + 6k)."""
    schedule = make_schedule("cosine_with_restarts", 1.0, 2, 20, {"num_cycles": 3})
    assert [float(schedule(s)) for s in (2, 8, 14)] == [1.0, 1.0, 1.0]
    assert float(schedule(20)) == 0.0


def test_polynomial_without_decay_steps_gives_lr_end():
    """total == warmup: transformers divides by zero at step == total; the limit there is lr_end."""
    schedule = make_schedule("polynomial", 1e-3, 4, 4, {"lr_end": 1e-5})
    assert [float(schedule(s)) for s in (4, 5)] == pytest.approx([1e-5, 1e-5], rel=1e-6)
    assert float(schedule(2)) == pytest.approx(5e-4, rel=1e-6)


@pytest.mark.parametrize("total, warmup_ratio", [(20, 0.1), (33, 0.03), (7, 0.5)])
def test_warmup_ratio_rounds_up_as_transformers(total, warmup_ratio):
    config = OptimizerConfig(learning_rate=PEAK, lr_scheduler_type="linear", warmup_ratio=warmup_ratio)
    args = transformers.TrainingArguments(output_dir="unused", warmup_steps=warmup_ratio, report_to=[])
    assert config.warmup(total) == args.get_warmup_steps(total)
    expected = transformers_learning_rates("linear", PEAK, args.get_warmup_steps(total), total, {}, total)
    schedule = learning_rate_schedule(config, total)
    np.testing.assert_allclose([float(schedule(s)) for s in range(total)], expected, rtol=1e-6, atol=0)


def test_config_kwargs_reach_the_schedule():
    config = OptimizerConfig(learning_rate=1.0, lr_scheduler_type="polynomial", warmup_steps=2,
                             lr_scheduler_kwargs={"power": 2.0, "lr_end": 0.25})
    schedule = learning_rate_schedule(config, 6)
    assert [float(schedule(s)) for s in range(8)] == pytest.approx([0.0, 0.5, 1.0, 0.671875, 0.4375, 0.296875, 0.25, 0.25])


@pytest.mark.parametrize("kwargs, match", [
    ({"lr_scheduler_type": "constant", "warmup_steps": 3}, r"'constant' has no warmup.*warmup_steps = 3.*warmup_ratio.*'constant_with_warmup'"),
    ({"lr_scheduler_type": "constant", "warmup_ratio": 0.1}, r"warmup_steps = 0 and warmup_ratio = 0.1.*constant_with_warmup"),
    ({"lr_scheduler_type": "linear", "warmup_steps": 3, "warmup_ratio": 0.1}, "warmup_steps = 3 and warmup_ratio = 0.1 both"),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"}, r"'reduce_lr_on_plateau' is not supported; expected one of \['linear'"),
    ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycle": 2}}, r"\['num_cycle'\].*'cosine', which takes \['num_cycles'\]"),
    ({"lr_scheduler_type": "constant_with_warmup", "lr_scheduler_kwargs": {"num_cycles": 2}}, "takes none"),
    ({"lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 1.5}}, r"num_cycles = 1.5.*whole number"),
    ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": -1}}, "positive number"),
    ({"lr_scheduler_type": "polynomial", "learning_rate": 1e-7}, r"lr_end \(1e-07\) must be smaller than learning_rate \(1e-07\)"),
    ({"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"power": 0}}, "power = 0"),
    ({"lr_scheduler_type": "inverse_sqrt", "lr_scheduler_kwargs": {"timescale": 0}}, "timescale = 0"),
    ({"lr_scheduler_type": "cosine_with_min_lr"}, "exactly one of lr_scheduler_kwargs.min_lr and lr_scheduler_kwargs.min_lr_rate"),
    ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-6, "min_lr_rate": 0.1}}, "exactly one"),
    ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 2.0}}, r"min_lr_rate = 2.0.*\[0, 1\]"),
])
def test_config_errors_name_the_keys(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)


def test_transformers_agrees_on_the_errors_it_has():
    """The errors above that transformers raises too (the rest it ignores or fails on later)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-7)
    with pytest.raises(ValueError, match="lr_end"):
        transformers.get_scheduler("polynomial", optimizer, num_warmup_steps=0, num_training_steps=10)
    with pytest.raises(TypeError, match="num_cycle"):
        transformers.get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=10,
                                   scheduler_specific_kwargs={"num_cycle": 2})
    with pytest.raises(ValueError, match="min_lr"):
        transformers.get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=0, num_training_steps=10)
