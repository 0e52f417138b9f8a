"""Packing a served storage, with a reason whenever it fails.

Runs in a thread of the reactor's pool (``StorageThreads.in_pool``), so a
long pack never holds up commits.  A server that stops asks its packs to
stop (:class:`PackRun`): one still collecting garbage (FileStorage's
first and longest phase, which only reads) gives up at its next record,
before it has changed anything; one that already copies (and then swaps
the files) is waited for.
"""
import threading

from twisted.internet.defer import Deferred

from zeotwist.errors import PackFailed, PackStopped
from zeotwist.server.unpickling import pickle_class_name


class PackRun:
    """A pack under way: :meth:`stop` asks it to give up, :meth:`wait`
    fires once it has ended (either way).  ``ended`` is for its Deferred."""

    def __init__(self):
        self.stopping = threading.Event()
        self._waiting: list = []
        self.over = False

    def stop(self) -> Deferred:
        self.stopping.set()
        return self.wait()

    def wait(self) -> Deferred:
        d = Deferred()
        if self.over:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d

    def ended(self, result):
        self.over = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        return result


def pack_storage(storage, t: float, gc, run: PackRun | None = None) -> None:
    """``storage.pack`` as of ``t`` (a pool thread).  A record garbage
    collection cannot read fails the pack with a PackFailed naming it (a
    writer can store one; every GC pack fails until it is replaced); once
    ``run`` is stopped, the next record garbage collection reads ends the
    pack with PackStopped (the storage unchanged: FileStorage writes its
    packed copy only after garbage collection)."""
    from ZODB.serialize import referencesf

    def references(data, oids=None):
        if run is not None and run.stopping.is_set():
            raise PackStopped("the server is stopping: the pack was given up before it "
                              "changed anything; pack again")
        try:
            return referencesf(data, oids)
        except Exception as e:
            raise PackFailed(unreadable_record(storage, data, e)) from None

    if gc is None:
        storage.pack(t, references)
    else:
        storage.pack(t, references, gc=gc)


def unreadable_record(storage, data: bytes, error: Exception) -> str:
    """Why garbage collection failed on ``data``, with its oid when the
    storage's current records show it (``record_iternext``)."""
    from ZODB.utils import u64
    module, name = pickle_class_name(data)
    what = "a %d-byte record%s" % (len(data), " of class %s.%s" % (module, name) if module else "")
    try:
        next_oid = None
        while True:
            oid, _, current, next_oid = storage.record_iternext(next_oid)
            if current == data:
                what = "the record of oid 0x%x (%d bytes)" % (u64(oid), len(data))
                break
            if next_oid is None:
                break
    except Exception:
        pass                      # no record_iternext: the record unnamed
    return ("garbage collection cannot read the references of %s (%s: %s); until it is "
            "replaced or deleted, pack without garbage collection (gc=False)"
            % (what, type(error).__name__, error))
