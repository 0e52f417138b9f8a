"""Server-side conflict resolution that runs no code from the network.

ZODB's own ``tryToResolveConflict`` unpickles client records with an
unrestricted ``find_global``: any client could make the server import and
call anything (``builtins.exec`` through a REDUCE).  :class:`RestrictedResolver`
replaces it on the served storage.  It unpickles the three records (the new
one, the old and the committed one) with a ``find_class`` that only returns

* classes that define ``_p_resolveConflict`` and whose dotted name matches
  the allow-list (default: everything under ``BTrees`` plus
  ``BTrees.Length.Length``; extend it with server configuration), and
* a few plain data types a state pickle may need (set, frozenset, ...),

so a REDUCE can only call those, and within the bounds of
:mod:`zeotwist.server.unpickling` (sizes, opcodes, nesting; ``bytearray``
only up to a size).  Anything else aborts resolution and the client gets an
ordinary ConflictError (it retries, as for any conflict).

Runs in the storage's worker thread (called from ``storage.store``).
"""
import fnmatch
import importlib
from io import BytesIO

from twisted.logger import Logger, LogLevel
from ZODB.ConflictResolution import PersistentReferenceFactory, persistent_id
from ZODB.POSException import ConflictError
from ZODB._compat import PersistentPickler, _protocol

from zeotwist.errors import PickleRefused, RefusedGlobal
from zeotwist.server.unpickling import (
    DEFAULT_LIMITS, BoundedUnpickler, Limits, bounded_bytearray, check_opcodes,
    pickle_class_name)
from zeotwist.server.limits import MonotonicClock, RateLimitedLog

_log = Logger()

#: Seconds between two debug lines for the same refused kind of conflict.
REFUSAL_DEBUG_INTERVAL = 10.0
DEFAULT_ALLOWED = ("BTrees.*", "BTrees.Length.Length")
#: Data types a state may contain that carry no behaviour worth abusing.
SAFE_GLOBALS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bounded_bytearray(DEFAULT_LIMITS),
    ("builtins", "complex"): complex,
}


# RefusedGlobal lives in zeotwist.errors; imported here, where it always was.

def refuse_resolution(storage) -> None:
    """``--client-conflict-resolution``: the server unpickles no client
    record at all; every conflict goes back to the client as ConflictError."""
    def no_resolution(oid, committed_serial, old_serial, new_pickle, committed_data=b""):
        raise ConflictError(oid=oid, serials=(committed_serial, old_serial))
    storage.tryToResolveConflict = no_resolution


