"""``python -m zeotwist``: the ``zeotwist`` command (status, pack, adduser);
see :mod:`zeotwist.cli` and docs/tools.md."""
import sys

from zeotwist.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
