"""The twistd glue: ``twistd -n zeotwist -f data.fs --listen tcp:8100``, or
``twistd -n zeotwist -C server.conf`` for several storages.

:class:`Options` parses the command line and, with ``-C``/``--config``, the
server configuration file (:mod:`zeotwist.server.config`); the command line
overrides the file.  The server options themselves are defined once, as the
fields of :class:`~zeotwist.server.settings.ServerSettings`: Options spells
them from there, and the service keeps them as ``service.settings``.  :func:`makeService` builds a :class:`ServerService`,
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
from dataclasses import replace

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from zeotwist.errors import ZeotwistError
from zeotwist.server.config import (
    DEFAULT_STORAGE_NAME, ConfigError, describe, read_config)
from zeotwist.server.limits import AcceptGuard
from zeotwist.server.session import SessionFactory
from zeotwist.server.settings import (
    DEFAULT_LISTEN, FLAG, LIST, VALUE, ServerSettings, check_tls_auth, cli_name, help_text,
    layered, option_fields)
from zeotwist.server.storageserver import StorageServer
from zeotwist.tls import TLSConfigError, listen_tls, server_options

_log = Logger()

DEFAULT_FILENAME = "data.fs"


class StorageOpenError(ZeotwistError):
    """A storage the server was told to serve cannot be opened; the server
    does not start.  ``str()`` names the storage and the cause."""

    def __init__(self, name, what, cause):
        self.storage_name, self.what, self.cause = name, what, cause
        super().__init__("cannot open storage %r (%s): %s: %s"
                         % (name, what, type(cause).__name__, cause))


def _list_option(f):
    """The ``opt_`` method of a repeatable command-line option (a LIST field)."""
    def opt(self, value):
        self[cli_name(f)].append(value)
    opt.__doc__ = f.metadata["help"] + "."
    return opt


class Options(usage.Options):
    """The command line.  The server options themselves come from
    :class:`ServerSettings` (see :mod:`zeotwist.server.settings`); only the
    storage-choosing options are spelled here."""
    synopsis = "[options]"
    longdesc = ("Serve ZODB storages to zeotwist clients: one FileStorage (-f), or the "
                "storages of a configuration file (-C, like ZEO's zeo.conf). Listens on "
                "tcp:8100 on the loopback interface unless --listen (or the file) says "
                "otherwise. Command-line options override the configuration file.")
    optFlags = [[cli_name(f), f.metadata["short"], help_text(f)]
                for f in option_fields(FLAG) if cli_name(f)]
    optParameters = [
        ["config", "C", None,
         "A server configuration file: a <zeotwist> section with the server options "
         "and storage sections (<filestorage NAME>, ...; see docs/config.md)."],
        ["filename", "f", None,
         "A FileStorage file to serve (created if missing) "
         "[default: %s, unless -C is given]." % DEFAULT_FILENAME],
        ["storage", "s", None,
         "The name clients use for the -f storage [default: %s]." % DEFAULT_STORAGE_NAME],
        ["blob-dir", None, None,
         "The blob directory of the -f storage (blobs are off without it)."],
    ] + [[cli_name(f), f.metadata["short"], None, help_text(f), f.metadata["coerce"]]
         for f in option_fields(VALUE) if cli_name(f)]

    def __init__(self):
        super().__init__()
        for f in option_fields(LIST):
            if cli_name(f):
                self[cli_name(f)] = []
        #: after parsing: storage name -> opener, and the ServerSettings
        self.storages: dict = {}
        self.settings = ServerSettings()

    def opt_configure(self, path):
        """Same as --config (runzeo's spelling)."""
        self["config"] = path

    def given(self) -> dict:
        """The server options given on the command line, by settings field."""
        values = {}
        for f in option_fields():
            name = cli_name(f)
            value = self.get(name) if name else None
            kind = f.metadata["kind"]
            if (kind == VALUE and value is not None) or (kind != VALUE and value):
                values[f.name] = True if kind == FLAG else value
        return values

    def postOptions(self):
        path = self["config"]
        conf = None
        if path:
            try:
                conf = read_config(path)
            except ConfigError as e:
                raise usage.UsageError("cannot use configuration file %s: %s" % (path, e))
        settings = layered(conf.settings if conf else {}, self.given())
        problem = settings.problem()
        if problem:
            raise usage.UsageError(problem)
        self.storages = self._storages(dict(conf.storages) if conf else {}, settings)
        self["listen"] = settings.listen
        self.settings = settings

    def _storages(self, storages: dict, settings: ServerSettings) -> dict:
        """The file's storages, plus the -f one (the only one without -C)."""
        path = self["config"]
        if self["filename"] or not path:
            name = self["storage"] or DEFAULT_STORAGE_NAME
            if name in storages:
                raise usage.UsageError(
                    "-f: the configuration file already has a storage named %r; "
                    "name the -f storage with -s" % name)
            storages[name] = FileStorageFile(self["filename"] or DEFAULT_FILENAME,
                                             read_only=settings.read_only,
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
        return storages


for _f in option_fields(LIST):      # the repeatable options: --listen/-l, ...
    if cli_name(_f):
        _method = _list_option(_f)
        setattr(Options, "opt_" + cli_name(_f).replace("-", "_"), _method)
        if _f.metadata["short"]:
            setattr(Options, "opt_" + _f.metadata["short"], _method)


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
            raise ValueError(problem)
        if storages is None:
            if filename is None:
                raise TypeError("ServerService needs a filename or storages")
            storages = {name: FileStorageFile(filename, read_only=settings.read_only,
                                              blob_dir=blob_dir)}
        elif filename is not None:
            raise TypeError("ServerService takes a filename or storages, not both")
        elif blob_dir is not None:
            raise TypeError("blob_dir is the filename storage's; with storages, give "
                            "each storage its own blob directory")
        if not storages:
            raise ValueError("ServerService needs at least one storage")
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
        #: cannot listen then stops the reactor instead of idling.
        self.stop_reactor_on_failure = stop_reactor_on_failure
        #: storage name -> StorageServer, once opened; the sessions look
        #: storages up in this very dict
        self.servers: dict = {}
        self.ports: list = []
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
            s = self.settings
            server = StorageServer(
                storage, name, reactor=self.reactor, read_only=s.read_only,
                transaction_timeout=s.transaction_timeout or None,
                max_transaction_bytes=s.max_transaction_bytes,
                invalidation_queue_size=s.invalidation_queue_size,
                conflict_classes=self.conflict_classes,
                client_conflict_resolution=s.client_conflict_resolution,
                poll_interval=s.poll_interval)
            server.allow_read_only_pack = s.allow_read_only_pack
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
        s = self.settings
        factory = SessionFactory(self.servers, self.reactor, s.handshake_timeout,
                                 max_connections=s.max_connections,
                                 max_pending_output=s.max_pending_output)
        factory.portal = self.auth_portal()
        ds = [serverFromString(self.reactor, desc).listen(factory) for desc in s.listen]
        ds += [listen_tls(self.reactor, desc, factory, self.tls_options())
               for desc in s.listen_tls]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addCallbacks(self._listening, self._listen_failed)

    def tls_options(self):
        """The TLS options of the --listen-tls endpoints, read once (None
        without); a file that cannot be used is logged and raised."""
        s = self.settings
        if s.listen_tls and self._tls_options is None:
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
        from zeotwist.server.auth import make_portal
        return make_portal(self.settings.auth_file, self.reactor)

    def _listening(self, ports):
        self.ports = ports
        self.accept_guards = [AcceptGuard.install(p, self.reactor) for p in ports]
        addresses = [format_address(p.getHost()) for p in ports]
        for name, server in self.servers.items():
            for a in addresses:
                _log.info("zeotwist serving {file} as storage {name!r} on {address}",
                          file=server.storage.getName(), name=name, address=a)
        address_file = self.settings.address_file
        if address_file:
            tmp = address_file + ".tmp"
            with open(tmp, "w") as f:
                f.write("\n".join(addresses) + "\n")
            os.replace(tmp, address_file)
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


def makeService(options: Options) -> ServerService:
    return ServerService.from_storages(options.storages, settings=options.settings,
                                       stop_reactor_on_failure=True)
