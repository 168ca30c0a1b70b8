"""Sealed sets of VM state: what a snapshot or a migration stream is made of outside the core.

docs/sealed-format.md is the contract.  A `Sealer` turns (kind, payload) chunks into
AES-256-GCM records bound to VM id, generation, purpose, set and index, and ends the
set with a manifest whose HMAC covers the header and every chunk tag in order.  An
`Opener` checks each record as it arrives (streaming, chunk by chunk) and the
manifest at the end.  `seal_set`/`open_set` do the same for a whole set in one
length-prefixed buffer.  Pure: bytes in, bytes out, no I/O.  Every refusal raises a
`SealError` subclass whose `.kind` names the tampering.
"""
from __future__ import annotations

import hmac
import os
import struct
from hashlib import sha256
from typing import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealvm.wire.sealed_layout import (
    CHUNK_HEADER, CHUNK_MAGIC, CHUNK_OVERHEAD, KEY_SIZE, LABEL_MANIFEST, MANIFEST,
    MANIFEST_MAGIC, MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_GENERATION, MAX_HEADER, MAX_PURPOSE,
    MAX_VM_ID, OPEN_STREAM, SET_ID_SIZE, TAG_SIZE, VERSION, AlteredError, ChunkHeader, ChunkKind,
    ExtraError, ForeignError, Header, MalformedError, ReorderedError, ReplayedError, SealError,
    TruncatedError, as_name, context, derive_keys, encode_manifest, header_body, header_mac,
    nonce, parse_chunk_header, parse_header, parse_manifest)

__all__ = [
    "AlteredError", "ChunkKind", "ExtraError", "ForeignError", "MalformedError", "Opener",
    "ReorderedError", "ReplayedError", "SealError", "Sealer", "TruncatedError", "chunk_records",
    "open_records",
    "open_set", "read_record", "seal_set",
]

DEFAULT_CHUNK_SIZE = 2 << 20
_LEN = struct.Struct(">I")


def _manifest_mac_start(mac_key: bytes, header: bytes) -> hmac.HMAC:
    return hmac.new(mac_key, LABEL_MANIFEST + header, sha256)


