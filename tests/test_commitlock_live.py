"""The commit lock's parking with a live server (tests/test_commitlock.py drives
the lock alone): a refused client's retry is not held behind another
client's commits of other objects whose oids the lock could not read before
(a transaction over 64 KiB until issue 10's eighth session, an undo).

The lock's grace and turn are stretched to 600 s, so a retry held behind
such a commit would wait that long: the test bounds its wait for the retry
(30 s) and fails there.  No time is asserted.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64

from zeotwist.client.reactorthread import blocking_call

BIG = 40_000            # bytes per record: three make a transaction over 64 KiB


def commit(cs, stores=(), undo=None, note="") -> bytes:
    txn = TransactionMetaData(description=note)
    cs.tpc_begin(txn)
    for oid, serial, value in stores:
        cs.store(oid, serial, zodb_pickle(MinPO(value)), "", txn)
    if undo is not None:
        cs.undo(undo, txn)
    try:
        cs.tpc_vote(txn)
    except ConflictError:
        cs.tpc_abort(txn)
        raise
    return cs.tpc_finish(txn)


def _stretch(lock) -> None:
    lock._grace = lock._turn_after = 600.0


@pytest.mark.parametrize("other", ["big", "undo"])
def test_a_retry_is_not_held_behind_commits_of_other_objects(server, make_client, other):
    blocking_call(server.reactor, _stretch, server.server.lock)
    x, y, z = make_client(), make_client(), make_client()
    o, p = x.new_oid(), [z.new_oid() for _ in range(3)]
    undo_me = commit(z, [(p[0], z64, 0)], note="undo me")
    tid1 = commit(x, [(o, z64, 1)])
    with pytest.raises(ConflictError):
        commit(y, [(o, z64, 2)])            # read before tid1: a young ticket
    if other == "big":                      # z commits other objects
        commit(z, [(p[0], undo_me, "x" * BIG), (p[1], z64, "y" * BIG),
                   (p[2], z64, "z" * BIG)])
    else:
        undo_id, = [e["id"] for e in z.undoLog(0, 10)
                    if e["description"] in ("undo me", b"undo me")]
        commit(z, undo=undo_id)
    pool = ThreadPoolExecutor(1)
    try:                                    # y's retry, from tid1: not parked
        assert pool.submit(commit, y, [(o, tid1, 2)]).result(timeout=30) > tid1
    finally:
        pool.shutdown(wait=False)
