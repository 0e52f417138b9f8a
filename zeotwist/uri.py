"""The ``zeotwist://`` URI scheme for zodburi (pyramid_zodbconn and others).

Registered under the ``zodburi.resolvers`` entry point, so with the
``zodburi`` extra installed::

    zodburi.resolve_uri("zeotwist://localhost:8100?storage=main&cache_size=50MB"
                        "&connection_cache_size=20000&database_name=main")

returns ``(factory, dbkw)``: ``factory()`` opens a
:class:`~zeotwist.client.storage.ClientStorage`, ``dbkw`` are ZODB ``DB``
arguments.  The forms follow zodburi's ``zeo://``: ``zeotwist://HOST:PORT``
(port 8100 when left out; ``[::1]:8100`` for IPv6) and
``zeotwist:///path/to/socket`` for a Unix socket.  Query keys that name
ClientStorage arguments go to it; the rest (``database_name``,
``connection_cache_size``, ``connection_pool_size``, ...) are left for
zodburi, which turns them into ``DB`` arguments and refuses unknown ones.
ZEO-only keys of ``zeo://`` that zeotwist has no use for are accepted when
false (``0``, ``off``) and refused otherwise, as ClientStorage does.

The storage uses the reactor in :data:`zeotwist.config.reactor` when it is
set, as configuration files do.  Pure parsing, no I/O, until ``factory()``.
"""
from urllib.parse import parse_qsl, urlsplit

DEFAULT_PORT = 8100
_TRUE = ("1", "on", "true", "t", "yes")
_FALSE = ("", "0", "off", "false", "f", "no")


def _boolean(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise ValueError("not a boolean: %r" % value)


def _byte_size(value: str) -> int:
    v = value.strip().lower()
    for suffix, factor in (("kb", 2**10), ("mb", 2**20), ("gb", 2**30)):
        if v.endswith(suffix):
            return int(v[:-2]) * factor
    return int(v)


#: query key -> converter, for the keys that are ClientStorage arguments
CLIENT_ARGUMENTS = {
    **dict.fromkeys(("storage", "name", "client", "var", "cache_path", "blob_dir",
                     "username", "password"), str),
    **dict.fromkeys(("cache_size", "blob_cache_size"), _byte_size),
    **dict.fromkeys(("wait_timeout", "timeout", "cache_save_interval",
                     "fallback_check_interval"), float),
    **dict.fromkeys(("read_only", "read_only_fallback", "wait", "server_sync",
                     "shared_blob_dir"), _boolean),
    "blob_cache_size_check": int,
}
#: ``tls_X=...`` keys make ``tls=dict(X=...)``; ``tls=1`` is ``tls=True``
TLS_KEYS = ("ca", "cert", "key", "hostname")
#: zodburi's zeo:// keys without a zeotwist meaning: refused unless false
ZEO_ONLY = ("debug", "min_disconnect_poll", "max_disconnect_poll",
            "wait_for_server_on_startup", "drop_cache_rather_verify", "realm",
            "client_label", "demostorage")


def parse_address(uri: str):
    """``(address, query)`` of a ``zeotwist://`` URI: ``(host, port)`` or a
    socket path, and the query string."""
    scheme, _, rest = uri.partition("://")
    if scheme != "zeotwist" or not _:
        raise ValueError("not a zeotwist:// URI: %r" % (uri,))
    parts = urlsplit("http://" + rest)        # urlsplit knows netlocs of http only
    if parts.netloc:
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError("bad port in %r: %s" % (uri, e)) from None
        return (parts.hostname or "127.0.0.1", port or DEFAULT_PORT), parts.query
    if not parts.path or parts.path == "/":
        raise ValueError("no server address in %r" % (uri,))
    return parts.path, parts.query


def client_arguments(query: str) -> tuple[dict, dict]:
    """``(ClientStorage keyword arguments, the other keys)`` of a query string."""
    kw, rest, tls = {}, {}, {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        try:
            if key in CLIENT_ARGUMENTS:
                kw[key] = CLIENT_ARGUMENTS[key](value)
            elif key.startswith("tls_") and key[4:] in TLS_KEYS:
                tls[key[4:]] = value
            elif key == "tls":
                kw["tls"] = _boolean(value)
            elif key in ZEO_ONLY:
                if value.strip().lower() not in _FALSE:
                    raise ValueError("zeotwist has no %s (a ZEO option)" % key)
            else:
                rest[key] = value
        except ValueError as e:
            raise ValueError("zeotwist:// query key %s=%r: %s" % (key, value, e)) from None
    if tls:
        kw["tls"] = tls
    elif not kw.get("tls", True):
        del kw["tls"]
    return kw, rest


def resolve_uri(uri: str):
    """zodburi's resolver protocol: ``(factory, other_query_keys)``."""
    address, query = parse_address(uri)
    kw, rest = client_arguments(query)

    def factory():
        from zeotwist import config
        from zeotwist.client.storage import ClientStorage
        return ClientStorage(address, reactor=config.reactor, **kw)

    return factory, rest
