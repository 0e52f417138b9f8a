"""Responders for blobs (IBlobStorage): streamed transfers and the shared
blob directory mode.

A mixin of :class:`~zeotwist.server.session.ServerSession`.  Runs on the
reactor thread; file work goes through ``self.server.call``.
"""
from twisted.protocols import amp


class BlobResponders(amp.CommandLocator):
    pass
