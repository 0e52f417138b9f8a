"""The twistd glue: ``twistd -n zeotwist -f data.fs --listen tcp:8100``, or
``twistd -n zeotwist -C server.conf`` for several storages.

:class:`Options` parses the command line and, with ``-C``/``--config``, the
server configuration file (:mod:`zeotwist.server.config`); the command line
overrides the file.  :func:`makeService` builds a :class:`ServerService`,
which opens every storage (each with its own :class:`StorageServer`: commit
lock, worker thread, invalidations) when it starts, listens on every
endpoint given, and on stop drops its clients and closes the storages.  A
storage that cannot be opened stops the server with
:class:`StorageOpenError`.  Runs on the reactor thread.

Precedence, for every option: the command line, then the ``<zeotwist>``
section of the file, then the built-in default.  ``--listen`` on the command
line replaces all of the file's ``listen``/``address`` keys; ``-r`` can only
switch read-only on.  ``-f FILE`` adds a FileStorage named by ``-s``
(default ``"1"``) to the file's storages; without ``-C`` it is the only one
(``data.fs`` when ``-f`` is not given either).
"""
import os

import ZConfig.datatypes
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from zeotwist.errors import ZeotwistError
from zeotwist.server.config import (
    DEFAULT_STORAGE_NAME, ConfigError, describe, read_config)
from zeotwist.server.limits import (
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_OUTPUT, FD_RESERVE, AcceptGuard)
from zeotwist.server.session import SessionFactory
from zeotwist.tls import TLSConfigError, listen_tls, server_options
from zeotwist.server.storageserver import (
    DEFAULT_INVALIDATION_QUEUE_SIZE, DEFAULT_TRANSACTION_TIMEOUT, StorageServer)

_log = Logger()

DEFAULT_LISTEN = "tcp:8100:interface=127.0.0.1"
DEFAULT_FILENAME = "data.fs"

#: The built-in defaults of the server options (ServerService keyword names).
DEFAULTS = dict(
    read_only=False,
    transaction_timeout=DEFAULT_TRANSACTION_TIMEOUT,
    handshake_timeout=5.0,
    max_transaction_bytes=2**31,
    invalidation_queue_size=DEFAULT_INVALIDATION_QUEUE_SIZE,
    address_file=None,
    allow_read_only_pack=False,
    max_connections=DEFAULT_MAX_CONNECTIONS,
    max_pending_output=DEFAULT_MAX_PENDING_OUTPUT,
    client_conflict_resolution=False,
    listen_tls=(),          # TLS and authentication: docs/tls-auth.md
    tls_cert=None,
    tls_key=None,
    tls_ca=None,
    auth_file=None,
)

#: command-line option -> ServerService keyword (the options a file can also set)
_CLI = {
    "transaction-timeout": "transaction_timeout",
    "handshake-timeout": "handshake_timeout",
    "max-transaction-size": "max_transaction_bytes",
    "invalidation-queue-size": "invalidation_queue_size",
    "address-file": "address_file",
    "max-connections": "max_connections",
    "max-pending-output": "max_pending_output",
    "tls-cert": "tls_cert",
    "tls-key": "tls_key",
    "tls-ca": "tls_ca",
    "auth-file": "auth_file",
}


class StorageOpenError(ZeotwistError):
    """A storage the server was told to serve cannot be opened; the server
    does not start.  ``str()`` names the storage and the cause."""

    def __init__(self, name, what, cause):
        self.storage_name, self.what, self.cause = name, what, cause
        super().__init__("cannot open storage %r (%s): %s: %s"
                         % (name, what, type(cause).__name__, cause))


def _byte_size(value):
    return ZConfig.datatypes.Registry().get("byte-size")(value)


