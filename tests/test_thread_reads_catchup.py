"""A client whose socket a loading thread parked (zeotwist.client.threadreads)
handles what the server sent meanwhile before ZODB starts a transaction on
it: ``lastTransaction`` (ZODB's snapshot at every transaction start) reads
what has arrived first.  A real server on 127.0.0.1, blocking clients; the
reactor's own look at a parked socket is pushed out of the way, so the
test, not timing, decides that the socket is still parked."""
import select

from ZODB.utils import z64

from tests.test_review_races import _commit, _wait_for
from tests.test_review_threadreads import _parked, no_park_timer  # noqa: F401 (fixture)
from zeotwist.client.threadreads import PARKED


def _arrived(proto) -> bool:
    return bool(select.select([proto._rsock.fileno()], [], [], 0)[0])


def test_a_parked_client_starts_a_transaction_after_what_has_arrived(
        server, make_client, no_park_timer):  # noqa: F811
    writer, reader = make_client(), make_client()
    x, y = writer.new_oid(), writer.new_oid()
    first = _commit(writer, x, z64, b"one")
    _commit(writer, y, z64, b"y")
    reader.ping()
    proto = _parked(reader, y)
    assert reader.load(x)[0] == b"one"      # read by this thread: still parked
    assert proto.read_state == PARKED
    second = _commit(writer, x, first, b"two")
    _wait_for(lambda: _arrived(proto), "the invalidation reached the reader's socket")
    assert proto.read_state == PARKED       # nobody has read it
    assert reader.lastTransaction() == second
    assert reader.load(x)[0] == b"two"      # the invalidation ended the cached revision


def test_nothing_arrived_leaves_the_socket_parked(server, make_client, no_park_timer):  # noqa: F811
    writer, reader = make_client(), make_client()
    y = writer.new_oid()
    tid = _commit(writer, y, z64, b"y")
    reader.ping()
    proto = _parked(reader, y)
    assert reader.lastTransaction() == tid
    assert proto.read_state == PARKED       # no hand-off when nothing came
