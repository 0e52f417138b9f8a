"""Find or start the reactor a blocking client uses, and call into it safely.

* If the global reactor is already running (a twistd application, or any
  program that called ``reactor.run()``), blocking clients use it: their
  calls must then come from other threads (``deferToThread`` workers).
* Otherwise one private reactor per process is started in a daemon thread
  (``zeotwist-reactor``), shared by every blocking client in the process.
  It is never installed as the global reactor, so the application can still
  install and run its own later.

:func:`blocking_call` runs a Deferred-returning function on a reactor from
another thread and waits, with a timeout that cancels the Deferred; called
on the reactor's own thread it raises :class:`ReactorThreadError` instead of
deadlocking.
"""
import atexit
import threading

from twisted.internet import defer
from twisted.python import threadable
from twisted.python.failure import Failure

from zeotwist.errors import ReactorThreadError

_private = None
_private_lock = threading.Lock()


def global_reactor_if_running():
    """The global reactor if it is installed and running, else None."""
    import sys
    if "twisted.internet.reactor" not in sys.modules:
        return None
    from twisted.internet import reactor
    return reactor if reactor.running else None


def background_reactor():
    """The process's private reactor, started in a daemon thread on first use."""
    global _private
    with _private_lock:
        if _private is None:
            _private = _start_private_reactor()
        return _private


def default_reactor():
    """The reactor a blocking client uses when none is given (see module doc)."""
    return global_reactor_if_running() or background_reactor()


def _start_private_reactor():
    from twisted.internet.epollreactor import EPollReactor
    reactor = EPollReactor()
    reactor._registerAsIOThread = False   # leave the global io-thread marker alone
    started = threading.Event()
    reactor.callWhenRunning(started.set)
    thread = threading.Thread(
        target=reactor.run, kwargs=dict(installSignalHandlers=False),
        name="zeotwist-reactor", daemon=True)
    reactor._zeotwist_thread = thread
    thread.start()
    started.wait()
    atexit.register(_stop, reactor, thread)
    return reactor


def _stop(reactor, thread):
    if reactor.running:
        reactor.callFromThread(reactor.stop)
        thread.join(5)


def in_reactor_thread(reactor) -> bool:
    thread = getattr(reactor, "_zeotwist_thread", None)
    if thread is not None:
        return threading.current_thread() is thread
    return threadable.isInIOThread()


class _Waiter:
    """One blocking call's hand-off from the reactor thread to the caller."""
    __slots__ = ("event", "result", "deferred")

    def __init__(self):
        self.event = threading.Event()
        self.result = None
        self.deferred = None

    def done(self, result):
        self.result = result
        self.event.set()
        return None   # the Deferred's chain ends here, handled


def blocking_call(reactor, f, *args, timeout: float | None = None,
                  on_timeout=None, **kw):
    """Call ``f(*args, **kw)`` in ``reactor``'s thread and wait for its result.

    ``f`` may return a Deferred.  After ``timeout`` seconds the Deferred is
    cancelled and ``on_timeout()`` is raised (default: TimeoutError).
    """
    if in_reactor_thread(reactor):
        raise ReactorThreadError(
            "a blocking zeotwist call was made on the reactor thread, where "
            "waiting would deadlock; use the Deferred API "
            "(zeotwist.connect / Client) from reactor code, or call the "
            "blocking API from a worker thread (deferToThread)")
    if not reactor.running:
        raise RuntimeError("the reactor this client uses is not running")
    waiter = _Waiter()

    def run():
        d = waiter.deferred = defer.maybeDeferred(f, *args, **kw)
        d.addBoth(waiter.done)

    reactor.callFromThread(run)
    if not waiter.event.wait(timeout):
        reactor.callFromThread(lambda: waiter.deferred and waiter.deferred.cancel())
        waiter.event.wait(1.0)
        if not waiter.event.is_set() or isinstance(waiter.result, Failure) and \
                waiter.result.check(defer.CancelledError):
            raise (on_timeout() if on_timeout else TimeoutError(timeout))
    result = waiter.result
    if isinstance(result, Failure):
        result.raiseException()
    return result
