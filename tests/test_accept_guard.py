"""AcceptGuard (pure logic, a fake port and a Clock): accept errors back off
and log one line per interval; other port events pass through untouched.
The live version is tests/test_limits_live.py's accept-error test."""
from twisted.internet.task import Clock
from twisted.logger import Logger, globalLogPublisher

from zeotwist.server.limits import AcceptGuard, RefusedConnection


class FakePort:
    def __init__(self):
        self.seen = []
        self._logger = Logger(namespace="twisted.internet.tcp.Port", observer=self.seen.append)
        self.connected = True
        self.reading = True
        self.pauses = 0

    def stopReading(self):
        self.reading = False
        self.pauses += 1

    def startReading(self):
        self.reading = True


def accept_failed(port, error="EMFILE"):
    port._logger.info("Could not accept new connection ({acceptError})", acceptError=error)


def warnings(events):
    return [e for e in events if e.get("log_namespace") == "zeotwist.server.limits"]


def test_failed_accepts_pause_the_port_with_a_growing_delay():
    clock, port = Clock(), FakePort()
    guard = AcceptGuard.install(port, clock)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        delays = []
        for _ in range(8):
            accept_failed(port)
            assert not port.reading
            delays.append(guard.pause)
            clock.advance(guard.pause)
            assert port.reading                 # accepting resumes after the pause
        assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
        clock.advance(60)                       # a quiet spell: back to the short pause
        accept_failed(port)
        assert guard.pause == AcceptGuard.MIN_PAUSE
        # Failures while paused do not stack up timers.
        accept_failed(port)
        assert len(clock.getDelayedCalls()) == 1
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert port.seen == []                      # Twisted's own lines are swallowed
    assert len(warnings(events)) == 2           # at the start, and after the quiet minute
    guard.stop()
    assert clock.getDelayedCalls() == []


def test_emfile_rounds_log_once_and_other_events_pass():
    clock, port = Clock(), FakePort()
    AcceptGuard.install(port, clock)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for i in range(100):
            port._logger.info("EMFILE encountered; releasing reserved file descriptor.")
            port._logger.info("EMFILE recovery: Closed socket from {address}", address=i)
            port._logger.info("Re-reserving EMFILE recovery file descriptor.")
        port._logger.info("something else")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["log_format"] for e in port.seen] == ["something else"]
    assert len(warnings(events)) == 1 and port.reading


def test_a_port_without_a_logger_is_left_alone():
    assert AcceptGuard.install(object(), Clock()) is None


def test_a_refused_connection_is_aborted():
    class Transport:
        aborted = False

        def abortConnection(self):
            self.aborted = True
    proto = RefusedConnection()
    proto.makeConnection(Transport())
    assert proto.transport.aborted
