"""Reference prefetch (docs/performance.md, "Reference prefetch"; docs/protocol.md, LoadBefore).

In memory (exact orderings, no reactor): the wire format and its refusals;
the server's Prefetcher (references found without unpickling, the count and
byte bounds, oids already sent skipped until invalidated); a real Client
over an in-memory connection, where a prefetched record and an invalidation
meet in every order and the cache must hold each revision with its exact
validity; both off switches.  Live (test_racing_writers_never_show_a_reader_
a_mixed_snapshot): writers change the objects readers traverse, prefetch on,
a real server over TCP, in the style of ZODB's racetest.
"""
import random
import threading
import time

import pytest
import transaction
import ZODB
from twisted.internet.task import Clock
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError
from ZODB.utils import maxtid, p64, u64, z64

from zeotwist.bench.graph import Holder
from zeotwist.bench.parallel import Counter
from zeotwist.client.client import Client
from zeotwist.client.reactorthread import background_reactor
from zeotwist.server.prefetch import Prefetcher
from zeotwist.testing import call_in_memory as call, connect_in_memory, memory_server
from zeotwist.wire import commands as C
from zeotwist.wire import prefetch as wire
from zeotwist.wire.records import encode_store

CHILDREN = 5


def build(path: str, holders: int = 2, children: int = CHILDREN) -> list:
    """A FileStorage whose root holds ``holders`` Holders of ``children``
    Counters each; ``[(holder oid, [child oids])]``."""
    db = ZODB.DB(FileStorage(path))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        made = [Holder([Counter() for _ in range(children)]) for _ in range(holders)]
        conn.root()["holders"] = made
        tm.commit()
        return [(h._p_oid, [c._p_oid for c in h.children]) for h in made]
    finally:
        db.close()


# -- the wire format ------------------------------------------------------------------

def test_wire_round_trip_keeps_each_validity():
    records = [(p64(1), b"one", p64(5), None), (p64(2), b"", p64(3), p64(9)),
               (p64(3), b"x" * 1000, p64(7), None)]
    assert wire.decode(wire.encode(records)) == records
    assert wire.decode(b"") == []
    assert wire.record_size(b"abc") == 28 + 3


@pytest.mark.parametrize("bad", [
    "truncated-head", "truncated-data", "zero-start", "end-before-start", "too-big"])
def test_wire_refuses_malformed_values(bad):
    good = wire.encode([(p64(1), b"data", p64(5), p64(6))])
    value = {"truncated-head": good[:20], "truncated-data": good[:-1],
             "zero-start": wire.encode([(p64(1), b"d", z64, None)]),
             "end-before-start": wire.encode([(p64(1), b"d", p64(5), p64(5))]),
             "too-big": wire.encode([(p64(1), b"d" * wire.MAX_BYTES, p64(5), None)])}[bad]
    with pytest.raises(ValueError):
        wire.decode(value)


# -- the server's choice of records ---------------------------------------------------

@pytest.fixture
def graph(tmp_path):
    layout = build(str(tmp_path / "g.fs"))
    fs = FileStorage(str(tmp_path / "g.fs"))
    yield fs, layout
    fs.close()


def collect(prefetcher, fs, oid, tid=maxtid):
    data = fs.loadBefore(oid, tid)[0]
    value = prefetcher.collect(fs.loadBefore, oid, data, tid)
    return [] if value is None else wire.decode(value)


def test_prefetcher_sends_referenced_records_once_until_invalidated(graph):
    fs, [(holder, children), _] = graph
    p = Prefetcher(count=100, max_bytes=60_000)
    got = collect(p, fs, holder)
    assert [r[0] for r in got] == children            # in reference order
    for oid, data, start, end in got:
        assert (data, start, end) == fs.loadBefore(oid, maxtid)
    assert collect(p, fs, holder) == []               # already sent, not invalidated
    p.forget(children[:2])                            # a commit changed two of them
    assert [r[0] for r in collect(p, fs, holder)] == children[:2]
    assert p.records == CHILDREN + 2