class Sealer:
    """Seals one set: `header`, then `seal_chunk` per chunk (indices 0, 1, ...), then `finish`.

    `count` fixes the number of chunks up front (bound into every chunk); None makes an
    open stream whose count only the manifest states.  `set_id` is random unless given
    (tests only: a repeated set_id with a repeated generation reuses nonces).
    """

    def __init__(self, key: bytes, vm_id: bytes | str, generation: int, purpose: bytes | str,
                 *, chunk_size: int = DEFAULT_CHUNK_SIZE, count: int | None = None,
                 set_id: bytes | None = None) -> None:
        self._vm_id = as_name(vm_id, "vm_id", MAX_VM_ID)
        self._purpose = as_name(purpose, "purpose", MAX_PURPOSE)
        if not 0 <= generation <= MAX_GENERATION:
            raise ValueError(f"generation {generation} is not a 64-bit unsigned integer")
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size {chunk_size} outside 1..{MAX_CHUNK_SIZE}")
        if count is not None and not 0 <= count <= MAX_CHUNKS:
            raise ValueError(f"count {count} outside 0..{MAX_CHUNKS}")
        self._set_id = os.urandom(SET_ID_SIZE) if set_id is None else bytes(set_id)
        if len(self._set_id) != SET_ID_SIZE:
            raise ValueError(f"set_id must be {SET_ID_SIZE} bytes")
        self._gen = generation
        self._chunk_size = chunk_size
        self._count = OPEN_STREAM if count is None else count
        aead_key, mac_key = derive_keys(key, self._vm_id, generation, self._purpose, self._set_id)
        self._aead = AESGCM(aead_key)
        body = header_body(self._set_id, generation, chunk_size, self._count,
                           self._vm_id, self._purpose)
        self.header: bytes = body + header_mac(mac_key, body)
        self._ctx = context(self._vm_id, self._purpose)
        self._mac = _manifest_mac_start(mac_key, self.header)
        self._next = 0
        self._done = False

    def seal_chunk(self, kind: ChunkKind | int, payload: bytes | bytearray | memoryview) -> bytes:
        """One sealed chunk record: 40-byte clear header || ciphertext || 16-byte tag."""
        hdr = self._next_header(kind, len(payload))
        ct = self._aead.encrypt(nonce(self._gen, self._next), payload, hdr + self._ctx)
        self._mac.update(ct[-TAG_SIZE:])
        self._next += 1
        return hdr + ct

    def seal_chunk_into(self, kind: ChunkKind | int, payload: bytes | bytearray | memoryview,
                        out: bytearray | memoryview) -> int:
        """Like `seal_chunk`, written into `out` (at least len(payload) + 56 bytes) without
        intermediate copies; returns the record's length."""
        n = CHUNK_OVERHEAD + len(payload)
        if len(out) < n:
            raise ValueError(f"output buffer of {len(out)} bytes, the record needs {n}")
        hdr = self._next_header(kind, len(payload))
        view = memoryview(out)
        view[:CHUNK_HEADER.size] = hdr
        body = view[CHUNK_HEADER.size:n]
        self._aead.encrypt_into(nonce(self._gen, self._next), payload, hdr + self._ctx, body)
        self._mac.update(body[-TAG_SIZE:])
        self._next += 1
        return n

    def _next_header(self, kind: ChunkKind | int, size: int) -> bytes:
        if self._done:
            raise ValueError("the set is finished")
        kind = ChunkKind(kind)
        if size > self._chunk_size:
            raise ValueError(f"payload of {size} bytes exceeds the chunk size {self._chunk_size}")
        limit = MAX_CHUNKS if self._count == OPEN_STREAM else self._count
        if self._next >= limit:
            raise ValueError(f"the set holds {limit} chunks")
        return CHUNK_HEADER.pack(CHUNK_MAGIC, VERSION, kind, 0, self._next, self._count,
                                 self._gen, self._set_id)

    def finish(self) -> bytes:
        """The manifest: count and HMAC over header, every tag in order, and the count."""
        if self._done:
            raise ValueError("the set is finished")
        if self._count != OPEN_STREAM and self._next != self._count:
            raise ValueError(f"sealed {self._next} of the {self._count} chunks announced")
        self._done = True
        self._mac.update(_LEN.pack(self._next))
        return encode_manifest(self._next, self._mac.digest())


