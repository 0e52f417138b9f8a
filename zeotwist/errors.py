"""The exceptions zeotwist raises, rooted at ZODB's ``StorageError``.

Where ZODB already has a class (``ConflictError``, ``ReadOnlyError``,
``POSKeyError``, ``StorageTransactionError``) we raise ZODB's own, so code
written against ZEO catches the same things.  The wire-code table that maps
these classes to AMP error codes lives only in :mod:`zeotwist.wire.codes`.
"""
from ZODB.POSException import ConflictError, StorageError, StorageTransactionError
from transaction.interfaces import TransientError

__all__ = [
    "ZeotwistError",
    "ClientDisconnected",
    "TransactionTimeout",
    "VoteTimeout",
    "ProtocolError",
    "RemoteProtocolError",
    "ProtocolVersionError",
    "WrongServer",
    "UnknownStorage",
    "TransactionTooLarge",
    "TransactionStateError",
    "PickleRefused",
    "OidOutOfRange",
    "PackFailed",
    "PackStopped",
    "FinishFailed",
    "UnauditedStorage",
    "ReactorThreadError",
    "StorageServerError",
    "CacheLockedError",
    "BlobPathRefused",
    "Unauthorized",
    "NotLoggedIn",
    "UsageError",
    "StartupFailed",
    "ServerOlderThanCache",
    "ForeignCacheFile",
    "WrongStateError",
    "TLSConfigError",
    "BlobCacheLocked",
    "RefusedGlobal",
    "ConfigError",
    "StorageOpenError",
    "UnsupportedStorage",
]


class ZeotwistError(StorageError):
    """Base class of the errors that are zeotwist's own."""


class ClientDisconnected(ZeotwistError, TransientError):
    """The client is not connected to a server, or lost it mid-call.

    A ``TransientError``: a transaction that fails with it can be retried
    once the client has reconnected.
    """


class TransactionTimeout(ClientDisconnected, StorageTransactionError):
    """The server's transaction timeout aborted this transaction: it held
    its storage's commit lock (from the vote on) for more than
    :attr:`timeout` seconds, and the server dropped the connection.

    Nothing was committed.  Also a :class:`ClientDisconnected` (what such a
    transaction failed with before; a ``TransientError``: retried by
    ``transaction.manager.attempts()``), and a ``StorageTransactionError``.
    """

    TEXT = ("transaction timeout: %s aborted this transaction, which held the commit "
            "lock for over %g s (its transaction-timeout); nothing was committed")

    def __init__(self, timeout: float, server: str = "the server"):
        self.timeout = timeout
        self.server = server
        super().__init__(self.TEXT % (server, timeout))

    def __reduce__(self):
        return type(self), (self.timeout, self.server)


class VoteTimeout(TransactionTimeout):
    """The server's vote timeout aborted this transaction: it did not vote
    within :attr:`timeout` seconds of its ``tpc_begin`` (the server's
    ``vote-timeout``), and the server dropped the connection.

    Nothing was committed.  A :class:`TransactionTimeout` (so also a
    ``ClientDisconnected``, retried by ``transaction.manager.attempts()``).
    """

    TEXT = ("vote timeout: %s aborted this transaction, which did not vote within %g s "
            "of its tpc_begin (its vote-timeout); nothing was committed")


class ProtocolError(ZeotwistError):
    """A peer broke the wire protocol (bad frame, bad argument, bad order)."""


class RemoteProtocolError(ProtocolError):
    """The *other* side sent something malformed; the connection is dropped."""


class ProtocolVersionError(ProtocolError):
    """Client and server speak different protocol versions."""


class WrongServer(ProtocolError):
    """The address answers, but not as a zeotwist server: a ZEO server (its
    first bytes are ZEO's protocol announcement) or something else."""


class UnknownStorage(ZeotwistError):
    """The server serves no storage under the requested name."""


class TransactionTooLarge(ZeotwistError):
    """A transaction sent more data than the server's per-transaction cap."""


class TransactionStateError(ZeotwistError, StorageTransactionError):
    """A server transaction was asked to move where its state table
    (:mod:`zeotwist.server.txnstate`) has no move: a command at the wrong
    time, or a bug in the server's own sequencing."""


