"""One process of a multi-process `jaxgen train`: run it as a child, and end a failed job in one line.

When a peer of a JAX job dies, or never joins, JAX's runtime aborts every survivor from a
C++ thread with a page of absl log and stack trace (see `jaxgen/runtime/faults.py`):
nothing inside the dying process can print a line instead. So on a multi-process job the
command re-runs itself as a child and stays beside it:

- the child's stdout (console, progress) goes straight through; its stderr passes line
  by line until the runtime starts reporting a coordination failure (or Python a
  traceback), and from then on is held;
- when the child fails and `runtime/faults.py` explains the held text, the parent prints
  that one line plus the newest complete checkpoint and exits 1; anything it cannot
  explain is shown as the child wrote it (`--debug` shows everything, always);
- SIGTERM/SIGINT/SIGHUP reach the child exactly once (it runs in its own process group,
  so a terminal's Ctrl-C is not delivered twice), and the child is killed with its
  parent (Linux `PR_SET_PDEATHSIG`), so a SIGKILLed process leaves no orphan training on.

The child tells the parent the job's host names on a marker line (`announce`), so a lost
process is named by host, not only by index. When a collective fails before the runtime
names anyone (`runtime/faults.py`), the parent finds the lost process itself: every
parent listens on a TCP port for as long as its child may still be a survivor (nothing is
ever accepted: the kernel completing a connection is the answer), the ports are exchanged
with the host names, and a peer whose parent refuses or does not answer is the one lost.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from jaxgen.config import Config
from jaxgen.runtime.distributed import Cluster, cluster_from_env, exchange, peer_hosts
from jaxgen.runtime.faults import collective_failed, explain

SUPERVISED_VAR = "JAXGEN_SUPERVISED"  # set in the child: run the job, do not supervise again
_PORT_VAR = "JAXGEN_SUPERVISOR_PORT"  # set in the child: the port its parent answers on
_MARKER = "jaxgen-supervisor job "
_PROBE_ROUNDS, _PROBE_TIMEOUT = 3, 5.0  # a lost peer's parent may take a moment to close its port
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
# Where the runtime starts reporting a failure: its coordination code's absl W/E/F lines, any
# fatal absl line, or a Python traceback (a collective failing in the main thread races
# the runtime's abort); everything from there on is held back.
_FAILURE_START = re.compile(
    r"^([EWF]\d{4} [\d:.]+\s+\d+ (coordination_service\w*\.cc|client\.h):\d+\]"
    r"|F\d{4} |\*\*\* Check failure stack trace|Traceback \(most recent call last\)"
    r"|terminate called after throwing|\[enforce fail at )"
)


def wanted(env: Mapping[str, str] | None = None) -> Cluster | None:
    """The multi-process job to supervise, or None (one process, or already the child)."""
    env = os.environ if env is None else env
    return None if SUPERVISED_VAR in env else cluster_from_env(env)


def announce(timeout_seconds: int) -> None:
    """In the child, a collective call: tells the supervising parent every process's host
    and the address its parent answers on (no-op unsupervised)."""
    hosts = peer_hosts(timeout_seconds)
    ports = exchange("supervisor", os.environ.get(_PORT_VAR, ""), timeout_seconds)
    if SUPERVISED_VAR in os.environ:
        job = {"hosts": hosts, "supervisors": {i: f"{hosts[i]}:{p}" for i, p in ports.items() if p}}
        print(_MARKER + json.dumps(job), file=sys.stderr, flush=True)


def unreachable(supervisors: Mapping[int, str], me: int, timeout: float = _PROBE_TIMEOUT) -> set[int]:
    """The peers whose parent refuses a connection, or does not answer within `timeout`.

    A name that does not resolve counts as answering: this only names a process as lost
    when its host said so (refused) or went silent.
    """

    def lost(address: str) -> bool:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except (ConnectionRefusedError, TimeoutError):
            return True
        except OSError:
            return False
        return False

    peers = {i: a for i, a in supervisors.items() if i != me}
    if not peers:
        return set()
    with ThreadPoolExecutor(len(peers)) as pool:
        return {i for i, gone in zip(peers, pool.map(lost, peers.values()), strict=True) if gone}


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: the kernel kills it when the parent dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def last_checkpoint(run_dir: str | pathlib.Path) -> str:
    """The line's second half: the newest complete checkpoint, which a restart resumes from."""
    from jaxgen import checkpoint  # orbax: imported only once a job has failed

    complete = [s for s, d in checkpoint.step_dirs(run_dir).items() if checkpoint.uncommitted(d) is None]
    if not complete:
        return "no checkpoint was written yet"
    where = checkpoint.checkpoint_dir(run_dir) / str(max(complete))
    return f"the last complete checkpoint is {where}: restart every process to resume from it"


