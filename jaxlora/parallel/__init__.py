"""Scale out over a device mesh: the mesh (`mesh.py`) and the sharding rules (`rules.py`)."""

from jaxlora.parallel.mesh import AXES, BATCH_AXES, MeshConfigError, ParallelConfig, batch_split, make_mesh
from jaxlora.parallel.placement import place_batch, place_optimizer_state, step_shardings
from jaxlora.parallel.processes import is_main_process, start_processes
from jaxlora.parallel.rules import RULES, ShardingWarning, shard_model, state_shardings

__all__ = ["AXES", "BATCH_AXES", "MeshConfigError", "ParallelConfig", "RULES", "ShardingWarning", "batch_split", "is_main_process",
           "make_mesh", "place_batch", "place_optimizer_state", "shard_model", "start_processes", "state_shardings", "step_shardings"]
