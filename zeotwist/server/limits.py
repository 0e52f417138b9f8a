"""Server resource limits: connection count, a client's unread output, logs.

* :class:`ConnectionLimiter` caps concurrent connections below the process's
  file-descriptor limit (keeping a reserve for the storage, logs and the
  listening sockets), so the server never runs into ``EMFILE`` in accept;
  connections past the cap are closed at once.
* :func:`pending_output` measures what a transport still holds for a peer;
  a session whose client stops reading is dropped past a cap, so one stuck
  client cannot grow the server's memory without bound, and writers to the
  storage are never slowed by it.
* :class:`RateLimitedLog` logs a repeated event at most once per interval,
  with the count of the ones it swallowed.

Pure logic (the clock is injected); runs on the reactor thread.
"""
import resource

from twisted.logger import Logger

_log = Logger()

#: File descriptors kept free for the storage files, logs and sockets.
FD_RESERVE = 64
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_PENDING_OUTPUT = 64 * 2**20


def effective_connection_cap(wanted: int, reserve: int = FD_RESERVE) -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - reserve))


def pending_output(transport) -> int:
    """Bytes written to ``transport`` but not yet taken by the socket (0 if
    the transport does not say)."""
    buffered = getattr(transport, "_tempDataLen", 0)
    data = getattr(transport, "dataBuffer", b"")
    return buffered + len(data) - getattr(transport, "offset", 0)


class RateLimitedLog:
    def __init__(self, clock, interval: float = 10.0):
        self._clock = clock
        self._interval = interval
        self._last = None
        self._suppressed = 0

    def warn(self, fmt: str, **kw) -> bool:
        """Log unless one was logged less than ``interval`` ago; True if logged."""
        now = self._clock.seconds()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return False
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        _log.warn(fmt + (" ({suppressed} similar messages suppressed)" if suppressed else ""),
                  suppressed=suppressed, **kw)
        return True


class ConnectionLimiter:
    def __init__(self, clock, max_connections: int = DEFAULT_MAX_CONNECTIONS):
        self.cap = effective_connection_cap(max_connections)
        self.active = 0
        self.refused = 0
        self._log = RateLimitedLog(clock)

    def admit(self, addr) -> bool:
        if self.active >= self.cap:
            self.refused += 1
            self._log.warn("zeotwist: {cap} connections open; refusing {addr}",
                           cap=self.cap, addr=addr)
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1
