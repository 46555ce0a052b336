"""CPU training keeps freed step buffers mapped, so the next step does not page-fault them in."""

import ctypes
import ctypes.util
import resource
import sys

import pytest

from jaxgen.runtime import cpu_malloc as host

_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.malloc.restype = ctypes.c_void_p
_libc.free.argtypes = [ctypes.c_void_p]


def _faults_for_fresh_buffer(nbytes: int) -> int:
    """Page faults of malloc + touching every byte + free, as XLA does with a step's temporaries."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pointer = _libc.malloc(nbytes)
    ctypes.memset(pointer, 1, nbytes)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    _libc.free(pointer)
    return faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_large_buffers_are_reused_without_page_faults():
    nbytes = 48 << 20  # above glibc's largest mmap threshold (32 MB), like XLA's step temporaries
    pages = nbytes // resource.getpagesize()
    assert host.keep_cpu_buffers_mapped()
    _faults_for_fresh_buffer(nbytes)  # the first use may grow the heap
    assert _faults_for_fresh_buffer(nbytes) < pages // 100  # glibc's defaults: one per page
