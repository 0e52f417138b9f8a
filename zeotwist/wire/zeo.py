"""Telling a ZEO peer from a zeotwist one by its first bytes.

ZEO (5 and 6) frames every message with a 4-byte big-endian length.  Its
server speaks first: it announces its protocol (``Z5``: pickles, ``M5``:
msgpack).  Its client says nothing until it hears that announcement, then
answers with the protocol it will use (``Z5``) and registers.  A zeotwist
peer's first bytes are an AMP box, whose first key length is 1 to 255:
``b"\\0"`` then not ``b"\\0"``; a ZEO frame starts ``b"\\0\\0"``.

So a zeotwist client recognises a ZEO server at once (``describe_greeting``
in :mod:`zeotwist.client.protocol`), and a zeotwist server recognises a ZEO
client once it has made it talk: a connection that stays silent (a
zeotwist client sends its first command as soon as it connects)
gets :data:`PROBE` shortly before its handshake timeout, a ZEO announcement that ZEO clients accept
(``min(b"5 zeotwist", b"5")`` is their ``b"5"``) and zeotwist clients
recognise and skip; a ZEO client answers it with a ZEO frame.

Pure functions of bytes; used on the reactor thread.
"""

#: the protocol a zeotwist server announces to a silent connection
PROBE_VERSION = b"Z5 zeotwist"
#: :data:`PROBE_VERSION` framed as ZEO frames its messages
PROBE = len(PROBE_VERSION).to_bytes(4, "big") + PROBE_VERSION
#: the longest protocol announcement looked at
MAX_ANNOUNCEMENT = 16


def starts_zeo_frame(data: bytes) -> bool:
    """``data`` (at least 2 bytes) starts a ZEO frame, not an AMP box."""
    return data[:2] == b"\0\0"


def first_message(data: bytes) -> bytes | None:
    """The first framed message of ``data`` (cut at :data:`MAX_ANNOUNCEMENT`
    bytes), or None while more bytes are needed to have it."""
    if len(data) < 4:
        return None
    size = min(int.from_bytes(data[:4], "big"), MAX_ANNOUNCEMENT)
    return data[4:4 + size] if len(data) >= 4 + size else None


def protocol_version(message: bytes) -> str | None:
    """``"Z5"``, ``"M5"``, ``"Z3101"``... if ``message`` is a ZEO protocol
    announcement, else None."""
    if 2 <= len(message) <= MAX_ANNOUNCEMENT and message[:1] in (b"M", b"Z") \
            and message[1:].isdigit():
        return message.decode("ascii")
    return None
