"""The only module that knows mesh axis names.

Layers name logical axes ("embed", "heads", ...); `LOGICAL_RULES` maps each to mesh
axes. The mesh has three axes:

- `data`:   pure data parallelism (params replicated, batch split).
- `fsdp`:   batch split *and* params/optimizer state split along `embed` (ZeRO-3 style):
            all-gathered per layer in the forward pass, reduce-scattered in the backward.
- `tensor`: Megatron-style model parallelism over heads / mlp / vocab.

Across TPU slices (`mesh.dcn_data`, `mesh.dcn_fsdp`), the data or fsdp axis also spans the
slices, each slice a contiguous block of it, so the logical rules do not change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgen.config import MeshConfig
from jaxgen.errors import JaxgenError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes (None: replicated). Parameters and activations share
# names where they must agree; activation-only names start with "act_".
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("position", None),
)


def slices(config: MeshConfig) -> int:
    """How many slices (granules joined by the data center network) the mesh spans."""
    return config.dcn_data * config.dcn_fsdp


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 and checks that the mesh uses exactly `num_devices` devices.

    With several slices, the sizes are per slice and `num_devices` counts all of them;
    the result is the per-slice shape.
    """
    if num_devices % slices(config):
        raise JaxgenError(
            f"mesh: {num_devices} devices cannot form dcn_data*dcn_fsdp = {slices(config)} equal slices"
        )
    num_devices //= slices(config)
    sizes = [config.data, config.fsdp, config.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise JaxgenError(
                f"mesh: {dict(zip(MESH_AXES, sizes, strict=True))} cannot fill {num_devices} devices "
                f"({num_devices} is not a multiple of {known})"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise JaxgenError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices"
            " (set one axis to -1 to take the rest)"
        )
    return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: list | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over `devices` (default: all devices).

    Axes are `Auto`, which flax's logical partitioning expects (jax.make_mesh now
    defaults to Explicit axes).
    """
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    if slices(config) > 1:
        grid = _hybrid_grid(shape, (config.dcn_data, config.dcn_fsdp, 1), devices)
    else:
        grid = _grid(shape, devices)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _grid(shape, devices) -> np.ndarray:
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
        # Topology-aware placement is an optimisation; plain order is always valid.
        return np.asarray(devices, dtype=object).reshape(shape)


def _hybrid_grid(ici_shape, dcn_shape, devices) -> np.ndarray:
    """The devices of each slice as one contiguous block of the mesh (dcn x ici per axis).

    TPU devices carry `slice_index`, and `create_hybrid_device_mesh` groups them by it. A
    multi-process job without slices (GPU nodes) groups by process; on one process (CPU
    tests, one multi-GPU host) consecutive runs of devices stand in for the slices.
    """
    if hasattr(devices[0], "slice_index"):
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    if len({d.process_index for d in devices}) > 1:
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, process_is_granule=True)
    per = math.prod(ici_shape)
    granules = [_grid(ici_shape, devices[i : i + per]) for i in range(0, len(devices), per)]
    # Slice (a, b, c) of the dcn shape goes to block (a, b, c): the same layout as
    # create_hybrid_device_mesh's np.block over its granules.
    blocks = np.empty(dcn_shape, dtype=object)
    for index, granule in zip(np.ndindex(*dcn_shape), granules, strict=True):
        blocks[index] = granule
    return np.block(blocks.tolist())


def logical_to_spec(names: tuple[str | None, ...]) -> PartitionSpec:
    return nn.logical_to_mesh_axes(names, LOGICAL_RULES)


def logical_sharding(mesh: Mesh, names: tuple[str | None, ...]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names))


def param_shardings(mesh: Mesh, abstract_variables):
    """NamedShardings for a (boxed) variable tree from `jax.eval_shape(model.init, ...)`."""
    specs = nn.get_partition_spec(abstract_variables)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: batch over data*fsdp, the rest replicated."""
    return logical_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` and LOGICAL_RULES current, so layers' logical constraints resolve."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def mesh_context(mesh: Mesh | None):
    """`activate(mesh)`, or nothing for None (one device, no named shardings)."""
    return contextlib.nullcontext() if mesh is None else activate(mesh)
