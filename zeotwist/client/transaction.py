"""ClientTransaction: the client side of one two-phase commit.

Records are encoded into a local buffer by the committing thread (``store``,
``check_current_serial``, ``undo``, ``restore``, ``delete_object``, blobs);
full pieces go to the reactor through ``dispatch``; ``vote``, ``finish`` and
``abort`` run on the reactor thread, on the connection the transaction
started on (a transaction never survives a reconnection: it fails with
ClientDisconnected and the application retries it).

Client-side conflict resolution (a server in ``--client-conflict-resolution``
mode): :meth:`ClientTransaction.vote_once` may fire with conflicts to
resolve; :meth:`~ClientTransaction.resolve` runs ZODB's resolution
(:mod:`zeotwist.client.resolve`) in the caller's thread, never the
reactor's, and :meth:`~ClientTransaction.revote` sends the resolved records
and votes again while the server holds the commit lock.
"""
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from ZODB.POSException import ConflictError, StorageTransactionError
from ZODB.utils import z64

from zeotwist.client.blobtxn import BlobTransaction
from zeotwist.client.resolve import ConflictResolver
from zeotwist.client.threadwrites import ThreadAnswer, thread_tag
from zeotwist.errors import ClientDisconnected
from zeotwist.twistedcompat import calls_pending
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes
from zeotwist.wire import prefetch
from zeotwist.wire.records import (
    encode_check, encode_delete, encode_restore, encode_store, encode_undo, store_head)

#: Data kept per transaction to refresh the cache with what was written.
CACHE_WRITES_LIMIT = 4 * 2**20


def _utf8(value) -> bytes:
    """Transaction user/description as bytes (ZODB code may set them as str)."""
    return value.encode("utf-8") if isinstance(value, str) else value


def _vote_answer(box, proto) -> dict:
    """A Vote answer parsed: a plain one by zeotwist.wire.commitframes, else by AMP."""
    return commitframes.read_vote_answer(box) or C.Vote.parseResponse(box, proto)


def _finish_answer(box, proto) -> dict:
    """A Finish answer parsed, likewise."""
    return commitframes.read_finish_answer(box) or C.Finish.parseResponse(box, proto)


