"""chatter.py: the ZODB guide's chat, as a Twisted program over zeotwist.

As in the guide, no line of this program does network programming of its
own: a :class:`ChatSession` object in the database holds the messages, and
every participant shares it through the zeotwist server.  What the reactor
adds is that nobody polls: a participant learns of another's message from
the invalidation the server pushes when that message commits.

Run a server, then one chat per terminal::

    twistd -n zeotwist -f /tmp/chat.fs --listen tcp:8100:interface=127.0.0.1
    python docs/examples/chatter.py --server localhost:8100 --name alice
    python docs/examples/chatter.py --server localhost:8100 --name bob

Each line typed on standard input is posted to the channel (``--channel``,
default ``lobby``) in its own transaction, in the order typed.  Standard
output shows the channel as ``NAME: TEXT`` lines: first the history, then
every message of the *other* participants as soon as it is committed.  A
participant's own messages are not echoed back to it (the terminal already
shows what was typed); every other message is shown exactly once per
process.  Messages appear in time order, with one exception: a message
whose commit arrives after a later-stamped one was shown (two people typing
at the same moment) is shown when it arrives rather than never.  End of
input (Ctrl-D) waits until this participant's messages are committed, shows
whatever else arrived meanwhile, and exits.

The data structure (see :class:`ChatSession`):

* ``_messages`` is an ``OOBTree`` keyed by ``(time.time(), author)``.  The
  author breaks ties between two participants posting at the same instant,
  and a key already present is moved forward by the smallest float step,
  so no message overwrites another.  Two participants inserting the very
  same key concurrently get a ``ConflictError`` from the B-tree's conflict
  resolution, and retry with a new time: nothing is lost or doubled.
* Concurrent insertions of different keys are merged by the B-tree's
  conflict resolution on the server; when a bucket splits, the later commit
  gets a ``ConflictError``.  ``add_message`` is therefore called through
  :meth:`zeotwist.DatabasePool.run_in_transaction`, which aborts and runs
  it again (with a fresh time) after a short randomised backoff.
* ``new_messages()`` keeps its cursor in volatile ``_v_`` attributes, which
  are never stored: each ZODB connection has its own cursor.  This program
  gives its pool a single worker thread, so all its transactions use one
  ZODB connection and one cursor.  The session object is never modified
  after it is created, so other participants' commits do not invalidate it
  and its cursor survives.  When the client must drop its whole cache (a
  reconnection after which it cannot tell what changed), ZODB drops every
  object's state, ``_v_`` attributes included: for that case the program
  keeps a copy of the cursor (see ``new_messages``).

Pickling: objects are stored under their class's module name.  Run as a
script, this file is the module ``__main__``, so the script imports its
own classes from the module ``chatter`` (its folder is ``sys.path[0]``) and
every participant stores and loads ``chatter.ChatSession``.  The server
never needs this module: it resolves conflicts in the B-tree's buckets only.
"""
import argparse
import math
import os
import sys
import time

import BTrees.OOBTree
from persistent import Persistent
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

#: new_messages() looks back this many seconds before the newest message it
#: returned, for messages that commit late.  A message stamped earlier than
#: that when it becomes visible (a poster whose clock runs more than this
#: behind, say) is never returned.
LATE = 300.0

#: Where the channels live in the database root.
ROOT_KEY = "chatter"


class ChatSession(Persistent):
    """One chat channel: messages in a B-tree keyed by time."""

    def __init__(self, name):
        self.name = name
        # Internal attribute: _messages holds all the chat messages.
        self._messages = BTrees.OOBTree.OOBTree()

    def add_message(self, message, author=""):
        """Add ``message`` by ``author`` in the current transaction; return its key.

        Commit is the caller's business, and so is retrying on
        ``ConflictError``: run it through ``DatabasePool.run_in_transaction``
        (which retries), or ``transaction.manager.attempts()``.
        """
        now = time.time()
        while (now, author) in self._messages:
            now = math.nextafter(now, math.inf)
        self._messages[now, author] = message
        return now, author

    def new_messages(self, backup=None):
        """The messages not returned yet through this connection, as
        ``(time, author, message)`` tuples in time order.

        The cursor is ``_v_horizon`` (keys older than this are taken as
        final) and ``_v_seen`` (the keys returned since): a message that
        commits late, after a later-stamped one was returned, is still
        returned, once.

        ``_v_`` attributes go when ZODB turns the object into a ghost (as it
        does to every object when the client drops its whole cache).  A
        caller that must not see the history again then passes ``backup``,
        a dict of its own that keeps a copy of the cursor.
        """
        messages = self._messages             # also loads a ghost before _v_ reads
        try:
            seen, horizon = self._v_seen, self._v_horizon
        except AttributeError:
            backup = {} if backup is None else backup
            seen, horizon = backup.get("seen", set()), backup.get("horizon", -math.inf)
        new = []
        for key, message in messages.items(min=(horizon,)):
            if key not in seen:
                seen.add(key)
                new.append((key[0], key[1], message))
        if new:
            horizon = max(horizon, max(t for t, _, _ in new) - LATE)
            seen = {key for key in seen if key[0] >= horizon}
        self._v_seen, self._v_horizon = seen, horizon
        if backup is not None:
            backup.update(seen=seen, horizon=horizon)
        return new


