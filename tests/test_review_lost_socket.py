"""Review (session 8): a thread that sends its own question while the
connection is being lost.

Twisted's ``tcp.Connection.connectionLost`` marks the transport
disconnected, closes and *deletes* its ``socket`` attribute, and only then
calls the protocol's ``connectionLost`` (which sets ``_gone`` under the
send lock and fails the questions).  A thread that asks in that window must
not meet the missing attribute: its call ends as a lost connection does
(ClientDisconnected, or the record once the client has reconnected),
never with an AttributeError.  A live server on 127.0.0.1; the window is
held open by holding the protocol's ``connectionLost`` at its entry.
"""
import threading

from ZODB.utils import maxtid, z64

from zeotwist.errors import ClientDisconnected
from zeotwist.twistedcompat import calls_pending
from tests.test_review_races import _commit, _wait_for


def test_a_load_asked_while_the_transport_has_lost_its_socket(server, make_client):
    cs = make_client(timeout=10)
    oid = cs.new_oid()
    tid = _commit(cs, oid, z64, b"the record")
    cs.client.cache.clear()
    proto, reactor = cs.client.protocol, cs.client.reactor
    transport = proto.transport
    entered, go = threading.Event(), threading.Event()
    real_lost = proto.connectionLost

    def held_lost(reason):              # what tcp.Connection calls after `del self.socket`
        entered.set()
        go.wait(60)
        return real_lost(reason)

    proto.connectionLost = held_lost
    reactor.callFromThread(transport.abortConnection)
    outcome = []

    def load():
        try:
            outcome.append(cs.loadBefore(oid, maxtid))
        except BaseException as e:      # what the application would see
            outcome.append(e)

    try:
        assert entered.wait(30), "the connection was never lost"
        assert not hasattr(transport, "socket")         # the window
        loader = threading.Thread(target=load)
        loader.start()
        # it asks by itself (and meets the window), or hands the call to
        # the reactor, held here: either way it has got that far then
        _wait_for(lambda: outcome or calls_pending(reactor), "the load asked")
    finally:
        go.set()
    loader.join(60)
    assert outcome, "the load never returned"
    result = outcome[0]
    assert not isinstance(result, AttributeError), repr(result)
    assert isinstance(result, ClientDisconnected) or result[:2] == (b"the record", tid), result
