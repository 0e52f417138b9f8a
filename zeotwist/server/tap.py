"""The twistd glue: ``twistd -n zeotwist -f data.fs --listen tcp:8100``, or
``twistd -n zeotwist -C server.conf`` for several storages.

:class:`Options` parses the command line and, with ``-C``/``--config``, the
server configuration file (:mod:`zeotwist.server.config`); :func:`makeService`
builds the :class:`~zeotwist.server.service.ServerService`.  The server
options themselves are defined once, as the fields of
:class:`~zeotwist.server.settings.ServerSettings`: Options spells them from
there; only the storage-choosing options (-C, -f, -s, --blob-dir) are its own.

Precedence, for every option: the command line, then the ``<zeotwist>``
section of the file, then the built-in default.  ``--listen`` on the command
line replaces all of the file's ``listen``/``address`` keys; ``-r`` can only
switch read-only on.  ``-f FILE`` adds a FileStorage named by ``-s``
(default ``"1"``) to the file's storages; without ``-C`` it is the only one
(``data.fs`` when ``-f`` is not given either).
"""
import logging
import sys

from twisted.logger import Logger, LogLevel
from twisted.python import usage

from zeotwist.server import footprint
from zeotwist.server.config import DEFAULT_STORAGE_NAME, ConfigError, read_config
from zeotwist.server.openstorages import FileStorageFile, open_storage
from zeotwist.server.service import (   # ServerService & co. are imported from here too
    ServerService, StorageOpenError, format_address)
from zeotwist.server.malloc import trim_periodically, tune_malloc
from zeotwist.server.settings import (
    DEFAULT_LISTEN, FLAG, LIST, VALUE, ServerSettings, cli_name, help_text, layered,
    option_fields)

DEFAULT_FILENAME = "data.fs"


def _list_option(f, coerce, help: str):
    """The ``opt_`` method of a repeatable command-line option (a LIST field)."""
    def opt(self, value):
        try:
            value = coerce(value) if coerce else value
        except ValueError as e:
            raise usage.UsageError("--%s: %s" % (cli_name(f), e))
        self[cli_name(f)].append(value)
    opt.__doc__ = help
    return opt


def _add_list_options(cls) -> None:
    """Give ``cls`` an ``opt_`` method for every repeatable option and alias."""
    for f in option_fields(LIST):
        if not cli_name(f):
            continue
        spellings = [(cli_name(f), f.metadata["short"], f.metadata["coerce"],
                      f.metadata["help"] + ".")] + list(f.metadata["aliases"])
        for name, short, coerce, help in spellings:
            method = _list_option(f, coerce, help)
            setattr(cls, "opt_" + name.replace("-", "_"), method)
            if short:
                setattr(cls, "opt_" + short, method)


