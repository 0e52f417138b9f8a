"""The storage API's less frequent calls on :class:`~zeotwist.client.client.Client`:
history, undo log, pack, transaction and record iteration, prefetch.

A mixin of ``Client``: it uses the client's ``call``, ``when_connected``,
``protocol``, ``cache`` and its table of loads in flight (``_loads``,
``_loaded``), so a prefetched record and a concurrent load share one round
trip.  Runs on the reactor thread.
"""
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from zeotwist.errors import ClientDisconnected
from zeotwist.wire import commands as C

_log = Logger()

#: Oids per Prefetch request (the server's limit).
PREFETCH_BATCH = 1000


def _description(entry: dict, key: str) -> dict:
    """A ZODB history (``key="tid"``) or undo log (``key="id"``) dict from a
    wire entry; the extension, stored pickled, is unpickled here (the
    client trusts its server; the server never unpickles it)."""
    from ZODB._compat import loads
    try:
        extension = loads(entry["extension"]) if entry["extension"] else {}
    except Exception:
        extension = {}
    if not isinstance(extension, dict):
        extension = {}
    d = {key: entry[key], "time": entry["time"], "user_name": entry["user_name"],
         "description": entry["description"]}
    if entry["size"] is not None:
        d["size"] = entry["size"]
    if key == "tid":          # as FileStorage.history: standard keys win
        extension.update(d)
        return extension
    d.update(extension)       # as FileStorage.undoLog: extension keys win
    return d



class StorageCallsMixin:
    def history(self, oid: bytes, size: int = 1) -> Deferred:
        """Up to ``size`` revisions of ``oid``, newest first, as ZODB's
        history dicts (``tid``, ``time``, ``user_name``, ``description``,
        ``size`` and the transaction's extension keys)."""
        d = self.call(C.History, oid=oid, size=size)
        return d.addCallback(lambda r: [_description(e, "tid") for e in r["entries"]])

    def undo_log(self, first: int, last: int) -> Deferred:
        """``(entries, complete)``: the undoable transactions ``first`` to
        ``last`` (exclusive, newest first; the server answers at most 1000 at
        a time) as ZODB's undo log dicts; ``complete`` when none is older."""
        d = self.call(C.UndoLog, first=first, last=last)
        return d.addCallback(
            lambda r: ([_description(e, "id") for e in r["entries"]], r["complete"]))

    def get_tid(self, oid: bytes) -> Deferred:
        """The tid of the current revision of ``oid`` (asks the server)."""
        return self.call(C.GetTid, oid=oid).addCallback(lambda r: r["tid"])

    def pack(self, t: float, gc: bool | None = None) -> Deferred:
        """Pack the storage as of time ``t``; fires when the server is done.
        ``gc=None`` leaves garbage collection to the storage's setting."""
        return self.call(C.Pack, time=float(t), gc=gc).addCallback(lambda _: None)

    def iterator_start(self, start: bytes | None = None, stop: bytes | None = None) -> Deferred:
        """Open an iterator over transactions ``start``..``stop`` on the server.

        Fires with a token for :meth:`iterator_next` and :meth:`iterator_close`;
        the iterator lives in this connection's session (the server drops it
        when the connection ends, or when too many are open).
        """
        proto = self.connector.protocol
        if proto is None:
            return self.when_connected().addCallback(
                lambda _: self.iterator_start(start, stop))
        d = proto.call(C.IteratorStart, start=start, stop=stop)
        return d.addCallback(lambda r: (proto, r["iid"]))

    def iterator_next(self, token) -> Deferred:
        """``(items, done)``: the next batch of the iterator; each item is a
        transaction header (``status`` set) or a record (``oid`` set) of the
        last header, in order."""
        proto, iid = token
        if proto is not self.connector.protocol:
            return fail(ClientDisconnected("connection lost during iteration"))
        return proto.call(C.IteratorNext, iid=iid).addCallback(
            lambda r: (r["items"], r["done"]))

    def iterator_close(self, token) -> None:
        """Release an iterator the caller abandons before its end."""
        proto, iid = token
        if proto is self.connector.protocol and proto.transport is not None:
            proto.send(C.IteratorClose, iid=iid)

    def record_iternext(self, next: bytes | None = None) -> Deferred:
        """``(oid, tid, data, next_oid)``: the first object at or after ``next``."""
        d = self.call(C.RecordIternext, next=next)
        return d.addCallback(lambda r: (r["oid"], r["tid"], r["data"], r["next"]))

    def prefetch(self, oids, tid: bytes) -> Deferred:
        """Load the revisions of ``oids`` valid before ``tid`` into the cache,
        up to 1000 per round trip.  A load of one of them made meanwhile waits
        for this answer instead of asking again.  Fires with the number of
        records received; nothing is done while disconnected."""
        proto = self.connector.protocol
        if proto is None:
            return succeed(0)
        wanted = []
        for oid in oids:
            key = oid + tid
            if key in self._loads or self.cache.loadBefore(oid, tid) is not None:
                continue
            self._loads[key] = []
            wanted.append(oid)
        ds = []
        for i in range(0, len(wanted), PREFETCH_BATCH):
            chunk = wanted[i:i + PREFETCH_BATCH]
            d = proto.call(C.Prefetch, oids=chunk, tid=tid)
            ds.append(d.addBoth(self._prefetched, chunk, tid))
        return gatherResults(ds).addCallback(sum)

    def _prefetched(self, result, oids, tid) -> int:
        answered = {}
        if isinstance(result, Failure):
            _log.info("zeotwist prefetch failed: {err}", err=result.getErrorMessage())
        else:
            answered = {rec["oid"]: rec for rec in result["records"]}
        for oid in oids:
            key = oid + tid
            rec = answered.get(oid)
            if rec is not None:
                data = rec["data"]
                self._loaded(None if data is None else (data, rec["start"], rec["end"]),
                             oid, key)
            elif not self._loads.get(key):
                self._loads.pop(key, None)          # left out and nobody waits
            elif self.connector.protocol is not None:           # left out: load it alone
                self.connector.protocol.load_before(oid, tid).addBoth(self._loaded, oid, key) \
                    .addErrback(lambda f: None)     # the waiters have it
            else:
                self._loaded(Failure(ClientDisconnected("connection lost")), oid, key)
        return len(answered)
