"""The server's options, defined once: :class:`ServerSettings`.

Each server option is one field of :class:`ServerSettings`, made by
:func:`option`.  From that one field:

- ``tap.Options`` builds the command-line option (``--max-connections``,
  its help text and default, its type);
- ``config.read_config`` reads the ``<zeotwist>`` key of the same name
  (``max-connections``) from the configuration file;
- ``ServerService`` keeps the whole object as ``service.settings`` and
  reads ``settings.max_connections`` where it uses it.

Precedence is applied by :func:`layered`: the built-in default, then the
file, then the command line; a list option given on the command line
replaces the file's list, unless its field says ``extend=True``.

To add an option:

1. add a field below: ``my_option: int = option(7, "What it does", coerce=int)``;
2. add its key to the ``<zeotwist>`` section of ``schema.xml``
   (``<key name="my-option" datatype="integer">`` with a description);
3. use ``settings.my_option`` where it matters (``ServerService`` hands
   the settings to what it builds), and list it in docs/config.md.

Pure data: no I/O, no reactor.
"""
import os
import socket
from dataclasses import dataclass, field, fields

from zeotwist.server.budgets import DEFAULT_MAX_SPOOL, DEFAULT_MEMORY_BUDGET
from zeotwist.server.commitlock import DEFAULT_RETRY_WAIT, DEFAULT_TURN_AFTER
from zeotwist.server.guards import DEFAULT_VOTE_TIMEOUT
from zeotwist.server.iterators import DEFAULT_ITERATOR_TIMEOUT, DEFAULT_MAX_ITERATORS
from zeotwist.server.limits import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_OUTPUT, FD_RESERVE
from zeotwist.server.footprint import endpoints
from zeotwist.server.startup import plain_tcp
from zeotwist.server.storageserver import (
    DEFAULT_INVALIDATION_QUEUE_SIZE, DEFAULT_POLL_INTERVAL, DEFAULT_PREFETCH_BYTES,
    DEFAULT_PREFETCH_COUNT, DEFAULT_TRANSACTION_TIMEOUT)
from zeotwist.tls import is_tls_endpoint, require_tls
from zeotwist.wire.prefetch import MAX_BYTES as MAX_PREFETCH_BYTES

DEFAULT_LISTEN = "tcp:8100:interface=127.0.0.1"

#: option kinds: a switch that the command line can only turn on, one value,
#: or a list (a repeatable command-line option, a <zeotwist> multikey)
FLAG, VALUE, LIST = "flag", "value", "list"


class _NoReactor:
    """Stands in for a reactor while an endpoint string is only parsed."""


def listen_endpoint(value: str) -> str:
    """The ``listen`` key: a Twisted server endpoint string, checked to parse."""
    value = value.strip()
    if is_tls_endpoint(value):
        require_tls("listening on %r" % (value,))
    if plain_tcp(value) is not None:
        return value            # read as Twisted does, without its endpoints module
    try:
        endpoints().serverFromString(_NoReactor(), value)
    except Exception as e:    # whatever the endpoint parser objects to
        if value.isdigit():
            raise ValueError(
                "%r is not an endpoint string: write tcp:%s:interface=127.0.0.1 (or give "
                "runzeo's -a/--address %s, which listens on every interface)"
                % (value, value, value)) from None
        raise ValueError("cannot listen on %r: not a valid endpoint string: %s"
                         % (value, e)) from None
    return value


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:")


def zeo_address(value: str) -> str:
    """The ``address`` key: ZEO's PORT, HOST:PORT or PATH, as an endpoint string."""
    from ZConfig.datatypes import SocketBindingAddress
    addr = SocketBindingAddress(value.strip())
    if addr.family == getattr(socket, "AF_UNIX", None):
        return "unix:" + _escape(addr.address)
    host, port = addr.address
    if not host:
        return "tcp:%d" % port
    kind = "tcp6" if addr.family == socket.AF_INET6 else "tcp"
    return "%s:%d:interface=%s" % (kind, port, _escape(host))


