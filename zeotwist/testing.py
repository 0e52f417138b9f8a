"""Helpers to run a real zeotwist server inside a process, for tests and demos.

:func:`start_server` / :func:`stop_server` drive a
:class:`~zeotwist.server.tap.ServerService` on a reactor from another thread
(by default the private background reactor that blocking clients use), so a
test can run the real server on 127.0.0.1 with a real FileStorage and talk
to it through :class:`~zeotwist.ClientStorage` without any subprocess.
"""
from twisted.internet import defer

from zeotwist.client.reactorthread import background_reactor, blocking_call
from zeotwist.server.tap import ServerService


class RunningServer:
    def __init__(self, service, reactor, addresses):
        self.service = service
        self.reactor = reactor
        self.addresses = addresses

    @property
    def address(self):
        """The first listening address as a ``(host, port)`` tuple or a path."""
        first = self.addresses[0]
        if first.startswith("unix:"):
            return first[5:]
        host, port = first.rsplit(":", 1)
        return host, int(port)

    @property
    def server(self):
        return next(iter(self.service.servers.values()))

    def stop(self, timeout: float = 30) -> None:
        blocking_call(self.reactor, self.service.stopService, timeout=timeout)


def start_server(filename: str, listen: str = "tcp:0:interface=127.0.0.1",
                 reactor=None, timeout: float = 30, **options) -> RunningServer:
    """Serve ``filename`` on ``listen`` from ``reactor``'s thread; wait until listening."""
    reactor = reactor or background_reactor()
    service = ServerService(filename, [listen], reactor=reactor, **options)

    def start():
        service.startService()
        return service.listening

    addresses = blocking_call(reactor, start, timeout=timeout)
    return RunningServer(service, reactor, addresses)


__all__ = ["start_server", "RunningServer", "defer"]


# -- in-memory protocol pairs (no sockets, no reactor) -------------------------

class Recorder:
    """Stands in for a Client behind a ClientProtocol: records what arrives."""

    def __init__(self):
        self.invalidations = []
        self.lost = []

    def _invalidated(self, proto, tid, oids):
        self.invalidations.append((tid, list(oids)))

    def _connection_lost(self, proto, reason):
        self.lost.append(reason)


def memory_server(storage, clock, **kw):
    """A StorageServer whose storage calls run synchronously (deterministic tests)."""
    from twisted.internet.defer import maybeDeferred
    from zeotwist.server.storageserver import StorageServer
    return StorageServer(storage, reactor=clock, run_storage_call=maybeDeferred, **kw)


def connect_in_memory(servers: dict, clock, recorder=None, handshake_timeout=5.0):
    """A ClientProtocol wired to a ServerSession over iosim's in-memory link.

    Returns ``(client_protocol, server_session, pump, recorder)``; call
    ``pump.flush()`` to move bytes both ways.
    """
    from twisted.test import iosim
    from zeotwist.client.protocol import ClientProtocol
    from zeotwist.server.session import ServerSession
    recorder = recorder or Recorder()
    client, session, pump = iosim.connectedServerAndClient(
        lambda: ServerSession(servers, clock, handshake_timeout),
        lambda: ClientProtocol(recorder))
    return client, session, pump, recorder