def test_a_record_without_persistent_references_skips_the_unpickler(graph, monkeypatch):
    """may_reference is exact in the 'no' direction: a record it calls a leaf
    has no references (referencesf agrees), and the Unpickler is not run for it."""
    from ZODB.serialize import referencesf
    from zeotwist.server import prefetch as server_prefetch
    fs, [(holder, children), _] = graph
    leaf = fs.loadBefore(children[0], maxtid)[0]
    assert server_prefetch.may_reference(fs.loadBefore(holder, maxtid)[0])
    assert not server_prefetch.may_reference(leaf) and referencesf(leaf) == []
    read = []
    monkeypatch.setattr(server_prefetch, "referencesf", lambda data: read.append(data) or [])
    assert Prefetcher(count=100, max_bytes=60_000).collect(
        fs.loadBefore, children[0], leaf, maxtid) is None
    assert read == []


def test_prefetcher_bounds_count_bytes_and_skips_what_it_cannot_read(graph):
    fs, [(holder, children), _] = graph
    assert [r[0] for r in collect(Prefetcher(count=2, max_bytes=60_000), fs, holder)] \
        == children[:2]
    one = wire.record_size(fs.loadBefore(children[0], maxtid)[0])
    assert len(collect(Prefetcher(count=100, max_bytes=2 * one + 1), fs, holder)) == 2
    assert collect(Prefetcher(count=100, max_bytes=10), fs, holder) == []
    p = Prefetcher(count=100, max_bytes=60_000)
    assert p.collect(fs.loadBefore, holder, b"not a pickle", maxtid) is None
    assert Prefetcher(1, 10**9).max_bytes == wire.MAX_BYTES


def test_prefetched_record_of_an_older_snapshot_carries_its_end(graph):
    fs, [(holder, children), _] = graph
    first = fs.lastTransaction()
    db = ZODB.DB(fs)          # change one child after the snapshot
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["holders"][0].children[1].value = 7
    tm.commit()
    later = fs.lastTransaction()
    p = Prefetcher(count=100, max_bytes=60_000)
    snapshot = p64(u64(first) + 1)
    got = {r[0]: r for r in collect(p, fs, holder, snapshot)}
    assert got[children[1]][2:] == (first, later)     # valid from first until later
    assert got[children[0]][2:] == (first, None)      # still current
    assert children[1] not in p.sent and children[0] in p.sent
    conn.close()


# -- a real Client over an in-memory connection ---------------------------------------

@pytest.fixture
def world(tmp_path):
    layout = build(str(tmp_path / "data.fs"))
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock)
    yield clock, {"1": server}, layout
    server.close()


def client_in_memory(clock, servers, prefetch=True):
    """A real Client (cache, connector) whose connection is an in-memory pair."""
    client = Client(clock, None, reference_prefetch=prefetch)
    proto, session, pump, _ = connect_in_memory(servers, clock, recorder=client.connector)
    answer = call(proto, pump, C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                  read_only=False, prefetch=prefetch)
    client.connector.protocol = proto
    client.cache.last_tid = answer["last_tid"]
    return client, session, pump


def writer_in_memory(clock, servers):
    proto, _, pump, _ = connect_in_memory(servers, clock)
    call(proto, pump, C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False)

    def commit(oid, serial, data):
        proto.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        proto.send(C.StoreData, data=encode_store(oid, serial, data))
        assert call(proto, pump, C.Vote)["conflicts"] == b""
        return call(proto, pump, C.Finish)["tid"]
    return commit


def load(client, pump, oid, tid=maxtid):
    out = []
    client.load_before(oid, tid).addBoth(out.append)
    pump.flush()
    return out[0]


def test_client_caches_prefetched_records_and_an_invalidation_after_them_ends_them(world):
    clock, servers, [(holder, children), _] = world
    client, session, pump = client_in_memory(clock, servers)
    first = servers["1"].last_tid
    load(client, pump, holder)
    assert client.prefetched == CHILDREN and session.prefetcher.records == CHILDREN
    for child in children:
        assert client.cache.loadBefore(child, maxtid)[1:] == (first, None)
    commit = writer_in_memory(clock, servers)
    tid = commit(children[0], first, b"changed")
    pump.flush()                                         # the Invalidate arrives
    assert client.cache.loadBefore(children[0], maxtid) is None
    data, start, end = client.cache.loadBefore(children[0], tid)
    assert (start, end) == (first, tid)                  # kept, with its exact end
    assert load(client, pump, children[0]) == (b"changed", tid, None)


