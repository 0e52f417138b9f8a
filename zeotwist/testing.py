"""Helpers to run a real zeotwist server inside a process, for tests and demos.

:func:`start_server` / :func:`stop_server` drive a
:class:`~zeotwist.server.tap.ServerService` on a reactor from another thread
(by default the private background reactor that blocking clients use), so a
test can run the real server on 127.0.0.1 with a real FileStorage and talk
to it through :class:`~zeotwist.ClientStorage` without any subprocess.
:func:`start_twistd` runs the real ``twistd -n zeotwist`` in a subprocess
instead (multi-process and fault tests).
"""
from twisted.internet import defer

from zeotwist.client.reactorthread import background_reactor, blocking_call
from zeotwist.server.tap import ServerService


def parse_address(text: str):
    """A listening address as the server logs it (``host:port`` or
    ``unix:/path``) -> a ``(host, port)`` tuple or a socket path."""
    if text.startswith("unix:"):
        return text[5:]
    host, port = text.rsplit(":", 1)
    return host, int(port)


class RunningServer:
    def __init__(self, service, reactor, addresses):
        self.service = service
        self.reactor = reactor
        self.addresses = addresses

    @property
    def address(self):
        """The first listening address as a ``(host, port)`` tuple or a path."""
        return parse_address(self.addresses[0])

    @property
    def server(self):
        return next(iter(self.service.servers.values()))

    def stop(self, timeout: float = 30) -> None:
        blocking_call(self.reactor, self.service.stopService, timeout=timeout)


def start_server(filename: str, listen: str = "tcp:0:interface=127.0.0.1",
                 reactor=None, timeout: float = 30, **options) -> RunningServer:
    """Serve ``filename`` on ``listen`` from ``reactor``'s thread; wait until listening."""
    return _start(ServerService(filename, [listen], reactor=reactor or background_reactor(),
                                **options), timeout)


def start_storages(storages: dict, listen: str = "tcp:0:interface=127.0.0.1",
                   reactor=None, timeout: float = 30, **options) -> RunningServer:
    """Serve ``{name: storage or opener}`` (as :meth:`ServerService.from_storages`)
    on ``listen`` from ``reactor``'s thread; wait until listening."""
    return _start(ServerService.from_storages(
        storages, [listen], reactor=reactor or background_reactor(), **options), timeout)


def _start(service, timeout: float) -> RunningServer:
    reactor = service.reactor

    def start():
        service.startService()
        return service.listening

    addresses = blocking_call(reactor, start, timeout=timeout)
    return RunningServer(service, reactor, addresses)


__all__ = ["start_server", "start_storages", "RunningServer", "defer"]


# -- in-memory protocol pairs (no sockets, no reactor) -------------------------

class Recorder:
    """Stands in for the Connector behind a ClientProtocol: records what arrives."""

    def __init__(self):
        self.invalidations = []
        self.prefetched_records = []
        self.lost = []

    reactor = None

    def invalidated(self, proto, tid, oids):
        self.invalidations.append((tid, list(oids)))

    def prefetched(self, proto, records):
        self.prefetched_records.extend(records)

    def connection_lost(self, proto, reason):
        self.lost.append(reason)


def memory_server(storage, clock, **kw):
    """A StorageServer whose storage calls run synchronously (deterministic tests)."""
    from zeotwist.server.storagecalls import SynchronousCalls
    from zeotwist.server.storageserver import StorageServer
    return StorageServer(storage, reactor=clock, threads=SynchronousCalls(), **kw)


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


def call_in_memory(proto, pump, command, **kw):
    """Ask ``command`` over an in-memory pair, move the bytes, return the answer.

    An error answer is raised, as the real caller would see it.
    """
    out = []
    proto.call(command, **kw).addBoth(out.append)
    pump.flush()
    if not out:
        raise AssertionError("no answer to %s" % command.__name__)
    if isinstance(out[0], Exception):
        raise out[0]
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class MemoryEndpoint:
    """A client endpoint whose connections reach a ServerSession of
    ``servers`` over iosim's in-memory link: a whole
    :class:`~zeotwist.client.client.Client` (ClientService, handshake,
    verification, reconnection, commits) runs without a socket, on ``clock``.

    :meth:`flush` moves bytes both ways on every link; :meth:`drop` cuts the
    newest one; while :attr:`refuse` is set, connection attempts fail as a
    refused TCP connection would.
    """

    def __init__(self, servers: dict, clock, handshake_timeout: float = 5.0):
        self.servers, self.clock = servers, clock
        self.handshake_timeout = handshake_timeout
        self.refuse = False
        self.attempts = 0
        #: ``(client protocol, server session, pump)`` per connection made
        self.links: list = []

    def connect(self, factory):
        from twisted.internet.defer import fail, succeed
        from twisted.internet.error import ConnectionRefusedError
        from twisted.test import iosim
        from zeotwist.server.session import ServerSession
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError("in-memory server refuses"))
        client = factory.buildProtocol(None)
        session = ServerSession(self.servers, self.clock, self.handshake_timeout)
        pump = iosim.connect(session, iosim.FakeTransport(session, isServer=True),
                             client, iosim.FakeTransport(client, isServer=False),
                             greet=False, clock=self.clock)
        self.links.append((client, session, pump))
        return succeed(client)

    def flush(self) -> None:
        """Deliver everything written, on every link, until all is quiet."""
        while any([pump.flush() for _, _, pump in self.links]):
            pass

    def drop(self) -> None:
        """Cut the newest connection (both ends see it lost)."""
        client, session, pump = self.links[-1]
        client.transport.loseConnection()
        self.flush()


