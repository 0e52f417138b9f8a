"""What the ``zeotwist`` commands do (parsing is in :mod:`zeotwist.cli`).

``status`` asks a running server for one storage's counters (the Info
command, as ``ClientStorage.server_status()``), read-only, and prints them;
``pack`` packs a storage of a running server (as ZEO's ``zeopack``): the
server removes the revisions that were no longer current ``--days`` days
ago and, if its storage collects garbage when packing, the unreachable
objects, in a thread of its own while it goes on serving; ``adduser`` edits
a server's password file.  Each returns the process exit status and reports
a failure as one line on standard error.  Runs in the calling thread.
"""
import json
import sys
import time

from zeotwist.errors import ClientDisconnected

#: the counters ``status`` prints first, with their labels; others follow as named
_LABELS = (("name", "storage name"), ("length", "objects"), ("size", "size"),
           ("last_tid", "last commit"), ("connections", "connections"),
           ("waiting", "commit-lock waiters"), ("commits", "commits"), ("aborts", "aborts"),
           ("conflicts", "conflicts"), ("client_resolutions", "client resolutions"),
           ("loads", "loads"), ("start_time", "up since"))


def _error(prog: str, message: str) -> int:
    print("zeotwist %s: %s" % (prog, message), file=sys.stderr)
    return 1


def _quiet_logging() -> None:
    """The client's own log lines (retries, lost connections) would repeat
    the one line these commands print: keep them out of the terminal."""
    import logging
    logging.getLogger("zeotwist").setLevel(logging.CRITICAL + 1)


def _open(options, prog: str, wait_timeout: float, **kw):
    """``(a connected ClientStorage, None)``, or ``(None, why)`` after printing
    the error line."""
    from ZODB.POSException import StorageError

    from zeotwist.cli import client_arguments
    from zeotwist.client.storage import ClientStorage
    from zeotwist.tls import describe_error
    _quiet_logging()
    try:
        kw.update(client_arguments(options))
        return ClientStorage(options.address, storage=options.storage, cache_size=2**20,
                             wait_timeout=wait_timeout, **kw), None
    except (StorageError, ValueError, TypeError, OSError) as e:
        why = str(e) if isinstance(e, ClientDisconnected) else describe_error(e)
        _error(prog, "cannot connect to %s: %s" % (options.address, why))
        return None, why


# -- status ------------------------------------------------------------------------

def tid_time(tid: bytes) -> float:
    from persistent.TimeStamp import TimeStamp
    return TimeStamp(tid).timeTime()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def status_report(info: dict, address: str, storage: str) -> dict:
    """The JSON-ready report of an Info answer: bytes as hex, times also ISO."""
    report = {"address": str(address), "storage": storage, "ok": True}
    for key, value in info.items():
        report[key] = value.hex() if isinstance(value, bytes) else value
    last = info.get("last_tid")
    if isinstance(last, bytes) and last != b"\0" * 8:
        report["last_commit"] = _iso(tid_time(last))
    if isinstance(info.get("start_time"), float):
        report["started"] = _iso(info["start_time"])
        report["uptime"] = round(time.time() - info["start_time"], 1)
    return report


def format_status(report: dict) -> str:
    """The human-readable form of :func:`status_report`."""
    lines = ["zeotwist server %s, storage %r: answering" % (report["address"],
                                                            report["storage"])]
    shown = {"address", "storage", "ok", "last_commit", "started", "uptime"}
    for key, label in _LABELS:
        if key not in report:
            continue
        shown.add(key)
        value = report[key]
        if key == "size":
            value = "%s (%d bytes)" % (_human_bytes(value), value)
        elif key == "last_tid":
            value = "%s (tid %s)" % (report.get("last_commit", "none"), value)
        elif key == "start_time":
            value = "%s (%s ago)" % (report["started"], _human_seconds(report["uptime"]))
        lines.append("  %-20s %s" % (label, value))
    for key in sorted(set(report) - shown):
        lines.append("  %-20s %s" % (key.replace("_", " "), report[key]))
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" if unit == "bytes" else "%.1f %s") % (n, unit)
        n /= 1024
    return str(n)


def _human_seconds(s: float) -> str:
    s = int(s)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [("%dd" % days) if days else "", ("%dh" % hours) if hours else "",
             ("%dm" % minutes) if minutes else "", "%ds" % s]
    return " ".join(p for p in parts if p)


def status(options) -> int:
    deadline = time.monotonic() + options.timeout      # for connecting and asking together
    storage, why = _open(options, "status", options.timeout, read_only=True,
                         timeout=options.timeout)
    if storage is None:
        return _status_failed(options, why)
    try:
        info = dict(storage._call(storage.client.info,
                                  timeout=max(0.1, deadline - time.monotonic())))
    except ClientDisconnected as e:
        _error("status", "no answer from %s: %s" % (options.address, e))
        return _status_failed(options, str(e))
    finally:
        storage.close()
    report = status_report(info, options.address, options.storage)
    print(json.dumps(report, sort_keys=True) if options.json else format_status(report))
    return 0


def _status_failed(options, why: str) -> int:
    if options.json:
        print(json.dumps({"address": str(options.address), "storage": options.storage,
                          "ok": False, "error": why}, sort_keys=True))
    return 1


# -- pack ----------------------------------------------------------------------------

def pack(options) -> int:
    from ZODB.POSException import StorageError
    pack_time = time.time() - options.days * 86400
    storage, _ = _open(options, "pack", options.wait_timeout)
    if storage is None:
        return 1
    try:
        storage.pack(pack_time)
    except StorageError as e:
        return _error("pack", "%s: %s" % (type(e).__name__, e))
    finally:
        storage.close()
    print("packed storage %r of %s as of %s" % (
        options.storage, options.address,
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pack_time))))
    return 0


# -- adduser -------------------------------------------------------------------------

def adduser(options) -> int:
    import getpass

    from zeotwist.server.userfile import DEFAULT_ITERATIONS, set_user
    password = None
    if not options.no_password:
        if options.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass("password for %s: " % options.name)
            if getpass.getpass("again: ") != password:
                return _error("adduser", "the passwords differ")
        if not password:
            return _error("adduser", "empty password (use --no-password for a "
                                     "certificate-only user)")
    try:
        set_user(options.file, options.name, password, options.rights,
                 options.iterations or DEFAULT_ITERATIONS)
    except (ValueError, OSError) as e:
        return _error("adduser", str(e))
    print("user %s in %s: %s" % (options.name, options.file, options.rights))
    return 0
