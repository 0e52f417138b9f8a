"""Client-side conflict resolution with real processes: ``twistd -n zeotwist
--client-conflict-resolution`` and writer processes using ZODB over
ClientStorage, coordinated by line handshakes (tests/procutil.py).
"""
import pytest
import transaction
from BTrees.Length import Length
from persistent.mapping import PersistentMapping
from ZODB import DB

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.testing import start_twistd

from procutil import child_env, children, wait_for  # noqa: F401 (fixture)

COMMITS = 150


@pytest.fixture
def crtwistd(tmp_path):
    server = start_twistd(str(tmp_path / "data.fs"), "--client-conflict-resolution",
                          env=child_env())
    yield server
    status = server.stop()
    print("--- twistd log (exit status %s) ---\n%s" % (status, server.log()))


def local_db(server) -> DB:
    return DB(ClientStorage(server.address, reactor=background_reactor(), wait_timeout=10))


WRITER = """
db = DB(ClientStorage(ADDR, wait_timeout=30))
tm = transaction.TransactionManager()
root = db.open(tm).root()
me, count = ARGS[0], int(ARGS[1])
say('ready')
sys.stdin.readline()
conflicts = errors = 0
for i in range(count):
    while True:
        try:
            tm.begin()
            root['n'].change(1)
            root[me][i] = i
            tm.commit()
            break
        except ConflictError:
            conflicts += 1
            tm.abort()
        except Exception as e:
            errors += 1
            tm.abort()
            print('error', repr(e), file=sys.stderr, flush=True)
            if errors > 10:
                break
say('done', conflicts, errors)
db.close()
"""


def test_two_writer_processes_bump_one_length_without_conflicts(crtwistd, children):
    db = local_db(crtwistd)
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["n"], root["a"], root["b"] = Length(), PersistentMapping(), PersistentMapping()
        tm.commit()
        writers = [children(WRITER, crtwistd.address, me, COMMITS) for me in "ab"]
        for w in writers:
            w.expect("ready")
        for w in writers:
            w.send()
        results = [w.expect("done", timeout=120).split() for w in writers]
        for w in writers:
            w.finish()
        assert results == [["0", "0"], ["0", "0"]], [w.describe() for w in writers]
        tm.begin()
        assert root["n"].value == 2 * COMMITS
        assert sorted(root["a"]) == sorted(root["b"]) == list(range(COMMITS))
        status = db.storage.server_status()
        assert status["client_resolutions"] > 0 and status["conflicts"] == 0
    finally:
        db.close()


KILLED = """
from persistent import Persistent
from persistent.mapping import PersistentMapping

class Slow(Persistent):
    value = 0
    def _p_resolveConflict(self, old, committed, new):
        say('resolving')
        sys.stdin.readline()          # blocks: the test kills us here
        return committed

db = DB(ClientStorage(ADDR, wait_timeout=30))
tm = transaction.TransactionManager()
root = db.open(tm).root()
if ARGS[0] == 'w':                    # the writer that goes on
    root['c'], root['other'] = Slow(), PersistentMapping()
    tm.commit()
    say('created')
    sys.stdin.readline()
    root['c'].value += 1
    tm.commit()
    say('bumped')
    sys.stdin.readline()
    say('committing')
    root['c'].value += 1
    tm.commit()                       # waits for the lock the other holds
    say('committed', root['c'].value)
else:                                 # the writer killed while resolving
    tm.begin()
    root['c'].value, root['other'].keys()
    say('loaded')
    sys.stdin.readline()
    root['c'].value += 5
    root['other']['x'] = 1
    tm.commit()
    say('unexpected: committed')
db.close()
"""


def test_a_client_killed_while_resolving_releases_the_lock_and_commits_nothing(
        crtwistd, children):
    w = children(KILLED, crtwistd.address, "w")
    w.expect("created")
    loser = children(KILLED, crtwistd.address, "l")
    loser.expect("loaded")
    w.send()
    w.expect("bumped")
    loser.send()
    loser.expect("resolving")            # its vote was answered: it holds the lock
    db = local_db(crtwistd)
    try:
        w.send()
        w.expect("committing")
        wait_for(lambda: db.storage.server_status()["waiting"] == 1, 20,
                 "the other writer to queue for the commit lock")
        loser.kill()
        assert w.expect("committed", timeout=30) == "2"     # the killed +5 is not there
        w.finish()
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        assert "x" not in root["other"]                     # nothing of it committed
        status = db.storage.server_status()
        assert status["client_resolutions"] == 1 and status["waiting"] == 0
    finally:
        db.close()
    assert "Traceback" not in crtwistd.log()
