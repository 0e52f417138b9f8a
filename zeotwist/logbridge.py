"""zeotwist's log events in Python's ``logging``, for programs that never set up Twisted's.

zeotwist logs through ``twisted.logger``.  A Twisted program that begins
Twisted logging (``twistd``, ``globalLogBeginner.beginLoggingTo``,
``twisted.python.log.startLogging``) sees these events through its own
observers.  An ordinary ZODB program (a script, Zope, a WSGI application)
never does, and Twisted then only buffers them; so the first ClientStorage
(or :func:`zeotwist.connect`) adds :func:`forward_to_stdlib` to Twisted's
global publisher: while Twisted logging has not begun, every event whose
namespace is ``zeotwist`` or under it goes to the ``logging`` logger of that
name (``zeotwist.client.client``, ``zeotwist.client.cachefile``, ...) at the
matching level (Twisted's ``warn`` is ``WARNING``).  Once the application
begins Twisted logging, nothing more is forwarded: its observers have the
events, and nothing is logged twice.

Observers run in the thread that logs (mostly the reactor thread);
``logging`` is thread-safe.  Docs: docs/logging.md.
"""
import logging
import threading

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from zeotwist.twistedcompat import logging_begun

#: the namespace (and stdlib logger) prefix of every zeotwist log event
PREFIX = "zeotwist"

_LEVELS = {LogLevel.debug: logging.DEBUG, LogLevel.info: logging.INFO,
           LogLevel.warn: logging.WARNING, LogLevel.error: logging.ERROR,
           LogLevel.critical: logging.CRITICAL}

_installed = False
_install_lock = threading.Lock()


def twisted_logging_begun() -> bool:
    """Whether the application has begun Twisted logging.

    The first ``beginLoggingTo`` drops Twisted's start-up buffer
    (:func:`zeotwist.twistedcompat.logging_begun`, a private name).
    """
    return logging_begun()


def _ours(namespace: str) -> bool:
    return namespace == PREFIX or namespace.startswith(PREFIX + ".")


def forward_to_stdlib(event: dict) -> None:
    """A Twisted log observer: a zeotwist event to ``logging``, unless the
    application has begun Twisted logging."""
    namespace = event.get("log_namespace") or ""
    if not _ours(namespace) or twisted_logging_begun():
        return
    level = _LEVELS.get(event.get("log_level"), logging.INFO)
    logger = logging.getLogger(namespace)
    if not logger.isEnabledFor(level):
        return
    failure = event.get("log_failure")
    exc_info = None if failure is None else (
        failure.type, failure.value, failure.getTracebackObject())
    logger.log(level, "%s", formatEvent(event), exc_info=exc_info)


def install() -> None:
    """Add :func:`forward_to_stdlib` to Twisted's global publisher (once per process)."""
    global _installed
    with _install_lock:
        if not _installed:
            globalLogPublisher.addObserver(forward_to_stdlib)
            _installed = True
