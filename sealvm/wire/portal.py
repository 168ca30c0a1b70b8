"""The portal: the one channel between the untrusted host daemon and a VM's core.

One Unix stream socket per VM carries frames, each a fixed 32-byte
little-endian header and `length` payload bytes (docs/portal.md has the full
specification):

    magic u16 0x5356 | version u8 1 | kind u8 | op u16 | flags u16 (0)
    seq u32 | length u32 (<= MAX_PAYLOAD) | cap 16 bytes

This module is the core's codec: `encode_reply/encode_event` build frames,
`decode_header` checks a header, `decode_payload` (requests only) checks a
payload against the op's schema from `OPS`.  `check_capability` compares the header's
capability with the tokens the core handed out.  Every failure is a
`PortalError` whose `status` is the refusal the core should send; `fatal`
errors mean the stream cannot be framed any more (reply, then close the
connection; the VM keeps running).

`FrameReader` (portal_io) and the host side's `encode_request`,
`decode_response`, `decode_frame`, `FrameSender` and `PortalClient`
(portal_client) are importable from here too; they load on first use, so the
core never imports the host's half.
"""
from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

from .portal_ops import (CAP_VM, CONFIG_FLAG_RNG, EVENT_OPS, EVENTS, HEADER_SIZE, MAGIC,  # noqa: F401
                         MAX_MESSAGE, MAX_PAYLOAD, MAX_REFUSAL, OPS, REPLY_PREFIX, REQUEST_OPS,
                         VERSION, AttachKind, EntryMode, ImageKind, Kind, LogLevel, Op, OpSpec, VmState,
                         op_name)
from .portal_schema import (TOKEN_SIZE, EncodeError, PortalError, Status, decode_fields,  # noqa: F401
                            encode_fields)

OP = Op                        # P.OP.START, P.STATUS.OK read naturally at call sites
STATUS = Status
ZERO_CAP = bytes(TOKEN_SIZE)

_HEADER = struct.Struct("<HBBHHII16s")
_KINDS = frozenset(int(k) for k in Kind)
if _HEADER.size != HEADER_SIZE:
    raise ImportError("portal header layout does not add up to HEADER_SIZE")


@dataclass(frozen=True)
class Header:
    """A checked header.  `op` is an int: a REPLY may echo an op this side does not know."""
    kind: Kind
    op: int
    seq: int
    length: int
    cap: bytes = field(default=ZERO_CAP, repr=False)   # a token: keep it out of logs
    flags: int = 0
    version: int = VERSION


@dataclass(frozen=True)
class Message:
    """A decoded frame: its header and its fields (name -> value).

    A reply's fields start with `status` and `message`; the op's reply fields
    follow only when the status is OK.
    """
    header: Header
    fields: dict[str, Any]

    @property
    def kind(self) -> Kind:
        return self.header.kind

    @property
    def op(self) -> int:
        return self.header.op

    @property
    def seq(self) -> int:
        return self.header.seq

    @property
    def name(self) -> str:
        return op_name(self.header.op)

    @property
    def status(self) -> Status | None:
        return self.fields.get("status") if self.header.kind == Kind.REPLY else None


def pack_header(kind: int, op: int, seq: int, length: int, cap: bytes = ZERO_CAP, *,
                magic: int = MAGIC, version: int = VERSION, flags: int = 0) -> bytes:
    """Raw header bytes, unchecked (for the encoders, tests and fuzzing)."""
    return _HEADER.pack(magic, version, kind, op, flags, seq, length, cap)


def _check_header(kind: int, op: int, flags: int, seq: int, length: int, cap: bytes,
                  version: int) -> Kind:
    """The non-fatal header checks, shared by decode_header and the payload decoders."""
    def refuse(status: Status, message: str) -> PortalError:
        return PortalError(status, message, seq=seq, op=op)

    if version != VERSION:
        raise refuse(Status.BAD_VERSION, f"protocol version {version}, this side speaks {VERSION}")
    if kind not in _KINDS:
        raise refuse(Status.BAD_KIND, f"unknown frame kind {kind}")
    if flags:
        raise refuse(Status.MALFORMED, f"header flags {flags:#06x} must be zero")
    k = Kind(kind)
    spec = OPS.get(op)
    if k is Kind.REPLY:
        if spec is not None and spec.kind is not Kind.REQUEST:
            raise refuse(Status.UNKNOWN_OP, f"reply to {op_name(op)}, which is not a request")
        limit = spec.max_reply if spec is not None else MAX_REFUSAL
    else:
        if spec is None or spec.kind is not k:
            raise refuse(Status.UNKNOWN_OP, f"unknown {k.name.lower()} op {op:#x}")
        limit = spec.max_payload
    if k is Kind.EVENT and seq != 0:
        raise refuse(Status.MALFORMED, "an event must carry seq 0")
    if any(cap):
        if k is not Kind.REQUEST:
            raise refuse(Status.MALFORMED, f"a {k.name.lower()} must carry a zero capability")
        if spec is not None and spec.cap is None:
            raise refuse(Status.BAD_CAPABILITY, f"{spec.name} must carry a zero capability")
    if length > limit:
        raise refuse(Status.TOO_BIG, f"{op_name(op)} payload of {length} bytes, max {limit}")
    return k


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Check a 32-byte header.

    Fatal (stream lost): wrong size, bad magic, length over MAX_PAYLOAD.
    Otherwise, in order: version, kind, flags, op known for that kind, event
    seq 0, capability zero where required, length within the op's maximum.
    """
    if len(data) != HEADER_SIZE:
        raise PortalError(Status.MALFORMED, f"header of {len(data)} bytes, expected {HEADER_SIZE}",
                          fatal=True)
    magic, version, kind, op, flags, seq, length, cap = _HEADER.unpack(data)
    if magic != MAGIC:
        raise PortalError(Status.MALFORMED, f"bad magic {magic:#06x}", fatal=True)
    if length > MAX_PAYLOAD:
        raise PortalError(Status.TOO_BIG, f"frame claims {length} payload bytes, max {MAX_PAYLOAD}",
                          seq=seq, op=op, fatal=True)
    k = _check_header(kind, op, flags, seq, length, cap, version)
    return Header(k, op, seq, length, cap, flags, version)


def decode_fields_of(header: Header, payload: bytes | bytearray | memoryview) -> Message:
    """Decode a REQUEST or EVENT payload against its op's schema and cross-field check."""
    try:
        _check_header(header.kind, header.op, header.flags, header.seq, header.length,
                      header.cap, header.version)
        if len(payload) != header.length:
            raise PortalError(Status.MALFORMED,
                              f"payload of {len(payload)} bytes, header says {header.length}")
        spec = OPS[header.op]              # _check_header refused unknown request/event ops
        fields = decode_fields(spec.fields, payload)
        if spec.check is not None:
            spec.check(fields)
        return Message(header, fields)
    except PortalError as e:
        e.seq, e.op = header.seq, header.op
        raise


