"""glibc malloc tuning for processes that move megabyte payloads.

By default glibc hands big freed chunks back to the kernel (trim, or munmap of mmapped
chunks), so every 1 MiB request buffer is page-faulted in afresh: on a VM that costs about
a millisecond per MiB, more than the copy itself. Keeping freed memory in the heap makes a
buffer of the same size come back warm.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Serve allocations below `mmap_threshold` from the heap and trim it only past
    `trim_threshold` of free memory. False where this is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold))
