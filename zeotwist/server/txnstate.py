"""The states of a server-side transaction and every move between them.

Everything that decides whether a transaction may move lives here, as one
table (in the manner of h11's ``_state.py``): ``TRANSITIONS[state][event]``
is the state the event leads to, and an event the table does not list for
the current state raises :class:`~zeotwist.errors.TransactionStateError`.
The session asks (:meth:`TxnState.can`) where a client's command may come at
the wrong time, and answers the client; everything else just moves
(:meth:`TxnState.move`), so a bug in the server's own sequencing is a typed
error, not a silently wrong state.

::

    open --STORE--> open
    open --VOTE--> locking --LOCK_GRANTED--> voting --VOTED--> voted
    voted --FINISH--> finishing --FINISHED--> done
    finishing --FINISH_FAILED--> aborted
    open, locking, voting, voted --ABORT--> aborted

Client-side conflict resolution (``--client-conflict-resolution``, a client
that can resolve; :mod:`zeotwist.server.resolution`): the vote leaves the
conflicts to the client and keeps the commit lock, the client sends the
resolved records and votes again::

    voting --CONFLICTS_LEFT--> resolving --STORE_RESOLVED--> resolving
    resolving --VOTE--> revoting --VOTED--> voted
    resolving, revoting --ABORT--> aborted

There is no way out of ``finishing`` but the storage's answer: an abort
requested meanwhile (the connection drops) does nothing, the finish ends
the transaction either way.  ``done`` and ``aborted`` are final.

Pure logic: no I/O, no Twisted; used on the reactor thread.
"""
from enum import Enum

from zeotwist.errors import TransactionStateError


class _Fast(Enum):
    """Hashed by identity (members are singletons): the table below is
    consulted several times per commit, and Enum's own ``__hash__`` is a
    Python function (hash of the name)."""
    __hash__ = object.__hash__


class State(_Fast):
    OPEN = "open"              # TpcBegin received; stores arrive
    LOCKING = "locking"        # Vote received; waiting for the commit lock
    VOTING = "voting"          # the storage thread runs tpc_begin, the records, tpc_vote
    RESOLVING = "resolving"    # conflicts left to the client; the lock is held meanwhile
    REVOTING = "revoting"      # the storage thread stores the resolved records, tpc_vote
    VOTED = "voted"            # the vote succeeded; the lock is held until Finish or Abort
    FINISHING = "finishing"    # the storage thread runs tpc_finish
    DONE = "done"              # committed
    ABORTED = "aborted"        # discarded (the storage's tpc_abort ran if it had begun)


class Event(_Fast):
    STORE = "store"                    # a piece of the store stream, or a blob file
    VOTE = "vote"                      # the client's Vote
    LOCK_GRANTED = "lock granted"      # the commit lock is ours
    VOTED = "voted"                    # the storage's vote succeeded
    CONFLICTS_LEFT = "conflicts left"  # the vote answers conflicts for the client to resolve
    STORE_RESOLVED = "store resolved"  # a piece of the client's resolved records
    FINISH = "finish"                  # the client's Finish
    FINISHED = "finished"              # tpc_finish returned
    FINISH_FAILED = "finish failed"    # tpc_finish raised
    ABORT = "abort"                    # the client's Abort, a failed vote, a lost connection


S, E = State, Event

#: state -> {event: next state}.  Rule: every move of a server transaction is
#: an entry here; nothing else assigns a state.
TRANSITIONS: dict[State, dict[Event, State]] = {
    S.OPEN: {E.STORE: S.OPEN, E.VOTE: S.LOCKING, E.ABORT: S.ABORTED},
    S.LOCKING: {E.LOCK_GRANTED: S.VOTING, E.ABORT: S.ABORTED},
    S.VOTING: {E.VOTED: S.VOTED, E.CONFLICTS_LEFT: S.RESOLVING, E.ABORT: S.ABORTED},
    S.RESOLVING: {E.STORE_RESOLVED: S.RESOLVING, E.VOTE: S.REVOTING, E.ABORT: S.ABORTED},
    S.REVOTING: {E.VOTED: S.VOTED, E.ABORT: S.ABORTED},
    S.VOTED: {E.FINISH: S.FINISHING, E.ABORT: S.ABORTED},
    S.FINISHING: {E.FINISHED: S.DONE, E.FINISH_FAILED: S.ABORTED},
    S.DONE: {},
    S.ABORTED: {},
}

#: States in which a transaction is over: a new TpcBegin may follow.
FINAL = frozenset(s for s, moves in TRANSITIONS.items() if not moves)
#: States in which the storage may have begun the transaction (``tpc_begin``
#: ran or may be running in the storage thread): leaving them for
#: ``aborted`` takes a ``tpc_abort`` there; leaving the others only drops
#: the buffer.
IN_STORAGE = frozenset((S.VOTING, S.RESOLVING, S.REVOTING, S.VOTED, S.FINISHING))


class TxnState:
    """The current state of one transaction, moved only through the table."""

    __slots__ = ("state",)

    def __init__(self, state: State = State.OPEN):
        self.state = state

    def can(self, event: Event) -> bool:
        """Whether ``event`` is a legal move from the current state."""
        return event in TRANSITIONS[self.state]

    def move(self, event: Event) -> State:
        """Take the move ``event``; returns the state left.

        Raises :class:`TransactionStateError` (nothing changes) if the table
        has no such move from the current state.
        """
        left = self.state
        try:
            self.state = TRANSITIONS[left][event]
        except KeyError:
            raise TransactionStateError(
                "can't handle event %r in transaction state %r"
                % (event.value, left.value)) from None
        return left

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def __repr__(self) -> str:
        return "<TxnState %s>" % self.state.value
