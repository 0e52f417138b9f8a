"""``connect()``: the entry point of the Deferred API for reactor programs.

    client = await zeotwist.connect(reactor, "tcp:localhost:8100")
    data, tid = await client.load(oid)
    client.events.subscribe(lambda inv: print(inv.tid, inv.oids))

Runs on the reactor thread.
"""
from twisted.internet.defer import Deferred

from zeotwist import logbridge
from zeotwist.client.addresses import to_endpoint
from zeotwist.client.cache import ClientCache
from zeotwist.client.client import Client
from zeotwist.client.storage import ClientStorage

DEFAULT_CACHE_SIZE = 20 * 2**20


def connect(reactor, endpoint, storage: str = "1", *, read_only: bool = False,
            cache_size: int = DEFAULT_CACHE_SIZE, wait_timeout: float = 30.0,
            username: str | None = None, password: str | None = None, tls=None,
            reference_prefetch: bool = True) -> Deferred:
    """Connect to a zeotwist server; a Deferred that fires with a registered
    :class:`~zeotwist.client.client.Client`, or fails with ClientDisconnected
    after ``wait_timeout`` seconds.

    :param endpoint: a Twisted client endpoint string (``"tcp:host:port"``,
        ``"unix:/path"``, ``"tls:..."``), ``"host:port"``, ``(host, port)``,
        or an ``IStreamClientEndpoint``.
    :param reference_prefetch: take reference prefetch (see ClientStorage).
    :param username, password, tls: log in and use TLS, as for
        :class:`~zeotwist.client.storage.ClientStorage` (docs/tls-auth.md).
    """
    logbridge.install()
    credentials = None if username is None and password is None else (username, password)
    client = Client(reactor, to_endpoint(reactor, endpoint, tls), storage=storage,
                    read_only=read_only, cache=ClientCache(cache_size),
                    wait_timeout=wait_timeout, credentials=credentials,
                    reference_prefetch=reference_prefetch,
                    storage_factory=ClientStorage.from_client)
    client.start()
    d = client.when_connected(wait_timeout)

    def failed(failure):
        client.stop()
        return failure

    return d.addCallbacks(lambda _: client, failed)
