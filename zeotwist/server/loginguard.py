"""What a password login may cost the server: throttling and a small pool.

A password check is a PBKDF2 of 600,000 rounds (a tenth of a CPU-second or
more), which anyone who can connect can ask for.  :class:`LoginGuard`
bounds that work:

* :class:`LoginThrottle`: failed logins are counted per peer (its IP
  address; every Unix-socket client is one peer) and per user name.  Past
  ``free`` failures, the peer (or the name) must wait before its next login
  is even checked: 1 s, doubling with each further failure, up to a
  maximum; a login during the wait is refused at once, without a check.  A
  successful login clears the name's and the peer's count; counts are
  forgotten ``FORGET`` seconds after the last failure.
* :class:`PasswordChecks`: the checks run in their own thread pool of
  ``threads`` threads (the storage threads and the reactor's pool never
  wait for them), queued per peer and taken from the peers in turn, so one
  peer's flood delays another peer's login by at most ``threads`` checks;
  a queued check whose connection has closed (or whose peer or name has
  meanwhile been throttled) is dropped without being run.

Runs on the reactor thread; the checks in the pool's threads.
"""
from collections import OrderedDict, deque
from math import ceil

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from zeotwist.server.limits import RateLimitedLog

#: failures before a peer / a user name must wait, and the longest wait
PEER_FREE, PEER_MAX_WAIT = 10, 60.0
USER_FREE, USER_MAX_WAIT = 5, 30.0
#: seconds after its last failure that a count is forgotten
FORGET = 900.0
#: password checks at once
CHECK_THREADS = 2


class SessionPassword(UsernamePassword):
    """A password login with what the check pool needs: the peer's key and
    ``wanted()`` (why the check should not run any more, or None)."""
    peer = None

    @staticmethod
    def wanted():
        return None


def peer_key(transport) -> str:
    """What failed logins are counted by: the peer's IP address ("unix"
    for every Unix-socket client)."""
    peer = transport.getPeer() if transport is not None else None
    return getattr(peer, "host", None) or "unix"


class LoginThrottled(UnauthorizedLogin):
    """Refused without a check: too many failed logins from the peer or as the name."""


class _Backoff:
    """Failure counts and waits for one kind of key (peers or names)."""

    def __init__(self, free: int, max_wait: float):
        self.free, self.max_wait = free, max_wait
        self._state: dict = {}          # key -> [failures, last failure, until]

    def wait(self, key, now: float) -> float:
        state = self._state.get(key)
        if state is None:
            return 0.0
        if now - state[1] > FORGET:
            del self._state[key]
            return 0.0
        return max(0.0, state[2] - now)

    def failed(self, key, now: float) -> None:
        state = self._state.setdefault(key, [0, now, now])
        if now - state[1] > FORGET:
            state[0] = 0
        state[0] += 1
        state[1] = now
        over = state[0] - self.free + 1      # the free-th failure: 1 s
        state[2] = now + (min(self.max_wait, 2.0 ** (over - 1)) if over > 0 else 0.0)
        if len(self._state) > 100_000:      # a scan of many names: drop the forgotten
            for k in [k for k, s in self._state.items() if now - s[1] > FORGET]:
                del self._state[k]

    def clear(self, key) -> None:
        self._state.pop(key, None)


class LoginThrottle:
    def __init__(self, clock):
        self.clock = clock
        self.peers = _Backoff(PEER_FREE, PEER_MAX_WAIT)
        self.users = _Backoff(USER_FREE, USER_MAX_WAIT)

    def refusal(self, peer, user) -> str | None:
        """Why a login from ``peer`` as ``user`` may not be checked now, or None."""
        now = self.clock.seconds()
        wait = self.peers.wait(peer, now)
        if wait > 0:
            return "too many failed logins from %s; try again in %d s" % (peer, ceil(wait))
        wait = self.users.wait(user, now)
        if wait > 0:
            return "too many failed logins as %r; try again in %d s" % (user, ceil(wait))
        return None

    def failed(self, peer, user) -> None:
        now = self.clock.seconds()
        self.peers.failed(peer, now)
        self.users.failed(user, now)

    def succeeded(self, peer, user) -> None:
        self.peers.clear(peer)
        self.users.clear(user)


class PasswordChecks:
    """At most ``threads`` password checks at once, fair across peers."""

    def __init__(self, reactor, threads: int = CHECK_THREADS):
        self.reactor = reactor
        self.threads = threads
        self.running = 0
        self._queues: OrderedDict = OrderedDict()     # peer -> deque of jobs
        self._pool = None

    def run(self, peer, wanted, f, *args) -> Deferred:
        """``f(*args)`` in the pool once ``peer``'s turn comes, if ``wanted()``
        still says so then (else the Deferred fails with LoginThrottled)."""
        d = Deferred()
        if peer not in self._queues:          # a peer with nothing queued goes first
            self._queues[peer] = deque()
            self._queues.move_to_end(peer, last=False)
        self._queues[peer].append((d, wanted, f, args))
        self._pump()
        return d

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _pump(self) -> None:
        while self.running < self.threads and self._queues:
            peer, queue = next(iter(self._queues.items()))
            d, wanted, f, args = queue.popleft()
            if queue:
                self._queues.move_to_end(peer)      # the next peer's turn
            else:
                del self._queues[peer]
            why = wanted()
            if why is not None:
                d.errback(LoginThrottled(why))
                continue
            self.running += 1
            done = self._start(f, *args)
            done.addBoth(self._finished)
            done.chainDeferred(d)

    def _prune(self) -> None:
        """Drop every queued check that is no longer wanted (its connection
        closed, or its peer or name throttled by the checks just done)."""
        for peer, queue in list(self._queues.items()):
            keep = deque()
            for job in queue:
                why = job[1]()
                if why is None:
                    keep.append(job)
                else:
                    job[0].errback(LoginThrottled(why))
            if keep:
                self._queues[peer] = keep
            else:
                del self._queues[peer]

    def _start(self, f, *args) -> Deferred:
        if not hasattr(self.reactor, "getThreadPool"):    # a test Clock: run it now
            from twisted.internet.defer import maybeDeferred
            return maybeDeferred(f, *args)
        if self._pool is None:
            self._pool = ThreadPool(0, self.threads, "zeotwist-login")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def _finished(self, result):
        # After the login's own callbacks (which count a failure): then the
        # queue is pruned of what that failure throttled, and the next runs.
        self.running -= 1
        self.reactor.callLater(0, self._advance)
        return result

    def _advance(self) -> None:
        self._prune()
        self._pump()


class LoginGuard:
    """The throttle, the check pool and the failure log of one server."""

    def __init__(self, reactor):
        self.throttle = LoginThrottle(reactor)
        self.checks = PasswordChecks(reactor)
        #: failed logins: a line each, at most 10 per 10 s
        self.log = RateLimitedLog(reactor, interval=10.0, burst=10)
