"""Runs `jaxgen` with one planned SIGKILL, for tests/test_crash_points.py.

    python tests/crash_harness.py KIND ARG -- <jaxgen arguments>

KIND (ARG), counted within this process:
    step (N)         killed right after its N-th training step, before that step's hooks
    hooks (N)        killed right after the hooks of its N-th step (log, checkpoint, ...)
    async_save (S)   killed S seconds into its first checkpoint save, while the
                     asynchronous write is in flight
    saved (N)        killed once its N-th checkpoint save is committed, before any later
                     metrics line is written
    torn_metrics (N) killed halfway through writing its N-th metrics line
    time (S)         killed S seconds after its first training step
    none (-)         not killed

SIGKILL gives no chance to clean up: what is on disk is what a power cut or a preempted
VM leaves. The patches only decide when the kill comes; the library runs unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after(seconds: float) -> None:
    timer = threading.Timer(seconds, _kill)
    timer.daemon = True
    timer.start()


def install(kind: str, arg: str) -> None:
    from jaxgen import metrics
    from jaxgen.train import hooks, loop

    steps: list[int] = []
    if kind in ("step", "hooks", "time"):
        run = hooks.Hooks.run

        def run_hooks(self, info):
            steps.append(info.step)
            if kind == "time" and len(steps) == 1:
                _kill_after(float(arg))
            if kind == "step" and len(steps) == int(arg):
                _kill()
            run(self, info)
            if kind == "hooks" and len(steps) == int(arg):
                _kill()

        hooks.Hooks.run = run_hooks
    elif kind in ("async_save", "saved"):
        save, saves = loop.Run.save, []

        def run_save(self, state, step, force=False):
            save(self, state, step, force)
            saves.append(step)
            if kind == "async_save" and len(saves) == 1:
                _kill_after(float(arg))
            elif kind == "saved" and len(saves) == int(arg):
                self.wait()
                _kill()

        loop.Run.save = run_save
    elif kind == "torn_metrics":
        write, lines = metrics.MetricsWriter.write, []

        def torn_write(self, step, kind_, values):
            lines.append(step)
            if len(lines) == int(arg) and self.enabled:
                line = metrics.json.dumps({"step": step, "kind": kind_, "values": "..."}) + "\n"
                self._file.write(line[: len(line) // 2])
                self._file.flush()
                _kill()
            write(self, step, kind_, values)

        metrics.MetricsWriter.write = torn_write
    else:
        assert kind == "none", kind


if __name__ == "__main__":
    kind, arg, sep, *rest = sys.argv[1:]
    assert sep == "--", sys.argv
    sys.argv = [sys.argv[0], *rest]
    install(kind, arg)
    from jaxgen.cli.app import main

    sys.exit(main(rest))
