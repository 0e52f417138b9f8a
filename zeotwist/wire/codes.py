"""The one table of AMP error codes and the exception classes they stand for.

An AMP error carries only a code and a text.  The server maps an exception
to its code through :data:`ERRORS` (most specific class first: AMP picks the
first class that matches); the client turns a code back into the exception
with :func:`rebuild`, restoring what the text carries (a POSKeyError's oid;
AMP sends ``str(exception)`` as the text).
"""
import re

from ZODB import POSException as P
from ZODB.utils import p64

from zeotwist import errors as E

#: exception class -> wire code, most specific first.
ERRORS: dict[type[BaseException], bytes] = {
    P.ReadConflictError: b"READ_CONFLICT",
    P.ConflictError: b"CONFLICT",
    P.ReadOnlyError: b"READ_ONLY",
    P.POSKeyError: b"POS_KEY",
    P.StorageTransactionError: b"STORAGE_TRANSACTION",
    P.UndoError: b"UNDO",
    E.TransactionTooLarge: b"TOO_LARGE",
    E.BlobPathRefused: b"BLOB_PATH",
    E.ProtocolVersionError: b"PROTOCOL_VERSION",
    E.UnknownStorage: b"UNKNOWN_STORAGE",
    E.NotLoggedIn: b"NOT_LOGGED_IN",
    E.Unauthorized: b"UNAUTHORIZED",
    E.ProtocolError: b"PROTOCOL",
    P.StorageError: b"STORAGE",
    Exception: b"SERVER_ERROR",
}

_CLASSES = {code: cls for cls, code in ERRORS.items()}
_CLASSES[b"SERVER_ERROR"] = E.StorageServerError


def rebuild(code: bytes, description: str) -> BaseException:
    """Turn a received error code and text back into an exception."""
    cls = _CLASSES.get(code, E.StorageServerError)
    if cls is P.POSKeyError:
        # str(POSKeyError(oid)) is ZODB's oid_repr: "0x2a"
        try:
            return P.POSKeyError(p64(int(description, 16)))
        except ValueError:
            return P.POSKeyError(description)
    if cls in (P.ConflictError, P.ReadConflictError):
        return _rebuild_conflict(cls, description)
    return cls(description)


#: str(ConflictError): "message (oid 0x2a, class m.C, serial this txn started
#: with 0x03.. <time>, serial currently committed 0x04.. <time>)"
_CONFLICT_TEXT = re.compile(r"(.*) \(((?:oid|class|serial) .*)\)", re.S)
_CONFLICT_FIELD = re.compile(
    r"(?:^|, )(oid|class|serial this txn started with|serial currently committed) ([^ ,]+)")


def _rebuild_conflict(cls, description: str):
    """A conflict error with the oid, class name and serials its text names."""
    m = _CONFLICT_TEXT.fullmatch(description or "")
    if m is None:
        return cls(description or None)
    err = cls(m.group(1))
    fields = dict(_CONFLICT_FIELD.findall(m.group(2)))
    try:
        if "oid" in fields:
            err.oid = p64(int(fields["oid"], 16))
        old = fields.get("serial this txn started with")
        current = fields.get("serial currently committed")
        if old and current:
            err.serials = (p64(int(current, 16)), p64(int(old, 16)))
    except ValueError:
        return cls(description)
    err.class_name = fields.get("class")
    return err
