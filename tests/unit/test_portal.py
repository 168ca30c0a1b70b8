"""The portal codec: round trips of every op, and each malformed class -> its refusal status.

Frames are built by hand with `pack_header` where the encoders would refuse
to produce them, so every check of `decode_header`, `decode_payload` and
`decode_response` is driven by a hostile peer's bytes.
"""
from __future__ import annotations

import struct

import pytest

from sealvm.wire import portal as P
from sealvm.wire.portal import (HEADER_SIZE, MAX_PAYLOAD, OPS, EncodeError, Kind, Op,
                                PortalError, Status, pack_header)

TOKEN = bytes(range(1, 17))
OTHER = bytes(range(2, 18))

REQUESTS = {
    Op.HELLO: dict(host_version=1),
    Op.LOAD_IMAGE: dict(kind=P.ImageKind.KERNEL, offset=4096, total=8192, data=b"\x7fELF" * 8),
    Op.CONFIGURE: dict(memory_mib=64, vcpus=2, entry=P.EntryMode.PVH, flags=P.CONFIG_FLAG_RNG,
                       cmdline="console=ttyS0 greeting=wörld"),
    Op.START: {}, Op.PAUSE: {}, Op.RESUME: {}, Op.STOP: {}, Op.QUERY: {},
    Op.CONSOLE_INPUT: dict(data=b"ls\n"),
    Op.ATTACH: dict(kind=P.AttachKind.BLOCK, index=1),
    Op.SNAPSHOT: dict(receipt=b'{"body":"x","mac":"y"}'),
    Op.RESTORE: dict(receipt=b""),
    Op.MIGRATE_OUT: dict(receipt=b"", downtime_ms=300),
    Op.MIGRATE_IN: dict(receipt=b"r"),
}
REPLIES = {
    Op.SNAPSHOT: dict(ticket=b"{}", generation=7, bytes=1 << 30),
    Op.RESTORE: dict(ticket=b"", generation=8, bytes=1 << 30),
    Op.MIGRATE_OUT: dict(ticket=b"{}", generation=9, bytes=1 << 31, report='{"rounds":3}'),
    Op.MIGRATE_IN: dict(ticket=b"{}", generation=9, bytes=0),
    Op.HELLO: dict(core_version=1, vm_token=TOKEN, state=P.VmState.EMPTY),
    Op.QUERY: dict(state=P.VmState.RUNNING, exit_status=-1, stop_reason="", vcpus=2,
                   memory_mib=64, exits=12345678901, disk_requests=7, disk_tampered=1,
                   disk_io_errors=0, disk_generation=42),
}
EVENTS = {
    Op.CONSOLE_OUTPUT: dict(data=b"hello\r\n"),
    Op.VM_STOPPED: dict(exit_status=3, reason="guest wrote the exit port"),
    Op.LOG: dict(level=P.LogLevel.WARNING, message="refused op 0x2: out of range"),
    Op.PROGRESS: dict(done=1 << 30, total=2 << 30),
}


def frame(kind, op, payload=b"", seq=7, cap=bytes(16), **kw) -> bytes:
    return pack_header(kind, op, seq, len(payload), cap, **kw) + payload


def lp(raw: bytes) -> bytes:
    return struct.pack("<I", len(raw)) + raw


def refused(data: bytes, core_side: bool = True) -> PortalError:
    with pytest.raises(PortalError) as info:
        P.decode_frame(data, core_side=core_side)
    return info.value


# ---- the table ---------------------------------------------------------------------------
def test_op_table_is_small_numbered_and_complete():
    assert len(OPS) <= 20
    assert set(REQUESTS) == set(P.REQUEST_OPS) and set(EVENTS) == set(P.EVENT_OPS)
    for number, spec in OPS.items():
        assert spec.number == number and Op(number).name == spec.name
        assert spec.max_payload <= MAX_PAYLOAD and spec.max_reply <= MAX_PAYLOAD
        if spec.kind is Kind.EVENT:
            assert 0x100 <= number <= 0x1FF and spec.cap is None
        else:
            assert number < 0x100
            assert spec.cap == (None if number == Op.HELLO else P.CAP_VM)
    assert P.EVENTS["LOG"] == Op.LOG and P.OP.START == 4 and P.STATUS.OK == 0
    assert Status.BAD_KIND == Status.UNKNOWN_OP and Status.MALFORMED == Status.OUT_OF_RANGE


