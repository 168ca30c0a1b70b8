"""Property tests of sealed sets: whatever the host does to the bytes, it is refused.

* random chunk lists (kinds, sizes, counts, generations, names) round trip exactly,
  in one buffer and streamed record by record;
* any single byte of a sealed set changed to any other value is refused with a
  SealError, never accepted and never another exception;
* any strict prefix of a sealed set is refused, and so is anything appended to it;
* arbitrary bytes given to open_set raise SealError or nothing else.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealvm.wire.sealed import ChunkKind, Opener, SealError, Sealer, open_set, seal_set

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEY = bytes(range(32))
VM = b"vm-props"

chunk = st.tuples(st.sampled_from(list(ChunkKind)), st.binary(max_size=600))
chunk_lists = st.lists(chunk, max_size=12)
names = st.binary(min_size=1, max_size=32)


def records(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(blob):
        (n,) = struct.unpack_from(">I", blob, pos)
        out.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


@SETTINGS
@given(chunks=chunk_lists, gen=st.integers(0, 2**64 - 1), vm=names, purpose=names)
def test_random_sets_round_trip(chunks, gen, vm, purpose):
    blob = seal_set(KEY, vm, gen, purpose, chunks)
    assert open_set(KEY, vm, gen, purpose, blob, exact=True) == chunks


@SETTINGS
@given(chunks=chunk_lists)
def test_random_streams_round_trip(chunks):
    s = Sealer(KEY, VM, 4, b"migration", chunk_size=600)
    recs = [s.seal_chunk(k, p) for k, p in chunks]
    o = Opener(KEY, VM, 4, b"migration")
    o.open_header(s.header)
    assert [o.open_chunk(r)[1:] for r in recs] == chunks
    assert o.finish(s.finish()) == len(chunks)


@SETTINGS
@given(chunks=chunk_lists, data=st.data())
def test_any_single_byte_change_is_refused(chunks, data):
    blob = bytearray(seal_set(KEY, VM, 4, b"snapshot", chunks))
    pos = data.draw(st.integers(0, len(blob) - 1), label="pos")
    delta = data.draw(st.integers(1, 255), label="delta")
    blob[pos] = (blob[pos] + delta) % 256
    with pytest.raises(SealError):
        open_set(KEY, VM, 4, b"snapshot", bytes(blob))


@SETTINGS
@given(chunks=chunk_lists, data=st.data())
def test_any_truncation_or_extension_is_refused(chunks, data):
    blob = seal_set(KEY, VM, 4, b"snapshot", chunks)
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    with pytest.raises(SealError):
        open_set(KEY, VM, 4, b"snapshot", blob[:cut])
    tail = data.draw(st.binary(min_size=1, max_size=64), label="tail")
    with pytest.raises(SealError):
        open_set(KEY, VM, 4, b"snapshot", blob + tail)


@SETTINGS
@given(chunks=st.lists(chunk, min_size=2, max_size=8), data=st.data())
def test_record_permutations_other_than_identity_are_refused(chunks, data):
    blob = seal_set(KEY, VM, 4, b"snapshot", chunks)
    recs = records(blob)
    body = recs[1:-1]
    order = data.draw(st.permutations(range(len(body))), label="order")
    if list(order) == list(range(len(body))) or [body[i] for i in order] == body:
        return
    shuffled = [recs[0]] + [body[i] for i in order] + [recs[-1]]
    with pytest.raises(SealError) as e:
        open_set(KEY, VM, 4, b"snapshot",
                 b"".join(struct.pack(">I", len(r)) + r for r in shuffled))
    assert e.value.kind == "reordered"


@SETTINGS
@given(junk=st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_seal_errors(junk):
    with pytest.raises(SealError):
        open_set(KEY, VM, 4, b"snapshot", junk)
