"""A throw-away PostgreSQL cluster for tests and benchmarks.

:func:`find_pg_bin` finds the server binaries (Debian keeps ``initdb`` and
``pg_ctl`` in ``/usr/lib/postgresql/<version>/bin``, not on ``PATH``);
:class:`PostgresCluster` runs ``initdb`` in a temporary directory and starts
a server on a free loopback port, listening on TCP only, with ``fsync`` off
(nothing it holds needs to survive the machine).  ``initdb`` refuses to run
as root, so when the process is root the cluster is created and run as the
``postgres`` user (``runuser``), in a directory that user owns.

Each test gets its own database (:meth:`PostgresCluster.create_database`);
one cluster serves a whole test session.  Blocking; any thread.

A started cluster has a watchdog: a small process in its own session that
holds the read end of a pipe whose write end only the creating process has.
When that process ends in any way (``stop()``, an exception, SIGKILL of a
whole test run), the pipe reads end-of-file and the watchdog stops the
server and removes the directory, so a killed test run leaks no
PostgreSQL.
"""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile

#: where Debian and Ubuntu install the server binaries
PG_LIB = "/usr/lib/postgresql"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (or no way to run them)."""


def find_pg_bin() -> str:
    """The directory with ``initdb`` and ``pg_ctl``: ``$ZEOTWIST_PG_BIN``,
    the newest ``/usr/lib/postgresql/*/bin``, or ``PATH``."""
    given = os.environ.get("ZEOTWIST_PG_BIN")
    candidates = [given] if given else []
    versions = glob.glob(os.path.join(PG_LIB, "*", "bin"))

    def version(path):
        try:
            return float(path.split(os.sep)[-2])
        except ValueError:
            return 0.0

    candidates += sorted(versions, key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for d in candidates:
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl) in %s/*/bin "
                              "or on PATH; install Debian's postgresql package" % PG_LIB)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """``initdb`` + ``pg_ctl start`` in a temporary directory; :meth:`stop` removes it."""

    user = "zodb"
    password = "zodb"

    def __init__(self, bin_dir: str | None = None):
        self.bin_dir = bin_dir or find_pg_bin()
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="zeotwist-pg-")
        self.data = os.path.join(self.root, "data")
        self._as = self._run_as()
        self._started = False
        self._dbs = 0

    def _run_as(self) -> list:
        """The argv prefix that runs a server binary as a non-root user."""
        if os.geteuid() != 0:
            return []
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no postgres user "
                                      "(initdb refuses to run as root)") from None
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", "postgres", "--"]
        return ["su", "postgres", "-s", "/bin/sh", "-c"]    # joined below

    def _cmd(self, *argv: str) -> list:
        argv = [os.path.join(self.bin_dir, argv[0]), *argv[1:]]
        if self._as[:1] == ["su"]:
            import shlex
            return [*self._as, " ".join(shlex.quote(a) for a in argv)]
        return [*self._as, *argv]

    def _check(self, *argv: str) -> None:
        r = subprocess.run(self._cmd(*argv), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, cwd=self.root)
        if r.returncode:
            raise PostgresUnavailable("%s failed (%d): %s%s" % (
                argv[0], r.returncode, r.stdout[-2000:], r.stderr[-2000:]))

    def start(self) -> "PostgresCluster":
        self._check("initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8", "--locale=C")
        opts = ("-c listen_addresses=127.0.0.1 -c port=%d -c unix_socket_directories='' "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200 -c max_prepared_transactions=10" % self.port)
        self._check("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"),
                    "-o", opts, "-w", "-t", "60", "start")
        self._started = True
        self._watchdog = self._start_watchdog()
        self.execute("CREATE ROLE %s LOGIN SUPERUSER PASSWORD '%s'"
                     % (self.user, self.password))
        return self

    def connect(self, dbname: str = "postgres", user: str = "postgres"):
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, dbname=dbname, user=user,
                                password=self.password)
        conn.autocommit = True
        return conn

    def execute(self, sql: str, dbname: str = "postgres") -> list:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self, prefix: str = "zodb") -> str:
        """A new empty database owned by the zodb user; returns its name."""
        self._dbs += 1
        name = "%s_%d_%d" % (prefix, os.getpid(), self._dbs)
        self.execute("CREATE DATABASE %s OWNER %s" % (name, self.user))
        return name

    def dsn(self, dbname: str) -> str:
        """A libpq DSN for ``dbname`` as the zodb user."""
        return ("dbname='%s' user='%s' password='%s' host='127.0.0.1' port='%d'"
                % (dbname, self.user, self.password, self.port))

    def log(self) -> str:
        try:
            with open(os.path.join(self.root, "log"), errors="replace") as f:
                return f.read()
        except OSError as e:
            return "(no log: %s)" % e

    def _stop_command(self) -> list:
        return self._cmd("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def _start_watchdog(self) -> subprocess.Popen:
        """The process that stops this cluster when we end (module docstring)."""
        return subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, self.root, *self._stop_command()],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=self.root, start_new_session=True, close_fds=True)

    def stop(self) -> None:
        if self._started:
            self._started = False
            subprocess.run(self._stop_command(), stdin=subprocess.DEVNULL,
                           capture_output=True, cwd=self.root)
            watchdog = self._watchdog
            watchdog.stdin.close()      # it finds the server stopped; it exits
            watchdog.wait()
        shutil.rmtree(self.root, ignore_errors=True)


#: the watchdog's program: argv[1] is the cluster's directory, the rest the
#: command that stops its server; it runs both once its stdin reads EOF
_WATCHDOG = """
import shutil, subprocess, sys
sys.stdin.buffer.read()
subprocess.run(sys.argv[2:], stdin=subprocess.DEVNULL, capture_output=True)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def relstorage_opener(dsn: str, keep_history: bool = True, **options):
    """A callable that opens a RelStorage on PostgreSQL ``dsn`` (what a
    server's storage section would open); ``options`` are RelStorage's
    (``blob_dir``, ``shared_blob_dir``, ``cache_local_mb``, ...)."""
    def open_storage():
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage
        opts = Options(keep_history=keep_history, **options)
        return RelStorage(PostgreSQLAdapter(dsn=dsn, options=opts), options=opts)
    return open_storage
