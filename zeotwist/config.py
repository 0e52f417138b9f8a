"""ZConfig support: the ``<zeotwistclient>`` storage section.

``%import zeotwist`` loads ``zeotwist/component.xml``, which declares the
section; :class:`ZeotwistClient` is its datatype and opens a
:class:`~zeotwist.client.storage.ClientStorage`, so that::

    %import zeotwist
    <zodb>
      <zeotwistclient>
        server localhost:8100
      </zeotwistclient>
    </zodb>

works with ``ZODB.config.databaseFromURL`` as ZEO's ``<clientstorage>`` does.
The keys are listed in docs/config.md.

Which reactor a configured ClientStorage uses: the module attribute
:data:`reactor` when it is set, else ClientStorage's default (the global
reactor if it is running, else zeotwist's private background reactor; see
:mod:`zeotwist.client.reactorthread`).  Configuration text cannot name a
reactor object, so a program (or a test) that needs a particular one sets
``zeotwist.config.reactor`` before opening the configuration.

Parsing runs in the caller's thread and does no I/O; ``open()`` connects.
"""
from ZConfig.datatypes import inet_connection_address
from ZODB.config import BaseConfig

from zeotwist.client.addresses import endpoint_string
from zeotwist.tls import is_tls_endpoint, require_tls

#: The reactor ClientStorages opened from configuration are given; None
#: leaves the choice to ClientStorage (see the module docstring).
reactor = None


class _NoReactor:
    """Stands in for a reactor while an endpoint string is only checked."""


def server_address(value: str):
    """The ``server`` key: what :class:`ClientStorage` takes as ``addr``.

    * ``host:port`` (or ``[ipv6]:port``, or a bare ``port`` meaning
      127.0.0.1, as ZConfig's ``socket-connection-address``) becomes the
      tuple ``(host, port)``;
    * a Unix socket path (containing ``/`` or ending in ``.sock``) and a
      Twisted client endpoint string (``tcp:...``, ``unix:...``, ``tls:...``)
      are kept as given, after checking that they parse.

    Raises ValueError (a ZConfig data conversion error) for anything else.
    """
    value = value.strip()
    if not value:
        raise ValueError("empty server address")
    try:
        text = endpoint_string(value)
    except ValueError:
        text = None
    if text is not None and text.startswith("unix:") and text != value:
        return value                                  # a socket path
    if text is not None and text == value:            # an endpoint string
        if is_tls_endpoint(text):
            require_tls("the address %r" % (value,))
        from twisted.internet.endpoints import clientFromString   # not for plain addresses
        try:
            clientFromString(_NoReactor(), text)
        except Exception as e:   # whatever the endpoint parser objects to
            raise ValueError("cannot use endpoint string %r: %s: %s"
                             % (value, type(e).__name__, e)) from None
        return value
    host, port = inet_connection_address(value)
    if port is None:
        raise ValueError("server address %r has no port" % (value,))
    return host, port


class ZeotwistClient(BaseConfig):
    """The datatype of ``<zeotwistclient>``: opens a ClientStorage."""

    def open(self):
        from zeotwist.client.storage import ClientStorage
        c = self.config
        servers = c.server
        extra = {}
        if c.client:
            extra.update(client=c.client, var=c.var)
        if c.read_only_fallback:
            extra.update(read_only_fallback=True)
        if c.allow_older_server:
            extra.update(allow_older_server=True)
        if c.blob_dir:
            extra.update(blob_dir=c.blob_dir, shared_blob_dir=c.shared_blob_dir,
                         blob_cache_size=c.blob_cache_size,
                         blob_cache_size_check=c.blob_cache_size_check)
        if c.username is not None or c.password is not None:
            extra.update(username=c.username, password=c.password)
        tls = {k: v for k, v in (("ca", c.tls_ca), ("cert", c.tls_cert), ("key", c.tls_key),
                                 ("hostname", c.tls_server_hostname)) if v}
        if tls or c.tls:
            extra.update(tls=tls or True)
        return ClientStorage(
            servers[0] if len(servers) == 1 else list(servers),
            storage=c.storage, cache_size=c.cache_size, name=c.name,
            read_only=c.read_only, wait_timeout=c.wait_timeout, wait=c.wait,
            timeout=c.timeout, server_sync=c.server_sync, reference_prefetch=c.reference_prefetch,
            reactor=reactor, **extra)