# -- functions run by DatabasePool in its worker thread, as fn(root, ...) -------

def open_session(root, channel):
    """Create the channel's ChatSession (and the folder of channels) if needed."""
    sessions = root.get(ROOT_KEY)
    if sessions is None:
        sessions = root[ROOT_KEY] = BTrees.OOBTree.OOBTree()
    if channel not in sessions:
        sessions[channel] = ChatSession(channel)


def post(root, channel, text, author, tried):
    """Add one message; ``tried(key)`` is told its key before the commit."""
    key = root[ROOT_KEY][channel].add_message(text, author)
    tried(key)
    return key


def read_new(root, channel, backup):
    return root[ROOT_KEY][channel].new_messages(backup)


# -- the Twisted side -------------------------------------------------------------

class Chat:
    """One participant: posts lines in order and shows the others' messages.

    Runs on the reactor thread; ZODB work goes to the pool's one worker.
    """

    def __init__(self, client, pool, channel, name, show):
        self.client = client
        self.pool = pool
        self.channel = channel
        self.name = name
        self.show = show              # show(line: str) writes one output line
        self.failures = 0
        self.done = Deferred()        # fires once input ended and all is shown
        self._mine = set()            # keys of own messages not read back yet
        self._cursor = {}             # the worker's copy of the _v_ cursor
        self._outbox = []             # lines waiting to be posted, in order
        self._posting = False
        self._reading = False
        self._read_again = False
        self._eof = False
        self._final_read = False
        self._subscription = None

    def start(self):
        # Subscribe before the first read, so that no commit falls in between.
        self._subscription = self.client.events.subscribe(self._committed)
        self._read()

    def _committed(self, event):
        # Another process committed something, or, after a reconnection,
        # commits were made while this client was away (event.reset: it had
        # to drop its cache).  Look at the channel.
        if not event.local:
            self._read()

    # -- posting: one transaction per line, one at a time, in input order
    def say(self, text):
        self._outbox.append(text)
        self._post_next()

    def _post_next(self):
        if self._posting:
            return
        if not self._outbox:
            self._maybe_done()
            return
        self._posting = True
        text = self._outbox.pop(0)
        attempts = []

        def tried(key):               # worker thread, before each commit:
            attempts.append(key)      # so a read can never see an own message
            self._mine.add(key)       # that is not marked as own yet

        def posted(key):
            for other in attempts[:-1]:   # attempts that did not commit
                self._mine.discard(other)

        def failed(failure):
            for other in attempts:
                self._mine.discard(other)
            self.failures += 1
            self._error("could not post %r: %s" % (text, failure.getErrorMessage()))

        def next_one(_):
            self._posting = False
            self._post_next()

        d = self.pool.run_in_transaction(post, self.channel, text, self.name, tried)
        d.addCallbacks(posted, failed).addBoth(next_one)

    # -- reading: after each commit of another process; at most one read queued
    def _read(self):
        if self._reading:
            self._read_again = True   # it may have started before this commit
            return
        self._reading = True
        d = self.pool.run_read_only(read_new, self.channel, self._cursor)
        d.addCallbacks(self._show, self._read_failed).addBoth(self._read_done)

    def _show(self, messages):
        for when, author, text in messages:
            if (when, author) in self._mine:
                self._mine.discard((when, author))
            else:
                self.show("%s: %s" % (author, text))

    def _read_failed(self, failure):
        self.failures += 1
        self._error("could not read the channel: %s" % failure.getErrorMessage())

    def _read_done(self, _):
        self._reading = False
        if self._read_again:
            self._read_again = False
            self._read()
        else:
            self._maybe_done()

    # -- the end: own posts committed, then one last read, then done
    def end_of_input(self):
        self._eof = True
        self._maybe_done()

    def _maybe_done(self):
        if not self._eof or self._posting or self._outbox or self.done.called:
            return
        if not self._final_read:
            self._final_read = True   # started after our last commit finished
            self._read()
        elif not self._reading:
            if self._subscription is not None:
                self._subscription.cancel()
            self.done.callback(self.failures)

    def _error(self, message):
        sys.stderr.write("chatter: %s\n" % message)
        sys.stderr.flush()


