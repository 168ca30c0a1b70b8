"""Sealed chunk sets from the host's storage or wire (sealvm/wire/sealed*.py).

Input: a byte 0/1 (a set of known length, or an open stream whose count comes at the
end), then the set's bytes, mutated from sets sealed under a known key.  Opened with
`open_set` for that key, VM, purpose and generation.  Refusal: SealError (altered,
reordered, replayed, foreign, truncated, extra, malformed).  Whatever opens must be
exactly one of the sets that were sealed: nothing else can authenticate.
"""
from __future__ import annotations

from fuzz.target import Violation
from sealvm.wire import sealed as SL
from sealvm.wire.sealed_layout import ChunkKind, SealError

MODULES = ["sealvm.wire.sealed", "sealvm.wire.sealed_layout"]
EXPECTED = (SealError,)
KEY, VM, GEN, PURPOSE = bytes(range(32)), "web1", 5, "snapshot"
SETS = [
    [(ChunkKind.METADATA, b'{"a":1}')],
    [(ChunkKind.METADATA, b"m" * 40), (ChunkKind.MEMORY, b"\1" * 64), (ChunkKind.MEMORY, b"\2" * 7)],
    [],
]
known: set[tuple] = set()


def _stream(chunks) -> bytes:
    s = SL.Sealer(KEY, VM, GEN, PURPOSE, chunk_size=64, count=None, set_id=bytes(16))
    out = bytearray()
    for rec in (s.header, *(s.seal_chunk(k, p) for k, p in chunks), s.finish()):
        out += len(rec).to_bytes(4, "big") + rec
    return bytes(out)


def setup() -> None:
    for chunks in SETS:
        known.add(tuple((int(k), bytes(p)) for k, p in chunks))


def one(data: bytes) -> None:
    if not data:
        return
    got = SL.open_set(KEY, VM, GEN, PURPOSE, data[1:], exact=bool(data[0] & 1))
    if tuple((int(k), bytes(p)) for k, p in got) not in known:
        raise Violation(f"a set that was never sealed opened: {got!r:.200}")


def seeds() -> list[bytes]:
    out = []
    for chunks in SETS:
        out.append(b"\1" + SL.seal_set(KEY, VM, GEN, PURPOSE, chunks, set_id=bytes(16)))
        out.append(b"\0" + _stream(chunks))
    return out
