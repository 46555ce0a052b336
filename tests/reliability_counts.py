"""Totals of the reliability tests, printed at the end of a run: hostile inputs tried, fuzz
examples run (docs/RELIABILITY.md).

Tests count through the session fixture `reliability` (a Counter). Under xdist each worker
hands its counts to the controller (`workeroutput`), which prints the sum.
"""

from __future__ import annotations

import collections
import json

import pytest

COUNTS: collections.Counter = collections.Counter()
_KEY = "jaxgen_reliability_counts"


@pytest.fixture(scope="session")
def reliability() -> collections.Counter:
    """Add to it: `reliability["hostile inputs tried"] += 1`."""
    return COUNTS


def pytest_sessionfinish(session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller prints
        workeroutput[_KEY] = json.dumps(dict(COUNTS))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    COUNTS.update(json.loads(getattr(node, "workeroutput", {}).get(_KEY, "{}")))


def pytest_terminal_summary(terminalreporter) -> None:
    if COUNTS:
        terminalreporter.write_sep("-", "reliability totals")
        for name, count in sorted(COUNTS.items()):
            terminalreporter.write_line(f"{name}: {count:,}")