# -- the real server in a subprocess: ``twistd -n zeotwist`` --------------------

def twistd_command() -> list:
    """The argv prefix that runs this interpreter's ``twistd``."""
    import os
    import sys
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class TwistdServer:
    """A ``twistd -n`` process serving zeotwist, as started by :func:`start_twistd`."""

    def __init__(self, process, addresses, log_file, output_file=None):
        self.process = process
        self.addresses = addresses
        self.log_file = log_file
        self.output_file = output_file

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self):
        """The first listening address as a ``(host, port)`` tuple or a path."""
        return parse_address(self.addresses[0])

    def log(self) -> str:
        """The server's log so far (twistd's ``-l`` file, then its stdout/stderr)."""
        parts = []
        for path in (self.log_file, self.output_file):
            if path is None:
                continue
            try:
                with open(path, errors="replace") as f:
                    parts.append(f.read())
            except OSError as e:
                parts.append("(no %s: %s)\n" % (path, e))
        return "".join(parts)

    def rss(self, field: str = "VmRSS") -> int:
        """The process's resident set size in bytes (Linux ``/proc``)."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no %s for pid %d" % (field, self.pid))

    def peak_rss(self) -> int:
        """The most resident memory the process has had, in bytes (``VmHWM``)."""
        return self.rss("VmHWM")

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM (twistd stops the service cleanly), SIGKILL after ``timeout`` s."""
        import subprocess
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


def start_twistd(filename: str, *args: str, listen: str = "tcp:0:interface=127.0.0.1",
                 directory: str | None = None, env: dict | None = None,
                 timeout: float = 30, twistd_args=(), server_command=None,
                 preexec_fn=None, launcher=None) -> TwistdServer:
    """Start ``twistd -n zeotwist -f filename --listen listen *args``; wait until it listens.

    The server writes its addresses to ``<directory>/zeotwist.address`` and
    logs to ``<directory>/twistd.log`` (stdout and stderr go to
    ``twistd.out``; directory: the data file's); raises RuntimeError, with
    the log, if the process exits or does not listen within ``timeout``
    seconds.  ``preexec_fn`` runs in the child before twistd (e.g. to set
    resource limits).  ``server_command`` replaces ``zeotwist -f ... --listen ...``
    (e.g. ``["-y", "zeotwist.tac"]`` with ``ZEOTWIST_ADDRESS_FILE`` set to
    ``<directory>/zeotwist.address`` in ``env``).  ``launcher`` replaces
    ``twistd ... zeotwist`` (e.g. ``[sys.executable, "-m", "zeotwist",
    "serve"]``; the log is then the process's output).
    """
    import os
    import subprocess
    import time
    directory = directory or os.path.dirname(os.path.abspath(filename))
    address_file = os.path.join(directory, "zeotwist.address")
    log_file = os.path.join(directory, "twistd.log")
    output_file = os.path.join(directory, "twistd.out")
    for stale in (address_file, log_file):
        if os.path.exists(stale):
            os.remove(stale)
    options = ["-f", filename, "--listen", listen, "--address-file", address_file, *args]
    if launcher is None:
        argv = [*twistd_command(), "-n", "--pidfile=", "-l", log_file, *twistd_args,
                *(server_command or ["zeotwist", *options])]
    else:
        argv, log_file = [*launcher, *options], None
    with open(output_file, "wb") as output:
        process = subprocess.Popen(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT,
                                   preexec_fn=preexec_fn)
    server = TwistdServer(process, [], log_file, output_file)
    deadline = time.monotonic() + timeout
    while not os.path.exists(address_file):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("twistd did not start listening (exit status %s):\n%s"
                               % (process.returncode, server.log()))
        time.sleep(0.02)     # polling a real condition, bounded by the deadline
    with open(address_file) as f:
        server.addresses = [line.strip() for line in f if line.strip()]
    return server
