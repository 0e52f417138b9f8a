"""PostgreSQL notifications of commits, for servers over one RelStorage database.

:func:`install_trigger` puts a statement trigger on RelStorage's
``object_state`` table that calls ``pg_notify(CHANNEL)``: PostgreSQL then
notifies every listener once per committed transaction that wrote objects,
whoever committed it (a zeotwist server, a plain RelStorage client).
:class:`Listener` LISTENs on its own psycopg2 connection, which the reactor
watches for input (an ``IReadDescriptor``).  Where the trigger cannot be
installed, the servers NOTIFY after their own commits instead
(:class:`zeotwist.server.relstorage.RelStorageFeed`).

Runs on the reactor thread.
"""
from twisted.logger import Logger

_log = Logger()

CHANNEL = "zeotwist_commits"
_TRIGGER_SQL = (
    "CREATE OR REPLACE FUNCTION zeotwist_notify_commit() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('%s', ''); RETURN NULL; END $$; "
    "CREATE OR REPLACE TRIGGER zeotwist_notify_commit AFTER INSERT OR UPDATE "
    "ON object_state FOR EACH STATEMENT EXECUTE FUNCTION zeotwist_notify_commit()" % CHANNEL)


class Listener:
    """LISTEN on a PostgreSQL connection the reactor watches for input
    (psycopg2; an IReadDescriptor).  ``on_notify()`` runs on the reactor
    thread once per burst of notifications."""

    def __init__(self, reactor, conn, on_notify, trigger: bool = True):
        self.reactor, self.conn, self.on_notify = reactor, conn, on_notify
        #: whether the database notifies every commit (else only ours, by hand)
        self.trigger = trigger
        self.alive = True
        reactor.addReader(self)

    @classmethod
    def start(cls, reactor, root, on_notify, quiet: bool = False):
        """A Listener, or None where the database cannot notify (logged
        unless ``quiet``)."""
        try:
            import psycopg2
            conn = psycopg2.connect(root._adapter.connmanager._dsn,
                                    application_name="zeotwist-listen")
        except Exception as e:
            if not quiet:
                _log.warn("zeotwist: no PostgreSQL notifications ({err}); polling only",
                          err=str(e).strip())
            return None
        trigger = True
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                try:
                    install_trigger(cur)
                except psycopg2.Error as e:
                    trigger = False
                    if not quiet:
                        _log.warn("zeotwist: cannot install the commit trigger ({err}); "
                                  "notifying after this server's own commits, polling "
                                  "for other writers", err=str(e).strip())
                cur.execute("LISTEN %s" % CHANNEL)
        except Exception as e:
            conn.close()
            if not quiet:
                _log.warn("zeotwist: cannot LISTEN ({err}); polling only", err=str(e).strip())
            return None
        return cls(reactor, conn, on_notify, trigger)

    def fileno(self) -> int:
        return self.conn.fileno()

    def logPrefix(self) -> str:
        return "zeotwist-listen"

    def doRead(self):
        try:
            self.conn.poll()
        except Exception as e:
            return e                  # the reactor calls connectionLost
        if self.conn.notifies:
            del self.conn.notifies[:]
            self.on_notify()
        return None

    def connectionLost(self, reason) -> None:
        if self.alive:
            _log.warn("zeotwist: lost the PostgreSQL notification connection; "
                      "polling until it is back")
        self.stop()

    def stop(self) -> None:
        if self.alive:
            self.alive = False
            self.reactor.removeReader(self)
            try:
                self.conn.close()
            except Exception:
                pass


def install_trigger(cursor) -> None:
    """The statement trigger that notifies CHANNEL after each commit that
    writes objects, unless it is there (creating it locks ``object_state``
    briefly; needs the right to create triggers)."""
    cursor.execute("SELECT 1 FROM pg_trigger WHERE tgname = 'zeotwist_notify_commit' "
                   "AND tgrelid = 'object_state'::regclass")
    if cursor.fetchone() is None:
        cursor.execute(_TRIGGER_SQL)
