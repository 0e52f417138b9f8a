"""The client's connection keeper (zeotwist.client.reconnect.Reconnector):
every state and what moves it, on a Clock, with an endpoint and protocols
of this test (no reactor, no socket).  The whole client over it is in
tests/test_client_memory.py, tests/test_reconnect.py and tests/test_failover.py."""
import pytest
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from zeotwist.client.reconnect import Reconnector, backoff


class Transport:
    def __init__(self, proto):
        self.proto, self.closing = proto, False

    def loseConnection(self):
        self.closing = True


class Proto:
    """A protocol that reports its loss to the keeper, as ClientProtocol does
    through the connector (before its own questions fail)."""

    def __init__(self, world):
        self.world, self.transport = world, None

    def lose(self):
        self.transport = None
        self.world.keeper.connection_lost(self)


class Endpoint:
    """Each ``connect`` is pending until the test answers it (:meth:`accept`, :meth:`refuse`)."""

    def __init__(self):
        self.pending: list = []
        self.cancelled = 0

    def connect(self, factory):
        d = Deferred(lambda d: setattr(self, "cancelled", self.cancelled + 1))
        self.pending.append((d, factory))
        return d

    def accept(self):
        d, factory = self.pending.pop(0)
        proto = factory()
        proto.transport = Transport(proto)
        d.callback(proto)
        return proto

    def refuse(self):
        d, _ = self.pending.pop(0)
        d.errback(ConnectionRefusedError("refused"))


class World:
    def __init__(self):
        self.clock, self.endpoint = Clock(), Endpoint()
        self.handshakes: list = []          # (proto, Deferred) per handshake begun
        self.unreachable: list = []
        self.keeper = Reconnector(self.endpoint, lambda: Proto(self), self.handshake,
                                  lambda attempt: float(attempt), self.clock,
                                  self.unreachable.append)

    def handshake(self, proto):
        d = Deferred()
        self.handshakes.append((proto, d))
        return d

    def connected(self):
        """Accept the pending attempt and let its handshake succeed."""
        proto = self.endpoint.accept()
        self.handshakes[-1][1].callback(None)
        return proto


@pytest.fixture
def world():
    return World()


def fired(d):
    out = []
    d.addBoth(out.append)
    return out


def test_connects_and_hands_shake(world):
    world.keeper.start()
    assert world.keeper.state == "connecting" and len(world.endpoint.pending) == 1
    proto = world.endpoint.accept()
    assert world.keeper.state == "handshaking" and world.handshakes[0][0] is proto
    world.handshakes[0][1].callback(None)
    assert world.keeper.state == "connected" and world.keeper.failures == 0
    world.keeper.start()                    # nothing more: one connection
    assert world.keeper.state == "connected" and not world.endpoint.pending


def test_a_lost_connection_is_made_again_after_the_policy_s_delay(world):
    world.keeper.start()
    proto = world.connected()
    proto.lose()
    assert world.keeper.state == "waiting" and not world.endpoint.pending
    world.clock.advance(0.99)
    assert not world.endpoint.pending
    world.clock.advance(0.01)               # retry_policy(1) == 1.0
    assert world.keeper.state == "connecting" and len(world.endpoint.pending) == 1
    world.connected()
    assert world.keeper.state == "connected" and world.keeper.failures == 0


def test_failed_attempts_back_off_and_are_reported(world):
    world.keeper.start()
    for attempt in (1, 2, 3):
        world.endpoint.refuse()
        assert world.keeper.state == "waiting" and world.keeper.failures == attempt
        world.clock.advance(attempt - 0.01)
        assert not world.endpoint.pending
        world.clock.advance(0.01)
    assert [type(e) for e in world.unreachable] == [ConnectionRefusedError] * 3
    world.connected()
    assert world.keeper.failures == 0       # the next loss starts from 1 again
    world.handshakes[-1][0].lose()
    assert world.clock.getDelayedCalls()[0].getTime() == world.clock.seconds() + 1


def test_a_failed_handshake_closes_its_connection_and_retries(world):
    world.keeper.start()
    proto = world.endpoint.accept()
    world.handshakes[0][1].errback(ValueError("refused by the server"))
    assert proto.transport.closing and world.keeper.state == "waiting"
    proto.lose()                            # its loss, after: nothing more
    assert world.keeper.state == "waiting" and len(world.clock.getDelayedCalls()) == 1
    assert world.unreachable == []          # a handshake is not an unreachable server
    world.clock.advance(1)
    assert len(world.endpoint.pending) == 1


