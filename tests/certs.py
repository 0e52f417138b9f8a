"""Throw-away certificates for the TLS tests, made at test time.

:func:`make_pki` writes a CA, a server certificate for ``localhost`` and
``127.0.0.1``, client certificates signed by that CA, and a second,
untrusted CA with a client certificate of its own, into a directory (a
test's ``tmp_path``).  EC P-256 keys: fast to make.  Nothing made here is
ever committed.
"""
import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write_cert(cert, path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(subject_cn, issuer_cert, issuer_key, *, ca=False, san=(), usage=None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject_cn))
               .issuer_name(issuer_cert.subject if issuer_cert else _name(subject_cn))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return cert, key


@dataclass
class PKI:
    """Paths of the files :func:`make_pki` wrote (all PEM)."""
    ca: object              # the trusted CA's certificate
    ca_dir: object          # a directory holding only ca.pem (for tls:...:trustRoots=)
    server_cert: object
    server_key: object
    client_cert: object     # CN "alice", signed by the CA
    client_key: object
    client_pem: object      # alice's certificate and key in one file
    bob_cert: object        # CN "bob", signed by the CA
    bob_key: object
    rogue_cert: object      # CN "alice", signed by an untrusted CA
    rogue_key: object
    other_server_cert: object   # signed by the CA, for the name "elsewhere.invalid" only
    other_server_key: object


def make_pki(directory) -> PKI:
    ca_cert, ca_key = _issue("zeotwist test CA", None, None, ca=True)
    rogue_ca, rogue_ca_key = _issue("rogue CA", None, None, ca=True)
    server = _issue("localhost", ca_cert, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    other = _issue("elsewhere.invalid", ca_cert, ca_key,
                   usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   san=[x509.DNSName("elsewhere.invalid")])
    alice = _issue("alice", ca_cert, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    bob = _issue("bob", ca_cert, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _issue("alice", rogue_ca, rogue_ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_dir = directory / "trust"
    ca_dir.mkdir()
    pki = PKI(ca=directory / "ca.pem", ca_dir=ca_dir,
              server_cert=directory / "server.pem", server_key=directory / "server.key",
              client_cert=directory / "alice.pem", client_key=directory / "alice.key",
              client_pem=directory / "alice-both.pem",
              bob_cert=directory / "bob.pem", bob_key=directory / "bob.key",
              rogue_cert=directory / "rogue.pem", rogue_key=directory / "rogue.key",
              other_server_cert=directory / "other.pem",
              other_server_key=directory / "other.key")
    _write_cert(ca_cert, pki.ca)
    _write_cert(ca_cert, ca_dir / "ca.pem")
    for (cert, key), cpath, kpath in [(server, pki.server_cert, pki.server_key),
                                      (other, pki.other_server_cert, pki.other_server_key),
                                      (alice, pki.client_cert, pki.client_key),
                                      (bob, pki.bob_cert, pki.bob_key),
                                      (rogue, pki.rogue_cert, pki.rogue_key)]:
        _write_cert(cert, cpath)
        _write_key(key, kpath)
    pki.client_pem.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    return pki
