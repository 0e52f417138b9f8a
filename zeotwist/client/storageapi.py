"""ClientStorage methods for the storage API beyond load and commit:
history, undo, pack, iteration, restore, deleteObject, prefetch.

A mixin of :class:`~zeotwist.client.storage.ClientStorage`; every method
blocks the calling thread on a :class:`~zeotwist.client.client.Client` call
through ``self._call``.
"""
from ZODB.POSException import ReadOnlyError


class StorageAPIMixin:
    #: set True once undo/undoLog/undoInfo really go to the server
    _undo_implemented = False

    # -- not yet: the full storage API replaces these stubs --
    def history(self, oid, size=1):
        raise NotImplementedError("history() comes with the full storage API")

    def pack(self, t, referencesf, gc=True):
        raise NotImplementedError("pack() comes with the full storage API")

    def undoLog(self, first=0, last=-20, filter=None):
        return []

    def undoInfo(self, first=0, last=-20, specification=None):
        return []

    def undo(self, transaction_id, transaction):
        if self.isReadOnly():
            raise ReadOnlyError()
        raise NotImplementedError("undo() comes with the full storage API")

