"""Modules loaded at their first use, not when they are imported.

Twisted imports at start-up modules that a client (or server) seldom or
never uses: ``http.cookiejar`` (with ``urllib.request``, ``http.client``,
``email``, ``calendar``: 1.4 MB of a client's resident memory) and its
process support (0.3 MB) (docs/performance.md, "Memory").
:func:`lazy_import` leaves a stand-in in their place that imports the real
module at its first attribute; :func:`zeotwist.lazytls.import_plain` does
so for ``LAZY_MODULES``, the server's start for its own
(zeotwist.server.footprint).

Runs in whichever thread imports or first uses such a module.
"""
import importlib
import importlib.util
import sys
import threading
import types

#: Modules Twisted imports at start-up that a client seldom or never uses,
#: loaded at their first use instead (:func:`lazy_import`): ``http.cookiejar``
#: (see there); the process support, ``twisted.internet.process`` with
#: ``pty``, ``tty``, ``termios``, ``grp``, ``pwd`` (its first use: a
#: ``spawnProcess``, or a reactor run in the main thread, which reaps child
#: processes): 0.3 MB (docs/performance.md, "Memory").
LAZY_MODULES = ("http.cookiejar", "twisted.internet.process")


def lazy_import(name: str) -> None:
    """Import module ``name`` (of a package) lazily: it runs at its first use.

    ``http.cookiejar`` is one: Twisted's ``twisted.python.compat`` imports it
    at start-up (only to offer it under its Python 2 name), and with it
    ``urllib.request``, ``http.client``, ``email``, ``calendar``: 1.3 MB of
    a client's resident memory.  Until then ``sys.modules`` and the package
    hold a :class:`_LazyModule` stand-in, so ``import http.cookiejar`` and
    ``from http import cookiejar`` do not load it yet; the first attribute
    asked of the stand-in imports the real module, which takes its place.

    Not ``importlib.util.LazyLoader``: before Python 3.12.3 it is not
    thread-safe (a second thread's first use during the first thread's
    load sees a half-run module: AttributeError), and a server's or a web
    application's threads may well meet there."""
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return
    package, _, child = name.rpartition(".")
    stand_in = _LazyModule(name)
    sys.modules[name] = stand_in
    setattr(sys.modules[package], child, stand_in)


#: held while a :class:`_LazyModule` imports its module
_lazy_lock = threading.RLock()


class _LazyModule(types.ModuleType):
    """The stand-in :func:`lazy_import` leaves in ``sys.modules``: the real
    module is imported (once, under a lock) at the first attribute asked."""

    def __getattr__(self, attr):
        real = self.__dict__.get("_real")
        if real is None:
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
