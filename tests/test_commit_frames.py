"""The server reads a small commit's questions (TpcBegin, StoreData, Vote,
Finish) straight from the bytes (zeotwist/wire/commitframes.py): the same
fields AMP's parser reads from those bytes, nothing for any other frame,
and no AMP box built for them by the session."""
import pytest
from twisted.internet.task import Clock
from twisted.protocols import amp
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from zeotwist.testing import call_in_memory, connect_in_memory, memory_server
from zeotwist.wire import commands as C
from zeotwist.wire import boxlayout, commitframes, loadframes
from zeotwist.wire.commitframes import BEGIN, FINISH, STORE, VOTE, match_commit_question
from zeotwist.wire.records import encode_store

FRAMES = [
    (commitframes.tpc_begin(b"jim", b"a commit", b"\x80\x03}q\x00."),
     (BEGIN, (b"jim", b"a commit", b"\x80\x03}q\x00."))),
    (commitframes.tpc_begin(b"", b"", b""), (BEGIN, (b"", b"", b""))),
    (commitframes.tpc_begin(b"u" * boxlayout.MAX_VALUE, b"", b"e"), (BEGIN, (b"u" * boxlayout.MAX_VALUE, b"", b"e"))),
    (commitframes.store_data(b"piece"), (STORE, b"piece")),
    (commitframes.store_data(b""), (STORE, b"")),
    (commitframes.store_data(b"p" * boxlayout.MAX_VALUE), (STORE, b"p" * boxlayout.MAX_VALUE)),
    (commitframes.vote_request(b"a1"), (VOTE, b"a1")),
    (commitframes.finish_request(b"a" * 30), (FINISH, b"a" * 30)),
]


def amp_reads(frame: bytes) -> tuple:
    """What AMP's own parser and the command's declaration make of ``frame``."""
    [box] = amp.parseString(frame)
    command = {BEGIN: C.TpcBegin, STORE: C.StoreData, VOTE: C.Vote, FINISH: C.Finish}[
        box[amp.COMMAND].decode()]
    args = command.parseArguments(box, None)
    if command is C.TpcBegin:
        assert args["tid"] is None and args["status"] is None
        return BEGIN, (args["user"], args["description"], args["extension"])
    if command is C.StoreData:
        return STORE, args["data"]
    if command is C.Vote:
        assert args == {"can_resolve": True}
    return command.commandName.decode(), box[amp.ASK]


@pytest.mark.parametrize("frame,expected", FRAMES)
def test_a_commit_question_is_read_as_amps_parser_reads_it(frame, expected):
    assert amp_reads(frame) == expected
    before = loadframes.load_before_request(b"9", z64, z64)
    buf = before + frame + frame
    assert match_commit_question(buf, len(before)) == expected + (len(before) + len(frame),)
    assert match_commit_question(buf, len(before) + len(frame)) == expected + (len(buf),)
    for cut in range(len(frame)):               # not whole yet: AMP's parser waits
        assert match_commit_question(frame[:cut], 0) is None


def test_other_frames_are_left_to_amps_parser():
    def frame(command, values, tag=None):
        box = amp.AmpBox(command.makeArguments(values, None))
        box[amp.COMMAND] = command.commandName
        if tag is not None:
            box[amp.ASK] = tag
        return box.serialize()
    others = [
        loadframes.load_before_request(b"1", z64, z64),
        commitframes.invalidate(z64, [z64]),
        frame(C.Vote, {"can_resolve": False}, b"1"),
        frame(C.Vote, {}, b"1"),
        frame(C.TpcBegin, {"user": b"", "description": b"", "extension": b"",
                           "tid": z64, "status": "p"}),
        commitframes.store_data(b"x" * (boxlayout.MAX_VALUE + 1), True),      # a long entry
        frame(C.Abort, {}, b"1"),
        commitframes.vote_request(b"1").replace(b"Vote", b"Votf"),
    ]
    for other in others:
        assert match_commit_question(other, 0) is None, other


def registered_session(server, clock, monkeypatch) -> tuple:
    """``(session, written)``: a session registered with ``server`` whose
    transport's writes are collected in ``written`` from now on."""
    client, session, pump, _ = connect_in_memory({"1": server}, clock)
    call_in_memory(client, pump, C.Register, protocol=C.PROTOCOL_VERSION,
                   storage="1", read_only=False)
    pump.flush()
    written = []
    monkeypatch.setattr(session.transport, "write", written.append)
    return session, written


