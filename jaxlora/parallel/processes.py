"""Several processes (hosts, or processes on one host) in one run: `jax.distributed` before any device is
touched, and which process writes files.

    jaxlora train run.toml --coordinator host0:1234 --num-processes 2 --process-id 0    # on host0
    jaxlora train run.toml --coordinator host0:1234 --num-processes 2 --process-id 1    # on host1

Every process runs the same program on its own devices; the mesh spans all of them
(`jaxlora.parallel.mesh`), each process feeds its devices' part of every batch, all of them take part
in checkpoints (orbax writes each process's shards), and process 0 alone writes logs, adapters and the
summary. When a process dies, the coordination service stops the others with an error after
``parallel.heartbeat_timeout`` seconds instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import jax

from jaxlora.parallel.mesh import ParallelConfig


def start_processes(config: ParallelConfig) -> None:
    """Join the run of ``config.num_processes`` processes (no-op for one process, or when this process
    already joined). Must run before anything asks JAX for its devices."""
    if config.num_processes == 1 or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(config.coordinator, num_processes=config.num_processes, process_id=config.process_id,
                               heartbeat_timeout_seconds=config.heartbeat_timeout)


def is_main_process() -> bool:
    """Process 0 (the only one, in a single-process run): the one that writes files and logs."""
    return jax.process_index() == 0


__all__ = ["is_main_process", "start_processes"]