def test_op_table_is_well_formed():
    """What portal_ops promises of its table: unique numbers and names, no reserved field names."""
    from sealvm.wire.portal_ops import _SPECS
    assert len(OPS) == len(_SPECS), "two specs share an op number"
    for spec in _SPECS:
        assert 0 < spec.number <= 0xFFFF and spec.name == Op(spec.number).name
        names = [f.name for f in spec.fields]
        reply_names = [f.name for f in spec.reply]
        assert len(set(names)) == len(names) and len(set(reply_names)) == len(reply_names)
        reserved = {"op"} if spec.kind is Kind.EVENT else {"op", "seq", "cap", "timeout"}
        assert not reserved & set(names), f"{spec.name} uses a reserved field name"
        assert not {"op", "seq", "status", "message"} & set(reply_names), spec.name
        if spec.kind is Kind.EVENT:
            assert spec.cap is None and not spec.reply, spec.name


def test_header_layout():
    raw = P.encode_request(Op.START, 0x01020304, TOKEN)
    assert len(raw) == HEADER_SIZE
    assert raw[:2] == b"VS" and raw[2] == 1 and raw[3] == Kind.REQUEST
    assert struct.unpack_from("<HHII", raw, 4) == (Op.START, 0, 0x01020304, 0)
    assert raw[16:32] == TOKEN
    shown = repr(P.decode_header(raw))
    assert "cap" not in shown and TOKEN.hex() not in shown            # tokens stay out of logs


# ---- round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(REQUESTS), ids=lambda o: o.name)
def test_request_round_trip(op):
    cap = None if op == Op.HELLO else TOKEN
    raw = P.encode_request(op, 99, cap, **REQUESTS[op])
    msg = P.decode_frame(raw)
    assert (msg.kind, msg.op, msg.seq, msg.name) == (Kind.REQUEST, op, 99, op.name)
    assert msg.fields == REQUESTS[op]
    assert msg.header.cap == (cap or bytes(16))
    assert P.encode_request(op, 99, cap, **msg.fields) == raw       # canonical


@pytest.mark.parametrize("op", list(REQUESTS), ids=lambda o: o.name)
def test_ok_reply_round_trip(op):
    fields = REPLIES.get(op, {})
    raw = P.encode_reply(op, 5, Status.OK, **fields)
    msg = P.decode_frame(raw, core_side=False)
    assert (msg.kind, msg.op, msg.seq, msg.status) == (Kind.REPLY, op, 5, Status.OK)
    assert msg.fields == {"status": Status.OK, "message": "", **fields}


@pytest.mark.parametrize("status", [s for s in Status if s is not Status.OK], ids=lambda s: s.name)
def test_refusal_round_trip(status):
    raw = P.encode_reply(Op.CONFIGURE, 6, status, "no: wrong state")
    msg = P.decode_frame(raw, core_side=False)
    assert msg.fields == {"status": status, "message": "no: wrong state"}
    # a refusal may echo an op this side does not know, or 0 for an unframeable stream
    assert P.decode_frame(P.encode_reply(0x7777, 1, status, "?"), core_side=False).op == 0x7777
    assert P.decode_frame(P.encode_reply(0, 0, status, "?"), core_side=False).seq == 0


@pytest.mark.parametrize("op", list(EVENTS), ids=lambda o: o.name)
def test_event_round_trip(op):
    raw = P.encode_event(op, **EVENTS[op])
    msg = P.decode_frame(raw, core_side=False)
    assert (msg.kind, msg.op, msg.seq) == (Kind.EVENT, op, 0) and msg.fields == EVENTS[op]


