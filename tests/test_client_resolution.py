"""Client-side conflict resolution (``--client-conflict-resolution``).

Three tiers: the resolver alone (ZODB's tryToResolveConflict on records, no
I/O); the Vote / re-vote exchange over the in-memory pair with a Clock (the
lock held while the client resolves, every malformed re-vote refused, the
transaction timeout); live servers with ZODB applications (BTrees.Length
resolved, a bucket split refused, a class the client lacks).  The
multi-process cases are in tests/test_client_resolution_processes.py.
"""
import pickle

import pytest
import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from ZODB import DB
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError, ReadConflictError
from ZODB.tests.ConflictResolution import PCounter, PCounter2
from ZODB.tests.StorageTestBase import zodb_pickle, zodb_unpickle
from ZODB.utils import z64

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.client.resolve import ConflictResolver
from zeotwist.errors import ClientDisconnected, RemoteProtocolError
from zeotwist.server.storagecalls import SynchronousCalls
from zeotwist.server.storageserver import StorageServer
from zeotwist.testing import connect_in_memory, start_server
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_check, encode_store


def length_record(value: int) -> bytes:
    n = Length(value)
    return zodb_pickle(n)


def counter_record(cls, value: int) -> bytes:
    c = cls()
    c._value = value
    return zodb_pickle(c)


# -- the resolver alone ---------------------------------------------------------------

def item(data, old, committed, oid=b"\0" * 7 + b"\1", old_data=True):
    return dict(oid=oid, serial=b"\0" * 7 + b"\2", committed=b"\0" * 7 + b"\3", data=data,
                old_data=old if old_data else None, committed_data=committed)


def test_resolver_merges_a_length():
    i = item(length_record(12), length_record(10), length_record(15))
    (oid, committed, record), = ConflictResolver().resolve_all([i])
    assert (oid, committed) == (i["oid"], i["committed"])
    assert zodb_unpickle(record).value == 17         # 10 + 5 + 2


def test_resolver_raises_the_conflict_error_zodb_would():
    i = item(counter_record(PCounter2, 3), counter_record(PCounter2, 1),
             counter_record(PCounter2, 2))
    with pytest.raises(ConflictError) as e:
        ConflictResolver().resolve(i)
    assert ".PCounter2," in str(e.value)                 # names the class, as ZODB does
    assert e.value.oid == i["oid"] and e.value.serials == (i["committed"], i["serial"])


def test_resolver_without_the_class_or_the_old_record_raises_conflict_error():
    missing = pickle.dumps((("zeotwist_no_such_module", "Thing"), None), 3) \
        + pickle.dumps({"x": 1}, 3)
    with pytest.raises(ConflictError):
        ConflictResolver().resolve(item(missing, missing, missing))
    without_old = item(counter_record(PCounter, 3), None, counter_record(PCounter, 2),
                       old_data=False)
    with pytest.raises(ConflictError):
        ConflictResolver().resolve(without_old)


def test_resolver_uses_the_wrappers_record_transforms():
    def transform(data):
        return b"Z" + data

    def untransform(data):
        assert data[:1] == b"Z"
        return data[1:]

    class Wrapper:
        transform_record_data = staticmethod(transform)
        untransform_record_data = staticmethod(untransform)

    i = item(transform(length_record(12)), transform(length_record(10)),
             transform(length_record(15)))
    record = ConflictResolver.for_wrapper(Wrapper()).resolve(i)
    assert zodb_unpickle(untransform(record)).value == 17


# -- the exchange, in memory ------------------------------------------------------------

TIMEOUT = 30.0


class HeldCalls(SynchronousCalls):
    """Storage calls run inline, except while ``held``: then they queue, in
    order, until :meth:`release` (a storage thread that is busy)."""

    held = False

    def __init__(self):
        self.queue = []

    def in_order(self, f, *args):
        if not self.held:
            return super().in_order(f, *args)
        d = Deferred()
        self.queue.append((d, f, args))
        return d

    def release(self):
        self.held = False
        while self.queue:
            d, f, args = self.queue.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)


class World:
    """A server in client-resolution mode and one raw client, over iosim."""

    def __init__(self, tmp_path):
        self.clock = Clock()
        self.threads = HeldCalls()
        self.server = StorageServer(FileStorage(str(tmp_path / "data.fs")), reactor=self.clock,
                                    threads=self.threads, client_conflict_resolution=True,
                                    transaction_timeout=TIMEOUT)
        self.a, self.session, self.pump, _ = connect_in_memory({"1": self.server}, self.clock)
        self.call(C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False)

    def call(self, command, **kw):
        out = []
        self.a.call(command, **kw).addBoth(out.append)
        self.pump.flush()
        return out[0]

    def vote(self, *records, can_resolve=True):
        if records:
            self.a.send(C.StoreData, data=b"".join(records))
        return self.call(C.Vote, can_resolve=can_resolve)

    def begin(self, *records):
        self.a.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        if records:
            self.a.send(C.StoreData, data=b"".join(records))

    def commit(self, *records):
        self.begin(*records)
        voted = self.vote()
        assert not voted["conflicts"] and not voted["to_resolve"], voted
        return self.call(C.Finish)["tid"]

    def dropped(self) -> bool:
        """The server closed the connection."""
        self.pump.flush()
        return self.session.transport is None or self.session.transport.disconnected

    def new_oid(self):
        return self.call(C.NewOids, count=1)["oids"][0]


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.server.close()


