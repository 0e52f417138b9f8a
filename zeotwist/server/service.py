"""ServerService: opens the storages, listens, serves, and closes them at stop.

``ServerService(filename, listen, ...)`` serves one FileStorage;
:meth:`ServerService.from_storages` several, :meth:`ServerService.from_config`
the storages of a configuration file.  Every server option is read from
one :class:`~zeotwist.server.settings.ServerSettings` (``service.settings``).
Each storage gets its own :class:`StorageServer` (commit lock, worker
thread, invalidations: :mod:`zeotwist.server.openstorages`).  A storage that cannot be opened stops the server
with :class:`StorageOpenError`; when the service is the process (twistd),
every start-up failure is one line on the starting terminal and a non-zero
exit (:mod:`zeotwist.server.startup`).  Runs on the reactor thread.
"""
import atexit
import os
import signal
import sys
from dataclasses import replace

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

# StorageOpenError: defined in zeotwist.errors, importable from here as before
from zeotwist.errors import ConfigError, StartupFailed, StorageOpenError, UsageError
from zeotwist.server.config import DEFAULT_STORAGE_NAME, describe, read_config
from zeotwist.server.limits import AcceptGuard
from zeotwist.server.metrics import metrics_site, missing_dependency
from zeotwist.server.openstorages import FileStorageFile, open_servers
from zeotwist.server.session import SessionFactory
from zeotwist.server.settings import ServerSettings, check_tls_auth, layered
from zeotwist.server.startup import (
    StartupReporter, listen_on, listen_problem, private_unix_socket)
from zeotwist.server.stopsignals import SignalStop
from zeotwist.tls import TLSConfigError, listen_tls, require_tls, server_options
from zeotwist.twistedcompat import forget_exit_signal, stopped_by_signal

_log = Logger()


