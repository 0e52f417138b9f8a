"""Start-up failures of a server process: one clear line and a non-zero exit.

Under twistd, a server that cannot start (the port is in use, a Unix
socket's directory is missing, a storage cannot be opened, a TLS file is
unreadable) must not look like a clean exit to a supervisor, and its
operator must see why on the terminal it was started from, also when
twistd daemonizes (which points the daemon's stderr at /dev/null and cuts
the message it passes back to 100 bytes).  :class:`StartupReporter` keeps a
duplicate of the starting terminal's stderr from the moment the service is
made (before twistd forks), writes the one line there, and raises
:class:`~zeotwist.errors.StartupFailed`: twistd then removes its pid file
and exits with status 1 (the daemon's launching process too), and
:func:`_quiet_excepthook` keeps Python from adding a traceback for it.  The
duplicate is closed once the server listens, so a supervisor reading the
terminal's pipe sees it end.

Also here: the readable text of a listening failure, the default
permissions of Unix sockets (0600: the owner only), and listening on an
endpoint string (:func:`listen_on`).

Runs on the reactor thread (or before the reactor runs).
"""
import errno
import os
import sys

from twisted.internet.defer import Deferred, execute

from zeotwist.errors import StartupFailed

#: the mode of a Unix socket whose endpoint string does not give ``mode=``
UNIX_SOCKET_MODE = "600"


def private_unix_socket(description: str) -> str:
    """A ``unix:`` endpoint string with ``mode=600`` unless it gives a mode.

    Twisted creates Unix sockets world-writable (0666) whatever the umask;
    anyone who can connect could use the database.
    """
    if not description.startswith("unix:"):
        return description
    params = _endpoint_params(description)
    if "mode" in params:
        return description
    return "%s:mode=%s" % (description, UNIX_SOCKET_MODE)


def _endpoint_fields(description: str) -> list[str]:
    """The ``:``-separated fields of an endpoint string, ``\\`` escapes undone."""
    fields, part, escaped = [], "", False
    for ch in description:
        if escaped:
            part, escaped = part + ch, False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append(part)
            part = ""
        else:
            part += ch
    fields.append(part)
    return fields


def _endpoint_params(description: str) -> set:
    """The ``key=`` names of an endpoint string (``\\:`` escapes respected;
    a last field ending in a lone ``\\``, which Twisted cannot parse, is not read)."""
    fields = _endpoint_fields(description + ":")[:-1]
    return {field.split("=", 1)[0] for field in fields if "=" in field}


def plain_tcp(description: str) -> tuple | None:
    """``(port, {"interface": ..., "backlog": ...})`` of a plain ``tcp:``
    endpoint string (``tcp:PORT``, ``interface=`` and ``backlog=`` as keys,
    no escapes), exactly as Twisted's ``serverFromString`` reads it; None
    for anything else (Twisted's parser reads that)."""
    if "\\" in description:
        return None
    kind, *fields = description.split(":")
    if kind != "tcp":
        return None
    positional = [f for f in fields if "=" not in f]
    keys = dict(f.split("=", 1) for f in fields if "=" in f)
    if len(positional) != 1 or len(keys) + len(positional) != len(fields) \
            or not set(keys) <= {"interface", "backlog"}:
        return None
    port, backlog = positional[0], keys.get("backlog", "50")
    if not (port.isascii() and port.isdigit() and backlog.isascii() and backlog.isdigit()):
        return None
    return int(port), {"interface": keys.get("interface", ""), "backlog": int(backlog)}


def listen_on(reactor, description: str, factory) -> Deferred:
    """``serverFromString(reactor, description).listen(factory)``; a plain
    ``tcp:`` string (:func:`plain_tcp`) listens as Twisted's TCP endpoint
    does, without importing ``twisted.internet.endpoints``: that module and
    what it imports (stdio, process endpoints, the resolver's) are 0.5 MB
    of a server's resident memory (docs/performance.md, "Memory")."""
    tcp = plain_tcp(description)
    if tcp is None:
        from zeotwist.server.footprint import endpoints
        return endpoints().serverFromString(reactor, description).listen(factory)
    port, options = tcp
    return execute(reactor.listenTCP, port, factory, **options)


def unix_path(description: str) -> str | None:
    """The socket path of a ``unix:`` endpoint string, else None."""
    if not description.startswith("unix:"):
        return None
    return _endpoint_fields(description)[1]


def listen_problem(description: str, error: BaseException) -> str:
    """One line saying why the server cannot listen on ``description``."""
    path = unix_path(description)
    if path is not None:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            return ("cannot listen on %s: the directory %s does not exist"
                    % (description, directory))
    cause = getattr(error, "socketError", None) or error
    if isinstance(cause, OSError) and cause.errno is not None:
        text = os.strerror(cause.errno)
        if cause.errno == errno.EADDRINUSE:
            text += " (another server is listening there?)"
        elif cause.errno == errno.EACCES:
            text += " (a port below 1024 needs root; or the socket's directory is not writable)"
    elif isinstance(cause, str):
        text = cause
    else:
        text = "%s: %s" % (type(cause).__name__, cause)
    return "cannot listen on %s: %s" % (description, text)


class StartupReporter:
    """The terminal of a server process's start, until it has started.

    Made when the service is made (before twistd daemonizes); holds a
    duplicate of file descriptor 2 until :meth:`started` or :meth:`failed`.
    """

    def __init__(self):
        self._pid = os.getpid()         # another pid later: twistd daemonized
        try:
            self._fd = os.dup(2)        # not inherited by child processes
        except OSError:
            self._fd = None

    def started(self) -> None:
        """The server listens: let go of the terminal."""
        self._close()

    def failed(self, message: str) -> None:
        """Say ``message`` on the starting terminal and raise StartupFailed."""
        self._fd_used = False
        if self._fd is not None:
            try:
                os.write(self._fd, ("zeotwist: %s\n" % message).encode("utf-8", "replace"))
                self._fd_used = True
            except OSError:
                pass
        self._close()
        _install_quiet_excepthook()
        if os.getpid() != self._pid and self._fd_used:
            # twistd's launching process repeats this text, cut to 100 bytes
            raise StartupFailed("did not start; the reason is above and in the log")
        raise StartupFailed(message)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _quiet_excepthook(kind, value, tb, _previous=sys.excepthook):
    # StartupFailed was said on the terminal and logged; twistd's exit is
    # status 1 either way.  Anything else: the usual traceback.
    if not issubclass(kind, StartupFailed):
        _previous(kind, value, tb)


def _install_quiet_excepthook() -> None:
    if sys.excepthook is not _quiet_excepthook:
        sys.excepthook = _quiet_excepthook