def test_limits_are_inclusive():
    P.decode_frame(P.encode_request(Op.CONFIGURE, 1, TOKEN, memory_mib=65536, vcpus=64, entry=2,
                                    flags=0, cmdline="x" * 4095))
    P.decode_frame(P.encode_request(Op.CONSOLE_INPUT, 1, TOKEN, data=bytes(4096)))
    big = P.encode_request(Op.LOAD_IMAGE, 1, TOKEN, kind=2, offset=(1 << 30) - (1 << 20),
                           total=1 << 30, data=bytes(1 << 20))
    assert P.decode_frame(big).fields["offset"] == (1 << 30) - (1 << 20)
    P.decode_frame(P.encode_event(Op.CONSOLE_OUTPUT, data=bytes(64 * 1024)), core_side=False)


def test_clip_message_makes_any_text_sendable():
    msg = P.decode_frame(P.encode_reply(0, 0, Status.FAILED, "é\0" * 2000), core_side=False)
    text = msg.fields["message"]
    assert "\0" not in text and len(text.encode()) <= P.MAX_MESSAGE
    assert P.clip_message("\udcff") == "?"


# ---- header checks -----------------------------------------------------------------------
def test_bad_magic_is_fatal():
    e = refused(frame(Kind.REQUEST, Op.START, magic=0x5357))
    assert e.status is Status.MALFORMED and e.fatal


def test_oversize_is_refused_from_the_header_alone():
    head = pack_header(Kind.REQUEST, Op.LOAD_IMAGE, 3, MAX_PAYLOAD + 1, TOKEN)
    with pytest.raises(PortalError) as info:
        P.decode_header(head)
    assert info.value.status is Status.TOO_BIG and info.value.fatal and info.value.seq == 3
    assert P.decode_header(pack_header(Kind.REQUEST, Op.LOAD_IMAGE, 3, 1000, TOKEN)).length == 1000


def test_over_the_ops_own_maximum_is_too_big_but_not_fatal():
    head = pack_header(Kind.REQUEST, Op.START, 3, 1, TOKEN)
    with pytest.raises(PortalError) as info:
        P.decode_header(head)
    assert info.value.status is Status.TOO_BIG and not info.value.fatal


@pytest.mark.parametrize("data, status", [
    (frame(Kind.REQUEST, Op.START, version=2), Status.BAD_VERSION),
    (frame(Kind.REQUEST, Op.START, version=0), Status.BAD_VERSION),
    (frame(0, Op.START), Status.BAD_KIND),
    (frame(4, Op.START), Status.BAD_KIND),
    (frame(Kind.REQUEST, 0x0F), Status.UNKNOWN_OP),
    (frame(Kind.REQUEST, 0), Status.UNKNOWN_OP),
    (frame(Kind.REQUEST, Op.LOG, lp(b"x")), Status.UNKNOWN_OP),       # an event op as a request
    (frame(Kind.REQUEST, Op.START, flags=1), Status.MALFORMED),
    (frame(Kind.REQUEST, Op.START, flags=0x8000), Status.MALFORMED),
    (frame(Kind.REQUEST, Op.HELLO, b"\1\0", cap=TOKEN), Status.BAD_CAPABILITY),
    (frame(Kind.REPLY, Op.START, lp(b"")), Status.BAD_KIND),            # core accepts requests only
    (frame(Kind.EVENT, Op.LOG, b"\x14" + lp(b""), seq=0), Status.BAD_KIND),
], ids=["version2", "version0", "kind0", "kind4", "unknown-op", "op0", "event-as-request",
        "flags1", "flags-high", "hello-with-cap", "reply-to-core", "event-to-core"])
def test_header_refusals(data, status):
    e = refused(data)
    assert e.status is status and not e.fatal
    assert e.seq == struct.unpack_from("<I", data, 8)[0]
    assert e.op == struct.unpack_from("<H", data, 4)[0]


