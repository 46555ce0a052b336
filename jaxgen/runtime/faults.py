"""What a multi-process job's runtime failure means, in one line.

When a process of a JAX job dies, or never joins, JAX's coordination service stops the
others from a C++ thread: it logs the reason (absl `E`/`F` lines), then aborts the
process with a C++ stack trace. No Python code runs in between, so nothing inside the
process can replace that trace; the supervising parent (`jaxgen/cli/supervise.py`)
holds the runtime's output back and hands it to `explain`, which reads the reason out
of it. The messages matched are the coordination service's (jaxlib 0.10):

- "The following tasks are unhealthy (stopped sending heartbeats):" then task ids: a
  process died or hung after joining (every survivor gets this from the service);
- "Wait_for_all_tasks_to_register ... Some timed out task names:" then task ids: those
  processes never joined (the service's registration deadline);
- "RegisterTask" with "Deadline Exceeded": this process could not reach the coordinator
  in time (or, on process 0, not everyone joined and the service named nobody);
- "Failed to send RPC to coordination service", or its PollForError / Heartbeat RPCs
  failing otherwise: the coordinator (process 0) is gone.

A collective can also fail first: a peer dies mid-collective, and the CPU collectives
library (gloo) aborts this process before the heartbeat deadline passes, with a message
that names no process (e.g. "Received data size doesn't match expected size", thrown
from gloo's own thread, so nothing in Python sees it). The supervisor then asks every
peer's supervisor whether it still answers (`cli/supervise.py`) and passes the ones that
do not as `unreachable`: those are the lost processes.

Pure text in, text out: tests feed it messages captured from real failures.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping

from jaxgen.config import DistributedConfig

_UNHEALTHY = re.compile(r"unhealthy \(stopped sending heartbeats\):\s*\n((?:\s*\d+\s*\n)+)")
_NEVER_JOINED = re.compile(
    r"Wait_for_all_tasks_to_register.*?timed out task names:\s*\n((?:\s*\d+\s*\n)+)", re.S
)
_REGISTER_DEADLINE = re.compile(r"DEADLINE_EXCEEDED: Deadline Exceeded\s*\n+\s*RPC: \S*/RegisterTask")
# gloo's failures (an exception escaping its transport thread, or a read on a socket the
# peer closed); NCCL's "remote process exited" for GPU jobs.
_COLLECTIVE_FAILED = re.compile(
    r"gloo::\w+|\[enforce fail at \S*gloo|Connection (closed|reset) by peer|remote process exited"
)
_SERVICE_GONE = re.compile(
    r"Failed to send RPC to coordination service|CoordinationService/(PollForError|Heartbeat)\b"
)


@dataclasses.dataclass(frozen=True)
class Fault:
    """A runtime failure explained.

    Attributes:
        message: one line naming the process(es) at fault and the setting that bounded the wait.
        after_join: the job had formed (training may have written checkpoints since).
    """

    message: str
    after_join: bool


def _ids(block: str) -> list[int]:
    return sorted({int(n) for n in block.split()})


def _name(index: int, count: int, hosts: Mapping[int, str]) -> str:
    host = f" (host {hosts[index]})" if index in hosts else ""
    return f"process {index} of {count}{host}"


def _names(indices: list[int], count: int, hosts: Mapping[int, str]) -> str:
    if len(indices) == 1:
        return _name(indices[0], count, hosts)
    listed = ", ".join(f"{i}" + (f" (host {hosts[i]})" if i in hosts else "") for i in indices)
    return f"processes {listed} of {count}"


def collective_failed(text: str) -> bool:
    """Whether the runtime's output shows a collective with another process failing."""
    return _COLLECTIVE_FAILED.search(text) is not None


def explain(
    text: str,
    *,
    process_id: int,
    num_processes: int,
    coordinator: str | None,
    hosts: Mapping[int, str],
    settings: DistributedConfig,
    unreachable: Collection[int] = (),
) -> Fault | None:
    """Reads the runtime's output of a failed process.

    Args:
        text: what the process wrote to stderr from the runtime (absl lines and their trace).
        process_id, num_processes: this process's index and the job's size.
        coordinator: "host:port" of process 0 (None when JAX detected it).
        hosts: {process index: hostname} as far as known (process 0's from `coordinator`).
        settings: the config's `distributed` section, named in the line.
        unreachable: peers whose supervisor no longer answered when this process failed.

    Returns:
        The explanation, or None when the text shows no coordination failure jaxgen knows
        (the caller then shows the runtime's own output).
    """
    hosts = dict(hosts)
    if coordinator and 0 not in hosts:
        hosts[0] = coordinator.rpartition(":")[0]
    heartbeat = f"{settings.heartbeat_timeout} s (distributed.heartbeat_timeout)"
    joining = f"{settings.initialization_timeout} s (distributed.initialization_timeout)"
    if match := _UNHEALTHY.search(text):
        lost = _ids(match.group(1))
        return Fault(f"lost {_names(lost, num_processes, hosts)}: no heartbeat for {heartbeat}", True)
    if match := _NEVER_JOINED.search(text):
        missing = _ids(match.group(1))
        return Fault(f"{_names(missing, num_processes, hosts)} never joined the job within {joining}", False)
    if _REGISTER_DEADLINE.search(text):
        if process_id == 0:
            return Fault(
                f"not every one of the {num_processes} processes joined the job within {joining}", False
            )
        where = f" at {coordinator}" if coordinator else ""
        return Fault(f"the coordinator (process 0{where}) did not answer within {joining}", False)
    if _SERVICE_GONE.search(text) and process_id != 0:
        return Fault(f"lost {_name(0, num_processes, hosts)}, the coordinator: its connection closed", True)
    if collective_failed(text) and unreachable:
        lost = _names(sorted(unreachable), num_processes, hosts)
        return Fault(f"lost {lost}: a collective with it failed and it no longer answers", True)
    return None
