"""SIGTERM and SIGINT stop a server process: handlers that only take note.

Twisted's own handlers (``ReactorBase.sigTerm``, ``sigInt``, ``sigBreak``)
log ``Received SIGTERM, shutting down.`` from inside the Python signal
handler, which runs on the main thread between any two bytecodes of
whatever it was doing, the reactor's own logging included.  twistd's log
file (``twisted.python.logfile.LogFile``) writes under
``twisted.python.threadable``'s ``XLock``, a pure-Python ``RLock``: a
signal landing between its inner lock's acquire and the owner being set
makes the handler's write wait for a lock its own thread holds, forever.
A server stopped by its operator (systemd, ``docker stop``, ``kill``)
could hang instead of exiting.  Standard output (``zeotwist serve``) and
Python logging's streams (a ``zeo.conf`` ``<eventlog>``) are not safe to
write from a handler either (``reentrant call inside BufferedWriter``).

So a server process (``twistd zeotwist``, the .tac file, ``zeotwist
serve``, a ServerService in one's own .tac file: its
``privilegedStartService``) installs :meth:`SignalStop.noted` instead,
once the reactor runs: it only appends the stop to the reactor's call queue and writes one
byte to its waker pipe (``callFromThread``: no lock, no log).  The rest is
:meth:`SignalStop.stop`, on the reactor thread: the same log line through
the same logger, the signal recorded as twistd expects (SIGTERM is then a
status-0 exit: :meth:`ServerService.stopService`), and the reactor stopped.
A second signal while the stop goes on is logged and changes nothing
(SIGKILL ends a stop that does not end); once the reactor has stopped,
signals are ignored while the process exits.  When the service is the
process, a SIGTERM before the reactor runs is queued the same way and
stops it as soon as it runs.
"""
import signal
import threading

from twisted.internet.error import ReactorNotRunning

from zeotwist.twistedcompat import reactor_logger, reactor_signal_handlers, set_exit_signal


class SignalStop:
    """Stops ``reactor`` on SIGTERM, SIGINT (and SIGBREAK), from its own thread."""

    def __init__(self, reactor):
        self.reactor = reactor
        #: the signal that started the stop, once the reactor thread has it
        self.received: int | None = None

    @classmethod
    def install(cls, reactor, early: bool = True) -> "SignalStop":
        """SIGTERM asks for a stop from now on (``early``: before the reactor
        runs, it stops it once it runs); once the reactor runs, :meth:`replace` its
        handlers: in the same "during startup" step in which it installs
        them, right after (no log line is written in between), rather than
        with ``callWhenRunning`` (after the other triggers, which may log)."""
        stop = cls(reactor)
        reactor.addSystemEventTrigger("after", "shutdown", stop.ignore_late)
        if getattr(reactor, "running", False):
            stop.replace()
            return stop
        if early and _on_main_thread():
            signal.signal(signal.SIGTERM, stop.noted)
        reactor.addSystemEventTrigger("during", "startup", stop.replace)
        return stop

    def replace(self) -> None:
        """Put :meth:`noted` where the reactor installed its own handlers
        (it leaves SIGINT alone when someone else handles it: twistd's
        ``--debug``, a debugger); nothing if it installed none."""
        if not _on_main_thread():
            return                  # a reactor in a thread of its own handles no signals
        for signum, own in reactor_signal_handlers(self.reactor).items():
            if signal.getsignal(signum) in (own, self.noted):
                signal.signal(signum, self.noted)

    def ignore_late(self) -> None:
        """Once the reactor has stopped, the process is on its way out
        (twistd then removes its pid file): later signals are ignored, so
        the exit status stays what the first made it (Python puts the
        default action back for its own handlers as it finalizes: a late
        SIGTERM would kill the process instead)."""
        if _on_main_thread():
            for signum in reactor_signal_handlers(self.reactor):
                if signal.getsignal(signum) == self.noted:
                    signal.signal(signum, signal.SIG_IGN)

    def noted(self, signum: int, frame) -> None:
        """The signal handler: queues :meth:`stop` for the reactor thread
        and wakes it (a list append and a one-byte write: no lock taken,
        nothing logged)."""
        try:
            self.reactor.callFromThread(self.stop, signum)
        except Exception:           # never into the code the signal interrupted
            pass                    # (the waker's pipe is gone: the reactor has ended)

    def stop(self, signum: int) -> None:
        """On the reactor thread: log the signal, record it, stop the reactor."""
        log = reactor_logger()
        name = signal.Signals(signum).name
        if self.received is not None:
            log.info("Received {signal} again; already shutting down.", signal=name)
            return
        self.received = signum
        log.info("Received {signal}, shutting down.", signal=name)
        set_exit_signal(self.reactor, signum)
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass                    # already stopping (a failure stopped it)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