@implementer(IHalfCloseableProtocol)
class Terminal(LineReceiver):
    """Standard input and output of a :class:`Chat`: a line in is a post,
    a line out is a message.  ``closed`` fires once output is flushed."""

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self, chat):
        self.chat = chat
        self.closed = Deferred()

    def lineReceived(self, line):
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text:
            self.chat.say(text)

    def readConnectionLost(self):          # end of input
        if self._buffer:                   # a last line without a newline
            self.lineReceived(self._buffer)
            self._buffer = b""
        self.chat.end_of_input()

    def writeConnectionLost(self):         # nobody reads our output any more
        self.chat.end_of_input()

    def connectionLost(self, reason):
        self.chat.end_of_input()
        self.closed.callback(None)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Chat through a zeotwist server: post stdin's lines, "
                    "print the other participants' messages.")
    parser.add_argument("--server", required=True,
                        help="the server: HOST:PORT, a Unix socket path or a Twisted endpoint")
    parser.add_argument("--name", required=True, help="your name in the channel")
    parser.add_argument("--channel", default="lobby", help="the channel (default: lobby)")
    parser.add_argument("--storage", default="1", help="the storage's name on the server")
    parser.add_argument("--wait-timeout", type=float, default=30.0,
                        help="seconds to wait for the server (default: 30)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log zeotwist's progress")
    return parser.parse_args(argv)


async def open_db(reactor, client, attempts=10):
    """``client.open_db()``, tried again after a transient error.

    ``ZODB.DB`` creates the root object of an empty database.  Processes
    that start together on an empty database race to create it: the losers
    get a ``ConflictError``, or a ``ReadConflictError`` when they see the
    root before the invalidation of the commit that created it.  Both mean:
    try again a moment later.
    """
    from transaction.interfaces import TransientError
    from twisted.internet.task import deferLater
    for attempt in range(attempts):
        try:
            return await client.open_db()
        except TransientError:
            if attempt == attempts - 1:
                raise
            await deferLater(reactor, 0.05 * (attempt + 1), lambda: None)


async def run(reactor, args):
    """Connect, open the channel, chat until input ends; the exit code.

    Stopping the reactor (Ctrl-C, SIGTERM) ends the input too: the reactor's
    shutdown waits until what was typed is posted and everything is closed.
    """
    from twisted.internet.stdio import StandardIO
    from twisted.internet.threads import deferToThread
    from ZODB.POSException import StorageError
    import zeotwist

    try:
        client = await zeotwist.connect(reactor, args.server, args.storage,
                                        wait_timeout=args.wait_timeout)
    except (zeotwist.ClientDisconnected, ValueError, StorageError) as e:
        sys.stderr.write("chatter: cannot connect to %s: %s\n" % (args.server, e))
        return 1
    chat = None
    closed = Deferred()           # fires once everything below is closed
    stopping = []

    def shutting_down():
        stopping.append(True)
        if chat is not None:
            chat.end_of_input()
        return closed

    trigger = reactor.addSystemEventTrigger("before", "shutdown", shutting_down)
    try:
        db = await open_db(reactor, client)
        # One worker thread, hence one ZODB connection and one _v_ cursor.
        # Posts conflict when a bucket splits: retry them patiently.
        pool = zeotwist.DatabasePool(db, reactor, min_threads=1, max_threads=1,
                                     retries=20, backoff=0.01, max_backoff=0.5)
        try:
            await pool.run_in_transaction(open_session, args.channel)
            if stopping:
                return 1
            terminal = None
            chat = Chat(client, pool, args.channel, args.name,
                        lambda line: terminal.sendLine(line.encode("utf-8")))
            terminal = Terminal(chat)
            StandardIO(terminal, reactor=reactor)
            chat.start()
            if args.verbose or sys.stdin.isatty():
                sys.stderr.write("chatter: %s joined channel %r on %s; end with Ctrl-D\n"
                                 % (args.name, args.channel, args.server))
                sys.stderr.flush()
            failures = await chat.done
            terminal.transport.loseConnection()      # flushes stdout first
            await terminal.closed
            return 1 if failures else 0
        finally:
            pool.close()
            await deferToThread(db.close)
    finally:
        await client.stop()
        if not stopping:          # (a trigger being fired is no longer registered)
            reactor.removeSystemEventTrigger(trigger)
        closed.callback(None)


def main(argv=None):
    from twisted.internet import defer, task
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = LogLevel.info if args.verbose else LogLevel.warn
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr),
                              [LogLevelFilterPredicate(defaultLogLevel=level)])],
        redirectStandardIO=False)

    async def chatting(reactor):
        code = await run(reactor, args)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.ensureDeferred(chatting(reactor)))


if __name__ == "__main__":
    # Use the classes of the module "chatter", not of "__main__", so that
    # every participant pickles chatter.ChatSession (see the module doc).
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from chatter import main as chatter_main
    chatter_main()
