# twistd -ny tac/zeotwist.tac
# Serves ./data.fs on tcp:8100 (loopback). Set ZEOTWIST_FILE / ZEOTWIST_LISTEN to change;
# ZEOTWIST_ADDRESS_FILE names a file that gets the addresses listened on (e.g. with port 0).
import os

from twisted.application import service

from zeotwist.server.tap import DEFAULT_LISTEN, ServerService

application = service.Application("zeotwist")
ServerService(
    os.environ.get("ZEOTWIST_FILE", "data.fs"),
    os.environ.get("ZEOTWIST_LISTEN", DEFAULT_LISTEN).split(),
    address_file=os.environ.get("ZEOTWIST_ADDRESS_FILE") or None,
    stop_reactor_on_failure=True,
).setServiceParent(application)
