"""Twisted's TLS support loaded when TLS is first used, not when Twisted is.

Twisted's TCP transport, its reactor base, its endpoints and AMP each import
pyOpenSSL (and with it ``cryptography`` and ``service_identity``) when it is
installed, whether or not anything uses TLS: about 13 MB of a client's
resident memory, 40 % of a whole ZEO client's (docs/performance.md,
"Memory").  Each of them does without it when the import fails, and then
lacks TLS for good: no ``startTLS`` on TCP connections, ``wrapClientTLS``
says "OpenSSL not available", ``tls:`` endpoint strings fail, no
``connectSSL``, no AMP ``StartTLS``.

So zeotwist imports those four modules with pyOpenSSL hidden
(:func:`import_plain`; the client does, before its first module, with
the three it needs: ``endpoints`` is imported so whenever it is first
imported afterwards, by the client for an endpoint string or TLS, or by the
program), and gives
them their TLS support back (:func:`restore`) as soon as anything in the
process may use it:

* when pyOpenSSL has been imported, by anyone (an import hook): every
  TLS use needs it, also a program's context built with pyOpenSSL alone
  for ``connectSSL`` or ``startTLS`` (never importing
  ``twisted.internet.ssl``).  When Twisted's own TLS modules import it,
  they are not whole yet: the hook tries again as each of them (and
  ``twisted.internet.ssl``, where Twisted's TLS uses start) is imported;
* when ``wrapClientTLS``, ``wrapServerTLS``, a ``tls:`` or ``ssl:``
  client endpoint string, the reactor's ``connectSSL`` or ``listenSSL``
  or a TCP connection's ``startTLS`` is used (those call :func:`restore`
  first until it has run: endpoints need Twisted's TLS names before
  anything imports pyOpenSSL, and the hook's attempt fails when pyOpenSSL
  is imported by a module that Twisted's TLS modules import in turn,
  service_identity);
* when zeotwist itself is asked for TLS (:func:`zeotwist.tls.require_tls`).

:func:`restore` imports pyOpenSSL and Twisted's TLS modules and puts what
the plain import left out back: the TLS mixins into the TCP transport's
classes (so existing and new connections get ``startTLS``), the ``tls`` and
``ssl`` modules into the reactor base and AMP, the TLS names into the
endpoints module.  Those are Twisted's private names (as in
:mod:`zeotwist.twistedcompat`), checked by ``tests/test_lazytls.py`` on the
Twisted versions pyproject.toml allows.

Nothing is hidden when pyOpenSSL was imported already (the process uses TLS
or imported Twisted's transports first) or is not installed.

Also: :func:`import_plain` leaves the modules Twisted imports and a client
seldom or never uses (``http.cookiejar``, ``decimal``, ``html.entities``, the
process support, the Unix and UDP transports: 2.6 MB) to their first use
(:data:`zeotwist.lazymodules.LAZY_MODULES`).
"""
import importlib
import importlib.util
import sys
import threading
from contextlib import contextmanager
from functools import wraps

from zeotwist.lazymodules import defer

#: Twisted's modules that import pyOpenSSL if they can, in import order
TLS_MODULES = ("twisted.internet.tcp", "twisted.internet.posixbase",
               "twisted.internet.endpoints", "twisted.protocols.amp")
ENDPOINTS = "twisted.internet.endpoints"
#: those a client imports at once; ``endpoints`` only for an endpoint string
#: or TLS (zeotwist.client.plainendpoint), and then, as whenever it is first
#: imported while the others lack TLS, with pyOpenSSL hidden (``_SSLImported``)
CLIENT_MODULES = tuple(name for name in TLS_MODULES if name != ENDPOINTS)
#: endpoints' functions that need its TLS names; wrapped to restore them first
_ENDPOINT_CALLS = ("wrapClientTLS", "wrapServerTLS", "_parseClientTLS")

#: module name -> whether it was imported without TLS and still lacks it
_lacking = set()
#: held by :func:`restore` (re-entered when its own import of ``twisted.internet.ssl`` runs the hook)
_restoring_lock = threading.RLock()
#: what :func:`_arrange` replaced by :func:`_restoring` wrappers: (owner, name, original)
_wrapped = []


_hiding = threading.local()      # ``on`` in a thread within openssl_hidden


@contextmanager
def openssl_hidden():
    """Within: ``import OpenSSL`` fails in this thread (not in others: their
    first TLS use), unless it was imported already (or is hidden already:
    yields False then)."""
    if "OpenSSL" in sys.modules or getattr(_hiding, "on", False):
        yield False
        return
    _hiding.on = True
    try:
        yield True
    finally:
        _hiding.on = False


