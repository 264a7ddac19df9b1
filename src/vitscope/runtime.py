"""Process-level settings for fast CPU analysis.

Capturing activations allocates and frees many tensors of a few MiB per batch. glibc's malloc returns
such blocks to the operating system on free (``mmap``/trim), so every batch pays fresh page faults: on
the project's CPU that made the probe pass 1.55-1.6x a plain forward instead of 1.3x
(``benchmarks/README.md``, "Probe pass"). PyTorch's CPU performance guide recommends an allocator that
keeps freed memory (jemalloc, tcmalloc); ``keep_freed_memory`` is the glibc equivalent, set at run time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

_logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of freed memory at the top of the heap
_MMAP_THRESHOLD = 32 * 2**20  # blocks below 32 MiB (glibc's maximum) come from the reusable heap
_ENV_KEYS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    Process-wide and permanent (glibc offers no way to read the old setting back): resident memory
    stays near its peak instead of shrinking between batches. The ``vitscope`` command line calls this
    at start; in a library session call it yourself when CPU speed matters. Does nothing (and returns
    False) off glibc, when the user already set ``MALLOC_*_THRESHOLD_`` variables, or when
    ``VITSCOPE_KEEP_FREED_MEMORY=0``.

    Returns:
        True when the setting was applied.
    """
    if os.environ.get("VITSCOPE_KEEP_FREED_MEMORY", "1") == "0" or any(k in os.environ for k in _ENV_KEYS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    if not ok:
        _logger.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok
