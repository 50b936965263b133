"""The optimizer against torch.optim.AdamW + clip_grad_norm_ + HF's schedules, and host offload."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer, offloaded_update, to_memory

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPES = {"layer.lora_A": (4, 16), "layer.lora_B": (16, 4), "norm.weight": (16,), "proj.bias": (8,)}


def initial_params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def gradient_sequence(steps, seed=1, scale=3.0):
    rng = np.random.default_rng(seed)
    return [{k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()} for _ in range(steps)]


def run_torch(config: OptimizerConfig, steps: int, grads):
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in initial_params().items()}
    decay = [p for k, p in params.items() if "norm" not in k and "bias" not in k]
    no_decay = [p for k, p in params.items() if "norm" in k or "bias" in k]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    sched = transformers.get_scheduler(config.lr_scheduler_type, opt, num_warmup_steps=config.warmup(steps),
                                       num_training_steps=steps, scheduler_specific_kwargs=config.lr_scheduler_kwargs)
    lrs = []
    for g in grads:
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return {k: p.detach().numpy() for k, p in params.items()}, lrs


def run_jax(config: OptimizerConfig, steps: int, grads, offload=False):
    tx = make_optimizer(config, steps)
    params = jax.tree.map(jnp.asarray, initial_params())
    state = tx.init(params)
    if offload:
        state = to_memory(state, "pinned_host")

    @jax.jit
    def step(params, state, g):
        if offload:
            updates, state = offloaded_update(tx, g, state, params)
        else:
            updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for g in grads:
        params, state = step(params, state, jax.tree.map(jnp.asarray, g))
    return jax.tree.map(np.asarray, params), state


@pytest.mark.parametrize("config", [
    OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=3, max_grad_norm=1.0),
    OptimizerConfig(learning_rate=5e-3, weight_decay=0.01, lr_scheduler_type="linear", warmup_ratio=0.1, max_grad_norm=0.5),
    OptimizerConfig(learning_rate=1e-3, weight_decay=0.0, lr_scheduler_type="constant_with_warmup", warmup_steps=2,
                    max_grad_norm=None),
    OptimizerConfig(learning_rate=1e-2, weight_decay=0.01, lr_scheduler_type="polynomial", warmup_steps=3,
                    lr_scheduler_kwargs={"power": 2.0, "lr_end": 1e-4}),
], ids=["cosine-wd-clip", "linear-ratio", "constant-warmup-noclip", "polynomial"])
def test_twenty_steps_match_torch_adamw(config):
    steps = 20
    grads = gradient_sequence(steps)
    expected, lrs = run_torch(config, steps, grads)
    ours, _ = run_jax(config, steps, grads)
    schedule = learning_rate_schedule(config, steps)
    # float32 schedule vs torch's float64: the bound derived in tests/train/test_schedules.py (relative
    # 1e-6, plus the cosine's cancellation near its end, peak * 2^-24 * (3 pi + 4) absolute).
    np.testing.assert_allclose([float(schedule(i)) for i in range(steps)], lrs, rtol=1e-6,
                               atol=config.learning_rate * 2**-24 * (3 * np.pi + 4))
    for k in expected:
        moved = np.abs(expected[k] - initial_params()[k]).max()
        assert moved > 1e-3, f"{k} barely moved: the comparison would be vacuous"
        err = np.abs(ours[k] - expected[k]).max()
        assert err <= 1e-5 * max(1.0, np.abs(expected[k]).max()), f"{k}: max abs difference {err:.2e}"


def test_optimizer_state_offloaded_to_host_gives_identical_parameters():
    config = OptimizerConfig(learning_rate=1e-2, weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=2)
    grads = gradient_sequence(8)
    plain, _ = run_jax(config, 8, grads)
    offloaded, state = run_jax(config, 8, grads, offload=True)
    moments = [leaf for leaf in jax.tree.leaves(state) if getattr(leaf, "ndim", 0) > 0]
    assert moments and all(leaf.sharding.memory_kind == "pinned_host" for leaf in moments)
    for k in plain:
        np.testing.assert_array_equal(offloaded[k], plain[k])


def test_config_errors():
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        OptimizerConfig(lr_scheduler_type="cosine_annealing")
    with pytest.raises(ValueError, match="max_grad_norm"):
        OptimizerConfig(max_grad_norm=0.0)
