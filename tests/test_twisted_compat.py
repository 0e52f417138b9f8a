"""Every private Twisted name zeotwist uses (all in zeotwist/twistedcompat.py
and, the socket transports' ones, zeotwist/transportcompat.py) still exists
and still does what we rely on.  When one of these fails after a Twisted
upgrade, fix that module and the Twisted range in pyproject.toml.
"""
import inspect

import pytest
from twisted.internet import abstract, tcp
from twisted.internet.base import ReactorBase
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IReactorCore
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogBeginner, LogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.runtime import platform

from zeotwist import transportcompat, twistedcompat as compat


def connected_amp():
    proto = amp.AMP()
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


class Receiver:
    def __init__(self):
        self.boxes, self.failures = [], []

    def addErrback(self, *a, **kw):
        return self

    def callback(self, box):
        self.boxes.append(box)

    def errback(self, failure):
        self.failures.append(failure)


def test_amp_answer_receiver_gets_the_answer_box():
    proto, transport = connected_amp()
    receiver = Receiver()
    tag = compat.amp_expect_answer(proto, receiver)
    assert isinstance(tag, bytes) and compat.amp_is_outstanding(proto, tag)
    assert compat.amp_awaits_answers(proto)
    proto.dataReceived(amp.AmpBox({amp.ANSWER: tag, b"x": b"1"}).serialize())
    assert [dict(b) for b in receiver.boxes] == [{amp.ANSWER: tag, b"x": b"1"}]
    assert not compat.amp_is_outstanding(proto, tag)
    assert not compat.amp_awaits_answers(proto)


def test_amp_answer_receiver_under_a_tag_of_another_thread():
    proto, transport = connected_amp()
    receiver = Receiver()
    compat.amp_expect_answer_from_thread(proto, b"t1", receiver)
    assert compat.amp_is_outstanding(proto, b"t1")
    proto.dataReceived(amp.AmpBox({amp.ANSWER: b"t1", b"x": b"2"}).serialize())
    assert [dict(b) for b in receiver.boxes] == [{amp.ANSWER: b"t1", b"x": b"2"}]


def test_amp_take_receiver_only_of_the_kind_asked_for():
    proto, transport = connected_amp()
    receiver, other = Receiver(), Receiver()
    receiver.answered = True
    compat.amp_expect_answer_from_thread(proto, b"t1", receiver)
    compat.amp_expect_answer_from_thread(proto, b"t2", other)
    assert compat.amp_take_receiver(proto, b"t2", "answered") is None
    assert compat.amp_is_outstanding(proto, b"t2")                 # left where it was
    assert compat.amp_take_receiver(proto, b"t1", "answered") is receiver
    assert not compat.amp_is_outstanding(proto, b"t1")
    assert compat.amp_take_receiver(proto, b"t1", "answered") is None


def test_amp_forget_answer_only_of_the_receiver_given():
    proto, transport = connected_amp()
    receiver, other = Receiver(), Receiver()
    compat.amp_expect_answer_from_thread(proto, b"t1", receiver)
    compat.amp_forget_answer(proto, b"t1", other)                   # not its receiver
    assert compat.amp_is_outstanding(proto, b"t1")
    compat.amp_forget_answer(proto, b"t1", receiver)
    assert not compat.amp_is_outstanding(proto, b"t1") and not compat.amp_awaits_answers(proto)
    compat.amp_forget_answer(proto, b"t1", receiver)                # gone already: nothing


def test_calls_pending_until_the_reactor_ran_them():
    reactor = compat.private_reactor()      # a real one, never run
    assert hasattr(reactor, "threadCallQueue") and not compat.calls_pending(reactor)
    reactor.callFromThread(lambda: None)
    assert compat.calls_pending(reactor)
    reactor.runUntilCurrent()
    assert not compat.calls_pending(reactor)


def test_amp_closed_after_connection_lost_and_receivers_fail():
    proto, transport = connected_amp()
    receiver = Receiver()
    compat.amp_expect_answer(proto, receiver)
    assert not compat.amp_closed(proto) and not compat.amp_switched(proto)
    proto.connectionLost(Failure(Exception("gone")))
    assert compat.amp_closed(proto)
    assert len(receiver.failures) == 1
    assert not compat.amp_is_outstanding(proto, b"1")     # no table any more


