"""ClientStorage methods for blobs (IBlobStorage): the blob cache directory,
streamed transfers, and the shared blob directory mode.

A mixin of :class:`~zeotwist.client.storage.ClientStorage`.
"""


class BlobStorageMixin:
    pass
