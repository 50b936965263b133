"""Training checkpoints with orbax: trainable parameters, optimizer state, step, data position, RNG.

Each save is a directory ``<run>/checkpoints/<step>/`` written by orbax's CheckpointManager, which
writes to a temporary name and renames it when complete, so a run killed mid-save (even with
SIGKILL) leaves the previous checkpoints intact and never a half-written one that looks finished.
The last ``keep`` checkpoints are kept. Saves are synchronous: when `save` returns, the step is on
disk (a resumed run must not depend on a background write that a kill interrupted).

Resuming restores exactly the arrays that were saved (bit for bit), so a resumed run recomputes
the same losses as an uninterrupted one, provided the data order is a function of (seed, step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_numpy(x):
    """A host numpy copy; typed PRNG keys (dropout RNG state) are stored as their raw key data."""
    return np.asarray(jax.random.key_data(x)) if _is_key(x) else np.asarray(x)


def _like(restored, reference):
    if _is_key(reference):
        return jax.random.wrap_key_data(restored, impl=jax.random.key_impl(reference))
    return jax.numpy.asarray(restored)


class TrainCheckpointer:
    """Save and restore ``{"trainable", "opt_state", "rng"}`` arrays plus a JSON ``meta`` dict.

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
        host_state = jax.tree.map(_to_numpy, state)  # device or pinned-host arrays -> host numpy
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                         meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def restore(self, step: int | None, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The state (with the structure and dtypes of ``like``) and meta of ``step`` (default: latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(lambda x: _to_numpy(x), like)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                       meta=ocp.args.JsonRestore()))
        state = jax.tree.map(_like, restored["state"], like)
        return state, restored["meta"]

    def close(self) -> None:
        self._manager.close()
