"""The only module that knows mesh axis names.

Layers name logical axes ("embed", "heads", ...); `LOGICAL_RULES` maps each to mesh
axes. The mesh has three axes:

- `data`:   pure data parallelism (params replicated, batch split).
- `fsdp`:   batch split *and* params/optimizer state split along `embed` (ZeRO-3 style):
            all-gathered per layer in the forward pass, reduce-scattered in the backward.
- `tensor`: Megatron-style model parallelism over heads / mlp / vocab.
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


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 and checks that the mesh uses exactly `num_devices` devices."""
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
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
        # Topology-aware placement is an optimisation; plain order is always valid.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


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