class Opener:
    """Opens one set: `open_header`, `open_chunk` per record in order, then `finish`.

    `generation` is the lowest acceptable generation (older is `replayed`), or with
    exact=True the only one.  Payloads are returned as soon as their chunk
    authenticates; the set as a whole is genuine only once `finish` has returned.
    """

    def __init__(self, key: bytes, vm_id: bytes | str, generation: int, purpose: bytes | str,
                 *, exact: bool = False) -> None:
        self._key = bytes(key)
        if len(self._key) != KEY_SIZE:
            raise ValueError(f"the snapshot key must be {KEY_SIZE} bytes")
        self._vm_id = as_name(vm_id, "vm_id", MAX_VM_ID)
        self._purpose = as_name(purpose, "purpose", MAX_PURPOSE)
        self._gen_min = generation
        self._exact = exact
        self._ctx = context(self._vm_id, self._purpose)
        self.header: Header | None = None
        self._aead: AESGCM | None = None
        self._mac: hmac.HMAC | None = None
        self._next = 0
        self._done = False

    @property
    def generation(self) -> int:
        if self.header is None:
            raise MalformedError("no header opened yet")
        return self.header.generation

    @property
    def chunk_size(self) -> int:
        if self.header is None:
            raise MalformedError("no header opened yet")
        return self.header.chunk_size

    def open_header(self, blob: bytes | memoryview) -> Header:
        if self.header is not None:
            raise ExtraError("a second header in one set")
        h = parse_header(blob)
        if h.vm_id != self._vm_id:
            raise ForeignError(f"sealed for VM {h.vm_id!r}, not {self._vm_id!r}")
        if h.purpose != self._purpose:
            raise ForeignError(f"sealed for {h.purpose!r}, not {self._purpose!r}")
        if h.generation < self._gen_min:
            raise ReplayedError(f"generation {h.generation} is older than {self._gen_min}")
        if self._exact and h.generation != self._gen_min:
            raise ForeignError(f"generation {h.generation} is not the expected {self._gen_min}")
        aead_key, mac_key = derive_keys(self._key, h.vm_id, h.generation, h.purpose, h.set_id)
        if not hmac.compare_digest(header_mac(mac_key, h.body), h.mac):
            raise AlteredError("header does not authenticate: altered, or sealed under "
                               "another key")
        self.header = h
        self._aead = AESGCM(aead_key)
        self._mac = _manifest_mac_start(mac_key, h.raw)
        return h

    def _started(self) -> Header:
        if self._done:
            raise ExtraError("record after the manifest")
        if self.header is None:
            raise MalformedError("a chunk or manifest before the set's header")
        return self.header

    def open_chunk(self, blob: bytes | memoryview) -> tuple[int, ChunkKind, bytes]:
        """(index, kind, payload) of the next chunk; refuses anything not next in this set."""
        return self._open(blob, None)

    def open_chunk_into(self, blob: bytes | memoryview, out: bytearray | memoryview
                        ) -> tuple[int, ChunkKind, int]:
        """Like `open_chunk`, the payload decrypted straight into `out`, which must be its
        exact size (else `malformed`); returns (index, kind, size).  On a refusal `out`
        holds garbage."""
        return self._open(blob, out)

    def _open(self, blob, out):
        h = self._started()
        ch = parse_chunk_header(blob, h.chunk_size)
        if h.count != OPEN_STREAM and self._next >= h.count:
            raise ExtraError(f"chunk past the {h.count} the header announced")
        hdr = bytes(blob[:CHUNK_HEADER.size])
        body = blob[CHUNK_HEADER.size:]
        if ch.generation != h.generation or ch.set_id != h.set_id:
            self._refuse_stranger(ch, hdr, body)
        if ch.count != h.count:
            raise AlteredError("chunk's count field disagrees with its set")
        misfit = out is not None and len(out) != len(body) - TAG_SIZE
        try:
            n = nonce(h.generation, ch.index)
            if out is None or misfit:      # a misfit is opened to name what is wrong
                payload = self._aead.decrypt(n, body, hdr + self._ctx)
            else:
                payload = self._aead.decrypt_into(n, body, hdr + self._ctx, out)
        except InvalidTag:
            raise AlteredError(f"chunk at position {self._next} does not authenticate") from None
        if ch.index != self._next:
            raise ReorderedError(f"chunk {ch.index} where chunk {self._next} belongs")
        if misfit:
            raise MalformedError(f"chunk at position {self._next} holds {len(body) - TAG_SIZE} "
                                 f"bytes where {len(out)} belong")
        self._mac.update(bytes(body[-TAG_SIZE:]))
        self._next += 1
        return ch.index, ch.kind, payload

    def _refuse_stranger(self, ch: ChunkHeader, hdr: bytes, body: bytes | memoryview) -> None:
        """A chunk claiming another set: name it replayed/foreign only if it is genuine there."""
        aead_key, _ = derive_keys(self._key, self._vm_id, ch.generation, self._purpose, ch.set_id)
        try:
            AESGCM(aead_key).decrypt(nonce(ch.generation, ch.index), body, hdr + self._ctx)
        except InvalidTag:
            raise AlteredError(f"chunk at position {self._next} does not authenticate") from None
        if ch.generation < self.generation:
            raise ReplayedError(f"chunk from generation {ch.generation}, set is generation "
                                f"{self.generation}")
        raise ForeignError("chunk from another set of this VM")

    def finish(self, manifest: bytes | memoryview) -> int:
        """Check the manifest against everything opened; returns the chunk count."""
        h = self._started()
        count, mac = parse_manifest(manifest)
        if h.count != OPEN_STREAM and self._next < h.count:
            raise TruncatedError(f"set ends after {self._next} of {h.count} chunks")
        if count > self._next:
            raise TruncatedError(f"manifest counts {count} chunks, {self._next} arrived")
        if count < self._next:
            raise ExtraError(f"manifest counts {count} chunks, {self._next} arrived")
        self._mac.update(_LEN.pack(count))
        if not hmac.compare_digest(self._mac.digest(), mac):
            raise AlteredError("manifest MAC does not match the header and chunks received")
        self._done = True
        return count


