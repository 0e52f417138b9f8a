"""Command line tools: ``python -m zeotwist pack HOST:PORT --days N [--storage NAME]``,
``python -m zeotwist adduser FILE NAME [--rights rw=*]`` (docs/tls-auth.md).

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
    add_adduser_parser(sub)
    return p.parse_args(argv)


def add_adduser_parser(sub) -> None:
    adduser = sub.add_parser(
        "adduser", help="add or change a user of a server's password file",
        description="Add a user to the password file of twistd zeotwist --auth-file, or "
                    "replace its line (see docs/tls-auth.md). The password is read from "
                    "the terminal, or from standard input with --password-stdin.")
    adduser.add_argument("file", help="the password file (created if missing)")
    adduser.add_argument("name", help="the user name (a TLS client certificate with this "
                                      "common name also logs in as this user)")
    adduser.add_argument("--rights", "-r", default="rw=*",
                         help="rw=STORAGES;ro=STORAGES, each a comma-separated list of "
                              "storage names or * (default rw=*)")
    adduser.add_argument("--password-stdin", action="store_true",
                         help="read the password from the first line of standard input")
    adduser.add_argument("--no-password", action="store_true",
                         help="certificate-only user: no password login")
    adduser.add_argument("--iterations", type=int, default=None,
                         help="PBKDF2 rounds (default 600000)")


def adduser(options) -> int:
    import getpass

    from zeotwist.server.auth import DEFAULT_ITERATIONS, set_user
    password = None
    if not options.no_password:
        if options.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass("password for %s: " % options.name)
            if getpass.getpass("again: ") != password:
                print("zeotwist adduser: the passwords differ", file=sys.stderr)
                return 1
        if not password:
            print("zeotwist adduser: empty password (use --no-password for a "
                  "certificate-only user)", file=sys.stderr)
            return 1
    try:
        set_user(options.file, options.name, password, options.rights,
                 options.iterations or DEFAULT_ITERATIONS)
    except (ValueError, OSError) as e:
        print("zeotwist adduser: %s" % e, file=sys.stderr)
        return 1
    print("user %s in %s: %s" % (options.name, options.file, options.rights))
    return 0


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
    if options.command == "adduser":
        return adduser(options)
    return 2    # argparse refuses unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