class PickleRefused(ZeotwistError):
    """The server will not unpickle these client bytes: they name a global
    its allow-list does not hold, or would build more than its limits allow
    (zeotwist.server.unpickling)."""


class OidOutOfRange(ZeotwistError, StorageTransactionError):
    """A client stored an oid the server never handed out, so high that the
    storage's oid counter would run out (zeotwist.server.oids.OidRange)."""


class PackFailed(ZeotwistError):
    """A pack failed; the text says why (a record garbage collection cannot
    read names it, and what to do)."""


class PackStopped(PackFailed):
    """The server stopped while the pack collected garbage: the pack was
    given up before it changed anything; pack again."""


class FinishFailed(ZeotwistError):
    """The storage's tpc_finish failed and the transaction is not committed
    (one it committed anyway is answered as committed)."""


class UnauditedStorage(ZeotwistError):
    """The server was asked to serve a storage whose handling of client
    bytes zeotwist has not audited (see docs/security.md), without the
    operator's explicit ``allow-unaudited-storage``."""


class BlobPathRefused(ZeotwistError):
    """The server refused a shared-blob-directory file name: it does not
    name a regular file inside the server's blob directory's ``tmp`` area."""


class Unauthorized(ZeotwistError):
    """The server refused a login (wrong name, password or certificate), or
    the logged-in user has no rights on the storage asked for."""


class NotLoggedIn(Unauthorized):
    """The server authenticates its clients and this one sent a command
    before logging in (see docs/tls-auth.md)."""


class ServerOlderThanCache(ZeotwistError):
    """The server's last transaction is older than this client's cache: its
    storage was restored from an older copy (or it serves another
    database).  The client refuses it rather than go back in time; a client
    made with ``allow_older_server=True`` drops its cache and uses it."""


class StorageServerError(ZeotwistError):
    """The server failed in a way it had no specific error code for."""


class CacheLockedError(ZeotwistError):
    """The persistent client cache file is in use by another client."""


class UsageError(ZeotwistError, TypeError):
    """zeotwist was called with arguments it does not support: a programming
    error in the calling code (also a ``TypeError``, as such errors were before)."""


class WrongStateError(ZeotwistError, RuntimeError):
    """zeotwist was called at a time it does not allow (a file not opened, a
    lock asked for twice, a reactor not running): a programming error in
    the calling code (also a ``RuntimeError``, as such errors were before)."""


class TLSConfigError(ZeotwistError, ValueError):
    """A certificate, key or CA file cannot be used (missing, not PEM, key
    not matching the certificate); ``str()`` names the file."""


class BlobCacheLocked(ZeotwistError):
    """A blob cache directory stayed locked (by another thread or process)
    for longer than the storage's timeout."""


class RefusedGlobal(ConflictError):
    """Server-side conflict resolution refused a record: it named a global
    the resolver will not load.  The client sees an ordinary ConflictError."""


class ForeignCacheFile(ZeotwistError):
    """The persistent cache file's path holds a file that is not a zeotwist
    cache file (a ZEO cache, anything else): zeotwist leaves it alone."""


class ReactorThreadError(RuntimeError):
    """A blocking zeotwist call was made on the reactor thread it needs.

    Waiting there would deadlock; use the Deferred API instead.
    """


class StartupFailed(ZeotwistError):
    """The server could not start (listen, open a storage, read its TLS
    files); ``str()`` is the one line said on the terminal and in the log."""


class ConfigError(ZeotwistError, ValueError):
    """The server's configuration cannot be used: a configuration file that
    cannot be read or makes no sense, or settings that contradict each
    other.  ``str()`` says what is wrong (also a ``ValueError``, as the
    settings' errors were before)."""


class StorageOpenError(ZeotwistError):
    """A storage the server was told to serve cannot be opened; the server
    does not start.  ``str()`` names the storage and the cause."""

    def __init__(self, name, what, cause):
        self.storage_name, self.what, self.cause = name, what, cause
        super().__init__("cannot open storage %r (%s): %s: %s"
                         % (name, what, type(cause).__name__, cause))


class UnsupportedStorage(ZeotwistError, TypeError):
    """The server was given a storage of a kind it cannot serve (an
    ``IMVCCStorage`` other than RelStorage); also a ``TypeError``, as it
    was before."""
