"""zeotwist.installed: the versions of the start-up line, read without
importlib.metadata, are importlib.metadata's (docs/performance.md, "Memory")."""
from importlib.metadata import version as metadata_version

from zeotwist.installed import version


def test_installed_versions_are_importlib_metadatas():
    for name in ("zeotwist", "ZODB", "Twisted", "zope.interface", "typing-extensions"):
        assert version(name) == metadata_version(name), name
    assert version("no-such-distribution-zeotwist") == "?"