def seal_set(key: bytes, vm_id: bytes | str, generation: int, purpose: bytes | str,
             chunks: list[tuple[ChunkKind | int, bytes]], *, chunk_size: int | None = None,
             set_id: bytes | None = None) -> bytes:
    """A whole set in one buffer: u32-length-prefixed header, chunks, manifest."""
    if chunk_size is None:
        chunk_size = max([1] + [len(p) for _, p in chunks])
    s = Sealer(key, vm_id, generation, purpose, chunk_size=chunk_size, count=len(chunks),
               set_id=set_id)
    total = (2 * _LEN.size + len(s.header) + MANIFEST.size
             + sum(_LEN.size + CHUNK_OVERHEAD + len(p) for _, p in chunks))
    buf = bytearray(total)
    pos = _put(buf, 0, s.header)
    for kind, payload in chunks:
        n = s.seal_chunk_into(kind, payload, memoryview(buf)[pos + _LEN.size:])
        _LEN.pack_into(buf, pos, n)
        pos += _LEN.size + n
    pos = _put(buf, pos, s.finish())
    return bytes(buf)


def _put(buf: bytearray, pos: int, rec: bytes) -> int:
    _LEN.pack_into(buf, pos, len(rec))
    buf[pos + _LEN.size:pos + _LEN.size + len(rec)] = rec
    return pos + _LEN.size + len(rec)


def read_record(read: Callable[[int], bytes | memoryview], cap: int
                ) -> bytes | memoryview | None:
    """The next u32-length-prefixed record from `read(n)` (up to n bytes; fewer only at
    the end), or None at a clean end.  A length over `cap` is refused before reading."""
    prefix = read(_LEN.size)
    if len(prefix) == 0:
        return None
    if len(prefix) < _LEN.size:
        raise TruncatedError("set ends inside a length prefix")
    (ln,) = _LEN.unpack(prefix)
    if ln > cap:
        raise MalformedError(f"record length {ln} exceeds the cap {cap}")
    rec = read(ln)
    if len(rec) < ln:
        raise TruncatedError(f"set ends inside a record ({len(rec)} of {ln} bytes)")
    return rec


def chunk_records(op: Opener, read: Callable[[int], bytes | memoryview]
                  ) -> Iterator[bytes | memoryview]:
    """Stream a framed set: opens its header, yields each chunk record still sealed (the
    caller opens it, with `open_chunk` or `open_chunk_into`), and returns after the
    manifest checked out.  The caller checks nothing follows the manifest."""
    head = read_record(read, MAX_HEADER)
    if head is None:
        raise TruncatedError("empty set: no header")
    op.open_header(head)
    n = 0
    while True:
        rec = read_record(read, CHUNK_OVERHEAD + op.chunk_size)
        if rec is None:
            raise TruncatedError(f"set ends after {n} chunks without its manifest")
        magic = bytes(rec[:4])
        if magic == MANIFEST_MAGIC:
            op.finish(rec)
            return
        if magic != CHUNK_MAGIC:
            raise MalformedError(f"record at position {n} is neither chunk nor manifest")
        n += 1
        yield rec


def open_records(op: Opener, read: Callable[[int], bytes | memoryview]
                 ) -> Iterator[tuple[ChunkKind, bytes]]:
    """`chunk_records`, each opened: (kind, payload) per authenticated chunk."""
    for rec in chunk_records(op, read):
        yield op.open_chunk(rec)[1:]


def open_set(key: bytes, vm_id: bytes | str, generation: int, purpose: bytes | str,
             blob: bytes | bytearray | memoryview, *,
             exact: bool = False) -> list[tuple[ChunkKind, bytes]]:
    """Open what `seal_set` made; every chunk, the manifest and the framing are checked."""
    view = memoryview(blob).cast("B")
    pos = 0

    def read(n: int) -> memoryview:
        nonlocal pos
        out = view[pos:pos + n]
        pos += len(out)
        return out

    out = list(open_records(Opener(key, vm_id, generation, purpose, exact=exact), read))
    if pos != len(view):
        raise ExtraError(f"{len(view) - pos} bytes after the manifest")
    return out
