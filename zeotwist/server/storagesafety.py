"""Which storages the server serves without handing client bytes to an
unpickler it does not control, and making them so.

A served storage sees client bytes: records, and the transaction's
extension.  The storage types below were read for every place they unpickle
those (see docs/security.md); the server covers each:

* ``FileStorage``: the extension stays bytes; conflict resolution goes
  through :class:`~zeotwist.server.conflicts.RestrictedResolver`; its
  ``history``/``undoLog`` (which unpickle the extension) are not called,
  the server reads the file itself (``history.fs_history``).
* ``MappingStorage``: unpickles the extension in ``tpc_finish`` (the server
  gives it the restricted, bounded decoding, done at vote) and names the
  class of a stale record in its ConflictError (``unpickling.guard_zodb``).
* ``DemoStorage`` and ``ZODB.blob.BlobStorage``: what the storages inside
  them do, and they are walked (:func:`components`) so that every one gets
  the resolver and every FileStorage is read directly.
* ``RelStorage`` (served through :class:`~zeotwist.server.mvcc.PerThreadStorage`):
  the extension stays bytes (``extension_bytes``); its vote's conflict
  resolver is routed through the served storage's resolver
  (:mod:`zeotwist.server.relstorage`); its ``history``/``undoLog`` unpickle
  extensions with the restricted decoder (``unpickling.guard_zodb``).

Anything else (a ZEO or zeotwist ClientStorage, whose history unpickles
extensions in the server process; a third-party storage) is *unaudited*:
the server refuses to serve it unless the operator says
``allow-unaudited-storage``.

Inspection of storage objects; runs where the server is built (start-up).
"""
import sys

from twisted.logger import Logger
from ZODB.FileStorage import FileStorage
from ZODB.blob import BlobStorage

from zeotwist.errors import UnauditedStorage
from zeotwist.server.mvcc import PerThreadStorage

_log = Logger()

#: storage types whose use of client bytes zeotwist has audited (exact
#: types), as ``module:name``: found in ``sys.modules``, not imported here,
#: since a storage of a class whose module was never imported cannot exist
#: (a server of a FileStorage does not pay for RelStorage's modules)
AUDITED = ("ZODB.FileStorage.FileStorage:FileStorage", "ZODB.MappingStorage:MappingStorage",
           "ZODB.DemoStorage:DemoStorage", "ZODB.blob:BlobStorage",
           "zeotwist.server.mvcc:PerThreadStorage", "relstorage.storage:RelStorage")
#: audited types that never unpickle a transaction's extension in a commit
#: (they store ``extension_bytes``), or only contain other storages
_EXTENSION_AS_BYTES = tuple(n for n in AUDITED if n != "ZODB.MappingStorage:MappingStorage")


def _is_one_of(storage, names) -> bool:
    """Whether ``type(storage)`` is exactly one of the classes ``names``."""
    module = sys.modules.get(type(storage).__module__)
    return any(type(storage) is getattr(module, n.partition(":")[2], None)
               for n in names if n.partition(":")[0] == type(storage).__module__)


def is_demo_storage(storage) -> bool:
    """Whether ``storage`` is a ``ZODB.DemoStorage.DemoStorage`` (not a
    subclass), without importing that module (a server of none never does)."""
    return _is_one_of(storage, ("ZODB.DemoStorage:DemoStorage",))


def inner(storage) -> list:
    """The storages directly inside ``storage`` (a DemoStorage's base and
    changes, the storage a BlobStorage wraps, a PerThreadStorage's root)."""
    if is_demo_storage(storage):
        return [storage.base, storage.changes]
    if type(storage) is BlobStorage:
        return [storage._BlobStorage__storage]
    if type(storage) is PerThreadStorage:
        return [storage.root]
    return []


def components(storage) -> list:
    """``storage`` and every storage inside it, outermost first."""
    found, todo = [], [storage]
    while todo:
        s = todo.pop(0)
        found.append(s)
        todo.extend(inner(s))
    return found


def unaudited(storage) -> list[str]:
    """Dotted class names of the parts of ``storage`` not audited."""
    return ["%s.%s" % (type(s).__module__, type(s).__qualname__)
            for s in components(storage) if not _is_one_of(s, AUDITED)]


def reads_extension(storage) -> bool:
    """Whether ``storage`` may unpickle a transaction's extension (anything
    but FileStorages, alone or inside the wrappers, may)."""
    return any(not _is_one_of(s, _EXTENSION_AS_BYTES) for s in components(storage))


def filestorage_of(storage):
    """The FileStorage that ``storage`` is, or that a BlobStorage wraps; or None."""
    while type(storage) is BlobStorage:
        storage = storage._BlobStorage__storage
    return storage if isinstance(storage, FileStorage) else None


def check_audited(name: str, storage, allowed: bool) -> None:
    """Refuse (UnauditedStorage) to serve ``storage`` as ``name`` if a part
    of it is unaudited, unless the operator ``allowed`` it (then log it)."""
    parts = unaudited(storage)
    if not parts:
        return
    if not allowed:
        raise UnauditedStorage(
            "%s is not audited for what it does with client bytes (it may unpickle "
            "them); serve it only with allow-unaudited-storage (see docs/security.md)"
            % ", ".join(parts))
    _log.warn("zeotwist: serving storage {name!r} with unaudited {parts} "
              "(allow-unaudited-storage): it may unpickle client bytes",
              name=name, parts=", ".join(parts))
