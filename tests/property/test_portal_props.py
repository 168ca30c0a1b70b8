"""Property tests of the portal codec: hostile bytes never do more than get refused.

* random bytes, random headers over random payloads, and mutated valid frames
  decode to a Message or raise PortalError, never anything else; whatever
  decodes re-encodes to the very same bytes (the encoding is canonical);
* generated valid values of every op's request, reply and event fields round
  trip exactly;
* allocation stays bounded: decoding hostile length prefixes allocates about
  the frame's own size (traced with tracemalloc), and a FrameReader facing a
  header that claims more than MAX_PAYLOAD reads nothing past the header;
* a stream of valid frames cut at arbitrary points reads back unchanged.

Strategies are derived from the op table, so a new op is covered without
touching this file.
"""
from __future__ import annotations

import struct
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealvm.wire import portal as P
from sealvm.wire.portal import (HEADER_SIZE, MAX_PAYLOAD, OPS, Kind, PortalError, Status,
                                pack_header)
from sealvm.wire.portal_io import FrameReader
from sealvm.wire.portal_ops import MAX_IMAGE
from sealvm.wire.portal_schema import Bytes, Enum, Int, Str, Token

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KNOWN_OPS = sorted(OPS)
TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")


def value_for(f) -> st.SearchStrategy:
    if isinstance(f, Enum):
        return st.sampled_from(sorted(f.enum_cls, key=int))
    if isinstance(f, Int):
        ints = st.integers(f.lo, f.hi) | st.sampled_from([f.lo, f.hi])
        return ints.map(lambda v: v & f.mask).filter(lambda v: v >= f.lo) if f.mask is not None \
            else ints
    if isinstance(f, Token):
        return st.binary(min_size=16, max_size=16).filter(any)
    if isinstance(f, Str):
        return st.text(TEXT, max_size=min(f.max // 4, 80)) | st.just("z" * f.max)
    if isinstance(f, Bytes):
        near_max = st.integers(max(0, f.max - 3), f.max).map(bytes)
        return st.binary(max_size=min(f.max, 200)) | near_max
    raise TypeError(f)


def fields_for(schema) -> st.SearchStrategy:
    return st.fixed_dictionaries({f.name: value_for(f) for f in schema})


def _fix_load(op, fields):
    if op == P.Op.LOAD_IMAGE:          # the one cross-field rule: offset + len(data) <= total
        fields["total"] = max(fields["total"], min(MAX_IMAGE,
                                                   fields["offset"] + len(fields["data"])))
        fields["offset"] = min(fields["offset"], fields["total"] - len(fields["data"]))
    return fields


@st.composite
def valid_frames(draw) -> tuple[bytes, bool]:
    """(frame, core_side) for any op: request, OK reply, refusal or event."""
    spec = OPS[draw(st.sampled_from(KNOWN_OPS))]
    seq = draw(st.integers(0, 0xFFFF_FFFF))
    if spec.kind is Kind.EVENT:
        return P.encode_event(spec.number, **draw(fields_for(spec.fields))), False
    what = draw(st.sampled_from(["request", "reply", "refusal"]))
    if what == "request":
        cap = None if spec.cap is None else draw(st.binary(min_size=16, max_size=16))
        fields = _fix_load(spec.number, draw(fields_for(spec.fields)))
        return P.encode_request(spec.number, seq, cap, **fields), True
    if what == "reply":
        return P.encode_reply(spec.number, seq, Status.OK, draw(st.text(TEXT, max_size=40)),
                              **draw(fields_for(spec.reply))), False
    status = draw(st.sampled_from([s for s in Status if s is not Status.OK]))
    return P.encode_reply(spec.number, seq, status, draw(st.text(TEXT, max_size=40))), False


def decode_or_refuse(data: bytes, core_side: bool):
    try:
        msg = P.decode_frame(data, core_side=core_side)
    except PortalError as e:
        assert isinstance(e.status, Status)
        return None
    assert reencode(msg) == bytes(data)     # canonical: nothing decodes two ways
    return msg


def reencode(msg: P.Message) -> bytes:
    h, f = msg.header, dict(msg.fields)
    if h.kind is Kind.REQUEST:
        return P.encode_request(h.op, h.seq, h.cap, **f)
    if h.kind is Kind.EVENT:
        return P.encode_event(h.op, **f)
    return P.encode_reply(h.op, h.seq, f.pop("status"), f.pop("message"), **f)


@SETTINGS
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_decode_or_refuse(data, core_side):
    decode_or_refuse(data, core_side)


@SETTINGS
@given(st.integers(0, 5), st.sampled_from(KNOWN_OPS) | st.integers(0, 0xFFFF),
       st.integers(0, 3), st.binary(max_size=16).map(lambda b: b.ljust(16, b"\0")),
       st.binary(max_size=400), st.booleans(), st.booleans())
def test_random_payloads_under_plausible_headers(kind, op, seq, cap, payload, zero_cap,
                                                 core_side):
    data = pack_header(kind, op, seq, len(payload), bytes(16) if zero_cap else cap) + payload
    decode_or_refuse(data, core_side)


@SETTINGS
@given(valid_frames(), st.data())
def test_mutated_frames_decode_or_refuse(frame, data):
    raw, core_side = frame
    buf = bytearray(raw)
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "lie-length", "grow", "shrink"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del buf[data.draw(st.integers(0, len(buf) - 1)):]
    elif how == "extend":
        buf += data.draw(st.binary(min_size=1, max_size=8))
    elif how == "lie-length":
        struct.pack_into("<I", buf, 12, data.draw(st.integers(0, 0xFFFF_FFFF)))
    else:                                   # change the payload and keep the header honest
        if how == "grow":
            buf += data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[data.draw(st.integers(HEADER_SIZE, len(buf))):]
        struct.pack_into("<I", buf, 12, len(buf) - HEADER_SIZE)
    decode_or_refuse(bytes(buf), core_side)


@SETTINGS
@given(valid_frames())
def test_valid_frames_round_trip(frame):
    raw, core_side = frame
    assert decode_or_refuse(raw, core_side) is not None


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([n for n in KNOWN_OPS if OPS[n].kind is Kind.REQUEST]), st.data())
def test_generated_fields_come_back_equal(op, data):
    spec = OPS[op]
    fields = _fix_load(op, data.draw(fields_for(spec.fields)))
    cap = None if spec.cap is None else b"c" * 16
    assert P.decode_frame(P.encode_request(op, 1, cap, **fields)).fields == fields
    reply = data.draw(fields_for(spec.reply))
    got = P.decode_frame(P.encode_reply(op, 1, Status.OK, "m", **reply), core_side=False).fields
    assert got == {"status": Status.OK, "message": "m", **reply}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([n for n in KNOWN_OPS if OPS[n].fields]), st.integers(0, 0xFFFF_FFFF),
       st.binary(max_size=64))
