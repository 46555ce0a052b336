"""Loss spikes: a step whose loss exceeds `train.spike_factor` x the running median.

A spike usually points at one batch (bad data, a long run of one token) or at an
optimizer on the edge of instability. The report names the step and where its batch
sits in the run's batch stream: batches are a pure function of the data seed and their
index, so resuming from any checkpoint before it and reading on reaches the same batch
again (`batch` is that 0-based index; `rows` its rows in the stream of examples).
"""

from __future__ import annotations

import collections
import math
import statistics

WINDOW = 100  # finite losses the median is taken over
MIN_SEEN = 10  # no verdict before this many: the first losses fall fast


class SpikeWatch:
    """The running median of recent finite losses, and the steps beyond `factor` x it."""

    def __init__(self, factor: float | None, batch_size: int):
        self.factor, self.batch_size = factor, batch_size
        self.recent: collections.deque[float] = collections.deque(maxlen=WINDOW)

    def check(self, step: int, loss: float) -> dict | None:
        """The spike record of `step` (None when its loss is not a spike); non-finite
        losses are counted elsewhere (the NaN policy) and stay out of the median."""
        if not math.isfinite(loss):
            return None
        spike = None
        if self.factor is not None and len(self.recent) >= MIN_SEEN:
            median = statistics.median(self.recent)
            if loss > self.factor * median:
                batch = step - 1  # step N trained on the N-th batch of the stream
                rows = [batch * self.batch_size, (batch + 1) * self.batch_size]
                spike = {"loss": loss, "median": median, "factor": self.factor, "batch": batch, "rows": rows}
        self.recent.append(loss)
        return spike
