"""A ``before_visible`` invalidation subscriber runs on the reactor thread
(docs/api.md), also when the application's own thread reads the answers
(zeotwist.client.commitreads: its commit's Finish, another client's
invalidation before its load's answer) and would make the event visible
itself while holding the connection's send lock: a subscriber that loads
from the storage there would wait for that lock forever.

A real server on 127.0.0.1, blocking clients on the background reactor;
the reader's socket is parked (the test, not timing, decides that its
thread reads), and the reader works in a thread of its own, so that a
deadlock fails the test instead of hanging it."""
import threading

from ZODB.utils import maxtid, z64

from tests.test_review_races import _commit, _wait_for
from tests.test_review_threadreads import _parked, no_park_timer  # noqa: F401 (fixture)
from zeotwist.client.reactorthread import in_reactor_thread
from zeotwist.errors import ReactorThreadError


def test_a_before_visible_subscriber_runs_on_the_reactor_thread_and_may_load(
        server, make_client, no_park_timer):  # noqa: F811
    writer, reader = make_client(), make_client(timeout=10)
    x, y, z = (writer.new_oid() for _ in range(3))
    serial, _, _ = (_commit(writer, oid, z64, b"0") for oid in (x, y, z))
    reader.ping()
    client, calls, loaded = reader.client, [], []

    def subscriber(event):
        on_reactor = in_reactor_thread(client.reactor)
        d = client.load_before(x, maxtid)           # a reactor program's load
        try:
            reader.load(x)                          # the blocking API's
            blocking = None
        except ReactorThreadError as e:             # not from the reactor thread
            blocking = e
        calls.append((event.tid, on_reactor, blocking))
        d.addCallback(lambda record: loaded.append(record[0]))

    client.events.subscribe(subscriber, before_visible=True)
    done = []

    def work():
        _parked(reader, y)
        mine = _commit(reader, x, serial, b"1")     # its Finish, read by this thread if parked
        _parked(reader, y)
        theirs = _commit(writer, x, mine, b"2")     # arrives at the parked socket
        reader.loadBefore(z, maxtid)                # read by this thread, after it
        done.append((mine, theirs))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the reader's thread is stuck: %r" % calls
    mine, theirs = done[0]
    assert [c[0] for c in calls] == [mine, theirs]
    assert all(on_reactor for _, on_reactor, _ in calls)
    # the blocking API there: served from the cache (its own commit's
    # record), else a clear error at once, never a wait
    assert calls[0][2] is None and isinstance(calls[1][2], ReactorThreadError)
    _wait_for(lambda: len(loaded) == 2, "the subscriber's loads answered")
    assert loaded == [b"1", b"2"]
    assert reader.load(x) == (b"2", theirs)
