"""Starting the server as an operator does: real twistd processes, exit codes, stderr.

Every start-up failure (port in use, a Unix socket's missing directory, a
storage that cannot be opened, a mistake on the command line or in the
configuration file) exits non-zero with one line saying why, in the
foreground (``-n``) and daemonized.  runzeo's ``-a/--address`` and a ZEO
operator's ``zeo.conf`` work; Unix sockets are private unless the endpoint
says ``mode=``; ``make test``/``make serve`` set up the virtualenv.
"""
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import transaction
from ZODB import DB
from ZODB.FileStorage import FileStorage

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.server.tap import Options
from zeotwist.testing import start_server, start_twistd, twistd_command

from procutil import REPO, child_env, wait_for


def twistd(tmp_path, *args, daemon=False, timeout=60):
    """Run ``twistd [-n] zeotwist *args`` in tmp_path until it exits."""
    mode = ["--pidfile", str(tmp_path / "twistd.pid")] if daemon else ["-n", "--pidfile="]
    argv = [*twistd_command(), *mode, "-l", str(tmp_path / "twistd.log"), "zeotwist", *args]
    return subprocess.run(argv, cwd=str(tmp_path), env=child_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def lines(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


def set_root(address, storage: str, **items) -> None:
    """Commit ``items`` into the root of ``storage`` at the server ``address``."""
    db = DB(ClientStorage(address, storage=storage, reactor=background_reactor(),
                          wait_timeout=10))
    try:
        conn = db.open()
        conn.root().update(items)
        transaction.commit()
    finally:
        db.close()


def file_root(path) -> dict:
    """The root of the FileStorage at ``path``, read directly (the server stopped)."""
    fs = FileStorage(str(path), read_only=True)
    try:
        return dict(DB(fs).open().root())
    finally:
        fs.close()


def pid_file_gone(tmp_path) -> None:
    """A daemon removes its pid file: waited for, since twistd's daemon
    removes it only after telling its launching process how the start went
    (so the launcher can exit first, and on a loaded machine does)."""
    pid_file = tmp_path / "twistd.pid"
    wait_for(lambda: not pid_file.exists(), 60, "the daemon to remove %s" % pid_file)


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


# -- 1. start-up failures: status 1 and one line, foreground and daemonized ----------

@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_port_in_use(tmp_path, busy_port, daemon):
    listen = "tcp:%d:interface=127.0.0.1" % busy_port
    out = twistd(tmp_path, "-f", "d.fs", "-l", listen, daemon=daemon)
    assert out.returncode == 1, out
    said = lines(out.stderr)
    assert said[0] == ("zeotwist: cannot listen on %s: Address already in use "
                       "(another server is listening there?)" % listen), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    if daemon:          # twistd's own line follows; it is not cut off mid-reason
        assert said[1:] == ["An error has occurred: b'zeotwist.errors.StartupFailed: did not "
                            "start; the reason is above and in the log'",
                            "Please look at log file for more information."]
    else:
        assert len(said) == 1
    log = (tmp_path / "twistd.log").read_text()
    assert "zeotwist cannot listen on %s" % listen in log
    pid_file_gone(tmp_path)


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_missing_unix_socket_directory(tmp_path, daemon):
    out = twistd(tmp_path, "-f", "d.fs", "-l", "unix:/nonexistent/dir/x.sock", daemon=daemon)
    assert out.returncode == 1, out
    assert lines(out.stderr)[0] == ("zeotwist: cannot listen on unix:/nonexistent/dir/x.sock: "
                                    "the directory /nonexistent/dir does not exist")
    assert "Errno" not in out.stderr


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_storage_that_cannot_be_opened(tmp_path, daemon):
    held = FileStorage(str(tmp_path / "d.fs"))          # holds d.fs.lock
    try:
        out = twistd(tmp_path, "-f", "d.fs", "-l", "tcp:0:interface=127.0.0.1", daemon=daemon)
    finally:
        held.close()
    assert out.returncode == 1, out
    first = lines(out.stderr)[0]
    assert first.startswith("zeotwist: cannot open storage '1' (FileStorage d.fs): "
                            "LockError: Couldn't lock"), out.stderr
    assert "[stderr#error]" not in (tmp_path / "twistd.log").read_text()


def test_daemon_that_starts_lets_go_of_the_terminal(tmp_path):
    """A successful daemonized start exits 0 at once and closes stdout/stderr
    (the kept copy of stderr is released), so capture_output returns."""
    out = twistd(tmp_path, "-f", "d.fs", "-l", "unix:%s" % (tmp_path / "s.sock"),
                 "--address-file", str(tmp_path / "addr"), daemon=True, timeout=30)
    try:
        assert out.returncode == 0 and out.stderr == "", out
        assert (tmp_path / "addr").read_text().strip() == "unix:%s" % (tmp_path / "s.sock")
        # twistd's launcher returns before the daemon's reactor runs (and
        # handles SIGTERM): one client round trip proves that it does.
        ClientStorage(str(tmp_path / "s.sock"), reactor=background_reactor(),
                      wait_timeout=20).close()
    finally:
        pid = int((tmp_path / "twistd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
    pid_file_gone(tmp_path)


# -- 10. mistakes on the command line or in the file: one line, no usage page ------------

@pytest.mark.parametrize("args, expected", [
    (["-l", "8100"], "twistd zeotwist: --listen: '8100' is not an endpoint string: write "
                     "tcp:8100:interface=127.0.0.1 (or give runzeo's -a/--address 8100, "
                     "which listens on every interface)"),
    (["-l", "tcp:notaport"], "twistd zeotwist: --listen: cannot listen on 'tcp:notaport': "
                             "not a valid endpoint string: invalid literal for int() with "
                             "base 10: 'notaport'"),
    (["--addr", "127.0.0.1:8110"], "twistd zeotwist: unknown option --addr; abbreviations "
                                   "are not accepted: did you mean --address or "
                                   "--address-file?"),
    (["-C", "missing.conf"], "twistd zeotwist: cannot use configuration file missing.conf: "
                             "error opening file {tmp}/missing.conf: [Errno 2] No such file "
                             "or directory: '{tmp}/missing.conf'"),
    (["--max-connections", "0"], "twistd zeotwist: max-connections must be at least 1, not 0"),
])
def test_command_line_mistakes(tmp_path, args, expected):
    out = twistd(tmp_path, *args)
    assert out.returncode == 1, out
    assert lines(out.stderr) == [expected.format(tmp=tmp_path)]
    assert "Usage:" not in out.stdout


def test_zeo_section_that_needs_a_change_says_which(tmp_path):
    (tmp_path / "zeo.conf").write_text(
        "<zeo>\n  address 127.0.0.1:0\n  invalidation-age 30\n</zeo>\n"
        "<filestorage 1>\n  path %s\n</filestorage>\n" % (tmp_path / "d.fs"))
    out = twistd(tmp_path, "-C", "zeo.conf")
    assert out.returncode == 1, out
    (line,) = lines(out.stderr)
    assert "in <zeo>: 'invalidation-age' is not a known key name" in line
    assert line.endswith("zeotwist has no invalidation-age: remove it (reconnecting "
                         "clients verify against invalidation-queue-size)")


# -- 2. runzeo's -a/--address and a ZEO operator's zeo.conf ---------------------------

def test_runzeo_address_forms():
    def listen(*argv):
        options = Options()
        options.parseOptions(list(argv))
        return options.settings.listen, options.settings.address_file
    assert listen("--address", "127.0.0.1:8110") == (["tcp:8110:interface=127.0.0.1"], None)
    assert listen("-a", "8110") == (["tcp:8110"], None)             # every interface, as runzeo
    assert listen("-a", "/run/zeo.sock", "-l", "tcp:1") == (["unix:/run/zeo.sock", "tcp:1"], None)
    assert listen("--address-file", "f")[1] == "f"


ZEO_CONF = """\
<zeo>
  address %(sock)s
  read-only false
  invalidation-queue-size 200
  transaction-timeout 30
  pid-filename %(pid)s
</zeo>

<filestorage 1>
  path %(fs)s
</filestorage>

<eventlog>
  level info
  <logfile>
    path %(log)s
    format %%(asctime)s %%(message)s
  </logfile>
</eventlog>
"""


def start_zeo_conf(tmp_path):
    """``twistd -n zeotwist -C zeo.conf`` (ZEO_CONF) in tmp_path, once its
    pid file is written: ``(process, paths)``."""
    paths = dict(sock=tmp_path / "zeo.sock", pid=tmp_path / "zeo.pid", fs=tmp_path / "Data.fs",
                 log=tmp_path / "zeo.log")
    (tmp_path / "zeo.conf").write_text(ZEO_CONF % paths)
    argv = [*twistd_command(), "-n", "--pidfile=", "-l", str(tmp_path / "twistd.log"),
            "zeotwist", "-C", str(tmp_path / "zeo.conf")]
    server = subprocess.Popen(argv, cwd=str(tmp_path), env=child_env(),
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not paths["pid"].exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail("twistd did not start: %s" % server.communicate()[1])
        time.sleep(0.05)        # polling the server's pid file, bounded
    return server, paths


def sigterm(server, tmp_path, paths) -> int:
    """SIGTERM ``server``; its exit status (fails if it does not stop within 60 s)."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        pytest.fail("twistd did not stop on SIGTERM:\n%s\n--- eventlog ---\n%s" % (
            (tmp_path / "twistd.log").read_text(), paths["log"].read_text()))


def test_zeo_conf_runs_unchanged(tmp_path):
    server, paths = start_zeo_conf(tmp_path)
    try:
        assert int(paths["pid"].read_text()) == server.pid
        set_root(str(paths["sock"]), "1", zeo="conf")
    finally:
        status = sigterm(server, tmp_path, paths)
    assert status == 0                                  # as runzeo: a clean stop
    assert not paths["pid"].exists()                    # removed at stop
    log = paths["log"].read_text()                      # the <eventlog> got the events
    assert "zeotwist serving %s as storage '1' on unix:%s" % (paths["fs"], paths["sock"]) in log
    assert file_root(paths["fs"])["zeo"] == "conf"


def test_sigterm_stops_a_zeo_conf_server_with_an_eventlog_while_busy(tmp_path):
    """An unconfirmed report: ``twistd -n zeotwist -C zeo.conf`` with an
    <eventlog> once did not stop on SIGTERM.  Here it is stopped while one
    client holds the commit lock (voted, not finished), another waits for
    it and a third connection is silent; it exits with status 0, and the
    <eventlog> has the stop."""
    import threading

    from ZODB.Connection import TransactionMetaData
    from ZODB.tests.MinPO import MinPO
    from ZODB.tests.StorageTestBase import zodb_pickle
    from ZODB.utils import z64

    from zeotwist.errors import ClientDisconnected
    server, paths = start_zeo_conf(tmp_path)
    clients, silent, waiter = [], None, None
    try:
        for _ in range(2):
            clients.append(ClientStorage(str(paths["sock"]), reactor=background_reactor(),
                                         wait_timeout=10))
        t1, t2 = TransactionMetaData(), TransactionMetaData()
        holder, blocked = clients
        holder.tpc_begin(t1)
        holder.store(holder.new_oid(), z64, zodb_pickle(MinPO(1)), "", t1)
        holder.tpc_vote(t1)                             # holds the commit lock
        blocked.tpc_begin(t2)
        blocked.store(blocked.new_oid(), z64, zodb_pickle(MinPO(2)), "", t2)
        outcome = []

        def vote():
            try:
                blocked.tpc_vote(t2)                    # waits for the lock
            except ClientDisconnected as e:
                outcome.append(e)
        waiter = threading.Thread(target=vote)
        waiter.start()
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(str(paths["sock"]))
        ClientStorage(str(paths["sock"]), reactor=background_reactor(),
                      wait_timeout=10).close()          # the server has taken all three
    finally:
        try:
            status = sigterm(server, tmp_path, paths)
        finally:
            for cs in clients:
                cs.close()
            if silent is not None:
                silent.close()
            if waiter is not None:
                waiter.join(30)
    assert status == 0, server.stderr.read()
    assert outcome and isinstance(outcome[0], ClientDisconnected)
    log = paths["log"].read_text()
    assert "Received SIGTERM, shutting down." in log
    assert "zeotwist closed storage '1' (<filestorage> %s)" % paths["fs"] in log
    assert not paths["pid"].exists()
    stored = FileStorage(str(paths["fs"]), read_only=True)
    try:
        assert [t.description for t in stored.iterator()] == []
    finally:
        stored.close()


# -- 9. Unix sockets are the owner's unless the endpoint says otherwise ---------------

def test_unix_socket_modes(tmp_path):
    old = os.umask(0)                  # Twisted's 0666 would show through
    try:
        private = start_server(str(tmp_path / "a.fs"), listen="unix:%s" % (tmp_path / "a.sock"))
        shared = start_server(str(tmp_path / "b.fs"),
                              listen="unix:%s:mode=660" % (tmp_path / "b.sock"))
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "a.sock").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "b.sock").st_mode) == 0o660
    finally:
        private.stop()
        shared.stop()


# -- 14. help text ------------------------------------------------------------------

def test_help_text_has_no_stray_spaces(tmp_path):
    out = subprocess.run([*twistd_command(), "zeotwist", "--help"], env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    column = out.stdout.index("A server configuration file") - out.stdout.rindex(
        "\n", 0, out.stdout.index("A server configuration file")) - 1
    described = [line[column:] for line in out.stdout.splitlines() if len(line) > column]
    assert len(described) > 40
    assert not [d for d in described if "  " in d.strip()], out.stdout


# -- 0. the README's two commands ---------------------------------------------------

def test_make_targets_set_up_the_virtualenv(tmp_path):
    venv = tmp_path / "venv"
    for target, runs in (("test", "%s/bin/python -m pytest" % venv),
                         ("serve", "%s/bin/twistd -n zeotwist -f data.fs" % venv)):
        # Under `make test` (CI) the outer make's MAKEFLAGS/MAKELEVEL reach us and
        # the inner make prints "Entering directory" lines: run it as a user would.
        env = {k: v for k, v in os.environ.items()
               if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
        out = subprocess.run(["make", "--no-print-directory", "-n", target,
                              "VENV=%s" % venv], cwd=str(REPO), env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        steps = out.stdout.splitlines()
        assert steps[0] == "python3 -m venv %s" % venv
        assert any("pip install" in s and "editable_mode=compat" in s for s in steps)
        assert steps[-1].startswith(runs), steps
    assert "\nmake test\n" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "\nmake serve " in readme and "\nmake test " in readme


# -- 14. the tac file takes a configuration file too -------------------------------

def test_tac_file_with_a_configuration_file(tmp_path):
    conf = tmp_path / "server.conf"
    conf.write_text("<zeotwist>\n  listen unix:%s\n</zeotwist>\n"
                    "<filestorage a>\n  path %s\n</filestorage>\n"
                    "<filestorage b>\n  path %s\n</filestorage>\n"
                    % (tmp_path / "s.sock", tmp_path / "a.fs", tmp_path / "b.fs"))
    env = dict(child_env(), ZEOTWIST_CONFIG=str(conf),
               ZEOTWIST_ADDRESS_FILE=str(tmp_path / "zeotwist.address"))
    server = start_twistd(str(tmp_path / "a.fs"), directory=str(tmp_path), env=env,
                          server_command=["-y", str(REPO / "tac" / "zeotwist.tac")])
    try:
        assert server.addresses == ["unix:%s" % (tmp_path / "s.sock")]
        set_root(str(tmp_path / "s.sock"), "b", via="tac")
    finally:
        server.stop()
    assert file_root(tmp_path / "b.fs")["via"] == "tac"

    env["ZEOTWIST_ARGS"] = "--max-connections 0"
    out = subprocess.run([*twistd_command(), "-n", "--pidfile=", "-l", str(tmp_path / "t.log"),
                          "-y", str(REPO / "tac" / "zeotwist.tac")], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert lines(out.stderr) == ["zeotwist.tac: max-connections must be at least 1, not 0"]


def test_the_server_process_keeps_freed_buffers_of_a_few_mib(monkeypatch):
    """twistd zeotwist sets glibc's mmap and trim thresholds once
    (zeotwist.server.malloc; docs/performance.md, "Blob transfers"), unless
    the environment sets them itself."""
    import platform
    from zeotwist.server import malloc
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1")
    assert malloc.tune_malloc() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert malloc.tune_malloc() is True


def test_the_server_process_reuses_a_freed_10_mb_buffer(tmp_path):
    """After tune_malloc, a buffer of a big record's size (10 MB) freed and
    allocated again reuses the same memory: no page fault per 4 KiB (glibc's
    default, and a 4 MiB threshold, map a fresh one; docs/performance.md,
    "Big records and blobs")."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    script = (
        "import resource\n"
        "from zeotwist.server.malloc import tune_malloc\n"
        "assert tune_malloc()\n"
        "n = 10 * 10**6\n"
        "x = b'x' * n\n"
        "del x\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "y = b'y' * n\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = {k: v for k, v in child_env().items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    faults = int(out.stdout)
    assert faults < 10 * 10**6 // 4096 // 10, faults
