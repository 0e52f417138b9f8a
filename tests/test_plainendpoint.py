"""Plain addresses connect without Twisted's endpoints module
(zeotwist.client.plainendpoint): what the endpoint does with the reactor,
checked on Twisted's MemoryReactor; a real connection in
tests/test_lazytls.py and every networked test."""
import pytest
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, NoProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from zeotwist.client.addresses import to_endpoint
from zeotwist.client.plainendpoint import TIMEOUT, PlainEndpoint


class Recorder(Protocol):
    def __init__(self):
        self.received, self.lost = [], []

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost.append(reason)


@pytest.mark.parametrize("address, tcp, unix", [
    (("db.example", 8100), ("db.example", 8100), None),
    (8100, ("127.0.0.1", 8100), None),
    ("db.example:8100", ("db.example", 8100), None),
    (":8100", ("localhost", 8100), None),
    ("/run/zeo.sock", None, "/run/zeo.sock"),
])
def test_plain_addresses_connect_through_the_reactor(address, tcp, unix):
    reactor = MemoryReactorClock()
    endpoint = to_endpoint(reactor, address)
    assert isinstance(endpoint, PlainEndpoint)
    endpoint.connect(Factory.forProtocol(Recorder))
    if tcp:
        assert reactor.tcpClients[0][:2] == tcp and reactor.tcpClients[0][3] == TIMEOUT
    else:
        assert reactor.unixClients[0][0] == unix and reactor.unixClients[0][2] == TIMEOUT


def test_endpoint_strings_still_go_through_twisteds_endpoints():
    endpoint = to_endpoint(MemoryReactorClock(), "tcp:host=db.example:port=8100")
    assert type(endpoint).__name__ == "TCP4ClientEndpoint"


def connect(reactor=None):
    reactor = reactor or MemoryReactorClock()
    d = PlainEndpoint(reactor, "127.0.0.1", 8100).connect(Factory.forProtocol(Recorder))
    factory = reactor.tcpClients[0][2]
    return reactor, d, factory, reactor.connectors[0]


def test_the_deferred_fires_with_the_protocol_once_connected_and_events_pass_on():
    reactor, d, factory, _ = connect()
    results = []
    d.addCallback(results.append)
    wrapper = factory.buildProtocol(None)
    assert results == []
    wrapper.makeConnection(StringTransport())
    protocol, = results
    assert isinstance(protocol, Recorder) and protocol.transport is wrapper.transport
    wrapper.dataReceived(b"abc")
    wrapper.connectionLost(Failure(ConnectionRefusedError()))
    assert protocol.received == [b"abc"] and len(protocol.lost) == 1


def test_a_failed_attempt_fails_the_deferred():
    reactor, d, factory, connector = connect()
    failures = []
    d.addErrback(failures.append)
    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    assert failures[0].check(ConnectionRefusedError)


def test_cancelling_stops_the_attempt():
    reactor, d, factory, connector = connect()
    factory.startedConnecting(connector)
    failures = []
    d.addErrback(failures.append)
    d.cancel()
    assert failures[0].check(ConnectingCancelledError)
    assert connector.stoppedConnecting
    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))  # no second result


def test_a_factory_that_builds_no_protocol_fails_the_deferred():
    class Refusing(Factory):
        def buildProtocol(self, addr):
            return None
    reactor = MemoryReactorClock()
    d = PlainEndpoint(reactor, "127.0.0.1", 8100).connect(Refusing())
    failures = []
    d.addErrback(failures.append)
    assert reactor.tcpClients[0][2].buildProtocol(None) is None
    assert failures[0].check(NoProtocol)
