"""Every use of a private Twisted name but the socket transports' ones.

zeotwist reaches under Twisted's public API in a few places, each for a
measured reason (named below).  Nothing else in zeotwist touches a name
Twisted keeps private: a Twisted release that renames one breaks this
module only, or :mod:`zeotwist.transportcompat` (the socket transports'
names), and tests/test_twisted_compat.py fails loudly, naming it.  Where a
missing name has a safe answer, the code here degrades to it at run time
(the test still fails).  The tested Twisted range is declared in
pyproject.toml.

Runs wherever its callers run (the reactor thread, except
:func:`private_reactor`, which builds a reactor for its own thread).
"""
import importlib

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.protocols import amp
from twisted.python.failure import Failure

# -- AMP (twisted.protocols.amp) ------------------------------------------------------
# LoadBefore's hot path registers its own answer receiver under a fresh tag
# instead of a Deferred (one Deferred per load instead of two), and one-way
# commands are sent without AMP's callRemote argument copying.


def amp_encode_fields(objects: dict, arglist, proto):
    """An ``AmpBox`` of ``objects`` encoded by ``arglist`` (``[(name,
    Argument)]``), as a command's arguments are (``_objectsToStrings``):
    a list of boxes inside one value (``wire.arguments.BoxList``)."""
    return amp._objectsToStrings(objects, arglist, amp.AmpBox(), proto)


def amp_decode_fields(box, arglist, proto) -> dict:
    """The objects of a box encoded by :func:`amp_encode_fields` (``_stringsToObjects``)."""
    return amp._stringsToObjects(box, arglist, proto)


def amp_make_connection_quietly(proto, transport) -> None:
    """``AMP.makeConnection`` without its log line, which prints the
    addresses as reprs (``IPv4Address(type='TCP', ...)``): AMP's method only
    logs and calls ``BinaryBoxProtocol.makeConnection`` (it also keeps the
    addresses, for its own connectionLost line)."""
    amp.BinaryBoxProtocol.makeConnection(proto, transport)


def amp_connection_lost_quietly(proto, reason) -> None:
    """``AMP.connectionLost`` without its log line: the outstanding
    questions fail (``BinaryBoxProtocol.connectionLost``) and the transport
    is forgotten, as AMP's does."""
    amp.BinaryBoxProtocol.connectionLost(proto, reason)
    proto.transport = None


def amp_closed(proto) -> bool:
    """The AMP connection failed every outstanding question (``_failAllReason``)."""
    return proto._failAllReason is not None


def amp_switched(proto) -> bool:
    """The connection switched protocols: no more AMP boxes (``_locked``)."""
    return proto._locked


def amp_expect_answer(proto, receiver) -> bytes:
    """A fresh question tag whose answer AMP hands to ``receiver``
    (``callback(box)``, ``errback(failure)``, ``addErrback``)."""
    tag = proto._nextTag()
    proto._outstandingRequests[tag] = receiver
    return tag


def amp_expect_answer_from_thread(proto, tag: bytes, receiver) -> None:
    """Like :func:`amp_expect_answer`, from a thread other than the
    reactor's, under a tag the caller made (AMP's counter, ``_nextTag``, is
    the reactor thread's): one dict item set, atomic.  The caller makes sure
    the connection is not being lost meanwhile (see ClientProtocol)."""
    proto._outstandingRequests[tag] = receiver


def amp_forget_answer(proto, tag: bytes, receiver) -> None:
    """Withdraw a question :func:`amp_expect_answer_from_thread` registered
    and that was never sent: AMP no longer waits for its answer."""
    requests = proto._outstandingRequests
    if requests is not None and requests.get(tag) is receiver:
        del requests[tag]


def amp_take_receiver(proto, tag: bytes, having: str):
    """The receiver waiting for the answer ``tag`` if it has the attribute
    ``having``, removed as AMP's ``_answerReceived`` removes it; else None
    (and any other receiver is left where it is)."""
    requests = proto._outstandingRequests
    receiver = None if requests is None else requests.get(tag)
    if receiver is None or not hasattr(receiver, having):
        return None
    del requests[tag]
    return receiver


def calls_pending(reactor) -> bool:
    """Calls handed to ``reactor`` with ``callFromThread`` not yet done
    (``threadCallQueue``, emptied only after the last of them returned)."""
    return bool(getattr(reactor, "threadCallQueue", True))


def amp_awaits_answers(proto) -> bool:
    """Any question still waiting for its answer (False once the connection
    failed them all)."""
    return bool(proto._outstandingRequests)


def amp_is_outstanding(proto, tag: bytes) -> bool:
    """``tag`` names a question still waiting for its answer."""
    requests = proto._outstandingRequests
    return requests is not None and tag in requests


