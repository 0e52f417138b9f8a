"""The benchmark's summary: medians per system and case, ratios, and notes.

``results`` maps ``(system, case)`` to one result per round (the client's
``{"count", "seconds", "extra"}`` plus ``"rate"``), ``case`` there being
a row of :data:`zeotwist.bench.runner.ROWS`.  Ratios are of the
medians; "per-round ratios" is the lowest and highest ratio of the two
values measured in the same round.  The cases in :data:`TIMED` (``pack``)
show seconds, not rates: there the ratio zeotwist/ZEO is of times, and lower
is better.
"""
import statistics
from importlib import metadata

SYSTEMS = ("zeotwist", "zeo")
#: The issue's target for pipelined cold loads: this many times ZEO's
#: sequential cold-load rate.
PIPELINED_TARGET = 10.0
#: Cases reported in seconds (lower is better) rather than as rates.
TIMED = ("pack",)


def label(system: str) -> str:
    if system == "zeo":
        try:
            return "ZEO " + metadata.version("ZEO")
        except metadata.PackageNotFoundError:
            return "ZEO"
    return "zeotwist"


def rates(results: dict, system: str, case: str) -> list:
    return [r["rate"] for r in results.get((system, case), ())]


def values(results: dict, system: str, case: str) -> list:
    """The figures the table shows: seconds for TIMED cases, else rates."""
    key = "seconds" if case in TIMED else "rate"
    return [r[key] for r in results.get((system, case), ())]


def extras(results: dict, system: str, case: str, key: str) -> list:
    return [r["extra"][key] for r in results.get((system, case), ())
            if r["extra"].get(key) is not None]


def median(values: list):
    return statistics.median(values) if values else None


def ratio(a: list, b: list) -> str:
    """``"median(a)/median(b)  lo-hi"`` over rounds, or "" if either is missing."""
    if not a or not b:
        return ""
    per = sorted(x / y for x, y in zip(a, b))
    return "%.2f  (per round %.2f-%.2f)" % (median(a) / median(b), per[0], per[-1])


def summary(results: dict, systems, rows, settings=None) -> str:
    """The medians table (ratio columns only when both systems ran; a
    ``local FS`` column when :mod:`zeotwist.bench.local` ran), the
    latency and memory table, then the comparisons and figures of the cases
    that ran.  ``rows`` are :data:`zeotwist.bench.runner.ROWS` entries."""
    both = set(SYSTEMS) <= set(systems)
    local = any(("local", r[0]) in results for r in rows)
    cols = ["%-20s" % "case"] + ["%14s" % label(s) for s in SYSTEMS]
    cols += ["%14s" % "zeotwist/ZEO", "  %-16s" % "per-round ratios"] if both else []
    cols += ["%14s" % "local FS"] if local else []
    lines = ["".join(cols) + "    (medians)"]
    for row, _, lbl, unit in rows:
        out = ["%-20s" % lbl]
        fmt = "%14.2f" if row in TIMED else "%14.0f"
        for s in SYSTEMS:
            m = median(values(results, s, row)) if s in systems else None
            out.append(fmt % m if m is not None else "%14s" % "-")
        if both:
            zt, zeo = values(results, "zeotwist", row), values(results, "zeo", row)
            out.append("%14.2f" % (median(zt) / median(zeo)))
            per = sorted(a / b for a, b in zip(zt, zeo))
            out.append("  %-16s" % ("%.2f-%.2f" % (per[0], per[-1])))
        if local:
            m = median(values(results, "local", row))
            out.append(fmt % m if m is not None else "%14s" % "")
        lines.append("".join(out) + "    " + unit)
    lines += [""] + latency_memory(results, systems, rows)
    names = {r for r, _, _, _ in rows}
    notes = []
    for name, notes_of in (("pipelined", pipelined_notes), ("warm", warm_notes),
                           ("hotset", hotset_notes), ("graph", graph_notes),
                           ("commits", commit_notes), ("invalidation", invalidation_notes),
                           ("writers", writer_notes), ("counter", writer_notes),
                           ("resolving", resolving_notes),
                           ("pack", pack_notes)):
        if name in names:
            notes += notes_of(results, settings, name)
    return "\n".join(lines + ([""] + notes if notes else []))


def _cell(values: list, fmt: str) -> str:
    m = median(values)
    if m is None:
        return "-"
    return "%.0f" % m if fmt == "ms" and m >= 100 else ("%.3g" if fmt == "ms" else fmt) % m


