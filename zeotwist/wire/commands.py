"""Every AMP command zeotwist speaks, both directions: the protocol in one file.

docs/protocol.md describes each command; tests/test_protocol_doc.py checks
that document against :data:`ALL_COMMANDS`.  Arguments are typed and checked
while the box is parsed (8-byte ids, bounded sizes); nothing is pickled.
Every command carries the full error map of :mod:`zeotwist.wire.codes`, so a
server-side exception never drops the connection as an unmapped AMP error.
"""
from twisted.protocols import amp

from zeotwist.wire.arguments import BigBytes, BoxList, Id8, IdList, LongBytes
from zeotwist.wire.codes import ERRORS

#: Bumped whenever a command changes incompatibly.
PROTOCOL_VERSION = "zeotwist-1"

#: Largest piece of the store stream one StoreData message carries.
STORE_CHUNK = 2**20


class _Command(amp.Command):
    errors = dict(ERRORS)


# -- client -> server ---------------------------------------------------------

class Register(_Command):
    """Handshake: protocol version, storage name, access mode, and whether
    the client takes prefetched records in LoadBefore answers."""
    commandName = b"Register"
    arguments = [
        (b"protocol", amp.Unicode()),
        (b"storage", amp.Unicode()),
        (b"read_only", amp.Boolean()),
        (b"prefetch", amp.Boolean(optional=True)),
        # this peer reads long entries (zeotwist.wire.boxlayout); absent: False
        (b"long_values", amp.Boolean(optional=True)),
        # this peer understands TransactionTimedOut; absent: False (the
        # server drops it without a word, as servers before that command did)
        (b"timeout_notice", amp.Boolean(optional=True)),
        # this peer understands TransactionTimedOut's limit "vote"; absent:
        # False (a vote timeout drops it without a word, as before)
        (b"vote_timeout_notice", amp.Boolean(optional=True)),
    ]
    response = [
        (b"last_tid", Id8()),
        (b"read_only", amp.Boolean()),
        (b"supports_undo", amp.Boolean()),
        (b"name", amp.Unicode()),
        (b"interfaces", amp.ListOf(amp.Unicode())),
        (b"long_values", amp.Boolean(optional=True)),
    ]


class Verify(_Command):
    """Cache verification after (re)connecting: what changed after ``tid``.

    ``complete`` is False when the server's recent-invalidations queue no
    longer reaches back to ``tid`` (the client must drop its cache); ``oids``
    is then empty.  ``last_tid`` is the server's last transaction: if it is
    older than ``tid``, the server's storage is older than the client's
    cache (restored from a backup) and the client must not trust its cache.
    """
    commandName = b"Verify"
    arguments = [(b"tid", Id8())]
    response = [
        (b"last_tid", Id8()),
        (b"complete", amp.Boolean()),
        (b"oids", IdList()),
    ]


class LoadBefore(_Command):
    """The revision of ``oid`` that was current just before ``tid``; with
    ``prefetch`` (:mod:`zeotwist.wire.prefetch`), records it references."""
    commandName = b"LoadBefore"
    arguments = [(b"oid", Id8()), (b"tid", Id8())]
    response = [
        (b"found", amp.Boolean()),
        (b"data", BigBytes(optional=True)),
        (b"start", Id8(optional=True)),
        (b"end", Id8(optional=True)),
        (b"prefetch", amp.String(optional=True)),
    ]


class LoadSerial(_Command):
    """The data of the revision of ``oid`` written by transaction ``serial``."""
    commandName = b"LoadSerial"
    arguments = [(b"oid", Id8()), (b"serial", Id8())]
    response = [(b"data", BigBytes())]


class NewOids(_Command):
    """Allocate ``count`` (at most 1000) new object ids."""
    commandName = b"NewOids"
    arguments = [(b"count", amp.Integer())]
    response = [(b"oids", IdList())]


