"""The throw-away PostgreSQL cluster of the scale-out tests leaks nothing:
a test run killed with SIGKILL leaves no server running and no directory
behind (its watchdog stops both), and ``stop()`` cleans up at once."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from procutil import wait_for

pytestmark = pytest.mark.usefixtures("pg_cluster")   # skipped (or failed under CI) without PG

STARTER = """
import sys
from zeotwist.pgtesting import PostgresCluster
c = PostgresCluster().start()
print(c.root, c.port, flush=True)
sys.stdin.read()        # until killed
"""


def accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_sigkilled_owner_leaves_no_server_and_no_directory():
    owner = subprocess.Popen([sys.executable, "-c", STARTER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        root, port = owner.stdout.readline().split()
        port = int(port)
        assert os.path.isdir(root) and accepts(port), "the cluster runs"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    wait_for(lambda: not os.path.exists(root), 60, "the watchdog removing %s" % root)
    assert not accepts(port), "the server of a killed owner still listens"


def test_stop_stops_the_server_and_its_watchdog():
    from zeotwist.pgtesting import PostgresCluster
    c = PostgresCluster().start()
    port, root, watchdog = c.port, c.root, c._watchdog
    assert accepts(port) and watchdog.poll() is None
    c.stop()
    assert watchdog.poll() is not None, "the watchdog ended with stop()"
    assert not accepts(port) and not os.path.exists(root)