def run(argv: list[str], config: Config, run_dir: str | None, cluster: Cluster, debug: bool) -> int:
    """Runs `jaxgen ARGV` as a supervised child; returns the exit status to report.

    Args:
        argv: the command line after `jaxgen` (the child runs exactly it).
        config: the loaded config (its `distributed` section names the timeouts).
        run_dir: `--run-dir`, or None for `runs/<config.name>`.
        cluster: this process's place in the job.
        debug: pass the runtime's output through untouched.
    """
    parent = os.getpid()
    listener = socket.create_server(("", 0), backlog=128)  # see the module docstring
    child = subprocess.Popen(
        [sys.executable, "-m", "jaxgen.cli", *argv],
        env={**os.environ, SUPERVISED_VAR: "1", _PORT_VAR: str(listener.getsockname()[1])},
        stderr=subprocess.PIPE,
        process_group=0,
        preexec_fn=lambda: _die_with_parent(parent),
    )
    previous = {s: signal.signal(s, lambda signum, _frame: child.send_signal(signum)) for s in _FORWARDED}
    try:
        held, job = _relay(child.stderr, debug)
        code = child.wait()
        text = "".join(held)
        lost = set()
        if code != 0 and collective_failed(text):  # a survivor of someone else's failure
            lost = _probe(job.get("supervisors", {}), cluster.process_id or 0)
    finally:
        listener.close()  # at once when this process is the one that failed
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == 0:
        if not debug:
            sys.stderr.write(text)
        return 0
    fault = explain(
        text,
        process_id=cluster.process_id or 0,
        num_processes=cluster.num_processes or 0,
        coordinator=cluster.coordinator,
        hosts=job.get("hosts", {}),
        settings=config.distributed,
        unreachable=lost,
    )
    if fault is None:
        if not debug:
            sys.stderr.write(text)
        return code if code > 0 else 128 - code  # killed by a signal: as a shell reports it
    line = fault.message
    if fault.after_join:
        line += "; " + last_checkpoint(run_dir or pathlib.Path("runs") / config.name)
    print(f"error: {line}", file=sys.stderr, flush=True)
    return 1


def _probe(supervisors: Mapping[int, str], me: int) -> set[int]:
    """`unreachable`, asked a few times: a peer's parent closes its port only once it has
    seen its own child end."""
    for attempt in range(_PROBE_ROUNDS):
        if lost := unreachable(supervisors, me):
            return lost
        if attempt + 1 < _PROBE_ROUNDS:
            time.sleep(1.0)
    return set()


def _relay(stream, debug: bool) -> tuple[list[str], dict]:
    """Copies the child's stderr to ours until a failure starts; returns what was held
    back from then on, and what the child announced of the job ({"hosts", "supervisors"},
    each {process index: value})."""
    held: list[str] = []
    job: dict = {}
    for raw in stream:
        line = raw.decode(errors="replace")
        if line.startswith(_MARKER):
            announced = json.loads(line[len(_MARKER) :])
            job = {key: {int(i): v for i, v in value.items()} for key, value in announced.items()}
            continue
        if held or _FAILURE_START.match(line):
            held.append(line)
            if not debug:
                continue
        sys.stderr.write(line)
        sys.stderr.flush()
    return held, job
