"""TLS for both ends: certificate files in, Twisted connection options out.

Server: :func:`server_options` makes the ``CertificateOptions`` of
``--tls-cert``/``--tls-key``/``--tls-ca`` (with a CA, a client certificate
signed by it is *required*), and :func:`listen_tls` listens on any Twisted
server endpoint (``tcp:8443:interface=...``, ``unix:...``) with TLS on top.

Client: :func:`client_creator` turns ``ClientStorage(..., tls=...)`` into a
connection creator (``True``: the system's CAs; a dict with ``ca``,
``cert``, ``key``, ``hostname``; or a ready ``IOpenSSLClientConnectionCreator``);
:func:`zeotwist.client.addresses.to_endpoint` layers it over the client's
address (this module builds no endpoints and imports only zeotwist.errors).

:func:`describe_error` turns OpenSSL's and service_identity's exceptions
into one readable line ("certificate verify failed", "tlsv13 alert
certificate required", "the server's certificate is not valid for HOST"),
which is what a client reports when it cannot connect.  See docs/tls-auth.md.

Files are read when these functions are called (at server start, at client
construction), never on the reactor's hot path.

TLS needs pyOpenSSL and service_identity, the ``[tls]`` extra
(``pip install 'zeotwist[tls]'``).  Without them everything else works, and
whatever asks for TLS raises :class:`TLSConfigError` saying what to install
(:func:`require_tls`).
"""
import os

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from zeotwist.errors import TLSConfigError, UsageError

#: the ``tls`` dict keys ClientStorage understands
CLIENT_KEYS = frozenset({"ca", "cert", "key", "hostname"})


#: how to install what TLS needs (pyOpenSSL, service_identity)
INSTALL = "pip install 'zeotwist[tls]'"

# TLSConfigError lives in zeotwist.errors; imported here, where it always was.


def require_tls(what: str) -> None:
    """Raise :class:`TLSConfigError` if pyOpenSSL, which ``what`` (a TLS
    option or endpoint) needs, is not installed."""
    try:
        import OpenSSL  # noqa: F401
    except ImportError:
        raise TLSConfigError("%s needs TLS support, which is not installed (no pyOpenSSL): %s"
                             % (what, INSTALL)) from None
    from zeotwist.lazytls import restore
    restore()           # Twisted's modules imported without it get it back


def is_tls_endpoint(description: str) -> bool:
    """Whether a Twisted endpoint string is one of its TLS kinds."""
    return description.strip().lower().startswith(("tls:", "ssl:"))

def _read(path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError("cannot read the %s %s: %s" % (what, path, e.strerror)) from None


def load_certificates(path) -> list:
    """Every certificate in the PEM file ``path``, or in the ``*.pem`` and
    ``*.crt`` files of directory ``path`` (``cryptography`` certificates)."""
    from cryptography import x509
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.endswith((".pem", ".crt")))
    else:
        files = [path]
    certs = []
    for name in files:
        try:
            certs += x509.load_pem_x509_certificates(_read(name, "CA file"))
        except ValueError as e:
            raise TLSConfigError("no PEM certificate in %s: %s" % (name, e)) from None
    if not certs:
        raise TLSConfigError("no certificate found in %s" % path)
    return certs


