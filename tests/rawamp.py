"""A raw AMP client for attack tests: boxes built from the command
declarations, written to a plain socket, answers read back as dicts.

Nothing of zeotwist's client runs: what the server gets is exactly what the
test writes.
"""
import socket

from twisted.protocols import amp

from zeotwist.wire import commands as C


class BoxReader:
    """AMP boxes from a raw socket, one at a time (raw bytes in, dicts out)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed in the middle of a box")
            self.buf += chunk

    def box(self) -> dict:
        box, off = {}, 0
        while True:
            self._need(off + 2)
            klen = int.from_bytes(self.buf[off:off + 2], "big")
            off += 2
            if klen == 0:
                del self.buf[:off]
                return box
            self._need(off + klen + 2)
            key = bytes(self.buf[off:off + klen])
            vlen = int.from_bytes(self.buf[off + klen:off + klen + 2], "big")
            off += klen + 2
            self._need(off + vlen)
            box[key], off = bytes(self.buf[off:off + vlen]), off + vlen


class RawClient:
    """One connection; :meth:`ask` returns the answer (or error) box."""

    def __init__(self, address, timeout: float = 20):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.reader = BoxReader(self.sock)
        self._tag = 0

    def box(self, command, ask: bool, **kw) -> bytes:
        box = amp.AmpBox(command.makeArguments(kw, None))
        box[amp.COMMAND] = command.commandName
        if ask:
            self._tag += 1
            box[amp.ASK] = b"%d" % self._tag
        return box.serialize()

    def send(self, command, **kw) -> None:
        """A command without ``_ask`` (TpcBegin, StoreData)."""
        self.sock.sendall(self.box(command, False, **kw))

    def ask(self, command, **kw) -> dict:
        self.sock.sendall(self.box(command, True, **kw))
        tag = b"%d" % self._tag
        while True:
            answer = self.reader.box()          # skips Invalidate boxes
            if answer.get(amp.ANSWER) == tag or answer.get(amp.ERROR) == tag:
                return answer

    def register(self, storage: str, read_only: bool = False) -> dict:
        answer = self.ask(C.Register, protocol=C.PROTOCOL_VERSION, storage=storage,
                          read_only=read_only)
        assert amp.ANSWER in answer, answer
        return answer

    def close(self) -> None:
        self.sock.close()