class ClientTransaction(BlobTransaction):
    """The client side of one two-phase commit.

    ``store``/``check_current_serial`` only encode into a local buffer; full
    pieces are handed to the reactor through ``dispatch`` (a direct call in
    reactor code, ``reactor.callFromThread`` from a committing thread).  The
    first piece opens the transaction on the server; ``vote`` sends the rest.
    """

    def __init__(self, client, meta, dispatch=None):
        self.meta = meta
        self.resolved = ()
        #: resolves the conflicts a server leaves to this client (ClientStorage
        #: sets one with the record transforms of the DB it serves)
        self.resolver = ConflictResolver()
        self._client_resolved: list = []    # oids this client resolved
        self._client = client
        self._dispatch = dispatch or (lambda f, *a: f(*a))
        self._stream = bytearray()
        self._written: dict = {}
        self._written_bytes = 0
        self._proto = None
        self._failed = None
        #: the server answered the vote with conflicts or an error: it has
        #: aborted its side already, so :meth:`abort` needs no round trip
        self.ended = False

    def store(self, oid: bytes, serial: bytes | None, data: bytes) -> None:
        stream = self._stream
        stream += store_head(oid, serial or z64, data)
        stream += data          # the record's one copy on this side of the frame
        self._remember_written(oid, data)
        if len(self._stream) >= C.STORE_CHUNK:
            self._flush()

    def _remember_written(self, oid: bytes, data: bytes) -> None:
        """Keep what was written, up to a limit, to refresh the cache at finish."""
        if self._written_bytes + len(data) <= CACHE_WRITES_LIMIT:
            self._written[oid] = data
            self._written_bytes += len(data)
        else:
            self._written[oid] = None

    # -- storage API records: undo, restore, deleteObject ---------------------------
    #: restore (tpc_begin with an explicit tid): sent with TpcBegin
    tid = None
    status = " "

    def undo(self, undo_id: bytes) -> None:
        """Undo the transaction ``undo_id`` (from the undo log) in this one;
        the server answers the undone oids in Vote's ``resolved``."""
        self._record(encode_undo(undo_id))

    def restore(self, oid: bytes, serial: bytes, data, prev_txn) -> None:
        self._record(encode_restore(oid, serial, data, prev_txn))
        self._written[oid] = None            # invalidated, not cached

    def delete_object(self, oid: bytes, serial: bytes) -> None:
        self._record(encode_delete(oid, serial))
        self._written[oid] = None

    def _record(self, record: bytes) -> None:
        self._stream += record
        if len(self._stream) >= C.STORE_CHUNK:
            self._flush()

    def check_current_serial(self, oid: bytes, serial: bytes) -> None:
        self._stream += encode_check(oid, serial)

    def _flush(self) -> None:
        # The bytearray itself changes hands (never written to again): the
        # frames are cut from views of it, no copy of the stream here.
        chunk, self._stream = self._stream, bytearray()
        self._dispatch(self._send, chunk)

    def _send(self, chunk: bytes) -> None:
        if self._failed is not None:
            return
        proto = self._client.protocol
        if self._proto is None:
            if proto is None:
                self._failed = ClientDisconnected("not connected to the server")
                return
            self._proto = proto
            meta = self.meta
            proto.tpc_begin(_utf8(meta.user), _utf8(meta.description), meta.extension_bytes,
                            self.tid, None if self.status == " " else self.status)
        elif proto is not self._proto:
            self._failed = self._proto.lost_transaction("connection lost during the transaction")
            return
        view = memoryview(chunk)
        for off in range(0, len(chunk), C.STORE_CHUNK):
            proto.store_data(view[off:off + C.STORE_CHUNK])

    def vote(self) -> Deferred:
        """Send what is left and vote; fires with the oids whose data changed
        (resolved conflicts, undone objects).  Conflicts the server leaves to
        this client are resolved in a thread of the reactor's pool; one that
        cannot be resolved aborts the transaction and fails with ConflictError."""
        return self.vote_once().addCallback(self._resolve_in_pool)

    def _resolve_in_pool(self, to_resolve):
        if not to_resolve:
            return self.resolved
        reactor = self._client.reactor
        if hasattr(reactor, "getThreadPool"):
            d = deferToThreadPool(reactor, reactor.getThreadPool(), self.resolve, to_resolve)
        else:                               # a test clock: no threads
            d = maybeDeferred(self.resolve, to_resolve)
        d.addErrback(lambda f: self.abort().addBoth(lambda _: f))   # releases the lock
        return d.addCallback(self.revote)

    def vote_once(self) -> Deferred:
        """Send what is left and vote once.  Fires with the conflicts the
        server leaves to this client (``to_resolve`` items; :meth:`resolve`
        them, then :meth:`revote`), or an empty list: voted, and
        :attr:`resolved` holds the oids whose data changed."""
        pending = self._blobs_pending()     # blobs: vote after their last chunk
        if pending is not None:
            return pending.addCallback(lambda _: self.vote_once())
        if self._failed is not None:    # a piece was lost: waiting would not help
            return fail(self._failed)
        if self._proto is None and self._client.protocol is None:
            return self._client.when_connected().addCallback(lambda _: self.vote_once())
        # TpcBegin (if not sent yet), the rest of the stream and Vote leave
        # in one write: one system call and, mostly, one packet.
        proto = self._proto or self._client.protocol
        with proto.corked():
            return self._flush_and_vote()

    def _flush_and_vote(self) -> Deferred:
        """Send the rest of the store stream, then Vote; fires as :meth:`_voted`."""
        self._flush_now()
        if self._failed is not None:
            return fail(self._failed)
        d = self._proto.call_frame(C.Vote, commitframes.vote_request)
        d.addErrback(self._lost)
        return d.addCallbacks(self._voted, self._vote_refused)

    # -- the blocking API's round trips, sent by the committing thread itself ------
    # (zeotwist.client.threadwrites: one thread hand-off per round trip instead
    # of two; the answer is handled on the reactor thread as on the path above)

    def vote_from_thread(self):
        """:meth:`vote_once` from the committing thread (not the reactor's),
        for a transaction whose TpcBegin, store stream (one piece at most)
        and Vote can leave in one frame from here: a ``ThreadAnswer`` to
        ``wait()`` on, or None (nothing sent: take :meth:`vote_once`)."""
        proto = self._client.protocol
        if self._failed is not None or proto is None or self._proto not in (None, proto) \
                or self._blob_streamed or len(self._stream) > C.STORE_CHUNK \
                or calls_pending(self._client.reactor):
            return None
        # the transaction may be open already: by this thread's small blobs
        begin = b"" if self._proto is not None else self._begin_frame()
        store = commitframes.store_data(self._stream, proto.long_values) if self._stream else b""
        if begin is None or store is None:
            return None
        tag = thread_tag()
        answer = ThreadAnswer(proto, tag, "Vote", lambda box: _vote_answer(box, proto),
                              self._voted, lambda e: self._answer_failed(e, refused=True),
                              (commitframes.match_vote_answer, self._voted))
        opens, self._proto = self._proto is None, proto   # read by the reactor only later
        if not proto.ask_from_thread(b"".join((begin, store, commitframes.vote_request(tag))),
                                     answer, True):
            if opens:
                self._proto = None
            return None
        self._stream = bytearray()
        return answer

    def _begin_frame(self) -> bytes | None:
        """The TpcBegin frame a committing thread may send itself, or None
        (a restore's tid or status, or fields too long for the fast path)."""
        if self.tid is not None or self.status != " ":
            return None
        meta = self.meta
        return commitframes.tpc_begin(_utf8(meta.user), _utf8(meta.description), meta.extension_bytes)

    def finish_from_thread(self, callback=None):
        """:meth:`finish` from the committing thread, likewise: a
        ``ThreadAnswer`` (its result: the tid) or None.  Read by this
        thread (threadreads), a plain answer makes the commit visible here
        (under the protocol's send lock, so before any box that follows it
        and before a lost connection's end), the second stage of the
        event on the reactor thread (``publish_later``).  Not while a
        ``before_visible`` subscriber must run on the reactor thread (the
        reactor reads the answer then: events.py)."""
        proto = self._proto
        if proto is None or proto is not self._client.protocol \
                or calls_pending(self._client.reactor):
            return None
        tag = thread_tag()
        answer = ThreadAnswer(
            proto, tag, "Finish", lambda box: _finish_answer(box, proto),
            lambda a: self._finished(a, callback), self._answer_failed,
            (commitframes.match_finish_answer, lambda a: self._finished(a, callback, proto.publish_later)))
        return answer if proto.ask_from_thread(commitframes.finish_request(tag), answer,
                                               self._client.events.on_threads) else None

    def _answer_failed(self, error, refused=False):
        """The error a thread's Vote or Finish raises (as :meth:`_lost` and
        :meth:`_vote_refused` make it on the Deferred path)."""
        failure = Failure(error)
        try:
            self._lost(failure)
        except Exception as e:
            return e
        if refused:
            self._vote_refused(failure)
        return error

    def resolve(self, to_resolve) -> list:
        """Run ZODB's conflict resolution on ``to_resolve`` (any thread but
        the reactor's); the resolved records, or ConflictError."""
        return self.resolver.resolve_all(to_resolve)

    def revote(self, records) -> Deferred:
        """Send the resolved ``records`` (from :meth:`resolve`) and vote
        again; fires with :attr:`resolved` once voted (reactor thread)."""
        if self._client_resolved:
            return fail(StorageTransactionError("this transaction has re-voted already"))
        if self._proto is not self._client.protocol:
            return fail(self._proto.lost_transaction("connection lost during conflict resolution"))
        for oid, committed, data in records:
            self._stream += encode_store(oid, committed, data)
            self._client_resolved.append(oid)
        return self._flush_and_vote().addCallback(self._revoted)

    def _revoted(self, to_resolve):
        if to_resolve:      # the server holds the lock: one round always suffices
            raise StorageTransactionError("the server asked for a second resolution")
        return self.resolved

    def _flush_now(self) -> None:
        chunk, self._stream = self._stream, bytearray()
        self._send(chunk)

    def _vote_refused(self, failure):
        """An error answered to the vote: the server aborted the transaction
        (every failed vote ends there, server/tpc.py's ``_vote_failed``); a
        lost connection or a cancelled wait tells nothing of the server."""
        if not failure.check(ClientDisconnected, CancelledError):
            self.ended = True
        return failure

    def _voted(self, answer):
        conflicts = answer["conflicts"]
        if conflicts:
            # The server aborted it before answering: after a first refusal
            # tpc_abort needs no round trip (the commit lock keeps a refused
            # client's turn for its retry, which starts from the current
            # records below).  After a refusal in a row it still makes one:
            # a client losing to a writer that commits again (first come,
            # first served) then retries after the commits it lets it see,
            # not at once to be refused again (docs/performance.md,
            # "Cheaper refusals, strict turns").
            proto = self._proto
            self.ended, proto.refused_last = not proto.refused_last, True
            if answer.get("current"):
                self._cache_current(answer["current"])
            oid, committed, sent = conflicts[:8], conflicts[8:16], conflicts[16:24]
            try:    # ZODB names the class from the record we sent, as the server did
                err = ConflictError(oid=oid, serials=(committed, sent),
                                    data=self._written.get(oid))
            except Exception:   # not a ZODB pickle
                err = ConflictError(oid=oid, serials=(committed, sent))
            raise err
        to_resolve = answer.get("to_resolve")
        if to_resolve:
            return to_resolve
        self.resolved = list(answer["resolved"]) + self._client_resolved
        return []

    def _cache_current(self, value: bytes) -> None:
        """The conflicting objects' current records, which the retry will
        load: into the cache, as prefetched records (their invalidations
        came before this answer; a later one comes after it and ends them)."""
        proto = self._proto
        try:
            records = prefetch.decode(value)
        except ValueError as e:
            proto.protocolViolation("bad Vote answer: %s" % e)
            return
        proto.owner.prefetched(proto, records)

    def finish(self, callback=None) -> Deferred:
        """Commit; ``callback(tid)`` runs before any later invalidation is applied."""
        if self._proto is None:
            return fail(ClientDisconnected("connection lost before finish"))
        if self._proto is not self._client.protocol:
            return fail(self._proto.lost_transaction("connection lost before finish"))
        d = self._proto.call_frame(C.Finish, commitframes.finish_request)
        d.addErrback(self._lost).addCallback(self._finished, callback)
        # A caller that stops waiting (the blocking API's timeout cancels)
        # must not stop the answer from reaching the cache: the server may
        # commit all the same, and nobody else tells this client.
        waiter = Deferred()
        d.addBoth(waiter.callback)
        return waiter

    def _lost(self, failure):
        """A call of this transaction failed because its connection went:
        the server's transaction timeout instead, if the server said so."""
        if failure.check(ClientDisconnected) and self._proto.timed_out is not None:
            raise self._proto.lost_transaction("")
        return failure

    def _finished(self, answer, callback, later=None):
        tid = answer["tid"]
        self._proto.refused_last = False
        self._client.committed(tid, self._written, set(self.resolved), callback, later)
        return tid

    def abort(self) -> Deferred:
        proto = self._proto
        if self._blob_uploads is not None:      # no chunk may follow the Abort
            self._blob_uploads.cancel("blob upload stopped: the transaction was aborted")
        if self.ended or proto is None or proto is not self._client.protocol:
            return succeed(None)   # the server aborts it when the link drops
        d = proto.call(C.Abort)
        d.addErrback(lambda f: f.trap(ClientDisconnected) and None)
        return d.addCallback(lambda _: None)