class TpcBegin(_Command):
    """Open a transaction on this connection (one-way; errors surface at Vote)."""
    commandName = b"TpcBegin"
    requiresAnswer = False
    arguments = [
        (b"user", BigBytes()),
        (b"description", BigBytes()),
        (b"extension", BigBytes()),
        # restore (IStorageRestoreable): the transaction's own tid and status
        (b"tid", Id8(optional=True)),
        (b"status", amp.Unicode(optional=True)),
    ]


class StoreData(_Command):
    """A piece of the transaction's store stream (one-way).

    The stream is a sequence of records, cut into pieces anywhere:
    ``b"s" oid serial len(>I) data`` stores a revision, ``b"c" oid serial``
    is checkCurrentSerialInTransaction.
    """
    commandName = b"StoreData"
    requiresAnswer = False
    arguments = [(b"data", BigBytes())]


#: One conflict a Vote leaves to the client (``--client-conflict-resolution``):
#: the store of ``data`` based on ``serial`` met the committed revision
#: ``committed``; ``committed_data`` and ``old_data`` are the records of
#: those two revisions (``old_data`` absent if the server has no such
#: revision any more).  Records are the storage's bytes, opaque here.
CONFLICT_TO_RESOLVE = [
    (b"oid", Id8()),
    (b"serial", Id8()),
    (b"committed", Id8()),
    (b"data", BigBytes()),
    (b"committed_data", BigBytes()),
    (b"old_data", BigBytes(optional=True)),
]


class Vote(_Command):
    """Take the commit lock, apply the stores, vote.

    Answers the oids whose conflicts the server resolved and, packed as
    ``oid committed_serial sent_serial`` triples, those it could not.  A
    client that ``can_resolve`` may instead get ``to_resolve`` from a server
    in client-resolution mode: it resolves those, sends one store per
    conflict (based on ``committed``) and sends Vote again; the server
    holds the commit lock meanwhile.  With conflicts, a client that takes
    prefetched records also gets the conflicting objects' current records
    (``current``), so its retry needs no load.
    """
    commandName = b"Vote"
    arguments = [(b"can_resolve", amp.Boolean(optional=True))]
    response = [(b"resolved", IdList()), (b"conflicts", BigBytes()),
                (b"to_resolve", BoxList(CONFLICT_TO_RESOLVE, optional=True)),
                # with conflicts, to a client that takes prefetched records:
                # the conflicting objects' current records (zeotwist.wire.prefetch)
                (b"current", amp.String(optional=True))]


class Finish(_Command):
    """Commit the voted transaction; answers its tid."""
    commandName = b"Finish"
    arguments = []
    response = [(b"tid", Id8())]


class Abort(_Command):
    """Abort this connection's transaction, at whatever stage it is."""
    commandName = b"Abort"
    arguments = []
    response = []


class LastTransaction(_Command):
    """The id of the last transaction committed (also a cheap ping)."""
    commandName = b"LastTransaction"
    arguments = []
    response = [(b"tid", Id8())]


class Info(_Command):
    """Storage size and length, and the server's status counters."""
    commandName = b"Info"
    arguments = []
    response = [
        (b"name", amp.Unicode()),
        (b"size", amp.Integer()),
        (b"length", amp.Integer()),
        (b"last_tid", Id8()),
        (b"connections", amp.Integer()),
        (b"waiting", amp.Integer()),
        (b"commits", amp.Integer()),
        (b"aborts", amp.Integer()),
        (b"conflicts", amp.Integer()),
        (b"client_resolutions", amp.Integer()),
        (b"loads", amp.Integer()),
        (b"start_time", amp.Float()),
    ]


# -- storage API --------------------------------------------------------------

#: Fields of one transaction description (history and undo log entries).
#: ``extension`` is the transaction's extension exactly as stored (ZODB's
#: pickled dict); the client unpickles it, the server never does.
_DESCRIPTION = [
    (b"time", amp.Float()),
    (b"user_name", BigBytes()),
    (b"description", BigBytes()),
    (b"size", amp.Integer(optional=True)),
    (b"extension", BigBytes()),
]


