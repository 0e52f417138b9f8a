"""Many processes, one real server: ``twistd -n zeotwist`` in a subprocess.

Every client here is its own Python process (``tests/procutil.py``) using
the blocking ``ClientStorage`` exactly as an application would; the test
coordinates them through line handshakes on pipes, never with sleeps.
Also the deployment surface: ``twistd zeotwist --help``, the tac file, and
the wheel that makes a plain ``pip install .`` give a working plugin.
"""
import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import transaction
from ZODB import DB
from ZODB.FileStorage import FileStorage

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.testing import start_twistd, twistd_command

from procutil import REPO, child_env, children, run_client, twistd_server  # noqa: F401 (fixtures)


def local_client(server, **kw):
    """A ClientStorage in the test process (on the background reactor)."""
    return ClientStorage(server.address, reactor=background_reactor(), wait_timeout=10, **kw)


# -- 1. the README example across processes ---------------------------------------

README_WRITE = """
db = DB(ClientStorage(ADDR))
conn = db.open(); root = conn.root()
root['list'] = ['a', 'b', 1.0, 3]; root['dict'] = {'a': 1, 'b': 4}
transaction.commit()
say('tid', db.storage.lastTransaction().hex())
db.close()
"""

README_READ = """
db = DB(ClientStorage(('localhost', ADDR[1])))   # as the README spells it
root = db.open().root()
say('list', repr(root['list']))
say('dict', repr(root['dict']))
say('tid', db.storage.lastTransaction().hex())
db.close()
"""


def fields(lines):
    return dict(line.split(" ", 1) for line in lines)


def test_readme_example_across_processes(twistd_server):
    written = fields(run_client(README_WRITE, twistd_server.address))
    read = fields(run_client(README_READ, twistd_server.address))
    values = ast.literal_eval(read["list"])
    assert values == ["a", "b", 1.0, 3]
    assert [type(v) for v in values] == [str, str, float, int]
    assert ast.literal_eval(read["dict"]) == {"a": 1, "b": 4}
    assert read["tid"] == written["tid"] != "00" * 8


# -- 2. an invalidation reaches a process that is already connected ---------------

WATCHER = """
sync = ARGS[0] == 'server_sync'
storage = ClientStorage(ADDR, server_sync=sync)
db = DB(storage); conn = db.open(); root = conn.root()
say('before', repr(root.get('x')), storage.lastTransaction().hex())
target = bytes.fromhex(sys.stdin.readline().split()[1])    # 'go TID'
if not sync:
    # Without server_sync, begin() sees what has arrived: wait for it.
    deadline = time.monotonic() + 10
    while storage.lastTransaction() < target:
        if time.monotonic() > deadline:
            say('no-invalidation', storage.lastTransaction().hex()); sys.exit(3)
        time.sleep(0.005)
transaction.begin()
say('after', repr(root.get('x')), storage.lastTransaction().hex())
db.close()
"""

COMMIT_X = """
db = DB(ClientStorage(ADDR)); root = db.open().root()
root['x'] = int(ARGS[0]); transaction.commit()
say('tid', db.storage.lastTransaction().hex())
db.close()
"""


def test_invalidation_reaches_connected_process(twistd_server, children):
    addr = twistd_server.address
    run_client(COMMIT_X, addr, 1)     # root exists, x == 1
    watchers = [children(WATCHER, addr, mode) for mode in ("server_sync", "poll")]
    for w in watchers:
        value, _ = w.expect("before").split()
        assert value == "1"           # each holds a snapshot with x == 1
    tid = fields(run_client(COMMIT_X, addr, 42))["tid"]
    for w in watchers:
        w.send("go " + tid)
    for w in watchers:
        value, seen_tid = w.expect("after", timeout=20).split()
        assert value == "42"
        assert seen_tid == tid        # lastTransaction() is the writer's commit
        w.finish()


# -- 3. four processes incrementing one counter ---------------------------------------

COUNTER = """
n = int(ARGS[0])
db = DB(ClientStorage(ADDR)); tm = transaction.TransactionManager(); conn = db.open(tm)
say('ready'); sys.stdin.readline()
ok = conflicts = refused = longest = 0
deadline = time.monotonic() + 60
while ok < n:
    if time.monotonic() > deadline:
        say('deadline', ok, conflicts); sys.exit(3)
    try:
        tm.begin()
        root = conn.root()
        root['n'] += 1          # a plain int: concurrent increments really conflict
        tm.commit()
        ok += 1
        longest, refused = max(longest, refused), 0
    except ConflictError:
        tm.abort(); conflicts += 1; refused += 1
say('done', ok, conflicts, longest)
db.close()
"""

PROCESSES, INCREMENTS = 4, 25


@pytest.fixture
def patient_server(tmp_path):
    """A server whose commit lock keeps a refused client's turn from its
    first refusal and waits up to a minute for its retry: so long that no
    retry on a loaded machine misses its turn."""
    server = start_twistd(str(tmp_path / "data.fs"), "--conflict-retry-wait", "60",
                          "--conflict-turn-after", "0", env=child_env())
    yield server
    status = server.stop()
    print("--- twistd log (exit status %s) ---\n%s" % (status, server.log()))