def latency_memory(results: dict, systems, rows) -> list:
    """Per row: p50/p99 in ms where it is a latency, and the peak RSS (MB)
    of the client process(es) and of the server, per system (medians); with
    both systems, the RSS ratios zeotwist/ZEO (client/server; the issue's
    bound is 1.20)."""
    shown = [s for s in SYSTEMS if s in systems]
    both = set(SYSTEMS) <= set(shown)
    head = "%-20s" % "latency, memory" + "".join(
        "%22s%16s" % ("%s p50/p99 ms" % label(s), "RSS cli/srv MB") for s in shown)
    out = [head + ("%18s" % "RSS zeotwist/ZEO" if both else "")]
    for row, _, lbl, _ in rows:
        cells = []
        for s in shown:
            p50, p99 = extras(results, s, row, "p50"), extras(results, s, row, "p99")
            lat = "%s/%s" % (_cell(p50, "ms"), _cell(p99, "ms")) if p50 else ""
            rss = "%s/%s" % (_cell(extras(results, s, row, "rss_mb"), "%.0f"),
                             _cell(extras(results, s, row, "server_rss_mb"), "%.0f"))
            cells.append("%22s%16s" % (lat, rss))
        if both:
            cells.append("%18s" % "/".join(_rss_ratio(results, row, key)
                                           for key in ("rss_mb", "server_rss_mb")))
        out.append("%-20s" % lbl + "".join(cells))
    return out


def _rss_ratio(results: dict, row: str, key: str) -> str:
    zt, zeo = median(extras(results, "zeotwist", row, key)), median(extras(results, "zeo", row, key))
    return "%.2f" % (zt / zeo) if zt and zeo else "-"


def invalidation_notes(results: dict, settings, row: str = "invalidation") -> list:
    out = ["invalidation: a writer commits one Item at a time; a second client of the "
           "server in the same process notes its storage's invalidate(tid, oids); latency "
           "(p50/p99 above) from the start of the commit to that call"]
    for s in SYSTEMS:
        commit, after = extras(results, s, row, "commit_p50"), extras(results, s, row, "after_p50")
        if commit:
            out.append("  %-10s p50 of the commit itself %.3f ms; from its return to the "
                       "invalidation %.3f ms" % (label(s), median(commit), median(after)))
    zt, zeo = extras(results, "zeotwist", row, "p50"), extras(results, "zeo", row, "p50")
    if zt and zeo:
        out.append("  zeotwist/ZEO p50 latency %.2f (lower is better; the target is <= 1)" % (
            median(zt) / median(zeo)))
    return out


def graph_notes(results: dict, settings, row: str) -> list:
    out = []
    for s in SYSTEMS:
        runs = [r for r in results.get((s, row), ()) if r["extra"].get("fetched") is not None]
        if runs:
            r = runs[0]
            out.append("  %-10s %d objects activated, %d storage loads, %d of them round trips "
                       "to the server" % (label(s), r["count"], r["extra"]["loads"],
                                          r["extra"]["fetched"]))
    return (["graph cold read (first round):"] + out) if out else []


def commit_notes(results: dict, settings, row: str) -> list:
    out = []
    for s in SYSTEMS:
        runs = results.get((s, row), ())
        cpu = [r["extra"]["server_cpu"] / r["count"] for r in runs
               if r["extra"].get("server_cpu") is not None and r["count"]]
        if cpu:
            out.append("  %-10s server CPU per commit %.0f µs (%.2f s per 1,000 commits)" % (
                label(s), median(cpu) * 1e6, median(cpu) * 1e3))
    return (["small commits: one Item changed per transaction through ZODB; server CPU "
             "from /proc over the timed loop"] + out) if out else []


def writer_notes(results: dict, settings, row: str) -> list:
    n = getattr(settings, "writers", 4) if settings else 4
    what = "distinct Counters" if row == "writers" else "one Counter"
    out = ["writers, %s: %d processes, each committing %s increments (conflicts "
           "retried); lost = committed increments missing from the counter" % (
               what, n, getattr(settings, "writer_commits", "N") if settings else "N")]
    for s in SYSTEMS:
        if results.get((s, row)):
            longest = extras(results, s, row, "max")
            over_time = [m for m in extras(results, s, row, "p99_time") if m is not None]
            out.append("  %-10s conflicts %d (all rounds), lost updates %d%s%s" % (
                label(s), sum(extras(results, s, row, "conflicts")),
                sum(extras(results, s, row, "lost")),
                ", longest increment %s ms" % " / ".join(
                    "%.3g" % m for m in longest) if longest else "",
                ", p99 over time %s ms" % " / ".join(
                    "%.3g" % m for m in over_time) if over_time else ""))
    out.append("  (per round; p99 over time: each increment weighted by its length, the "
               "increment in flight at a random moment)")
    return out