class Options(usage.Options):
    """The command line.  The server options themselves come from
    :class:`ServerSettings` (see :mod:`zeotwist.server.settings`); only the
    storage-choosing options are spelled here."""
    synopsis = "[options]"
    longdesc = ("Serve ZODB storages to zeotwist clients: one FileStorage (-f), or the "
                "storages of a configuration file (-C, like ZEO's zeo.conf). Listens on "
                "tcp:8100 on the loopback interface unless --listen (or the file) says "
                "otherwise. Command-line options override the configuration file.")
    optFlags = [[cli_name(f), f.metadata["short"], help_text(f)]
                for f in option_fields(FLAG) if cli_name(f)]
    optParameters = [
        ["config", "C", None,
         "A server configuration file: a <zeotwist> section with the server options "
         "and storage sections (<filestorage NAME>, ...; see docs/config.md)."],
        ["filename", "f", None,
         "A FileStorage file to serve (created if missing) "
         "[default: %s, unless -C is given]." % DEFAULT_FILENAME],
        ["storage", "s", None,
         "The name clients use for the -f storage [default: %s]." % DEFAULT_STORAGE_NAME],
        ["blob-dir", None, None,
         "The blob directory of the -f storage (blobs are off without it)."],
    ] + [[cli_name(f), f.metadata["short"], None, help_text(f), f.metadata["coerce"]]
         for f in option_fields(VALUE) if cli_name(f)]

    def __init__(self):
        super().__init__()
        for f in option_fields(LIST):
            if cli_name(f):
                self[cli_name(f)] = []
        #: after parsing: storage name -> opener, and the ServerSettings
        self.storages: dict = {}
        self.settings = ServerSettings()
        self.eventlog = None

    def parseOptions(self, options=None):
        """Parse; long options must be spelled out (getopt would take
        ``--address`` for ``--address-file`` if it were the only match).

        Under twistd, a mistake is one line on stderr and exit status 1,
        not twistd's page of usage text.
        """
        try:
            self._refuse_abbreviations(options)
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            raise SystemExit("twistd zeotwist: %s" % e) from None

    def _refuse_abbreviations(self, args) -> None:
        args = list(sys.argv[1:] if args is None else args)
        names = {o.rstrip("=") for o in self.longOpt}
        with_value = {o[:-1] for o in self.longOpt if o.endswith("=")}
        while args:
            arg = args.pop(0)
            if arg == "--":
                return
            if arg.startswith("--"):
                name, eq, _ = arg[2:].partition("=")
                if name not in names:
                    near = sorted(n for n in names if n.startswith(name))
                    raise usage.UsageError("unknown option --%s%s" % (name, (
                        "; abbreviations are not accepted: did you mean %s?"
                        % " or ".join("--" + n for n in near)) if near else ""))
                if name in with_value and not eq and args:
                    args.pop(0)             # --listen VALUE
            elif arg.startswith("-") and len(arg) > 1:
                for i, letter in enumerate(arg[1:]):
                    if letter + ":" in self.shortOpt:       # -l VALUE or -lVALUE
                        if i == len(arg) - 2 and args:
                            args.pop(0)
                        break

    def opt_configure(self, path):
        """Same as --config (runzeo's spelling)."""
        self["config"] = path

    def given(self) -> dict:
        """The server options given on the command line, by settings field."""
        values = {}
        for f in option_fields():
            name = cli_name(f)
            value = self.get(name) if name else None
            kind = f.metadata["kind"]
            if (kind == VALUE and value is not None) or (kind != VALUE and value):
                values[f.name] = True if kind == FLAG else value
        return values

    def postOptions(self):
        path = self["config"]
        conf = None
        if path:
            try:
                conf = read_config(path)
            except ConfigError as e:
                raise usage.UsageError("cannot use configuration file %s: %s" % (path, e))
        settings = layered(conf.settings if conf else {}, self.given())
        problem = settings.problem()
        if problem:
            raise usage.UsageError(problem)
        self.storages = self._storages(dict(conf.storages) if conf else {}, settings)
        self["listen"] = settings.listen
        self.settings = settings
        self.eventlog = conf.eventlog if conf else None
        footprint.settle(settings)      # under twistd, without TLS: no pyOpenSSL

    def _storages(self, storages: dict, settings: ServerSettings) -> dict:
        """The file's storages, plus the -f one (the only one without -C)."""
        path = self["config"]
        if self["filename"] or not path:
            name = self["storage"] or DEFAULT_STORAGE_NAME
            if name in storages:
                raise usage.UsageError(
                    "-f: the configuration file already has a storage named %r; "
                    "name the -f storage with -s" % name)
            storages[name] = FileStorageFile(self["filename"] or DEFAULT_FILENAME,
                                             read_only=settings.read_only,
                                             blob_dir=self["blob-dir"])
        elif self["blob-dir"]:
            raise usage.UsageError("--blob-dir is the -f storage's blob directory; give -f "
                                   "too (with -C, set blob-dir in the storage section)")
        elif self["storage"]:
            raise usage.UsageError("-s/--storage names the -f storage; give -f too "
                                   "(with -C, name storages by their section names)")
        if not storages:
            raise usage.UsageError("no storages to serve: %s has no storage sections "
                                   "and no -f was given" % path)
        return storages


_add_list_options(Options)


def makeService(options: Options) -> ServerService:
    from twisted.internet import reactor
    tune_malloc()               # buffers of ~1 MiB without a page fault per 4 KiB
    reactor.callWhenRunning(trim_periodically, reactor)   # freed memory back, now and then
    if options.eventlog is not None:        # a zeo.conf's <eventlog>
        log_to_python_logging(options.eventlog)
    else:
        python_logging_to_twisted()
    return ServerService.from_storages(options.storages, settings=options.settings,
                                       stop_reactor_on_failure=True)


def log_to_python_logging(eventlog) -> None:
    """Set up an <eventlog> section's handlers and send them the server's
    log events too (Python logger ``zeotwist.server``)."""
    from twisted.logger import STDLibLogObserver, globalLogPublisher
    eventlog()
    globalLogPublisher.addObserver(STDLibLogObserver(name="zeotwist.server"))



class _TwistedLogHandler(logging.Handler):
    """Python logging records (ZODB's, ZConfig's, ...) as twisted.logger events."""

    def emit(self, record: logging.LogRecord) -> None:
        level = (LogLevel.critical if record.levelno >= logging.CRITICAL else
                 LogLevel.error if record.levelno >= logging.ERROR else
                 LogLevel.warn if record.levelno >= logging.WARNING else
                 LogLevel.info if record.levelno >= logging.INFO else LogLevel.debug)
        Logger(namespace=record.name).emit(level, "{message}", message=record.getMessage())


def python_logging_to_twisted() -> None:
    """Under twistd: Python logging goes to the twistd log, one line per
    record at its level, instead of as ``[stderr#error]`` lines.  Left
    alone when the application configured Python logging itself."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_TwistedLogHandler())
        if root.level == logging.WARNING:       # the untouched default
            root.setLevel(logging.INFO)

__all__ = ["Options", "makeService", "ServerService", "FileStorageFile", "StorageOpenError",
           "open_storage", "format_address", "DEFAULT_LISTEN", "DEFAULT_FILENAME"]
