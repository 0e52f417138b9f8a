"""The session's fast answers: the commands of every load and every commit,
handled without AMP's dispatch.

A mixin of :class:`~zeotwist.server.session.ServerSession`.  A plain
``LoadBefore`` is read straight from the bytes (:meth:`FastAnswers.fast_frame`,
called by :class:`~zeotwist.wire.framing.BoundedAMP`) or from its box; a
plain ``StoreData`` or ``TpcBegin`` goes to its responder; a plain ``Vote``
or ``Finish`` is answered with the same answer and error boxes as AMP's
path.  The byte layouts are :mod:`zeotwist.wire.fast`'s.  Anything unusual
(bad sizes, errors to map, big records) is left to AMP's ordinary path,
which validates and maps errors.

Runs on the reactor thread.
"""
from twisted.internet.defer import Deferred, fail
from twisted.protocols import amp
from twisted.python.failure import Failure

from zeotwist import twistedcompat
from zeotwist.errors import RemoteProtocolError
from zeotwist.server.prefetch import may_reference
from zeotwist.wire import commands as C
from zeotwist.wire import boxlayout, commitframes, loadframes
from zeotwist.wire.commitframes import match_commit_question
from zeotwist.wire.sending import BULK_MIN


class FastAnswers:
    """Loads and the commit's commands without AMP's dispatch (see the module)."""

    def fast_frame(self, buf: bytes, off: int) -> int:
        """The hottest path (see BoundedAMP._parse): a LoadBefore question,
        or one of a commit's (TpcBegin, StoreData, Vote, Finish), read
        straight from the bytes, without a box; 0 for anything else."""
        if self._held is not None or self.server is None:
            return 0
        request = loadframes.match_load_before_request(buf, off)
        if request is not None:
            if not self._answer_load(*request[:3]):
                return 0                     # the box is read as usual
            end = request[3]
        else:
            question = match_commit_question(buf, off)
            if question is None:
                return 0
            kind, fields, end = question
            self.COMMIT_FRAMES[kind](self, fields)
        self._pause_if_over_budget()
        return end

    def _fast_load(self, box) -> bool:
        request = loadframes.read_load_before_request(box)
        return request is not None and self._answer_load(*request)

    def _answer_load(self, ask: bytes, oid: bytes, tid: bytes) -> bool:
        """Answer LoadBefore ``ask``; False when AMP's path must (an error to
        map, a record too big for one value to this client)."""
        try:
            r = self.server.storage.loadBefore(oid, tid)
        except Exception:
            return False
        if r is not None and len(r[0]) > (
                boxlayout.MAX_LONG_VALUE if self.long_values else boxlayout.MAX_VALUE):
            return False                     # AMP's path splits it (and prefetches)
        prefetched = self._prefetch(oid, r, tid)
        self.server.stats["loads"] += 1
        if r is None or len(r[0]) < BULK_MIN:
            self.emit(loadframes.load_before_answer(ask, r, prefetched, self.long_values))
        else:           # a big record is written from its own object, not copied
            self.emit_parts(*loadframes.load_before_answer_parts(ask, r, prefetched, self.long_values))
        return True

    def _prefetch(self, oid: bytes, r: tuple, tid: bytes) -> bytes | None:
        """The ``prefetch`` value to add to the answer ``r`` (zeotwist.server.prefetch)."""
        prefetcher = self.prefetcher
        if prefetcher is None or r is None:
            return None
        prefetcher.answered(oid, r[2])
        if not may_reference(r[0]):
            return None             # a leaf record (most of them): nothing to look for
        before = prefetcher.records
        value = prefetcher.collect(self.server.storage.loadBefore, oid, r[0], tid)
        self.server.traffic["prefetched"] += prefetcher.records - before
        return value

    def _fast_store(self, box) -> bool:
        """A plain StoreData, handled without AMP's dispatch (every commit)."""
        data = commitframes.read_store_data(box)
        return data is not None and self._one_way(self.store_data, data)

    def _fast_begin(self, box) -> bool:
        """A plain TpcBegin (no restore tid or status), likewise."""
        fields = commitframes.read_tpc_begin(box)
        return fields is not None and self._one_way(self.tpc_begin, *fields)

    def _fast_ask(self, box) -> bool:
        """A plain Vote or Finish question (every commit), answered without
        AMP's dispatch and its Deferreds: the same answer and error boxes
        as AMP's path (``makeResponse``; the code of the command's first
        error class that matches), anything unusual left to that path."""
        name = box.get(amp.COMMAND)
        if name == C.Finish.commandName and len(box) == 2:
            command, call, args = C.Finish, self._finish_now, ()
        elif name == C.Vote.commandName and (len(box) == 2 or len(box) == 3 and box.get(
                b"can_resolve") in (b"True", b"False")):
            command, call = C.Vote, self.vote
            args = (box.get(b"can_resolve") == b"True",)
        else:
            return False
        tag = box.get(amp.ASK)
        if tag is None:
            return False
        self._ask_now(command, call, (tag,) if command is C.Finish else args, tag)
        return True

    def _ask_now(self, command, call, args: tuple, tag: bytes) -> None:
        """Answer the question ``tag``, ``call(*args)`` (Vote or Finish:
        its answer, or a Deferred of it)."""
        try:
            d = call(*args)
        except (RemoteProtocolError, KeyError, TypeError, ValueError) as e:   # as guarded
            self.protocolViolation("bad arguments to %s: %s"
                                   % (command.commandName.decode("ascii"), e))
            return
        except Exception:
            d = fail()
        if d is None:                       # answered already (_finish_now)
            return
        if not isinstance(d, Deferred):     # answered at once (a small commit)
            try:
                self._fast_answer(d, command, tag)
            except Exception:
                self.unhandledError(Failure())
            return
        d.addCallbacks(self._fast_answer, self._fast_error, (command, tag), None, (command, tag))
        d.addErrback(self.unhandledError)

    def _finish_now(self, tag: bytes):
        """Finish, its answer written as soon as the commit is fanned out
        (TransactionResponders._finished), with what this burst answered
        before it, not at the burst's end; else as ``finish``."""
        return self.finish(lambda tid: self._write_finish_answer(tag, tid))

    def _write_finish_answer(self, tag: bytes, tid: bytes) -> None:
        if not twistedcompat.amp_switched(self) and self.transport is not None:
            self.emit(commitframes.finish_answer(tag, tid))
            self.flush_batch()

    def _fast_answer(self, result: dict, command, tag: bytes) -> None:
        frame = None
        if command is C.Finish:
            frame = commitframes.finish_answer(tag, result["tid"])
        elif not result["conflicts"] and "to_resolve" not in result:
            frame = commitframes.vote_answer(tag, result["resolved"])
        if frame is None:           # conflicts, big lists: AMP's encoding
            answer = command.makeResponse(result, self)
            answer[amp.ANSWER] = tag
            self._send_answer(answer)
        elif not twistedcompat.amp_switched(self) and self.transport is not None:
            self.emit(frame)        # (as sendBox: nothing once switched or lost)

    def _fast_error(self, failure, command, tag: bytes) -> None:
        for error, code in command.allErrors.items():
            if failure.check(error):
                break
        else:
            return failure          # as AMP's path: logged, the link dropped
        answer = amp.QuitBox() if error in command.fatalErrors else amp.AmpBox()
        answer[amp.ERROR] = tag
        answer[amp.ERROR_CODE] = code
        answer[amp.ERROR_DESCRIPTION] = str(failure.value).encode("utf-8", "replace")
        self._send_answer(answer)

    def _send_answer(self, answer) -> None:
        try:
            self.sendBox(answer)
        except (amp.ProtocolSwitched, amp.ConnectionLost):   # as AMP's _safeEmit
            pass

    def _one_way(self, responder, *args) -> bool:
        try:
            responder(*args)
        except Exception:           # as AMP's path: a one-way command failed
            self.unhandledError(Failure())
        return True


#: what match_commit_question found -> its handler (fast_frame), given its fields
FastAnswers.COMMIT_FRAMES = {
    commitframes.BEGIN: lambda self, fields: self._one_way(self.tpc_begin, *fields),
    commitframes.STORE: lambda self, piece: self._one_way(self.store_data, piece),
    commitframes.VOTE: lambda self, tag: self._ask_now(C.Vote, self.vote, (True,), tag),
    commitframes.FINISH: lambda self, tag: self._ask_now(C.Finish, self._finish_now, (tag,), tag),
}

#: command name -> the fast path that may handle its box (ServerSession.ampBoxReceived)
FastAnswers.FAST_BOXES = {
    C.LoadBefore.commandName: FastAnswers._fast_load,
    C.StoreData.commandName: FastAnswers._fast_store,
    C.TpcBegin.commandName: FastAnswers._fast_begin,
    C.Vote.commandName: FastAnswers._fast_ask,
    C.Finish.commandName: FastAnswers._fast_ask,
}
