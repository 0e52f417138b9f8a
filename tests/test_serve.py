"""``zeotwist serve``: the server without twistd (zeotwist/server/serve.py).

It serves as ``twistd -n zeotwist`` does, stops cleanly on SIGTERM, says a
mistake in one line, and loads none of twistd's machinery (pdb, the plugin
scan's unittest and argparse): what it is for (docs/performance.md, "Memory").
"""
import subprocess
import sys

from zeotwist.testing import start_twistd

from test_footprint import commit_one

#: ``zeotwist serve``, writing the names of the modules it loaded (lazy ones
#: not yet used left out) to the file named by its first argument when it exits
SERVE_LISTING_MODULES = [sys.executable, "-c", (
    "import atexit, sys\n"
    "listing = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(listing, 'w').write('\\n'.join(\n"
    "    m for m, v in sys.modules.items() if type(v).__name__ != '_LazyModule')))\n"
    "from zeotwist.cli import main\n"
    "sys.exit(main(['serve'] + sys.argv[1:]))\n")]
#: what twistd brings and a server has no use for; what Twisted imports and
#: a plain server does not use (zeotwist.server.footprint.LAZY_MODULES); and
#: ZConfig (only -C reads a file), importlib.metadata with email and zipfile
#: (zeotwist.installed reads the start-up line's versions), MappingStorage
NOT_LOADED = ("twisted.scripts", "twisted.application.app", "twisted.trial",
              "unittest", "pdb", "argparse", "http.cookiejar", "twisted.persisted.sob",
              "decimal", "_decimal", "html.entities", "twisted.internet.process",
              "twisted.internet.unix", "twisted.internet.udp", "twisted.python.modules",
              "twisted.python.zippath", "twisted.python.filepath", "ZConfig",
              "importlib.metadata", "email", "zipfile", "ZODB.MappingStorage")


def test_serve_serves_and_loads_none_of_twistds_machinery(tmp_path):
    listing = tmp_path / "modules"
    server = start_twistd(str(tmp_path / "data.fs"),
                          launcher=[*SERVE_LISTING_MODULES, str(listing)])
    try:
        commit_one(server)
    finally:
        status = server.stop()
    assert status == 0, server.log()
    log = server.log()
    assert "zeotwist serving" in log and "zeotwist closed storage '1'" in log, log
    modules = listing.read_text().split()
    assert "zeotwist.server.service" in modules         # the listing is the server's
    assert [m for m in modules if m.startswith(NOT_LOADED)] == []


def test_serve_says_a_mistake_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "zeotwist", "serve", "--listne", "tcp:0"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (1, "zeotwist serve: unknown option --listne\n")


def test_serve_that_cannot_listen_exits_non_zero(tmp_path):
    missing = tmp_path / "missing" / "socket"
    done = subprocess.run([sys.executable, "-m", "zeotwist", "serve", "-f", "data.fs",
                           "--listen", "unix:%s" % missing],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.splitlines() == [
        "zeotwist: cannot listen on unix:%s: the directory %s does not exist"
        % (missing, missing.parent)], done.stderr
