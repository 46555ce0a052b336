"""Where programs run: the device mesh and its one logical-axis rules table, multi-process
start-up from the cluster's environment, and the CPU allocator setting for training."""

from jaxgen.runtime.cpu_malloc import keep_cpu_buffers_mapped, prepare_for_training
from jaxgen.runtime.distributed import initialize_from_env, process_info
from jaxgen.runtime.mesh import (
    BATCH_AXES,
    LOGICAL_RULES,
    MESH_AXES,
    activate,
    batch_sharding,
    data_parallel_size,
    logical_sharding,
    make_mesh,
    mesh_context,
    mesh_shape,
    param_shardings,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_RULES",
    "MESH_AXES",
    "activate",
    "batch_sharding",
    "data_parallel_size",
    "initialize_from_env",
    "keep_cpu_buffers_mapped",
    "logical_sharding",
    "make_mesh",
    "mesh_context",
    "mesh_shape",
    "param_shardings",
    "prepare_for_training",
    "process_info",
]