@pytest.mark.parametrize("data, status", [
    (frame(Kind.REQUEST, Op.START, seq=1), Status.BAD_KIND),        # host accepts no requests
    (frame(Kind.EVENT, Op.LOG, b"\x14" + lp(b""), seq=1), Status.MALFORMED),   # events carry seq 0
    (frame(Kind.EVENT, Op.START, seq=0), Status.UNKNOWN_OP),
    (frame(Kind.REPLY, Op.LOG, b"\0\0" + lp(b"")), Status.UNKNOWN_OP),       # reply to an event
    (frame(Kind.REPLY, Op.START, b"\0\0" + lp(b""), cap=TOKEN), Status.MALFORMED),
    (frame(Kind.EVENT, Op.LOG, b"\x14" + lp(b""), seq=0, cap=TOKEN), Status.MALFORMED),
    (frame(Kind.REPLY, 0x7777, b"\0\0" + lp(b"")), Status.UNKNOWN_OP),       # OK, unknown op
    (frame(Kind.REPLY, Op.START, b"\x08\0" + lp(b"")), Status.OUT_OF_RANGE),   # no such status
    (frame(Kind.REPLY, Op.START, b"\x06\0" + lp(b"") + b"\0"), Status.MALFORMED),
    (frame(Kind.REPLY, Op.QUERY, b"\0\0" + lp(b"")), Status.MALFORMED),        # OK without fields
    (frame(Kind.REPLY, Op.HELLO, b"\0\0" + lp(b"") + b"\1\0" + bytes(16) + b"\0"),
     Status.MALFORMED),
    (frame(Kind.REPLY, Op.HELLO, b"\0\0" + lp(b"") + b"\1\0" + TOKEN + b"\5"), Status.OUT_OF_RANGE),
], ids=["request-to-host", "event-seq", "request-op-as-event", "reply-to-event", "reply-cap",
        "event-cap", "ok-unknown-op", "bad-status", "refusal-trailing", "ok-missing-fields",
        "zero-token", "bad-state"])
def test_response_refusals(data, status):
    assert refused(data, core_side=False).status is status


# ---- payload checks ----------------------------------------------------------------------
EMPTY_STR = lp(b"")


def configure(memory=b"\x40\0\0\0", vcpus=b"\1\0", entry=b"\1", flags=b"\0\0\0\0",
              cmdline=EMPTY_STR):
    return frame(Kind.REQUEST, Op.CONFIGURE, memory + vcpus + entry + flags + cmdline, cap=TOKEN)


def load(kind=1, offset=0, total=16, data=b"x" * 16):
    return frame(Kind.REQUEST, Op.LOAD_IMAGE,
                 struct.pack("<BQQ", kind, offset, total) + lp(data), cap=TOKEN)