def load_identity(cert, key=None):
    """``(certificate, private key, chain)`` (``cryptography`` objects) from
    a PEM certificate file (its first certificate is ours, any others the
    chain to send) and a PEM key file (default: the certificate file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    key_name = key if key is not None else cert
    cert_pem = _read(cert, "certificate file")
    key_pem = _read(key, "key file") if key is not None else cert_pem
    try:
        found = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise TLSConfigError("no PEM certificate in %s: %s" % (cert, e)) from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError("no usable PEM private key in %s: %s" % (key_name, e)) from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*raw) != found[0].public_key().public_bytes(*raw):
        raise TLSConfigError("the key in %s does not belong to the certificate in %s"
                             % (key_name, cert))
    return found[0], private, found[1:]


def _trust_root(path):
    """A Twisted trust root of exactly the CAs of ``path``."""
    from OpenSSL.crypto import X509
    from twisted.internet.ssl import Certificate, trustRootFromCertificates
    return trustRootFromCertificates(
        [Certificate(X509.from_cryptography(c)) for c in load_certificates(path)])


def server_options(cert, key=None, ca=None):
    """The server's ``CertificateOptions``: its certificate (and chain) and
    key; with ``ca`` (a PEM file or directory), every client must present a
    certificate signed by one of those CAs, or the handshake fails."""
    require_tls("TLS on the server")
    from twisted.internet.ssl import CertificateOptions
    certificate, private, chain = load_identity(cert, key)
    kw = dict(privateKey=private, certificate=certificate, extraCertChain=chain)
    if ca is not None:
        kw.update(trustRoot=_trust_root(ca))     # verify and require a client certificate
    return CertificateOptions(**kw)


def _tls_factory(options, factory, clock):
    from twisted.protocols.tls import TLSMemoryBIOFactory

    class TLSServerFactory(TLSMemoryBIOFactory):
        """TLS over ``factory``, which may refuse a connection (None)."""

        def buildProtocol(self, addr):
            inner = self.wrappedFactory.buildProtocol(addr)
            return None if inner is None else self.protocol(self, inner)

    return TLSServerFactory(options, False, factory, clock=clock)


def listen_tls(reactor, description: str, factory, options):
    """Listen on server endpoint string ``description`` with TLS on top;
    a Deferred of the listening port."""
    from twisted.internet.endpoints import serverFromString
    return serverFromString(reactor, description).listen(
        _tls_factory(options, factory, reactor))


def client_creator(tls, hostname: str | None):
    """The client connection creator for ``ClientStorage(tls=...)``.

    ``tls`` is True (trust the system's CAs), a dict (``ca``: a PEM file or
    directory of trusted CAs instead of the system's; ``cert`` and ``key``:
    the client certificate, the key defaulting to the cert file;
    ``hostname``: the name to verify, default the address's host), or an
    ``IOpenSSLClientConnectionCreator`` used as is.
    """
    if IOpenSSLClientConnectionCreator.providedBy(tls):
        return tls
    require_tls("tls=%r" % (tls,))
    from twisted.internet.ssl import optionsForClientTLS
    settings = {} if tls is True else dict(tls)
    unknown = set(settings) - CLIENT_KEYS
    if unknown:
        raise UsageError("unknown tls settings: %s (known: %s)"
                        % (", ".join(sorted(unknown)), ", ".join(sorted(CLIENT_KEYS))))
    hostname = settings.get("hostname") or hostname
    if not hostname:
        raise ValueError("TLS needs the server's host name to verify: give "
                         "tls=dict(hostname=...) for this address")
    kw = {}
    if settings.get("ca"):
        kw["trustRoot"] = _trust_root(settings["ca"])
    if settings.get("cert"):
        certificate, private, chain = load_identity(settings["cert"], settings.get("key"))
        kw["extraCertificateOptions"] = dict(privateKey=private, certificate=certificate,
                                             extraCertChain=chain)
    elif settings.get("key"):
        raise ValueError("tls: a key without a cert")
    return optionsForClientTLS(hostname, **kw)


def use_clock(transport, clock) -> None:
    """Make a TLS transport flush its buffered writes on ``clock``.

    Twisted's TLS transport gathers small writes and flushes them on the
    next turn of a clock that defaults to the *global* reactor; the
    ``tls:``/``ssl:`` endpoint strings and ``listenSSL``/``connectSSL``
    give it no other.  A connection served by another reactor (zeotwist's
    private one) would then never send a byte.  Called from both ends'
    ``connectionMade``, before anything is written; does nothing for
    other transports.
    """
    from zeotwist.twistedcompat import set_tls_flush_clock
    set_tls_flush_clock(transport, clock)


def describe_error(err) -> str:
    """One line for a TLS failure: OpenSSL's reasons ("certificate verify
    failed", "tlsv13 alert certificate required"), or the text of anything
    else."""
    try:
        from OpenSSL import SSL
    except ImportError:             # not installed: no TLS error to describe
        SSL = None
    if SSL is not None and isinstance(err, SSL.Error) and err.args and isinstance(err.args[0], list):
        reasons = [entry[-1] for entry in err.args[0]
                   if isinstance(entry, tuple) and entry and entry[-1]]
        if reasons:
            return "TLS handshake failed: " + "; ".join(reasons)
    name = type(err).__name__
    text = str(err)
    if name == "VerificationError":         # service_identity: hostname mismatch
        wanted = []
        for mismatch in getattr(err, "errors", ()):
            ident = getattr(mismatch, "mismatched_id", None)
            value = getattr(ident, "hostname", None) or getattr(ident, "ip", None)
            wanted.append(value.decode("ascii", "replace") if isinstance(value, bytes)
                          else str(value))
        return "TLS handshake failed: the server's certificate is not valid for %s" \
               % (", ".join(wanted) or text)
    return "%s: %s" % (name, text) if text else name
