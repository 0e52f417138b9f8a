"""Modules imported lazily: a stand-in in ``sys.modules`` until first use.

Twisted imports, at start-up, modules that a zeotwist client or server seldom
or never uses: ``http.cookiejar`` (``twisted.python.compat``, only to offer
it under its Python 2 name), the child-process support, the Unix-socket and
UDP transports, ``decimal`` (for AMP's ``Decimal`` argument type), the HTML
entity tables; each costs resident memory in every process
(docs/performance.md, "Memory").  :func:`lazy_import` puts a
:class:`_LazyModule` stand-in in their place: ``import X``, ``import a.X``
and ``from a import X`` give the stand-in and run nothing; the first
attribute asked of it imports the real module (once, under a lock), which
then takes its place in ``sys.modules`` and on its package.  An attribute
that a module's importer takes at once (``from X import name``) can be given
to the stand-in ready-made: :func:`forward` (a function that imports the
module when it is first called), :class:`LazyMapping`.

Not ``importlib.util.LazyLoader``: before Python 3.12.3 it is not
thread-safe (a second thread's first use during the first thread's load
sees a half-run module: AttributeError), and a server's or a web
application's threads may well meet there; and any ``import X`` of a module
already in ``sys.modules`` reads its ``__spec__``, which runs a LazyLoader
module at once.  The stand-in carries the spec the import system found for
the module (a plain attribute: reading it runs nothing), so
``importlib.util.find_spec(name)`` answers as for the real module.

:func:`zeotwist.lazytls.import_plain` defers :data:`LAZY_MODULES` for a
client; the server's start its own (zeotwist.server.footprint).  Runs in
whichever thread imports or first uses such a module.
"""
import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Mapping

#: held while a :class:`_LazyModule` imports its module
_lazy_lock = threading.RLock()


def lazy_import(name: str, **attributes) -> None:
    """Let module ``name`` run at its first use (see the module docstring);
    ``attributes`` are the stand-in's own until then.  Nothing when it is
    imported already or cannot be found.  A submodule's stand-in is in place
    before its package is imported, if it is not yet (``html`` imports
    ``html.entities`` in its own first lines)."""
    if name in sys.modules:
        return
    package, _, child = name.rpartition(".")
    if package and package not in sys.modules:
        from importlib.machinery import PathFinder
        parent = importlib.util.find_spec(package)
        spec = parent and PathFinder.find_spec(name, parent.submodule_search_locations)
    else:
        spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stand_in = _LazyModule(name)
    stand_in.__dict__.update(attributes, __spec__=spec,
                             _package=spec.submodule_search_locations is not None)
    sys.modules[name] = stand_in
    if package:
        setattr(importlib.import_module(package), child, stand_in)


def real_module(name: str):
    """Module ``name``, imported now if it is a stand-in yet."""
    module = sys.modules.get(name)
    if isinstance(module, _LazyModule):
        return module._load()
    return module if module is not None else importlib.import_module(name)


def loaded(name: str):
    """Module ``name`` if its code has run, else None (a stand-in not used yet)."""
    module = sys.modules.get(name)
    if isinstance(module, _LazyModule):
        return module.__dict__.get("_real")
    return module


def forward(name: str, attr: str):
    """A function that calls function ``attr`` of module ``name``, imported
    at the first call: for a stand-in whose importer takes the function at
    once (``from name import attr``) and calls it later, if ever."""
    def call(*args, **kw):
        return getattr(real_module(name), attr)(*args, **kw)
    call.__name__ = call.__qualname__ = attr
    call.__doc__ = "%s.%s, imported at the first call (zeotwist.lazymodules)" % (name, attr)
    return call


class LazyMapping(Mapping):
    """Mapping ``attr`` of module ``name``, read-only, imported at the first
    look-up: for a stand-in whose importer takes the mapping at once and
    reads it later, if ever (``html`` takes ``html.entities.html5``)."""

    def __init__(self, name: str, attr: str):
        self._name, self._attr = name, attr

    def _mapping(self):
        return getattr(real_module(self._name), self._attr)

    def __getitem__(self, key):
        return self._mapping()[key]

    def __contains__(self, key):
        return key in self._mapping()

    def __iter__(self):
        return iter(self._mapping())

    def __len__(self):
        return len(self._mapping())


