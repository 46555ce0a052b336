"""Host-process tuning for running XLA's CPU backend fast."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import jax

# glibc mallopt(3) parameters.
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TOP_PAD_BYTES = 64 << 20


def prepare_for_training() -> None:
    """Host tuning for a training process; a no-op unless XLA runs on the CPU."""

    if jax.default_backend() == "cpu":
        keep_cpu_buffers_mapped()


@functools.cache
def keep_cpu_buffers_mapped() -> bool:
    """Stops glibc handing XLA's per-step CPU buffers back to the kernel (idempotent).

    XLA's CPU runtime allocates a step's temporaries with malloc and frees them when the
    step ends. glibc serves blocks above its mmap threshold (at most 32 MB) with a fresh
    mmap and unmaps them on free, and trims its heaps down to a small pad, so every
    step page-faults its whole working set in again: on the quickstart model that was
    ~16k faults and ~40 ms of kernel time in an 80 ms step (`getrusage`, 2-core CPU).
    Serving every block from the heap (M_MMAP_MAX=0) and keeping 64 MB of slack at its
    top (M_TOP_PAD) brought the step to ~56 ms with ~1 ms of kernel time.

    The trade: memory freed in the middle of the heap stays with the process, so this
    is for long-running CPU training, not for one-shot tools that watch their peak RSS
    (checkpoint import). Returns False where there is no glibc (macOS, musl).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: raises AttributeError elsewhere)
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TOP_PAD, _TOP_PAD_BYTES))
