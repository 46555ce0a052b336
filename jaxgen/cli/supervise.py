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

The child tells the parent the job's host names on a marker line (`announce_hosts`), so
a lost process is named by host, not only by index.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
from collections.abc import Mapping

from jaxgen.config import Config
from jaxgen.runtime.distributed import Cluster, cluster_from_env
from jaxgen.runtime.faults import explain

SUPERVISED_VAR = "JAXGEN_SUPERVISED"  # set in the child: run the job, do not supervise again
_HOSTS_MARKER = "jaxgen-supervisor hosts "
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
# Where the runtime starts reporting a failure: its coordination code's absl W/E/F lines, any
# fatal absl line, or a Python traceback (a collective failing in the main thread races
# the runtime's abort); everything from there on is held back.
_FAILURE_START = re.compile(
    r"^([EWF]\d{4} [\d:.]+\s+\d+ (coordination_service\w*\.cc|client\.h):\d+\]"
    r"|F\d{4} |\*\*\* Check failure stack trace|Traceback \(most recent call last\))"
)


def wanted(env: Mapping[str, str] | None = None) -> Cluster | None:
    """The multi-process job to supervise, or None (one process, or already the child)."""
    env = os.environ if env is None else env
    return None if SUPERVISED_VAR in env else cluster_from_env(env)


def announce_hosts(hosts: Mapping[int, str]) -> None:
    """In the child: tells a supervising parent every process's host (no-op unsupervised)."""
    if SUPERVISED_VAR in os.environ:
        print(_HOSTS_MARKER + json.dumps({str(k): v for k, v in hosts.items()}), file=sys.stderr, flush=True)


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
    child = subprocess.Popen(
        [sys.executable, "-m", "jaxgen.cli", *argv],
        env={**os.environ, SUPERVISED_VAR: "1"},
        stderr=subprocess.PIPE,
        process_group=0,
        preexec_fn=lambda: _die_with_parent(parent),
    )
    previous = {s: signal.signal(s, lambda signum, _frame: child.send_signal(signum)) for s in _FORWARDED}
    try:
        held, hosts = _relay(child.stderr, debug)
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == 0:
        if not debug:
            sys.stderr.write("".join(held))
        return 0
    fault = explain(
        "".join(held),
        process_id=cluster.process_id or 0,
        num_processes=cluster.num_processes or 0,
        coordinator=cluster.coordinator,
        hosts=hosts,
        settings=config.distributed,
    )
    if fault is None:
        if not debug:
            sys.stderr.write("".join(held))
        return code if code > 0 else 128 - code  # killed by a signal: as a shell reports it
    line = fault.message
    if fault.after_join:
        line += "; " + last_checkpoint(run_dir or pathlib.Path("runs") / config.name)
    print(f"error: {line}", file=sys.stderr, flush=True)
    return 1


def _relay(stream, debug: bool) -> tuple[list[str], dict[int, str]]:
    """Copies the child's stderr to ours until a failure starts; returns what was held
    back from then on, and the hosts the child announced."""
    held: list[str] = []
    hosts: dict[int, str] = {}
    for raw in stream:
        line = raw.decode(errors="replace")
        if line.startswith(_HOSTS_MARKER):
            hosts = {int(k): v for k, v in json.loads(line[len(_HOSTS_MARKER) :]).items()}
            continue
        if held or _FAILURE_START.match(line):
            held.append(line)
            if not debug:
                continue
        sys.stderr.write(line)
        sys.stderr.flush()
    return held, hosts
