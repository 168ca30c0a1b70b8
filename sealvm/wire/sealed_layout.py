"""Sealed-blob format, the byte layer: errors, limits, key derivation, and the three records.

docs/sealed-format.md is the contract.  A sealed set is a header, N chunks and a
manifest.  This module encodes and parses each record with bounded sizes and derives
the per-set keys; `sealvm.wire.sealed` holds the Sealer/Opener state machines and the
one-buffer framing.  Pure: standard library and `cryptography` only, bytes in, bytes
out.  Every check raises a `SealError` whose `.kind` names what was wrong; nothing
here is an `assert`.
"""
from __future__ import annotations

import enum
import hmac
import struct
from dataclasses import dataclass
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
KEY_SIZE = 32                   # the VM snapshot key from the owner's key broker
SET_ID_SIZE = 16                # random per set; HKDF salt
TAG_SIZE = 16                   # AES-GCM tag
MAC_SIZE = 32                   # HMAC-SHA256
MAX_VM_ID = 64
MAX_PURPOSE = 32
MAX_CHUNK_SIZE = 16 << 20       # payload bytes in one chunk
MAX_CHUNKS = 1 << 28            # chunks in one set
OPEN_STREAM = 0xFFFF_FFFF       # header count of a stream whose length is known only at the end
MAX_GENERATION = (1 << 64) - 1

HEADER_MAGIC = b"SVSH"
CHUNK_MAGIC = b"SVCK"
MANIFEST_MAGIC = b"SVMF"
_HEADER_FIXED = struct.Struct(">4sHH16sQII")     # magic ver flags set_id gen chunk_size count
CHUNK_HEADER = struct.Struct(">4sBBHIIQ16s")     # magic ver kind rsv index count gen set_id
MANIFEST = struct.Struct(">4sBBHI32s")           # magic ver rsv rsv count mac
MAX_HEADER = _HEADER_FIXED.size + 2 + MAX_VM_ID + MAX_PURPOSE + MAC_SIZE
CHUNK_OVERHEAD = CHUNK_HEADER.size + TAG_SIZE

INFO_AEAD = b"sealvm/sealed/v1/aead-key\0"
INFO_MAC = b"sealvm/sealed/v1/mac-key\0"
LABEL_HEADER = b"sealvm/sealed/v1/header\0"
LABEL_MANIFEST = b"sealvm/sealed/v1/manifest\0"


class ChunkKind(enum.IntEnum):
    """What a chunk holds; the payload layout inside each kind belongs to its producer."""
    MEMORY = 1      # a guest-physical page range: the producer's range descriptor + pages
    VCPU = 2
    DEVICE = 3
    METADATA = 4


class SealError(Exception):
    """A sealed set, or one record of it, is refused; `.kind` names the tampering."""
    kind = "sealed"


class AlteredError(SealError):
    kind = "altered"        # does not authenticate: changed bytes, or another key


class ReorderedError(SealError):
    kind = "reordered"      # a genuine chunk of this set out of its place (swap, duplicate, gap)


class ReplayedError(SealError):
    kind = "replayed"       # genuine, but from an older generation than expected


class ForeignError(SealError):
    kind = "foreign"        # genuine, but for another VM, purpose, or set


class TruncatedError(SealError):
    kind = "truncated"      # ends before its last chunk or its manifest


class ExtraError(SealError):
    kind = "extra"          # more than the set holds: chunks past the count, bytes after the end


class MalformedError(SealError):
    kind = "malformed"      # not the format at all: bad magic, version, lengths, limits


def as_name(value: bytes | str, what: str, limit: int) -> bytes:
    """A vm_id or purpose as bytes, 1..limit long."""
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if not 1 <= len(raw) <= limit:
        raise ValueError(f"{what} must be 1..{limit} bytes, got {len(raw)}")
    return raw


def context(vm_id: bytes, purpose: bytes) -> bytes:
    """Canonical (vm_id, purpose): each length-prefixed; the tail of every chunk's AAD."""
    return bytes([len(vm_id)]) + vm_id + bytes([len(purpose)]) + purpose


