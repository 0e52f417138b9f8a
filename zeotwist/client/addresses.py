"""Turn the addresses users give into Twisted client endpoints.

Accepted: ``(host, port)`` tuples and bare ports (``8100``: 127.0.0.1, as in
ZEO), ``"host:port"``, a Unix
socket path (a string containing ``/`` or ending in ``.sock``), any Twisted
client endpoint string (``tcp:…``, ``unix:…``, ``tls:…``), an object
that already provides ``IStreamClientEndpoint``, or a *list* of any of
these (several servers, tried in turn).  Pure; no I/O.
"""
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint

_SCHEMES = ("tcp:", "tcp6:", "unix:", "tls:", "ssl:", "systemd:", "host:")


def endpoint_string(address) -> str:
    """The endpoint string for ``address`` (not for endpoint objects)."""
    if isinstance(address, int) and not isinstance(address, bool):
        address = ("127.0.0.1", address)          # a bare port, as ZEO takes it
    if isinstance(address, tuple):
        host, port = address
        return "tcp:host=%s:port=%d" % (_escape(host), int(port))
    if not isinstance(address, str):
        raise TypeError("cannot make a server address of %r" % (address,))
    if address.startswith(_SCHEMES):
        return address
    if "/" in address or address.endswith(".sock"):
        return "unix:path=%s" % _escape(address)
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit():
        return "tcp:host=%s:port=%s" % (_escape(host or "localhost"), port)
    raise ValueError("cannot make a server address of %r" % (address,))


def to_endpoint(reactor, address, tls=None):
    """One endpoint, or a FailoverEndpoint for a list of addresses; with
    ``tls``, TLS over each (see :func:`zeotwist.tls.client_endpoint`)."""
    if isinstance(address, int) and not isinstance(address, bool):
        address = ("127.0.0.1", address)
    if tls:
        from zeotwist.tls import client_endpoint
        return client_endpoint(reactor, address, tls)
    if IStreamClientEndpoint.providedBy(address):
        return address
    if isinstance(address, list):
        from zeotwist.client.failover import FailoverEndpoint
        return FailoverEndpoint([to_endpoint(reactor, a) for a in address],
                                [str(a) for a in address])
    return clientFromString(reactor, endpoint_string(address))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
