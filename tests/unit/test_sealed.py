"""Sealed sets: round trips, and every class of tampering refused with the kind that names it.

Sets are built with `seal_set` and taken apart into their length-prefixed records, so a
test can drop, swap, duplicate or splice records and re-frame them exactly as a hostile
host would.
"""
from __future__ import annotations

import os
import struct

import pytest

from sealvm.wire.sealed import (ChunkKind, Opener, SealError, Sealer, open_set, seal_set)
from sealvm.wire.sealed_layout import CHUNK_HEADER, MAX_CHUNKS, OPEN_STREAM

KEY = bytes(range(32))
VM = b"vm-0001"
CHUNKS = [(ChunkKind.METADATA, b"meta"), (ChunkKind.VCPU, b"\x01" * 300),
          (ChunkKind.MEMORY, os.urandom(4096)), (ChunkKind.MEMORY, os.urandom(5000)),
          (ChunkKind.DEVICE, b"")]


def split(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(blob):
        (n,) = struct.unpack_from(">I", blob, pos)
        out.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def join(records: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(r)) + r for r in records)


def sealed(gen: int = 7, vm: bytes = VM, purpose: bytes = b"snapshot", key: bytes = KEY,
           chunks=CHUNKS) -> bytes:
    return seal_set(key, vm, gen, purpose, chunks)


def refused(blob: bytes, kind: str, gen: int = 7, **kw) -> SealError:
    with pytest.raises(SealError) as e:
        open_set(kw.pop("key", KEY), kw.pop("vm", VM), gen, kw.pop("purpose", b"snapshot"),
                 blob, **kw)
    assert e.value.kind == kind, f"{e.value.kind}: {e.value}"
    return e.value


@pytest.mark.parametrize("chunks", [[], CHUNKS[:1], CHUNKS, [(ChunkKind.MEMORY, b"x")] * 300,
                                    [(ChunkKind.MEMORY, os.urandom(2 << 20))] * 3])
def test_round_trip(chunks):
    assert open_set(KEY, VM, 7, b"snapshot", sealed(chunks=chunks)) == chunks


def test_str_names_and_newer_generation_accepted_unless_exact():
    blob = seal_set(KEY, "vm-0001", 9, "snapshot", CHUNKS)
    assert open_set(KEY, VM, 7, b"snapshot", blob) == CHUNKS
    refused(blob, "foreign", exact=True)
    assert open_set(KEY, VM, 9, b"snapshot", blob, exact=True) == CHUNKS


def test_streaming_chunk_by_chunk_with_manifest_at_the_end():
    s = Sealer(KEY, VM, 3, b"migration", chunk_size=8192)
    records = [s.seal_chunk(k, p) for k, p in CHUNKS]
    manifest = s.finish()
    o = Opener(KEY, VM, 3, b"migration")
    h = o.open_header(s.header)
    assert h.count == OPEN_STREAM
    got = [o.open_chunk(r) for r in records]
    assert [(k, p) for _, k, p in got] == CHUNKS and [i for i, _, _ in got] == list(range(5))
    assert o.finish(manifest) == 5


def test_seal_chunk_into_matches_the_record_format():
    s = Sealer(KEY, VM, 3, b"migration", chunk_size=64)
    buf = bytearray(200)
    n = s.seal_chunk_into(ChunkKind.VCPU, b"regs", buf)
    o = Opener(KEY, VM, 3, b"migration")
    o.open_header(s.header)
    assert o.open_chunk(bytes(buf[:n])) == (0, ChunkKind.VCPU, b"regs")
    assert o.finish(s.finish()) == 1


def test_sealer_refuses_misuse():
    s = Sealer(KEY, VM, 1, b"snapshot", chunk_size=16, count=1)
    with pytest.raises(ValueError):
        s.seal_chunk(ChunkKind.MEMORY, b"x" * 17)
    with pytest.raises(ValueError):
        s.finish()                          # announced one chunk, sealed none
    s.seal_chunk(ChunkKind.MEMORY, b"x")
    with pytest.raises(ValueError):
        s.seal_chunk(ChunkKind.MEMORY, b"x")
    with pytest.raises(ValueError):
        Sealer(b"short", VM, 1, b"snapshot")


# -- one byte flipped in each part of a chunk ---------------------------------------
_KIND, _INDEX, _COUNT, _GEN, _SET = 5, 8, 12, 16, 24   # offsets in the chunk header


@pytest.mark.parametrize("offset", [_INDEX + 3, _COUNT, _GEN + 7, _SET + 5,
                                    CHUNK_HEADER.size, CHUNK_HEADER.size + 100, -16, -1])
def test_flipped_byte_in_a_chunk_is_altered(offset):
    recs = split(sealed())
    chunk = bytearray(recs[3])
    chunk[offset] ^= 0x01
    recs[3] = bytes(chunk)
    refused(join(recs), "altered")


def test_chunk_kind_changed_to_another_valid_kind_is_altered():
    recs = split(sealed())
    chunk = bytearray(recs[3])
    chunk[_KIND] = ChunkKind.DEVICE
    recs[3] = bytes(chunk)
    refused(join(recs), "altered")


@pytest.mark.parametrize("offset", [0, 4, 6])      # magic, version, reserved
def test_flipped_structure_byte_in_a_chunk_is_malformed(offset):
    recs = split(sealed())
    chunk = bytearray(recs[2])
    chunk[offset] ^= 0x40
    recs[2] = bytes(chunk)
    refused(join(recs), "malformed")