class History(_Command):
    """Up to ``size`` revisions of ``oid``, newest first."""
    commandName = b"History"
    arguments = [(b"oid", Id8()), (b"size", amp.Integer())]
    response = [(b"entries", BoxList([(b"tid", Id8())] + _DESCRIPTION))]


class UndoLog(_Command):
    """Undoable transactions ``first`` to ``last`` (exclusive), newest first."""
    commandName = b"UndoLog"
    arguments = [(b"first", amp.Integer()), (b"last", amp.Integer())]
    response = [(b"entries", BoxList([(b"id", BigBytes())] + _DESCRIPTION)),
                (b"complete", amp.Boolean())]


class GetTid(_Command):
    """The tid of the current revision of ``oid``."""
    commandName = b"GetTid"
    arguments = [(b"oid", Id8())]
    response = [(b"tid", Id8())]


class Pack(_Command):
    """Pack the storage as of ``time``; answered when the pack is done."""
    commandName = b"Pack"
    arguments = [(b"time", amp.Float()), (b"gc", amp.Boolean(optional=True))]
    response = []


class IteratorStart(_Command):
    """Open a transaction iterator over [start, stop] on the server."""
    commandName = b"IteratorStart"
    arguments = [(b"start", Id8(optional=True)), (b"stop", Id8(optional=True))]
    response = [(b"iid", amp.Integer())]


#: One item of an iterator batch: a transaction header (``status`` present)
#: or one of its data records (``oid`` present), in iteration order.
_ITERATOR_ITEM = [
    (b"tid", Id8()),
    (b"status", amp.Unicode(optional=True)),
    (b"user", BigBytes(optional=True)),
    (b"description", BigBytes(optional=True)),
    (b"extension", BigBytes(optional=True)),
    (b"oid", Id8(optional=True)),
    (b"data", BigBytes(optional=True)),
    (b"data_txn", Id8(optional=True)),
]


class IteratorNext(_Command):
    """The next batch of iterator ``iid``; ``done`` once it is exhausted."""
    commandName = b"IteratorNext"
    arguments = [(b"iid", amp.Integer())]
    response = [(b"items", BoxList(_ITERATOR_ITEM)), (b"done", amp.Boolean())]


class IteratorClose(_Command):
    """Release iterator ``iid`` on the server (one-way)."""
    commandName = b"IteratorClose"
    requiresAnswer = False
    arguments = [(b"iid", amp.Integer())]


class RecordIternext(_Command):
    """The current record of the first object at or after ``next``."""
    commandName = b"RecordIternext"
    arguments = [(b"next", Id8(optional=True))]
    response = [(b"oid", Id8()), (b"tid", Id8()), (b"data", BigBytes()),
                (b"next", Id8(optional=True))]


class Prefetch(_Command):
    """``loadBefore(oid, tid)`` for many oids in one round trip."""
    commandName = b"Prefetch"
    arguments = [(b"oids", IdList()), (b"tid", Id8())]
    response = [(b"records", BoxList([
        (b"oid", Id8()),
        (b"data", BigBytes(optional=True)),
        (b"start", Id8(optional=True)),
        (b"end", Id8(optional=True)),
    ]))]


# -- blobs -------------------------------------------------------------------

#: Bytes of blob one StoreBlobChunk carries (one AMP value), and the most one
#: LoadBlobChunk answers (two values).  Both stay below glibc's 128 KiB
#: threshold for mmap-ed allocations: larger buffers, made and freed per
#: chunk, cost a page fault per 4 KiB and halved the throughput.
BLOB_CHUNK = 60000
BLOB_LOAD_CHUNK = 120000
#: Between peers that read long entries (Register's ``long_values``) chunks
#: are bigger, one long entry each: the most bytes one StoreBlobChunk
#: carries to such a server, and one LoadBlobChunk with ``length`` answers.
#: Fewer, bigger chunks cut the per-chunk work (a box, a reactor turn, a
#: thread hop) eightfold; glibc keeps reusing buffers of this size once one
#: has been freed (its mmap threshold adapts), measured: docs/performance.md.
BLOB_CHUNK_LONG = 2**20
BLOB_LOAD_MAX = 2**20


