"""The devices a plan compiles for: fake CPU devices, or libtpu's compile-only TPU devices.

Nothing here runs a program on a device. TPU devices come from
`jax.experimental.topologies.get_topology_desc`, which asks libtpu to describe a slice
that is not attached: the devices can be placed in a mesh and compiled for, never run.
The host's own JAX backend stays the CPU one, so planning on a machine that is training
(a TPU VM) never takes its chips.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
from jax.experimental import topologies

from jaxgen.errors import JaxgenError
from jaxgen.plan.topology import Topology

TPU_EXTRA = 'pip install -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Devices:
    """The devices of a topology and how they divide among processes (hosts)."""

    devices: tuple  # jax.Device, in the order libtpu / JAX lists them
    processes: int

    @property
    def per_process(self) -> int:
        return len(self.devices) // self.processes


def prepare_host(topology: Topology) -> None:
    """Points JAX at the host CPU (and, for cpu:N, N fake devices) before it starts.

    Called by the CLI before anything touches a device. Where JAX has already started
    (a test process, a notebook) this changes nothing and `topology_devices` says
    whether enough CPU devices are there.
    """
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    if topology.platform == "cpu":
        try:
            jax.config.update("jax_num_cpu_devices", topology.num_devices)
        except RuntimeError:  # JAX has started: its device count is fixed now
            pass


def topology_devices(topology: Topology) -> Devices:
    """The devices of `topology`.

    Raises:
        JaxgenError: too few CPU devices for cpu:N, libtpu not installed for a TPU
            topology, or libtpu refused the topology (its first line).
    """
    if topology.platform == "cpu":
        return Devices(tuple(_cpu_devices(topology.num_devices)), processes=1)
    if importlib.util.find_spec("libtpu") is None:
        raise JaxgenError(f"topology {topology.name}: libtpu is not installed; {TPU_EXTRA}")
    chip = topology.chip
    # libtpu also prepares the local host's TPU runtime as it loads, and without these it
    # prints pages about the accelerator type and worker list it cannot find; they only
    # describe this host, not the topology compiled for.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", chip.accelerator(topology.num_devices // topology.slices))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology.libtpu_name,
            chip_config_name=chip.chip_config,
            chips_per_host_bounds=topology.host_bounds,
            num_slices=topology.slices,
            wrap=topology.wrap,
        )
    except Exception as e:  # jaxlib's error types move between versions
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JaxgenError(f"topology {topology.name}: libtpu cannot describe it: {first}") from None
    devices = tuple(desc.devices)
    return Devices(devices, processes=len({d.process_index for d in devices}))


def _cpu_devices(count: int) -> list:
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise JaxgenError(
            f"topology cpu:{count}: JAX started with {len(devices)} CPU devices; set"
            f" XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts"
            " (jaxgen plan does this itself when it runs first)"
        )
    return devices[:count]
