"""twistd plugin: ``twistd -n zeotwist -f data.fs --listen tcp:8100``.

twistd imports every plugin module to list them, so this one stays tiny:
the server code is imported only when the plugin is used, and then without
pyOpenSSL unless the server uses TLS (:mod:`zeotwist.server.footprint`).
"""
from twisted.application.service import ServiceMaker


class _ServiceMaker(ServiceMaker):
    """Imports :mod:`zeotwist.server.tap` through :mod:`zeotwist.server.footprint`."""

    @property
    def options(self):
        from zeotwist.server.footprint import import_tap
        return import_tap().Options


zeotwist = _ServiceMaker(
    "zeotwist",
    "zeotwist.server.tap",
    "Serve ZODB storages (a FileStorage, or those of a -C file) to zeotwist clients over AMP",
    "zeotwist",
)