class ServerService(service.Service):
    """Opens the storages, serves them on every endpoint, closes them on stop.

    ``ServerService(filename, listen, name="1", ...)`` serves one
    FileStorage; :meth:`from_storages` serves several, :meth:`from_config`
    the storages of a configuration file.  The storages are opened by
    :meth:`open_storages`: in ``privilegedStartService`` under twistd (so a
    storage that cannot be opened stops twistd before its reactor runs), or
    else in ``startService``.
    """

    def __init__(self, filename: str | None = None, listen=None, *,
                 name: str = DEFAULT_STORAGE_NAME, storages: dict | None = None,
                 blob_dir: str | None = None, settings: ServerSettings | None = None,
                 reactor=None, stop_reactor_on_failure: bool = False, **options):
        """``options``: :class:`ServerSettings` fields, over ``settings``."""
        if listen is not None:
            options["listen"] = list(listen)
        settings = replace(settings, **options) if settings else ServerSettings(**options)
        problem = check_tls_auth(settings)
        if problem:
            raise ConfigError(problem)
        if storages is None:
            if filename is None:
                raise UsageError("ServerService needs a filename or storages")
            storages = {name: FileStorageFile(filename, read_only=settings.read_only,
                                              blob_dir=blob_dir)}
        elif filename is not None:
            raise UsageError("ServerService takes a filename or storages, not both")
        elif blob_dir is not None:
            raise UsageError("blob_dir is the filename storage's; with storages, give "
                             "each storage its own blob directory")
        if not storages:
            raise ConfigError("ServerService needs at least one storage")
        #: every server option (read-only here: replace() makes a changed copy)
        self.settings = settings
        #: storage name -> what opens it (see :func:`open_storage`)
        self.storages = dict(storages)
        self.filename = filename
        self.blob_dir = blob_dir
        self.storage_name = next(iter(self.storages))
        self._tls_options = None
        self._reactor = reactor
        #: True when this service *is* the process (twistd): a server that
        #: cannot start says so on the starting terminal and exits non-zero.
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self._reporter = StartupReporter() if stop_reactor_on_failure else None
        self._listen_started = False
        #: storage name -> StorageServer, once opened; the sessions look
        #: storages up in this very dict
        self.servers: dict = {}
        self.ports: list = []
        self.metrics_port = None            # --metrics: the /metrics port
        self.factory = None                 # the SessionFactory, once listening
        self.listening = defer.Deferred()

    def __getattr__(self, name: str):
        # service.listen, service.read_only, ...: the settings' fields
        if name != "settings" and name in ServerSettings.__dataclass_fields__:
            return getattr(self.settings, name)
        raise AttributeError("%r object has no attribute %r" % (type(self).__name__, name))

    @property
    def conflict_classes(self) -> tuple:
        """The allow-listed conflict classes, as each StorageServer gets them."""
        return tuple(self.settings.conflict_classes)

    @classmethod
    def from_storages(cls, storages: dict, listen=None, **options):
        """Serve ``{name: storage, section or factory}`` (see :func:`open_storage`)."""
        return cls(None, listen, storages=storages, **options)

    @classmethod
    def from_config(cls, path: str, **options):
        """Serve the storages of configuration file ``path``; keyword
        ``options`` (ServerSettings fields, or ServerService's own) override
        the file's settings."""
        conf = read_config(path)
        if not conf.storages:
            raise ConfigError("%s has no storage sections" % path)
        fields = ServerSettings.__dataclass_fields__
        given = {k: v for k, v in options.items() if k in fields}
        rest = {k: v for k, v in options.items() if k not in fields}
        settings = layered(conf.settings, given)
        return cls.from_storages(conf.storages, settings=settings, **rest)

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def open_storages(self) -> None:
        """Open every storage and give each its StorageServer (idempotent;
        :func:`~zeotwist.server.openstorages.open_servers`)."""
        if not self.servers:
            self.servers.update(open_servers(self.storages, self.settings, self.reactor))

    def privilegedStartService(self):
        # Under twistd: after daemonizing, before the reactor runs and before
        # privileges are dropped (ports below 1024, root-only key files).
        super().privilegedStartService()
        # Once the reactor runs, SIGTERM and SIGINT are handled without
        # logging in the signal handler (also in one's own .tac file).  As
        # the process: the pid and address files appear before twistd runs
        # the reactor, and a SIGTERM meanwhile stops it cleanly once it
        # runs, instead of killing the process.
        SignalStop.install(self.reactor, early=self._reporter is not None)
        try:
            self.open_storages()
            self.tls_options()
            self._listen()
        except (StorageOpenError, TLSConfigError, StartupFailed) as e:
            if self._reporter is None:
                raise
            self._reporter.failed(str(e))       # raises StartupFailed

    def startService(self):
        self.open_storages()
        super().startService()
        if not self._listen_started:
            self._listen()

    def _listen(self) -> None:
        """Listen on every endpoint; :attr:`listening` fires with the addresses.

        TCP and Unix endpoints listen at once, so a failure is raised here
        as StartupFailed; an endpoint that listens later reports through
        :meth:`_listen_failed`.
        """
        self._listen_started = True
        s = self.settings
        factory = SessionFactory(self.servers, self.reactor, s.handshake_timeout,
                                 max_connections=s.max_connections,
                                 max_pending_output=s.max_pending_output,
                                 memory_budget=s.memory_budget, max_spool=s.max_spool,
                                 idle_timeout=s.idle_timeout, vote_timeout=s.vote_timeout,
                                 max_iterators=s.max_iterators,
                                 iterator_timeout=s.iterator_timeout)
        factory.portal = self.auth_portal()
        factory.noisy = False               # no "Starting factory <...>" lines
        self.factory = factory
        tls = self.tls_options()            # TLSConfigError as is, before any listening
        ds = [self._listen_one(desc, lambda desc: listen_on(
            self.reactor, private_unix_socket(desc), factory)) for desc in s.listen]
        ds += [self._listen_one(desc, lambda desc: listen_tls(
            self.reactor, private_unix_socket(desc), factory, tls)) for desc in s.listen_tls]
        if s.metrics:                       # the last port: Prometheus's /metrics
            if missing_dependency():
                raise StartupFailed(missing_dependency())
            ds.append(self._listen_one(s.metrics, lambda desc: listen_on(
                self.reactor, private_unix_socket(desc), metrics_site(self))))
        outcome = []
        d = defer.DeferredList(ds, consumeErrors=True)
        d.addCallback(self._listened).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()

    @staticmethod
    def _listen_one(description: str, listen) -> defer.Deferred:
        try:
            d = listen(description)
        except Exception as e:          # a bad endpoint string given in Python
            d = defer.fail(e)

        def explain(failure):
            raise StartupFailed(listen_problem(description, failure.value))
        return d.addErrback(explain)

    def _listened(self, results) -> None:
        ports = [port for ok, port in results if ok]
        failures = [f for ok, f in results if not ok]
        if not failures:
            if self.settings.metrics:
                self.metrics_port = ports.pop()
                _log.info("zeotwist metrics at http://{address}/metrics",
                          address=format_address(self.metrics_port.getHost()))
            return self._listening(ports)
        for port in ports:
            port.stopListening()
        err = failures[0].value
        _log.critical("zeotwist {err}; not starting", err=err)
        self.listening.errback(failures[0])
        if self._reporter is None:
            return                  # whoever started the service watches .listening
        self.listening.addErrback(lambda _: None)
        if not self.reactor.running:
            raise err               # to privilegedStartService, and so to twistd
        self._fail_running_process(str(err))

    def tls_options(self):
        """The TLS options of the --listen-tls endpoints, read once (None
        without); a file that cannot be used is logged and raised."""
        s = self.settings
        if s.listen_tls and self._tls_options is None:
            require_tls("--listen-tls")     # raised as is: not a problem of the files
            try:
                self._tls_options = server_options(s.tls_cert, s.tls_key, s.tls_ca)
            except TLSConfigError as e:
                _log.critical("zeotwist cannot use its TLS files: {err}; not starting", err=e)
                raise
        return self._tls_options

    def auth_portal(self):
        """The twisted.cred Portal of --auth-file, or None (no login)."""
        if self.settings.auth_file is None:
            return None
        from zeotwist.server.portal import make_portal
        return make_portal(self.settings.auth_file, self.reactor)

    def _listening(self, ports):
        self.ports = ports
        self.accept_guards = [AcceptGuard.install(p, self.reactor) for p in ports]
        addresses = [format_address(p.getHost()) for p in ports]
        for name, server in self.servers.items():
            for a in addresses:
                _log.info("zeotwist serving {file} as storage {name!r} on {address}",
                          file=server.storage.getName(), name=name, address=a)
        if self.settings.address_file:
            _write_atomically(self.settings.address_file, "\n".join(addresses) + "\n")
        if self.settings.pid_filename:
            _write_atomically(self.settings.pid_filename, "%d\n" % os.getpid())
        if self._reporter is not None:
            self._reporter.started()
        self.listening.callback(addresses)

    def _fail_running_process(self, message: str) -> None:
        """A late listening failure (the reactor runs): stop, exit non-zero."""
        try:
            self._reporter.failed(message)
        except StartupFailed:
            pass
        atexit.register(_exit_failed)
        self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        for guard in filter(None, getattr(self, "accept_guards", ())):
            guard.stop()
        if getattr(self, "factory", None) is not None:
            self.factory.stop()             # its timers (iterator expiry)
        ports = self.ports + ([self.metrics_port] if self.metrics_port else [])
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        self.ports, self.metrics_port = [], None
        if self.settings.pid_filename and self.listening.called:
            try:
                os.remove(self.settings.pid_filename)
            except OSError:
                pass
        yield defer.gatherResults([server.stop_packs() for server in self.servers.values()])
        for server in self.servers.values():
            for session in list(server.sessions):
                if session.transport is not None:
                    session.transport.abortConnection()
        for name, server in self.servers.items():
            server.close()
            _log.info("zeotwist closed storage {name!r} ({what})", name=name,
                      what=describe(self.storages.get(name)))
        self.servers.clear()
        if self._reporter is not None and stopped_by_signal(self.reactor) == signal.SIGTERM:
            # Under twistd: SIGTERM asks for a stop, and this one went well
            # (a storage that failed to close raised above): exit with
            # status 0, as runzeo does, not by re-raising SIGTERM (twistd's way).
            forget_exit_signal(self.reactor)


def format_address(host) -> str:
    """An endpoint-ish text for a listening address (for logs and tests)."""
    if hasattr(host, "port"):
        return "%s:%d" % (host.host, host.port)
    return "unix:%s" % (host.name.decode() if isinstance(host.name, bytes) else host.name)


def _exit_failed() -> None:
    # atexit, after twistd removed its pid file: the status of a server
    # whose listening failed once the reactor ran (a supervisor must not
    # see a clean exit).  os._exit is the only way to set it from here.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(1)


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
