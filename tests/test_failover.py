"""Several server addresses, and falling back to a read-only server.

``ClientStorage([addr1, addr2])`` tries the addresses in turn
(:class:`~zeotwist.client.failover.FailoverEndpoint`); with
``read_only_fallback=True`` a writable client settles for a read-only
server when no writable one answers, and a probe moves it back to a
writable server once one appears.  Real servers in this process (the
background reactor) on FileStorages in tmp_path, over 127.0.0.1 and Unix
sockets in tmp_path; every wait polls a real condition under a deadline.
"""
import shutil

import pytest
import transaction
from ZODB import DB
from ZODB.POSException import ReadOnlyError

from zeotwist.errors import ClientDisconnected
from zeotwist.testing import start_server

from procutil import wait_for
from test_reconnect import WAIT, client, closing, commit, connected, free_port  # noqa: F401


def test_several_addresses_use_the_live_one_and_move_when_it_dies(tmp_path, closing):
    fs = str(tmp_path / "data.fs")
    port = free_port()                           # nothing listens there, yet
    dead, live_sock = ("127.0.0.1", port), str(tmp_path / "live.sock")
    live = start_server(fs, listen="unix:" + live_sock)
    closing(live)
    cs = client([dead, live_sock])
    closing(cs)
    assert connected(cs) and cs.client.endpoint.current == 1
    assert len(live.server.sessions) == 1
    db = DB(cs)
    closing(db)
    commits = live.server.stats["commits"]
    tid1 = commit(db, x=1)
    assert live.server.stats["commits"] == commits + 1

    live.stop()
    wait_for(lambda: not connected(cs), WAIT, "the client to notice the server stop")
    first = start_server(fs, listen="tcp:%d:interface=127.0.0.1" % port)
    closing(first)
    wait_for(lambda: connected(cs), WAIT, "the client to reach the first address")
    assert cs.client.endpoint.current == 0
    assert len(first.server.sessions) == 1
    assert cs.lastTransaction() == tid1
    tid2 = commit(db, x=2)
    assert tid2 > tid1 and first.server.stats["commits"] == 1


def test_read_only_fallback_and_back_to_a_writable_server(tmp_path, closing):
    fs, copy = str(tmp_path / "data.fs"), str(tmp_path / "copy.fs")
    w_sock, ro_sock = str(tmp_path / "writable.sock"), str(tmp_path / "ro.sock")
    setup = start_server(fs, listen="unix:" + w_sock)
    cs = client(w_sock)
    db = DB(cs)
    tid1 = commit(db, x=1)
    db.close()
    setup.stop()
    shutil.copyfile(fs, copy)              # the same data, for the writable server later

    ro = start_server(fs, listen="unix:" + ro_sock, read_only=True)
    closing(ro)
    # A writable client without fallback refuses the read-only server: it
    # keeps trying (a writable server may come) until wait_timeout runs out,
    # the timeout's message naming the refusal.
    with pytest.raises(ClientDisconnected) as info:
        client([w_sock, ro_sock], wait_timeout=1)
    message = str(info.value)
    assert message.startswith("no connection to the zeotwist server within 1 s"), message
    assert "read-only" in message, message

    # With fallback it settles for it, read-only.
    cs = client([w_sock, ro_sock], read_only_fallback=True, fallback_check_interval=0.1)
    closing(cs)
    assert connected(cs) and cs.isReadOnly()
    assert cs.client.endpoint.current == 1
    db = DB(cs)
    closing(db)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    tm.begin()
    assert conn.root()["x"]["v"] == 1
    conn.root()["x"]["v"] = 2
    with pytest.raises(ReadOnlyError):
        tm.commit()
    tm.abort()
    with pytest.raises(ReadOnlyError):
        cs.new_oid()
    assert cs.lastTransaction() == tid1

    # A writable server with the same data comes up at the other address.
    writable = start_server(copy, listen="unix:" + w_sock)
    closing(writable)
    wait_for(lambda: connected(cs) and not cs.isReadOnly(), WAIT,
             "the client to move to the writable server")
    assert cs.client.endpoint.current == 0
    assert len(writable.server.sessions) == 1
    tm.begin()
    conn.root()["x"]["v"] = 2
    tm.commit()
    assert writable.server.stats["commits"] == 1
    assert cs.lastTransaction() > tid1
    tm.begin()
    assert conn.root()["x"]["v"] == 2
    tm.abort()
    conn.close()


def test_new_addr_moves_the_client(tmp_path):
    """ZEO's ``new_addr``: the client drops its server and uses another."""
    import shutil
    import transaction
    from ZODB import DB
    from zeotwist import ClientStorage
    from zeotwist.client.reactorthread import background_reactor
    from zeotwist.testing import start_server
    first = start_server(str(tmp_path / "a.fs"))
    cs = ClientStorage(first.address, reactor=background_reactor(), wait_timeout=10)
    db = DB(cs)
    second = None
    try:
        with db.transaction() as conn:
            conn.root()["where"] = "first"
        first.stop()
        shutil.copy(str(tmp_path / "a.fs"), str(tmp_path / "b.fs"))
        second = start_server(str(tmp_path / "b.fs"))
        cs.new_addr(second.address)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        assert conn.root()["where"] == "first"      # the cache verified against b
        conn.root()["where"] = "second"
        tm.commit()
        assert len(second.server.sessions) == 1
        assert second.server.last_tid == cs.lastTransaction()
        conn.close()
    finally:
        db.close()
        if second is not None:
            second.stop()


def test_a_cancelled_attempt_tries_no_further_address():
    """Cancelling ``connect`` (Client.close, or Reconnector.stop while an
    attempt is under way) cancels the address being tried and starts no
    attempt at the next one, which nobody would cancel (it connected, and
    was closed, after the client had stopped).  Endpoints whose attempts
    stay pending until cancelled stand in for unanswered addresses."""
    from twisted.internet.defer import CancelledError, Deferred
    from zeotwist.client.failover import FailoverEndpoint
    tried = []

    class Pending:
        def __init__(self, name):
            self.name = name

        def connect(self, factory):
            tried.append(self.name)
            return Deferred()

    endpoint = FailoverEndpoint([Pending("a"), Pending("b"), Pending("c")])
    outcome = []
    endpoint.connect(object()).addErrback(outcome.append).cancel()
    assert tried == ["a"]
    assert outcome[0].check(CancelledError)