class _HideOpenSSL:
    """The finder that refuses pyOpenSSL to a thread within :func:`openssl_hidden`."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if getattr(_hiding, "on", False) and name.partition(".")[0] == "OpenSSL":
            raise ModuleNotFoundError("pyOpenSSL hidden (zeotwist.lazytls)", name=name)
        return None


sys.meta_path.insert(0, _HideOpenSSL)


def import_plain(modules=CLIENT_MODULES) -> bool:
    """Import ``modules`` (Twisted's) with pyOpenSSL hidden, and arrange for
    :func:`restore` (see the module docstring); whether anything lacks TLS."""
    if "twisted.internet.base" not in sys.modules:
        defer()                         # (lazymodules.LAZY_MODULES)
    if importlib.util.find_spec("OpenSSL") is None:
        return False                    # not installed (or hidden by the caller)
    with openssl_hidden():
        for name in modules:
            importlib.import_module(name)
    return track()


def track() -> bool:
    """After Twisted's modules were imported with pyOpenSSL hidden (by
    :func:`import_plain`, or by the server's start, zeotwist.server.footprint):
    note which lack TLS and arrange for :func:`restore` at its first use;
    whether any does."""
    _lacking.update(name for name in TLS_MODULES if _lacks_tls(name))
    if _lacking:
        _arrange()
        if sys.modules.get("OpenSSL") is not None:     # by another thread, meanwhile
            try:
                restore(wait=False)     # (in an import: see restore)
            except ImportError:
                pass            # being imported: the hook restores once it is
    return bool(_lacking)




def _lacks_tls(name: str) -> bool:
    module = sys.modules.get(name)
    if module is None:
        return False
    if name == "twisted.internet.tcp":
        return module._TLSConnectionMixin.__module__ == name
    if name == "twisted.internet.posixbase":
        return module.tls is None
    if name == "twisted.internet.endpoints":
        return module.TLSMemoryBIOFactory is None
    return module.ssl is None           # twisted.protocols.amp


def lacking() -> set:
    """The names of Twisted's modules that still lack their TLS support."""
    return set(_lacking)


def restore(_imported: str = "", wait: bool = True) -> None:
    """Give Twisted's modules imported without pyOpenSSL their TLS support
    back; ImportError if pyOpenSSL is not installed.  Idempotent.  Without
    ``wait`` (the import hook, which holds an import's lock): nothing when
    another thread is restoring, whose imports may wait for that lock."""
    if not _lacking:
        return
    if not _restoring_lock.acquire(wait):
        return
    try:
        _restore(_imported)
    finally:
        _restoring_lock.release()


def _restore(_imported: str) -> None:
    from twisted.internet import _newtls, endpoints, posixbase, ssl, tcp
    from twisted.internet.interfaces import IReactorSSL, ITLSTransport
    from twisted.protocols import _sni, amp, tls
    from zope.interface import classImplements
    if any(getattr(m.__spec__, "_initializing", False) for m in (ssl, tls, _sni, _newtls)
           if m.__name__ != _imported):
        raise ImportError("Twisted's TLS modules are still being imported")
    if "twisted.internet.tcp" in _lacking:
        real = {tcp._TLSConnectionMixin: _newtls.ConnectionMixin,
                tcp._TLSClientMixin: _newtls.ClientMixin,
                tcp._TLSServerMixin: _newtls.ServerMixin}
        for cls in (tcp.Connection, tcp.BaseClient, tcp.Server):
            cls.__bases__ = tuple(real.get(base, base) for base in cls.__bases__)
        tcp._TLSConnectionMixin, tcp._TLSClientMixin, tcp._TLSServerMixin = real.values()
        tcp.ITLSTransport = ITLSTransport
        classImplements(tcp.Connection, ITLSTransport)
    if "twisted.internet.posixbase" in _lacking:
        posixbase.tls, posixbase.ssl = tls, ssl
        classImplements(posixbase.PosixReactorBase, IReactorSSL)
    if "twisted.protocols.amp" in _lacking:
        amp.ssl = ssl
        for name in ("DN", "Certificate", "CertificateOptions", "KeyPair"):
            setattr(amp, name, getattr(ssl, name))
    if "twisted.internet.endpoints" in _lacking:
        from OpenSSL.SSL import Error
        endpoints.SSLError = Error
        for name in ("Certificate", "CertificateOptions", "KeyPair", "PrivateCertificate",
                     "optionsForClientTLS", "trustRootFromCertificates"):
            setattr(endpoints, name, getattr(ssl, name))
        endpoints.SNIConnectionCreator = _sni.SNIConnectionCreator
        endpoints._TLSServerEndpoint = _sni.TLSServerEndpoint
        endpoints.autoReloadingDirectoryOfPEMs = _sni.autoReloadingDirectoryOfPEMs
        endpoints._TLSMemoryBIOFactory = endpoints.TLSMemoryBIOFactory = tls.TLSMemoryBIOFactory
    _lacking.clear()
    for owner, name, original in _wrapped:
        _put(owner, name, original)
    del _wrapped[:]
    _SSLImported.remove()


def _put(owner, name: str, value) -> None:
    """``owner``'s attribute ``name`` (its item, for a dict) set to ``value``."""
    if isinstance(owner, dict):
        owner[name] = value
    else:
        setattr(owner, name, value)


def _restoring(function):
    @wraps(function)
    def call(*args, **kw):
        restore()
        return function(*args, **kw)
    return call


def _arrange() -> None:
    """Make the first TLS use in the process call :func:`restore` (again
    after another :func:`track`: what is wrapped already stays as it is)."""
    if "twisted.internet.endpoints" in _lacking:
        endpoints = sys.modules["twisted.internet.endpoints"]
        parsers = endpoints._clientParsers      # ssl: strings' parser, called from there
        for owner, name in [(endpoints, n) for n in _ENDPOINT_CALLS] + [
                (endpoints._TLSServerEndpointParser, "parseStreamServer"), (parsers, "SSL")]:
            _wrap(owner, name)
    if "twisted.internet.posixbase" in _lacking:    # a context of pyOpenSSL's own
        base = sys.modules["twisted.internet.posixbase"].PosixReactorBase
        for name in ("connectSSL", "listenSSL"):
            _wrap(base, name)
    if "twisted.internet.tcp" in _lacking:          # left out of the classes once restored
        sys.modules["twisted.internet.tcp"]._TLSConnectionMixin.startTLS = _start_tls
    _SSLImported.install()


def _wrap(owner, name: str) -> None:
    """``owner``'s ``name`` (its item, for a dict) calls :func:`restore` first, until it has run."""
    if any(o is owner and n == name for o, n, _ in _wrapped):
        return
    original = owner[name] if isinstance(owner, dict) else getattr(owner, name)
    _wrapped.append((owner, name, original))
    _put(owner, name, _restoring(original))


def _start_tls(self, *args, **kw):
    """A TCP connection's ``startTLS`` before :func:`restore` (which puts
    Twisted's own in its class)."""
    restore()
    if getattr(type(self).startTLS, "lacking_tls", False):     # never: restore raised
        raise AttributeError("startTLS")
    return self.startTLS(*args, **kw)


_start_tls.lacking_tls = True


class _SSLImported:
    """Calls :func:`restore` once pyOpenSSL, or one of Twisted's TLS
    modules, has been imported (the first of them that finds the others
    whole does it); and imports Twisted's ``endpoints``, when first
    imported meanwhile (a client imports it only for an endpoint string or
    TLS, a program for its own use), as the others were: with pyOpenSSL
    hidden, its TLS names back at their first use."""

    NAMES = frozenset({"OpenSSL", "twisted.internet.ssl", "twisted.internet._sslverify",
                       "twisted.internet._newtls", "twisted.protocols.tls",
                       "twisted.protocols._sni"})
    _installed = None

    @classmethod
    def install(cls) -> None:
        if cls._installed is None:
            cls._installed = cls()
            sys.meta_path.insert(0, cls._installed)

    @classmethod
    def remove(cls) -> None:
        if cls._installed is not None and cls._installed in sys.meta_path:
            sys.meta_path.remove(cls._installed)
        cls._installed = None

    def find_spec(self, name, path, target=None):
        if name not in self.NAMES and name != ENDPOINTS:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        loader = spec.loader
        exec_module = loader.exec_module
        if name == ENDPOINTS:
            spec.loader = _Loader(loader, _without_openssl(exec_module))
            return spec

        def exec_then_restore(module):
            exec_module(module)
            try:
                restore(module.__name__, wait=False)
            except Exception:   # what it imports needs a module still being imported
                pass            # (service_identity imports OpenSSL): at the next or first use
        spec.loader = _Loader(loader, exec_then_restore)
        return spec


def _without_openssl(exec_module):
    def exec_plain(module):
        with openssl_hidden() as hidden:
            exec_module(module)
        if hidden:
            track()
    return exec_plain


class _Loader:
    def __init__(self, loader, exec_module):
        self._loader, self.exec_module = loader, exec_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def plain_before(package: str) -> None:
    """Run :func:`import_plain` just before the first submodule of
    ``package`` is imported (the client's: ``import zeotwist``, which a
    server does too, imports only the empty package)."""
    sys.meta_path.insert(0, _FirstSubmodule(package + "."))


class _FirstSubmodule:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def find_spec(self, name, path, target=None):
        if name.startswith(self.prefix) and self in sys.meta_path:
            sys.meta_path.remove(self)
            # A finder runs under the global import lock (importlib's
            # _find_spec, Python 3.10-3.13): another thread's import waits
            # for the end of this one and never meets pyOpenSSL hidden.
            import_plain()
        return None
