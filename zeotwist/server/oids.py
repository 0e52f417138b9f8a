"""Object ids that stay unique across a server crash.

A storage hands out oids from a counter it rebuilds, after a restart, from
the highest oid *stored*; oids handed to clients but not yet committed would
be handed out again.  :class:`OidReservation` writes a high-water mark to a
small file (fsynced) *before* handing out any oid beyond it, reserving
``step`` oids at a time, and on start moves the storage's counter past the
mark.  A crash then wastes at most ``step`` oids, and never reuses one.

Runs on the reactor thread (one small fsync per ``step`` oids).
"""
import os

from ZODB.utils import p64, u64


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
        new_oid = self.storage.new_oid
        oids = [new_oid() for _ in range(count)]
        highest = u64(max(oids))
        if highest > self._mark:
            self._mark = highest + self.step
            self._write(self._mark)
        return oids
