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
from _thread import allocate_lock as _allocate_lock

from twisted.internet import defer
from twisted.python import threadable
from twisted.python.failure import Failure

from zeotwist.errors import ReactorThreadError, WrongStateError

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
    from zeotwist.twistedcompat import private_reactor
    reactor = private_reactor()     # the platform's default reactor class
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
    """One blocking call's hand-off from the reactor thread to the caller.

    The hot path of every blocking read, so it is lean: a raw lock, taken
    here and released by the reactor thread once ``result`` is set (cheaper
    than ``threading.Event``, which allocates a Condition and, per wait, one
    more lock), and ``f`` called directly rather than via ``maybeDeferred``.
    """
    __slots__ = ("lock", "result", "deferred", "f", "args", "kw")

    def __init__(self, f, args, kw):
        self.lock = _allocate_lock()
        self.lock.acquire()
        self.result = self.deferred = None
        self.f, self.args, self.kw = f, args, kw

    def run(self):
        """In the reactor thread: call ``f``; hand over its (eventual) result."""
        try:
            result = self.f(*self.args, **self.kw)
        except BaseException:
            result = Failure()
        if isinstance(result, defer.Deferred):
            self.deferred = result
            result.addBoth(self.done)
        else:
            self.done(result)

    def done(self, result):
        self.result = result
        self.lock.release()
        return None   # the Deferred's chain ends here, handled

    def cancel(self):
        if self.deferred is not None:
            self.deferred.cancel()


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
        raise WrongStateError("the reactor this client uses is not running")
    waiter = _Waiter(f, args, kw)
    reactor.callFromThread(waiter.run)
    if not waiter.lock.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
        reactor.callFromThread(waiter.cancel)
        if not waiter.lock.acquire(True, 1.0) or isinstance(waiter.result, Failure) and \
                waiter.result.check(defer.CancelledError):
            raise (on_timeout() if on_timeout else TimeoutError(timeout))
    result = waiter.result
    if isinstance(result, Failure):
        result.raiseException()
    return result
