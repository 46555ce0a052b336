"""Supervision of grain's worker processes: no batch may be waited for forever.

grain (0.2) waits for a worker's next element for as long as the worker lives, polling its
queue once a second. A worker that deadlocks (as one did: two read threads importing
TFDS at once, see `pipeline.WindowReader`) therefore stalls training without a word. Here
each worker, as it starts, records its pid and arms a stack dump on SIGUSR1; the loader
fetches batches on a helper thread and waits at most `data.worker_timeout` seconds. When
that runs out it dumps the workers' stacks, names the one that is stuck and the frame it
sits in, kills the workers (so grain's finalizers do not wait on them at exit) and raises
a one-line `JaxgenError`. A worker that died is named the same way.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import pathlib
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref

from jaxgen.errors import JaxgenError

_DUMP_WAIT_S = 2.0  # how long a live worker gets to write its stacks after SIGUSR1
_POLL_S = 0.5  # how often a wait for a batch looks at the clock
_STARTUP_S = 120.0  # the least time workers get to start (interpreter, imports)
_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def _on_worker_start(directory: str, index: int, count: int) -> None:
    """Runs first in each worker process (grain's `worker_init_fn`)."""
    del count
    folder = pathlib.Path(directory)
    # faulthandler writes from the signal handler to this fd, without Python's locks.
    stacks = open(folder / f"worker-{index}.stacks", "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    tmp = folder / f"worker-{index}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.replace(folder / f"worker-{index}.pid")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _state(pid) != "Z"


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, T, Z, ...), '?' when unreadable."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


def _where(stacks: str) -> str | None:
    """The most recent jaxgen frame in a faulthandler dump, else the most recent frame at all."""
    frames = [m for m in _FRAME.finditer(stacks)]
    if not frames:
        return None
    ours = [m for m in frames if "/jaxgen/" in m["path"]]
    m = (ours or frames)[0]
    path = m["path"]
    short = path[path.rindex("/jaxgen/") + 1 :] if "/jaxgen/" in path else pathlib.Path(path).name
    return f"{m['func']} ({short}:{m['line']})"


class WorkerWatch:
    """The worker processes of one loader: their pids, stacks and a bounded wait for batches."""

    def __init__(self, count: int, timeout: float, what: str):
        self.count, self.timeout, self.what = count, timeout, what
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="jaxgen-workers-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._fetcher: threading.Thread | None = None
        self.quiet_resource_tracker()

    @staticmethod
    def quiet_resource_tracker() -> None:
        """Silences the resource tracker's shutdown note about a killed worker's shared memory.

        The tracker (a process multiprocessing starts on first use, with the parent's -W
        options) unlinks those blocks itself and then warns that it did; after the one-line
        error naming the dead worker that is noise. Call before the first worker starts.
        """
        option = "ignore:resource_tracker:UserWarning"
        if option not in sys.warnoptions:
            sys.warnoptions.append(option)

    def init_fn(self):
        """grain's `worker_init_fn(index, count)` (picklable: a partial of a module function)."""
        return functools.partial(_on_worker_start, str(self.dir))

    def pids(self) -> dict[int, int]:
        out = {}
        for i in range(self.count):
            path = self.dir / f"worker-{i}.pid"
            if path.exists():
                out[i] = int(path.read_text())
        return out

    def next(self, it):
        """`next(it)`, waiting at most `timeout` seconds; a dead or stuck worker -> JaxgenError."""
        if self._fetcher is None:
            self._fetcher = threading.Thread(target=self._serve, daemon=True, name="jaxgen-batch-fetch")
            self._fetcher.start()
        self._requests.put(it)
        asked = time.monotonic()
        while True:
            try:
                value, error = self._results.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if time.monotonic() > self._deadline(asked):
                    raise self._stuck() from None
        if error is None:
            return value
        if isinstance(error, (StopIteration, JaxgenError)):
            raise error
        dead = [(i, pid) for i, pid in self.pids().items() if not _alive(pid)]
        if dead:
            i, pid = dead[0]
            # grain's first sentence, without its advice to search logs that jaxgen does not print
            why = str(error).strip().split(". ")[0].rstrip(".") or type(error).__name__
            raise JaxgenError(f"data: worker process {i} (pid {pid}) of {self.what} died: {why}") from None
        raise error

    def _deadline(self, asked: float) -> float:
        """`timeout` after the request or after the newest worker started, whichever is later.

        Starting a worker (a fresh interpreter importing JAX and TFDS) can take longer than a
        short timeout on a loaded machine; that is not a stall. A worker that never gets as
        far as announcing itself is bounded too, by `max(timeout, _STARTUP_S)`.
        """
        started = [p.stat().st_mtime for p in self.dir.glob("worker-*.pid")]
        if len(started) < self.count:
            return asked + max(self.timeout, _STARTUP_S)
        # pid files are stamped with the wall clock; convert to the monotonic one
        newest = max(started) - time.time() + time.monotonic()
        return max(asked, newest) + self.timeout

    def _serve(self) -> None:
        while True:
            it = self._requests.get()
            if it is None:
                return
            try:
                self._results.put((next(it), None))
            except BaseException as e:  # handed to the caller's thread
                self._results.put((None, e))

    def _stuck(self) -> JaxgenError:
        pids = self.pids()
        reports = [self._report(i, pid) for i, pid in sorted(pids.items())]
        self.kill()
        self._cleanup.detach()  # the stack dumps named in the message stay
        if not reports:
            waited = max(self.timeout, _STARTUP_S)
            return JaxgenError(
                f"data: no worker process of {self.what} started within {waited:g} s"
                f" (data.worker_timeout, and at least {_STARTUP_S:g} s to start)"
            )
        return JaxgenError(
            f"data: {'; '.join(reports)}: no batch of {self.what} came in {self.timeout:g} s"
            " (data.worker_timeout); the workers were stopped"
        )

    def _report(self, index: int, pid: int) -> str:
        name = f"worker process {index} (pid {pid})"
        if not _alive(pid):
            return f"{name} is gone"
        state = _state(pid)
        if state == "T":
            return f"{name} is stopped (SIGSTOP), its stack unreadable"
        stacks = self.dir / f"worker-{index}.stacks"
        size = stacks.stat().st_size if stacks.exists() else 0
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + _DUMP_WAIT_S
        while time.monotonic() < deadline and stacks.exists() and stacks.stat().st_size == size:
            time.sleep(0.05)
        time.sleep(0.1)  # the dump of the last threads
        where = _where(stacks.read_text(errors="replace")[size:]) if stacks.exists() else None
        if where is None:
            return f"{name} did not answer a stack dump"
        return f"{name} was in {where} (all its threads: {stacks})"

    def kill(self) -> None:
        for pid in self.pids().values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._requests.put(None)
        self._cleanup()