def test_the_session_builds_no_box_for_a_commits_questions(tmp_path, monkeypatch):
    from zeotwist.server.session import ServerSession
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock)
    try:
        session, written = registered_session(server, clock, monkeypatch)
        boxes = []
        real = ServerSession.ampBoxReceived
        monkeypatch.setattr(ServerSession, "ampBoxReceived",
                            lambda self, box: boxes.append(dict(box)) or real(self, box))
        serial = z64
        for i in range(2):
            record = encode_store(z64, serial, b"data %d" % i)
            session.dataReceived(commitframes.tpc_begin(b"", b"", b"") + commitframes.store_data(record)
                                 + commitframes.vote_request(b"v%d" % i))
            assert commitframes.match_vote_answer(b"".join(written), b"v%d" % i) == {
                "resolved": [], "conflicts": b""}
            written.clear()
            session.dataReceived(commitframes.finish_request(b"f%d" % i))
            serial = commitframes.match_finish_answer(b"".join(written), b"f%d" % i)["tid"]
            written.clear()
        assert boxes == []
        assert server.storage.load(z64) == (b"data 1", serial)
    finally:
        server.close()


def test_a_small_commits_vote_and_finish_are_answered_in_the_same_call(tmp_path):
    """With the lock free and the storage calls inline, Vote and Finish
    return their answers, no Deferred (zeotwist.server.tpc: value_now); a
    vote that waits for the lock gets a Deferred, answered once it is held."""
    from twisted.internet.defer import Deferred
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock)
    try:
        sessions = []
        for _ in range(2):
            client, session, pump, _ = connect_in_memory({"1": server}, clock)
            call_in_memory(client, pump, C.Register, protocol=C.PROTOCOL_VERSION,
                           storage="1", read_only=False)
            sessions.append(session)
        first, second = sessions
        first.tpc_begin(b"", b"", b"")
        first.store_data(encode_store(z64, z64, b"one"))
        assert first.vote(True) == {"resolved": [], "conflicts": b""}
        second.tpc_begin(b"", b"", b"")
        second.store_data(encode_store(b"\0" * 7 + b"\1", z64, b"two"))
        waiting = second.vote(True)
        assert isinstance(waiting, Deferred) and not waiting.called
        answer = first.finish()
        assert answer == {"tid": server.last_tid}
        assert waiting.called and waiting.result == {"resolved": [], "conflicts": b""}
        assert second.finish() == {"tid": server.last_tid} and server.last_tid > answer["tid"]
    finally:
        server.close()


def test_a_lone_committers_finish_answer_leaves_before_the_lock_passes_on(tmp_path, monkeypatch):
    """Nobody waits for the lock with an invalidation kept back: the Finish
    answer is written as soon as the commit is fanned out, then the lock is
    released (the committer does not wait for the release); with a voter
    waiting, the lock passes on first (its invalidation and vote answer go
    out before the answer: tests/test_invalidations_later.py)."""
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock)
    try:
        (first, out1), (second, out2) = [registered_session(server, clock, monkeypatch)
                                         for _ in range(2)]
        written = [out1, out2]
        seen = []
        real = server.lock.release
        monkeypatch.setattr(server.lock, "release", lambda *a: seen.append(
            commitframes.match_finish_answer(b"".join(written[0]), b"f")) or real(*a))
        first.dataReceived(commitframes.tpc_begin(b"", b"", b"")
                           + commitframes.store_data(encode_store(z64, z64, b"one"))
                           + commitframes.vote_request(b"v"))
        written[0].clear()
        first.dataReceived(commitframes.finish_request(b"f"))
        assert seen == [{"tid": server.last_tid}]      # answered when the lock passed on
        serial = server.last_tid
        # a second client's vote waits for the lock: the old order
        seen.clear()
        written[0].clear()
        first.dataReceived(commitframes.tpc_begin(b"", b"", b"")
                           + commitframes.store_data(encode_store(z64, serial, b"two"))
                           + commitframes.vote_request(b"v"))
        written[1].clear()                              # the first commit's invalidation
        second.dataReceived(commitframes.tpc_begin(b"", b"", b"")
                            + commitframes.store_data(encode_store(b"\0" * 7 + b"\1", z64, b"x"))
                            + commitframes.vote_request(b"w"))
        assert server.lock.holder is first and written[1] == []
        written[0].clear()
        first.dataReceived(commitframes.finish_request(b"f"))
        assert seen == [None]                           # not answered yet at the release
        assert commitframes.match_finish_answer(b"".join(written[0]), b"f") == {
            "tid": server.last_tid}
        assert server.lock.holder is second
    finally:
        server.close()


def test_the_lock_passes_on_when_writing_the_early_finish_answer_raises(tmp_path, monkeypatch):
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock)
    try:
        session, _ = registered_session(server, clock, monkeypatch)
        session.dataReceived(commitframes.tpc_begin(b"", b"", b"")
                             + commitframes.store_data(encode_store(z64, z64, b"one"))
                             + commitframes.vote_request(b"v"))
        assert server.lock.holder is session

        def broken(tag, tid):
            raise RuntimeError("the write failed")
        monkeypatch.setattr(session, "_write_finish_answer", broken)
        with pytest.raises(RuntimeError):
            session._finish_now(b"f")
        assert server.lock.holder is None
        assert server.storage.load(z64)[0] == b"one"    # committed all the same
    finally:
        server.close()
