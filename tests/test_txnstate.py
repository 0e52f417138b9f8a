"""The server transaction's state table (zeotwist.server.txnstate), as pure logic."""
import pytest
from ZODB.POSException import StorageTransactionError

from zeotwist.errors import TransactionStateError, ZeotwistError
from zeotwist.server.txnstate import (
    FINAL, IN_STORAGE, TRANSITIONS, Event as E, State as S, TxnState)


def walk(*events):
    t = TxnState()
    for e in events:
        t.move(e)
    return t


def test_the_commit_path():
    t = TxnState()
    assert t.state is S.OPEN
    assert [t.move(e) for e in (E.STORE, E.VOTE, E.LOCK_GRANTED, E.VOTED, E.FINISH,
                                E.FINISHED)] == \
        [S.OPEN, S.OPEN, S.LOCKING, S.VOTING, S.VOTED, S.FINISHING]
    assert t.state is S.DONE and t.final


def test_the_commit_path_with_client_side_resolution():
    t = walk(E.STORE, E.VOTE, E.LOCK_GRANTED)
    assert [t.move(e) for e in (E.CONFLICTS_LEFT, E.STORE_RESOLVED, E.VOTE, E.VOTED)] == \
        [S.VOTING, S.RESOLVING, S.RESOLVING, S.REVOTING]
    assert t.state is S.VOTED and t.can(E.FINISH)


@pytest.mark.parametrize("before", [(), (E.VOTE,), (E.VOTE, E.LOCK_GRANTED),
                                    (E.VOTE, E.LOCK_GRANTED, E.VOTED),
                                    (E.VOTE, E.LOCK_GRANTED, E.CONFLICTS_LEFT),
                                    (E.VOTE, E.LOCK_GRANTED, E.CONFLICTS_LEFT, E.VOTE)])
def test_abort_from_every_state_before_finishing(before):
    t = walk(*before)
    assert t.can(E.ABORT)
    t.move(E.ABORT)
    assert t.state is S.ABORTED and t.final


def test_a_finish_in_progress_cannot_be_aborted_only_fail():
    t = walk(E.VOTE, E.LOCK_GRANTED, E.VOTED, E.FINISH)
    assert not t.can(E.ABORT)
    with pytest.raises(TransactionStateError):
        t.move(E.ABORT)
    assert t.state is S.FINISHING          # an illegal move changes nothing
    assert t.move(E.FINISH_FAILED) is S.FINISHING
    assert t.state is S.ABORTED


@pytest.mark.parametrize("state", list(S))
def test_every_move_not_in_the_table_raises_the_typed_error(state):
    for event in E:
        t = TxnState(state)
        if event in TRANSITIONS[state]:
            assert t.can(event)
            continue
        assert not t.can(event)
        with pytest.raises(TransactionStateError, match=event.value):
            t.move(event)
        assert t.state is state


def test_no_backwards_edge_and_final_states_are_final():
    order = [S.OPEN, S.LOCKING, S.VOTING, S.RESOLVING, S.REVOTING, S.VOTED, S.FINISHING,
             S.DONE]
    for state, moves in TRANSITIONS.items():
        for target in moves.values():
            if target is not S.ABORTED and state is not S.ABORTED:
                assert order.index(target) >= order.index(state), (state, target)
    assert FINAL == {S.DONE, S.ABORTED}
    assert all(not TRANSITIONS[s] for s in FINAL)
    # stores only while open (resolved records only while resolving); finishes once
    assert [s for s in S if E.STORE in TRANSITIONS[s]] == [S.OPEN]
    assert [s for s in S if E.STORE_RESOLVED in TRANSITIONS[s]] == [S.RESOLVING]
    assert [s for s in S if E.FINISH in TRANSITIONS[s]] == [S.VOTED]
    assert IN_STORAGE == {S.VOTING, S.RESOLVING, S.REVOTING, S.VOTED, S.FINISHING}


def test_the_error_is_a_storage_transaction_error_and_ours():
    # so a client sees it as ZODB's StorageTransactionError on the wire
    assert issubclass(TransactionStateError, StorageTransactionError)
    assert issubclass(TransactionStateError, ZeotwistError)


def test_the_module_is_pure():
    import ast
    import zeotwist.server.txnstate as m
    tree = ast.parse(open(m.__file__).read())
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])]
    assert not [i for i in imported if i and i.startswith("twisted")]


# -- the table as a client meets it (in-memory pair, a real FileStorage) ---------

def test_moves_out_of_order_reach_the_client_as_storage_transaction_errors(tmp_path):
    from twisted.internet.task import Clock
    from ZODB.FileStorage import FileStorage
    from ZODB.utils import p64, z64
    from zeotwist.testing import connect_in_memory, memory_server
    from zeotwist.wire import commands as C
    from zeotwist.wire.records import encode_store

    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock)
    client, session, pump, _ = connect_in_memory({"1": server}, clock)

    def call(command, **kw):
        out = []
        client.call(command, **kw).addBoth(out.append)
        pump.flush()
        return out[0]

    call(C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False)
    for command in (C.Vote, C.Finish):           # no transaction at all
        failure = call(command)
        assert failure.check(StorageTransactionError), failure
    client.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    client.send(C.StoreData, data=encode_store(p64(1), z64, b"x"))
    failure = call(C.Finish)                      # not voted yet
    assert failure.check(StorageTransactionError) and "voted" in str(failure.value)
    assert session._txn.state.state is S.OPEN     # the refused move changed nothing
    assert call(C.Vote)["conflicts"] == b""
    assert session._txn.state.state is S.VOTED
    assert call(C.Vote).check(StorageTransactionError)      # voted twice
    assert len(call(C.Finish)["tid"]) == 8
    assert session._txn.state.state is S.DONE
    server.close()
