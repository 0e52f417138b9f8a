"""The ``zeotwist`` command (issue 13, item 6): ``status`` (human and JSON,
exit status 0 when the server answers, 1 with one line when not, within the
timeout), ``pack`` with a login and with TLS, ``--version``, the installed
``zeotwist`` console script and ``zeotwist.__version__``.

Each command runs as users run it, in a subprocess (``python -m zeotwist`` or
the console script), against a live server on 127.0.0.1 (in this process,
on the background reactor) with a FileStorage in tmp_path.
"""
import json
import os
import socket
import subprocess
import sys
import time
from importlib.metadata import version

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.utils import z64

import zeotwist
from zeotwist.server.userfile import set_user
from zeotwist.testing import start_server

from certs import make_pki


def cli(*args, stdin=None, timeout=60):
    """Run ``python -m zeotwist *args``; ``timeout`` is a hang guard only."""
    try:
        return subprocess.run([sys.executable, "-m", "zeotwist", *map(str, args)],
                              input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("zeotwist %s still running after %g s (a hang)"
                    % (" ".join(map(str, args)), timeout))


def address(server) -> str:
    return "%s:%d" % server.address


def commit(storage, n=1):
    for _ in range(n):
        t = TransactionMetaData()
        storage.tpc_begin(t)
        storage.store(storage.new_oid(), z64, b"x", "", t)
        storage.tpc_vote(t)
        storage.tpc_finish(t)


def test_status_prints_the_counters(server, make_client):
    commit(make_client(), 3)
    done = cli("status", address(server))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "zeotwist server %s, storage '1': answering" % address(server)
    fields = {line[2:22].strip(): line[22:].strip() for line in lines[1:]}
    assert fields["commits"] == "3" and fields["objects"] == "3"
    assert fields["connections"] == "2"          # the test's client and this one
    assert fields["storage name"].endswith("data.fs")
    assert fields["last commit"].startswith(time.strftime("%Y-", time.gmtime()))
    assert "ago" in fields["up since"]
    assert done.stderr == ""


def test_status_json(server, make_client):
    cs = make_client()
    commit(cs, 2)
    done = cli("status", address(server), "--json", "--storage", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["storage"] == "1"
    assert report["commits"] == 2 and report["length"] == 2
    assert bytes.fromhex(report["last_tid"]) == cs.lastTransaction()
    assert report["uptime"] >= 0 and report["last_commit"].endswith("Z")


def test_status_nothing_listening_is_one_line_within_the_timeout():
    with socket.socket() as bound:                 # bound, not listening: refused
        bound.bind(("127.0.0.1", 0))
        done = cli("status", "127.0.0.1:%d" % bound.getsockname()[1], "--timeout", "1")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("zeotwist status: cannot connect to 127.0.0.1:")
    assert "within 1 s" in done.stderr          # retried until --timeout, then given up
    assert "Connection refused" in done.stderr


def test_status_silent_server_is_one_line_within_the_timeout():
    """Something listens but never answers: still one line, within --timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)                          # connections queue, nothing is read
        done = cli("status", "127.0.0.1:%d" % silent.getsockname()[1], "--timeout", "1",
                   "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["ok"] is False
    assert done.stderr.count("\n") == 1 and "within 1 s" in done.stderr, done.stderr


def test_status_json_failure_is_json_too(server):
    done = cli("status", address(server), "--storage", "nope", "--timeout", "1", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["storage"] == "nope"
    assert report["error"].startswith("UnknownStorage: no storage named 'nope'")
    assert "nope" in done.stderr and done.stderr.count("\n") == 1


def test_status_and_pack_log_in(tmp_path):
    users = str(tmp_path / "users")
    set_user(users, "ops", "ops-secret", "rw=*", 1000)
    server = start_server(str(tmp_path / "data.fs"), auth_file=users)
    try:
        (tmp_path / "pw").write_text("ops-secret\n")
        ok = cli("status", address(server), "--username", "ops", "--password-file",
                 tmp_path / "pw")
        assert ok.returncode == 0, ok.stderr
        packed = cli("pack", address(server), "-u", "ops", "--password-stdin",
                     stdin="ops-secret\n")
        assert packed.returncode == 0, packed.stderr
        assert "packed storage '1'" in packed.stdout
        wrong = cli("status", address(server), "-u", "ops", "--password-stdin",
                    "--timeout", "1", stdin="guess\n")
        assert wrong.returncode == 1 and "Unauthorized" in wrong.stderr, wrong.stderr
        missing = cli("pack", address(server), "-u", "ops", "--password-file",
                      tmp_path / "none")
        assert missing.returncode == 1
        assert "cannot read the password file" in missing.stderr
    finally:
        server.stop()


def test_status_and_pack_over_tls(tmp_path):
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    server = start_server(str(tmp_path / "data.fs"), listen="tcp:0:interface=127.0.0.1",
                          listen_tls=["tcp:0:interface=127.0.0.1"],
                          tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                          tls_ca=str(pki.ca))
    tls_port = server.addresses[-1].rsplit(":", 1)[1]
    try:
        target = "localhost:%s" % tls_port
        certificate = ["--tls-ca", pki.ca, "--tls-cert", pki.client_cert,
                       "--tls-key", pki.client_key]
        ok = cli("status", target, *certificate, "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["ok"] is True
        packed = cli("pack", target, *certificate)
        assert packed.returncode == 0, packed.stderr
        without = cli("status", target, "--tls-ca", pki.ca, "--timeout", "1")
        assert without.returncode == 1 and "certificate required" in without.stderr
    finally:
        server.stop()


def test_version():
    installed = version("zeotwist")
    assert zeotwist.__version__ == installed
    done = cli("--version")
    assert done.returncode == 0 and done.stdout == "zeotwist %s\n" % installed


def test_console_script_is_installed():
    """``pip install`` puts a ``zeotwist`` script beside this interpreter."""
    script = os.path.join(os.path.dirname(sys.executable), "zeotwist")
    assert os.access(script, os.X_OK), "no zeotwist script: reinstall (pip install -e .)"
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("zeotwist ")
    usage = subprocess.run([script], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "status" in usage.stderr and "pack" in usage.stderr


@pytest.mark.parametrize("argv", [["status"], ["pack"], ["frobnicate"]])
def test_bad_usage_exits_2(argv):
    done = cli(*argv)
    assert done.returncode == 2 and done.stderr.startswith("usage: zeotwist")


def test_zeo_commands_beside_ours_are_named_plainly():
    """README.md and docs/tools.md name exactly the console scripts ZEO
    installs (the [test] and [zodburi] extras pull ZEO in), and say they
    are ZEO's; zeotwist's own console script is only ``zeotwist``."""
    import re
    from importlib.metadata import distribution
    from pathlib import Path
    zeos = sorted(ep.name for ep in distribution("ZEO").entry_points
                  if ep.group == "console_scripts")
    ours = sorted(ep.name for ep in distribution("zeotwist").entry_points
                  if ep.group == "console_scripts")
    assert ours == ["zeotwist"] and "zeotwist" not in zeos
    requirements = " ".join(distribution("zeotwist").requires or ())
    assert re.search(r"ZEO>=6; extra == \"test\"", requirements), requirements
    assert any(r.startswith("ZEO") for r in distribution("zodburi").requires)
    root = Path(__file__).resolve().parent.parent
    for doc in ("README.md", "docs/tools.md", "docs/testing.md"):
        text = " ".join((root / doc).read_text().split())
        named = re.search(r"ZEO's own commands \(?((?:`[\w-]+`(?:, | and )?)+)\)?", text)
        assert named, doc
        assert sorted(re.findall(r"`([\w-]+)`", named.group(1))) == zeos, doc
        assert "speak ZEO's protocol" in text, doc
