"""Packing a served storage, with a reason whenever it fails.

Runs in a thread of the reactor's pool (``StorageThreads.in_pool``), so a
long pack never holds up commits.
"""
from zeotwist.errors import PackFailed
from zeotwist.server.unpickling import pickle_class_name


def pack_storage(storage, t: float, gc) -> None:
    """``storage.pack`` as of ``t`` (a pool thread).  A record garbage
    collection cannot read fails the pack with a PackFailed naming it (a
    writer can store one; every GC pack fails until it is replaced)."""
    from ZODB.serialize import referencesf

    def references(data, oids=None):
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
