"""Keep freed bank arrays out of the process's resident memory (glibc only).

glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB) with ``mmap`` and unmaps
them on ``free``, but whenever an mmapped block is freed it raises the threshold to
that block's size (up to 32 MiB on 64-bit). A bank grows by 1/8 at a time and frees
its old arrays, so after a few growths its new arrays come from the heap instead,
where freed blocks stay resident. Measured with 100k memories of 336 raw bytes in one
bank (tests/test_resident_memory.py): 754 B of RSS per memory with the dynamic
threshold, 535 B with it pinned. Setting the threshold explicitly turns the dynamic
raise off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own default, kept fixed

_pinned = False


def pin_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold once per process; False where libc is not glibc."""
    global _pinned
    if _pinned:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS: nothing to pin
        log.debug("mallopt is not available (libc %s): mmap threshold left as is", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _pinned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return _pinned