def test_amp_connection_made_and_lost_quietly_as_amp_but_for_the_log():
    """AMP's own makeConnection/connectionLost log the addresses as reprs
    (still true, else the quiet versions are not needed) and do nothing
    else that the quiet versions leave out."""
    publisher, said = LogPublisher(), []
    publisher.addObserver(said.append)
    old = amp._log
    amp._log = Logger(namespace="twisted.protocols.amp", observer=publisher)
    try:
        loud, quiet = amp.AMP(), amp.AMP()
        loud.makeConnection(StringTransport())
        transport = StringTransport()
        compat.amp_make_connection_quietly(quiet, transport)
        assert len(said) == 1 and "PEER:" in said[0]["log_format"]
        assert quiet.transport is transport and quiet.boxReceiver is quiet
        receiver = Receiver()
        compat.amp_expect_answer(quiet, receiver)
        loud.connectionLost(Failure(Exception("gone")))
        compat.amp_connection_lost_quietly(quiet, Failure(Exception("gone")))
        assert len(said) == 2
        assert quiet.transport is None and compat.amp_closed(quiet)
        assert len(receiver.failures) == 1
    finally:
        amp._log = old


def test_amp_send_box_one_way_and_asked():
    proto, transport = connected_amp()
    assert compat.amp_send_box(proto, b"Ping", amp.AmpBox({b"a": b"b"}), False) is None
    [box] = amp.parseString(transport.value())
    assert box == {b"_command": b"Ping", b"a": b"b"}
    transport.clear()
    d = compat.amp_send_box(proto, b"Ping", amp.AmpBox(), True)
    [box] = amp.parseString(transport.value())
    proto.dataReceived(amp.AmpBox({amp.ANSWER: box[amp.ASK], b"r": b"s"}).serialize())
    assert d.result[b"r"] == b"s"


def test_amp_field_encoding_round_trips():
    arglist = [(b"n", amp.Integer()), (b"s", amp.Unicode())]
    box = compat.amp_encode_fields({"n": 5, "s": "é"}, arglist, None)
    assert isinstance(box, amp.AmpBox) and box == {b"n": b"5", b"s": "é".encode()}
    assert compat.amp_decode_fields(box, arglist, None) == {"n": 5, "s": "é"}


def test_transport_buffers():
    fd = abstract.FileDescriptor(reactor=MemoryReactorClock())
    fd.connected = True
    for name in ("_tempDataBuffer", "_tempDataLen", "_writeDisconnected", "dataBuffer",
                 "offset"):
        assert hasattr(fd, name), name
    assert transportcompat.nothing_queued(fd) and transportcompat.pending_output(fd) == 0
    assert transportcompat.idle_seen_from_thread(fd)
    fd.write(b"abc")
    assert not transportcompat.nothing_queued(fd) and transportcompat.pending_output(fd) == 3
    assert not transportcompat.idle_seen_from_thread(fd)
    fd.dataBuffer, fd._tempDataBuffer = b"abc", []     # doWrite moved it, not yet sent
    assert not transportcompat.idle_seen_from_thread(fd)
    fd.dataBuffer, fd._tempDataLen = b"", 0
    transportcompat.discard_output(fd)
    assert transportcompat.nothing_queued(fd) and transportcompat.pending_output(fd) == 0


class _Socketish(abstract.FileDescriptor):
    """A FileDescriptor whose socket takes at most ``take`` bytes a call."""

    def __init__(self, take):
        super().__init__(reactor=MemoryReactorClock())
        self.connected, self.take, self.sent = True, take, []

    def writeSomeData(self, data):
        self.sent.append(data)
        return min(len(data), self.take)

    def startWriting(self):
        pass

    def stopWriting(self):
        pass

    def getPeer(self):
        return None

    getHost = getPeer


