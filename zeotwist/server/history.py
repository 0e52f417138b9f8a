"""History and UndoLog entries, read without unpickling the extension.

Transaction extensions are never unpickled by the server: history and undo
log entries carry the extension bytes as stored and the client unpickles
them.  For a FileStorage (also inside a BlobStorage or a DemoStorage) the
entries are read from the file directly (:func:`fs_history`,
:func:`fs_undo_log`) because FileStorage's own ``history``/``undoLog``
unpickle the extension with ZODB's unrestricted unpickler; a MappingStorage
keeps the extension as the restricted unpickler decoded it at commit;
other (unaudited) storages go through their ``history``/``undoLog``.

Runs in a worker thread of the reactor's pool (the ``History`` and
``UndoLog`` responders of :mod:`zeotwist.server.storageapi`).
"""
from ZODB.POSException import POSKeyError, UndoError

from zeotwist.server.storagesafety import filestorage_of, is_demo_storage

_STANDARD_KEYS = frozenset(("id", "tid", "serial", "time", "user_name", "description",
                            "size"))


def history_entries(storage, oid: bytes, size: int) -> list:
    """History entries of ``oid`` as History sends them (a worker thread).

    A FileStorage (alone or in a BlobStorage) is read directly; a
    DemoStorage's changes and base are each read the same way, as its own
    ``history`` would (which would unpickle a FileStorage base's extensions).
    """
    fs = filestorage_of(storage)
    if fs is not None:
        return fs_history(fs, oid, size)
    if is_demo_storage(storage):
        try:
            entries = history_entries(storage.changes, oid, size)
        except POSKeyError:
            entries = []
        if len(entries) < size:
            try:
                entries += history_entries(storage.base, oid, size - len(entries))
            except POSKeyError:
                if not entries:
                    raise
        return entries
    return [_entry(d, "tid") for d in storage.history(oid, size=size)]


def undo_log_entries(storage, first: int, last: int) -> tuple:
    """``(entries, complete)`` for UndoLog (a worker thread)."""
    fs = filestorage_of(storage)
    if fs is not None:
        return fs_undo_log(fs, first, last)
    undo_log = getattr(storage, "undoLog", None)
    if undo_log is None or not storage.supportsUndo() or is_demo_storage(storage):
        return [], True
    log = undo_log(first, last)
    return [_entry(d, "id") for d in log], len(log) < last - first


def _entry(d: dict, key: str) -> dict:
    """An entry from a storage's own description dict: its (already
    unpickled) extension, pickled again - the ``extension`` key where the
    storage gives one (MappingStorage), else the keys beyond the standard ones."""
    from ZODB._compat import _protocol, dumps
    if isinstance(d.get("extension"), dict):
        extension = d["extension"]
    else:
        extension = {k: v for k, v in d.items() if k not in _STANDARD_KEYS}
    return {key: d[key], "time": d["time"], "user_name": d.get("user_name", b""),
            "description": d.get("description", b""), "size": d.get("size"),
            "extension": dumps(extension, _protocol) if extension else b""}


def fs_history(fs, oid: bytes, size: int) -> list:
    """FileStorage.history, with the extension left as stored."""
    from persistent.TimeStamp import TimeStamp
    entries = []
    with fs._lock:
        pos = fs._lookup_pos(oid)
        while len(entries) < size:
            h = fs._read_data_header(pos)
            th = fs._read_txn_header(h.tloc)
            entries.append(dict(tid=h.tid, time=TimeStamp(h.tid).timeTime(),
                                user_name=th.user, description=th.descr,
                                size=h.plen, extension=th.ext))
            if not h.prev:
                break
            pos = h.prev
    return entries


def fs_undo_log(fs, first: int, last: int) -> tuple:
    """FileStorage.undoLog(first, last), with the extension left as stored.

    Walks the transactions backwards from the end of the file as
    FileStorage's ``UndoSearch`` does, stopping at a packed transaction,
    and lets other threads at the storage every 20 transactions.
    """
    from struct import unpack
    from persistent.TimeStamp import TimeStamp
    from ZODB.FileStorage.format import TRANS_HDR, TRANS_HDR_LEN
    from ZODB.utils import u64
    entries, i = [], 0
    with fs._lock:
        if fs._pack_is_in_progress:
            raise UndoError("Undo is currently disabled for database maintenance.")
        file, pos = fs._file, fs._pos
        steps = 0
        while i < last:
            if pos < 39:
                return entries, True
            steps += 1
            if steps % 20 == 0:
                fs._lock.release()
                fs._lock.acquire()
                if fs._file is not file:             # packed meanwhile
                    raise UndoError("the storage was packed during the undo log search")
            file.seek(pos - 8)
            pos -= u64(file.read(8)) + 8
            file.seek(pos)
            tid, tl, status, ul, dl, el = unpack(TRANS_HDR, file.read(TRANS_HDR_LEN))
            if status == b"p":
                return entries, True
            if status != b" ":
                continue
            user, descr, ext = file.read(ul), file.read(dl), file.read(el)
            if i >= first:
                entries.append(dict(id=_undo_id(tid), time=TimeStamp(tid).timeTime(),
                                    user_name=user, description=descr, size=tl,
                                    extension=ext))
            i += 1
    return entries, pos < 39


def _undo_id(tid: bytes) -> bytes:
    """FileStorage's undo id for ``tid`` (base64, as its undoLog gives)."""
    from base64 import encodebytes
    return encodebytes(tid).rstrip()
