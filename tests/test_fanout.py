"""Fan-out: zeotwist servers that serve a ClientStorage of another zeotwist
server (ZEO's ``zeo-fan-out.test``, adapted).

Three real ``twistd zeotwist`` processes: an upstream serving a FileStorage
and two fan-out servers, each started with ``-C`` on a file holding a
``<zeotwistclient>`` section for the upstream.  The fan-out servers hear of
commits made through the other ones from their ClientStorage (``registerDB``)
and push them to their own clients; blobs travel through them (each
fan-out server has a blob cache of its own).  The test's clients are blocking
ClientStorages in this process.  Every wait polls a real condition under a
deadline.
"""
import os
import threading

import persistent.mapping
import pytest
import transaction
import ZODB.blob
from ZODB import DB
from ZODB.POSException import ConflictError

from zeotwist.testing import start_twistd

from procutil import child_env, wait_for
from test_reconnect import WAIT, client, closing, free_port  # noqa: F401

FANOUT_CONF = """\
%%import zeotwist
<zeotwist>
  listen tcp:0:interface=127.0.0.1
  allow-unaudited-storage true
</zeotwist>
<zeotwistclient 1>
  server %s:%d
  wait-timeout 30
  blob-dir %s
</zeotwistclient>
"""


def start_fanout(tmp_path, name, upstream):
    directory = tmp_path / name
    directory.mkdir()
    conf = directory / "server.conf"
    conf.write_text(FANOUT_CONF % (upstream.address + (str(directory / "blob-cache"),)))
    address_file = str(directory / "zeotwist.address")
    return start_twistd(str(directory / "unused.fs"), directory=str(directory), env=child_env(),
                        server_command=["zeotwist", "-C", str(conf),
                                        "--address-file", address_file])


@pytest.fixture
def servers(tmp_path):
    started = []
    upstream = start_twistd(str(tmp_path / "data.fs"), "--blob-dir", str(tmp_path / "blobs"),
                            env=child_env(), listen="tcp:%d:interface=127.0.0.1" % free_port())
    started.append(upstream)
    try:
        started.append(start_fanout(tmp_path, "f1", upstream))
        started.append(start_fanout(tmp_path, "f2", upstream))
        yield started
    finally:
        for server in reversed(started):
            status = server.stop()
            print("--- %s (exit %s) ---\n%s" % (server.addresses, status, server.log()))


def sync_root(tm, conn):
    tm.begin()
    return conn.root()


def test_two_fan_out_servers_over_one_upstream(servers, closing, tmp_path):
    upstream, f1, f2 = servers
    c0, c1, c2 = (client(s.address, blob_dir=str(tmp_path / ("cb%d" % i)))
                  for i, s in enumerate(servers))
    for cs in (c0, c1, c2):
        closing(cs)
    # the root is created after the fan-out servers started
    db0 = DB(c0)
    closing(db0)
    root_tid = c0.lastTransaction()
    for cs in (c1, c2):
        wait_for(lambda: cs.lastTransaction() >= root_tid, WAIT, "the root's creation")
    db1, db2 = DB(c1), DB(c2)
    closing(db1)
    closing(db2)
    tm1, tm2, tm0 = (transaction.TransactionManager() for _ in range(3))
    conn1, conn2, conn0 = db1.open(tm1), db2.open(tm2), db0.open(tm0)
    r1 = conn1.root()
    r1[1] = persistent.mapping.PersistentMapping(v=1000)
    r1[2] = persistent.mapping.PersistentMapping(v=-1000)
    r1[3] = ZODB.blob.Blob(b"x" * 4111222)
    for i in range(100, 300):
        r1[i] = persistent.mapping.PersistentMapping(v=0)
    tm1.commit()
    wait_for(lambda: 1 in sync_root(tm2, conn2), WAIT, "f2's client to see f1's commit")
    assert conn2.root()[1]["v"] == 1000 and conn2.root()[2]["v"] == -1000
    with conn2.root()[3].open() as f:                 # a blob through the other server
        assert f.read() == b"x" * 4111222

    def transfer(n):
        tm = transaction.TransactionManager()
        conn = db1.open(tm)
        done = 0
        while done < n:
            try:
                with tm:
                    r = conn.root()
                    r[1]["v"] -= 1
                    r[2]["v"] += 1
                done += 1
            except ConflictError:
                pass
        conn.close()

    threads = [threading.Thread(target=transfer, args=(40,)) for _ in range(2)]
    for t in threads:
        t.start()
    inconsistent = []

    def caught_up():
        r2 = sync_root(tm2, conn2)
        if r2[1]["v"] + r2[2]["v"]:
            inconsistent.append((r2[1]["v"], r2[2]["v"]))
        return r2[1]["v"] == 920
    wait_for(caught_up, 60, "f2's client to see all 80 transfers")
    for t in threads:
        t.join(60)
    assert not inconsistent         # every snapshot of f2's client is consistent

    # commits through f2 reach f1's clients and the upstream's own
    r2 = sync_root(tm2, conn2)
    r2[1]["v"] = 5
    tm2.commit()
    last = c2.lastTransaction()
    wait_for(lambda: sync_root(tm1, conn1)[1]["v"] == 5, WAIT, "f1's client to see f2's commit")
    wait_for(lambda: sync_root(tm0, conn0)[1]["v"] == 5, WAIT, "the upstream's client")
    assert c1.lastTransaction() == c0.lastTransaction() == last
    # a fresh connection to either fan-out server starts from the newest state
    fresh = client(f1.address)
    closing(fresh)
    assert fresh.lastTransaction() == last

    # the upstream restarts: the fan-out servers reconnect, and commits made
    # through it afterwards still reach their clients
    port = upstream.address[1]
    upstream.stop()
    servers[0] = upstream = start_twistd(str(tmp_path / "data.fs"), "--blob-dir",
                                         str(tmp_path / "blobs"), env=child_env(),
                                         listen="tcp:%d:interface=127.0.0.1" % port)
    wait_for(lambda: c0.client.is_connected, WAIT, "the upstream's client to reconnect")
    r0 = sync_root(tm0, conn0)
    r0[1]["v"] = 6
    tm0.commit()
    wait_for(lambda: sync_root(tm1, conn1)[1]["v"] == 6, WAIT, "f1's client after the restart")
    wait_for(lambda: sync_root(tm2, conn2)[1]["v"] == 6, WAIT, "f2's client after the restart")
    for conn in (conn0, conn1, conn2):
        conn.close()