def test_a_commit_before_the_answer_is_never_cached_stale(world):
    clock, servers, [(holder, children), _] = world
    client, session, pump = client_in_memory(clock, servers)
    first = servers["1"].last_tid
    commit = writer_in_memory(clock, servers)
    out = []
    client.load_before(holder, maxtid).addBoth(out.append)   # asked, not yet sent
    tid = commit(children[2], first, b"new")                  # commits meanwhile
    pump.flush()          # the Invalidate, then the answer computed after the commit
    assert out and out[0][1] == first
    assert client.cache.loadBefore(children[2], maxtid) == (b"new", tid, None)
    assert client.cache.loadBefore(children[1], maxtid)[1:] == (first, None)
    # a snapshot from before that commit gets the old revision, ended at tid
    assert load(client, pump, children[2], tid)[1:] == (first, tid)


def test_a_load_at_an_older_snapshot_caches_changed_records_as_ended(world):
    """The client already applied a commit's Invalidate but loads at a
    snapshot before it (a ZODB transaction that began earlier): the
    prefetched revision of the changed object ends at that commit, and must
    not be cached as current (nothing would end it later)."""
    clock, servers, [(holder, children), _] = world
    client, session, pump = client_in_memory(clock, servers)
    first = servers["1"].last_tid
    commit = writer_in_memory(clock, servers)
    tid = commit(children[4], first, b"newer")
    pump.flush()
    assert client.cache.last_tid == tid
    snapshot = p64(u64(first) + 1)
    assert load(client, pump, holder, snapshot)[1] == first
    assert client.cache.loadBefore(children[4], snapshot)[1:] == (first, tid)
    assert client.cache.loadBefore(children[4], maxtid) is None      # not stale-current
    assert load(client, pump, children[4]) == (b"newer", tid, None)


def test_a_record_over_one_amp_value_brings_its_prefetch_too(tmp_path):
    """Records over 64 KiB take AMP's own path (split into data.1, ...): the
    prefetched records ride along there as well."""
    db = ZODB.DB(FileStorage(str(tmp_path / "big.fs")))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    big = Holder([Counter() for _ in range(3)])
    big.padding = b"p" * 200_000
    conn.root()["big"] = big
    tm.commit()
    oid, children = big._p_oid, [c._p_oid for c in big.children]
    db.close()
    clock = Clock()
    servers = {"1": memory_server(FileStorage(str(tmp_path / "big.fs")), clock)}
    try:
        client, session, pump = client_in_memory(clock, servers)
        data, start, end = load(client, pump, oid)
        assert len(data) > 200_000 and end is None
        assert client.prefetched == 3
        assert all(client.cache.loadBefore(c, maxtid) is not None for c in children)
    finally:
        servers["1"].close()


def test_a_record_over_the_scan_limit_is_not_read_for_references(graph, monkeypatch):
    """Reading a pickle's references walks all of it: a record longer than
    MAX_SCANNED (a 10 MB record took 14 ms) gets no prefetch at all."""
    import zeotwist.server.prefetch as prefetch_module
    fs, [(holder, children), _] = graph
    data = fs.loadBefore(holder, maxtid)[0]
    monkeypatch.setattr(prefetch_module, "MAX_SCANNED", len(data))
    assert len(collect(Prefetcher(count=100, max_bytes=60_000), fs, holder)) == CHILDREN
    monkeypatch.setattr(prefetch_module, "MAX_SCANNED", len(data) - 1)
    read = []
    monkeypatch.setattr(prefetch_module, "referencesf", lambda d: read.append(d) or [])
    assert collect(Prefetcher(count=100, max_bytes=60_000), fs, holder) == []
    assert read == []


def test_oids_already_sent_are_skipped_until_invalidated(world):
    clock, servers, [(holder, children), (other, _)] = world
    client, session, pump = client_in_memory(clock, servers)
    first = servers["1"].last_tid
    load(client, pump, holder)
    client.cache.clear()                 # the server does not know: it skips them
    load(client, pump, holder)
    assert client.prefetched == CHILDREN
    commit = writer_in_memory(clock, servers)
    commit(children[3], first, b"x")
    pump.flush()
    client.cache.clear()
    load(client, pump, holder)           # only the invalidated one comes again
    assert client.prefetched == CHILDREN + 1
    assert client.cache.loadBefore(children[3], maxtid)[0] == b"x"


