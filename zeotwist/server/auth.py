"""The session's side of logging in: the ``Login`` step and the gate in front
of every other command.

Off unless the server is given ``--auth-file FILE``; then the session's
portal is :mod:`zeotwist.server.portal`'s (``twisted.cred`` over the
password file), imported only then, as what this module needs of it and of
:mod:`zeotwist.server.loginguard`: a server without logins does without
``twisted.cred`` (docs/performance.md, "Memory").

Runs on the reactor thread.  See docs/tls-auth.md.
"""
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp

from zeotwist.errors import NotLoggedIn, Unauthorized
from zeotwist.server.userfile import READ_ONLY, READ_WRITE
from zeotwist.wire import commands as C
from zeotwist.wire.codes import ERRORS
from zeotwist.wire.framing import peer_text

_log = Logger()


def peer_common_name(transport) -> str | None:
    """The common name of the peer's *verified* TLS certificate, or None."""
    if getattr(transport, "getPeerCertificate", None) is None:
        return None             # not TLS
    try:
        # the chain OpenSSL verified against --tls-ca: None when nothing was
        # verified (no CA given, or no certificate sent)
        chain = transport.getHandle().get_verified_chain()
        if not chain:
            return None
        from cryptography.x509.oid import NameOID
        names = chain[0].to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except Exception:
        return None
    return str(names[0].value) if names else None


# -- the session's side ----------------------------------------------------------------

_NOT_LOGGED_IN = ERRORS[NotLoggedIn]


class AuthResponders(amp.CommandLocator):
    """Mixin of :class:`~zeotwist.server.session.ServerSession`: ``Login``
    and the gate in front of every other command while auth is on.

    With a portal (``--auth-file``), a connection whose first box arrives
    with a verified TLS client certificate naming a user of the file is
    logged in as that user; otherwise every command but ``Login`` is
    answered ``NOT_LOGGED_IN`` (one-way commands are a protocol violation),
    and the handshake timeout still runs.  ``Register`` then applies the
    user's rights (:meth:`storage_access`).
    """

    #: the Portal (set by the SessionFactory) or None: no authentication
    portal = None
    #: the StorageUser once logged in
    user = None
    #: "rw" or "ro": what the user may do with the registered storage
    access = None
    _login_running = False
    _certificate_tried = False

    def auth_gate(self, name: bytes):
        """A responder refusing command ``name``, or None to let it through."""
        if self.portal is None or self.user is not None or name == C.Login.commandName:
            return None
        if not self._certificate_tried:
            self._certificate_tried = True
            cn = peer_common_name(self.transport)
            if cn is not None:        # the checks are synchronous: done on return
                from zeotwist.server.portal import CertificateIdentity
                d = self._portal_login(CertificateIdentity(cn), "certificate")
                d.addErrback(self._certificate_refused)   # the gate answers below
                if self.user is not None:
                    return None
        return self._not_logged_in

    _refusal = ("this server requires a login: give the client a user name and "
                "password, or a client certificate it knows")

    def _certificate_refused(self, failure):
        self._refusal = "%s; log in with a password instead" % failure.getErrorMessage()

    def _not_logged_in(self, box):
        if amp.ASK not in box:
            self.protocolViolation("one-way command before Login")
            return defer.Deferred()
        return defer.fail(amp.RemoteAmpError(_NOT_LOGGED_IN, self._refusal))

    def storage_access(self, storage: str):
        """``"rw"`` when auth is off, else the user's access to ``storage``;
        raises Unauthorized if the user has none."""
        if self.portal is None:
            return READ_WRITE
        access = self.user.access(storage)
        if access not in (READ_WRITE, READ_ONLY):
            raise Unauthorized("user %r has no rights on storage %r" % (self.user.name, storage))
        return access

    @C.Login.responder
    def login(self, username=None, password=None):
        if self.portal is None:
            return {"user": ""}
        if self.server is not None:
            raise Unauthorized("Login must come before Register")
        if self._login_running:
            raise Unauthorized("a Login is already in progress")
        from zeotwist.server.loginguard import SessionPassword, peer_key
        from zeotwist.server.portal import CertificateIdentity
        if password is None:
            cn = peer_common_name(self.transport)
            if cn is None:
                raise Unauthorized("no password and no verified client certificate")
            if username is not None and username != cn:
                raise Unauthorized("the client certificate is %r's, not %r's" % (cn, username))
            return self._portal_login(CertificateIdentity(cn), "certificate")
        if username is None:
            raise Unauthorized("a password without a user name")
        credentials = SessionPassword(username.encode("utf-8"), password.encode("utf-8"))
        guard = getattr(self.portal, "login_guard", None)
        if guard is not None:       # loginguard: throttled peers and names wait
            credentials.peer = peer_key(self.transport)
            credentials.wanted = lambda: self._login_refusal(guard, credentials.peer, username)
            why = credentials.wanted()
            if why is not None:
                self._log_failure(guard, "{peer}: login as {user!r} refused: {why}",
                                  peer=credentials.peer, user=username, why=why)
                raise Unauthorized(why)
        return self._portal_login(credentials, "password")

    def _login_refusal(self, guard, peer, username) -> str | None:
        """Why the password check should not run (now), or None."""
        if self.transport is None or self._violated:
            return "the connection is closed"
        return guard.throttle.refusal(peer, username)

    def _log_failure(self, guard, fmt, **kw):
        if guard is None:
            _log.warn(fmt, **kw)
        else:
            guard.log.warn(fmt, **kw)

    def _portal_login(self, credentials, how):
        from zeotwist.server.portal import IStorageUser
        self._login_running = True
        d = self.portal.login(credentials, how, IStorageUser)
        d.addCallbacks(self._logged_in, self._login_failed, (credentials, how), None,
                       (credentials, how))
        return d

    def _logged_in(self, result, credentials, how):
        self._login_running = False
        _iface, self.user, _logout = result
        guard = getattr(self.portal, "login_guard", None)
        if guard is not None and how == "password":
            guard.throttle.succeeded(credentials.peer, self.user.name)
        _log.info("zeotwist: {peer} logged in as {user!r} ({how})",
                  peer=peer_text(self.transport),
                  user=self.user.name, how=self.user.how)
        return {"user": self.user.name}

    def _login_failed(self, failure, credentials, how):
        from twisted.cred import error as cred_error

        from zeotwist.server.loginguard import LoginThrottled
        self._login_running = False
        if not failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            _log.failure("zeotwist: login failed", failure)
        name = getattr(credentials, "username", None)
        name = name.decode("utf-8", "replace") if name is not None \
            else getattr(credentials, "common_name", "?")
        guard = getattr(self.portal, "login_guard", None)
        if failure.check(LoginThrottled):       # not checked: does not count
            raise Unauthorized(failure.getErrorMessage())
        if guard is not None and how == "password":
            guard.throttle.failed(credentials.peer, name)
        self._log_failure(guard, "zeotwist: failed {how} login as {user!r} from {peer}",
                          how=how, user=name,
                          peer=peer_text(self.transport))
        if how == "certificate":
            raise Unauthorized("the client certificate's name %r is not a user of this "
                               "server" % name)
        raise Unauthorized("login failed: unknown user %r or wrong password" % name)
