"""The server process's glibc ``malloc``: keep freed buffers of up to 32 MiB.

Blob pieces and big records pass through buffers of about 1 MiB (a socket
read, a file read, a frame), and a big record's load reads it whole (10 MB
in the bench).  glibc serves an allocation over its mmap
threshold (128 KiB, raised on the fly to the largest block freed) with a
fresh ``mmap`` and gives freed memory at the top of the heap back to the
system past its trim threshold, so each such buffer costs a page fault per
4 KiB: measured on a 200 MB blob transfer, that halved the server's
throughput (docs/performance.md, "Blob transfers"); a 10 MB record read
into a fresh mapping cost 2,441 faults, about 6 ms of a 10 ms load
("Big records after other work").  :func:`tune_malloc`
sets both thresholds once, for the ``twistd zeotwist`` process only (a
program embedding the server or the client keeps its own settings).  An
environment that already sets them (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) wins.

The cost: up to ``TRIM_THRESHOLD`` bytes of freed memory stay with the
process instead of going back to the system.
"""
import ctypes
import ctypes.util
import os

#: allocations up to this size come from the heap (glibc's default: 128 KiB,
#: adaptive; 32 MiB is the most glibc takes on 64-bit): a record of up to
#: 32 MB read for a load reuses freed heap memory instead of a fresh mapping
MMAP_THRESHOLD = 32 * 2**20
#: free memory kept at the top of the heap before it is given back (twice
#: the mmap threshold, as glibc's own adaptive setting keeps)
TRIM_THRESHOLD = 64 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3       # glibc's malloc.h


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or None)


def release_free_memory() -> bool:
    """Give the memory that start-up freed (imports, reading the index) back
    to the system now (glibc ``malloc_trim``; the trim threshold above keeps
    it otherwise); False without glibc."""
    try:
        malloc_trim = _libc().malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds (above); False where there is
    no glibc ``mallopt`` or the environment sets them already."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