class _LazyModule(types.ModuleType):
    """The stand-in :func:`lazy_import` leaves in ``sys.modules``: the real
    module is imported (once, under a lock) at the first attribute asked."""

    def __getattr__(self, attr):
        real = self.__dict__.get("_real")
        if real is None:
            if attr == "__path__" and not self.__dict__.get("_package"):
                # asked by every ``from name import x``; a module has none
                raise AttributeError(attr)
            real = self._load()
        return getattr(real, attr)

    def _load(self):
        name = self.__name__
        with _lazy_lock:
            real = self.__dict__.get("_real")
            if real is None:
                if sys.modules.get(name) is self:
                    del sys.modules[name]       # the import system loads it anew
                real = importlib.import_module(name)    # (and sets it on the package)
                self.__dict__["_real"] = real
        return real


def _reap_all_processes() -> None:
    """``twisted.internet.process.reapAllProcesses`` once that module has
    run.  The reactor calls it when it starts and at each ``SIGCHLD`` (run in
    the main thread); it reaps only the processes spawned through that
    module, so before the module runs there is none to reap."""
    process = loaded("twisted.internet.process")
    if process is not None:
        process.reapAllProcesses()


#: Modules that Twisted (or what it imports) loads at start-up and a client
#: or a server uses only for what it is not asked to do, left to their first
#: use (:func:`defer`), with their stand-ins' own attributes: those their
#: importers take at once.  A client's resident memory: ``http.cookiejar``
#: (with ``urllib.request``, ``http.client``, ``email``, ``calendar``) 1.4 MB,
#: ``html.entities`` 0.45, ``decimal`` 0.35, the process support (``pty``,
#: ``tty``, ``termios``, ``grp``, ``pwd``) 0.3, ``unix`` and ``udp`` 0.1,
#: ``twisted.python.filepath`` (with ``pathlib``) 0.3, ``twisted.logger._json``
#: (with ``uuid``) 0.15, ``urllib.parse`` and ``ipaddress`` 0.35 (docs/performance.md,
#: "Memory" and "Issue 10, eighth session").  The server adds its own
#: (zeotwist.server.footprint).
LAZY_MODULES = {
    "http.cookiejar": {},           # twisted.python.compat: its Python 2 name
    "decimal": {},                  # AMP: its Decimal argument type
    "html.entities": {              # html, for twisted.python.compat's escape: unescape's table
        "html5": LazyMapping("html.entities", "html5")},
    "twisted.internet.process": {   # spawnProcess; the reactor reaps children
        "reapAllProcesses": _reap_all_processes},
    "twisted.internet.unix": {},    # the reactor: listenUNIX, connectUNIX
    "twisted.internet.udp": {},     # the reactor: listenUDP (and unix's datagram ports)
    "twisted.python.filepath": {    # AMP's Path argument; Unix socket addresses
        name: forward("twisted.python.filepath", name)
        for name in ("_asFilesystemBytes", "_coerceToFilesystemEncoding")},
    "urllib.parse": {               # twisted.python.compat: its Python 2 names
        name: forward("urllib.parse", name) for name in ("quote", "unquote")},
    "ipaddress": {},                # urllib.parse: URLs with a bracketed host
    "twisted.logger._json": {       # twisted.logger's JSON log files (with uuid)
        name: forward("twisted.logger._json", name)
        for name in ("eventAsJSON", "eventFromJSON", "jsonFileLogObserver",
                     "eventsFromJSONLogFile")},
}


def defer(modules: dict = LAZY_MODULES) -> None:
    """Leave ``modules`` (name -> the stand-in's attributes) to their first
    use: before Twisted is imported (else too late for some: nothing for those)."""
    for name, attributes in modules.items():
        lazy_import(name, **attributes)
