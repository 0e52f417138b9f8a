"""Turn the addresses users give into Twisted client endpoints.

Accepted: ``(host, port)`` tuples and bare ports (``8100``: 127.0.0.1, as in
ZEO), ``"host:port"``, a Unix
socket path (a string containing ``/`` or ending in ``.sock``), any Twisted
client endpoint string (``tcp:…``, ``unix:…``, ``tls:…``), an object
that already provides ``IStreamClientEndpoint``, or a *list* of any of
these (several servers, tried in turn); with ``tls``, TLS over each
(:func:`client_endpoint`, the connection creator from :mod:`zeotwist.tls`).
Plain addresses become :class:`~zeotwist.client.plainendpoint.PlainEndpoint`
objects; only endpoint strings and TLS import Twisted's ``endpoints``.
Pure; no I/O.
"""
from twisted.internet.interfaces import IStreamClientEndpoint

from zeotwist.client.failover import FailoverEndpoint
from zeotwist.client.plainendpoint import PlainEndpoint
from zeotwist.errors import UsageError
from zeotwist.tls import client_creator, is_tls_endpoint, require_tls

_SCHEMES = ("tcp:", "tcp6:", "unix:", "tls:", "ssl:", "systemd:", "host:")


def endpoint_string(address) -> str:
    """The endpoint string for ``address`` (not for endpoint objects)."""
    if isinstance(address, int) and not isinstance(address, bool):
        address = ("127.0.0.1", address)          # a bare port, as ZEO takes it
    if isinstance(address, tuple):
        host, port = address
        return "tcp:host=%s:port=%d" % (_escape(host), int(port))
    if not isinstance(address, str):
        raise UsageError("cannot make a server address of %r" % (address,))
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
    ``tls``, TLS over each (see :func:`client_endpoint`)."""
    if isinstance(address, int) and not isinstance(address, bool):
        address = ("127.0.0.1", address)
    if tls:
        return client_endpoint(reactor, address, tls)
    if IStreamClientEndpoint.providedBy(address):
        return address
    if isinstance(address, list):
        return FailoverEndpoint([to_endpoint(reactor, a) for a in address],
                                [str(a) for a in address])
    text = endpoint_string(address)
    if isinstance(address, str) and address.startswith(_SCHEMES):
        return _from_string(reactor, text)
    if isinstance(address, tuple):
        return PlainEndpoint(reactor, address[0], int(address[1]))
    if text.startswith("unix:"):
        return PlainEndpoint(reactor, path=address)
    host, _, port = address.rpartition(":")
    return PlainEndpoint(reactor, host or "localhost", int(port))


def _from_string(reactor, text: str):
    from twisted.internet.endpoints import clientFromString
    if is_tls_endpoint(text):
        require_tls("the address %r" % (text,))
    return clientFromString(reactor, text)


def client_endpoint(reactor, address, tls):
    """The endpoint for ClientStorage's ``addr`` with TLS on top (``tls`` as
    for :func:`zeotwist.tls.client_creator`; the host name checked is the address's host
    unless ``tls`` names one).  A list gives a FailoverEndpoint of TLS
    endpoints.  An address that is already a ``tls:``/``ssl:`` endpoint
    string is refused (TLS twice)."""
    if isinstance(address, list):
        return FailoverEndpoint([client_endpoint(reactor, a, tls) for a in address],
                                [str(a) for a in address])
    if IStreamClientEndpoint.providedBy(address):
        endpoint = address
    else:
        text = endpoint_string(address)
        if text.startswith(("tls:", "ssl:")):
            raise ValueError("%r is a TLS endpoint already; leave out tls=" % (address,))
        endpoint = _from_string(reactor, text)
    from twisted.internet.endpoints import wrapClientTLS
    creator = client_creator(tls, _host_of(address))
    return wrapClientTLS(creator, endpoint, clock=reactor)


def _host_of(address) -> str | None:
    """The host name of a ``(host, port)``, ``host:port`` or ``tcp:`` address."""
    if isinstance(address, tuple):
        return str(address[0])
    if not isinstance(address, str):
        return None
    if address.startswith(("tcp:", "tcp6:", "host:")):
        parts = _split_unescaped(address.split(":", 1)[1])
        for part in parts:
            if part.startswith("host="):
                return part[5:]
        positional = [p for p in parts if "=" not in p]
        return positional[0] if positional else None
    if "/" in address or address.endswith(".sock") or ":" not in address:
        return None
    host = address.rpartition(":")[0]
    return host.strip("[]") or "localhost"


def _split_unescaped(text: str) -> list:
    parts, current, chars = [], [], iter(text)
    for c in chars:
        if c == "\\":
            current.append(next(chars, ""))
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
