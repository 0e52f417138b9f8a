"""A ``twistd zeotwist`` server without TLS does not load pyOpenSSL.

Twisted's TCP transport, its reactor base, its endpoints and AMP each import
pyOpenSSL (and with it ``cryptography``) when it is installed, whether or not
anything uses TLS: about 12 MB of a server's resident memory, a third of a
whole ZEO server's (docs/performance.md, "Memory").  Each of them does
without it when the import fails.  So, under twistd only:

* the plugin (``twisted/plugins/zeotwist_plugin.py``) imports the server's
  modules (:mod:`zeotwist.server.tap`) with pyOpenSSL hidden
  (:func:`openssl_hidden`), which imports Twisted's endpoints and AMP
  without TLS; nothing there that the server uses needs it;
* once the options are known (``Options.postOptions``), :func:`settle`
  imports Twisted's TCP transport and reactor base (imported by the reactor,
  later) with pyOpenSSL still hidden if the server needs no TLS; if it
  does (``--listen-tls``, a listen or metrics endpoint that is not plain
  ``tcp:``/``tcp6:``/``unix:``), they import it as usual.

Twisted's endpoints module itself is imported only for a listen string that
is not plain ``tcp:`` (:func:`zeotwist.server.startup.listen_on`); then by
:func:`endpoints`, which hides pyOpenSSL as the plugin's import did.

pyOpenSSL is hidden only for those imports, never afterwards: code that
imports it later gets it, and Twisted's modules get their TLS back at its
first use (``startTLS``, ``tls:``/``ssl:`` endpoints, ``listenSSL``, AMP's
StartTLS; :mod:`zeotwist.lazytls`, as for a client), so a storage or a
service of the same process that makes TLS connections of its own still
can.  A process that imported pyOpenSSL already, or that imports the
server's modules itself (tests, an application's own service, the tac
file), is left as it is.

Under ``zeotwist serve`` (not twistd, which imports Twisted before the
plugin), modules that Twisted imports and a server uses only for what it is
not asked to do are left to their first use (:data:`LAZY_MODULES`,
:mod:`zeotwist.lazymodules`).
"""
import importlib
import sys

from zeotwist import lazymodules
from zeotwist.lazymodules import forward
from zeotwist.lazytls import openssl_hidden, track

#: Twisted's modules that the reactor imports and that carry TLS support
#: when pyOpenSSL imports (``startTLS`` on TCP connections, ``listenSSL``)
TRANSPORT_MODULES = ("twisted.internet.tcp", "twisted.internet.posixbase")
#: endpoint prefixes that are plain sockets (anything else may want TLS)
PLAIN_ENDPOINTS = ("tcp:", "tcp6:", "unix:")

#: whether the plugin imported the server's modules with pyOpenSSL hidden
_deferred = False


#: Modules that Twisted (or what it imports) loads at start-up and a server
#: uses only for what it is not asked to do, left to their first use under
#: ``zeotwist serve`` (:func:`import_tap`): a client's
#: (:data:`zeotwist.lazymodules.LAZY_MODULES`) and two of twistd's.  About
#: 1.9 MB of resident memory together (docs/performance.md, "Memory").
LAZY_MODULES = dict(
    lazymodules.LAZY_MODULES,
    **{"twisted.persisted.sob": {},    # twisted.application.service: twistd's saved applications
       "twisted.python.modules": {     # twisted.plugin (twistd's plugin discovery)
           "getModule": forward("twisted.python.modules", "getModule")}})


def defer_unused() -> None:
    """Leave :data:`LAZY_MODULES` to their first use: before Twisted is
    imported (else too late for some: nothing for those)."""
    lazymodules.defer(LAZY_MODULES)


def import_tap():
    """The plugin's import of :mod:`zeotwist.server.tap` (see the module
    docstring); under ``zeotwist serve``, where Twisted is not imported yet,
    :data:`LAZY_MODULES` too are left to their first use."""
    global _deferred
    if "twisted.python.compat" not in sys.modules:
        defer_unused()
    with openssl_hidden() as hidden:
        tap = importlib.import_module("zeotwist.server.tap")
    _deferred = _deferred or hidden
    if hidden:
        track()
    return tap


def endpoints():
    """``twisted.internet.endpoints``, imported (if it is not yet) as the
    plugin's import of the server's modules imported Twisted: with
    pyOpenSSL hidden when that import hid it; a TLS endpoint gets it back
    at its first use (:mod:`zeotwist.lazytls`)."""
    name = "twisted.internet.endpoints"
    if _deferred and name not in sys.modules:
        with openssl_hidden() as hidden:
            importlib.import_module(name)
        if hidden:
            track()
    return importlib.import_module(name)


def needs_tls(settings) -> bool:
    """Whether ``settings`` (a ServerSettings) may use TLS."""
    endpoints = list(settings.listen) + ([settings.metrics] if settings.metrics else [])
    return bool(settings.listen_tls or settings.tls_cert or any(
        not e.strip().lower().startswith(PLAIN_ENDPOINTS) for e in endpoints))


def settle(settings) -> bool:
    """After the plugin's import: import Twisted's transport modules without
    TLS if ``settings`` need none; whether it did."""
    if not _deferred or needs_tls(settings) or any(
            m in sys.modules for m in TRANSPORT_MODULES):
        return False
    with openssl_hidden() as hidden:
        if hidden:
            for name in TRANSPORT_MODULES:
                importlib.import_module(name)
    if hidden:
        track()
    return hidden
