"""Client-side conflict resolution: ZODB's ``tryToResolveConflict``, run locally.

A server in ``--client-conflict-resolution`` mode answers a vote whose
stores conflict with the records needed to resolve them (see the ``Vote``
command in docs/protocol.md): for each conflicting store, the record sent,
the committed revision's record and the record of the revision the store
was based on.  :class:`ConflictResolver` runs ZODB's own
``ZODB.ConflictResolution.tryToResolveConflict`` on them with this
process's classes (its ``find_global``, its ``_p_resolveConflict``), the
records served from what the server sent instead of ``loadSerial`` calls.
It returns the resolved record, or raises the ``ConflictError`` ZODB would
(naming the class, carrying the oid and serials).

Pure: no I/O.  Runs in whatever thread calls it: the committing thread for
``ClientStorage``, a thread of the reactor's pool for the Deferred API; it
runs the application's ``_p_resolveConflict``, never on the reactor thread.
"""
from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.POSException import POSKeyError


def _same(data: bytes) -> bytes:
    return data


class ConflictResolver:
    """Resolves conflicts as ZODB's ConflictResolvingStorage would.

    ``transform``/``untransform`` are the record transforms of the storage
    wrapper ZODB registered (``registerDB``): identity for a plain DB,
    compression for zc.zlibstorage and the like.
    """

    def __init__(self, transform=_same, untransform=_same):
        self.transform, self.untransform = transform, untransform

    @classmethod
    def for_wrapper(cls, wrapper) -> "ConflictResolver":
        """The resolver for what ZODB passed to ``registerDB`` (a DB or an
        adapter; its ``transform_record_data``/``untransform_record_data``)."""
        return cls(getattr(wrapper, "transform_record_data", _same),
                   getattr(wrapper, "untransform_record_data", _same))

    def resolve(self, item: dict) -> bytes:
        """The resolved record for one ``to_resolve`` item of a Vote answer."""
        records = _Records(item, self.transform, self.untransform)
        return records.tryToResolveConflict(
            item["oid"], item["committed"], item["serial"], item["data"],
            item["committed_data"])

    def resolve_all(self, items) -> list:
        """``[(oid, committed_serial, resolved_record), ...]`` for all ``items``;
        raises ConflictError at the first that cannot be resolved."""
        return [(item["oid"], item["committed"], self.resolve(item)) for item in items]


class _Records(ConflictResolvingStorage):
    """What ``tryToResolveConflict`` asks of a storage, answered from one item."""

    def __init__(self, item: dict, transform, untransform):
        self._item = item
        self._crs_transform_record_data = transform
        self._crs_untransform_record_data = untransform

    def loadSerial(self, oid: bytes, serial: bytes) -> bytes:
        item = self._item
        if oid == item["oid"]:
            if serial == item["committed"]:
                return item["committed_data"]
            if serial == item["serial"] and item["old_data"] is not None:
                return item["old_data"]
        raise POSKeyError(oid)