@pytest.mark.parametrize("data, status", [
    (configure()[:-1], Status.MALFORMED),                                  # header length agrees
    (configure() + b"\0", Status.MALFORMED),                               # header length disagrees
    (configure(cmdline=lp(b"") + b"\0"), Status.MALFORMED),                # trailing bytes
    (configure(cmdline=struct.pack("<I", 10) + b"abc"), Status.MALFORMED), # string truncated
    (configure(cmdline=lp(b"x" * 4096)), Status.TOO_BIG),                  # string too long
    (configure(cmdline=struct.pack("<I", 0xFFFFFFFF)), Status.TOO_BIG),    # huge claim, no bytes
    (configure(cmdline=lp(b"\xff\xfe")), Status.MALFORMED),                # invalid UTF-8
    (configure(cmdline=lp(b"\xed\xa0\x80")), Status.MALFORMED),            # encoded surrogate
    (configure(cmdline=lp(b"\xc0\xaf")), Status.MALFORMED),                # overlong
    (configure(cmdline=lp(b"a\0b")), Status.MALFORMED),                    # NUL
    (configure(memory=b"\1\0\0\0"), Status.OUT_OF_RANGE),                  # below min
    (configure(memory=struct.pack("<I", 65537)), Status.OUT_OF_RANGE),     # above max
    (configure(vcpus=b"\0\0"), Status.OUT_OF_RANGE),
    (configure(vcpus=b"\x41\0"), Status.OUT_OF_RANGE),
    (configure(flags=b"\x20\0\0\0"), Status.OUT_OF_RANGE),                 # unknown flag bit
    (configure(entry=b"\4"), Status.OUT_OF_RANGE),                         # enum value not allowed
    (configure(entry=b"\0"), Status.OUT_OF_RANGE),
    (load(kind=4), Status.OUT_OF_RANGE),
    (load(total=0, data=b""), Status.OUT_OF_RANGE),
    (load(total=(1 << 30) + 1), Status.OUT_OF_RANGE),
    (load(offset=(1 << 30) + 1, total=1 << 30, data=b""), Status.OUT_OF_RANGE),
    (load(offset=8, total=16, data=b"x" * 9), Status.OUT_OF_RANGE),        # runs past total
    (frame(Kind.REQUEST, Op.CONSOLE_INPUT, lp(bytes(4097)), cap=TOKEN), Status.TOO_BIG),
    (frame(Kind.REQUEST, Op.CONSOLE_INPUT, struct.pack("<I", 5000), cap=TOKEN), Status.TOO_BIG),
    (frame(Kind.REQUEST, Op.CONSOLE_INPUT, struct.pack("<I", 5), cap=TOKEN), Status.MALFORMED),
    (frame(Kind.REQUEST, Op.CONSOLE_INPUT, b"\1\0", cap=TOKEN), Status.MALFORMED),
    (frame(Kind.REQUEST, Op.START, b"", cap=TOKEN)[:-1], Status.MALFORMED),  # short header: fatal
], ids=[
    'truncated', 'length-mismatch', 'trailing', 'str-truncated', 'str-too-long', 'str-huge-claim',
    'bad-utf8', 'utf8-surrogate', 'utf8-overlong', 'str-nul', 'int-below-min', 'int-above-max',
    'vcpus-0', 'vcpus-65', 'flag-bit', 'enum-4', 'enum-0', 'image-kind',
    'total-0', 'total-over-1g', 'offset-over-1g', 'chunk-past-total', 'bytes-too-long',
    'bytes-huge-claim',
    'bytes-truncated', 'len-prefix-truncated', 'short-header'])
def test_payload_refusals(data, status):
    e = refused(data)
    assert e.status is status
    if len(data) >= HEADER_SIZE:
        assert e.seq == 7


def test_over_max_per_op_payload_is_refused_before_decoding():
    data = frame(Kind.REQUEST, Op.CONSOLE_INPUT, lp(bytes(4096)) + b"\0", cap=TOKEN)
    assert refused(data).status is Status.TOO_BIG


def test_decode_payload_rejects_a_mismatched_header():
    header = P.Header(Kind.REQUEST, Op.START, 1, 0, TOKEN)
    with pytest.raises(PortalError) as info:
        P.decode_payload(header, b"\0")
    assert info.value.status is Status.MALFORMED
    with pytest.raises(PortalError) as info:
        P.decode_payload(P.Header(Kind.REQUEST, 0x55, 1, 0), b"")
    assert info.value.status is Status.UNKNOWN_OP


# ---- capabilities ------------------------------------------------------------------------
def test_check_capability():
    def header(op, cap):
        return P.decode_header(P.encode_request(op, 1, cap, **REQUESTS[op])[:HEADER_SIZE])

    P.check_capability(header(Op.START, TOKEN), {P.CAP_VM: TOKEN})
    P.check_capability(header(Op.HELLO, None), {})                 # HELLO needs none
    for held in ({P.CAP_VM: OTHER}, {}, {P.CAP_VM: None}, {P.CAP_VM: TOKEN[:8]}):
        with pytest.raises(PortalError) as info:
            P.check_capability(header(Op.START, TOKEN), held)
        assert info.value.status is Status.BAD_CAPABILITY and info.value.seq == 1
    with pytest.raises(PortalError):                                # a zero token never matches
        P.check_capability(header(Op.STOP, bytes(16)), {P.CAP_VM: bytes(16)})