class RestrictedResolver:
    def __init__(self, storage, allowed=DEFAULT_ALLOWED, limits: Limits = DEFAULT_LIMITS,
                 clock=None):
        self._refused: dict = {}        # refusal reason -> its last debug line's time
        self.storage = storage
        self.allowed = tuple(allowed)
        self.limits = limits
        self._classes: dict = {}
        # A vote of many bad records must not write a line (let alone a
        # traceback) per record: the records are the client's mistake.
        self._clock = clock or MonotonicClock()
        self._log = RateLimitedLog(self._clock, interval=10.0, burst=3)

    def install(self) -> None:
        """Make the storage resolve conflicts through this resolver."""
        self.storage.tryToResolveConflict = self.resolve

    # -- the allow-list -------------------------------------------------------
    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in SAFE_GLOBALS:
            return SAFE_GLOBALS[key]
        cached = self._classes.get(key)
        if cached is not None:
            return cached
        dotted = self._check_allowed(module, name)
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise RefusedGlobal("conflict resolution cannot find %s" % dotted) from None
        if not isinstance(obj, type) or not hasattr(obj, "_p_resolveConflict"):
            raise RefusedGlobal("%s is not a conflict-resolving class" % dotted)
        self._classes[key] = obj
        return obj

    def _check_allowed(self, module: str, name: str) -> str:
        """The dotted name, if the allow-list has it; else RefusedGlobal."""
        dotted = "%s.%s" % (module, name)
        if not any(fnmatch.fnmatchcase(dotted, pattern) for pattern in self.allowed):
            raise RefusedGlobal("conflict resolution refuses global %s" % dotted)
        return dotted

    def _check_record_class(self, data: bytes) -> None:
        """Refuse a record whose class the allow-list refuses, read from its
        opcodes before anything is scanned or unpickled: the commonest
        conflict (an application class) costs no unpickling, and each
        refused vote of a hot object waits for this (docs/performance.md,
        "Cheaper refusals, strict turns")."""
        key = pickle_class_name(data)
        if key[0] and key not in self._classes and key not in SAFE_GLOBALS:
            self._check_allowed(*key)

    def _unpickler(self, data: bytes, refs):
        check_opcodes(data, self.limits)      # before anything is built
        return BoundedUnpickler(data, self.find_class, refs.persistent_load, self.limits)

    # -- resolution --------------------------------------------------------------
    def resolve(self, oid, committed_serial, old_serial, new_pickle, committed_data=b""):
        try:
            return self._resolve(oid, committed_serial, old_serial, new_pickle, committed_data)
        except RefusedGlobal as e:
            self._log_refusal(oid, e)
        except PickleRefused as e:
            self._log.warn("zeotwist: not resolving conflict on {oid}: {e}",
                           oid=oid.hex(), e=e)
        except ConflictError:
            pass
        except Exception as e:
            self._log.warn("zeotwist: conflict resolution failed on {oid}: {kind}: {e}",
                           oid=oid.hex(), kind=type(e).__name__, e=e)
        raise ConflictError(oid=oid, serials=(committed_serial, old_serial))

    def _log_refusal(self, oid: bytes, e: RefusedGlobal) -> None:
        """An ordinary conflict of a class the server does not resolve: the
        client retries.  Info once per class (the reason names it), then
        debug at most every REFUSAL_DEBUG_INTERVAL seconds: a hot object
        is refused hundreds of times a second, and a log event costs about
        0.1 ms, paid while the commit lock waits for the refusal."""
        reason, now = str(e), self._clock.seconds()
        last = self._refused.get(reason)        # the last debug line's time
        if last is not None and now - last < REFUSAL_DEBUG_INTERVAL:
            return
        first = last is None and len(self._refused) < 1000      # (else debug, unremembered)
        if last is not None or first:
            self._refused[reason] = now if last is not None else float("-inf")
        _log.emit(LogLevel.info if first else LogLevel.debug,
                  "zeotwist: not resolving conflicts of this kind on the server "
                  "(first on {oid}): {e}", oid=oid.hex(), e=e)

    def _resolve(self, oid, committed_serial, old_serial, new_pickle, committed_data):
        self._check_record_class(new_pickle)
        refs = PersistentReferenceFactory()
        new = self._unpickler(new_pickle, refs)
        meta = new.load()
        klass, args = (meta[0], meta[1] or ()) if isinstance(meta, tuple) else (meta, ())
        if isinstance(klass, tuple):
            klass = self.find_class(*klass)
        if not isinstance(klass, type) or not hasattr(klass, "_p_resolveConflict"):
            raise RefusedGlobal("record class is not conflict-resolving")
        inst = klass.__new__(klass, *args)
        new_state = new.load()
        old_state = self._state(oid, old_serial, refs)
        committed_state = self._state(oid, committed_serial, refs, committed_data)
        resolved = inst._p_resolveConflict(old_state, committed_state, new_state)
        out = BytesIO()
        pickler = PersistentPickler(persistent_id, out, _protocol)
        pickler.dump(meta)
        pickler.dump(resolved)
        return out.getvalue()

    def _state(self, oid, serial, refs, data=b""):
        data = data or self.storage.loadSerial(oid, serial)
        u = self._unpickler(data, refs)
        u.load()                 # the class part
        return u.load()