def test_adopted_output_is_sent_from_the_object_itself():
    data = bytes(range(256)) * (3 * 2**20 // 256)          # 3 MiB
    fd = _Socketish(take=700_000)
    assert transportcompat.adopt_output(fd, data)
    assert fd.dataBuffer is data and transportcompat.pending_output(fd) == len(data)
    fd.write(b"tail")                                      # queued behind it, in order
    while transportcompat.pending_output(fd):
        fd.doWrite()
    # doWrite slices the adopted object itself (no copy) until less than
    # SEND_LIMIT of it is left, then joins that rest with what follows
    assert fd.sent[0] is data
    assert isinstance(fd.sent[1], memoryview) and fd.sent[1].obj is data
    assert b"".join(bytes(s[:fd.take]) for s in fd.sent) == data + b"tail"
    assert fd.SEND_LIMIT == transportcompat.BULK_SEND


def test_queued_pieces_are_sent_one_by_one_never_joined_together():
    """unjoined_writes: 1 MiB values queued behind each other go out from
    the objects themselves, small ones joined; Twisted's doWrite alone joins
    all of them into one new buffer (a copy of everything queued)."""
    pieces = [bytes([i]) * 2**20 for i in range(3)]
    fd = _Socketish(take=300_000)
    transportcompat.unjoined_writes(fd)
    transportcompat.unjoined_writes(fd)                              # idempotent
    limit = fd.SEND_LIMIT
    for piece in pieces:
        fd.write(b"head")
        fd.write(piece)
    fd.write(b"tail")
    buffers = []
    while transportcompat.pending_output(fd):
        fd.doWrite()
        buffers.append(fd.dataBuffer)
    assert max(len(b) for b in buffers) == 2**20            # never two of them together
    assert all(any(b is piece for b in buffers) for piece in pieces)
    assert b"".join(bytes(s[:fd.take]) for s in fd.sent) == \
        b"".join(b"head" + piece for piece in pieces) + b"tail"
    assert fd.SEND_LIMIT == limit and fd.dataBuffer == b"" and fd._tempDataLen == 0


def _file_of(tmp_path, data: bytes) -> int:
    import os
    path = tmp_path / ("piece-%d" % len(os.listdir(str(tmp_path))))
    path.write_bytes(data)
    return os.open(str(path), os.O_RDONLY)


def test_file_pieces_are_sent_from_their_files_in_order_with_bytes(tmp_path):
    """queue_file_piece: a FilePiece queued between bytes is sent from its
    file when its turn comes, as much as the socket takes per doWrite
    (the rest read again at the next), counted in pending_output until
    sent; its file is closed once sent.  Nothing of it is ever a buffer
    of the transport."""
    import os
    import socket
    from zeotwist.fileio import FilePiece
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**16)
    data = os.urandom(3 * 2**20 + 7)
    fd = _Socketish(take=0)
    fd.socket = ours
    fd.getHandle = lambda: ours
    fd.writeSomeData = lambda b: ours.send(b)
    assert transportcompat.sends_files(fd) and not transportcompat.sends_files(StringTransport())
    fd.write(b"head")                                   # queued: the piece waits for it
    piece = FilePiece(_file_of(tmp_path, data), 5, len(data) - 5)
    transportcompat.queue_file_piece(fd, piece)
    fd.write(b"tail")
    assert transportcompat.pending_output(fd) == len(data) - 5 + 8
    got, turns = bytearray(), 0
    while transportcompat.pending_output(fd):
        assert not any(len(b) > 4 for b in fd._tempDataBuffer if type(b) is bytes)
        assert len(fd.dataBuffer) <= 4                  # never the piece's bytes
        assert fd.doWrite() is None
        turns += 1
        while True:                                     # the peer reads all it can
            try:
                got += theirs.recv(2**20)
            except BlockingIOError:
                break
    assert bytes(got) == b"head" + data[5:] + b"tail"
    assert turns > 3 and piece.fd == -1                 # the socket was full, the file closed
    assert fd._tempDataLen == 0 and fd.dataBuffer == b""
    ours.close()
    theirs.close()


