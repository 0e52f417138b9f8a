# twistd -ny tac/zeotwist.tac
# Serves ./data.fs on tcp:8100 (loopback). Set ZEOTWIST_FILE / ZEOTWIST_LISTEN to change.
import os

from twisted.application import service

from zeotwist.server.tap import DEFAULT_LISTEN, ServerService

application = service.Application("zeotwist")
ServerService(
    os.environ.get("ZEOTWIST_FILE", "data.fs"),
    os.environ.get("ZEOTWIST_LISTEN", DEFAULT_LISTEN).split(),
).setServiceParent(application)