def amp_send_box(proto, name: bytes, box, requires_answer: bool):
    """Send an argument box under command ``name`` (``_sendBoxCommand``):
    a Deferred of the answer box, or None for a one-way command."""
    return proto._sendBoxCommand(name, box, requires_answer)


# -- Deferreds (twisted.internet.defer) -------------------------------------------------
# A small commit's lock and storage calls complete at once, on the reactor
# thread: the server reads their results off the fired Deferreds instead of
# running a chain of callbacks for each (zeotwist.server.tpc).


def value_now(d):
    """The value ``d`` has already fired with (nothing left to run, not
    paused, not a Failure); else ``d`` itself, for the caller to add its
    callbacks to."""
    if d.called and not d.paused and d._chainedTo is None:
        result = d.result
        if not isinstance(result, (Failure, Deferred)):
            return result
    return d


# -- TLS (twisted.protocols.tls) ---------------------------------------------------------
# The TLS transport flushes small writes on a clock that defaults to the
# *global* reactor; a connection served by the private reactor must use its own.


def set_tls_flush_clock(transport, clock) -> None:
    """Make a TLS transport flush its buffered writes on ``clock``; nothing
    for other transports, or once a flush is already scheduled."""
    aggregator = getattr(transport, "_aggregator", None) if clock is not None else None
    if aggregator is not None and getattr(aggregator, "_clock", clock) is not clock:
        if getattr(aggregator, "_scheduled", None) is None:
            aggregator._clock = clock


# -- listening ports (twisted.internet.tcp.Port) -------------------------------------------
# The accept guard sees the port's accept errors (EMFILE) through its logger.


def port_logger(port):
    """The ``twisted.logger.Logger`` a listening port logs through, or None."""
    return getattr(port, "_logger", None)


def set_port_logger(port, logger) -> None:
    port._logger = logger


# -- reactors (twisted.internet.default, base.ReactorBase) ----------------------------------
def default_reactor_class() -> type:
    """The reactor class Twisted installs by default on this platform
    (epoll on Linux, poll or select elsewhere), without installing it."""
    from twisted.internet import default
    from twisted.python.runtime import platform
    module = importlib.import_module(default._getInstallFunction(platform).__module__)
    found = [v for v in vars(module).values()
             if isinstance(v, type) and v.__module__ == module.__name__
             and v.__name__.endswith("Reactor") and IReactorCore.implementedBy(v)]
    if len(found) != 1:
        raise ImportError("no single reactor class in %s: %r" % (module.__name__, found))
    return found[0]


def stopped_by_signal(reactor) -> int | None:
    """The signal that stopped ``reactor`` (SIGTERM, SIGINT), or None
    (``_exitSignal``: twistd ends the process with it once the reactor is done)."""
    return getattr(reactor, "_exitSignal", None)


def forget_exit_signal(reactor) -> None:
    """twistd ends the process with status 0 rather than by re-raising the
    signal that stopped the reactor."""
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def reactor_signal_handlers(reactor) -> dict:
    """``{signal number: handler}``: the reactor's own SIGINT, SIGTERM
    (and SIGBREAK where it exists) handlers, as a reactor run in the main
    thread installs them (``_signalsFactory``: ``sigInt``, ``sigTerm``,
    ``sigBreak``).  They log from inside the signal handler
    (:mod:`zeotwist.server.stopsignals` says why that can hang a server,
    and replaces them)."""
    import signal
    names = {"SIGINT": "sigInt", "SIGTERM": "sigTerm", "SIGBREAK": "sigBreak"}
    return {getattr(signal, sig): getattr(reactor, method) for sig, method in names.items()
            if hasattr(signal, sig) and hasattr(reactor, method)}


def reactor_logger():
    """The Logger the reactor's signal handlers log through (``base._log``:
    ``Received SIGTERM, shutting down.`` under ``twisted.internet.base``)."""
    from twisted.internet import base
    from twisted.logger import Logger
    return getattr(base, "_log", None) or Logger(namespace=base.__name__)


def set_exit_signal(reactor, signum: int) -> None:
    """Record ``signum`` as the signal that stopped ``reactor``, as its own
    handlers do (twistd then ends the process with it)."""
    reactor._exitSignal = signum


def private_reactor():
    """A new reactor of the platform's default class that leaves Twisted's
    global io-thread marker alone (``_registerAsIOThread``), for a thread
    of its own."""
    reactor = default_reactor_class()()
    reactor._registerAsIOThread = False
    return reactor


# -- twisted.logger -------------------------------------------------------------------------
def logging_begun() -> bool:
    """The application has begun Twisted logging: ``beginLoggingTo`` sets
    the start-up buffer (``_temporaryObserver``) to None."""
    from twisted.logger import globalLogBeginner
    return getattr(globalLogBeginner, "_temporaryObserver", False) is None
