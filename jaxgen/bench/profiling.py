"""The profiler trace every benchmark takes (`jaxgen bench ... --profile`, benchmarks/gpu/profile_rows.py)."""

from __future__ import annotations

import os

import jax


def trace(directory: str | os.PathLike):
    """`jax.profiler.trace(directory)` without JAX's Python tracer.

    The Python tracer records every Python call (2.2 million events in a CPU decode
    benchmark of 512 steps): it slows the traced run and fills the trace with the host
    side, while a benchmark's profile is for the device's ops and XLA's threads.
    """
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return jax.profiler.trace(str(directory), profiler_options=options)
