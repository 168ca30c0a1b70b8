"""Shared by the two portal targets: frames of every kind, re-encoding, the stream reader."""
from __future__ import annotations

from fuzz.target import Violation
from sealvm.wire import portal as P
from sealvm.wire import portal_client as PC
from sealvm.wire.portal_io import FrameReader

TOKEN = bytes(range(1, 17))


def reencode(msg) -> bytes:
    h, f = msg.header, dict(msg.fields)
    if h.kind == P.Kind.REQUEST:
        return PC.encode_request(h.op, h.seq, h.cap, **f)
    if h.kind == P.Kind.EVENT:
        return P.encode_event(h.op, **f)
    return P.encode_reply(h.op, h.seq, f.pop("status"), f.pop("message"), **f)


def decode_whole(data: bytes, core_side: bool) -> None:
    """Decode one frame; what decodes must re-encode to exactly the same bytes."""
    msg = PC.decode_frame(data, core_side=core_side)
    if reencode(msg) != bytes(data):
        raise Violation(f"non-canonical decode of {bytes(data)[:64].hex()}")


def shaped(data: bytes, kinds: tuple[int, ...], core_side: bool) -> None:
    """A valid header (a known op, an honest length) over fuzzer bytes: reaches the payload."""
    if len(data) < 4:
        return
    ops = sorted(P.OPS)
    op = ops[data[0] % len(ops)] if data[1] < 240 else data[0] | data[2] << 8
    kind = kinds[data[1] % len(kinds)] if data[1] % 8 else data[1] % 6
    cap = TOKEN if data[3] & 1 else bytes(16)
    payload = data[4:]
    decode_whole(P.pack_header(kind, op, data[2] % 3, len(payload), cap) + payload, core_side)


def stream(data: bytes, core_side: bool) -> None:
    """The bytes as a stream read by FrameReader in fuzzer-chosen pieces."""
    if not data:
        return
    sizes, rest = data[:8], data[8:]
    pos = turn = 0

    def recv(n: int) -> bytes:
        nonlocal pos, turn
        k = min(n, sizes[turn % len(sizes)] + 1)
        turn += 1
        out = rest[pos:pos + k]
        pos += len(out)
        return out

    reader = FrameReader(recv)
    decode = P.decode_payload if core_side else PC.decode_response
    for _ in range(64):
        try:
            frame = reader.read()
        except P.PortalError as e:
            if e.fatal:
                return
            continue
        if frame is None:
            return
        if len(frame.payload) != frame.header.length or frame.header.length > P.MAX_PAYLOAD:
            raise Violation("reader returned a payload that disagrees with its header")
        try:
            decode(*frame)
        except P.PortalError:
            pass


def one(data: bytes, core_side: bool, kinds: tuple[int, ...]) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        decode_whole(rest, core_side)
    elif mode == 1:
        shaped(rest, kinds, core_side)
    else:
        stream(rest, core_side)


def frames(core_side: bool) -> list[bytes]:
    if core_side:
        return [
            PC.encode_request(P.Op.HELLO, 1, None, host_version=1),
            PC.encode_request(P.Op.LOAD_IMAGE, 2, TOKEN, kind=1, offset=0, total=64,
                              data=b"\x7fELF" * 4),
            PC.encode_request(P.Op.CONFIGURE, 3, TOKEN, memory_mib=64, vcpus=2, entry=1, flags=1,
                              cmdline="console=ttyS0"),
            PC.encode_request(P.Op.START, 4, TOKEN),
            PC.encode_request(P.Op.CONSOLE_INPUT, 5, TOKEN, data=b"ls\n"),
        ]
    return [
        P.encode_reply(P.Op.HELLO, 1, 0, core_version=1, vm_token=TOKEN, state=0),
        P.encode_reply(P.Op.START, 4, 6, "wrong state"),
        P.encode_event(P.Op.CONSOLE_OUTPUT, data=b"hello"),
        P.encode_event(P.Op.VM_STOPPED, exit_status=0, reason="done"),
        P.encode_event(P.Op.LOG, level=30, message="refused"),
    ]


def seeds(core_side: bool) -> list[bytes]:
    fs = frames(core_side)
    out = []
    for f in fs:
        out.append(b"\x00" + f)                                   # whole frame
        out.append(b"\x01" + bytes([f[2] if False else 0, 8, 1, 1]) + f[32:])   # shaped payload
    out.append(b"\x02" + b"\x07" * 8 + b"".join(fs))               # stream
    return out