def test_file_piece_sent_at_once_to_an_idle_socket_and_closed_when_dropped(tmp_path):
    """To an idle socket transport a piece goes at once, as far as the
    socket takes it; a piece cut short by its file fails the connection's
    doWrite; discard_output closes the files of the pieces it drops."""
    import os
    import socket
    from twisted.internet import main
    from zeotwist.fileio import FilePiece
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    fd = _Socketish(take=0)
    fd.socket = ours
    fd.getHandle = lambda: ours
    small = FilePiece(_file_of(tmp_path, b"x" * 1000), 0, 1000)
    transportcompat.queue_file_piece(fd, small)
    assert theirs.recv(2000) == b"x" * 1000 and small.fd == -1
    assert transportcompat.nothing_queued(fd)
    short = FilePiece(_file_of(tmp_path, b"y" * 10), 0, 20)      # the file ends early
    transportcompat.queue_file_piece(fd, short)         # 10 bytes sent, then its end met
    assert theirs.recv(100) == b"y" * 10 and transportcompat.pending_output(fd) == 10
    assert fd.doWrite() is main.CONNECTION_LOST
    dropped = FilePiece(_file_of(tmp_path, b"z" * 10), 0, 10)
    fd.write(b"busy")
    transportcompat.queue_file_piece(fd, dropped)
    transportcompat.discard_output(fd)
    assert dropped.fd == -1 and transportcompat.pending_output(fd) == 0
    ours.close()
    theirs.close()


def test_output_is_adopted_only_by_an_idle_socket_transport():
    fd = _Socketish(take=10)
    fd.write(b"queued")
    assert not transportcompat.adopt_output(fd, b"x" * 10)          # behind queued bytes: no
    assert not transportcompat.adopt_output(StringTransport(), b"x")   # not a socket transport


def test_read_size_sets_and_restores_the_recv_size():
    fd = _Socketish(take=10)
    default = fd.bufferSize
    assert "self.bufferSize" in inspect.getsource(tcp.Connection.doRead)
    transportcompat.read_size(fd, 2**20)
    assert fd.bufferSize == 2**20
    transportcompat.read_size(fd)
    assert fd.bufferSize == default == abstract.FileDescriptor.bufferSize
    transportcompat.read_size(StringTransport(), 2**20)             # nothing for other transports


def test_socket_send_is_the_socket_transports_socket_send():
    import socket
    ours, theirs = socket.socketpair()
    fd = _Socketish(take=10)
    fd.socket = ours
    assert "self.socket.send" in inspect.getsource(tcp.Connection.writeSomeData)
    assert transportcompat.socket_send(fd)(b"abc") == 3 and theirs.recv(3) == b"abc"
    assert transportcompat.socket_send(StringTransport()) is None   # not a socket transport
    assert transportcompat.socket_send(None) is None
    ours.close()
    theirs.close()


def test_read_into_takes_what_has_arrived_on_the_socket_without_waiting():
    import socket
    ours, theirs = socket.socketpair()
    ours.setblocking(False)                               # as Twisted's sockets are
    fd = _Socketish(take=10)
    fd.getHandle = lambda: ours
    assert "self.socket.recv" in inspect.getsource(tcp.Connection.doRead)
    view = memoryview(bytearray(10))
    assert transportcompat.read_into(fd, view) == 0                # nothing yet: no wait
    theirs.sendall(b"abcdefghijklmn")
    assert transportcompat.read_into(fd, view) == 10 and bytes(view) == b"abcdefghij"
    theirs.close()
    assert transportcompat.read_into(fd, view[:8]) == 4 and bytes(view[:4]) == b"klmn"
    assert transportcompat.read_into(fd, view) == 0 and ours.recv(1) == b""   # the end stays
    assert transportcompat.read_into(StringTransport(), view) == 0  # not a socket transport
    ours.close()


def test_tls_flush_clock_is_moved():
    from twisted.internet.ssl import optionsForClientTLS
    from twisted.protocols.tls import TLSMemoryBIOFactory
    first, second = Clock(), Clock()
    factory = TLSMemoryBIOFactory(optionsForClientTLS("example.com"), True,
                                  Factory.forProtocol(Protocol), clock=first)
    tls = factory.buildProtocol(None)
    tls.makeConnection(StringTransport())
    assert tls._aggregator._clock is first and tls._aggregator._scheduled is None
    compat.set_tls_flush_clock(tls, second)
    assert tls._aggregator._clock is second
    tls._aggregator.write(b"x")
    assert second.getDelayedCalls() and not first.getDelayedCalls()


def test_port_logger_is_what_accept_errors_go_through():
    port = tcp.Port(0, Factory.forProtocol(Protocol), interface="127.0.0.1",
                    reactor=MemoryReactorClock())
    assert isinstance(compat.port_logger(port), Logger)
    assert "self._logger" in inspect.getsource(tcp.Port.doRead)
    replacement = Logger(namespace="x")
    compat.set_port_logger(port, replacement)
    assert compat.port_logger(port) is replacement