def test_a_connection_lost_during_its_handshake_is_one_retry(world):
    """The loss comes first (ClientProtocol tells its owner before its questions
    fail), then the handshake's failure: one retry, not two."""
    world.keeper.start()
    proto = world.endpoint.accept()
    proto.lose()
    assert world.keeper.state == "handshaking"
    world.handshakes[0][1].errback(ConnectionRefusedError("lost"))
    assert world.keeper.state == "waiting" and world.keeper.failures == 1
    assert len(world.clock.getDelayedCalls()) == 1


def test_a_handshake_that_succeeds_after_its_connection_was_lost_is_a_loss(world):
    world.keeper.start()
    proto = world.endpoint.accept()
    proto.lose()
    world.handshakes[0][1].callback(None)
    assert world.keeper.state == "waiting" and len(world.clock.getDelayedCalls()) == 1


def test_stop_while_waiting_cancels_the_retry(world):
    world.keeper.start()
    world.endpoint.refuse()
    assert fired(world.keeper.stop()) == [None]
    assert world.keeper.state == "stopped" and world.clock.getDelayedCalls() == []
    world.clock.advance(100)
    assert not world.endpoint.pending


def test_stop_while_connecting_cancels_the_attempt(world):
    world.keeper.start()
    done = fired(world.keeper.stop())
    assert world.endpoint.cancelled == 1 and done == [None]
    assert world.keeper.state == "stopped" and world.unreachable == []
    assert world.clock.getDelayedCalls() == []


def test_stop_while_connecting_an_attempt_that_connects_anyway_closes_it(world):
    """An endpoint whose attempt, being cancelled, answers with its connection."""
    proto = Proto(world)
    proto.transport = Transport(proto)

    class Late:
        def connect(self, factory):
            return Deferred(lambda d: d.callback(proto))
    world.keeper.endpoint = Late()
    world.keeper.start()
    done = fired(world.keeper.stop())
    assert proto.transport.closing and done == [] and world.handshakes == []
    proto.lose()
    assert done == [None] and world.keeper.state == "stopped"


@pytest.mark.parametrize("handshaken", [False, True])
def test_stop_while_connected_or_handshaking_ends_at_the_connection_s_loss(world, handshaken):
    world.keeper.start()
    proto = world.connected() if handshaken else world.endpoint.accept()
    done = fired(world.keeper.stop())
    assert proto.transport.closing and done == [] and world.keeper.state == "stopping"
    proto.lose()
    assert done == [None] and world.keeper.state == "stopped"
    if not handshaken:                      # its handshake fails with the loss: no retry
        world.handshakes[0][1].errback(ConnectionRefusedError("lost"))
    assert world.clock.getDelayedCalls() == [] and not world.endpoint.pending
    assert world.keeper.state == "stopped"


def test_stop_after_a_loss_during_the_handshake_ends_at_once(world):
    world.keeper.start()
    proto = world.endpoint.accept()
    proto.lose()
    assert fired(world.keeper.stop()) == [None]
    world.handshakes[0][1].errback(ConnectionRefusedError("lost"))
    assert world.keeper.state == "stopped" and world.clock.getDelayedCalls() == []


def test_start_while_stopping_starts_again_once_stopped(world):
    world.keeper.start()
    proto = world.connected()
    first, second = fired(world.keeper.stop()), fired(world.keeper.stop())
    world.keeper.start()
    assert world.keeper.state == "stopping"
    proto.lose()
    assert first == second == [None]
    assert world.keeper.state == "connecting" and len(world.endpoint.pending) == 1


def test_a_new_endpoint_is_used_from_the_next_attempt(world):
    world.keeper.start()
    world.endpoint.refuse()
    other = world.keeper.endpoint = Endpoint()
    world.clock.advance(1)
    assert len(other.pending) == 1 and not world.endpoint.pending


def test_an_endpoint_that_raises_is_an_unreachable_server(world):
    class Raising:
        def connect(self, factory):
            raise OSError("no route")
    world.keeper.endpoint = Raising()
    world.keeper.start()
    assert world.keeper.state == "waiting" and isinstance(world.unreachable[0], OSError)


def test_stop_when_stopped_and_a_cancelled_attempt_are_quiet(world):
    assert fired(world.keeper.stop()) == [None]
    world.keeper.endpoint = type("E", (), {"connect": lambda self, f: fail(CancelledError())})()
    world.keeper.start()                    # a cancellation not of ours: a failure as any
    assert world.keeper.state == "waiting"


def test_backoff_grows_to_its_cap_with_jitter():
    policy = backoff(initial=0.05, maximum=5.0, factor=1.5, jitter=lambda: 0.0)
    delays = [policy(n) for n in range(1, 30)]
    assert delays[0] == pytest.approx(0.075) and delays == sorted(delays)
    assert delays[-1] == 5.0 and policy(10**6) == 5.0
    assert 0.075 <= backoff()(1) <= 0.075 + 0.25
