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
* :class:`AcceptGuard` watches a listening port: when ``accept`` fails
  anyway (out of descriptors because something else used the reserve,
  ``ENFILE``, ``ENOBUFS``), the port's per-connection log lines become one
  rate-limited warning, and accepting pauses for a short, growing delay
  instead of being retried on every reactor turn.

Pure logic (the clock is injected); runs on the reactor thread.
"""
import resource
import time

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

# pending_output is re-exported: the server's sessions import it from here
from zeotwist.transportcompat import pending_output  # noqa: F401
from zeotwist.twistedcompat import port_logger, set_port_logger
from zeotwist.wire.framing import address_text

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


class MonotonicClock:
    """``seconds()`` for code outside the reactor thread (worker threads)."""

    @staticmethod
    def seconds() -> float:
        return time.monotonic()


class RateLimitedLog:
    """At most ``burst`` lines per ``interval`` seconds; the first line of
    the next interval says how many were left out."""

    def __init__(self, clock, interval: float = 10.0, burst: int = 1):
        self._clock = clock
        self._interval = interval
        self._burst = burst
        self._window = None         # when the current interval began
        self._count = 0             # lines logged in it
        self._suppressed = 0

    def warn(self, fmt: str, **kw) -> bool:
        """Log unless ``burst`` lines were logged in the current interval;
        True if logged."""
        now = self._clock.seconds()
        if self._window is None or now - self._window >= self._interval:
            self._window, self._count = now, 0
        if self._count >= self._burst:
            self._suppressed += 1
            return False
        self._count += 1
        suppressed, self._suppressed = self._suppressed, 0
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
                           cap=self.cap, addr=address_text(addr))
            return False
        self.active += 1
        return True

    def take(self) -> bool:
        """A slot for something else that holds a descriptor (an iterator's
        open file), without logging; False when none is free."""
        if self.active >= self.cap:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


class RefusedConnection(Protocol):
    """What a connection past the cap gets: it is aborted at once.

    (Returning None from ``buildProtocol`` does the same for plain TCP, but
    a TLS port's wrapping factory cannot handle None.)
    """

    def connectionMade(self):
        self.transport.abortConnection()


#: How twisted.internet.tcp logs accept trouble (``_accept``'s messages).
_EMFILE_ROUND = "EMFILE encountered"
_ACCEPT_FAILED = "Could not accept"
_ACCEPT_NOISE = ("EMFILE recovery", "Re-reserving EMFILE")


class AcceptGuard:
    """Rate-limited accept-error logging and backing off, for one port.

    Twisted's TCP port logs each EMFILE recovery round and one line per
    connection it had to close, and when ``accept`` fails without its
    reserved descriptor it retries on every reactor turn, logging each
    time.  The guard takes the port's log events: accept trouble becomes
    one warning per interval (with a count of what it swallowed), other
    events pass through; a failed accept also stops the port reading for
    ``pause`` seconds, doubling (up to ``MAX_PAUSE``) while failures go on.
    """

    MIN_PAUSE, MAX_PAUSE = 0.05, 2.0

    def __init__(self, port, clock, interval: float = 10.0):
        self.port = port
        self.clock = clock
        self.log = RateLimitedLog(clock, interval)
        self.backoff_log = RateLimitedLog(clock, interval)
        self.pause = self.MIN_PAUSE
        self.errors = 0
        self._last_error = None
        self._resume = None
        logger = port_logger(port)
        self._observer = logger.observer
        set_port_logger(port, Logger(namespace=logger.namespace, observer=self))

    @classmethod
    def install(cls, port, clock):
        """Guard ``port`` if it is a Twisted TCP (or Unix, or TLS) port."""
        if isinstance(port_logger(port), Logger):
            return cls(port, clock)
        return None

    def __call__(self, event) -> None:
        fmt = event.get("log_format") or ""
        if fmt.startswith(_EMFILE_ROUND):
            self.errors += 1
            self.log.warn("zeotwist: out of file descriptors; closing the connections "
                          "the server cannot take (raise the limit or lower "
                          "--max-connections)")
        elif fmt.startswith(_ACCEPT_FAILED):
            self.errors += 1
            self._back_off(event.get("acceptError"))
        elif not fmt.startswith(_ACCEPT_NOISE):
            self._observer(event)

    def _back_off(self, error) -> None:
        now = self.clock.seconds()
        if self._last_error is not None and now - self._last_error < 4 * self.MAX_PAUSE:
            self.pause = min(self.MAX_PAUSE, self.pause * 2)
        else:
            self.pause = self.MIN_PAUSE
        self._last_error = now
        self.backoff_log.warn("zeotwist: cannot accept connections ({error}); pausing "
                              "accepts for {pause:.2f} s", error=error, pause=self.pause)
        if self._resume is None or not self._resume.active():
            self.port.stopReading()
            self._resume = self.clock.callLater(self.pause, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if getattr(self.port, "connected", False):
            self.port.startReading()

    def stop(self) -> None:
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
