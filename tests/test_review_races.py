"""Adversarial checks of the commit and load fast paths (issue 10's review).

Each test pins one way an optimisation could weaken MVCC, durability or the
error answers: a real server on 127.0.0.1 with a FileStorage in a temp dir,
blocking clients on zeotwist's background reactor (tests/conftest.py).
"""
import threading
import time

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, z64

from zeotwist.client.transaction import ClientTransaction
from zeotwist.errors import ClientDisconnected


def _commit(cs, oid, serial, data):
    t = TransactionMetaData()
    cs.tpc_begin(t)
    cs.store(oid, serial, data, "", t)
    cs.tpc_vote(t)
    return cs.tpc_finish(t)


def _wait_for(predicate, what: str, limit: float = 30.0):
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("never happened: " + what)
        time.sleep(0.005)


@pytest.mark.parametrize("path", ["thread", "reactor"])
def test_a_finish_answered_after_the_client_gave_up_still_reaches_its_cache(
        server, make_client, monkeypatch, path):
    """The server commits a transaction whose Finish the client stopped
    waiting for (its timeout): when the answer arrives after all, the cache
    must learn of the commit, or it serves the old revision as current for
    good (nobody else sends this client its own commit's invalidation)."""
    if path == "reactor":   # the Deferred path, not the committing thread's
        monkeypatch.setattr(ClientTransaction, "finish_from_thread",
                            lambda self, callback=None: None)
    served = server.server
    served.inline_commit_bytes = 0          # tpc_finish in the worker thread
    storage = served.storage
    entered, release = threading.Event(), threading.Event()
    real_finish = storage.tpc_finish

    def held_finish(*args, **kw):
        entered.set()
        release.wait(60)
        return real_finish(*args, **kw)

    cs = make_client(timeout=1.0)
    first = _commit(cs, z64, z64, b"one")
    assert cs.load(z64) == (b"one", first)
    monkeypatch.setattr(storage, "tpc_finish", held_finish)
    t = TransactionMetaData()
    cs.tpc_begin(t)
    cs.store(z64, first, b"two", "", t)
    cs.tpc_vote(t)
    try:
        with pytest.raises(ClientDisconnected):
            cs.tpc_finish(t)        # the client gives up waiting
        assert entered.is_set()
    finally:
        release.set()
    _wait_for(lambda: served.last_tid != first, "the held commit finished")
    second = served.last_tid
    cs.tpc_abort(t)                 # as ZODB does after tpc_finish raised
    with pytest.raises(Exception):
        cs.load(p64(999))           # a round trip: the Finish answer came before it
    assert cs.lastTransaction() == second
    assert cs.load(z64) == (b"two", second)
