"""jaxgen.runtime.distributed: environment parsing, and a real 2-process JAX job on CPU."""

import os
import socket
import subprocess
import sys

import jax
import pytest

from jaxgen.errors import JaxgenError
from jaxgen.runtime.distributed import (
    Cluster,
    cluster_from_env,
    first_slurm_host,
    initialize_from_env,
    process_info,
)

EXPLICIT = {"JAXGEN_COORDINATOR": "10.0.0.1:1234", "JAXGEN_NUM_PROCESSES": "4", "JAXGEN_PROCESS_ID": "3"}
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
}


def cluster(env, tpu_workers=1):
    return cluster_from_env(env, tpu_worker_count=lambda e: tpu_workers)


# ----------------------------------------------------------------------------- parsing


def test_single_host_needs_nothing():
    assert cluster({}) is None
    assert cluster({"SLURM_JOB_ID": "7"}) is None  # an allocation shell, not an srun step
    assert cluster({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert cluster({**EXPLICIT, "JAXGEN_NUM_PROCESSES": "1", "JAXGEN_PROCESS_ID": "0"}) is None


def test_explicit_vars():
    assert cluster(EXPLICIT) == Cluster("explicit", "10.0.0.1:1234", 4, 3)
    # explicit settings win over SLURM and TPU detection
    assert cluster({**SLURM, **EXPLICIT}, tpu_workers=4).source == "explicit"


def test_slurm_one_task_per_node_sees_all_devices():
    p = cluster(SLURM)
    assert p == Cluster("slurm", "gpu007:61586", 2, 1, None)  # 4242 % 4096 + 61440
    assert cluster({**SLURM, "JAX_COORDINATOR_PORT": "9999"}).coordinator == "gpu007:9999"


def test_slurm_several_tasks_per_node_get_one_device_each():
    env = {**SLURM, "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert cluster(env).local_device_ids == (1,)


def test_tpu_pod_is_left_to_jax():
    assert cluster({}, tpu_workers=4) == Cluster("tpu")
    assert cluster_from_env({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == Cluster("tpu")
    assert cluster_from_env({"TPU_WORKER_HOSTNAMES": "w0"}) is None


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("node1,node2", "node1"), ("gpu[007-009,012],cpu1", "gpu007"), ("n[3,5]", "n3")],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"JAXGEN_NUM_PROCESSES": "2"},
            "JAXGEN_NUM_PROCESSES set but JAXGEN_COORDINATOR, JAXGEN_PROCESS_ID not",
        ),
        ({**EXPLICIT, "JAXGEN_PROCESS_ID": ""}, "but JAXGEN_PROCESS_ID not"),
        ({**EXPLICIT, "JAXGEN_PROCESS_ID": "4"}, "JAXGEN_PROCESS_ID=4 must be < JAXGEN_NUM_PROCESSES=4"),
        ({**EXPLICIT, "JAXGEN_PROCESS_ID": "-1"}, "JAXGEN_PROCESS_ID=-1 must be >= 0"),
        ({**EXPLICIT, "JAXGEN_NUM_PROCESSES": "0"}, "JAXGEN_NUM_PROCESSES=0 must be >= 1"),
        ({**EXPLICIT, "JAXGEN_NUM_PROCESSES": "two"}, "JAXGEN_NUM_PROCESSES='two' is not an integer"),
        ({**EXPLICIT, "JAXGEN_COORDINATOR": "10.0.0.1"}, "JAXGEN_COORDINATOR='10.0.0.1' must be host:port"),
        ({**EXPLICIT, "JAXGEN_COORDINATOR": "h:99999"}, "JAXGEN_COORDINATOR='h:99999' must be host:port"),
        ({**SLURM, "SLURM_PROCID": "2"}, "SLURM_PROCID=2 must be < SLURM_NTASKS=2"),
        (
            {k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"} | {"SLURM_NTASKS": "4"},
            "SLURM_LOCALID is not set",
        ),
    ],
)
def test_inconsistent_env_is_one_line(env, message):
    with pytest.raises(JaxgenError) as info:
        cluster(env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_single_host_initialize_is_a_no_op():
    assert initialize_from_env({}) is False
    assert process_info() == (0, 1)


def test_initialize_after_jax_started_is_one_line():
    jax.devices()  # conftest already started JAX; make that explicit
    env = {"JAXGEN_COORDINATOR": "localhost:1", "JAXGEN_NUM_PROCESSES": "2", "JAXGEN_PROCESS_ID": "0"}
    with pytest.raises(JaxgenError, match=r"jax\.distributed\.initialize \(explicit: .*\) failed: .*before"):
        initialize_from_env(env)


# ----------------------------------------------------------------------------- two real processes

WORKER = """
from jaxgen.runtime.distributed import initialize_from_env, process_info
assert initialize_from_env() is True
assert initialize_from_env() is True  # a second call must not initialize again
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
index, count = process_info()
mesh = Mesh(np.array(jax.devices()), ("d",))
# Each process holds only its own 2 numbers; the sum needs every process's data.
local = np.arange(2, dtype=np.float32) + 10 * index  # [2] on this process
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local, (2 * count,))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print(f"RESULT index={index} count={count} devices={jax.device_count()} sum={float(total)}", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _process_env(source: str, port: int, index: int) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("JAXGEN_", "SLURM_", "TPU_"))}
    env = {**keep, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    if source == "explicit":
        cluster = {"JAXGEN_COORDINATOR": f"localhost:{port}", "JAXGEN_PROCESS_ID": str(index)}
        return {**env, **cluster, "JAXGEN_NUM_PROCESSES": "2"}
    slurm = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "0"}
    return {
        **env,
        **slurm,
        "SLURM_PROCID": str(index),
        "SLURM_STEP_NODELIST": "localhost",
        "JAX_COORDINATOR_PORT": str(port),
    }


@pytest.mark.parametrize("source", ["explicit", "slurm"])
def test_two_processes_form_one_job(source):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env=_process_env(source, port, i),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        # A missing peer makes the other wait minutes for the coordinator: bound it.
        for p in procs:
            outputs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, out
        # sum over both processes' data: (0 + 1) + (10 + 11)
        assert f"RESULT index={i} count=2 devices=4 sum=22.0" in out, out
