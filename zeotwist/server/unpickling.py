"""Unpickling client bytes on the server: only the globals an allow-list
names, and only as much as :class:`Limits` allows.

Every pickle the server reads that a client wrote - the three records of a
conflict resolution, a transaction's extension where a storage wants it as a
dict, a record's class name for an error message - goes through here; no
other unpickler in the server process sees client bytes
(:func:`guard_zodb` replaces the one ZODB uses for ``ConflictError(data=)``).

Bounds, checked before anything is built, by reading the opcodes
(``pickletools.genops``, which runs nothing): the pickle's size, the number
of opcodes (which bounds how many objects and container items it can make,
since each costs at least one opcode) and each string or bytes argument.
The allow-listed callables that could build big things from a small
argument (``bytearray(2**30)``) are replaced by bounded versions.  After
loading, the nesting depth of the result is checked (a deep structure would
make the code that works on it recurse past Python's stack).

Runs in whatever thread calls it (the storage thread, for the server).
"""
import datetime
import sys
from dataclasses import dataclass
from io import BytesIO

import zodbpickle.pickle

from zeotwist.errors import PickleRefused


@dataclass(frozen=True)
class Limits:
    #: bytes of one pickle (a record holds two)
    max_bytes: int = 16 * 2**20
    #: opcodes of one pickle: at least one per object or container item
    max_ops: int = 200_000
    #: bytes of one string, bytes or bytearray the pickle may build
    max_value_bytes: int = 16 * 2**20
    #: nesting of tuples, lists, dicts and sets in the result
    max_depth: int = 200


DEFAULT_LIMITS = Limits()
#: opcodes that need what the server never gives (out-of-band buffers)
_REFUSED_OPS = frozenset(("NEXT_BUFFER", "READONLY_BUFFER"))


def _genops(f):
    """``pickletools.genops``; pickletools (its opcode tables, about 0.5 MB)
    is imported when a server first reads a client's pickle, not at start."""
    import pickletools
    return pickletools.genops(f)


def check_opcodes(data: bytes, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise PickleRefused unless ``data`` (one or more pickles) is within
    ``limits``.  Runs nothing: reads the opcodes only."""
    if len(data) > limits.max_bytes:
        raise PickleRefused("a pickle of %d bytes (the limit is %d)"
                            % (len(data), limits.max_bytes))
    f, ops = BytesIO(data), 0
    try:
        while f.tell() < len(data):
            for op, arg, _ in _genops(f):
                ops += 1
                if ops > limits.max_ops:
                    raise PickleRefused("a pickle of more than %d opcodes" % limits.max_ops)
                if op.name in _REFUSED_OPS:
                    raise PickleRefused("a pickle with out-of-band buffers")
                if isinstance(arg, (bytes, str)) and len(arg) > limits.max_value_bytes:
                    raise PickleRefused("a pickled value of %d bytes" % len(arg))
    except PickleRefused:
        raise
    except Exception as e:       # genops: truncated or unknown opcodes
        raise PickleRefused("not a pickle: %s" % (e,)) from None


def bounded_bytearray(limits: Limits = DEFAULT_LIMITS):
    """``bytearray`` as an allow-listed global, refusing sizes past the limit."""
    def make_bytearray(*args):
        if args and isinstance(args[0], int) and args[0] > limits.max_value_bytes:
            raise PickleRefused("bytearray(%d) in a pickle" % args[0])
        return bytearray(*args)
    return make_bytearray


def check_depth(obj, max_depth: int) -> None:
    """Raise PickleRefused if containers nest deeper than ``max_depth``."""
    seen = set()
    todo = [(obj, 0)]
    while todo:
        o, depth = todo.pop()
        if not isinstance(o, (tuple, list, dict, set, frozenset)) or id(o) in seen:
            continue
        if depth >= max_depth:
            raise PickleRefused("containers nested more than %d deep" % max_depth)
        seen.add(id(o))
        items = o.items() if isinstance(o, dict) else ((x, None) for x in o)
        for k, v in items:
            todo.append((k, depth + 1))
            todo.append((v, depth + 1))


class BoundedUnpickler(zodbpickle.pickle.Unpickler):
    """An unpickler whose globals come from ``find_global`` only (which
    raises for anything not allowed); ``load()`` checks the result's depth.
    Call :func:`check_opcodes` on the whole data first."""

    def __init__(self, data: bytes, find_global, persistent_load=None,
                 limits: Limits = DEFAULT_LIMITS):
        super().__init__(BytesIO(data), encoding="ASCII", errors="bytes")
        self._find_global = find_global
        self._limits = limits
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        return self._find_global(module, name)

    def persistent_load(self, pid):
        raise PickleRefused("a persistent reference where none may be")

    def load(self):
        obj = super().load()
        check_depth(obj, self._limits.max_depth)
        return obj


# -- transaction extensions -------------------------------------------------------

def _extension_globals(limits: Limits) -> dict:
    types = (set, frozenset, complex, datetime.date, datetime.datetime, datetime.time,
             datetime.timedelta, datetime.timezone)
    found = {(t.__module__, t.__name__): t for t in types}
    found[("builtins", "bytearray")] = bounded_bytearray(limits)
    return found


def decode_extension(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict:
    """A transaction's extension (a pickled dict), unpickled within
    ``limits`` with plain data types only; PickleRefused otherwise."""
    if not data:
        return {}
    check_opcodes(data, limits)
    allowed = _extension_globals(limits)

    def find_global(module, name):
        try:
            return allowed[(module, name)]
        except KeyError:
            raise PickleRefused("a transaction extension names %s.%s" % (module, name)) from None

    try:
        ext = BoundedUnpickler(data, find_global, limits=limits).load()
    except PickleRefused:
        raise
    except Exception as e:
        raise PickleRefused("an unreadable transaction extension: %s" % (e,)) from None
    if not isinstance(ext, dict):
        raise PickleRefused("a transaction extension that is not a dict")
    return ext


# -- class names for error messages, without unpickling ---------------------------

_STRINGS = frozenset(("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                      "SHORT_BINSTRING", "BINSTRING", "STRING"))


def pickle_class_name(data: bytes) -> tuple[str, str]:
    """``(module, name)`` of the first global a record's class pickle names,
    or ``('', '')``: what ``ZODB.utils.get_pickle_metadata`` answers, found
    by reading opcodes instead of unpickling."""
    strings = []
    try:
        for n, (op, arg, _) in enumerate(_genops(BytesIO(data))):
            if n > 50:
                break
            if op.name == "GLOBAL":
                module, _, name = arg.partition(" ")
                return module, name
            if op.name in _STRINGS:
                strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return strings[-2], strings[-1]
            elif op.name == "STOP":
                break
    except Exception:
        pass
    if len(strings) >= 2:         # ((module, name), args): ZODB's formats 3 and 4
        return strings[0], strings[1]
    return "", ""


def guard_zodb() -> None:
    """Make ZODB's ``ConflictError(data=...)`` name the record's class
    without unpickling it (MappingStorage raises one for a stale serial;
    ZODB's ``get_pickle_metadata`` would run the record's pickle), and
    RelStorage's history and undo log decode extensions with
    :func:`decode_extension` (they use ZODB's unrestricted ``loads``).

    Called by every StorageServer, with its storage already open: a
    RelStorage's modules are imported by then, and where they are not, no
    RelStorage is served (and a server of a FileStorage does not import them)."""
    import ZODB.utils
    ZODB.utils.get_pickle_metadata = pickle_class_name
    if "relstorage.storage" not in sys.modules:
        return
    import relstorage.storage.history
    relstorage.storage.history.loads = decode_extension
