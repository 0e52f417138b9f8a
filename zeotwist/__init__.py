"""zeotwist: a Twisted-native ZEO.

The server is a twistd plugin (``twistd -n zeotwist -f data.fs``); the
client is :class:`ClientStorage`, a ZODB storage, with ZEO-shaped helpers
:func:`client`, :func:`DB` and :func:`connection`.
"""
from zeotwist.client.storage import ClientStorage
from zeotwist.errors import ClientDisconnected

__all__ = ["ClientStorage", "ClientDisconnected", "client", "DB", "connection"]


def client(*args, **kw) -> ClientStorage:
    """Shorthand for ``ClientStorage(*args, **kw)`` (as ``ZEO.client``)."""
    return ClientStorage(*args, **kw)


def DB(*args, **kw):
    """A ZODB ``DB`` over a new :class:`ClientStorage` (as ``ZEO.DB``).

    Keyword arguments that ``ZODB.DB`` takes (``pool_size``, ``cache_size``
    is the *client* cache here as in ZEO...) go to the DB when prefixed as
    in ZEO: ``DB(addr, database_name=...)``.
    """
    import ZODB
    db_kw = {k: kw.pop(k) for k in list(kw) if k in _DB_ARGS}
    return ZODB.DB(ClientStorage(*args, **kw), **db_kw)


def connection(*args, **kw):
    """An open ZODB connection to a new DB over a new ClientStorage (as
    ``ZEO.connection``); closing the connection closes the DB."""
    db = DB(*args, **kw)
    conn = db.open()
    conn.onCloseCallback(db.close)
    return conn


_DB_ARGS = {
    "pool_size", "pool_timeout", "cache_size_bytes", "historical_pool_size",
    "historical_cache_size", "historical_cache_size_bytes", "historical_timeout",
    "database_name", "databases", "xrefs", "large_record_size",
}