def conflicted(world):
    """Two commits of a Length, then a third transaction storing a stale one
    (plus a new object); returns (oid, other_oid, tid1, tid2, the Vote answer)."""
    oid, other = world.new_oid(), world.new_oid()
    tid1 = world.commit(encode_store(oid, z64, length_record(10)))
    tid2 = world.commit(encode_store(oid, tid1, length_record(15)))
    world.begin(encode_store(other, z64, counter_record(PCounter, 1)),
                encode_store(oid, tid1, length_record(12)))
    return oid, other, tid1, tid2, world.vote()


def test_vote_leaves_the_conflict_to_the_client_and_keeps_the_lock(world):
    oid, other, tid1, tid2, voted = conflicted(world)
    (i,) = voted["to_resolve"]
    assert voted["conflicts"] == b"" and voted["resolved"] == []
    assert (i["oid"], i["serial"], i["committed"]) == (oid, tid1, tid2)
    assert i["data"] == length_record(12)
    assert i["committed_data"] == length_record(15) and i["old_data"] == length_record(10)
    assert world.server.lock.holder is world.session
    assert world.server.stats["client_resolutions"] == 1
    # the client resolves and votes again; the lock was never let go
    (_, committed, record), = ConflictResolver().resolve_all(voted["to_resolve"])
    voted = world.vote(encode_store(oid, committed, record))
    assert voted["conflicts"] == b"" and not voted["to_resolve"]
    tid3 = world.call(C.Finish)["tid"]
    assert world.server.lock.holder is None
    data, serial = world.server.storage.load(oid)
    assert serial == tid3 and zodb_unpickle(data).value == 17
    assert world.server.storage.load(other)[1] == tid3        # the whole transaction
    assert world.server.stats["conflicts"] == 0


def test_a_client_that_does_not_resolve_gets_the_conflict(world):
    oid = world.new_oid()
    tid1 = world.commit(encode_store(oid, z64, length_record(10)))
    tid2 = world.commit(encode_store(oid, tid1, length_record(15)))
    world.begin(encode_store(oid, tid1, length_record(12)))
    voted = world.vote(can_resolve=False)
    assert voted["conflicts"] == oid + tid2 + tid1 and not voted["to_resolve"]
    assert world.server.lock.holder is None


def test_abort_while_resolving_releases_the_lock_and_commits_nothing(world):
    oid, other, tid1, tid2, voted = conflicted(world)
    assert world.call(C.Abort) == {}
    assert world.server.lock.holder is None
    assert world.server.storage.lastTransaction() == tid2
    assert world.commit(encode_store(oid, tid2, length_record(16))) > tid2


def test_other_conflicts_still_end_the_transaction(world):
    oid, other, tid1, tid2, _ = conflicted(world)
    world.call(C.Abort)
    # a stale store *and* a failed checkCurrentSerialInTransaction: nothing to resolve
    world.begin(encode_store(other, z64, length_record(1)), encode_check(oid, tid1))
    assert world.vote().check(ReadConflictError)
    assert world.server.lock.holder is None
    assert world.server.storage.lastTransaction() == tid2


def bad_revotes(oid, other, tid1, tid2):
    good = encode_store(oid, tid2, length_record(17))
    return {
        "nothing": b"",
        "based on the old serial": encode_store(oid, tid1, length_record(17)),
        "another object": encode_store(other, tid2, length_record(17)),
        "twice": good + good,
        "a check record": encode_check(oid, tid2),
        "plus another store": good + encode_store(other, tid2, b"x"),
    }


@pytest.mark.parametrize("case", list(bad_revotes(*[b"\0" * 8] * 4)))
def test_a_revote_must_resolve_exactly_the_conflicts(world, case):
    oid, other, tid1, tid2, _ = conflicted(world)
    stream = bad_revotes(oid, other, tid1, tid2)[case]
    voted = world.vote(stream) if stream else world.vote()
    # a protocol violation: the connection is dropped (the answer may not make it)
    assert voted.check(RemoteProtocolError, ClientDisconnected), voted
    assert world.dropped()
    assert world.server.lock.holder is None
    assert world.server.storage.lastTransaction() == tid2       # nothing committed


