"""The server process's glibc ``malloc``: keep freed buffers of up to 32 MiB,
one arena, and give what was freed back every few seconds.

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
sets both thresholds once, for the server process only (``twistd zeotwist``,
``zeotwist serve``; a
program embedding the server or the client keeps its own settings).  An
environment that already sets them (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) wins.

The cost: up to ``TRIM_THRESHOLD`` bytes of freed memory stay with the
process instead of going back to the system, until :func:`trim_periodically`
gives them back (every :data:`TRIM_INTERVAL` seconds, ``malloc_trim``: tens of
microseconds; a burst of big loads meanwhile pays the page faults once per
interval, not once per load).
"""
import ctypes
import os

#: allocations up to this size come from the heap (glibc's default: 128 KiB,
#: adaptive; 32 MiB is the most glibc takes on 64-bit): a record of up to
#: 32 MB read for a load reuses freed heap memory instead of a fresh mapping
MMAP_THRESHOLD = 32 * 2**20
#: free memory kept at the top of the heap before it is given back (twice
#: the mmap threshold, as glibc's own adaptive setting keeps)
TRIM_THRESHOLD = 64 * 2**20
#: seconds between two :func:`release_free_memory` calls of a running server
TRIM_INTERVAL = 5.0
#: seconds without blob pieces after which :func:`trim_after_burst` trims
BURST_QUIET = 0.05
#: malloc arenas: one, shared by every thread (glibc's default: up to 8 per
#: core, one per thread that allocates).  A worker thread's arena keeps what
#: it freed at its top, which ``malloc_trim`` gives back only for the main
#: arena: a 10 MB store voted in a storage thread left 10 MB resident for
#: good; with one arena the next allocation of any thread reuses it, and
#: the trim gives it back (threads take turns under the GIL anyway)
ARENA_MAX = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8     # glibc's malloc.h


def _libc_function(name: str, argtypes: list):
    """A C library function of this process (None without it: not glibc).
    The process's own symbols, not ``ctypes.util.find_library``, which runs
    ``ldconfig`` in a subprocess."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def release_free_memory() -> bool:
    """Give freed memory back to the system now (glibc ``malloc_trim``: the
    free top of every arena, and the free pages within them; the trim
    threshold above keeps it otherwise); False without glibc."""
    malloc_trim = _libc_function("malloc_trim", [ctypes.c_size_t])
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


#: functions that let go of buffers kept while blob pieces come (reactor
#: thread), called once they stop, before the trim (blobs: the spool's read
#: buffer)
burst_buffers: list = []


class _BurstTrim:
    """Trims once blob pieces stop coming (:func:`trim_after_burst`)."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.call = None

    def note(self) -> None:
        if self.call is not None and self.call.active():
            self.call.reset(BURST_QUIET)
        else:
            self.call = self.reactor.callLater(BURST_QUIET, self._quiet)

    def _quiet(self) -> None:
        for drop in burst_buffers:
            drop()
        release_free_memory()


_burst = None       # the server's _BurstTrim, once trim_periodically ran


def trim_after_burst() -> None:
    """A blob piece went through (reactor thread): once none has for
    :data:`BURST_QUIET` seconds, give what the transfers freed back, not
    at the next periodic trim (up to 5 s later, when the next transfer may
    have begun on top of it: a blob load right after a store).  Nothing
    outside a server process (:func:`trim_periodically` not run)."""
    if _burst is not None:
        _burst.note()


def trim_periodically(reactor, interval: float = TRIM_INTERVAL):
    """:func:`release_free_memory` now (what start-up freed: 0.5-1 MB) and
    every ``interval`` seconds (what a burst of big records or blob pieces
    freed: up to tens of MB); the LoopingCall, or None without glibc.
    Also arms :func:`trim_after_burst`."""
    global _burst
    if not release_free_memory():
        return None
    _burst = _BurstTrim(reactor)
    from twisted.internet.task import LoopingCall
    loop = LoopingCall(release_free_memory)
    loop.clock = reactor
    loop.start(interval, now=False)
    return loop


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds and its arena count (above);
    False where there is no glibc ``mallopt`` or the environment sets the
    thresholds already (``MALLOC_ARENA_MAX`` in the environment wins too)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, ARENA_MAX)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