def test_private_reactor_is_the_platform_default_class():
    cls = compat.default_reactor_class()
    assert IReactorCore.implementedBy(cls)
    if platform.isLinux():
        from twisted.internet.epollreactor import EPollReactor
        assert cls is EPollReactor
    assert ReactorBase._registerAsIOThread is True
    reactor = compat.private_reactor()
    assert isinstance(reactor, cls) and reactor._registerAsIOThread is False


def test_exit_signal_is_what_twistd_exits_with_and_can_be_forgotten():
    import signal

    from twisted.application import app
    from twisted.internet import base
    from twisted.scripts import twistd
    reactor = compat.private_reactor()
    try:
        assert compat.stopped_by_signal(reactor) is None
        reactor.sigTerm(signal.SIGTERM, None)           # what the SIGTERM handler does
        assert compat.stopped_by_signal(reactor) == signal.SIGTERM
        compat.forget_exit_signal(reactor)
        assert compat.stopped_by_signal(reactor) is None
        compat.set_exit_signal(reactor, signal.SIGINT)
        assert compat.stopped_by_signal(reactor) == signal.SIGINT
        # the handlers a running reactor installs, and the logger they log through
        assert compat.reactor_signal_handlers(reactor)[signal.SIGTERM] == reactor.sigTerm
        assert "self.sigTerm" in inspect.getsource(ReactorBase._signalsFactory)
        assert compat.reactor_logger() is base._log
        # twistd takes the reactor's _exitSignal and ends the process with it
        assert "reactor._exitSignal" in inspect.getsource(app.ApplicationRunner.startReactor)
        assert "_exitWithSignal" in inspect.getsource(twistd.runApp)
    finally:
        reactor.disconnectAll()
        for reader in reactor.getReaders():
            reactor.removeReader(reader)


def test_logging_begun(monkeypatch):
    import io
    import types
    import warnings

    import twisted.logger
    fake_sys = types.SimpleNamespace(stdout=io.StringIO(), stderr=io.StringIO())
    fake_warnings = types.SimpleNamespace(showwarning=warnings.showwarning)
    beginner = LogBeginner(LogPublisher(), io.StringIO(), fake_sys, fake_warnings)
    monkeypatch.setattr(twisted.logger, "globalLogBeginner", beginner)
    assert not compat.logging_begun()
    beginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    assert compat.logging_begun()


def test_value_now_only_of_a_deferred_fired_with_a_value():
    from twisted.internet.defer import Deferred, fail, succeed
    assert compat.value_now(succeed(5)) == 5
    d = Deferred()
    d.callback(None)
    assert compat.value_now(d) is None
    waiting = Deferred()
    assert compat.value_now(waiting) is waiting
    failed = fail(ValueError("no"))
    assert compat.value_now(failed) is failed
    failed.addErrback(lambda f: None)
    paused = succeed(1)
    paused.pause()
    assert compat.value_now(paused) is paused
    outer, inner = Deferred(), Deferred()
    outer.addCallback(lambda _: inner)
    outer.callback(None)
    assert compat.value_now(outer) is outer      # waits for inner
    inner.callback(7)
    assert compat.value_now(outer) == 7


@pytest.mark.parametrize("name", ["amp_make_connection_quietly", "amp_connection_lost_quietly",
                                  "amp_closed", "amp_switched", "amp_expect_answer",
                                  "amp_is_outstanding", "amp_expect_answer_from_thread", "amp_forget_answer",
                                  "calls_pending", "idle_seen_from_thread", "amp_take_receiver",
                                  "amp_send_box", "amp_encode_fields",
                                  "amp_decode_fields", "nothing_queued", "pending_output",
                                  "discard_output", "read_into", "socket_send",
                                  "sends_files", "queue_file_piece",
                                  "set_tls_flush_clock", "port_logger", "private_reactor",
                                  "logging_begun", "stopped_by_signal", "forget_exit_signal",
                                  "value_now"])
def test_every_helper_is_tested_here(name):
    assert ("compat.%s(" % name) in inspect.getsource(inspect.getmodule(test_logging_begun))