def resolving_notes(results: dict, settings, row: str = "resolving") -> list:
    n = getattr(settings, "writers", 4) if settings else 4
    out = ["writers, 1 Length: %d processes, each committing %s increments of one "
           "BTrees.Length, the server in client-side conflict resolution mode (zeotwist "
           "--client-conflict-resolution, ZEO client-conflict-resolution true); conflicts = "
           "ConflictErrors the application saw, errors = other failed commits (retried), "
           "re-votes = conflicting commits resolved by a client, one more round trip each" % (
               n, getattr(settings, "writer_commits", "N") if settings else "N")]
    for s in SYSTEMS:
        if results.get((s, row)):
            revotes = extras(results, s, row, "resolutions")
            out.append("  %-10s conflicts %d, errors %d, lost updates %d, re-votes %s "
                       "(all rounds)" % (
                           label(s), sum(extras(results, s, row, "conflicts")),
                           sum(extras(results, s, row, "errors")),
                           sum(extras(results, s, row, "lost")),
                           sum(revotes) if revotes else "not counted"))
    return out


def pipelined_notes(results: dict, settings, row: str = "pipelined") -> list:
    window = settings.window if settings else 64
    zt = rates(results, "zeotwist", "pipelined")
    out = ["pipelined cold: zeotwist = Deferred API, %d load_before outstanding; "
           "ZEO = ClientStorage.prefetch(all oids) then loadBefore each" % window]
    for other, what in (("zeo", "%s sequential cold reads" % label("zeo")),
                        ("zeotwist", "zeotwist sequential cold reads")):
        r = ratio(zt, rates(results, other, "cold"))
        if r:
            target = " (target >= %g)" % PIPELINED_TARGET if other == "zeo" else ""
            out.append("  zeotwist pipelined / %s: %s%s" % (what, r, target))
    r = ratio(rates(results, "zeo", "pipelined"), rates(results, "zeo", "cold"))
    if r:
        out.append("  ZEO prefetch / ZEO sequential cold reads: %s" % r)
    return out


def warm_notes(results: dict, settings=None, row: str = "warm") -> list:
    line = ["warm reads without ZODB (storage.loadBefore, client cache only):"]
    for s in SYSTEMS:
        m = median(extras(results, s, "warm", "storage_rate"))
        if m is not None:
            line.append("%s %.0f loads/s" % (label(s), m))
    r = ratio(extras(results, "zeotwist", "warm", "storage_rate"),
              extras(results, "zeo", "warm", "storage_rate"))
    return ["  ".join(line) + ("; zeotwist/ZEO %s" % r if r else "")]


def hotset_notes(results: dict, settings, row: str = "hotset") -> list:
    out = []
    if settings is not None:
        out.append("hot-set mix: %d reads, 1 commit per 100 reads, client cache %d bytes, "
                   "writer at %g commits/s" % (settings.hot_reads, settings.hot_cache_size,
                                               settings.writer_rate))
    for s in SYSTEMS:
        if (s, "hotset") not in results:
            continue
        loads = extras(results, s, "hotset", "loads")
        hits = extras(results, s, "hotset", "cache_hits")
        misses = extras(results, s, "hotset", "cache_misses")
        own = ""
        if s == "zeotwist" and misses:
            own = "cache.stats() hits/(hits+misses) %.3f" % median(
                [h / (h + m) for h, m in zip(hits, misses) if h + m])
        elif hits and loads:
            own = "cache getStats() accesses/loads %.3f" % median(
                [h / n for h, n in zip(hits, loads) if n])
        out.append("  %-10s hit ratio %.3f (loads answered without a round trip); %s; "
                   "conflicts %d; writer %.0f commits/s" % (
                       label(s), median(extras(results, s, "hotset", "hit_ratio")) or 0.0,
                       own, sum(extras(results, s, "hotset", "conflicts")) +
                       sum(extras(results, s, "hotset", "writer_conflicts")),
                       median(extras(results, s, "hotset", "writer_rate")) or 0.0))
    return out


def pack_notes(results: dict, settings, row: str = "pack") -> list:
    built = getattr(settings, "pack_built", None) if settings else None
    head = "pack: storage.pack(time.time(), referencesf) from a client until it returns"
    if built:
        head += ("; database of %d Items (%d transactions: %d rewritten once, %d dropped "
                 "from the BTree)" % (built["objects"], built["transactions"],
                                      built["rewritten"], built["dropped"]))
    out = [head + "; seconds, lower is better"]
    for s in SYSTEMS:
        runs = results.get((s, "pack"), ())
        if runs:
            out.append("  %-10s file %.1f MB -> %s MB" % (
                label(s), runs[0]["size_before"] / 1e6,
                ", ".join(sorted({"%.1f" % (r["size_after"] / 1e6) for r in runs}))))
    return out
