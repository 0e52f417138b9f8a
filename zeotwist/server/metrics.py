"""Prometheus metrics: ``--metrics tcp:9102:interface=127.0.0.1`` serves /metrics.

The exposition is prometheus_client's (the ``zeotwist[metrics]`` extra),
served by a Twisted web site at the endpoint given (:func:`metrics_site`).
Nothing is counted twice: :class:`ServerCollector` reads, at scrape time,
the counters the server keeps anyway (``StorageServer.stats``, ``.traffic``,
the commit lock's queue and timings), one sample per served storage under
the label ``storage``.  Runs on the reactor thread (scrapes are served
there, so the counters are read between events, never mid-update).
"""

PREFIX = "zeotwist_"

#: name, help, where the value is: (dict attribute of StorageServer, key)
COUNTERS = [
    ("commits", "Transactions committed.", "stats", "commits"),
    ("aborts", "Transactions aborted (by the client, a failed vote or a lost client).",
     "stats", "aborts"),
    ("conflicts", "Write conflicts reported to clients.", "stats", "conflicts"),
    ("loads", "Object records loaded on request.", "stats", "loads"),
    ("prefetched_records", "Records of referenced objects sent along with load answers "
     "(reference prefetch).", "traffic", "prefetched"),
    ("invalidations_sent", "Invalidation messages sent to clients.", "traffic",
     "invalidations"),
    ("received_bytes", "Bytes received from registered clients.", "traffic", "bytes_in"),
    ("sent_bytes", "Bytes sent to registered clients.", "traffic", "bytes_out"),
    ("transaction_timeouts", "Clients disconnected for holding the commit lock too long.",
     "traffic", "transaction_timeouts"),
    ("protocol_violations", "Connections dropped for breaking the protocol (storage \"\": "
     "before registering).", "traffic", "protocol_violations"),
]


def missing_dependency() -> str | None:
    """Why --metrics cannot work here, or None."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return ("--metrics needs prometheus_client: pip install 'zeotwist[metrics]'")
    return None


class ServerCollector:
    """A prometheus_client collector over a running ServerService."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)
        servers = dict(self.service.servers)
        factory = getattr(self.service, "factory", None)
        for name, help, where, key in COUNTERS:
            family = CounterMetricFamily(PREFIX + name, help, labels=["storage"])
            for storage, server in servers.items():
                family.add_metric([storage], getattr(server, where)[key])
            if key == "protocol_violations" and factory is not None:
                family.add_metric([""], factory.unregistered["protocol_violations"])
            yield family
        gauges = [("connections", "Client connections registered.",
                   lambda s: len(s.sessions)),
                  ("commit_lock_waiters", "Transactions waiting for the commit lock.",
                   lambda s: s.lock.waiting())]
        for name, help, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, help, labels=["storage"])
            for storage, server in servers.items():
                family.add_metric([storage], value(server))
            yield family
        for name, help, attr in [
                ("commit_lock_wait_seconds", "Time from asking for the commit lock to "
                 "getting it.", "wait_times"),
                ("commit_lock_hold_seconds", "Time the commit lock was held.", "hold_times")]:
            family = HistogramMetricFamily(PREFIX + name, help, labels=["storage"])
            for storage, server in servers.items():
                timings = getattr(server.lock, attr)
                family.add_metric([storage], timings.cumulative(), timings.sum)
            yield family


def metrics_site(service):
    """A twisted.web Site serving the service's metrics at /metrics."""
    from prometheus_client import CollectorRegistry
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(service))
    root = Resource()
    root.putChild(b"metrics", _metrics_page(registry))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None         # no access-log line per scrape
    return site


def _metrics_page(registry):
    """prometheus_client's exposition of ``registry``, rendered on the reactor
    thread.  (prometheus_client.twisted.MetricsResource would collect in
    the *global* reactor's thread pool: counters read from another thread,
    and no answer at all when the server runs on another reactor.)
    twisted.web is imported here, only when --metrics is given."""
    from twisted.web.resource import Resource

    class MetricsPage(Resource):
        isLeaf = True

        def render_GET(self, request) -> bytes:
            from prometheus_client.exposition import choose_encoder
            encoder, content_type = choose_encoder(request.getHeader("accept"))
            request.setHeader(b"Content-Type", content_type.encode())
            return encoder(registry)

    return MetricsPage()
