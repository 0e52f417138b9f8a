"""zeotwist: a Twisted-native ZEO.

The server is a twistd plugin (``twistd -n zeotwist -f data.fs``); the
client is :class:`ClientStorage`, a ZODB storage, with ZEO-shaped helpers
:func:`client`, :func:`DB` and :func:`connection`.  As in ZEO, every
argument of these helpers goes to :class:`ClientStorage`.  Reactor programs
use :func:`connect` (the Deferred API), invalidation events, and
:class:`DatabasePool` to run ZODB work in worker threads.
"""
from typing import TYPE_CHECKING

import zeotwist.client       # the (empty) package, first: the function client() below wins
from zeotwist.errors import ClientDisconnected, ReactorThreadError

if TYPE_CHECKING:            # for type checkers and editors; at run time, __getattr__
    from zeotwist.client.connect import connect
    from zeotwist.client.events import Invalidation
    from zeotwist.client.interaction import DatabasePool
    from zeotwist.client.storage import ClientStorage

#: The client's names, imported when first asked for: a server process
#: (``twistd zeotwist``) imports ``zeotwist.errors`` and so this package, and
#: should not pay for the client's modules (docs/performance.md, memory).
_LAZY = {
    "connect": "zeotwist.client.connect",
    "Invalidation": "zeotwist.client.events",
    "DatabasePool": "zeotwist.client.interaction",
    "ClientStorage": "zeotwist.client.storage",
}

__all__ = ["__version__", "ClientStorage", "ClientDisconnected", "ReactorThreadError", "client", "DB",
           "connection", "connect", "DatabasePool", "Invalidation"]


def client(*args, **kw) -> "ClientStorage":
    """Shorthand for ``ClientStorage(*args, **kw)`` (as ``ZEO.client``)."""
    from zeotwist.client.storage import ClientStorage
    return ClientStorage(*args, **kw)


def DB(*args, **kw):
    """A ZODB ``DB`` over ``ClientStorage(*args, **kw)`` (as ``ZEO.DB``).

    Every argument, keyword arguments included, goes to
    :class:`ClientStorage` (so ``cache_size`` is the client cache's size in
    bytes); the ``DB`` gets ZODB's defaults.  For ``DB`` options such as
    ``pool_size``, call ``ZODB.DB(zeotwist.client(...), pool_size=...)``.
    If the ``DB`` cannot be made, the storage is closed.
    """
    import ZODB
    storage = client(*args, **kw)
    try:
        return ZODB.DB(storage)
    except Exception:
        storage.close()
        raise


def connection(*args, **kw):
    """An open connection to ``DB(*args, **kw)`` (as ``ZEO.connection``).

    Closing the connection closes the DB and its storage.
    """
    db = DB(*args, **kw)
    try:
        return db.open_then_close_db_when_connection_closes()
    except Exception:
        db.close()
        raise


def __getattr__(name: str):
    """``zeotwist.__version__``: the installed distribution's version, read
    from its metadata when first asked for; and the client's names of
    :data:`_LAZY`, imported when first asked for."""
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            value = version("zeotwist")
        except PackageNotFoundError:      # imported from a checkout, not installed
            value = "0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError("module 'zeotwist' has no attribute %r" % name)