_byte_size.coerceDoc = "Bytes; KB, MB and GB suffixes allowed."


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Serve ZODB storages to zeotwist clients: one FileStorage (-f), or the "
                "storages of a configuration file (-C, like ZEO's zeo.conf). Listens on "
                "tcp:8100 on the loopback interface unless --listen (or the file) says "
                "otherwise. Command-line options override the configuration file.")
    optFlags = [
        ["read-only", "r", "Serve the storages read-only."],
        ["allow-read-only-pack", None, "Let read-only client connections pack the storages."],
        ["client-conflict-resolution", None,
         "Never unpickle client records on the server, not even for conflict "
         "resolution: every conflict reaches its client as a ConflictError."],
    ]
    optParameters = [
        ["config", "C", None,
         "A server configuration file: a <zeotwist> section with the server options "
         "and storage sections (<filestorage NAME>, ...; see docs/config.md)."],
        ["filename", "f", None,
         "A FileStorage file to serve (created if missing) "
         "[default: %s, unless -C is given]." % DEFAULT_FILENAME],
        ["storage", "s", None,
         "The name clients use for the -f storage [default: %s]." % DEFAULT_STORAGE_NAME],
        ["transaction-timeout", None, None,
         "Seconds a transaction may hold the commit lock before its client "
         "is disconnected (0 = no limit) [default: %g]."
         % DEFAULTS["transaction_timeout"], float],
        ["handshake-timeout", None, None,
         "Seconds a new connection has to register before it is closed "
         "[default: %g]." % DEFAULTS["handshake_timeout"], float],
        ["max-transaction-size", None, None,
         "Bytes one transaction may send before it is refused [default: 2GB]",
         _byte_size],
        ["invalidation-queue-size", None, None,
         "How many recent transactions the server remembers, so reconnecting "
         "clients can verify their caches instead of dropping them "
         "[default: %d]." % DEFAULTS["invalidation_queue_size"], int],
        ["max-connections", None, None,
         "Concurrent client connections; more are closed at once. Kept %d below "
         "the file-descriptor limit [default: %d]."
         % (FD_RESERVE, DEFAULT_MAX_CONNECTIONS), int],
        ["max-pending-output", None, None,
         "Bytes of output a client may leave unread: past it, a client that does "
         "not take its invalidations is disconnected, and one that does not read "
         "its answers is not read from until it does [default: 64MB].", _byte_size],
        ["blob-dir", None, None,
         "The blob directory of the -f storage (blobs are off without it)."],
        ["address-file", None, None,
         "Write the addresses listened on to this file once listening."],
        ["tls-cert", None, None,
         "The server's TLS certificate (PEM; may hold the key and a chain too), "
         "for the --listen-tls endpoints."],
        ["tls-key", None, None, "The private key of --tls-cert (PEM), if not in that file."],
        ["tls-ca", None, None,
         "Require TLS clients to present a certificate signed by a CA of this PEM "
         "file (or directory of .pem files)."],
        ["auth-file", None, None,
         "Clients must log in as a user of this password file, which also gives "
         "each user's rights per storage (docs/tls-auth.md; python -m zeotwist adduser)."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []
        self["listen-tls"] = []
        self["conflict-classes"] = []
        #: after parsing: storage name -> opener, and ServerService keywords
        self.storages: dict = {}
        self.settings: dict = {}

    def opt_allow_conflict_class(self, pattern):
        """A class (dotted name, * wildcards) whose _p_resolveConflict the
        server may run, besides BTrees (repeatable)."""
        self["conflict-classes"].append(pattern)

    def opt_listen(self, description):
        """A Twisted endpoint string to listen on, e.g. tcp:8100 or
        unix:/tmp/zeo.sock (repeatable; default tcp:8100:interface=127.0.0.1)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_listen_tls(self, description):
        """A Twisted server endpoint string to listen on with TLS (--tls-cert,
        --tls-key, --tls-ca), e.g. tcp:8443:interface=0.0.0.0 (repeatable)."""
        self["listen-tls"].append(description)

    def opt_configure(self, path):
        """Same as --config (runzeo's spelling)."""
        self["config"] = path

    def postOptions(self):
        settings = dict(DEFAULTS)
        storages = {}
        path = self["config"]
        if path:
            try:
                conf = read_config(path)
            except ConfigError as e:
                raise usage.UsageError("cannot use configuration file %s: %s" % (path, e))
            settings.update(conf.settings)
            storages.update(conf.storages)
        for option, kw in _CLI.items():
            if self[option] is not None:
                settings[kw] = self[option]
        if self["read-only"]:
            settings["read_only"] = True
        if self["allow-read-only-pack"]:
            settings["allow_read_only_pack"] = True
        if self["client-conflict-resolution"]:
            settings["client_conflict_resolution"] = True
        for kw in ("max_connections", "max_pending_output"):
            if settings[kw] < 1:
                raise usage.UsageError("%s must be at least 1, not %s"
                                       % (kw.replace("_", "-"), settings[kw]))
        settings["listen_tls"] = list(self["listen-tls"] or settings.get("listen_tls") or [])
        settings["listen"] = list(self["listen"] or settings.get("listen")
                                  or ([] if settings["listen_tls"] else [DEFAULT_LISTEN]))
        problem = check_tls_auth(settings)
        if problem:
            raise usage.UsageError(problem)
        settings["conflict_classes"] = (list(settings.get("conflict_classes", ()))
                                        + list(self["conflict-classes"]))
        if self["filename"] or not path:
            name = self["storage"] or DEFAULT_STORAGE_NAME
            if name in storages:
                raise usage.UsageError(
                    "-f: the configuration file already has a storage named %r; "
                    "name the -f storage with -s" % name)
            storages[name] = FileStorageFile(self["filename"] or DEFAULT_FILENAME,
                                             read_only=settings["read_only"],
                                             blob_dir=self["blob-dir"])
        elif self["blob-dir"]:
            raise usage.UsageError("--blob-dir is the -f storage's blob directory; give -f "
                                   "too (with -C, set blob-dir in the storage section)")
        elif self["storage"]:
            raise usage.UsageError("-s/--storage names the -f storage; give -f too "
                                   "(with -C, name storages by their section names)")
        if not storages:
            raise usage.UsageError("no storages to serve: %s has no storage sections "
                                   "and no -f was given" % path)
        self["listen"] = settings["listen"]
        self.settings, self.storages = settings, storages


class FileStorageFile:
    """Opens a FileStorage at ``path`` (created if missing, unless read-only)."""

    def __init__(self, path: str, read_only: bool = False, **options):
        self.path = path
        self.read_only = read_only
        self.options = options

    def open(self):
        from ZODB.FileStorage import FileStorage
        create = not os.path.exists(self.path) and not self.read_only
        return FileStorage(self.path, read_only=self.read_only, create=create, **self.options)

    def describe(self) -> str:
        return "FileStorage %s" % self.path

    def __repr__(self):
        return "<FileStorageFile %s>" % self.path


def open_storage(opener):
    """A storage from a :meth:`ServerService.from_storages` value: a storage
    as is, a ZODB storage section (or anything with ``open()``) opened, or a
    callable called."""
    if hasattr(opener, "loadBefore"):
        return opener
    if hasattr(opener, "open"):
        return opener.open()
    if callable(opener):
        return opener()
    raise TypeError("cannot make a storage of %r" % (opener,))


class ServerService(service.Service):
    """Opens the storages, serves them on every endpoint, closes them on stop.

    ``ServerService(filename, listen, name="1", ...)`` serves one
    FileStorage; :meth:`from_storages` serves several, :meth:`from_config`
    the storages of a configuration file.  The storages are opened by
    :meth:`open_storages`: in ``privilegedStartService`` under twistd (so a
    storage that cannot be opened stops twistd before its reactor runs), or
    else in ``startService``.
    """

    def __init__(self, filename: str | None = None, listen=(DEFAULT_LISTEN,), *,
                 name: str = DEFAULT_STORAGE_NAME, storages: dict | None = None,
                 read_only: bool = False,
                 transaction_timeout: float | None = DEFAULT_TRANSACTION_TIMEOUT,
                 handshake_timeout: float = 5.0, max_transaction_bytes: int = 2**31,
                 address_file: str | None = None, reactor=None,
                 invalidation_queue_size: int = DEFAULT_INVALIDATION_QUEUE_SIZE,
                 stop_reactor_on_failure: bool = False, conflict_classes=(),
                 blob_dir: str | None = None, allow_read_only_pack: bool = False,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_pending_output: int = DEFAULT_MAX_PENDING_OUTPUT,
                 client_conflict_resolution: bool = False, listen_tls=(),
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_ca: str | None = None, auth_file: str | None = None):
        problem = check_tls_auth(dict(listen_tls=listen_tls, tls_cert=tls_cert,
                                      tls_key=tls_key, tls_ca=tls_ca))
        if problem:
            raise ValueError(problem)
        if storages is None:
            if filename is None:
                raise TypeError("ServerService needs a filename or storages")
            storages = {name: FileStorageFile(filename, read_only=read_only,
                                              blob_dir=blob_dir)}
        elif filename is not None:
            raise TypeError("ServerService takes a filename or storages, not both")
        elif blob_dir is not None:
            raise TypeError("blob_dir is the filename storage's; with storages, give "
                            "each storage its own blob directory")
        if not storages:
            raise ValueError("ServerService needs at least one storage")
        #: storage name -> what opens it (see :func:`open_storage`)
        self.storages = dict(storages)
        self.filename = filename
        self.blob_dir = blob_dir
        self.storage_name = next(iter(self.storages))
        self.listen = list(listen)
        self.read_only = read_only
        self.transaction_timeout = transaction_timeout or None
        self.handshake_timeout = handshake_timeout
        self.max_transaction_bytes = max_transaction_bytes
        self.address_file = address_file
        self.invalidation_queue_size = invalidation_queue_size
        self.conflict_classes = tuple(conflict_classes)
        #: the server unpickles no client record (conflicts go to the clients)
        self.client_conflict_resolution = client_conflict_resolution
        self.max_connections = max_connections
        self.max_pending_output = max_pending_output
        #: read-only connections may pack (storageapi's Pack)
        self.allow_read_only_pack = allow_read_only_pack
        #: TLS endpoints and their certificate files; the password file (auth)
        self.listen_tls = list(listen_tls)
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert, tls_key, tls_ca
        self.auth_file = auth_file
        self._tls_options = None
        self._reactor = reactor
        #: True when this service *is* the process (twistd): a server that
        #: cannot listen then stops the reactor instead of idling.
        self.stop_reactor_on_failure = stop_reactor_on_failure
        #: storage name -> StorageServer, once opened; the sessions look
        #: storages up in this very dict
        self.servers: dict = {}
        self.ports: list = []
        self.listening = defer.Deferred()

    @classmethod
    def from_storages(cls, storages: dict, listen=(DEFAULT_LISTEN,), **options):
        """Serve ``{name: storage, section or factory}`` (see :func:`open_storage`)."""
        return cls(None, listen, storages=storages, **options)

    @classmethod
    def from_config(cls, path: str, **options):
        """Serve the storages of configuration file ``path``; keyword
        ``options`` (ServerService's) override the file's settings."""
        conf = read_config(path)
        if not conf.storages:
            raise ConfigError("%s has no storage sections" % path)
        settings = dict(DEFAULTS, listen=[] if conf.settings.get("listen_tls")
                        else [DEFAULT_LISTEN])
        settings.update(conf.settings)
        settings.update(options)
        return cls.from_storages(conf.storages, **settings)

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def open_storages(self) -> None:
        """Open every storage and give each its StorageServer (idempotent).

        If one cannot be opened, those already open are closed again, the
        cause is logged and :class:`StorageOpenError` raised.
        """
        if self.servers:
            return
        opened = {}
        try:
            for name, opener in self.storages.items():
                opened[name] = self._open_one(name, opener)
        except StorageOpenError as e:
            for server in opened.values():
                server.close()
            _log.critical("zeotwist {err}; not starting", err=e)
            raise
        self.servers.update(opened)

    def _open_one(self, name, opener):
        what = describe(opener)
        storage = None
        try:
            storage = open_storage(opener)
            server = StorageServer(
                storage, name, reactor=self.reactor, read_only=self.read_only,
                transaction_timeout=self.transaction_timeout,
                max_transaction_bytes=self.max_transaction_bytes,
                invalidation_queue_size=self.invalidation_queue_size,
                conflict_classes=self.conflict_classes,
                client_conflict_resolution=self.client_conflict_resolution)
            server.allow_read_only_pack = self.allow_read_only_pack
            return server
        except Exception as e:
            if storage is not None and storage is not opener:
                try:
                    storage.close()
                except Exception:
                    pass
            raise StorageOpenError(name, what, e) from e

    def privilegedStartService(self):
        super().privilegedStartService()
        self.open_storages()
        self.tls_options()          # key files are often readable by root only

    def startService(self):
        self.open_storages()
        super().startService()
        factory = SessionFactory(self.servers, self.reactor, self.handshake_timeout,
                                 max_connections=self.max_connections,
                                 max_pending_output=self.max_pending_output)
        factory.portal = self.auth_portal()
        ds = [serverFromString(self.reactor, desc).listen(factory) for desc in self.listen]
        ds += [listen_tls(self.reactor, desc, factory, self.tls_options())
               for desc in self.listen_tls]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addCallbacks(self._listening, self._listen_failed)

    def tls_options(self):
        """The TLS options of the --listen-tls endpoints, read once (None
        without); a file that cannot be used is logged and raised."""
        if self.listen_tls and self._tls_options is None:
            try:
                self._tls_options = server_options(self.tls_cert, self.tls_key, self.tls_ca)
            except TLSConfigError as e:
                _log.critical("zeotwist cannot use its TLS files: {err}; not starting", err=e)
                raise
        return self._tls_options

    def auth_portal(self):
        """The twisted.cred Portal of --auth-file, or None (no login)."""
        if self.auth_file is None:
            return None
        from zeotwist.server.auth import make_portal
        return make_portal(self.auth_file, self.reactor)

    def _listening(self, ports):
        self.ports = ports
        self.accept_guards = [AcceptGuard.install(p, self.reactor) for p in ports]
        addresses = [format_address(p.getHost()) for p in ports]
        for name, server in self.servers.items():
            for a in addresses:
                _log.info("zeotwist serving {file} as storage {name!r} on {address}",
                          file=server.storage.getName(), name=name, address=a)
        if self.address_file:
            tmp = self.address_file + ".tmp"
            with open(tmp, "w") as f:
                f.write("\n".join(addresses) + "\n")
            os.replace(tmp, self.address_file)
        self.listening.callback(addresses)

    def _listen_failed(self, failure):
        err = failure.value
        err = getattr(err, "subFailure", None) or failure
        _log.critical("zeotwist cannot listen: {err}", err=err.getErrorMessage())
        self.listening.errback(err)
        if not self.stop_reactor_on_failure:
            return
        if self.reactor.running:
            self.reactor.stop()
        else:   # twistd starts services before the reactor runs
            self.reactor.callWhenRunning(self.reactor.stop)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        for guard in filter(None, getattr(self, "accept_guards", ())):
            guard.stop()
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        self.ports = []
        for server in self.servers.values():
            for session in list(server.sessions):
                if session.transport is not None:
                    session.transport.abortConnection()
            server.close()
        self.servers.clear()


def format_address(host) -> str:
    """An endpoint-ish text for a listening address (for logs and tests)."""
    if hasattr(host, "port"):
        return "%s:%d" % (host.host, host.port)
    return "unix:%s" % (host.name.decode() if isinstance(host.name, bytes) else host.name)


def check_tls_auth(settings: dict) -> str | None:
    """What is wrong with the TLS and auth settings, or None."""
    if settings.get("listen_tls") and not settings.get("tls_cert"):
        return "--listen-tls needs --tls-cert (the server's certificate)"
    given = [k for k in ("tls_cert", "tls_key", "tls_ca") if settings.get(k)]
    if given and not settings.get("listen_tls"):
        return ("%s applies to --listen-tls endpoints; give one (a plain --listen "
                "never uses TLS)" % "/".join("--" + k.replace("_", "-") for k in given))
    auth = settings.get("auth_file")
    if auth and not os.path.isfile(auth):
        return "--auth-file: no password file %s (python -m zeotwist adduser makes one)" % auth
    return None


def makeService(options: Options) -> ServerService:
    return ServerService.from_storages(options.storages, stop_reactor_on_failure=True,
                                       **options.settings)
