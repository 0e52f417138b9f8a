"""The server's configuration file: ``twistd -n zeotwist -C server.conf``.

The file is ZConfig text checked against ``zeotwist/server/schema.xml``
(shipped with the package), in the spirit of ZEO's ``zeo.conf``::

    <zeotwist>
      listen tcp:8100:interface=127.0.0.1
      listen unix:/var/run/zeotwist.sock
      transaction-timeout 30
    </zeotwist>

    <filestorage main>
      path /var/db/main.fs
    </filestorage>

    %import mypackage
    <mystorage catalog>
      ...
    </mystorage>

:func:`read_config` parses such a file into a :class:`ServerConfig`: the
server options that the file sets (by :class:`~zeotwist.server.settings.
ServerSettings` field: each field names its keys) and the storage sections
by name, still unopened.  How the file and the command line combine is
:mod:`zeotwist.server.tap`'s business (the command line wins).

Parsing does no I/O beyond reading the file (and the imported packages'
``component.xml``); storages are opened when the server starts.
"""
import os
import re
from dataclasses import dataclass, field

# ConfigError: defined in zeotwist.errors, importable from here as before
from zeotwist.errors import ConfigError
from zeotwist.server.settings import (   # the schema names the datatypes here
    LIST, file_keys, listen_endpoint, option_fields, zeo_address)

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.xml")

#: The storage name of an unnamed storage section (and of ``-f``'s default).
DEFAULT_STORAGE_NAME = "1"

_schema = None


def load_schema():
    """The server schema (parsed once per process)."""
    global _schema
    if _schema is None:
        import ZConfig
        _schema = ZConfig.loadSchema(SCHEMA)
    return _schema


@dataclass
class ServerConfig:
    """What a configuration file says.

    ``settings`` holds only the options the file gives, by
    :class:`~zeotwist.server.settings.ServerSettings` field name (``listen``
    is the list of endpoint strings, when the file names any); ``storages`` maps storage names to ZODB's storage
    section objects (``.open()`` opens one), in the file's order.
    """
    path: str
    settings: dict = field(default_factory=dict)
    storages: dict = field(default_factory=dict)
    #: ZConfig's <eventlog> factory (call it to set up Python logging), or None
    eventlog: object = None


def section_values(section) -> dict:
    """The options a ``<zeotwist>`` section gives, by ServerSettings field
    (each field reads the keys :func:`~zeotwist.server.settings.file_keys`
    names; a list field concatenates its keys' values)."""
    values = {}
    for f in option_fields():
        given = [getattr(section, key) for key in file_keys(f)]
        if f.metadata["kind"] == LIST:
            items = [item for value in given for item in (value or ())]
            if items:
                values[f.name] = items
        elif given[0] is not None:
            values[f.name] = given[0]
    return values


def read_config(path: str) -> ServerConfig:
    """Parse the server configuration file (or URL) ``path``.

    Raises :class:`ConfigError` with ZConfig's message (which names the
    line) for syntax errors, unknown section types or keys, failed
    ``%import`` and bad values, and for storage names that collide.
    """
    import ZConfig
    try:
        conf, _ = ZConfig.loadConfig(load_schema(), path)
    except ZConfig.ConfigurationError as e:
        where = _enclosing_section(getattr(e, "url", None), getattr(e, "lineno", None))
        raise ConfigError("%s%s%s" % ("in %s: " % where if where else "", e,
                                      _zeo_hint(where, str(e)))) from None
    except OSError as e:
        raise ConfigError("%s: %s" % (type(e).__name__, e)) from None
    result = ServerConfig(path)
    if conf.server is not None and conf.zeo is not None:
        raise ConfigError("a <zeo> and a <zeotwist> section: keep one (they take the same keys)")
    section = conf.server if conf.server is not None else conf.zeo
    if section is not None:
        result.settings = section_values(section)
    result.eventlog = conf.eventlog
    unnamed = [s for s in conf.storages if s.name is None]
    if len(unnamed) > 1:
        raise ConfigError("at most one storage section may be unnamed (it is storage %r)"
                          % DEFAULT_STORAGE_NAME)
    for s in conf.storages:
        name = DEFAULT_STORAGE_NAME if s.name is None else s.name
        if name in result.storages:
            raise ConfigError("two storages named %r (an unnamed section is storage %r)"
                              % (name, DEFAULT_STORAGE_NAME))
        result.storages[name] = s
    return result


#: what a zeo.conf may hold that zeotwist does not take, and what to do instead
_ZEO_HINTS = [
    ("'ssl'", "for TLS, give listen-tls, tls-cert, tls-key and tls-ca keys instead of "
              "the <ssl> section (docs/tls-auth.md)"),
    ("'runner'", "the <runner> section is zdaemon's (zeoctl); twistd runs zeotwist: "
                 "remove it (twistd --pidfile, --logfile, -u/-g do its work)"),
    ("'invalidation-age'", "zeotwist has no invalidation-age: remove it (reconnecting "
                           "clients verify against invalidation-queue-size)"),
    ("'msgpack'", "zeotwist's wire format is AMP, not msgpack or pickle: remove the key"),
    ("'monitor-address'", "ZEO's monitor server is gone; remove the key and use "
                          "--metrics or python -m zeotwist status"),
]


def _zeo_hint(where: str | None, message: str) -> str:
    """A hint for a ZEO configuration file that zeotwist does not take as is."""
    for needle, hint in _ZEO_HINTS:
        if needle in message:
            return "; " + hint
    if where and where.startswith("<zeo") and not where.startswith("<zeotwist"):
        return ("; zeotwist's <zeo> section takes address, read-only, "
                "invalidation-queue-size, transaction-timeout, pid-filename, "
                "client-conflict-resolution and the <zeotwist> keys (docs/config.md)")
    return ""


_OPEN = re.compile(r"\s*<\s*([^/\s>][^\s>]*)(?:\s+([^>]*?))?\s*(/?)>")
_CLOSE = re.compile(r"\s*</")


def _enclosing_section(url, lineno):
    """The ``<type name>`` that line ``lineno`` of file ``url`` is in, or None.

    Only for messages: ZConfig's errors give a line, the reader wants to
    know which storage it belongs to.
    """
    if not url or not lineno or not url.startswith("file:"):
        return None
    from urllib.parse import unquote, urlparse
    try:
        with open(unquote(urlparse(url).path), errors="replace") as f:
            lines = f.read().splitlines()[:lineno - 1]
    except OSError:
        return None
    stack = []
    for line in lines:
        if _CLOSE.match(line):
            if stack:
                stack.pop()
            continue
        m = _OPEN.match(line)
        if m and not m.group(3):
            stack.append(m.group(1) + (" " + m.group(2) if m.group(2) else ""))
    return "<%s>" % stack[-1] if stack else None


def describe(opener) -> str:
    """A short text for logs: a section's type and path, or the opener's repr."""
    config = getattr(opener, "config", None)
    if config is not None and hasattr(config, "getSectionType"):
        path = getattr(config, "path", None)
        kind = config.getSectionType()
        return "<%s> %s" % (kind, path) if path else "<%s>" % kind
    describe_self = getattr(opener, "describe", None)
    if describe_self is not None:
        return describe_self()
    return repr(opener)