# ---- encoding refuses what decoding would ------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: P.encode_request(Op.START, 1, TOKEN, extra=1),
    lambda: P.encode_request(Op.CONSOLE_INPUT, 1, TOKEN),
    lambda: P.encode_request(Op.CONSOLE_INPUT, 1, TOKEN, data="text"),
    lambda: P.encode_request(Op.CONSOLE_INPUT, 1, TOKEN, data=bytes(4097)),
    lambda: P.encode_request(Op.CONFIGURE, 1, TOKEN, **{**REQUESTS[Op.CONFIGURE], "vcpus": 65}),
    lambda: P.encode_request(Op.CONFIGURE, 1, TOKEN, **{**REQUESTS[Op.CONFIGURE], "vcpus": True}),
    lambda: P.encode_request(Op.CONFIGURE, 1, TOKEN, **{**REQUESTS[Op.CONFIGURE], "flags": 0x20}),
    lambda: P.encode_request(Op.CONFIGURE, 1, TOKEN, **{**REQUESTS[Op.CONFIGURE], "entry": 9}),
    lambda: P.encode_request(Op.CONFIGURE, 1, TOKEN, **{**REQUESTS[Op.CONFIGURE],
                                                         "cmdline": "a\0"}),
    lambda: P.encode_request(Op.CONFIGURE, 1, TOKEN, **{**REQUESTS[Op.CONFIGURE],
                                                         "cmdline": "é" * 2048}),
    lambda: P.encode_request(Op.CONFIGURE, 1, TOKEN, **{**REQUESTS[Op.CONFIGURE],
                                                         "cmdline": "\udc80"}),
    lambda: P.encode_request(Op.LOAD_IMAGE, 1, TOKEN, kind=1, offset=10, total=12, data=b"abc"),
    lambda: P.encode_request(Op.HELLO, 1, TOKEN, host_version=1),
    lambda: P.encode_request(Op.START, 1, b"short"),
    lambda: P.encode_request(Op.START, 1 << 32, TOKEN),
    lambda: P.encode_request(Op.LOG, 1, None, level=10, message=""),
    lambda: P.encode_request(0x55, 1, TOKEN),
    lambda: P.encode_reply(Op.START, 1, Status.OK, extra=1),
    lambda: P.encode_reply(Op.QUERY, 1, Status.FAILED, "x", state=1),
    lambda: P.encode_reply(Op.START, 1, 99),
    lambda: P.encode_reply(Op.LOG, 1, Status.FAILED),
    lambda: P.encode_event(Op.START),
    lambda: P.encode_event(Op.LOG, level=15, message=""),
])
def test_encode_refuses(call):
    with pytest.raises(EncodeError):
        call()


def test_docs_list_every_op_with_its_number_and_capability():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "portal.md").read_text()
    for spec in OPS.values():
        row = next((line for line in doc.splitlines()
                    if line.startswith(f"| {spec.number:#04x} | {spec.name} |")), None)
        assert row is not None, f"docs/portal.md has no row for {spec.name}"
        if spec.kind is Kind.REQUEST:
            assert f"| {spec.cap or 'none'}" in row
        for f in spec.fields:
            assert f"`{f.name} " in row, f"{spec.name}.{f.name} missing from docs/portal.md"


def test_host_refuses_a_hello_reply_with_an_all_zero_token():
    frame = P.encode_reply(Op.HELLO, 1, Status.OK, core_version=1, vm_token=bytes(16), state=0)
    assert refused(frame, core_side=False).status is Status.MALFORMED
