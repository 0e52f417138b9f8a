"""The ``zeotwist`` command (also ``python -m zeotwist``): argument parsing.

    zeotwist serve [server options]       (the server: see zeotwist.server.serve)
    zeotwist status ADDRESS [--storage NAME] [--json] [--timeout S]
    zeotwist pack ADDRESS [--days N] [--storage NAME]
    zeotwist adduser FILE NAME [--rights rw=*]
    zeotwist --version

``status`` and ``pack`` connect as clients and take the client's login and
TLS options (:func:`add_client_options`); what each command does is in
:mod:`zeotwist.tools` (docs/tools.md).  Runs in the calling thread; the
client connection uses the private background reactor.  ``serve`` takes the
server's own options (those of ``twistd zeotwist``), parsed by the server,
and imports nothing of the other commands (``argparse`` among them: a
server's resident memory is measured, docs/performance.md "Memory").
"""
import sys


def parse(argv=None) -> "argparse.Namespace":
    import argparse

    from zeotwist import __version__
    p = argparse.ArgumentParser(prog="zeotwist", description="zeotwist command line tools "
                                "(also: python -m zeotwist). See docs/tools.md.")
    p.add_argument("--version", action="version", version="zeotwist %s" % __version__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", add_help=False,
                   help="run the server in the foreground (options: zeotwist serve --help)")
    _add_status_parser(sub)
    _add_pack_parser(sub)
    _add_adduser_parser(sub)
    return p.parse_args(argv)


def _add_address(parser) -> None:
    parser.add_argument("address", help="the server: HOST:PORT, a Unix socket path or a "
                                        "Twisted client endpoint string")
    parser.add_argument("--storage", "-S", default="1",
                        help="the name of the storage on the server (default 1)")


def add_client_options(parser) -> None:
    """Login and TLS options, as ClientStorage's ``username``/``password``/``tls``."""
    group = parser.add_argument_group("login and TLS (docs/tls-auth.md)")
    group.add_argument("--username", "-u", help="log in as this user")
    pw = group.add_mutually_exclusive_group()
    pw.add_argument("--password-file", metavar="FILE",
                    help="read the password from the first line of FILE")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of standard input")
    group.add_argument("--tls", action="store_true",
                       help="connect with TLS, trusting the system's CAs")
    group.add_argument("--tls-ca", metavar="FILE_OR_DIR",
                       help="trust these CAs (PEM file or directory; implies --tls)")
    group.add_argument("--tls-cert", metavar="FILE",
                       help="the client certificate, PEM (implies --tls)")
    group.add_argument("--tls-key", metavar="FILE",
                       help="its private key, when not in the certificate file")
    group.add_argument("--tls-hostname", metavar="NAME",
                       help="the name the server's certificate must carry "
                            "(default: the address's host)")


def client_arguments(options) -> dict:
    """ClientStorage keyword arguments from :func:`add_client_options`' options.

    Raises ValueError (with a readable message) for a password file that
    cannot be read.
    """
    kw = {}
    if options.username is not None:
        kw["username"] = options.username
    if options.password_stdin:
        kw["password"] = sys.stdin.readline().rstrip("\r\n")
    elif options.password_file:
        try:
            with open(options.password_file) as f:
                kw["password"] = f.readline().rstrip("\r\n")
        except OSError as e:
            raise ValueError("cannot read the password file %s: %s"
                             % (options.password_file, e.strerror)) from None
    tls = {name: getattr(options, "tls_" + name)
           for name in ("ca", "cert", "key", "hostname") if getattr(options, "tls_" + name)}
    if tls:
        kw["tls"] = tls
    elif options.tls:
        kw["tls"] = True
    return kw


def _add_status_parser(sub) -> None:
    status = sub.add_parser(
        "status", help="print a running server's counters (a health check)",
        description="Ask a running zeotwist server for a storage's counters. Exit status 0 "
                    "when the server answers, 1 (with one line on standard error) when it "
                    "does not within --timeout seconds.")
    _add_address(status)
    status.add_argument("--json", action="store_true",
                        help="print one JSON object (for scripts and monitoring)")
    status.add_argument("--timeout", "-t", type=float, default=10.0,
                        help="seconds to wait for the answer (default 10)")
    add_client_options(status)


def _add_pack_parser(sub) -> None:
    pack = sub.add_parser(
        "pack", help="pack a storage of a running server",
        description="Pack a storage of a running zeotwist server (as ZEO's zeopack).")
    _add_address(pack)
    pack.add_argument("--days", "-d", type=float, default=0.0,
                      help="keep the history of the last N days (default 0)")
    pack.add_argument("--wait-timeout", type=float, default=30.0,
                      help="seconds to wait for a connection (default 30)")
    add_client_options(pack)


def _add_adduser_parser(sub) -> None:
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


def main(argv=None) -> int:
    """Run one command; its exit status (the ``zeotwist`` console script)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from zeotwist.server.serve import main as serve
        return serve(argv[1:])
    from zeotwist import tools
    options = parse(argv)
    command = {"status": tools.status, "pack": tools.pack, "adduser": tools.adduser}
    return command[options.command](options)