def test_concurrent_increments_with_retry(patient_server, children):
    """No increment is lost, and none waits long: a client whose vote was
    refused has the next turn for its retry (CommitLock), so no increment
    needs more than 3 attempts refused (one, one behind the older
    refusals, and one more when those committed while it retried); without
    it one client lost up to 140 times in a row (docs/performance.md)."""
    addr = patient_server.address
    # server_sync: each begin() makes a round trip, so it sees every commit before it.
    db = DB(local_client(patient_server, server_sync=True))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()["n"] = 0
        tm.commit()
        workers = [children(COUNTER, addr, INCREMENTS) for _ in range(PROCESSES)]
        for w in workers:
            w.expect("ready")
        for w in workers:             # all start together: real contention
            w.send("go")
        results = [w.expect("done", timeout=90).split() for w in workers]
        for w in workers:
            w.finish()
        successes = sum(int(ok) for ok, _, _ in results)
        conflicts = sum(int(c) for _, c, _ in results)
        assert successes == PROCESSES * INCREMENTS
        tm.begin()
        assert conn.root()["n"] == successes
        # The server refused exactly the votes the clients saw refused.
        assert db.storage.server_status()["conflicts"] == conflicts
        print("%d commits, %d conflicts retried" % (successes, conflicts))
        assert max(int(longest) for _, _, longest in results) <= 3
    finally:
        db.close()


# -- 7. a 20 MB record --------------------------------------------------------------

BIG_WRITE = """
import hashlib, random
from persistent.mapping import PersistentMapping
payload = random.Random(20).randbytes(20 * 2**20)
db = DB(ClientStorage(ADDR)); root = db.open().root()
root['big'] = PersistentMapping(data=payload)
transaction.commit()
say('stored', len(payload), hashlib.sha256(payload).hexdigest())
db.close()
"""

BIG_READ = """
import hashlib
db = DB(ClientStorage(ADDR)); root = db.open().root()
data = root['big']['data']
say('loaded', len(data), hashlib.sha256(data).hexdigest())
oid = root['big']._p_oid
record, serial = db.storage.load(oid)
say('record', len(record))
db.close()
"""


def test_20mb_record_round_trips(twistd_server):
    stored = fields(run_client(BIG_WRITE, twistd_server.address))
    loaded = fields(run_client(BIG_READ, twistd_server.address))
    assert stored["stored"] == loaded["loaded"]          # same length, same sha256
    assert int(stored["stored"].split()[0]) == 20 * 2**20
    assert int(loaded["record"]) > 20 * 2**20            # the pickle around it


# -- 8. the twistd surface: --help and the tac file ----------------------------------

def test_twistd_help_lists_the_options():
    out = subprocess.run([*twistd_command(), "zeotwist", "--help"], env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("-f, --filename=", "-l, --listen=", "-r, --read-only",
                   "--address-file=", "--transaction-timeout="):
        assert option in out.stdout, out.stdout
    listing = subprocess.run([*twistd_command(), "--help"], env=child_env(),
                             capture_output=True, text=True, timeout=60)
    assert "zeotwist" in listing.stdout


TAC_COMMIT = """
db = DB(ClientStorage(ADDR)); root = db.open().root()
root['from_tac'] = 'hello'; transaction.commit()
say('tid', db.storage.lastTransaction().hex())
db.close()
"""


def test_tac_file_serves_data_fs(tmp_path):
    env = child_env()
    env["ZEOTWIST_LISTEN"] = "tcp:0:interface=127.0.0.1"
    env["ZEOTWIST_ADDRESS_FILE"] = str(tmp_path / "zeotwist.address")
    env.pop("ZEOTWIST_FILE", None)    # the default: ./data.fs
    server = start_twistd(str(tmp_path / "data.fs"), directory=str(tmp_path), env=env,
                          server_command=["-y", str(REPO / "tac" / "zeotwist.tac")])
    try:
        tid = fields(run_client(TAC_COMMIT, server.address))["tid"]
    finally:
        status = server.stop()
        print("--- twistd log (exit status %s) ---\n%s" % (status, server.log()))
    # The tac served ./data.fs in its working directory: read it directly.
    fs = FileStorage(str(tmp_path / "data.fs"), read_only=True)
    db = DB(fs)
    try:
        assert fs.lastTransaction().hex() == tid
        assert db.open().root()["from_tac"] == "hello"
    finally:
        db.close()


# -- 9. packaging: the wheel carries the plugin, not twisted's __init__ ---------------

def _packaged_files(src, out) -> set:
    """The files a wheel of ``src`` carries, built offline.

    With a wheel-capable setuptools (``wheel`` installed, or setuptools >=
    70.1) this is ``pip wheel --no-build-isolation``'s wheel.  Otherwise
    (setuptools 65 as venv ships it) the same setuptools configuration is
    run through ``build_py``, the step that lays out a pure wheel's files;
    pip's isolated build would need the network for a newer setuptools.
    """
    if subprocess.run([sys.executable, "-c", "import setuptools"]).returncode != 0:
        pytest.skip("no setuptools in this environment to build with offline")
    probe = ("try:\n    import wheel\nexcept ImportError:\n"
             "    from setuptools.command import bdist_wheel\n")
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--no-index", "--no-input", "-q", "-w", str(out), str(src)],
            capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        wheels = list(out.glob("zeotwist-*.whl"))
        assert len(wheels) == 1, os.listdir(out)
        with zipfile.ZipFile(wheels[0]) as z:
            return {n for n in z.namelist() if ".dist-info/" not in n}
    result = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q",
         "build_py", "--build-lib", str(out)],
        cwd=str(src), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def test_wheel_contains_plugin_but_not_twisted_package(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "dropin.cache",
        "*.fs*", "twistd.*"))
    out = tmp_path / "out"
    names = _packaged_files(src, out)
    assert "twisted/plugins/zeotwist_plugin.py" in names, sorted(names)
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "zeotwist/server/tap.py" in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert not [n for n in names if n.startswith("tests/")]
