"""The twistd glue: ``twistd -n zeotwist -f data.fs --listen tcp:8100``.

:class:`Options` parses the command line; :func:`makeService` builds a
:class:`ServerService`, which opens the FileStorage when it starts, listens
on every endpoint given, and on stop drops its clients and closes the
storage.  Runs on the reactor thread.
"""
import os

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from zeotwist.server.session import SessionFactory
from zeotwist.server.storageserver import (
    DEFAULT_INVALIDATION_QUEUE_SIZE, DEFAULT_TRANSACTION_TIMEOUT, StorageServer)

_log = Logger()

DEFAULT_LISTEN = "tcp:8100:interface=127.0.0.1"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Serve a ZODB FileStorage to zeotwist clients. Listens on "
                "tcp:8100 on the loopback interface unless --listen is given.")
    optFlags = [
        ["read-only", "r", "Serve the storage read-only."],
        ["allow-read-only-pack", None, "Let read-only client connections pack the storage."],
    ]
    optParameters = [
        ["filename", "f", "data.fs", "The FileStorage file to serve (created if missing)."],
        ["storage", "s", "1", "The name clients use for the storage."],
        ["transaction-timeout", None, DEFAULT_TRANSACTION_TIMEOUT,
         "Seconds a transaction may hold the commit lock before its client "
         "is disconnected (0 = no limit).", float],
        ["handshake-timeout", None, 5.0,
         "Seconds a new connection has to register before it is closed.", float],
        ["max-transaction-size", None, 2**31,
         "Bytes one transaction may send before it is refused.", int],
        ["invalidation-queue-size", None, DEFAULT_INVALIDATION_QUEUE_SIZE,
         "How many recent transactions the server remembers, so reconnecting "
         "clients can verify their caches instead of dropping them.", int],
        ["blob-dir", None, None,
         "The blob directory of the -f storage (blobs are off without it)."],
        ["address-file", None, None,
         "Write the addresses listened on to this file once listening."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []
        self["conflict-classes"] = []

    def opt_allow_conflict_class(self, pattern):
        """A class (dotted name, * wildcards) whose _p_resolveConflict the
        server may run, besides BTrees (repeatable)."""
        self["conflict-classes"].append(pattern)

    def opt_listen(self, description):
        """A Twisted endpoint string to listen on, e.g. tcp:8100 or
        unix:/tmp/zeo.sock (repeatable; default tcp:8100:interface=127.0.0.1)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self):
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]


class ServerService(service.Service):
    """Opens the storage, serves it on every endpoint, closes it on stop."""

    def __init__(self, filename: str, listen=(DEFAULT_LISTEN,), *, name: str = "1",
                 read_only: bool = False,
                 transaction_timeout: float | None = DEFAULT_TRANSACTION_TIMEOUT,
                 handshake_timeout: float = 5.0, max_transaction_bytes: int = 2**31,
                 address_file: str | None = None, reactor=None,
                 invalidation_queue_size: int = DEFAULT_INVALIDATION_QUEUE_SIZE,
                 stop_reactor_on_failure: bool = False, conflict_classes=(),
                 blob_dir: str | None = None, allow_read_only_pack: bool = False):
        self.filename = filename
        self.blob_dir = blob_dir
        self.listen = list(listen)
        self.storage_name = name
        self.read_only = read_only
        self.transaction_timeout = transaction_timeout or None
        self.handshake_timeout = handshake_timeout
        self.max_transaction_bytes = max_transaction_bytes
        self.address_file = address_file
        self.invalidation_queue_size = invalidation_queue_size
        self.conflict_classes = tuple(conflict_classes)
        #: read-only connections may pack (storageapi's Pack)
        self.allow_read_only_pack = allow_read_only_pack
        self._reactor = reactor
        #: True when this service *is* the process (twistd): a server that
        #: cannot listen then stops the reactor instead of idling.
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self.servers: dict = {}
        self.ports: list = []
        self.listening = defer.Deferred()

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def startService(self):
        from ZODB.FileStorage import FileStorage
        super().startService()
        storage = FileStorage(self.filename, read_only=self.read_only,
                              create=not os.path.exists(self.filename) and not self.read_only,
                              blob_dir=self.blob_dir)
        server = StorageServer(
            storage, self.storage_name, reactor=self.reactor, read_only=self.read_only,
            transaction_timeout=self.transaction_timeout,
            max_transaction_bytes=self.max_transaction_bytes,
            invalidation_queue_size=self.invalidation_queue_size,
            conflict_classes=self.conflict_classes)
        server.allow_read_only_pack = self.allow_read_only_pack
        self.servers[self.storage_name] = server
        factory = SessionFactory(self.servers, self.reactor, self.handshake_timeout)
        ds = [serverFromString(self.reactor, desc).listen(factory) for desc in self.listen]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addCallbacks(self._listening, self._listen_failed)

    def _listening(self, ports):
        self.ports = ports
        addresses = [format_address(p.getHost()) for p in ports]
        for a in addresses:
            _log.info("zeotwist serving {file} as storage {name!r} on {address}",
                      file=self.filename, name=self.storage_name, address=a)
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
    return ServerService(
        options["filename"], options["listen"], name=options["storage"],
        read_only=bool(options["read-only"]),
        transaction_timeout=options["transaction-timeout"],
        handshake_timeout=options["handshake-timeout"],
        max_transaction_bytes=options["max-transaction-size"],
        address_file=options["address-file"], stop_reactor_on_failure=True,
        invalidation_queue_size=options["invalidation-queue-size"],
        conflict_classes=options["conflict-classes"], blob_dir=options["blob-dir"],
        allow_read_only_pack=bool(options["allow-read-only-pack"]))
