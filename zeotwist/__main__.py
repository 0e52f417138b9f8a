"""Command line tools: ``python -m zeotwist pack HOST:PORT --days N [--storage NAME]``.

``pack`` packs a storage of a running zeotwist server (as ZEO's ``zeopack``
does): the server removes the revisions that were no longer current ``N``
days ago (default 0: now) and, if its storage collects garbage when packing
(FileStorage does by default), the objects no longer reachable.  The pack
runs on the server, in a thread of its own, while it goes on serving; the
command waits for it to finish.  It connects as a writable client: a server
lets read-only connections pack only with ``--allow-read-only-pack``.
"""
import argparse
import sys
import time


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zeotwist",
                                description="zeotwist command line tools.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pack = sub.add_parser("pack", help="pack a storage of a running server",
                          description="Pack a storage of a running zeotwist server.")
    pack.add_argument("address", help="the server: HOST:PORT, a Unix socket path or a "
                                      "Twisted client endpoint string")
    pack.add_argument("--days", "-d", type=float, default=0.0,
                      help="keep the history of the last N days (default 0)")
    pack.add_argument("--storage", "-S", default="1",
                      help="the name of the storage on the server (default 1)")
    pack.add_argument("--wait-timeout", type=float, default=30.0,
                      help="seconds to wait for a connection (default 30)")
    return p.parse_args(argv)


def pack(options) -> int:
    from ZODB.POSException import StorageError

    from zeotwist.client.storage import ClientStorage
    pack_time = time.time() - options.days * 86400
    try:
        storage = ClientStorage(options.address, storage=options.storage,
                                wait_timeout=options.wait_timeout, cache_size=2**20)
    except StorageError as e:
        print("zeotwist pack: cannot connect to %s: %s" % (options.address, e), file=sys.stderr)
        return 1
    try:
        storage.pack(pack_time)
    except StorageError as e:
        print("zeotwist pack: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    finally:
        storage.close()
    print("packed storage %r of %s as of %s" % (
        options.storage, options.address,
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pack_time))))
    return 0


def main(argv=None) -> int:
    options = parse(argv)
    if options.command == "pack":
        return pack(options)
    return 2    # argparse refuses unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
