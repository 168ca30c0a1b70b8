"""Reading and writing portal frames on a stream socket.

`FrameReader(sock_or_recv).read()` returns the next `Frame(header, payload)`,
or None when the peer closed the stream cleanly between frames.  It reads
exactly the 32-byte header, checks it with `decode_header`, and only then
reads `length` payload bytes into a buffer of that size, so a hostile length
never causes an allocation beyond MAX_PAYLOAD (nor beyond the op's own maximum).

What it raises:

* a fatal `PortalError` (bad magic, length > MAX_PAYLOAD) *before* reading the
  payload: the stream cannot be resynchronised.  The core answers with that
  error (TOO_BIG/MALFORMED), closes this connection and keeps the VM running;
  the host may reconnect and HELLO again.  Every later `read()` raises again.
* `TruncatedFrame` (fatal, MALFORMED) when the stream ends inside a frame.
* a non-fatal `PortalError` (version, kind, flags, op, per-op size, cap on
  HELLO): the payload has been read and discarded (in 64 KiB pieces), the
  stream is still in sync; answer with `e.status` for `e.seq`/`e.op` and
  read on.
* `OSError` from the socket, unchanged.  `InterruptedError` is retried; a
  timeout (`TimeoutError`, `BlockingIOError`) leaves the reader's state
  intact, so calling `read()` again resumes the same frame.

Writing frames is the host's business (`portal_client.FrameSender`); the core
sends whole frames with `sendall` under its own lock.
"""
from __future__ import annotations

import struct
from typing import Callable, NamedTuple, Protocol

from .portal import HEADER_SIZE, Header, decode_header
from .portal_schema import PortalError, Status

_LENGTH_OFFSET = 12
_LENGTH = struct.Struct("<I")
_DRAIN_CHUNK = 64 * 1024


class Frame(NamedTuple):
    header: Header
    payload: bytes


class TruncatedFrame(PortalError):
    """The stream ended inside a frame."""

    def __init__(self, where: str, got: int, want: int):
        super().__init__(Status.MALFORMED, f"stream ended in the {where} after {got} of {want} "
                         f"bytes", fatal=True)


class _RecvInto(Protocol):
    def recv_into(self, buffer: memoryview, nbytes: int = ..., /) -> int: ...


class FrameReader:
    """Incremental frame reader over a socket or a `recv(n) -> bytes` callable."""

    def __init__(self, source: _RecvInto | Callable[[int], bytes]):
        if hasattr(source, "recv_into"):
            self._recv_into: Callable[[memoryview], int] | None = source.recv_into  # type: ignore[union-attr]
            self._recv: Callable[[int], bytes] | None = None
        elif callable(source):
            self._recv_into, self._recv = None, source
        else:
            raise TypeError("FrameReader needs a socket or a recv(n) callable")
        self._broken: PortalError | None = None
        self._reset()

    def _reset(self) -> None:
        self._head = bytearray(HEADER_SIZE)
        self._head_got = 0
        self._header: Header | None = None
        self._error: PortalError | None = None   # non-fatal: drain, then raise
        self._body = bytearray()
        self._body_got = 0
        self._want = 0

    def _fill(self, view: memoryview) -> int:
        """Receive into `view` (non-empty); 0 means EOF."""
        while True:
            try:
                if self._recv_into is not None:
                    n = self._recv_into(view)
                else:
                    data = self._recv(len(view))  # type: ignore[misc]
                    n = len(data)
                    if n > len(view):
                        raise ValueError(f"recv returned {n} bytes, asked for {len(view)}")
                    view[:n] = data
                return n
            except InterruptedError:
                continue

    def _fail(self, error: PortalError) -> PortalError:
        self._broken = error
        return error

    def read(self) -> Frame | None:
        """The next frame, or None on a clean EOF between frames."""
        if self._broken is not None:
            raise PortalError(self._broken.status, f"stream already broken: {self._broken.message}",
                              fatal=True)
        while self._head_got < HEADER_SIZE:
            n = self._fill(memoryview(self._head)[self._head_got:])
            if n == 0:
                if self._head_got == 0:
                    return None
                raise self._fail(TruncatedFrame("header", self._head_got, HEADER_SIZE))
            self._head_got += n
        if self._header is None and self._error is None:
            try:
                self._header = decode_header(self._head)
                self._body = bytearray(self._header.length)   # bounded by decode_header
            except PortalError as e:
                if e.fatal:
                    raise self._fail(e) from None
                self._error = e                              # length <= MAX_PAYLOAD here
                self._body = bytearray(min(_DRAIN_CHUNK, _LENGTH.unpack_from(self._head,
                                                                            _LENGTH_OFFSET)[0]))
            self._want = _LENGTH.unpack_from(self._head, _LENGTH_OFFSET)[0]
            self._body_got = 0
        while self._body_got < self._want:
            if self._error is None:
                view = memoryview(self._body)[self._body_got:]
            else:                                   # discard into the fixed-size scratch buffer
                view = memoryview(self._body)[:min(len(self._body), self._want - self._body_got)]
            n = self._fill(view)
            if n == 0:
                raise self._fail(TruncatedFrame("payload", self._body_got, self._want))
            self._body_got += n
        header, body, error = self._header, self._body, self._error
        self._reset()
        if error is not None:
            raise error
        return Frame(header, bytes(body))  # type: ignore[arg-type]
