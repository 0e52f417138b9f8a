"""Start and stop the two servers the benchmark compares, as subprocesses.

* zeotwist: ``python -m zeotwist serve -f FILE --listen
  tcp:0:interface=127.0.0.1 --address-file F`` (the server without twistd's
  machinery, as runzeo is ZEO's; :func:`zeotwist_argv`); ready when F appears.
* ZEO 6: ``python -m ZEO.runzeo -a 127.0.0.1:PORT -f FILE`` on a port found
  free by binding port 0; ready when the port accepts a connection.

With ``client_resolution``, both leave conflict resolution to the clients
(zeotwist ``--client-conflict-resolution``; ZEO ``client-conflict-resolution
true``, through a ``runzeo -C`` configuration file).

Both log to a file next to the database; the last lines are shown if a
server dies or never becomes ready.  :meth:`Server.stop` sends SIGTERM, then
SIGKILL after a grace period, and is safe to call more than once.
"""
import os
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"
#: Seconds a server may take to start listening.
START_TIMEOUT = 60.0
#: Seconds a server may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0


def zeotwist_argv(filename: str, address_file: str, *options: str) -> list:
    """The command that serves ``filename`` on an ephemeral loopback port and
    writes its address to ``address_file`` (also the blob bench's server)."""
    return [sys.executable, "-m", "zeotwist", "serve", "-f", filename,
            "--listen", "tcp:0:interface=%s" % HOST, "--address-file", address_file, *options]


class ServerError(RuntimeError):
    """A benchmark server did not start, or died."""


class Server:
    """One running server process; ``address`` is ``"127.0.0.1:PORT"``."""

    def __init__(self, system: str, filename: str, client_resolution: bool = False):
        self.system = system
        self.filename = filename
        self.client_resolution = client_resolution
        self.logname = filename + ".%s.log" % system
        self.address = None
        self.process = None

    def start(self) -> "Server":
        with open(self.logname, "ab") as log:
            if self.system == "zeotwist":
                self._start_zeotwist(log)
            else:
                self._start_zeo(log)
        return self

    def _start_zeotwist(self, log) -> None:
        address_file = self.filename + ".address"
        if os.path.exists(address_file):
            os.unlink(address_file)
        self.process = subprocess.Popen(
            zeotwist_argv(self.filename, address_file,
                          *(["--client-conflict-resolution"] if self.client_resolution else [])),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=os.path.dirname(self.filename))
        self._wait(lambda: os.path.exists(address_file))
        with open(address_file) as f:
            self.address = f.read().split()[0]

    def _start_zeo(self, log) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "ZEO.runzeo", "-a", "%s:%d" % (HOST, port),
                "-f", self.filename]
        if self.client_resolution:
            conf = self.filename + ".zeo.conf"
            with open(conf, "w") as f:
                f.write("<zeo>\n  address %s:%d\n  client-conflict-resolution true\n</zeo>\n"
                        "<filestorage 1>\n  path %s\n</filestorage>\n"
                        % (HOST, port, self.filename))
            argv = [sys.executable, "-m", "ZEO.runzeo", "-C", conf]
        self.process = subprocess.Popen(
            argv,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=os.path.dirname(self.filename))
        self._wait(lambda: accepts(HOST, port))
        self.address = "%s:%d" % (HOST, port)

    def _wait(self, ready) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if self.process.poll() is not None:
                raise ServerError("%s server exited with status %s:\n%s" % (
                    self.system, self.process.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError("%s server not listening after %g s:\n%s" % (
                    self.system, START_TIMEOUT, self.log_tail()))
            time.sleep(0.05)

    def check(self) -> None:
        """Raise ServerError if the server has died."""
        if self.process is not None and self.process.poll() is not None:
            raise ServerError("%s server died (status %s):\n%s" % (
                self.system, self.process.returncode, self.log_tail()))

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.logname, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
