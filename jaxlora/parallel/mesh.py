"""The device mesh: ``data`` x ``fsdp`` x ``tensor`` axes over the devices JAX sees.

    [parallel]      # of a training config; the product is the number of devices
    data = 1        # replicas that each see part of the batch and hold the whole (sharded) model
    fsdp = -1       # -1: every device left over (the default: all devices on fsdp)
    tensor = 1      # projections split within a layer (column / row parallel)

The batch is split over ``data`` and ``fsdp`` together, the weights over ``fsdp`` and ``tensor``
(`jaxlora.parallel.rules`). The mesh is built with every axis ``AxisType.Auto`` (GSPMD chooses the
collectives; under jax's Explicit default an FSDP matmul raises ``ShardingTypeError``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshConfigError(ValueError):
    """Mesh axis sizes that do not fit the devices (or the batch)."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    data: int = 1
    """Data-parallel replicas."""
    fsdp: int = -1
    """Fully sharded data parallelism: weights, gradients and optimizer state split over it; -1: all
    devices not used by ``data`` and ``tensor``."""
    tensor: int = 1
    """Tensor parallelism: each projection's output (q/k/v/gate/up, lm_head) or input (o/down) split."""
    coordinator: str | None = None
    """``host:port`` of process 0's coordination service, for a run over several processes
    (`jaxlora.parallel.processes`); None: one process."""
    num_processes: int = 1
    """Processes in the run (each with its own devices; the mesh spans all of them)."""
    process_id: int = 0
    """This process's index, 0 to num_processes - 1; process 0 writes the logs, adapters and summary."""
    heartbeat_timeout: int = 100
    """Seconds after which the other processes stop with an error when one of them has died."""

    def __post_init__(self):
        for name in AXES:
            size = getattr(self, name)
            if size == 0 or size < -1:
                raise ValueError(f"parallel.{name} = {size}: expected a positive size, or -1 for the devices left over")
        if [getattr(self, name) for name in AXES].count(-1) > 1:
            raise ValueError("at most one of parallel.data / fsdp / tensor can be -1")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"parallel.process_id = {self.process_id} with parallel.num_processes = "
                             f"{self.num_processes}: expected 0 <= process_id < num_processes")
        if self.num_processes > 1 and not self.coordinator:
            raise ValueError(f"parallel.num_processes = {self.num_processes} needs parallel.coordinator (host:port of "
                             f"process 0)")
        if self.heartbeat_timeout < 1:
            raise ValueError(f"parallel.heartbeat_timeout = {self.heartbeat_timeout}: expected seconds >= 1")

    def sizes(self, num_devices: int) -> tuple[int, int, int]:
        """``(data, fsdp, tensor)`` for ``num_devices`` devices, -1 filled in."""
        sizes = [getattr(self, name) for name in AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise MeshConfigError(f"parallel: {dict(zip(AXES, sizes))} with {num_devices} devices: "
                                      f"{num_devices} is not a multiple of {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise MeshConfigError(f"parallel: data x fsdp x tensor = {' x '.join(map(str, sizes))} = {math.prod(sizes)}, "
                                  f"but there are {num_devices} devices (jax.devices())")
        return tuple(sizes)


def make_mesh(config: ParallelConfig | None = None, devices=None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all of ``jax.devices()``)."""
    config = config or ParallelConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.sizes(len(devices))
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_split(mesh: Mesh) -> int:
    """Into how many parts the batch is split (``data x fsdp``)."""
    return math.prod(mesh.shape[name] for name in BATCH_AXES)


__all__ = ["AXES", "BATCH_AXES", "MeshConfigError", "ParallelConfig", "batch_split", "make_mesh", "replicated"]
