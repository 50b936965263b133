"""Training state and batches on a mesh: optimizer state sharded like its parameters (ZeRO), batches
split over ``data x fsdp``, and the shardings the jitted step returns (its inputs' own)."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.parallel.mesh import BATCH_AXES, MeshConfigError, batch_split


def shardings_of(tree):
    """The sharding of every array of ``tree`` (memory kind included)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def place_optimizer_state(tx: optax.GradientTransformation, opt_state, params, mesh: Mesh):
    """``opt_state`` with every parameter-shaped leaf (AdamW's moments) sharded like its parameter in
    ``params``, the rest (step counts) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda x, p: jax.device_put(x, p.sharding), opt_state, params,
                                 transform_non_params=lambda x: jax.device_put(x, replicated))


def batch_sharding(mesh: Mesh, leading: int = 1) -> NamedSharding:
    """``[*leading axes, batch, seq]`` arrays: the batch split over ``data x fsdp``."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), BATCH_AXES))


def place_batch(micro_batches: dict, mesh: Mesh) -> dict:
    """``[accumulation, batch, seq]`` micro-batches split over ``data x fsdp`` on ``mesh``."""
    parts = batch_split(mesh)
    for name, x in micro_batches.items():
        if x.shape[1] % parts:
            raise MeshConfigError(f"batch {name!r} of shape {tuple(x.shape)} ([accumulation, batch, seq]): the batch "
                                  f"{x.shape[1]} does not split into data x fsdp = {parts} equal parts; use a "
                                  f"run.batch_size that is a multiple of {parts}")
    sharding = batch_sharding(mesh)
    # Each process builds only its own devices' slices (all processes hold the same global batch).
    return {name: jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
            for name, x in micro_batches.items()}


def step_shardings(trainable, rest, opt_state, mesh: Mesh):
    """``out_shardings`` for `jaxlora.train.step.make_train_step`: the trainable parameters', the dropout
    RNG state's and the optimizer state's current shardings, the metrics replicated."""
    rng_state = nnx.split_state(rest, nnx.RngState, ...)[0]
    return (shardings_of(trainable), shardings_of(rng_state), shardings_of(opt_state),
            NamedSharding(mesh, PartitionSpec()))


__all__ = ["batch_sharding", "place_batch", "place_optimizer_state", "shardings_of", "step_shardings"]
