"""The host side of the portal: a blocking client for the daemon and the CLI.

    client = PortalClient(sock, on_event=handle)   # takes ownership of sock
    client.hello()                                 # stores the vm token
    client.call(Op.CONFIGURE, memory_mib=64, vcpus=1, entry=EntryMode.PVH,
                flags=0, cmdline="")               # -> reply fields (a dict)

A reader thread owns the receiving side: replies are matched to waiting
calls by `seq`, events go to `on_event(message)` (called on the reader thread;
it must not call `call()`, which would wait for itself) or, without a
callback, into the bounded queue `client.events` (the oldest are dropped
and counted in `dropped_events` when nobody drains it).  Calls may come from
several threads; sends are serialised by a `FrameSender`.

A non-OK reply raises `PortalRefused(status, message)`; no reply within the
timeout raises `PortalTimeout` (the late reply, if any, is dropped); a
closed or broken portal raises `PortalClosed` in every waiting and later
call.  The host does not trust what it reads either: replies and events go
through `decode_response`, and a malformed one fails only the call it answers.

This module is host code that happens to live next to the codec, with the
host's half of it (`encode_request`, `decode_response`, `decode_frame`,
`FrameSender`); the core never imports it.
"""
from __future__ import annotations

import array
import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .portal import (HEADER_SIZE, REPLY_PREFIX, TOKEN_SIZE, VERSION, ZERO_CAP, EncodeError, Header, Kind,
                     Message, Op, OPS, Status, _check_header, _frame, _run_check, _spec, _u, decode_fields_of,
                     decode_header, decode_payload, encode_fields, op_name)
from .portal_io import FrameReader
from .portal_schema import PortalError, decode_some, expect_end

DEFAULT_TIMEOUT = 30.0
_RESERVED = ("status", "message")


def encode_request(op: int, seq: int, cap: bytes | None, **fields: Any) -> bytes:
    """A host -> core request; `cap` None means all zeros (HELLO)."""
    spec = _spec(op, Kind.REQUEST)
    _u(seq, 32, "seq")
    cap = ZERO_CAP if cap is None else cap
    if not isinstance(cap, (bytes, bytearray)) or len(cap) != TOKEN_SIZE:
        raise EncodeError(f"cap must be {TOKEN_SIZE} bytes")
    if spec.cap is None and any(cap):
        raise EncodeError(f"{spec.name} must carry a zero capability")
    payload = encode_fields(spec.fields, fields)
    _run_check(spec.check, fields)
    return _frame(Kind.REQUEST, spec.number, seq, bytes(cap), payload)


def decode_response(header: Header, payload: bytes | bytearray | memoryview) -> Message:
    """Host side: decode a REPLY or EVENT payload (a REQUEST is refused with BAD_KIND)."""
    if header.kind == Kind.REQUEST:
        raise PortalError(Status.BAD_KIND, "the host accepts only replies and events",
                          seq=header.seq, op=header.op)
    if header.kind == Kind.EVENT:
        return decode_fields_of(header, payload)
    try:
        _check_header(header.kind, header.op, header.flags, header.seq, header.length,
                      header.cap, header.version)
        if len(payload) != header.length:
            raise PortalError(Status.MALFORMED,
                              f"payload of {len(payload)} bytes, header says {header.length}")
        mv = memoryview(payload).cast("B")
        fields: dict[str, Any] = {}
        pos = decode_some(REPLY_PREFIX, mv, 0, fields)
        if fields["status"] is Status.OK:
            spec = OPS.get(header.op)
            if spec is None:
                raise PortalError(Status.UNKNOWN_OP, f"OK reply to unknown op {header.op:#x}")
            pos = decode_some(spec.reply, mv, pos, fields)
            if header.op == Op.HELLO and not any(fields["vm_token"]):
                raise PortalError(Status.MALFORMED, "HELLO reply carries an all-zero vm_token")
        expect_end(mv, pos)
        return Message(header, fields)
    except PortalError as e:
        e.seq, e.op = header.seq, header.op
        raise


