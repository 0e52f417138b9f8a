"""twistd plugin: ``twistd -n zeotwist -f data.fs --listen tcp:8100``.

twistd imports every plugin module to list them, so this one stays tiny:
the server code is imported only when the plugin is used.
"""
from twisted.application.service import ServiceMaker

zeotwist = ServiceMaker(
    "zeotwist",
    "zeotwist.server.tap",
    "Serve ZODB storages (a FileStorage, or those of a -C file) to zeotwist clients over AMP",
    "zeotwist",
)
