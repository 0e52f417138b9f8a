"""Several ``twistd zeotwist -C`` processes over one RelStorage database.

The configuration file is the plain one a user writes (``%import
relstorage``, a ``<relstorage>`` section, no extra keys).  A client with
both servers' addresses fails over when its server is killed; the killed
server restarts and its new clients start from the newest state.
docs/scale-out.md.
"""
import os

import pytest
import transaction
from ZODB import DB
from ZODB.POSException import ConflictError

from zeotwist.errors import ClientDisconnected
from zeotwist.testing import start_twistd

from procutil import child_env, wait_for
from test_reconnect import WAIT, client, closing, free_port  # noqa: F401

CONF = """\
%%import relstorage
<zeotwist>
  listen tcp:%(port)d:interface=127.0.0.1
</zeotwist>
<relstorage>
  <postgresql>
    dsn %(dsn)s
  </postgresql>
</relstorage>
"""


def start(tmp_path, name, port, dsn):
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    conf = directory / "server.conf"
    conf.write_text(CONF % dict(port=port, dsn=dsn))
    return start_twistd(str(directory / "unused.fs"), directory=str(directory), env=child_env(),
                        server_command=["zeotwist", "-C", str(conf), "--address-file",
                                        str(directory / "zeotwist.address")])


@pytest.fixture
def twistds():
    started = []
    yield started
    for server in started:
        status = server.stop()
        print("--- %s (exit %s) ---\n%s" % (server.addresses, status, server.log()))


def add(db, n):
    """root['counter'] += n, retried as applications retry (conflicts, a
    server gone until the client is on the next address)."""
    tm = transaction.TransactionManager()
    for _ in range(100):
        conn = db.open(tm)
        try:
            with tm:
                root = conn.root()
                root["counter"] = root.get("counter", 0) + n
            return
        except (ConflictError, ClientDisconnected):
            continue
        finally:
            conn.close()
    raise AssertionError("no commit in 100 attempts")


def counter(db):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        with tm:
            return conn.root().get("counter")
    finally:
        conn.close()


def test_failover_between_servers_and_a_killed_server_restarted(pg_dsn, tmp_path, twistds,
                                                               closing):
    p1, p2 = free_port(), free_port()
    twistds.append(start(tmp_path, "s1", p1, pg_dsn))
    twistds.append(start(tmp_path, "s2", p2, pg_dsn))
    a1, a2 = ("127.0.0.1", p1), ("127.0.0.1", p2)
    watcher = client(a1)
    closing(watcher)
    mover = client([a2, a1], wait_timeout=30)          # on server 2 while it lives
    closing(mover)
    db_w = DB(watcher)
    closing(db_w)
    wait_for(lambda: mover.lastTransaction() >= watcher.lastTransaction(), WAIT, "the root")
    db_m = DB(mover)
    closing(db_m)
    for _ in range(5):
        add(db_m, 1)
    wait_for(lambda: counter(db_w) == 5, WAIT, "server 1's client to see server 2's commits")

    twistds[1].process.kill()                          # SIGKILL server 2
    twistds[1].process.wait(10)
    for _ in range(5):
        add(db_m, 1)                                   # through server 1 now
    assert mover.client.endpoint.current == 1
    wait_for(lambda: counter(db_w) == 10, WAIT, "the watcher to see the moved client's commits")

    twistds[1] = start(tmp_path, "s2", p2, pg_dsn)     # restarted on the same port
    fresh = client(a2)
    closing(fresh)
    assert fresh.lastTransaction() == watcher.lastTransaction()
    db_f = DB(fresh)
    closing(db_f)
    assert counter(db_f) == 10
    add(db_f, 100)
    wait_for(lambda: counter(db_m) == counter(db_w) == 110, WAIT,
             "both other clients to see the restarted server's commit")