def decode_payload(header: Header, payload: bytes | bytearray | memoryview) -> Message:
    """Core side: decode a REQUEST's payload (any other kind is refused with BAD_KIND)."""
    if header.kind != Kind.REQUEST:
        raise PortalError(Status.BAD_KIND, f"the core accepts only requests, got kind "
                          f"{header.kind}", seq=header.seq, op=header.op)
    return decode_fields_of(header, payload)


def check_capability(header: Header, held: Mapping[str, bytes | None]) -> None:
    """Refuse a request whose cap is not the current token of the capability its op needs.

    `held` maps capability names (`CAP_VM`, ...) to the token the core issued;
    a missing or all-zero token never matches.  Comparison is constant-time.
    """
    spec = OPS.get(header.op)
    if header.kind != Kind.REQUEST or spec is None or spec.kind is not Kind.REQUEST:
        raise PortalError(Status.BAD_KIND, "only known requests carry capabilities",
                          seq=header.seq, op=header.op)
    if spec.cap is None:
        return
    token = held.get(spec.cap)
    if token is None or len(token) != TOKEN_SIZE or not any(token) \
            or not hmac.compare_digest(token, header.cap):
        raise PortalError(Status.BAD_CAPABILITY,
                          f"{spec.name} needs the current '{spec.cap}' capability",
                          seq=header.seq, op=header.op)


def clip_message(text: str) -> str:
    """Make `text` a valid reply message: no NUL, valid UTF-8, at most MAX_MESSAGE bytes."""
    raw = str(text).replace("\0", "\\0").encode("utf-8", "replace")
    return raw[:MAX_MESSAGE].decode("utf-8", "ignore")


def _spec(op: int, kind: Kind) -> OpSpec:
    spec = OPS.get(op)
    if spec is None or spec.kind is not kind:
        raise EncodeError(f"{op_name(op) if isinstance(op, int) else op!r} is not a known "
                          f"{kind.name.lower()} op")
    return spec


def _u(value: Any, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise EncodeError(f"{what} {value!r} is not a u{bits}")
    return value


def _run_check(check: Any, fields: Mapping[str, Any]) -> None:
    if check is not None:
        try:
            check(fields)
        except PortalError as e:
            raise EncodeError(e.message) from None


def _frame(kind: Kind, op: int, seq: int, cap: bytes, payload: bytes) -> bytes:
    return pack_header(kind, op, seq, len(payload), cap) + payload


def encode_reply(op: int, seq: int, status: Status | int, message: str = "",
                 **fields: Any) -> bytes:
    """A core -> host reply echoing `op` and `seq`.

    `message` is clipped with `clip_message`, so a refusal can always be
    sent.  A refusal (status not OK) carries no other fields and may echo any
    op, even one this side does not know; an OK reply needs exactly the op's
    reply fields.
    """
    try:
        status = Status(status)
    except ValueError:
        raise EncodeError(f"unknown status {status!r}") from None
    _u(seq, 32, "seq")
    head = {"status": status, "message": clip_message(message)}
    if status is Status.OK:
        spec = _spec(op, Kind.REQUEST)
        payload = encode_fields(REPLY_PREFIX, head) + encode_fields(spec.reply, fields)
    else:
        if fields:
            raise EncodeError(f"a refusal carries no fields, got {sorted(fields)}")
        _u(op, 16, "op")
        if op in OPS and OPS[op].kind is not Kind.REQUEST:
            raise EncodeError(f"cannot reply to event {op_name(op)}")
        payload = encode_fields(REPLY_PREFIX, head)
    return _frame(Kind.REPLY, op, seq, ZERO_CAP, payload)


def encode_event(op: int, **fields: Any) -> bytes:
    """A core -> host event (seq 0, zero capability)."""
    spec = _spec(op, Kind.EVENT)
    payload = encode_fields(spec.fields, fields)
    _run_check(spec.check, fields)
    return _frame(Kind.EVENT, spec.number, 0, ZERO_CAP, payload)


_LAZY = {
    "Frame": "portal_io", "FrameReader": "portal_io", "TruncatedFrame": "portal_io",
    "encode_request": "portal_client", "decode_response": "portal_client",
    "decode_frame": "portal_client", "FrameSender": "portal_client", "send_frame": "portal_client",
    "PortalClient": "portal_client", "PortalClosed": "portal_client",
    "PortalRefused": "portal_client", "PortalTimeout": "portal_client",
}


def __getattr__(name: str) -> Any:
    """Load the frame reader and the host's half only when asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{module}", __package__), name)
