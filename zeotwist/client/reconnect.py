"""One connection kept up: connect, hand-shake, and again after a loss or a failure.

:class:`Reconnector` keeps the connection of a
:class:`~zeotwist.client.connector.Connector`, as Twisted's ``ClientService``
did until issue 10's seventh session: ``twisted.application`` imports
``twisted.plugin`` (and with it ``twisted.python.modules``, ``zippath``,
``zipfile``) and automat, 1.1 MB of a client's resident memory for a loop of
six states (docs/performance.md, "Memory"):

* ``stopped``: nothing under way; :meth:`Reconnector.start` makes an attempt;
* ``connecting``: the endpoint's ``connect`` Deferred is pending;
* ``handshaking``: connected; the ``handshake(protocol)`` Deferred runs
  (Login, Register, Verify);
* ``connected``: the handshake succeeded;
* ``waiting``: the next attempt is ``retry_policy(failures)`` seconds away,
  ``failures`` counting the failed attempts, failed handshakes and lost
  connections since the last handshake that succeeded;
* ``stopping``: :meth:`Reconnector.stop` was called while connecting or
  connected; the Deferreds it returned fire once the attempt has failed
  (cancelled) or the connection is closed.

The protocols report their connection's loss (:meth:`Reconnector.connection_lost`,
through the connector: no proxy around them).  A connection lost during its
handshake fails the handshake (its questions fail with the connection), and
that failure decides what comes next: the retry, or the end of a stop.  A
failed handshake's connection is closed here.  Where ``ClientService`` had no
transition (a loss, or a stop, while its ``prepareConnection`` ran), the
connector used to silence its proxy.

Runs on the reactor thread.
"""
import random

from twisted.internet.defer import Deferred, maybeDeferred, succeed


def backoff(initial: float = 0.05, maximum: float = 5.0, factor: float = 1.5,
            jitter=lambda: random.random() * 0.25):
    """The retry policy: ``initial * factor ** attempt`` seconds before
    attempt ``attempt`` (1, 2, ...), at most ``maximum``, plus ``jitter()``
    (up to 0.25 s by default: clients of a restarted server do not all come
    back at once).  Twisted's ``backoffPolicy``, with the client's figures."""
    def policy(attempt: int) -> float:
        return min(initial * factor ** min(100, attempt), maximum) + jitter()
    return policy


class Reconnector:
    """Keeps one connection through :attr:`endpoint` (read at each attempt)
    with protocols of ``factory``; ``handshake(protocol)`` returns a
    Deferred (or a value) once the connection is usable, or fails;
    ``unreachable(error)`` hears each failed ``connect`` (not a cancelled one)."""

    def __init__(self, endpoint, factory, handshake, retry_policy, clock, unreachable):
        self.endpoint = endpoint
        self._factory = factory
        self._handshake = handshake
        self._retry_policy = retry_policy
        self._clock = clock
        self._unreachable = unreachable
        self.state = "stopped"
        self._attempt = None         # connecting: the endpoint's Deferred
        self._proto = None           # handshaking, connected, stopping: the connection
        self._lost = False           # its loss was reported (its handshake yet to fail)
        self._retry = None           # waiting: the delayed call
        self.failures = 0
        self._stop_waiters: list = []
        self._restart = False        # start() while stopping: start again once stopped

    def start(self) -> None:
        if self.state == "stopped":
            self._connect()
        elif self.state == "stopping":
            self._restart = True

    def stop(self) -> Deferred:
        """Stop connecting and close the connection; fires once it is closed."""
        self._restart = False
        state = self.state
        if state == "stopped":
            return succeed(None)
        if state == "waiting":
            self._retry.cancel()
            self._retry = None
            self.state = "stopped"
            return succeed(None)
        d = Deferred()
        self._stop_waiters.append(d)
        if state == "stopping":
            return d
        self.state = "stopping"
        if state == "connecting":
            self._attempt.cancel()      # fails it (the stop ends there), or it closes
        elif self._lost:                # lost already, its handshake yet to fail
            self._stopped()
        else:
            self._close(self._proto)    # the stop ends at its connection_lost
        return d

    def connection_lost(self, proto) -> None:
        """``proto``'s connection is lost (a protocol of any attempt)."""
        if proto is not self._proto:
            return                      # an earlier connection's, closed here
        if self.state == "handshaking":
            self._lost = True           # the handshake fails with it: see there
        elif self.state == "connected":
            self._proto = None
            self._wait()
        elif self.state == "stopping":
            self._stopped()

    # -- the steps ---------------------------------------------------------------------
    def _connect(self) -> None:
        self.state = "connecting"
        d = self._attempt = maybeDeferred(self.endpoint.connect, self._factory)
        d.addCallbacks(self._connected, self._attempt_failed)

    def _connected(self, proto) -> None:
        self._attempt = None
        self._proto, self._lost = proto, False
        if self.state == "stopping":    # it connected as the stop cancelled it
            self._close(proto)
            return
        self.state = "handshaking"
        d = maybeDeferred(self._handshake, proto)
        d.addCallbacks(self._handshake_done, self._handshake_failed,
                       callbackArgs=(proto,), errbackArgs=(proto,))

    def _attempt_failed(self, failure) -> None:
        self._attempt = None
        if self.state == "stopping":
            self._stopped()
            return
        self._unreachable(failure.value)
        self._wait()

    def _handshake_done(self, _, proto) -> None:
        if proto is not self._proto or self.state != "handshaking":
            return                      # stopping: the stop ends at its connection_lost
        if self._lost:                  # lost after all (its handshake did not need it)
            self._proto = None
            self._wait()
            return
        self.state = "connected"
        self.failures = 0

    def _handshake_failed(self, failure, proto) -> None:
        if proto is not self._proto or self.state != "handshaking":
            return                      # a stop's doing; it was closed there
        self._close(proto)
        self._proto = None
        self._wait()

    def _wait(self) -> None:
        self.failures += 1
        self.state = "waiting"
        self._retry = self._clock.callLater(self._retry_policy(self.failures), self._again)

    def _again(self) -> None:
        self._retry = None
        self._connect()

    def _stopped(self) -> None:
        self.state = "stopped"
        self._proto = None
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)
        if self._restart and self.state == "stopped":
            self._restart = False
            self._connect()

    @staticmethod
    def _close(proto) -> None:
        if proto.transport is not None:
            proto.transport.loseConnection()