def test_flipped_byte_in_header_or_manifest():
    for rec_index, offset in ((0, 30), (0, -1), (-1, 20), (-1, -1)):
        recs = split(sealed())
        rec = bytearray(recs[rec_index])
        rec[offset] ^= 0x80
        recs[rec_index] = bytes(rec)
        refused(join(recs), "altered")


# -- order, count, framing ----------------------------------------------------------
def test_two_chunks_swapped():
    recs = split(sealed())
    recs[2], recs[3] = recs[3], recs[2]
    refused(join(recs), "reordered")


def test_chunk_duplicated():
    recs = split(sealed())
    refused(join(recs[:3] + [recs[2]] + recs[3:]), "reordered")
    refused(join(recs[:-1] + [recs[-2], recs[-1]]), "extra")   # past the announced count


def test_chunk_dropped_in_the_middle_and_at_the_end():
    recs = split(sealed())
    refused(join(recs[:2] + recs[3:]), "reordered")
    refused(join(recs[:-2] + recs[-1:]), "truncated")


def test_streaming_drops_and_extras_caught_by_the_manifest():
    s = Sealer(KEY, VM, 3, b"migration")
    recs = [s.seal_chunk(k, p) for k, p in CHUNKS]
    manifest = s.finish()
    o = Opener(KEY, VM, 3, b"migration")
    o.open_header(s.header)
    for r in recs[:-1]:
        o.open_chunk(r)
    with pytest.raises(SealError) as e:
        o.finish(manifest)
    assert e.value.kind == "truncated"
    o.open_chunk(recs[-1])
    o.finish(manifest)
    with pytest.raises(SealError) as e:
        o.open_chunk(recs[0])
    assert e.value.kind == "extra"


def test_truncated_set():
    blob = sealed()
    for cut in (0, 3, 10, len(blob) // 2, len(blob) - 48, len(blob) - 1):
        refused(blob[:cut], "truncated")


def test_extra_chunk_or_bytes_after_the_manifest():
    recs = split(sealed())
    refused(join(recs + [recs[2]]), "extra")
    refused(sealed() + b"\0", "extra")


def test_malformed_framing():
    blob = sealed()
    refused(struct.pack(">I", 0xFFFF_FFF0) + blob[4:], "malformed")    # header length
    recs = split(blob)
    refused(join(recs[:2]) + struct.pack(">I", 1 << 31) + b"x" * 64, "malformed")
    header = bytearray(recs[0])
    struct.pack_into(">I", header, 36, MAX_CHUNKS + 1)                 # huge claimed count
    refused(join([bytes(header)] + recs[1:]), "malformed")
    refused(join(recs[:2] + [b"JUNK" + recs[2][4:]] + recs[3:]), "malformed")
    refused(b"\0" * 64, "malformed")
    refused(join([recs[0], b"SVCK"]), "malformed")                        # short chunk


# -- context: generation, VM, purpose, key -----------------------------------------
def test_chunk_replayed_from_an_older_generation():
    old, new = split(sealed(gen=6)), split(sealed(gen=7))
    new[2] = old[2]
    refused(join(new), "replayed")


def test_older_set_when_a_newer_generation_is_expected():
    refused(sealed(gen=6), "replayed")


def test_chunk_from_another_set_of_the_same_generation():
    a, b = split(sealed()), split(sealed())
    a[2] = b[2]
    refused(join(a), "foreign")


def test_set_for_another_vm_or_purpose():
    refused(sealed(vm=b"vm-0002"), "foreign")
    refused(sealed(purpose=b"migration"), "foreign")


def test_wrong_key():
    refused(sealed(key=bytes(32)), "altered")


def test_opener_state_machine():
    s = Sealer(KEY, VM, 1, b"snapshot")
    rec = s.seal_chunk(ChunkKind.MEMORY, b"p")
    o = Opener(KEY, VM, 1, b"snapshot")
    with pytest.raises(SealError) as e:
        o.open_chunk(rec)
    assert e.value.kind == "malformed"
    o.open_header(s.header)
    with pytest.raises(SealError) as e:
        o.open_header(s.header)
    assert e.value.kind == "extra"


def test_open_chunk_into_decrypts_in_place_and_names_misfits():
    s = Sealer(KEY, VM, 3, b"snapshot", chunk_size=64)
    header = s.header
    chunks = [s.seal_chunk(ChunkKind.MEMORY, bytes([i]) * 64) for i in range(3)]
    op = Opener(KEY, VM, 3, b"snapshot", exact=True)
    op.open_header(header)
    out = bytearray(64)
    assert op.open_chunk_into(chunks[0], out) == (0, ChunkKind.MEMORY, 64)
    assert out == bytes([0]) * 64
    with pytest.raises(SealError) as e:            # the next chunk skipped: reordered
        op.open_chunk_into(chunks[2], bytearray(64))
    assert e.value.kind == "reordered"
    with pytest.raises(SealError) as e:            # genuine and in place, wrong size: malformed
        op.open_chunk_into(chunks[1], bytearray(32))
    assert e.value.kind == "malformed"
    bad = bytearray(chunks[1])
    bad[-1] ^= 1
    with pytest.raises(SealError) as e:
        op.open_chunk_into(bytes(bad), bytearray(64))
    assert e.value.kind == "altered"
