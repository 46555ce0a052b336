"""Multi-process start-up: call `jax.distributed.initialize` once when the job needs it.

One `jaxgen train` process runs per host (TPU VM worker, SLURM node). Before JAX
touches a device, `initialize_from_env()` looks at the environment and, when the
process is one of several, joins them into one JAX job. Sources, first match wins:

1. explicit: `JAXGEN_COORDINATOR=host:port`, `JAXGEN_NUM_PROCESSES`, `JAXGEN_PROCESS_ID`
   (all three or none);
2. SLURM, inside an `srun` step: `SLURM_PROCID` / `SLURM_NTASKS`, coordinator on the
   step's first node (port `JAX_COORDINATOR_PORT`, else derived from the job id as JAX does);
3. Cloud TPU: a GKE worker list (`TPU_WORKER_HOSTNAMES`) or, on a TPU VM, the metadata
   server's worker list; JAX then detects everything itself (no arguments).

Anything else is a single host and nothing happens. `cluster_from_env` is the pure part
(environment -> what to call) so it can be tested without a cluster.

How long a job waits comes from the config's `distributed` section: `heartbeat_timeout`
(a process silent that long is lost, and JAX's runtime stops every survivor) and
`initialization_timeout` (for the coordinator to answer, and for every process to join).
JAX's runtime ends a process it stops with a C++ stack trace; `jaxgen/cli/supervise.py`
turns that into one line (`runtime/faults.py` reads the runtime's message).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import urllib.request
from collections.abc import Callable, Iterator, Mapping

import jax
from jax._src import distributed as jax_distributed
from jax._src.lib import _jax as jaxlib_runtime

from jaxgen.config import DistributedConfig
from jaxgen.errors import JaxgenError
from jaxgen.runtime.platforms import tpu_chips_present

EXPLICIT_VARS = ("JAXGEN_COORDINATOR", "JAXGEN_NUM_PROCESSES", "JAXGEN_PROCESS_ID")
_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"

_initialized = False  # set once this module has joined (or found) a distributed job


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What `initialize_from_env` will pass to `jax.distributed.initialize`.

    Attributes:
        source: "explicit", "slurm" or "tpu" (which environment asked for it).
        coordinator: "host:port" of process 0; None lets JAX detect it (TPU).
        num_processes: processes in the job; None lets JAX detect it.
        process_id: this process's index in [0, num_processes); None lets JAX detect it.
        local_device_ids: devices this process may use; None means all local devices.
    """

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def describe(self) -> str:
        if self.coordinator is None:
            return f"{self.source} (detected by JAX)"
        where = f"coordinator {self.coordinator}"
        return f"{self.source}: {where}, process {self.process_id} of {self.num_processes}"


