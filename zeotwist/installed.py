"""The installed version of a distribution, read without ``importlib.metadata``.

The server names its own version and ZODB's and Twisted's in its start-up
line.  ``importlib.metadata`` is the standard way, but importing it brings
``email``'s parser, ``zipfile``, ``csv`` and ``importlib.resources``: about
1 MB of a server's resident memory (docs/performance.md, "Memory"), for one
log line.  :func:`version` reads the same ``Version:`` header from the same
file ``importlib.metadata.version`` would read: the first
``NAME-VERSION.dist-info/METADATA`` or ``NAME.egg-info`` (``PKG-INFO``) in
the directories of ``sys.path``, in order, the name compared as
``importlib.metadata`` compares it, each directory's entries in the order
it lists them; anything else (a zip file on ``sys.path``, metadata without a
``Version:`` line, a finder of distributions other than the standard
``PathFinder``) is left to ``importlib.metadata`` itself.
"""
import os
import re
import sys


def version(name: str, default: str = "?") -> str:
    """Distribution ``name``'s version, ``default`` if it is not installed."""
    found = _read(name)
    if found is not None:
        return found
    from importlib.metadata import PackageNotFoundError, version as metadata_version
    try:
        return metadata_version(name)
    except PackageNotFoundError:
        return default


def _normalized(name: str) -> str:
    """As ``importlib.metadata.Prepared.normalize``."""
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _read(name: str):
    """The version in the first metadata of ``name`` on ``sys.path``, or None
    where that is not a plain directory's ``.dist-info`` or ``.egg-info``."""
    from importlib.machinery import PathFinder
    if any(hasattr(finder, "find_distributions") and finder is not PathFinder
           for finder in sys.meta_path):
        return None
    wanted = _normalized(name)
    for entry in sys.path:
        directory = entry or "."
        if not os.path.isdir(directory):
            if os.path.exists(directory):
                return None         # a zip file: importlib.metadata reads those
            continue
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for child in names:
            stem, dot, suffix = child.lower().rpartition(".")
            if dot and suffix in ("dist-info", "egg-info") and \
                    _normalized(stem.partition("-")[0]) == wanted:
                return _header_version(os.path.join(directory, child))
    return None


def _header_version(path: str):
    """The ``Version:`` header of the metadata at ``path`` (a directory's
    ``METADATA``, else its ``PKG-INFO``; or the file itself), or None."""
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in ("METADATA", "PKG-INFO")]
        path = next((f for f in files if os.path.isfile(f)), files[0])
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break           # the end of the headers
                if line.startswith("Version:"):
                    return line[len("Version:"):].strip() or None
    except (OSError, UnicodeDecodeError):
        pass
    return None
