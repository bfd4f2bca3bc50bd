"""Meshes, logical-axis sharding rules (declared once, as data), multi-host start-up and input."""

from katjax.parallel.mesh import (batch_sharding, logical_sharding, logical_spec, make_mesh,
                                  opt_state_shardings, param_shardings, replicated,
                                  shard_batch, shard_params, train_state_shardings)
from katjax.parallel.multihost import (check_same_config, initialize, is_main_process,
                                       process_allgather_np)
from katjax.parallel.rules import DEFAULT_RULES, MESH_AXES, mesh_axes_for

__all__ = [
    "make_mesh", "logical_spec", "logical_sharding", "param_shardings", "shard_params",
    "batch_sharding", "shard_batch", "replicated", "initialize", "DEFAULT_RULES", "MESH_AXES",
    "mesh_axes_for", "opt_state_shardings", "train_state_shardings",
    "check_same_config", "is_main_process", "process_allgather_np",
]
# katjax.parallel.host_data (global batches, data-iterator checkpoints) imports orbax: not here.
