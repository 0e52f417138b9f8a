"""--metrics: Prometheus's text format at /metrics, scraped over real HTTP.

A real server on 127.0.0.1 with a FileStorage in a temporary folder; real
clients commit, conflict and load; the test scrapes /metrics with urllib
and parses it with prometheus_client's own parser.  Also twistd's
--metrics and the file's key.
"""
import re
import socket
import urllib.request

import pytest
import transaction
from ZODB import DB
from ZODB.POSException import ConflictError
from persistent.mapping import PersistentMapping

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.testing import start_server, start_twistd

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

LOOPBACK = "tcp:0:interface=127.0.0.1"


def scrape(url: str) -> dict:
    """``{(sample name, storage label): value}`` from one GET of ``url``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, s.labels.get("storage"), s.labels.get("le"))
            samples[key[:2] if key[2] is None else key] = s.value
    return samples


def test_counters_per_storage_over_http(tmp_path):
    running = start_server(str(tmp_path / "data.fs"), metrics=LOOPBACK)
    port = running.service.metrics_port.getHost().port
    url = "http://127.0.0.1:%d/metrics" % port
    dbs = [DB(ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10))
           for _ in range(2)]
    try:
        before = scrape(url)
        assert before[("zeotwist_connections", "1")] == 2
        c1, c2 = dbs[0].open(transaction.TransactionManager()), \
            dbs[1].open(transaction.TransactionManager())
        r1, r2 = c1.root(), c2.root()
        r2._p_activate()
        r1["x"] = 1
        r1["child"] = PersistentMapping()
        c1.transaction_manager.commit()
        r2["x"] = 2
        with pytest.raises(ConflictError):
            c2.transaction_manager.commit()
        c2.transaction_manager.abort()
        c2.transaction_manager.begin()
        assert c2.root()["x"] == 1                  # the root came with the conflict
        assert len(c2.root()["child"]) == 0         # the new child: loaded
        bad = socket.create_connection(running.address)      # a protocol violation
        bad.sendall(b"\xff\xff")
        try:
            assert bad.recv(10) == b""                          # dropped ...
        except ConnectionResetError:
            pass                                                # ... or aborted
        bad.close()
        after = scrape(url)
    finally:
        for db in dbs:
            db.close()
        running.stop()

    def grew(name, storage="1"):
        return after[(name, storage)] - before.get((name, storage), 0)
    assert grew("zeotwist_commits_total") == 1
    assert grew("zeotwist_conflicts_total") == 1
    assert grew("zeotwist_aborts_total") >= 1
    assert grew("zeotwist_loads_total") >= 1
    assert grew("zeotwist_prefetched_records_total") >= 1
    assert grew("zeotwist_invalidations_sent_total") == 1     # to the other client
    assert grew("zeotwist_received_bytes_total") > 0 and grew("zeotwist_sent_bytes_total") > 0
    assert grew("zeotwist_protocol_violations_total", "") == 1  # before registering
    assert after[("zeotwist_transaction_timeouts_total", "1")] == 0
    assert after[("zeotwist_commit_lock_waiters", "1")] == 0
    for hist in ("zeotwist_commit_lock_wait_seconds", "zeotwist_commit_lock_hold_seconds"):
        count = after[(hist + "_count", "1")]
        assert count >= 2 and count == after[(hist + "_bucket", "1", "+Inf")]
        assert after[(hist + "_sum", "1")] >= 0


def test_twistd_metrics_option(tmp_path):
    server = start_twistd(str(tmp_path / "data.fs"), "--metrics", LOOPBACK)
    try:
        match = re.search(r"zeotwist metrics at (http://127\.0\.0\.1:\d+/metrics)", server.log())
        assert match, server.log()
        samples = scrape(match.group(1))
        assert samples[("zeotwist_connections", "1")] == 0
        assert ("zeotwist_commits_total", "1") in samples
    finally:
        server.stop()


def test_metrics_port_in_use_stops_the_start(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(RuntimeError, match="cannot listen on tcp:%d" % busy.getsockname()[1]):
            start_twistd(str(tmp_path / "data.fs"), "--metrics",
                         "tcp:%d:interface=127.0.0.1" % busy.getsockname()[1], timeout=20)
    finally:
        busy.close()
