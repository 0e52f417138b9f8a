"""The README's first example, in one process against a live server."""
import transaction
from ZODB import DB


def test_commit_and_see_it_elsewhere(make_client):
    db1 = DB(make_client())
    db2 = DB(make_client(server_sync=True))
    try:
        tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
        c1, c2 = db1.open(tm1), db2.open(tm2)
        assert "list" not in c2.root()    # c2 has a snapshot from before the commit
        c1.root()["list"] = ["a", "b", 1.0, 3]
        c1.root()["dict"] = {"a": 1, "b": 4}
        tm1.commit()
        tid = db1.storage.lastTransaction()
        # server_sync: begin() makes one round trip, so the invalidation the
        # server pushed before answering has arrived.
        tm2.begin()
        assert db2.storage.lastTransaction() == tid
        assert c2.root()["list"] == ["a", "b", 1.0, 3]
        assert c2.root()["dict"] == {"a": 1, "b": 4}
    finally:
        db1.close()
        db2.close()


def test_interfaces_declared_without_waiting(server, make_client):
    from ZODB.interfaces import IStorageUndoable
    cs = make_client(wait=False)
    # the declaration runs in the reactor turn that completes registration,
    # before anything queued after it
    cs._call(cs.client.when_connected)
    assert cs.supportsUndo() and IStorageUndoable.providedBy(cs)
