"""Object ids that stay unique across a server crash.

A storage hands out oids from a counter it rebuilds, after a restart, from
the highest oid *stored*; oids handed to clients but not yet committed would
be handed out again.  :class:`OidReservation` writes a high-water mark to a
small file (fsynced) *before* handing out any oid beyond it, reserving
``step`` oids at a time, and on start moves the storage's counter past the
mark.  A crash then wastes at most ``step`` oids, and never reuses one.

:class:`OidRange` keeps clients from exhausting the oid space: a storage
continues counting from the highest oid stored, so one store of oid
``0xffffffffffffffff`` would make every later ``new_oid`` overflow, for
good (the storage finds that oid again when it restarts).

Runs on the reactor thread (one small fsync per ``step`` oids), except
:meth:`OidRange.check` (the storage thread, at vote).
"""
import os
import struct

from ZODB.BaseStorage import BaseStorage
from ZODB.POSException import ReadOnlyError
from ZODB.utils import p64, u64

from zeotwist.errors import OidOutOfRange

#: The highest oid a client may store that the server has not handed out:
#: the top half of the oid space stays for the storage's counter, however
#: high a writer goes (storages hand oids out from 0 upward).
OID_CEILING = 2**63 - 1
OID_MAX = 2**64 - 1


class OidRange:
    """Which oids a client may store: up to :data:`OID_CEILING`, or up to
    the highest oid this server (or the storage's counter) has handed out."""

    def __init__(self, highest_issued: int = 0):
        self.highest = max(OID_CEILING, highest_issued)

    def issued(self, oids: list) -> None:
        """The server handed ``oids`` out (reactor thread)."""
        if oids:
            self.highest = max(self.highest, u64(max(oids)))

    def check(self, oid: bytes) -> None:
        """Raise OidOutOfRange unless a client may store ``oid``."""
        if u64(oid) > self.highest:
            raise OidOutOfRange(
                "oid 0x%016x was never handed out and is above 0x%016x: storing it "
                "would use up the storage's oids" % (u64(oid), OID_CEILING))


def storage_counter(storage) -> int:
    """The highest oid ``storage``'s counter has reached, where it shows it
    (FileStorage, MappingStorage: ``_oid``; DemoStorage: ``_next_oid``)."""
    counter = getattr(storage, "_oid", None)
    if isinstance(counter, bytes) and len(counter) == 8:
        return u64(counter)
    counter = getattr(storage, "_next_oid", None)
    return counter if isinstance(counter, int) else 0


class OidReservation:
    def __init__(self, storage, path: str, step: int = 10_000):
        self.storage = storage
        self.path = path
        self.step = step
        self._mark = 0
        saved = self._read()
        if saved and hasattr(storage, "set_max_oid"):
            storage.set_max_oid(p64(saved))
        self._mark = saved

    @property
    def mark(self) -> int:
        """No oid up to this one is handed out again, even after a crash."""
        return self._mark

    def _read(self) -> int:
        try:
            with open(self.path, "rb") as f:
                data = f.read(8)
        except FileNotFoundError:
            return 0
        return u64(data) if len(data) == 8 else 0

    def _write(self, mark: int) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(p64(mark))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def new_oids(self, count: int) -> list:
        oids = allocate(self.storage, count)
        highest = u64(max(oids))
        if highest > self._mark:
            self._mark = min(highest + self.step, OID_MAX)
            self._write(self._mark)
        return oids


def allocate(storage, count: int) -> list:
    """``count`` new oids from ``storage``: ``count`` calls of its
    ``new_oid``, or, for a storage whose ``new_oid`` is ZODB's
    ``BaseStorage.new_oid`` (FileStorage, MappingStorage), the same oids
    taken at once: its counter moved by ``count`` under its lock, the lock
    that ``new_oid`` and ``set_max_oid`` (a store of a higher oid) take.
    100 ``new_oid`` calls cost about 57 us of the reactor thread, the
    batch about 8 (docs/performance.md)."""
    if getattr(type(storage), "new_oid", None) is not BaseStorage.new_oid \
            or not isinstance(getattr(storage, "_oid", None), bytes):
        new_oid = storage.new_oid
        return [new_oid() for _ in range(count)]
    if storage._is_read_only:
        raise ReadOnlyError()
    with storage._lock:
        first = u64(storage._oid) + 1
        last = first + count - 1
        if last > OID_MAX:
            raise OverflowError("no oids left after 0x%016x" % (first - 1))
        storage._oid = p64(last)
    return list(map(_PACK, range(first, last + 1)))


_PACK = struct.Struct(">Q").pack
