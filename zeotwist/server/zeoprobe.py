"""The server's side of telling a ZEO client from a zeotwist one.

A mixin of :class:`~zeotwist.server.session.ServerSession`: a connection
that stays silent gets the ZEO announcement :data:`zeotwist.wire.zeo.PROBE`
(:func:`probe_delay` seconds after it connected), and the connection's
first bytes are looked at before AMP parses them: a ZEO frame names a ZEO
client, and the connection is dropped saying so.  The bytes themselves are
read by :mod:`zeotwist.wire.zeo`.

Runs on the reactor thread.
"""
from zeotwist.wire import zeo


def probe_delay(handshake_timeout: float) -> float:
    """Seconds of silence after which a connection gets the ZEO probe: one
    second before the handshake timeout drops it (half of it, if shorter).
    A zeotwist client speaks at once, a ZEO client waits for a ZEO server;
    a peer silent that long is about to be dropped anyway, so the probe's
    bytes cannot upset a client that would otherwise have been served."""
    return max(handshake_timeout / 2, handshake_timeout - 1.0)


class ZeoProbe:
    """The probe timer and the look at the first bytes (see the module)."""

    _probe_timer = None
    _first = b""            # the first bytes, until they show AMP or a ZEO frame

    def _probe_zeo(self):
        self._probe_timer = None
        if not self._heard and self.transport is not None and not self._violated:
            self.emit(zeo.PROBE)

    def _first_bytes(self, data: bytes) -> bytes | None:
        """Look at the connection's first bytes: the data to parse as AMP,
        or None (more bytes needed, or a ZEO frame: the connection is
        dropped, naming a ZEO client)."""
        data = self._first + data
        if len(data) < 2 or zeo.starts_zeo_frame(data) and zeo.first_message(data) is None:
            self._first = data
            return None
        self._first = None
        if not zeo.starts_zeo_frame(data):
            return data
        version = zeo.protocol_version(zeo.first_message(data))
        if version is not None:
            self.protocolViolation(
                "a ZEO client (it answered in ZEO protocol %s): this is a zeotwist server; "
                "point the client at a ZEO server, or use zeotwist's ClientStorage" % version)
        else:
            self.protocolViolation("not a zeotwist client (it sent %r first)" % data[:16])
        return None
