"""The server's half of client-side conflict resolution (``--client-conflict-resolution``).

In that mode the server unpickles no client record (see
:func:`zeotwist.server.conflicts.refuse_resolution`): a store based on a
stale serial raises ConflictError in the storage.  When the client's
``Vote`` says it resolves conflicts itself (every zeotwist client does), the
server does not abort: it keeps the storage transaction begun and the commit
lock held, and answers the vote with, for each conflicting store, the
serial it was based on, the committed serial and that revision's record,
the record of the revision it was based on and the record the client sent.
All of them are bytes read from the storage or the store stream, never
interpreted here.  The client resolves them (ZODB's ``tryToResolveConflict``
with its own classes), sends one store per conflict, based on the committed
serial, and votes again.  :class:`Resolution` checks that second stream:
exactly one store for each conflict, on its committed serial, nothing
else; anything else is a protocol violation (the transaction is aborted,
the client dropped).  Since the lock is held throughout, no other commit
can come between, so the resolved stores cannot conflict again: there is
one resolution round, never more.  The commit lock's timeout runs from the
lock's grant, across the round trip, so a client that never re-votes is
dropped like any other holder that stalls.

Runs in the storage thread (``add``, ``apply``) and the reactor thread
(``items``, read once the vote's storage work is done).
"""
from ZODB.POSException import POSKeyError

from zeotwist.errors import RemoteProtocolError
from zeotwist.wire.records import STORE


class Resolution:
    """The conflicts one transaction leaves to its client, and their replacement."""

    def __init__(self):
        self._items: dict = {}       # oid -> the Vote answer's item for it

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, storage, oid: bytes, serial: bytes, committed: bytes, data: bytes) -> None:
        """Store ``(oid, serial, data)`` conflicted with ``committed`` (storage thread)."""
        item = dict(oid=oid, serial=serial, committed=committed, data=data,
                    committed_data=storage.loadSerial(oid, committed), old_data=None)
        try:
            item["old_data"] = storage.loadSerial(oid, serial)
        except POSKeyError:
            pass                     # packed away, or no such revision: the client
        self._items[oid] = item      # cannot resolve then, and raises ConflictError

    def items(self) -> list:
        """The ``to_resolve`` items of the Vote answer, in store order."""
        return list(self._items.values())

    def apply(self, records, store) -> None:
        """Check the re-vote's ``records`` and ``store(oid, serial, data)`` each.

        ``records`` yields ``(kind, oid, serial, payload)``.  Raises RemoteProtocolError unless they are exactly one store per
        conflict, based on its committed serial.
        """
        left = dict(self._items)
        for kind, oid, serial, payload in records:
            item = left.pop(oid, None)
            if kind != STORE or item is None:
                raise RemoteProtocolError(
                    "re-vote record %r for %s is not the resolution of a conflict"
                    % (kind, oid.hex()))
            if serial != item["committed"]:
                raise RemoteProtocolError(
                    "resolution of %s based on %s, not the committed %s"
                    % (oid.hex(), serial.hex(), item["committed"].hex()))
            store(oid, serial, payload)
        if left:
            raise RemoteProtocolError(
                "re-vote resolves %d conflict(s) fewer than reported" % len(left))
        self._items = {}