def test_a_client_lost_while_its_revote_is_in_the_storage_thread(world):
    """The resolved records and the second Vote arrived; the storage thread
    has not run them yet when the connection drops: the abort queued behind
    the re-vote undoes it, the lock is released after that, nothing commits."""
    oid, other, tid1, tid2, voted = conflicted(world)
    (_, committed, record), = ConflictResolver().resolve_all(voted["to_resolve"])
    world.threads.held = True
    world.a.send(C.StoreData, data=encode_store(oid, committed, record))
    answers = []
    world.a.call(C.Vote, can_resolve=True).addBoth(answers.append)
    world.pump.flush()
    assert len(world.threads.queue) == 1 and not answers      # the re-vote waits
    world.a.transport.loseConnection()
    world.pump.flush()
    assert answers[0].check(ClientDisconnected)
    assert world.server.lock.holder is world.session           # until the abort ran
    world.threads.release()                                    # re-vote, then tpc_abort
    assert world.server.lock.holder is None
    assert world.server.storage.lastTransaction() == tid2
    assert world.server.storage.load(oid)[1] == tid2
    assert world.server.stats["commits"] == 2


def test_a_client_that_stalls_while_resolving_is_dropped_by_the_timeout(world):
    oid, other, tid1, tid2, _ = conflicted(world)
    world.clock.advance(TIMEOUT - 1)
    assert world.server.lock.holder is world.session
    world.clock.advance(2)
    world.pump.flush()
    assert world.server.lock.holder is None
    assert world.dropped()
    assert world.server.storage.lastTransaction() == tid2


# -- live: ZODB applications over ClientStorage ---------------------------------------

@pytest.fixture
def crserver(tmp_path):
    srv = start_server(str(tmp_path / "data.fs"), client_conflict_resolution=True)
    yield srv
    srv.stop()


@pytest.fixture
def open_db(crserver):
    made = []

    def make():
        db = DB(ClientStorage(crserver.address, reactor=background_reactor(),
                              wait_timeout=10, server_sync=True))
        made.append(db)
        return db

    yield make
    for db in made:
        db.close()


def test_a_length_bumped_by_two_clients_never_conflicts(crserver, open_db):
    db_a, db_b = open_db(), open_db()
    tm_a, tm_b = transaction.TransactionManager(), transaction.TransactionManager()
    root_a = db_a.open(tm_a).root()
    root_a["n"] = Length()
    tm_a.commit()
    root_b = db_b.open(tm_b).root()
    for i in range(5):
        tm_b.begin()
        root_b["n"].change(1)          # B read the old value ...
        root_a["n"].change(10)         # ... A commits first
        tm_a.commit()
        tm_b.commit()                  # resolved by B, no ConflictError
    tm_a.begin()
    assert root_a["n"].value == 55
    tm_b.begin()
    assert root_b["n"].value == 55
    stats = crserver.server.stats
    assert stats["client_resolutions"] >= 5 and stats["conflicts"] == 0   # A may meet B too


def split_ready_tree():
    """An OOBTree whose middle bucket splits when 16 keys are added to it
    (the layout of BTrees' own testBucketSplitConflict)."""
    t = OOBTree()
    for i in range(0, 200, 4):
        t[i] = i
    state = t.__getstate__()
    assert len(state[0]) == 5 and state[0][1] == 60 and state[0][3] == 120
    return t


@pytest.mark.parametrize("through", ["tree", "bucket"])
def test_a_bucket_split_conflict_reaches_the_application(crserver, open_db, through):
    """A splits a bucket B changes.  Through the tree, BTrees' readCurrent of
    the tree node makes it a ReadConflictError at once; writing the bucket
    directly (as BTrees' own white-box test does), the conflict goes to B's
    resolver, which refuses a split bucket.  Either way the application gets
    a ConflictError, the lock is free, and both writers go on."""
    db_a, db_b = open_db(), open_db()
    tm_a, tm_b = transaction.TransactionManager(), transaction.TransactionManager()
    root_a = db_a.open(tm_a).root()
    root_a["t"] = split_ready_tree()
    tm_a.commit()
    root_b = db_b.open(tm_b).root()
    tm_b.begin()
    list(root_b["t"].values())                  # B has every bucket loaded
    added, key = 0, 60
    while added < 16:                           # A splits bucket 1 and commits
        if key not in root_a["t"]:
            root_a["t"][key] = key
            added += 1
        key += 1
    assert len(root_a["t"].__getstate__()[0]) == 7
    tm_a.commit()
    target = root_b["t"] if through == "tree" else root_b["t"]._firstbucket._next
    for i in range(112, 116):                   # B adds to the old bucket 1
        target[i] = i
    with pytest.raises(ConflictError) as e:
        tm_b.commit()
    tm_b.abort()
    stats = crserver.server.stats
    if through == "tree":
        assert isinstance(e.value, ReadConflictError) and stats["client_resolutions"] == 0
    else:
        assert not isinstance(e.value, ReadConflictError) and stats["client_resolutions"] == 1
    assert crserver.server.lock.holder is None
    root_a["t"][1000] = 1                       # the other writer proceeds
    tm_a.commit()
    for attempt in tm_b.attempts(3):            # and B's retry commits
        with attempt:
            for i in range(112, 116):
                root_b["t"][i] = i
    tm_a.begin()
    assert all(i in root_a["t"] for i in range(112, 116)) and 1000 in root_a["t"]
    assert len(root_a["t"]) == 50 + 16 + 3 + 1     # 112 was there already