def test_prefetch_is_off_when_the_client_or_the_server_says_so(world):
    clock, servers, [(holder, children), _] = world
    client, session, pump = client_in_memory(clock, servers, prefetch=False)
    assert session.prefetcher is None
    load(client, pump, holder)
    assert client.prefetched == 0 and client.cache.loadBefore(children[0], maxtid) is None
    servers["1"].prefetch_count = 0
    client, session, pump = client_in_memory(clock, servers)
    assert session.prefetcher is None
    load(client, pump, holder)
    assert client.prefetched == 0


def test_a_malformed_prefetch_value_drops_the_connection(world):
    clock, servers, [(holder, _), _] = world
    client, session, pump = client_in_memory(clock, servers)
    session.prefetcher.collect = lambda *a: b"\0" * 10       # a broken server
    out = load(client, pump, holder)
    assert hasattr(out, "raiseException")                    # the load fails...
    assert client.connector.protocol is None                 # ...and the connection is gone
    assert client.prefetched == 0


# -- live: writers change what readers traverse ----------------------------------------

HOLDERS, PER_HOLDER, READERS, WRITERS, SECONDS = 4, 8, 3, 2, 3.0


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_racing_writers_never_show_a_reader_a_mixed_snapshot(server, prefetch):
    """Each writer transaction increments every Counter of one Holder and,
    half the time, rewrites the Holder (so readers load it again, with its
    Counters prefetched).  A reader's transaction must see all Counters of a
    Holder equal, and never fewer increments than had been committed before
    it began (after a round trip); at the end every Counter shows every
    committed increment.  Without prefetch every Counter is a load of its
    own, which the reader's thread sends itself (zeotwist.client.threadwrites)."""
    reactor = background_reactor()

    def open_db():
        return ZODB.DB(zeotwist_storage(server, reactor, reference_prefetch=prefetch))

    setup = open_db()
    tm = transaction.TransactionManager()
    setup.open(tm).root()["holders"] = [
        Holder([Counter() for _ in range(PER_HOLDER)]) for _ in range(HOLDERS)]
    tm.commit()
    setup.close()
    committed = [0] * HOLDERS
    problems, stop = [], threading.Event()
    lock = threading.Lock()

    def write(seed):
        db, rng = open_db(), random.Random(seed)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            while not stop.is_set():
                tm.begin()
                k = rng.randrange(HOLDERS)
                holder = conn.root()["holders"][k]
                for c in holder.children:
                    c.value += 1
                if rng.random() < 0.5:       # half the time the Holder too: reloaded
                    holder.children = list(holder.children)
                try:
                    tm.commit()
                except ConflictError:
                    tm.abort()
                    continue
                with lock:
                    committed[k] += 1
        except Exception as e:               # pragma: no cover - reported below
            problems.append("writer: %r" % e)
        finally:
            db.close()

    prefetched = []

    def read(seed):
        db, rng = open_db(), random.Random(seed)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            while not stop.is_set():
                with lock:
                    floor = list(committed)  # commits that returned before this point
                db.storage.ping()            # ...so their invalidations have arrived
                tm.begin()
                conn.cacheMinimize()         # every object a storage load again
                holders = conn.root()["holders"]
                for k in rng.sample(range(HOLDERS), 2):    # the 2nd often at an old snapshot
                    values = [c.value for c in holders[k].children]
                    if len(set(values)) != 1:
                        problems.append("mixed snapshot: %s" % values)
                    if values[0] < floor[k]:
                        problems.append("stale: %s < %d" % (values, floor[k]))
                tm.abort()
            prefetched.append(db.storage.client.prefetched)
        except Exception as e:               # pragma: no cover - reported below
            problems.append("reader: %r" % e)
        finally:
            db.close()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)]
    threads += [threading.Thread(target=read, args=(100 + i,)) for i in range(READERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline and not problems:
        stop.wait(0.05)                      # the run's length, not a synchronisation
    stop.set()
    for t in threads:
        t.join(60)
    assert not problems, problems[:5]
    assert sum(committed) > 0 and (sum(prefetched) > 0) is prefetch, (committed, prefetched)
    check = open_db()
    try:
        conn = check.open()
        for k, holder in enumerate(conn.root()["holders"]):
            assert [c.value for c in holder.children] == [committed[k]] * PER_HOLDER
    finally:
        check.close()


def zeotwist_storage(server, reactor, **kw):
    from zeotwist import ClientStorage
    return ClientStorage(server.address, reactor=reactor, wait_timeout=10, **kw)

