"""Numerics in the step log: loss spikes named with their batch, non-finite steps counted."""

import io
import json
import math

import numpy as np
import pytest
from rich.console import Console

from jaxgen.config import load_config
from jaxgen.metrics import MetricsWriter
from jaxgen.train.hooks import Hooks, StepInfo
from jaxgen.train.reports import StepLogger
from jaxgen.train.step import StepMetrics


def _metrics(loss: float) -> StepMetrics:
    f = np.float32
    return StepMetrics(f(loss), f(0), f(1), f(1e-3), f(100), np.bool_(math.isfinite(loss)), {})


def _log(tmp_path, losses, *overrides):
    """Runs StepLogger over `losses` (one per step, reported every 4 steps); returns the
    metrics.jsonl records and the console text."""
    config = load_config(
        None, ["train.batch_size=8", "train.log_every=4", "train.nan_policy=skip", *overrides]
    )
    writer, out = MetricsWriter(tmp_path), io.StringIO()
    logger = StepLogger(config, writer, Console(file=out, width=200), Hooks())
    for step, loss in enumerate(losses, 1):
        info = StepInfo(step, None, _metrics(loss), last=step == len(losses))
        logger.collect(info)
        if step % 4 == 0 or info.last:
            logger.report(info)
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return records, out.getvalue()


def test_a_loss_spike_is_logged_with_its_step_and_batch(tmp_path):
    losses = [4.0, 3.0, 2.5, 2.4, 2.3, 2.2, 2.2, 2.1, 2.1, 2.0, 2.0, 2.0, 9.0, 2.0, 2.0, 2.0]
    records, text = _log(tmp_path, losses)
    spikes = [r for r in records if r["kind"] == "spike"]
    median = float(np.median(np.float32(losses[:12])))
    assert spikes == [
        {
            "step": 13,
            "kind": "spike",
            "loss": 9.0,
            "median": median,
            "factor": 3.0,
            "batch": 12,
            "rows": [96, 104],
        }
    ]
    assert (
        f"loss spike at step 13: 9.0000 > 3 x median {median:.4f} (batch 12 of the run's stream, rows 96-103)"
        in text
    )


@pytest.mark.parametrize("overrides", [["train.spike_factor=null"], ["train.spike_factor=5"]])
def test_spikes_below_the_factor_or_switched_off_are_not_logged(tmp_path, overrides):
    losses = [2.0] * 12 + [9.0] + [2.0] * 3
    records, text = _log(tmp_path, losses, *overrides)
    assert not [r for r in records if r["kind"] == "spike"] and "spike" not in text


def test_non_finite_steps_are_counted_in_the_metrics(tmp_path):
    losses = [3.0, 2.0, float("nan"), 2.0, float("inf"), float("nan"), 2.0, 2.0]
    records, _ = _log(tmp_path, losses)
    train = [(r["step"], r["skipped"], r["nonfinite_total"]) for r in records if r["kind"] == "train"]
    # Steps 1-4 (step 1's compile time left out of the timing only) and 5-8 are reported.
    assert train == [(4, 1, 1), (8, 2, 3)]
    assert not [r for r in records if r["kind"] == "spike"]  # a NaN is no spike, nor in the median
