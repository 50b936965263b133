"""Training checkpoints with orbax: pytrees of arrays (what trains) plus a JSON ``meta`` dict.

Each save is a directory ``<run>/checkpoints/<step>/`` written by orbax's CheckpointManager, which
writes to a temporary name and renames it when complete, so a run killed mid-save (even with
SIGKILL) leaves the previous checkpoints intact and never a half-written one that looks finished.
The last ``keep`` checkpoints are kept. Saves are synchronous: when `save` returns, the step is on
disk (a resumed run must not depend on a background write that a kill interrupted).

Arrays go to orbax as they are (device or pinned-host jax arrays, or numpy): no host copy is made
here, and restoring builds its target from the shapes, dtypes and shardings of ``like`` (arrays or
``jax.ShapeDtypeStruct``), never from their values. A restored array lands in the sharding, memory
kind included, of its ``like`` leaf: an optimizer state kept in pinned_host memory comes back there.
Typed PRNG keys (dropout RNG state) are stored as their raw key data.

Resuming restores exactly the arrays that were saved (bit for bit), so a resumed run recomputes
the same losses as an uninterrupted one, provided the data order is a function of (seed, step).
What a training run saves (what trains, not the frozen base) is the trainer's choice:
`jaxlora.train.trainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(x):
    """What orbax writes for ``x``: the raw key data of a typed PRNG key (computed where the key lives), else ``x``."""
    return jax.random.key_data(x) if _is_key(x) else x


def _target(x) -> jax.ShapeDtypeStruct:
    """The restore target of a ``like`` leaf, from its shape, dtype and sharding only."""
    abstract = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x
    return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=getattr(x, "sharding", None))


def _like(restored, reference):
    """``restored`` as a leaf of the kind ``reference`` is: a typed key again, in ``reference``'s sharding."""
    if _is_key(reference):
        restored = jax.random.wrap_key_data(restored, impl=jax.random.key_impl(reference))
    sharding = getattr(reference, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return restored if getattr(restored, "sharding", None) == sharding else jax.device_put(restored, sharding)
    return restored if _is_key(reference) else jax.numpy.asarray(restored)


class TrainCheckpointer:
    """Save and restore pytrees of arrays (e.g. ``{"trainable", "opt_state", "rng"}``) plus a JSON ``meta`` dict.

    Args:
      directory: where step directories go (created if missing).
      keep: how many of the most recent checkpoints to keep (default 3).
    """

    def __init__(self, directory, *, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write checkpoint ``step`` (state: pytrees of arrays; meta: JSON-serialisable)."""
        stored = jax.tree.map(_storable, state)
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(stored),
                                                         meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The meta dict of ``step`` (default: latest), without reading any array."""
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int | None, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The state (with the structure, dtypes and shardings of ``like``) and meta of ``step`` (default: latest).

        ``like``'s leaves are read for their shape, dtype and sharding only (arrays or ShapeDtypeStructs).
        """
        step = self._step(step)
        abstract = jax.tree.map(_target, like)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                       meta=ocp.args.JsonRestore()))
        state = jax.tree.map(_like, restored["state"], like)
        return state, restored["meta"]

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        return step

    def close(self) -> None:
        self._manager.close()
