"""jaxgen.runtime.faults: the runtime's failure messages (captured from real 2-process jobs
on jaxlib 0.10) read as one line; and the `distributed` settings JAX is started with."""

# ruff: noqa: E501 (the runtime's messages are quoted as captured, long lines and all)

import pytest

from jaxgen.config import DistributedConfig, load_config
from jaxgen.runtime.distributed import timeouts
from jaxgen.runtime.faults import Fault, explain

UNHEALTHY = """E1204 10:34:08.112432   14956 coordination_service.cc:1549] [1433] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
F1204 10:34:08.113236   14967 client.h:80] Terminating process because the JAX distributed service detected fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed.

RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow.CoordinationServiceError='']
*** Check failure stack trace: ***
"""
NEVER_JOINED = """W1204 10:38:47.488319   27405 coordination_service.cc:388] [58] ConnectAfterBarrierPasses: DEADLINE_EXCEEDED: Barrier timed out. Id: [Init]Wait_for_all_tasks_to_register::0. This usually happens because a task triggered the barrier too early or too slowly.
# of tasks that reached the barrier: 1/3.
The first task at the barrier: 0. Some timed out task names:
2
1
 [type.googleapis.com/tensorflow.BarrierError='\\n$[Init]Wait_for_all_tasks_to_register']
"""
NO_COORDINATOR = """F1204 10:37:34.861895   25930 client.h:80] Terminating process because the JAX distributed service detected fatal errors. absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded

RPC: /xla.coordination.CoordinationService/RegisterTask
*** Check failure stack trace: ***
"""
COORDINATOR_GONE = """E1204 10:43:14.196664    1166 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1204 10:43:14.196864    1166 client.h:80] Terminating process because the JAX distributed service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}
"""
GLOO_ABORT = """terminate called after throwing an instance of 'gloo::EnforceNotMet'
  what():  [enforce fail at external/gloo/gloo/transport/tcp/pair.cc:459] op.preamble.length <= op.nbytes. 4096 vs 4. Received data size doesn't match expected size. Is there a distributed collective mismatch in your code?
"""
SETTINGS = DistributedConfig(heartbeat_timeout=7, initialization_timeout=9)


def _explain(text, process_id, count=2, hosts=None):
    return explain(
        text,
        process_id=process_id,
        num_processes=count,
        coordinator="10.0.0.1:1234",
        hosts=hosts or {},
        settings=SETTINGS,
    )


@pytest.mark.parametrize(
    "text, process_id, count, hosts, expected",
    [
        (
            UNHEALTHY,
            0,
            2,
            {1: "w1"},
            Fault(
                "lost process 1 of 2 (host w1): no heartbeat for 7 s (distributed.heartbeat_timeout)", True
            ),
        ),  # noqa: E501
        (
            UNHEALTHY,
            2,
            4,
            {},
            Fault("lost process 1 of 4: no heartbeat for 7 s (distributed.heartbeat_timeout)", True),
        ),  # noqa: E501
        (
            NEVER_JOINED,
            0,
            3,
            {},
            Fault(
                "processes 1, 2 of 3 never joined the job within 9 s (distributed.initialization_timeout)",
                False,
            ),
        ),  # noqa: E501
        (
            NO_COORDINATOR,
            1,
            2,
            {},
            Fault(
                "the coordinator (process 0 at 10.0.0.1:1234) did not answer within 9 s (distributed.initialization_timeout)",
                False,
            ),
        ),  # noqa: E501
        (
            NO_COORDINATOR,
            0,
            2,
            {},
            Fault(
                "not every one of the 2 processes joined the job within 9 s (distributed.initialization_timeout)",
                False,
            ),
        ),  # noqa: E501
        (
            COORDINATOR_GONE,
            1,
            2,
            {},
            Fault("lost process 0 of 2 (host 10.0.0.1), the coordinator: its connection closed", True),
        ),  # noqa: E501
    ],
)
def test_runtime_failures_read_as_one_line(text, process_id, count, hosts, expected):
    assert _explain(text, process_id, count, hosts) == expected


def test_a_failed_collective_names_the_peers_that_no_longer_answer():
    # Captured from a CI run: the peer was SIGKILLed mid-collective and gloo aborted the
    # survivor before the heartbeat deadline, naming nobody.
    got = explain(
        GLOO_ABORT,
        process_id=0,
        num_processes=3,
        coordinator="10.0.0.1:1234",
        hosts={2: "w2"},
        settings=SETTINGS,
        unreachable={2},
    )
    assert got == Fault(
        "lost process 2 of 3 (host w2): a collective with it failed and it no longer answers", True
    )
    # Every peer still answering: nothing to name, the runtime's output is shown as it is.
    assert _explain(GLOO_ABORT, 0) is None


def test_other_failures_are_left_to_the_runtime_output():
    assert _explain("Traceback (most recent call last):\nValueError: boom\n", 0) is None
    assert _explain("F1204 10:00:00.0 1 cpu_client.cc:1] Check failed: x\n", 1) is None


def test_settings_reach_jax_and_bound_a_cpu_job_by_default():
    assert timeouts(SETTINGS) == {"heartbeat_timeout_seconds": 7, "initialization_timeout": 9}
    default = load_config(None, []).distributed
    assert default.heartbeat_timeout <= 60  # JAX's own default (100 s) is what this replaces
    assert timeouts(default)["heartbeat_timeout_seconds"] == default.heartbeat_timeout