def byte_size(value: str) -> int:
    """``64MB``, ``2GB``, ``512KB`` or plain bytes (ZConfig's byte-size)."""
    import ZConfig.datatypes
    return ZConfig.datatypes.Registry().get("byte-size")(value)


byte_size.coerceDoc = "Bytes; KB, MB and GB suffixes allowed."


def option(default, help: str, *, kind: str = VALUE, coerce=None, short: str | None = None,
           cli: str | None = "", keys: tuple | None = None, shown: str | None = None,
           extend: bool = False, minimum=None, aliases: tuple = ()):
    """A field of :class:`ServerSettings` and how it is spelled outside.

    ``cli``: the command-line name ("" = the field name with dashes, None =
    not on the command line); ``keys``: the ``<zeotwist>`` keys read into
    it (default: the command-line name; several for a list, concatenated);
    ``shown``: the default as the help text shows it; ``extend``: the
    command line adds to the file's list instead of replacing it;
    ``minimum``: the least value accepted; ``aliases``: more command-line
    spellings of a list, ``(name, short, coerce, help)`` each.
    """
    meta = dict(help=help, kind=kind, coerce=coerce, short=short, cli=cli, keys=keys,
                shown=shown, extend=extend, minimum=minimum, aliases=aliases)
    if kind == LIST or isinstance(default, list):
        return field(default_factory=lambda: list(default or ()), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ServerSettings:
    """Every option of the server, with its built-in default.

    Also readable as a mapping (``settings["listen"]``, ``**settings``),
    as the keyword arguments of ``ServerService``.
    """
    listen: list = option(
        None, "A Twisted endpoint string to listen on, e.g. tcp:8100:interface=127.0.0.1 "
        "or unix:/run/zeo.sock (repeatable; default %s)" % DEFAULT_LISTEN,
        kind=LIST, short="l", keys=("listen", "address"), coerce=listen_endpoint,
        aliases=[("address", "a", zeo_address,
                  "runzeo's form of --listen: HOST:PORT, a bare PORT (every interface) "
                  "or a Unix socket PATH (repeatable)")])
    listen_tls: list = option(
        (), "A Twisted server endpoint string to listen on with TLS (--tls-cert, "
        "--tls-key, --tls-ca), e.g. tcp:8443:interface=127.0.0.1 (repeatable)", kind=LIST,
        coerce=listen_endpoint)
    read_only: bool = option(False, "Serve the storages read-only", kind=FLAG, short="r")
    allow_read_only_pack: bool = option(
        False, "Let read-only client connections pack the storages", kind=FLAG)
    client_conflict_resolution: bool = option(
        False, "Never unpickle client records on the server, not even for conflict "
        "resolution: the clients resolve conflicts with their own classes (one more "
        "round trip per conflicting commit)", kind=FLAG)
    allow_unaudited_storage: bool = option(
        False, "Serve storage types zeotwist has not audited for unpickling client "
        "bytes (anything but FileStorage, MappingStorage, DemoStorage, BlobStorage, "
        "RelStorage, e.g. a ClientStorage of a fan-out server): "
        "their own code then decides what client pickles they load", kind=FLAG)
    conflict_classes: list = option(
        (), "A class (dotted name, * wildcards) whose _p_resolveConflict the server "
        "may run, besides BTrees (repeatable)", kind=LIST, cli="allow-conflict-class",
        extend=True)
    transaction_timeout: float = option(
        DEFAULT_TRANSACTION_TIMEOUT, "Seconds a transaction may hold the commit lock "
        "before its client is disconnected (0 = no limit)", coerce=float)
    conflict_retry_wait: float = option(
        DEFAULT_RETRY_WAIT, "Seconds the commit lock keeps the turn of a client whose "
        "vote was refused for conflicts (see --conflict-turn-after), for its retry: "
        "other transactions that may store the same objects wait meanwhile, so the "
        "last committer cannot win every time (0 = first come, first served)",
        coerce=float, minimum=0)
    conflict_turn_after: float = option(
        DEFAULT_TURN_AFTER, "Seconds after a client's first refused vote before the "
        "commit lock keeps its turn (--conflict-retry-wait); until then its retries on "
        "those objects wait while another client commits them: bounds the wait on a "
        "hot object to about this; lower switches writers more often (0 = from the "
        "first refusal)", coerce=float, minimum=0)
    handshake_timeout: float = option(
        5.0, "Seconds a new connection has to register before it is closed", coerce=float)
    max_transaction_bytes: int = option(
        2**31, "Bytes one transaction may send before it is refused", coerce=byte_size,
        cli="max-transaction-size", shown="2GB")
    invalidation_queue_size: int = option(
        DEFAULT_INVALIDATION_QUEUE_SIZE, "How many recent transactions the server "
        "remembers, so reconnecting clients can verify their caches instead of "
        "dropping them", coerce=int)
    prefetch_count: int = option(
        DEFAULT_PREFETCH_COUNT, "Reference prefetch: at most this many records of "
        "referenced objects ride along with one LoadBefore answer, for clients that take "
        "them (0 = no prefetch)", coerce=int, minimum=0)
    prefetch_bytes: int = option(
        DEFAULT_PREFETCH_BYTES, "Reference prefetch: at most this many bytes of "
        "prefetched records per LoadBefore answer (at most %d)" % MAX_PREFETCH_BYTES,
        coerce=byte_size, minimum=0)
    max_connections: int = option(
        DEFAULT_MAX_CONNECTIONS, "Concurrent client connections; more are closed at "
        "once. Kept %d below the file-descriptor limit" % FD_RESERVE, coerce=int,
        minimum=1)
    max_pending_output: int = option(
        DEFAULT_MAX_PENDING_OUTPUT, "Bytes of output a client may leave unread: past "
        "it, a client that does not take its invalidations is disconnected, and one "
        "that does not read its answers is not read from until it does",
        coerce=byte_size, shown="64MB", minimum=1)
    # server-wide limits: docs/security.md#bounded-resources
    memory_budget: int = option(
        DEFAULT_MEMORY_BUDGET, "Bytes all connections together may hold in memory: "
        "half for unread output, a quarter for unfinished boxes, a quarter for "
        "transactions spooled in memory", coerce=byte_size, shown="256MB", minimum=1)
    max_spool: int = option(
        DEFAULT_MAX_SPOOL, "Bytes of stores all open (not yet voted) transactions may "
        "spool, in memory and on disk; past it a transaction is refused at its vote",
        coerce=byte_size, shown="4GB", minimum=1)
    vote_timeout: float = option(
        DEFAULT_VOTE_TIMEOUT, "Seconds a transaction may stay open before its vote; "
        "past it the connection is closed (0 = no limit)", coerce=float)
    idle_timeout: float = option(
        0.0, "Seconds a registered connection may send nothing and take none of its "
        "output before it is closed (0 = never)", coerce=float)
    max_iterators: int = option(
        DEFAULT_MAX_ITERATORS, "Storage iterators open at once, server-wide (each "
        "holds a file descriptor)", coerce=int, minimum=1)
    iterator_timeout: float = option(
        DEFAULT_ITERATOR_TIMEOUT, "Seconds an unused storage iterator stays open",
        coerce=float)
    address_file: str | None = option(
        None, "Write the addresses listened on to this file once listening")
    tls_cert: str | None = option(
        None, "The server's TLS certificate (PEM; may hold the key and a chain too), "
        "for the --listen-tls endpoints")
    tls_key: str | None = option(
        None, "The private key of --tls-cert (PEM), if not in that file")
    tls_ca: str | None = option(
        None, "Require TLS clients to present a certificate signed by a CA of this PEM "
        "file (or directory of .pem files)")
    metrics: str | None = option(
        None, "Serve Prometheus metrics at /metrics on this Twisted endpoint, e.g. "
        "tcp:9102:interface=127.0.0.1 (needs pip install 'zeotwist[metrics]')",
        coerce=listen_endpoint)
    pid_filename: str | None = option(
        None, "Write the server's process id to this file once listening; removed at "
        "stop (ZEO's pid-filename; twistd's own --pidfile works too)")
    auth_file: str | None = option(
        None, "Clients must log in as a user of this password file, which also gives "
        "each user's rights per storage (docs/tls-auth.md; python -m zeotwist adduser)")
    poll_interval: float = option(
        DEFAULT_POLL_INTERVAL, "Seconds between two looks for transactions committed "
        "through other servers of the same database (RelStorage; PostgreSQL "
        "notifications usually bring them sooner; docs/scale-out.md)", coerce=float,
        minimum=0.01)

    def __post_init__(self):
        # No listen endpoint given: the default one, unless TLS endpoints are.
        if self.listen is None or self.listen == []:
            self.listen = [] if self.listen_tls else [DEFAULT_LISTEN]
        for f in fields(self):
            if f.metadata["kind"] == LIST:
                setattr(self, f.name, list(getattr(self, f.name)))

    # -- read as a mapping: settings["listen"], ServerService(**settings) --
    def keys(self):
        return [f.name for f in fields(self)]

    def __getitem__(self, name: str):
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def problem(self) -> str | None:
        """What is wrong with these settings as a whole, or None."""
        for f in fields(self):
            least = f.metadata["minimum"]
            if least is not None and getattr(self, f.name) < least:
                return "%s must be at least %s, not %s" % (
                    cli_name(f), least, getattr(self, f.name))
        if self.prefetch_bytes > MAX_PREFETCH_BYTES:
            return "prefetch-bytes must be at most %d, not %d" % (
                MAX_PREFETCH_BYTES, self.prefetch_bytes)
        return check_tls_auth(self)


def cli_name(f) -> str | None:
    """The command-line name (without dashes) of field ``f``, None if it has none."""
    cli = f.metadata["cli"]
    return f.name.replace("_", "-") if cli == "" else cli


def file_keys(f) -> tuple:
    """The ``<zeotwist>`` keys, as ZConfig attribute names, that field ``f`` reads."""
    keys = f.metadata["keys"] or (cli_name(f) or f.name,)
    return tuple(k.replace("-", "_") for k in keys)


def help_text(f) -> str:
    """The command-line help of field ``f``, with its default (the field's
    help text is a sentence without its final period)."""
    text = f.metadata["help"]
    if f.metadata["kind"] != VALUE:
        return text + "."
    default = f.metadata["shown"] or (
        "%g" % f.default if isinstance(f.default, float) else f.default)
    if f.default is not None:
        text = "%s [default: %s]" % (text, default)
    # usage.Options adds ". " and the type's coerceDoc itself
    return text if hasattr(f.metadata["coerce"], "coerceDoc") else text + "."


def option_fields(kind: str | None = None) -> list:
    """The fields of :class:`ServerSettings` (of one kind, if given)."""
    return [f for f in fields(ServerSettings) if kind is None or f.metadata["kind"] == kind]


def layered(*layers: dict) -> ServerSettings:
    """Settings from dicts of given values, lowest precedence first.

    A later layer's value replaces an earlier one's; for ``extend`` lists
    it is appended instead.  Raises TypeError for a name that is no option.
    """
    values: dict = {}
    extending = {f.name for f in fields(ServerSettings) if f.metadata["extend"]}
    for layer in layers:
        for name, value in layer.items():
            if name in extending and name in values:
                value = list(values[name]) + list(value)
            values[name] = value
    return ServerSettings(**values)


def check_tls_auth(settings) -> str | None:
    """What is wrong with the TLS and auth settings, or None."""
    if settings.listen_tls and not settings.tls_cert:
        return "--listen-tls needs --tls-cert (the server's certificate)"
    given = [k for k in ("tls_cert", "tls_key", "tls_ca") if getattr(settings, k)]
    if given and not settings.listen_tls:
        return ("%s applies to --listen-tls endpoints; give one (a plain --listen "
                "never uses TLS)" % "/".join("--" + k.replace("_", "-") for k in given))
    auth = settings.auth_file
    if auth and not os.path.isfile(auth):
        return "--auth-file: no password file %s (python -m zeotwist adduser makes one)" % auth
    return None


__all__ = ["ServerSettings", "option", "layered", "option_fields", "DEFAULT_LISTEN",
           "FLAG", "VALUE", "LIST"]