def decode_frame(data: bytes | bytearray | memoryview, *, core_side: bool = True) -> Message:
    """Decode one whole frame held in memory (tests, fuzzing, small tools)."""
    header = decode_header(memoryview(data)[:HEADER_SIZE])
    payload = memoryview(data)[HEADER_SIZE:]
    return (decode_payload if core_side else decode_response)(header, payload)


def send_frame(sock, frame: bytes, fds: tuple[int, ...] = ()) -> None:
    """Write one whole frame (sendall retries EINTR and short writes).

    With `fds`, the first sendmsg carries them (SCM_RIGHTS), so they arrive with the
    frame's first byte; the rest of the frame follows as plain bytes."""
    if fds:
        sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", fds).tobytes())])
        frame = frame[sent:]
    if frame:
        sock.sendall(frame)


class FrameSender:
    """Serialised, all-or-nothing frame writes shared by several threads.

    Once a send failed part-way it refuses every later one: a half-written
    frame has already broken the stream.
    """

    def __init__(self, sock):
        self._sock = sock
        self._lock = threading.Lock()
        self._broken: BaseException | None = None

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def send(self, frame: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send `frame` whole; raises BrokenPipeError once any send failed part-way."""
        with self._lock:
            if self._broken is not None:
                raise BrokenPipeError(f"portal stream broken by an earlier failed send: "
                                      f"{self._broken}")
            try:
                send_frame(self._sock, frame, fds)
            except BaseException as e:
                self._broken = e
                raise


class PortalRefused(Exception):
    """The core answered with a non-OK status."""

    def __init__(self, status: Status | int, message: str, op: int = 0):
        self.status = Status(status)
        self.message = message
        self.op = op
        super().__init__(f"{op_name(op)} refused: {self.status.name}: {message}")


class PortalClosed(ConnectionError):
    """The portal connection is gone (EOF, socket error, broken stream, or close())."""


class PortalTimeout(TimeoutError):
    """No reply arrived in time."""


@dataclass
class _Pending:
    op: int
    done: threading.Event = field(default_factory=threading.Event)
    reply: Message | None = None
    error: BaseException | None = None


class PortalClient:
    def __init__(self, sock: socket.socket, *, on_event: Callable[[Message], None] | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, event_queue_size: int = 4096):
        self._sock = sock
        self._sender = FrameSender(sock)
        self._reader = FrameReader(sock)
        self._on_event = on_event
        self.events: queue.Queue[Message] = queue.Queue(maxsize=event_queue_size)
        self.dropped_events = 0
        self.bad_frames = 0          # malformed frames from the core that matched no call
        self.callback_errors = 0     # exceptions raised by on_event (swallowed)
        self.timeout = timeout
        self.token: bytes | None = None
        self.core_version: int | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_seq = 1
        self._closed: str | None = None
        self._thread = threading.Thread(target=self._read_loop, name="portal-client", daemon=True)
        self._thread.start()

    # ---- calls -------------------------------------------------------------------------
    def hello(self, host_version: int = VERSION, *, timeout: float | None = None) -> dict[str, Any]:
        """Attach: the core hands out a fresh vm token (revoking any earlier one)."""
        reply = self.call(Op.HELLO, timeout=timeout, host_version=host_version)
        self.token = reply["vm_token"]
        self.core_version = reply["core_version"]
        return reply

    def attach(self, kind: int, index: int, fd: int, *, timeout: float | None = None) -> None:
        """ATTACH: hand the core `fd` for `kind` (AttachKind) number `index`.  The core
        gets its own copy; the caller may close `fd` once this returns."""
        self.call(Op.ATTACH, timeout=timeout, fds=(fd,), kind=kind, index=index)

    def call(self, op: int, *, timeout: float | None = None, cap: bytes | None = None,
             fds: tuple[int, ...] = (), **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its reply; return the reply's op fields.
        `fds` go with the frame (SCM_RIGHTS): only ATTACH takes one."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("PortalClient.call from the event callback would deadlock")
        spec = OPS.get(op)
        if spec is None or spec.kind is not Kind.REQUEST:
            raise ValueError(f"{op_name(op)} is not a request op")
        if cap is None:
            if spec.cap is None:
                cap = ZERO_CAP
            elif self.token is None:
                raise RuntimeError(f"{spec.name} needs a capability: call hello() first")
            else:
                cap = self.token
        pending = _Pending(spec.number)
        with self._lock:
            if self._closed is not None:
                raise PortalClosed(self._closed)
            seq = self._allocate_seq()
            frame = encode_request(spec.number, seq, cap, **fields)
            self._pending[seq] = pending
        try:
            self._sender.send(frame, fds)
        except OSError as e:
            self._forget(seq)
            self._shutdown(f"send failed: {e}")
            raise PortalClosed(f"portal send failed: {e}") from e
        wait = self.timeout if timeout is None else timeout
        if not pending.done.wait(wait):
            self._forget(seq)
            if not pending.done.is_set():       # the reply may have raced the timeout
                raise PortalTimeout(f"no reply to {spec.name} (seq {seq}) within {wait} s")
        if pending.error is not None:
            raise pending.error
        reply = pending.reply
        if reply is None or reply.op != spec.number:
            raise PortalError(Status.MALFORMED, f"reply to seq {seq} names "
                              f"{op_name(reply.op) if reply else 'nothing'}, not {spec.name}")
        status = reply.fields["status"]
        if status is not Status.OK:
            raise PortalRefused(status, reply.fields["message"], spec.number)
        return {k: v for k, v in reply.fields.items() if k not in _RESERVED}

    def _allocate_seq(self) -> int:
        # Called under self._lock: the next u32 that is neither 0 nor still waiting.
        while True:
            seq = self._next_seq
            self._next_seq = seq + 1 if seq < 0xFFFF_FFFF else 1
            if seq not in self._pending:
                return seq

    def _forget(self, seq: int) -> None:
        with self._lock:
            self._pending.pop(seq, None)

    # ---- the reader thread --------------------------------------------------------------
    def _read_loop(self) -> None:
        reason = "the core closed the portal"
        while True:
            try:
                frame = self._reader.read()
            except (TimeoutError, BlockingIOError):
                if self._closed is not None:
                    break
                continue                        # the reader resumes the same frame
            except PortalError as e:
                if e.fatal:
                    reason = f"unreadable stream from the core: {e}"
                    break
                self._fail_call(e.seq, e)
                continue
            except OSError as e:
                reason = f"portal read failed: {e}"
                break
            if frame is None:
                break
            try:
                msg = decode_response(*frame)
            except PortalError as e:
                self._fail_call(frame.header.seq, e)
                continue
            if msg.kind is Kind.EVENT:
                self._deliver(msg)
            else:
                self._complete(msg)
        self._shutdown(reason)

    def _complete(self, msg: Message) -> None:
        with self._lock:
            pending = self._pending.pop(msg.seq, None)
        if pending is None:
            self.bad_frames += 1                # late (timed-out) or unsolicited reply
            return
        pending.reply = msg
        pending.done.set()

    def _fail_call(self, seq: int, error: PortalError) -> None:
        with self._lock:
            pending = self._pending.pop(seq, None) if seq else None
        if pending is None:
            self.bad_frames += 1
            return
        pending.error = error
        pending.done.set()

    def _deliver(self, msg: Message) -> None:
        if self._on_event is not None:
            try:
                self._on_event(msg)
            except Exception:                   # a faulty callback must not kill the reader
                self.callback_errors += 1
            return
        while True:
            try:
                self.events.put_nowait(msg)
                return
            except queue.Full:
                try:
                    self.events.get_nowait()
                    self.dropped_events += 1
                except queue.Empty:
                    pass

    def _shutdown(self, reason: str) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = reason
            waiting, self._pending = self._pending, {}
        for pending in waiting.values():
            pending.error = PortalClosed(reason)
            pending.done.set()

    # ---- lifetime -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self, timeout: float = 5.0) -> None:
        """Fail outstanding calls, stop the reader thread, close the socket."""
        self._shutdown("client closed")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> PortalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