def _int_var(env: Mapping[str, str], name: str, minimum: int) -> int:
    if name not in env:
        raise JaxgenError(f"{name} is not set")
    raw = env[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise JaxgenError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise JaxgenError(f"{name}={value} must be >= {minimum}")
    return value


def _check_rank(id_var: str, process_id: int, count_var: str, count: int) -> None:
    if process_id >= count:
        raise JaxgenError(f"{id_var}={process_id} must be < {count_var}={count} (ids are 0..{count - 1})")


def _check_coordinator(name: str, address: str) -> str:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise JaxgenError(f"{name}={address!r} must be host:port with a port in 1..65535")
    return f"{host}:{port}"


def _explicit_cluster(env: Mapping[str, str]) -> Cluster:
    missing = [v for v in EXPLICIT_VARS if not env.get(v, "").strip()]
    if missing:
        given = ", ".join(v for v in EXPLICIT_VARS if v not in missing) or "none of them"
        everything = ", ".join(EXPLICIT_VARS)
        raise JaxgenError(f"{given} set but {', '.join(missing)} not: set all of {everything} or none")
    coordinator = _check_coordinator("JAXGEN_COORDINATOR", env["JAXGEN_COORDINATOR"])
    count = _int_var(env, "JAXGEN_NUM_PROCESSES", 1)
    process_id = _int_var(env, "JAXGEN_PROCESS_ID", 0)
    _check_rank("JAXGEN_PROCESS_ID", process_id, "JAXGEN_NUM_PROCESSES", count)
    return Cluster("explicit", coordinator, count, process_id)


def first_slurm_host(nodelist: str) -> str:
    """The first hostname of a SLURM node list ('gpu[007-009,012],cpu1' -> 'gpu007')."""
    head = nodelist.strip().split(",", 1)[0]
    if "[" not in head:
        return head
    prefix, _, ranges = head.partition("[")
    # The bracket may hold several comma-separated ranges; `head` was cut at the first comma.
    return prefix + ranges.split("-", 1)[0].rstrip("]")


def _slurm_cluster(env: Mapping[str, str]) -> Cluster:
    count = _int_var(env, "SLURM_NTASKS", 1)
    process_id = _int_var(env, "SLURM_PROCID", 0)
    _check_rank("SLURM_PROCID", process_id, "SLURM_NTASKS", count)
    if "JAX_COORDINATOR_PORT" in env:
        port = str(_int_var(env, "JAX_COORDINATOR_PORT", 1))
    else:
        # The same job-id-derived port in the ephemeral range that JAX's own SLURM
        # detection picks, so every task computes it without talking to the others.
        port = str(_int_var(env, "SLURM_JOB_ID", 0) % 2**12 + (65535 - 2**12 + 1))
    host = first_slurm_host(env["SLURM_STEP_NODELIST"])
    coordinator = _check_coordinator("SLURM_STEP_NODELIST/JAX_COORDINATOR_PORT", f"{host}:{port}")
    nodes = _int_var(env, "SLURM_STEP_NUM_NODES", 1) if "SLURM_STEP_NUM_NODES" in env else count
    # One task per node (the launch/ recipe) sees all of its node's devices; several tasks
    # per node means one device per task, picked by the task's local rank.
    local = None
    if count > nodes:
        local = (_int_var(env, "SLURM_LOCALID", 0),)
    return Cluster("slurm", coordinator, count, process_id, local)


def tpu_vm_worker_count(timeout: float = 10.0) -> int:
    """Number of workers in this TPU VM's slice, from the GCE metadata server."""
    request = urllib.request.Request(
        _METADATA_URL + "worker-network-endpoints", headers={"Metadata-Flavor": "Google"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            endpoints = response.read().decode()
    except OSError as e:
        raise JaxgenError(
            f"TPU chips found but the metadata server did not answer ({e}); set TPU_SKIP_MDS_QUERY=1"
            f" for a single host or {', '.join(EXPLICIT_VARS)} for several"
        ) from None
    return len([w for w in endpoints.split(",") if w.strip()])


def _tpu_worker_count(env: Mapping[str, str]) -> int:
    """Workers in this TPU slice: GKE's env list, else the TPU VM metadata; 1 off TPU."""
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return len([h for h in hosts.split(",") if h.strip()])
    if "TPU_SKIP_MDS_QUERY" in env or not tpu_chips_present():
        return 1
    return tpu_vm_worker_count()


def cluster_from_env(
    env: Mapping[str, str], tpu_worker_count: Callable[[Mapping[str, str]], int] = _tpu_worker_count
) -> Cluster | None:
    """Decides from `env` whether and how to join a multi-process JAX job.

    Args:
        env: the process environment (or a test's dict).
        tpu_worker_count: returns the TPU slice's worker count (1 off TPU); injectable
            so tests need no TPU or metadata server.

    Returns:
        The cluster, or None for a single process.

    Raises:
        JaxgenError: the environment is inconsistent (one line naming the variable).
    """
    if any(v in env for v in EXPLICIT_VARS):
        cluster = _explicit_cluster(env)
    elif all(v in env for v in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST")):
        cluster = _slurm_cluster(env)
    elif tpu_worker_count(env) > 1:
        cluster = Cluster("tpu")
    else:
        return None
    return None if cluster.num_processes == 1 else cluster


def timeouts(settings: DistributedConfig) -> dict[str, int]:
    """The `jax.distributed.initialize` arguments of the config's `distributed` section."""
    return {
        "heartbeat_timeout_seconds": settings.heartbeat_timeout,
        "initialization_timeout": settings.initialization_timeout,
    }


@contextlib.contextmanager
def _registration_deadline(seconds: int) -> Iterator[None]:
    """Gives the coordination service a deadline for every process to join.

    Without one (`jax.distributed.initialize` sets none) only each client's own connect
    deadline fires, and its message says "Deadline Exceeded" without naming who is
    missing; the service's registration barrier names the processes that never joined.
    The factory is swapped only for the one `initialize` call that creates the service.
    """
    make = getattr(jaxlib_runtime, "get_distributed_runtime_service", None)
    if make is None:  # another jaxlib layout: keep JAX's behaviour
        yield
        return
    jaxlib_runtime.get_distributed_runtime_service = functools.partial(make, cluster_register_timeout=seconds)
    try:
        yield
    finally:
        jaxlib_runtime.get_distributed_runtime_service = make


def initialize_from_env(
    env: Mapping[str, str] | None = None, settings: DistributedConfig | None = None
) -> bool:
    """Joins the multi-process JAX job this process belongs to, once; no-op on one host.

    Must run before anything touches a JAX device. Calling it again (or after someone
    else called `jax.distributed.initialize`) does nothing.

    Args:
        env: environment to read (default `os.environ`).
        settings: the config's `distributed` section (default: its defaults).

    Returns:
        True if this process is part of a multi-process job (now or already initialized).

    Raises:
        JaxgenError: inconsistent environment, JAX already started, or the job could not form.
    """
    global _initialized
    if _initialized or jax.distributed.is_initialized():
        _initialized = True
        return True
    cluster = cluster_from_env(os.environ if env is None else env)
    if cluster is None:
        return False
    limits = timeouts(settings or DistributedConfig())
    try:
        with _registration_deadline(limits["initialization_timeout"]):
            jax.distributed.initialize(
                coordinator_address=cluster.coordinator,
                num_processes=cluster.num_processes,
                process_id=cluster.process_id,
                local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids else None,
                # Explicit clusters must not be second-guessed: JAX's SLURM detection would
                # otherwise restrict a one-task-per-node process to a single GPU.
                cluster_detection_method=None if cluster.coordinator is None else "deactivate",
                **limits,
            )
    except (RuntimeError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JaxgenError(f"jax.distributed.initialize ({cluster.describe()}) failed: {first_line}") from e
    _initialized = True
    return True


def exchange(name: str, value: str, timeout_seconds: int = 60) -> dict[int, str]:
    """{process index: value} of every process of the job, each giving its own `value`,
    exchanged through the coordination service's key-value store; {0: value} on a single host.

    A collective call: every process must make it with the same `name`.
    """
    client = jax_distributed.global_state.client
    if client is None:
        return {0: value}
    client.key_value_set(f"jaxgen/{name}/{jax.process_index()}", value)
    client.wait_at_barrier(f"jaxgen-{name}", timeout_seconds * 1000, None)
    return {int(key.rsplit("/", 1)[1]): got for key, got in client.key_value_dir_get(f"jaxgen/{name}/")}


def peer_hosts(timeout_seconds: int = 60) -> dict[int, str]:
    """{process index: hostname} of every process of the job ({0: this host} on a single
    host). A collective call. A survivor names a lost peer by host with it, which JAX's
    own messages (task numbers only) do not."""
    return exchange("host", socket.gethostname(), timeout_seconds)


def process_info() -> tuple[int, int]:
    """(this process's index, number of processes); (0, 1) on a single host."""
    return jax.process_index(), jax.process_count()
