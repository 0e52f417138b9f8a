"""Feeding others' commits into a StorageServer, in memory (Clock, iosim).

A storage that reports others' commits through ``registerDB`` (as a
ClientStorage of another server does) drives the server's fan-out exactly
as its own commits: last_tid, invalidations in order, the verification
queue; a lost history drops the clients.  RelStorage's stale-snapshot
errors become retryable ConflictErrors.
"""
import pytest
from twisted.internet.task import Clock
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import ConflictError, ReadConflictError
from ZODB.utils import p64

from zeotwist.server.external import StorageDBFeed
from zeotwist.testing import connect_in_memory, memory_server
from zeotwist.wire import commands as C


class UpstreamClient(MappingStorage):
    """Stands for a ClientStorage of another server: it has other writers."""

    db = None

    def registerDB(self, db):
        self.db = db

    def is_connected(self):
        return True


@pytest.fixture
def pair():
    clock = Clock()
    storage = UpstreamClient()
    server = memory_server(storage, clock)
    proto, session, pump, recorder = connect_in_memory({"1": server}, clock)
    proto.call(C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False)
    pump.flush()
    yield storage, server, pump, recorder, session
    server.close()


def test_others_commits_reach_the_clients_in_order(pair):
    storage, server, pump, recorder, _ = pair
    assert isinstance(server.feed, StorageDBFeed) and storage.db is server.feed
    start = server.last_tid
    storage.db.invalidate(p64(10), [p64(1), p64(2)])
    storage.db.invalidate(p64(11), {p64(3): 1})
    storage.db.invalidate(p64(9), [p64(4)])            # already covered: ignored
    pump.flush()
    assert recorder.invalidations == [(p64(10), [p64(1), p64(2)]), (p64(11), [p64(3)])]
    assert server.last_tid == p64(11)
    assert server.invalidations.since(start) == {p64(1), p64(2), p64(3)}
    assert server.verify(p64(10)) == dict(last_tid=p64(11), complete=True, oids=[p64(3)])


def test_a_lost_history_drops_the_clients(pair):
    storage, server, pump, recorder, session = pair
    storage.db.invalidate(p64(10), [p64(1)])
    storage.db.invalidateCache()
    pump.flush()
    assert recorder.lost and not server.sessions            # the client was dropped
    assert server.invalidations.since(p64(10)) is None      # nothing verifiable before
    assert server.verify(p64(10))["complete"] is False


def test_relstorage_stale_snapshot_errors_are_conflicts():
    pytest.importorskip("relstorage")
    from relstorage.cache.interfaces import CacheConsistencyError
    from zeotwist.server.relstorage import translate_error
    stale = CacheConsistencyError("cache and database disagree")
    assert type(translate_error(stale, "tpc_vote")) is ConflictError
    assert type(translate_error(stale, "store")) is ConflictError
    assert type(translate_error(stale, "loadBefore")) is ReadConflictError
    assert translate_error(KeyError("other"), "tpc_vote") is None
