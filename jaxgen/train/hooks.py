"""Hooks: what the training loop does between steps, each on its own cadence.

As Levanter's `trainer.add_hook(fn, every=N)`: the loop body is only "run a step, then the
hooks due at this step", so a new objective or report is a new hook, not a new branch in
the loop. Hooks that pause training (evaluation, samples) are timed, and the logger
leaves their time out of tokens/s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees after a step."""

    step: int  # batches consumed so far (the checkpoint number)
    state: Any  # the TrainState after the step
    metrics: Any  # the step's StepMetrics, still on the device
    last: bool  # the run's final step


@dataclasses.dataclass(frozen=True)
class Hook:
    name: str
    fn: Callable[[StepInfo], None]
    every: int  # runs after steps that are multiples of this
    at_last: bool  # also after the final step
    pauses: bool  # its time is not training time


class Hooks:
    """An ordered list of hooks; `run` calls those due, `paused` sums the pausing ones' seconds."""

    def __init__(self):
        self._hooks: list[Hook] = []
        self.paused = 0.0

    def add(
        self,
        name: str,
        fn: Callable[[StepInfo], None],
        every: int | None,
        *,
        at_last: bool = False,
        pauses: bool = False,
    ) -> None:
        """Registers `fn` every `every` steps (None or 0: never, e.g. an unset config cadence)."""
        if every:
            self._hooks.append(Hook(name, fn, every, at_last, pauses))

    def names(self) -> list[str]:
        return [h.name for h in self._hooks]

    def run(self, info: StepInfo) -> None:
        for hook in self._hooks:
            if info.step % hook.every == 0 or (hook.at_last and info.last):
                start = time.perf_counter()
                hook.fn(info)
                if hook.pauses:
                    self.paused += time.perf_counter() - start
