"""An invalidation to a client whose vote waits for the commit lock is kept
back and written with what the client gets next (as a rule its vote's
answer, in one write), never after anything else (zeotwist/server/output.py,
``send_frame``); a client that waits for nothing gets it at once."""
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64, z64

from zeotwist.server.storagecalls import SynchronousCalls
from zeotwist.server.storageserver import StorageServer
from zeotwist.testing import call_in_memory, connect_in_memory
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes
from zeotwist.wire.records import encode_store


class Calls(SynchronousCalls):
    """Storage calls inline, or, while ``later`` is set, answered when the test says."""

    later = False

    def __init__(self):
        self.waiting = []

    def inline_or_in_order(self, f, *args):
        if not self.later:
            return self.in_order(f, *args)
        d = Deferred()
        self.waiting.append(lambda: d.callback(f(*args)))
        return d


@pytest.fixture
def world(tmp_path):
    clock, calls = Clock(), Calls()
    server = StorageServer(FileStorage(str(tmp_path / "data.fs")), reactor=clock, threads=calls)
    links = []
    for _ in range(3):
        client, session, pump, _ = connect_in_memory({"1": server}, clock)
        call_in_memory(client, pump, C.Register, protocol=C.PROTOCOL_VERSION,
                       storage="1", read_only=False)
        written = []
        session.transport.write = written.append
        links.append((session, written))
    yield server, calls, links
    server.close()


def vote(session, oid: int, tag: bytes) -> None:
    session.dataReceived(commitframes.tpc_begin(b"", b"", b"") + commitframes.store_data(
        encode_store(p64(oid), z64, b"data")) + commitframes.vote_request(tag))


def test_a_waiting_voters_invalidation_goes_out_with_its_vote_answer(world):
    server, _, [(a, to_a), (b, to_b), (c, to_c)] = world
    vote(a, 1, b"va")
    vote(b, 2, b"vb")                       # waits for the lock
    assert b.awaits_lock() and to_b == []
    a.dataReceived(commitframes.finish_request(b"fa"))
    tid = server.last_tid
    invalidation = commitframes.invalidate(tid, [p64(1)])
    assert to_c == [invalidation]           # waits for nothing: at once
    # b was granted the lock as a released it, and voted: one write, in order
    assert to_b == [invalidation + commitframes.vote_answer(b"vb", [])]
    assert not b.awaits_lock()


def test_kept_back_while_the_vote_waits_then_written_before_anything_else(world):
    server, calls, [(a, to_a), (b, to_b), (c, to_c)] = world
    vote(a, 1, b"va")
    vote(b, 2, b"vb")
    calls.later = True                      # a's finish, b's vote: not at once
    a.dataReceived(commitframes.finish_request(b"fa"))
    assert to_b == []
    calls.waiting.pop(0)()                  # a's tpc_finish returns
    invalidation = commitframes.invalidate(server.last_tid, [p64(1)])
    # b's vote went to the storage's thread: what waited for it is written now
    assert to_b == [invalidation]
    calls.waiting.pop(0)()
    assert to_b == [invalidation, commitframes.vote_answer(b"vb", [])]


def test_a_voter_behind_another_has_the_invalidation_before_the_committers_answer(world):
    """Kept back only until the committer lets the lock go: a client whose
    vote still waits (another was granted first) gets the invalidation
    before the committer's Finish answer leaves, as every other client
    does.  A thread of that client told of the commit by the committer
    starts its transaction after it (client/commitreads.py, catch_up);
    held until its own vote's answer, it would start before it."""
    server, _, [(a, to_a), (b, to_b), (c, to_c)] = world
    log = []
    for name, (session, _) in zip("abc", world[2]):
        session.transport.write = lambda data, name=name: log.append((name, data))
    vote(a, 1, b"va")
    vote(c, 3, b"vc")
    vote(b, 2, b"vb")
    log.clear()
    a.dataReceived(commitframes.finish_request(b"fa"))      # c is granted; b still waits
    tid = server.last_tid
    first = commitframes.invalidate(tid, [p64(1)])
    assert log == [("c", first + commitframes.vote_answer(b"vc", [])), ("b", first),
                   ("a", commitframes.finish_answer(b"fa", tid))]
    assert b.awaits_lock()
    b._abort_txn()                                  # an Abort, a lost link, a timeout
    assert log[3:] == [] and not b.awaits_lock()
    c.dataReceived(commitframes.finish_request(b"fc"))
    assert ("b", commitframes.invalidate(server.last_tid, [p64(3)])) in log[3:]


def test_no_more_than_a_bound_is_kept_back(world, monkeypatch):
    server, _, [(a, to_a), (b, to_b), (c, to_c)] = world
    monkeypatch.setattr(type(b), "LATER_MAX", 1)
    vote(a, 1, b"va")
    vote(b, 2, b"vb")
    a.dataReceived(commitframes.finish_request(b"fa"))
    invalidation = commitframes.invalidate(server.last_tid, [p64(1)])
    assert to_b == [invalidation, commitframes.vote_answer(b"vb", [])]      # written at once
