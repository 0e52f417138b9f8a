"""The commit lock's kept turns through real sessions (tests/test_commitlock.py
drives the lock alone): two raw clients over iosim, one FileStorage, a Clock.

The order of a refused client's retry (``--conflict-turn-after``), and a
client that goes away after a refused vote: no turn is kept for it, also when
its link drops while the refused vote's abort is still in the storage thread;
a retry parked behind a vote that is then aborted.
No time is asserted: the Clock moves only where a test moves it.
"""
import pytest
from twisted.internet.task import Clock
from ZODB.FileStorage import FileStorage
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64

from test_client_resolution import HeldCalls
from zeotwist.server.commitlock import PARK_GRACE
from zeotwist.server.storageserver import StorageServer
from zeotwist.testing import connect_in_memory
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_store

RETRY_WAIT, TURN_AFTER = 60.0, 1.0


class Client:
    """One raw client of ``server`` (its own in-memory link)."""

    def __init__(self, server):
        self.proto, self.session, self.pump, _ = connect_in_memory({"1": server}, server.reactor)
        self.ask(C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False)

    def send_vote(self, oid, serial, value) -> list:
        """TpcBegin, one store, Vote; the list the answer will be put in."""
        self.proto.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        self.proto.send(C.StoreData, data=encode_store(oid, serial, zodb_pickle(MinPO(value))))
        out = []
        self.proto.call(C.Vote).addBoth(out.append)
        self.pump.flush()
        return out

    def ask(self, command, **kw):
        out = []
        self.proto.call(command, **kw).addBoth(out.append)
        self.pump.flush()
        return out[0]

    def drop(self):
        self.session.transport.loseConnection()
        self.pump.flush()


@pytest.fixture
def world(tmp_path):
    threads = HeldCalls()
    server = StorageServer(FileStorage(str(tmp_path / "data.fs")), reactor=Clock(),
                           threads=threads, conflict_retry_wait=RETRY_WAIT,
                           conflict_turn_after=TURN_AFTER)
    x, y = Client(server), Client(server)
    oid = x.ask(C.NewOids, count=1)["oids"][0]
    yield server, threads, x, y, oid
    server.close()


def commit(client, oid, serial, value) -> bytes:
    voted = client.send_vote(oid, serial, value)
    assert voted and voted[0]["conflicts"] == b"", voted
    return client.ask(C.Finish)["tid"]


def refused(client, oid, serial, value) -> None:
    voted = client.send_vote(oid, serial, value)
    assert voted and voted[0]["conflicts"][:8] == oid, voted


def test_a_young_refusal_keeps_no_turn_an_old_one_does(world):
    server, _, x, y, oid = world
    tid1 = commit(x, oid, z64, 1)
    tid2 = commit(x, oid, tid1, 2)
    refused(y, oid, tid1, 2)                # y read before tid2: refused
    tid3 = commit(x, oid, tid2, 3)          # first come, first served: x again
    server.reactor.advance(TURN_AFTER)      # y, refused that long ago, retrying
    refused(y, oid, tid2, 3)                # ...from before tid3: refused again
    waiting = x.send_vote(oid, tid3, 4)     # now x waits for y's retry
    assert waiting == [] and server.lock.holder is None
    tid4 = commit(y, oid, tid3, 4)          # y's turn
    x.pump.flush()
    assert waiting and waiting[0]["conflicts"][:8] == oid   # x read before tid4
    voted = x.send_vote(oid, tid4, 5)       # x, its ticket young: parked...
    assert voted == [] and server.lock.holder is None
    server.reactor.advance(PARK_GRACE)      # ...while y may come back; it did not
    x.pump.flush()
    assert voted and voted[0]["conflicts"] == b"" and x.ask(C.Finish)["tid"] > tid4


def test_a_client_gone_after_its_refused_vote_keeps_no_turn(world):
    server, _, x, y, oid = world
    server.lock._turn_after = 0             # the turn is kept from the first refusal
    tid1 = commit(x, oid, z64, 1)
    refused(y, oid, z64, 1)
    y.drop()
    assert commit(x, oid, tid1, 2) > tid1   # not held for the retry-wait


def test_a_client_gone_while_its_refused_vote_is_aborted(world):
    """The link drops while the refused vote's tpc_abort waits in the
    storage thread: the lock is released after it, keeping no turn."""
    server, threads, x, y, oid = world
    server.lock._turn_after = 0
    tid1 = commit(x, oid, z64, 1)
    threads.held = True
    y.send_vote(oid, z64, 1)                # the vote waits in the storage thread
    (d, f, args), = threads.queue
    threads.queue.clear()
    d.callback(f(*args))                    # it runs: refused; the abort queues
    assert [q[1].__name__ for q in threads.queue] == ["abort"]
    y.drop()
    threads.release()
    assert commit(x, oid, tid1, 2) > tid1


def test_a_refused_retry_waits_instead_of_being_refused_again(world):
    """y, refused once, retries while x keeps committing (x's next vote
    always comes first): its retry waits for its turn instead of being
    granted after each of x's commits and refused as stale."""
    server, threads, x, y, oid = world
    tid = commit(x, oid, z64, 0)
    refused(y, oid, z64, 1)                 # y's first refusal: a young ticket
    retry, refusals = [], 0
    for value in range(1, 6):
        threads.held = True
        x.send_vote(oid, tid, value)        # x holds the lock (its vote in the thread)
        if retry or value == 1:             # y retries from the current record
            refusals += bool(retry)
            assert not retry or retry[0]["conflicts"][:8] == oid, retry
            retry = y.send_vote(oid, tid, value)
        threads.release()
        x.pump.flush()
        tid = x.ask(C.Finish)["tid"]
        y.pump.flush()
    assert refusals == 0 and retry == []    # parked: x came back every time
    server.reactor.advance(PARK_GRACE)      # x does not come back now
    y.pump.flush()
    assert retry[0]["conflicts"][:8] == oid     # its stale vote, refused once
    assert commit(y, oid, tid, 6) > tid


def test_a_retry_parked_behind_a_vote_that_is_aborted_goes_at_once(world):
    """x votes and then aborts: it stored nothing, so y's retry, parked
    behind x, goes without waiting for x to come back (PARK_GRACE)."""
    server, _, x, y, oid = world
    tid1 = commit(x, oid, z64, 1)
    refused(y, oid, z64, 1)                 # a young ticket
    server.reactor.advance(PARK_GRACE)      # x's commit is past its grace
    assert x.send_vote(oid, tid1, 2)[0]["conflicts"] == b""     # x holds the lock
    retry = y.send_vote(oid, tid1, 2)
    assert retry == []
    x.ask(C.Abort)
    y.pump.flush()
    assert retry and retry[0]["conflicts"] == b"" and y.ask(C.Finish)["tid"] > tid1