class StoreBlobChunk(_Command):
    """The next bytes of this transaction's blob file number ``blob`` (one-way).

    Blob files are numbered 0, 1, ... in the order their first message
    arrives; a file's chunks come together, in order.  The store stream's
    storeBlob/restoreBlob records name the file by its number.
    """
    commandName = b"StoreBlobChunk"
    requiresAnswer = False
    arguments = [(b"blob", amp.Integer()), (b"data", BigBytes())]


class StoreBlobShared(_Command):
    """Shared blob directory: blob file ``blob`` is the file ``name`` (one-way).

    ``name`` is relative to the server's blob directory and must resolve to
    a regular file directly inside its temporary area (``tmp/``); the server
    takes the file over at once.  Anything else is refused at Vote.
    """
    commandName = b"StoreBlobShared"
    requiresAnswer = False
    arguments = [(b"blob", amp.Integer()), (b"name", amp.Unicode())]


class LoadBlobChunk(_Command):
    """``length`` (at most BLOB_LOAD_MAX; absent: BLOB_LOAD_CHUNK) bytes of
    blob (``oid``, ``serial``) from ``offset``, fewer only at its end."""
    commandName = b"LoadBlobChunk"
    arguments = [(b"oid", Id8()), (b"serial", Id8()), (b"offset", amp.Integer()),
                 (b"length", amp.Integer(optional=True))]
    response = [(b"data", LongBytes()), (b"size", amp.Integer())]


# -- authentication -----------------------------------------------------------

class Login(_Command):
    """Log in before Register, on a server that authenticates its clients.

    With ``password``: the user ``username`` of the server's password file.
    Without: the identity of the client's TLS certificate (its common name,
    which ``username``, if given, must equal).  Answers the user logged in
    as; ``""`` from a server that does not authenticate.
    """
    commandName = b"Login"
    arguments = [
        (b"username", amp.Unicode(optional=True)),
        (b"password", amp.Unicode(optional=True)),
    ]
    response = [(b"user", amp.Unicode())]


# -- server -> client ---------------------------------------------------------

class Invalidate(_Command):
    """Transaction ``tid`` changed ``oids`` (one-way, in commit order)."""
    commandName = b"Invalidate"
    requiresAnswer = False
    arguments = [(b"tid", Id8()), (b"oids", IdList())]


class TransactionTimedOut(_Command):
    """The server's transaction timeout aborted this connection's
    transaction, which held the commit lock for over ``timeout`` seconds
    (one-way); with ``limit`` "vote", its vote timeout: the transaction
    did not vote within ``timeout`` seconds of its TpcBegin.  Nothing was
    committed; the server closes the connection right after.  Sent only to
    a client whose Register said ``timeout_notice`` (for ``limit`` "vote":
    ``vote_timeout_notice``), and only when the transaction was surely
    aborted (not while the storage was finishing it)."""
    commandName = b"TransactionTimedOut"
    requiresAnswer = False
    arguments = [(b"timeout", amp.Float()),
                 (b"limit", amp.Unicode(optional=True))]   # absent: the transaction timeout


CLIENT_COMMANDS = [Register, Verify, LoadBefore, LoadSerial, NewOids, TpcBegin,
                   StoreData, Vote, Finish, Abort, LastTransaction, Info,
                   # storage API
                   History, UndoLog, GetTid, Pack, IteratorStart, IteratorNext,
                   IteratorClose, RecordIternext, Prefetch]
CLIENT_COMMANDS += [StoreBlobChunk, StoreBlobShared, LoadBlobChunk]   # blobs
CLIENT_COMMANDS += [Login]                                           # authentication
SERVER_COMMANDS = [Invalidate, TransactionTimedOut]
ALL_COMMANDS = CLIENT_COMMANDS + SERVER_COMMANDS
