# twistd -ny tac/zeotwist.tac
# Serves ./data.fs on tcp:8100 (loopback), or what the environment says:
#   ZEOTWIST_CONFIG        a server configuration file, as -C (several storages, TLS, logins)
#   ZEOTWIST_FILE          a FileStorage to serve, as -f (default data.fs without a config)
#   ZEOTWIST_LISTEN        endpoint strings separated by spaces, as -l
#   ZEOTWIST_ADDRESS_FILE  a file that gets the addresses listened on (e.g. with port 0)
#   ZEOTWIST_ARGS          any other options of "twistd zeotwist", as on its command line
# The service is the one "twistd zeotwist" builds from the same options.
import os
import shlex

from twisted.application import service
from twisted.python import usage

from zeotwist.server.tap import Options, makeService

argv = []
for variable, option in (("ZEOTWIST_CONFIG", "-C"), ("ZEOTWIST_FILE", "-f"),
                         ("ZEOTWIST_ADDRESS_FILE", "--address-file")):
    if os.environ.get(variable):
        argv += [option, os.environ[variable]]
for endpoint in os.environ.get("ZEOTWIST_LISTEN", "").split():
    argv += ["-l", endpoint]
argv += shlex.split(os.environ.get("ZEOTWIST_ARGS", ""))

options = Options()
try:
    options.parseOptions(argv)
except usage.UsageError as e:
    raise SystemExit("zeotwist.tac: %s" % e)

application = service.Application("zeotwist")
makeService(options).setServiceParent(application)
