"""The password file behind twisted.cred: who may log in, with which rights.

Imported only by a server given ``--auth-file FILE``
(:meth:`~zeotwist.server.service.ServerService.auth_portal`); the session's
side, the ``Login`` step, is :mod:`zeotwist.server.auth`.  Keeping
``twisted.cred`` and the hash functions out of a server without logins
spares 0.2 MB of its resident memory (docs/performance.md, "Memory").
The file's format, hashes and rights are :mod:`zeotwist.server.userfile`'s.
:class:`PasswordFile` is a ``twisted.cred`` ``FilePasswordDB`` that re-reads
the file at every login (edits apply to the next login) and checks the
password hash in a worker thread; :class:`CertificateChecker` accepts a
verified TLS client certificate whose common name is a user of the file.
:func:`make_portal` puts both behind a ``Portal`` whose realm hands out
:class:`StorageUser` avatars.

Runs on the reactor thread, except the hash checks.  See docs/tls-auth.md.
"""
import os

from twisted.cred import error as cred_error
from twisted.cred.checkers import FilePasswordDB
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from zeotwist.server.loginguard import LoginGuard
from zeotwist.server.userfile import DUMMY_HASH, SCHEME, format_rights, read_entries, verify_password

_log = Logger()


class IStorageUser(Interface):
    """The avatar of a logged-in client."""
    name = Attribute("the user name (str)")

    def access(storage):
        """``"rw"``, ``"ro"`` or None (no rights) for storage name ``storage``."""


@implementer(IStorageUser)
class StorageUser:
    def __init__(self, name: str, rights: dict, how: str = "password"):
        self.name = name
        self.rights = dict(rights)
        self.how = how          # "password" or "certificate"

    def access(self, storage: str):
        return self.rights.get(storage, self.rights.get("*"))

    def __repr__(self):
        return "<StorageUser %s (%s) %s>" % (self.name, self.how, format_rights(self.rights))


class PasswordFile(FilePasswordDB):
    """The password checker: ``twisted.cred``'s file database over the
    format of :mod:`zeotwist.server.userfile`, hashes checked in a worker thread of ``reactor``."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path, reactor):
        super().__init__(path, delim=b":", hash=self._no_inline_hash, cache=False)
        self.path = path
        self.reactor = reactor
        #: throttling and the password checks' own small pool (loginguard)
        self.guard = LoginGuard(reactor)

    @staticmethod
    def _no_inline_hash(username, password, stored):  # pragma: no cover - not used
        raise NotImplementedError("hashes are checked in requestAvatarId")

    def entries(self) -> dict:
        try:
            return read_entries(self.path)
        except (OSError, UnicodeDecodeError) as e:
            _log.error("zeotwist cannot read the password file {path}: {e}",
                       path=self.path, e=e)
            raise cred_error.UnauthorizedLogin("the password file cannot be read")

    def getUser(self, username: bytes):
        entry = self.entries().get(username.decode("utf-8", "replace"))
        if entry is None:
            raise KeyError(username)
        return username, entry.password.encode("utf-8")

    def requestAvatarId(self, credentials):
        try:
            _name, stored = self.getUser(credentials.username)
            stored = stored.decode("utf-8")
        except KeyError:
            stored = None
        except cred_error.UnauthorizedLogin as e:
            return defer.fail(e)
        password = credentials.password.decode("utf-8", "replace")
        usable = stored is not None and stored.startswith(SCHEME + "$")   # not "!"
        d = self.guard.checks.run(getattr(credentials, "peer", None),
                                  getattr(credentials, "wanted", lambda: None),
                                  verify_password, password, stored if usable else DUMMY_HASH)

        def checked(ok):
            if ok and usable:
                return credentials.username
            raise cred_error.UnauthorizedLogin()

        return d.addCallback(checked)


class ICertificateIdentity(Interface):
    """A client identified by its verified TLS certificate."""
    common_name = Attribute("the certificate subject's common name (str)")


@implementer(ICertificateIdentity)
class CertificateIdentity:
    def __init__(self, common_name: str):
        self.common_name = common_name


class CertificateChecker:
    """Accepts a verified client certificate whose common name is a user of
    the password file (that user's password is not needed)."""
    credentialInterfaces = (ICertificateIdentity,)

    def __init__(self, password_file: PasswordFile):
        self.password_file = password_file

    def requestAvatarId(self, credentials):
        try:
            known = credentials.common_name in self.password_file.entries()
        except cred_error.UnauthorizedLogin as e:
            return defer.fail(e)
        if not known:
            return defer.fail(cred_error.UnauthorizedLogin())
        return defer.succeed(credentials.common_name.encode("utf-8"))


@implementer(IRealm)
class StorageRealm:
    """Makes a :class:`StorageUser` with the rights the file gives."""

    def __init__(self, password_file: PasswordFile):
        self.password_file = password_file

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IStorageUser not in interfaces:
            raise NotImplementedError("zeotwist users only")
        name = avatarId.decode("utf-8")
        entry = self.password_file.entries().get(name)
        try:
            rights = entry.rights if entry is not None else {}
        except ValueError as e:
            _log.error("zeotwist password file {path}: user {name}: {e}; no rights",
                       path=self.password_file.path, name=name, e=e)
            rights = {}
        return IStorageUser, StorageUser(name, rights, mind or "password"), lambda: None


def make_portal(path, reactor) -> Portal:
    """The portal of ``--auth-file path``: passwords and certificates."""
    if not os.path.isfile(path):
        raise ValueError("no password file %s" % path)
    passwords = PasswordFile(path, reactor)
    portal = Portal(StorageRealm(passwords), [passwords, CertificateChecker(passwords)])
    portal.login_guard = passwords.guard
    return portal
