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
of every blob by a second client with an empty cache (the download).  Each
run is a fresh client process (``--one-run``) with a server of its own on a
fresh directory; ``--warmup`` untimed runs come first, then ``--repeat``
timed ones, the systems alternating run by run (:func:`run_case`), so
whatever the machine's file system state costs (docs/performance.md,
"Blobs: a fair measurement") falls on both alike.  Figures are MB/s of blob
data, the median of the timed runs.  With ``--json`` (how ``python -m
zeotwist.bench`` runs it, once per round for both systems) the output is
one JSON line instead of the table: per system and operation the rate, and
the peak RSS of the server and of the client process.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from zeotwist.bench.procstat import own_peak_rss_mb, peak_rss_mb
from zeotwist.bench.servers import accepts, free_port, zeotwist_argv

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
SMALL_PER_TXN = 100
#: blobs of this size or more are large: a run removes their files at once
LARGE = 2**20


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
        port = free_port()
        self.address = (HOST, port)
        config = os.path.join(self.directory, "zeo.conf")
        with open(config, "w") as f:
            f.write("<zeo>\n  address %s:%d\n</zeo>\n<filestorage>\n  path %s\n"
                    "  blob-dir %s\n</filestorage>\n" % (HOST, port, self.filename,
                                                          self.blob_dir))
        return [sys.executable, "-m", "ZEO.runzeo", "-C", config], lambda: accepts(HOST, port)

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


def one_run(system: str, work: str, name: str, count: int, size: int,
            per_txn: int) -> tuple:
    """:func:`run_here` in a fresh process (``--one-run``): neither system's
    client shares a process (its threads, its heap, its imports) with the
    other's.  ``(store s, load s, server peak RSS MB, client peak RSS MB)``."""
    argv = [sys.executable, "-m", "zeotwist.bench.blobs", "--workdir", work, "--one-run",
            system, name, str(count), str(size), str(per_txn)]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError("%s %s blob run failed (status %d):\n%s" % (
            system, name, done.returncode, done.stderr[-3000:]))
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def run_here(system: str, work: str, name: str, count: int, size: int,
             per_txn: int) -> tuple:
    """One store and load of the case with a server of its own on a fresh
    directory, in this process: ``(store seconds, load seconds, server peak
    RSS MB, this process's peak RSS MB)``.

    A run of large blobs removes everything it wrote once it is measured:
    its files (sources, server blobs, caches) would otherwise pile up in
    the page cache, and each later run would write into never-touched
    memory, several times slower on this VM.  A run of small ones keeps its
    files (the caller removes ``work``): on ext4, creating a file skips the
    inodes deleted in the last minutes, at a cost per deleted inode, so
    removing a thousand files slows the next run's file creations
    (docs/performance.md, "Blobs: a fair measurement").  The dirty pages of
    the sources (and of the store) are written back (``os.sync``) before
    each timed phase, so no phase pays for an earlier one's write-back.
    """
    directory = tempfile.mkdtemp(prefix="%s-%s-" % (system, name), dir=work)
    server = BenchServer(system, directory).start()
    try:
        sources = _payloads(count, size, directory, "src")
        caches = [os.path.join(directory, side) for side in ("cache-w", "cache-r")]
        os.sync()
        store_s, refs = store(server, caches[0], sources, per_txn)
        os.sync()
        load_s = load(server, caches[1], refs)
        return store_s, load_s, peak_rss_mb(server.process.pid), own_peak_rss_mb()
    finally:
        server.stop()
        if size >= LARGE:
            shutil.rmtree(directory, ignore_errors=True)


def run_case(systems: list, work: str, name: str, count: int, size: int, per_txn: int,
             repeat: int, warmup: int = 1) -> dict:
    """``warmup`` untimed runs per system (they touch fresh memory first),
    then ``repeat`` timed ones, the systems alternating (their order
    reversed every run); ``{system: {"store", "load" (median MB/s), "rss"}}``."""
    times = {system: [] for system in systems}
    for r in range(warmup + repeat):
        for system in (systems if r % 2 == 0 else systems[::-1]):
            got = one_run(system, work, name, count, size, per_txn)
            if r >= warmup:
                times[system].append(got)
    mb = count * size / 1e6
    return {system: dict(store=mb / statistics.median(t[0] for t in runs),
                         load=mb / statistics.median(t[1] for t in runs),
                         rss=max((t[2] for t in runs if t[2] is not None), default=None),
                         client_rss=max(t[3] for t in runs))
            for system, runs in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zeotwist.bench.blobs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mb", type=int, default=50, help="size of a large blob (MB)")
    parser.add_argument("--large-count", type=int, default=4, help="large blobs per run")
    parser.add_argument("--small-kb", type=int, default=10, help="size of a small blob (KB)")
    parser.add_argument("--small-count", type=int, default=1000, help="small blobs per run")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--systems", default="zeotwist,zeo",
                        help="comma-separated: zeotwist, zeo (alternated run by run)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line (rates and peak RSS) instead of the table")
    parser.add_argument("--workdir", help="where servers and caches live (default: a "
                        "temporary directory, removed afterwards)")
    parser.add_argument("--one-run", nargs=5, metavar=("SYSTEM", "CASE", "COUNT", "SIZE",
                                                       "PER_TXN"),
                        help="(internal) one run in this process; prints its JSON figures")
    args = parser.parse_args(argv)
    if args.one_run:
        system, name, count, size, per_txn = args.one_run
        print(json.dumps(run_here(system, args.workdir, name, int(count), int(size),
                                  int(per_txn))))
        return 0
    work = args.workdir or tempfile.mkdtemp(prefix="zeotwist-blob-bench-")
    cases = [("large", args.large_count, args.large_mb * 10**6, 1),
             ("small", args.small_count, args.small_kb * 1000, SMALL_PER_TXN)]
    results = {}
    try:
        for name, count, size, per_txn in cases:
            got = run_case(args.systems.split(","), work, name, count, size, per_txn,
                           args.repeat, args.warmup)
            results.update(((system, name), rates) for system, rates in got.items())
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json_rows(results, cases) if args.json else report(results, cases))
    return 0


def json_rows(results: dict, cases) -> str:
    """``{system: {"rows": {"blob-large-store": {"rate", "count", "seconds", "extra"}}}}``."""
    out = {}
    for system in dict.fromkeys(s for s, _ in results):
        rows = out.setdefault(system, {"rows": {}})["rows"]
        for name, count, size, _ in cases:
            for op in ("store", "load"):
                rate = results[system, name][op]
                rows["blob-%s-%s" % (name, op)] = {
                    "rate": rate, "count": count * size / 1e6, "seconds": count * size / 1e6 / rate,
                    "extra": {"rss_mb": results[system, name]["client_rss"],
                              "server_rss_mb": results[system, name]["rss"]}}
    return json.dumps(out)


def report(results: dict, cases) -> str:
    systems = sorted({s for s, _ in results}, key=lambda s: s != "zeotwist")
    lines = ["blob throughput, MB/s (median of runs; higher is better)", ""]
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
