"""Responders for the storage API beyond load and commit: history, undo,
pack, iteration, restore, deleteObject, prefetch.

A mixin of :class:`~zeotwist.server.session.ServerSession` (it uses the
session's ``server``, ``read_only`` and transaction state).  Runs on the
reactor thread; slow storage work goes through ``self.server.call``.
"""
from twisted.protocols import amp


class StorageAPIResponders(amp.CommandLocator):
    pass
