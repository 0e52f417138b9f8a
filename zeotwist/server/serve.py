"""``zeotwist serve`` (also ``python -m zeotwist serve``): the server in the
foreground, without twistd.

The same server, options and configuration file as ``twistd -n zeotwist``
(:mod:`zeotwist.server.tap`), started the way ``runzeo`` starts ZEO's: log
lines on standard output, SIGTERM or SIGINT stops it (status 0), a server
that cannot start says why in one line on standard error (status 1).  What
it leaves out is twistd's own: daemonizing, ``--logfile`` and log rotation,
``--pidfile`` (the server's ``--pid-filename`` works), ``-u``/``-g``,
``--umask``, ``--reactor``, profiling; use twistd for those.

Why a second start: twistd's machinery is about 1.7 MB of a server's
resident memory (docs/performance.md, "Memory").  ``twisted.application.app``
imports ``pdb`` and what it needs, and twistd's plugin scan unpickles
Twisted's ``dropin.cache``, which imports the interface modules of every
Twisted plugin (``twisted.trial.itrial`` with ``unittest``, ``argparse``,
``difflib``; ``twisted.words``, ``twisted.cred.strcred``) before it finds
``zeotwist``.  Here the tap module is imported directly.
"""
import sys


def main(argv: list) -> int:
    """Parse ``argv`` (the server's options), serve until stopped; the exit status."""
    from zeotwist.server.footprint import import_tap
    tap = import_tap()          # first: Twisted without pyOpenSSL, unused modules lazy
    from twisted.python import usage

    from zeotwist.errors import StartupFailed
    options = tap.Options()
    options.synopsis = "Usage: zeotwist serve [options]"
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write("zeotwist serve: %s\n" % e)
        return 1
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    server = tap.makeService(options)
    try:
        server.privilegedStartService()     # as twistd: listens
        server.startService()
    except StartupFailed:                   # said on stderr and in the log
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()
    return 0
