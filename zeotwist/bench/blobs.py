"""Blob throughput, zeotwist against ZEO 6 in the same run:
``python -m zeotwist.bench.blobs``.

Both servers run as subprocesses on 127.0.0.1, each serving a FileStorage
with a blob directory (zeotwist: ``python -m zeotwist serve -f ... --blob-dir
...``; ZEO: ``runzeo -C`` with a ``<filestorage>`` that has ``blob-dir``).
Both clients are ClientStorages with a blob cache directory (ZEO:
``blob_dir=..., shared_blob_dir=False``), in this process.  Two workloads:

* large: ``--large-count`` blobs of ``--large-mb`` MB, one per transaction;
* small: ``--small-count`` blobs of ``--small-kb`` KB, 100 per transaction.

"store" times the commits (the upload included); "load" times ``loadBlob``
of every blob by a second client with an empty cache (the download).
Figures are MB/s of blob data, best of ``--repeat`` runs.  With ``--json``
(how ``python -m zeotwist.bench`` runs it, one system per round) the output
is one JSON line instead of the table: per operation the rate, and the peak
RSS of the server and of this client process.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from zeotwist.bench.procstat import own_peak_rss_mb, peak_rss_mb
from zeotwist.bench.servers import zeotwist_argv

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
SMALL_PER_TXN = 100


class BenchServer:
    """One server subprocess; ``address`` is ``(host, port)`` once started."""

    def __init__(self, system: str, directory: str):
        self.system = system
        self.directory = directory
        self.blob_dir = os.path.join(directory, "server-blobs")
        self.filename = os.path.join(directory, "data.fs")
        self.log = os.path.join(directory, "server.log")
        self.address = None
        self.process = None

    def start(self) -> "BenchServer":
        with open(self.log, "ab") as log:
            if self.system == "zeotwist":
                argv, ready = self._zeotwist_argv()
            else:
                argv, ready = self._zeo_argv()
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.directory)
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self.log, errors="replace") as f:
                    raise RuntimeError("%s server did not start:\n%s" % (self.system, f.read()))
            time.sleep(0.05)         # polling the server's readiness, bounded by the deadline
        return self

    def _zeotwist_argv(self):
        address_file = os.path.join(self.directory, "address")

        def ready():
            if not os.path.exists(address_file):
                return False
            with open(address_file) as f:
                host, port = f.read().split()[0].rsplit(":", 1)
            self.address = (host, int(port))
            return True

        return zeotwist_argv(self.filename, address_file, "--blob-dir", self.blob_dir), ready

    def _zeo_argv(self):
        port = _free_port()
        self.address = (HOST, port)
        config = os.path.join(self.directory, "zeo.conf")
        with open(config, "w") as f:
            f.write("<zeo>\n  address %s:%d\n</zeo>\n<filestorage>\n  path %s\n"
                    "  blob-dir %s\n</filestorage>\n" % (HOST, port, self.filename,
                                                          self.blob_dir))
        return [sys.executable, "-m", "ZEO.runzeo", "-C", config], lambda: _accepts(port)

    def client(self, cache: str):
        """A ClientStorage of this system with the blob cache ``cache``."""
        if self.system == "zeotwist":
            from zeotwist import ClientStorage
            return ClientStorage(self.address, blob_dir=cache, wait_timeout=30)
        from ZEO.ClientStorage import ClientStorage
        return ClientStorage(self.address, blob_dir=cache, shared_blob_dir=False,
                             wait_timeout=30)

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _payloads(count: int, size: int, work: str, tag: str) -> list:
    """Files of ``size`` bytes each (distinct contents), written to ``work``."""
    block = os.urandom(min(size, 2**20)) or b""
    paths = []
    for i in range(count):
        path = os.path.join(work, "%s-%d.src" % (tag, i))
        with open(path, "wb") as f:
            left = size
            head = i.to_bytes(8, "big")
            while left > 0:
                piece = (head + block)[:min(left, len(block) + 8)]
                f.write(piece)
                left -= len(piece)
        paths.append(path)
    return paths


def store(server, cache: str, sources: list, per_txn: int) -> tuple[float, list]:
    """Commit the files as blobs; ``(seconds, [(oid, serial)])``."""
    import transaction
    import ZODB
    from ZODB.blob import Blob
    db = ZODB.DB(server.client(cache))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        blobs = []
        t0 = time.perf_counter()
        for start in range(0, len(sources), per_txn):
            for path in sources[start:start + per_txn]:
                blob = Blob()
                blob.consumeFile(path)
                conn.add(blob)
                blobs.append(blob)
            tm.commit()
        seconds = time.perf_counter() - t0
        for blob in blobs:
            blob._p_activate()       # committed blobs are ghosts after the commit
        refs = [(b._p_oid, b._p_serial) for b in blobs]
        conn.close()
        return seconds, refs
    finally:
        db.close()


def load(server, cache: str, refs: list) -> float:
    """Seconds for a client with the empty cache ``cache`` to loadBlob every blob."""
    storage = server.client(cache)
    try:
        storage.lastTransaction()
        t0 = time.perf_counter()
        for oid, serial in refs:
            storage.loadBlob(oid, serial)
        return time.perf_counter() - t0
    finally:
        storage.close()


def run_case(server, work: str, name: str, count: int, size: int, per_txn: int,
             repeat: int) -> dict:
    best_store = best_load = None
    for r in range(repeat):
        sources = _payloads(count, size, work, "%s-%s-%d" % (server.system, name, r))
        caches = [os.path.join(work, "%s-%s-%d-%s" % (server.system, name, r, side))
                  for side in ("w", "r")]
        seconds, refs = store(server, caches[0], sources, per_txn)
        best_store = seconds if best_store is None else min(best_store, seconds)
        seconds = load(server, caches[1], refs)
        best_load = seconds if best_load is None else min(best_load, seconds)
        for directory in caches:
            shutil.rmtree(directory, ignore_errors=True)
    mb = count * size / 1e6
    return dict(store=mb / best_store, load=mb / best_load)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zeotwist.bench.blobs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mb", type=int, default=50, help="size of a large blob (MB)")
    parser.add_argument("--large-count", type=int, default=4, help="large blobs per run")
    parser.add_argument("--small-kb", type=int, default=10, help="size of a small blob (KB)")
    parser.add_argument("--small-count", type=int, default=1000, help="small blobs per run")
    parser.add_argument("--repeat", type=int, default=2, help="runs per case (best kept)")
    parser.add_argument("--systems", default="zeotwist,zeo",
                        help="comma-separated: zeotwist, zeo")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line (rates and peak RSS) instead of the table")
    parser.add_argument("--workdir", help="where servers and caches live (default: a "
                        "temporary directory, removed afterwards)")
    args = parser.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="zeotwist-blob-bench-")
    cases = [("large", args.large_count, args.large_mb * 10**6, 1),
             ("small", args.small_count, args.small_kb * 1000, SMALL_PER_TXN)]
    results = {}
    try:
        for system in args.systems.split(","):
            directory = os.path.join(work, system)
            os.makedirs(directory, exist_ok=True)
            server = BenchServer(system, directory).start()
            try:
                for name, count, size, per_txn in cases:
                    results[system, name] = run_case(server, directory, name, count, size,
                                                     per_txn, args.repeat)
                results[system, "rss"] = peak_rss_mb(server.process.pid)
            finally:
                server.stop()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json_rows(results, cases) if args.json else report(results, cases))
    return 0


def json_rows(results: dict, cases) -> str:
    """``{system: {"rows": {"blob-large-store": {"rate", "count", "seconds", "extra"}}}}``."""
    out = {}
    for system in {s for s, _ in results}:
        rows = out.setdefault(system, {"rows": {}})["rows"]
        for name, count, size, _ in cases:
            for op in ("store", "load"):
                rate = results[system, name][op]
                rows["blob-%s-%s" % (name, op)] = {
                    "rate": rate, "count": count * size / 1e6, "seconds": count * size / 1e6 / rate,
                    "extra": {"rss_mb": own_peak_rss_mb(),
                              "server_rss_mb": results[system, "rss"]}}
    return json.dumps(out)


def report(results: dict, cases) -> str:
    systems = sorted({s for s, _ in results}, key=lambda s: s != "zeotwist")
    lines = ["blob throughput, MB/s (best of runs; higher is better)", ""]
    head = "%-34s" % "case" + "".join("%12s" % s for s in systems)
    if len(systems) == 2:
        head += "%12s" % "ratio"
    lines.append(head)
    for name, count, size, per_txn in cases:
        for op in ("store", "load"):
            label = "%s %s: %d x %s" % (name, op, count, _size(size))
            row = "%-34s" % label
            values = [results[s, name][op] for s in systems]
            row += "".join("%12.1f" % v for v in values)
            if len(values) == 2:
                row += "%11.2fx" % (values[0] / values[1])
            lines.append(row)
    if len(systems) == 2:
        lines.append("")
        lines.append("ratio: %s / %s" % tuple(systems))
    return "\n".join(lines)


def _size(n: int) -> str:
    return "%d MB" % (n // 10**6) if n >= 10**6 else "%d KB" % (n // 1000)


if __name__ == "__main__":
    sys.exit(main())