def derive_keys(key: bytes, vm_id: bytes, generation: int, purpose: bytes,
                set_id: bytes) -> tuple[bytes, bytes]:
    """(AEAD key, MAC key) for one set: HKDF-SHA256, salt = set_id, distinct info strings."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"the snapshot key must be {KEY_SIZE} bytes")
    ctx = context(vm_id, purpose) + struct.pack(">Q", generation)
    out = []
    for info in (INFO_AEAD, INFO_MAC):
        out.append(HKDF(hashes.SHA256(), 32, set_id, info + ctx).derive(key))
    return out[0], out[1]


def nonce(generation: int, index: int) -> bytes:
    """96-bit GCM nonce: generation (64) || index (32); unique under a per-set key."""
    return struct.pack(">QI", generation, index)


@dataclass(frozen=True)
class Header:
    set_id: bytes
    generation: int
    chunk_size: int
    count: int              # OPEN_STREAM when the manifest gives it
    vm_id: bytes
    purpose: bytes
    body: bytes             # the encoded bytes the MAC covers
    mac: bytes

    @property
    def raw(self) -> bytes:
        return self.body + self.mac


def header_body(set_id: bytes, generation: int, chunk_size: int, count: int,
                vm_id: bytes, purpose: bytes) -> bytes:
    return (_HEADER_FIXED.pack(HEADER_MAGIC, VERSION, 0, set_id, generation, chunk_size, count)
            + context(vm_id, purpose))


def header_mac(mac_key: bytes, body: bytes) -> bytes:
    return hmac.new(mac_key, LABEL_HEADER + body, sha256).digest()


def parse_header(blob: bytes | memoryview) -> Header:
    """Structure only; the caller checks the context and then the MAC."""
    n = len(blob)
    if n < _HEADER_FIXED.size + 2 + MAC_SIZE or n > MAX_HEADER:
        raise MalformedError(f"header of {n} bytes is outside {_HEADER_FIXED.size}..{MAX_HEADER}")
    magic, ver, flags, set_id, gen, chunk_size, count = _HEADER_FIXED.unpack_from(blob, 0)
    if magic != HEADER_MAGIC:
        raise MalformedError("not a sealed-set header (bad magic)")
    if ver != VERSION or flags != 0:
        raise MalformedError(f"unsupported header version {ver} or flags {flags:#x}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise MalformedError(f"chunk size {chunk_size} outside 1..{MAX_CHUNK_SIZE}")
    if count != OPEN_STREAM and count > MAX_CHUNKS:
        raise MalformedError(f"claimed count {count} is over the limit of {MAX_CHUNKS}")
    pos = _HEADER_FIXED.size
    fields = []
    for what, limit in (("vm_id", MAX_VM_ID), ("purpose", MAX_PURPOSE)):
        ln = blob[pos] if pos < n else 0
        if not 1 <= ln <= limit or pos + 1 + ln > n:
            raise MalformedError(f"header {what} length {ln} is invalid")
        fields.append(bytes(blob[pos + 1:pos + 1 + ln]))
        pos += 1 + ln
    if n - pos != MAC_SIZE:
        raise MalformedError(f"header has {n - pos - MAC_SIZE:+d} bytes past its fields")
    return Header(bytes(set_id), gen, chunk_size, count, fields[0], fields[1],
                  bytes(blob[:pos]), bytes(blob[pos:]))


@dataclass(frozen=True)
class ChunkHeader:
    kind: ChunkKind
    index: int
    count: int
    generation: int
    set_id: bytes


def parse_chunk_header(blob: bytes | memoryview, chunk_size: int) -> ChunkHeader:
    n = len(blob)
    if n < CHUNK_OVERHEAD or n > CHUNK_OVERHEAD + chunk_size:
        raise MalformedError(f"chunk of {n} bytes is outside {CHUNK_OVERHEAD}.."
                             f"{CHUNK_OVERHEAD + chunk_size}")
    magic, ver, kind, rsv, index, count, gen, set_id = CHUNK_HEADER.unpack_from(blob, 0)
    if magic != CHUNK_MAGIC:
        raise MalformedError("not a sealed chunk (bad magic)")
    if ver != VERSION or rsv != 0:
        raise MalformedError(f"unsupported chunk version {ver} or reserved {rsv:#x}")
    if kind not in ChunkKind._value2member_map_:
        raise MalformedError(f"unknown chunk kind {kind}")
    if index >= MAX_CHUNKS:
        raise MalformedError(f"chunk index {index} is over the limit of {MAX_CHUNKS}")
    return ChunkHeader(ChunkKind(kind), index, count, gen, bytes(set_id))


def encode_manifest(count: int, mac: bytes) -> bytes:
    return MANIFEST.pack(MANIFEST_MAGIC, VERSION, 0, 0, count, mac)


def parse_manifest(blob: bytes | memoryview) -> tuple[int, bytes]:
    """(count, mac) of a manifest record."""
    if len(blob) != MANIFEST.size:
        raise MalformedError(f"manifest of {len(blob)} bytes, expected {MANIFEST.size}")
    magic, ver, rsv1, rsv2, count, mac = MANIFEST.unpack_from(blob, 0)
    if magic != MANIFEST_MAGIC:
        raise MalformedError("not a sealed-set manifest (bad magic)")
    if ver != VERSION or rsv1 or rsv2:
        raise MalformedError(f"unsupported manifest version {ver} or reserved bits")
    if count > MAX_CHUNKS:
        raise MalformedError(f"manifest count {count} is over the limit of {MAX_CHUNKS}")
    return count, bytes(mac)