def test_hostile_lengths_allocate_no_more_than_the_frame(op, claim, tail):
    """Every length prefix in the payload claims `claim` bytes; decoding stays O(frame)."""
    spec = OPS[op]
    payload = b"".join(struct.pack("<I", claim) if isinstance(f, Bytes) else b"\1" * f.max_size
                       for f in spec.fields) + tail
    payload = payload[:spec.max_payload]
    kind = Kind.EVENT if spec.kind is Kind.EVENT else Kind.REQUEST
    data = pack_header(kind, op, 0, len(payload)) + payload
    tracemalloc.start()
    try:
        decode_or_refuse(data, kind is Kind.REQUEST)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(data) + 64 * 1024


@settings(max_examples=40, deadline=None)
@given(st.integers(MAX_PAYLOAD + 1, 0xFFFF_FFFF), st.integers(0, 5), st.integers(0, 0xFFFF))
def test_reader_never_reads_or_allocates_past_an_oversize_header(length, kind, op):
    head = pack_header(kind, op, 1, length)
    served = []

    def recv(n):
        served.append(n)
        return head[sum(served[:-1]):sum(served[:-1]) + n] if sum(served[:-1]) < HEADER_SIZE \
            else b"\0" * n

    tracemalloc.start()
    try:
        reader = FrameReader(recv)
        try:
            reader.read()
            raise AssertionError("an oversize frame was accepted")
        except PortalError as e:
            assert e.fatal and e.status is Status.TOO_BIG
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(served) == HEADER_SIZE and peak < 64 * 1024


@settings(max_examples=80, deadline=None)
@given(st.lists(valid_frames().filter(lambda f: f[1]), min_size=1, max_size=5),
       st.lists(st.integers(1, 700), min_size=1, max_size=20))
def test_stream_cut_anywhere_reads_back(frames, cuts):
    stream = b"".join(f for f, _ in frames)
    pos = 0
    pieces = iter(cuts * (len(stream) // len(cuts) + 2))

    def recv(n):
        nonlocal pos
        k = min(n, next(pieces))
        out = stream[pos:pos + k]
        pos += len(out)
        return out

    reader = FrameReader(recv)
    got = []
    while (f := reader.read()) is not None:
        got.append(P.encode_request(f.header.op, f.header.seq, f.header.cap,
                                    **P.decode_payload(*f).fields))
    assert got == [f for f, _ in frames]
