"""The benchmark's client processes: one case run against one server.

Every case's client is ``python -m zeotwist.bench.workload CASE SYSTEM
ADDRESS OIDFILE key=value...`` in a fresh process (:func:`client`), whose
last line of output is its JSON result (:func:`parse_result`); a group
case runs several side by side (:func:`group`, :mod:`zeotwist.bench.groups`),
and the hotset case has a writer process committing beside it
(:func:`with_writer`).  A process that fails or runs over its time raises
:class:`BenchError`, after the server is checked (a server that died says
so instead).  The rounds that call these are :mod:`zeotwist.bench.runner`'s.
"""
import json
import selectors
import subprocess
import sys
import tempfile

from zeotwist.bench.groups import GroupError, run_group
from zeotwist.bench.servers import Server

#: Seconds one client process may run.
CLIENT_TIMEOUT = 900.0
#: Seconds the writer may take to connect and report ready, and to exit.
WRITER_TIMEOUT = 120.0


class BenchError(RuntimeError):
    """A client process failed."""


def argv_for(server: Server, case: str, oidfile: str, params: dict) -> list:
    return [sys.executable, "-m", "zeotwist.bench.workload", case, server.system,
            server.address, oidfile] + ["%s=%s" % kv for kv in sorted(params.items())]


def group(server: Server, case: str, oidfile: str, n: int, params: dict) -> dict:
    """Run ``n`` processes of ``case`` side by side; the combined result."""
    argvs = [argv_for(server, case, oidfile, dict(params, index=i)) for i in range(n)]
    try:
        result = run_group(argvs)
    except GroupError as e:
        server.check()
        raise BenchError("%s %s: %s" % (server.system, case, e))
    result["rate"] = result["count"] / result["seconds"]
    return result


def client(server: Server, case: str, oidfile: str, params: dict) -> dict:
    """Run one workload in a fresh process; its result, with ``rate`` in operations/s."""
    try:
        done = subprocess.run(argv_for(server, case, oidfile, params), capture_output=True,
                              text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError("%s %s client ran over %g s" % (server.system, case, CLIENT_TIMEOUT))
    if done.returncode != 0:
        server.check()
        raise BenchError("%s %s client failed (status %d):\n%s" % (
            server.system, case, done.returncode, done.stderr[-3000:]))
    return parse_result(done.stdout)


def parse_result(stdout: str) -> dict:
    """The client's last line: one result, or ``{"rows": {row: result}}``;
    each result gets ``rate`` (operations/s) unless it has one."""
    result = json.loads(stdout.strip().splitlines()[-1])
    for one in (result.get("rows") or {"": result}).values():
        one.setdefault("extra", {})
        one.setdefault("rate", one["count"] / one["seconds"])
    return result


def with_writer(server: Server, oidfile: str, params: dict, rate: float) -> dict:
    """The hotset client, with a writer process committing ``rate`` times a
    second from before it starts until it has finished."""
    errors = tempfile.TemporaryFile(mode="w+")
    writer = subprocess.Popen(
        argv_for(server, "writer", oidfile, {"rate": float(rate)}), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
    try:
        wait_ready(writer, errors, server)
        result = client(server, "hotset", oidfile, params)
        writer.stdin.close()
        try:
            writer.wait(WRITER_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError("%s writer did not stop within %g s" % (
                server.system, WRITER_TIMEOUT))
        if writer.returncode != 0:
            raise BenchError("%s writer failed (status %d):\n%s" % (
                server.system, writer.returncode, tail(errors)))
        wrote = parse_result(writer.stdout.read())
        result["extra"].update(writer_rate=wrote["rate"],
                               writer_conflicts=wrote["extra"]["conflicts"])
        return result
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        errors.close()


def wait_ready(writer, errors, server: Server) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(writer.stdout, selectors.EVENT_READ)
        if not sel.select(WRITER_TIMEOUT):
            raise BenchError("%s writer not ready after %g s" % (server.system, WRITER_TIMEOUT))
    line = writer.stdout.readline()
    if not line or not json.loads(line).get("ready"):
        server.check()
        writer.wait(WRITER_TIMEOUT)
        raise BenchError("%s writer failed (status %s):\n%s" % (
            server.system, writer.returncode, tail(errors)))


def tail(f, size: int = 3000) -> str:
    f.seek(0)
    return f.read()[-size:]
