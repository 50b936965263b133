"""Training state and batches on a mesh: optimizer state sharded like its parameters (ZeRO), batches
split over ``data x fsdp``, and the shardings the jitted step returns (its inputs' own)."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.parallel.mesh import BATCH_AXES, MeshConfigError, batch_split, replicated


def shardings_of(tree):
    """The sharding of every array of ``tree`` (memory kind included)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def place_optimizer_state(tx: optax.GradientTransformation, opt_state, params, mesh: Mesh):
    """``opt_state`` with every parameter-shaped leaf (AdamW's moments) sharded like its parameter in
    ``params``, the rest (step counts) replicated."""
    return optax.tree_map_params(tx, lambda x, p: jax.device_put(x, p.sharding), opt_state, params,
                                 transform_non_params=lambda x: jax.device_put(x, replicated(mesh)))


def batch_sharding(mesh: Mesh, leading: int = 1) -> NamedSharding:
    """``[*leading axes, batch, seq]`` arrays: the batch split over ``data x fsdp``."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), BATCH_AXES))


def check_batch_split(rows: int, mesh: Mesh, what: str) -> None:
    """Raise `MeshConfigError` unless ``rows`` (which ``what`` names) split evenly over ``data x fsdp``."""
    parts = batch_split(mesh)
    if rows % parts:
        raise MeshConfigError(f"{what} does not split over parallel.data x parallel.fsdp = {parts} devices "
                              f"({dict(mesh.shape)}): use a run.batch_size that is a multiple of {parts}, or put "
                              f"devices on parallel.tensor")


def place_batch(micro_batches: dict, mesh: Mesh) -> dict:
    """``[accumulation, batch, seq]`` micro-batches split over ``data x fsdp`` on ``mesh``."""
    for name, x in micro_batches.items():
        check_batch_split(x.shape[1], mesh, f"the batch of {x.shape[1]} rows of {name!r} (shape {tuple(x.shape)}: "
                                            f"[accumulation, batch, seq])")
    sharding = batch_sharding(mesh)
    # Each process builds only its own devices' slices (all processes hold the same global batch).
    return {name: jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
            for name, x in micro_batches.items()}


def step_shardings(trainable, rest, opt_state, mesh: Mesh):
    """``out_shardings`` for `jaxlora.train.step.make_train_step`: the trainable parameters', the dropout
    RNG state's and the optimizer state's current shardings, the metrics replicated."""
    rng_state = nnx.split_state(rest, nnx.RngState, ...)[0]
    return shardings_of(trainable), shardings_of(rng_state), shardings_of(opt_state), replicated(mesh)


__all__ = ["batch_sharding", "check_batch_split", "place_batch", "place_optimizer_state", "shardings_of", "step_shardings"]
