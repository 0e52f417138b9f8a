"""The password file of ``--auth-file``: its format, hashes and rights.

The file is text, one user a line (``#`` comments and blank lines are
skipped)::

    # NAME:PASSWORD:RIGHTS
    alice:pbkdf2-sha256$600000$c2FsdA==$aGFzaA==:rw=*
    bob:pbkdf2-sha256$600000$...$...:ro=main,archive
    backup:!:ro=*;rw=scratch

* PASSWORD is ``pbkdf2-sha256$ITERATIONS$SALT$HASH`` (base64), made by
  ``python -m zeotwist adduser FILE NAME`` (or :func:`hash_password`); ``!``
  means the user cannot log in with a password, only with a TLS client
  certificate whose common name is NAME.
* RIGHTS is ``;``-separated groups ``rw=LIST`` or ``ro=LIST``, LIST a
  ``,``-separated list of storage names or ``*`` (every storage).  A name
  given explicitly wins over ``*``; a name in both groups is read-write.
  A storage the rights do not name cannot be registered.

Plain functions of text and files, no Twisted: :mod:`zeotwist.server.auth`
reads the file at every login through them, and ``python -m zeotwist
adduser`` writes it with :func:`set_user`.  :func:`verify_password` is
slow on purpose (PBKDF2): the server runs it in a worker thread.
"""
import base64
import hashlib
import os

SCHEME = "pbkdf2-sha256"
#: PBKDF2-HMAC-SHA256 rounds for new entries (OWASP's 2023 advice)
DEFAULT_ITERATIONS = 600_000
#: the PASSWORD field of a certificate-only user
NO_PASSWORD = "!"
READ_WRITE, READ_ONLY = "rw", "ro"


# -- password hashes ---------------------------------------------------------------

def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """The PASSWORD field for ``password``: ``pbkdf2-sha256$N$SALT$HASH``."""
    import secrets          # here: a server without logins imports this module's names only
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "%s$%d$%s$%s" % (SCHEME, iterations, base64.b64encode(salt).decode("ascii"),
                            base64.b64encode(digest).decode("ascii"))


#: checked when the user does not exist, so that a wrong name takes as long
#: to refuse as a wrong password (of a default entry); matches nothing
DUMMY_HASH = "%s$%d$%s$%s" % (SCHEME, DEFAULT_ITERATIONS,
                              base64.b64encode(b"\0" * 16).decode(),
                              base64.b64encode(b"\0" * 32).decode())


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the PASSWORD field ``stored`` (constant
    time in the digest; False for ``!`` and malformed fields)."""
    try:
        scheme, rounds, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        iterations = int(rounds)
        if not 1 <= iterations <= 10**8:
            return False
        salt, digest = base64.b64decode(salt, validate=True), base64.b64decode(digest,
                                                                               validate=True)
    except ValueError:
        return False
    import hmac
    mine = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(mine, digest)


# -- rights --------------------------------------------------------------------------

def parse_rights(text: str) -> dict:
    """``"rw=main;ro=*"`` -> ``{"main": "rw", "*": "ro"}``; ValueError if malformed."""
    rights: dict = {}
    for group in filter(None, (g.strip() for g in text.split(";"))):
        mode, sep, names = group.partition("=")
        mode = mode.strip()
        if not sep or mode not in (READ_WRITE, READ_ONLY):
            raise ValueError("rights group %r is not rw=NAMES or ro=NAMES" % group)
        for name in filter(None, (n.strip() for n in names.split(","))):
            if rights.get(name) != READ_WRITE:
                rights[name] = mode
    return rights


def format_rights(rights: dict) -> str:
    groups = []
    for mode in (READ_WRITE, READ_ONLY):
        names = [n for n, m in rights.items() if m == mode]
        if names:
            groups.append("%s=%s" % (mode, ",".join(names)))
    return ";".join(groups)


# -- the file ------------------------------------------------------------------------

class Entry:
    """One line of the password file."""

    def __init__(self, name: str, password: str, rights: str):
        self.name, self.password, self.rights_text = name, password, rights

    @property
    def rights(self) -> dict:
        return parse_rights(self.rights_text)

    def line(self) -> str:
        return "%s:%s:%s" % (self.name, self.password, self.rights_text)


def read_entries(path) -> dict:
    """name -> :class:`Entry` for every user line of the file at ``path``."""
    entries = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(":")
            if len(parts) < 2:
                continue
            name, password = parts[0].strip(), parts[1].strip()
            entries[name] = Entry(name, password, ":".join(parts[2:]).strip())
    return entries


def check_name(name: str) -> str:
    if not name or any(c in name for c in ":#\n\r") or name != name.strip():
        raise ValueError("a user name must be non-empty, without ':', '#', line breaks "
                         "or surrounding spaces: %r" % (name,))
    return name


def set_user(path, name: str, password: str | None, rights: str,
             iterations: int = DEFAULT_ITERATIONS) -> None:
    """Add user ``name`` to the file at ``path`` (created if missing), or
    replace its line; ``password=None`` makes a certificate-only user.
    Written to a temporary file and renamed into place (mode 0600 when new)."""
    check_name(name)
    parse_rights(rights)
    field = NO_PASSWORD if password is None else hash_password(password, iterations)
    new_line = Entry(name, field, rights).line()
    lines, replaced = [], False
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f.read().splitlines():
                stripped = line.strip()
                if stripped and not stripped.startswith("#") \
                        and stripped.split(":")[0].strip() == name:
                    if not replaced:
                        lines.append(new_line)
                    replaced = True
                else:
                    lines.append(line)
        mode = os.stat(path).st_mode & 0o777
    else:
        lines.append("# zeotwist users: NAME:PASSWORD:RIGHTS (docs/tls-auth.md)")
        mode = 0o600
    if not replaced:
        lines.append(new_line)
    tmp = "%s.tmp%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
