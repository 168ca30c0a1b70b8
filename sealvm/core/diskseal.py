"""The sealed disk: 4 KiB blocks the host stores but can neither read, alter, move nor roll back.

One host file (docs/sealed-disk.md has the byte layout):

* superblock (4 KiB): magic, block count, disk id, HMAC;
* two metadata copies A/B, each a header page plus a table of one 64-byte entry per
  block {version, nonce, tag, slot}; the header holds the generation and an HMAC over
  the SHA-256 of every table page (a two-level hash tree);
* two data slots per block, each {block, version, nonce, tag} in clear + 4096 bytes of
  AES-256-GCM ciphertext whose associated data is (disk id, block, version).

The core keeps the whole table in memory, checked against the root when the disk
opens; from then on that copy is the truth.  A read decrypts the slot the table names
with the table's nonce and tag: any change to the ciphertext, moving another block's
slot there, or putting back an older version of the block fails the tag and raises
`DiskTamper` naming the block and (from the slot's clear header, best effort) the kind.

Crash consistency: a write goes to the slot the last *committed* table does not name,
so committed data is never overwritten.  `flush()` commits: fdatasync the data, write
the changed table pages and the header (generation + 1) into the older metadata copy,
fdatasync.  A copy torn by a crash fails its root check and the other one, one
generation older, is used: every flushed write survives, unflushed ones may be lost.

Nonces are 96 random bits from getrandom per write, never derived from anything the
host can roll back; `writes` counts the sealed writes and the disk refuses more than
2**32 under one key (the AES-GCM random-nonce bound).

Rollback of the whole file to an older copy passes every check here unless the caller
knows a generation floor: `min_generation`, and the launcher's witness (`FdWitness`),
which records each disk's newest committed generation where the host cannot write;
a commit advances it before the FLUSH is acknowledged.

Fencing: each header also names the owner generation of the copy of the VM that
committed it (`owner`).  A core opening the disk for a newer copy commits at once
with its generation (it claims the disk); a core of an older copy refuses to open
a disk a newer copy claimed, and before every commit reads the header it is about
to overwrite: if a newer copy wrote it, the commit is refused (`fenced`).  So once
a VM was restored or migrated elsewhere, its old copy can commit nothing more.
"""
from __future__ import annotations

import hmac
import os
import struct
import threading
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..wire import witness as W

BLOCK = 4096
PAGE = 4096
ENTRY = 64
ENTRIES_PER_PAGE = PAGE // ENTRY
SLOT_HEADER = 64
SLOT = SLOT_HEADER + BLOCK
MAX_BLOCKS = 1 << 28                   # 1 TiB
MAX_WRITES = 1 << 32                   # random 96-bit nonces under one key
SB_MAGIC, META_MAGIC = b"SEALDSK1", b"SEALMET2"
ZERO_BLOCK = bytes(BLOCK)

_SB = struct.Struct("<8sIIQ16s")       # magic, format, block size, blocks, disk id
_META = struct.Struct("<8sQQQQ")       # magic, generation, writes, blocks, owner generation
_ENTRY = struct.Struct("<Q12s16sB")    # version, nonce, tag, slot (+ padding to 64)
_SLOTHDR = struct.Struct("<QQ12s16s")  # block, version, nonce, tag (+ padding to 64)
_AAD = struct.Struct("<16sQQ")


class DiskError(Exception):
    """The disk cannot be opened or used; the message says why (host's or owner's fault)."""


class DiskTamper(DiskError):
    """Stored data failed its check: `kind` is altered/swapped/stale/missing/rollback/fenced."""

    def __init__(self, block: int, kind: str, detail: str = ""):
        where = f"block {block}" if block >= 0 else "metadata"
        super().__init__(f"{where}: {kind}{': ' + detail if detail else ''}")
        self.block, self.kind = block, kind


class FileIO:
    """The only I/O a sealed disk does: positioned reads and writes on one fd, and fdatasync."""

    def __init__(self, fd: int):
        self.fd = fd

    def pread(self, n: int, off: int) -> bytes:
        return os.pread(self.fd, n, off)

    def pwrite(self, data: bytes, off: int) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, off)
            view, off = view[done:], off + done

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:   # formatting only (owner tools, tests)
        os.ftruncate(self.fd, size)


def derive_keys(key: bytes) -> tuple[bytes, bytes]:
    """(AEAD key, MAC key) from the 32-byte disk key."""
    if len(key) != 32:
        raise DiskError(f"disk key must be 32 bytes, not {len(key)}")
    okm = HKDF(SHA256(), 64, salt=None, info=b"sealvm disk v1").derive(key)
    return okm[:32], okm[32:]


class FdWitness:
    """The launcher's record of each disk's newest committed generation, over the private
    socket it gave this core at spawn (sealvm/launcher/witness.py)."""

    def __init__(self, fd: int):
        self.fd, self._lock = fd, threading.Lock()

    def _ask(self, op: bytes, disk_id: bytes, generation: int = 0) -> int:
        with self._lock:
            try:
                os.write(self.fd, W.REQUEST.pack(op, disk_id, generation))
                got = b""
                while len(got) < W.ANSWER.size:
                    chunk = os.read(self.fd, W.ANSWER.size - len(got))
                    if not chunk:
                        break
                    got += chunk
            except OSError as e:
                raise DiskError(f"the launcher's generation witness failed: {e}") from None
        if len(got) != W.ANSWER.size:
            raise DiskError("the launcher's generation witness is gone")
        return W.ANSWER.unpack(got)[0]

    def read(self, disk_id: bytes) -> int:
        return self._ask(b"R", disk_id)

    def advance(self, disk_id: bytes, generation: int) -> None:
        if self._ask(b"A", disk_id, generation) < generation:
            raise DiskError(f"the launcher's witness did not record generation {generation}")


class Layout:
    """Offsets of everything in the file for a disk of `blocks` blocks."""

    def __init__(self, blocks: int):
        if not 1 <= blocks <= MAX_BLOCKS:
            raise DiskError(f"{blocks} blocks outside 1..{MAX_BLOCKS}")
        self.blocks = blocks
        self.pages = -(-blocks // ENTRIES_PER_PAGE)
        self.meta_len = PAGE * (1 + self.pages)
        self.meta = (PAGE, PAGE + self.meta_len)
        self.data = PAGE + 2 * self.meta_len
        self.size = self.data + 2 * blocks * SLOT

    def slot(self, block: int, which: int) -> int:
        """Slot `which` of `block`: each copy is one array, so neighbours are adjacent."""
        return self.data + (which * self.blocks + block) * SLOT


def _sb_body(blocks: int, disk_id: bytes) -> bytes:
    return _SB.pack(SB_MAGIC, 1, BLOCK, blocks, disk_id)


def format_disk(io: FileIO, key: bytes, blocks: int, disk_id: bytes | None = None) -> bytes:
    """Write an empty sealed disk (all blocks read as zero) at generation 1; returns its id."""
    lay = Layout(blocks)
    _, mac_key = derive_keys(key)
    disk_id = os.urandom(16) if disk_id is None else disk_id
    body = _sb_body(blocks, disk_id)
    io.pwrite(body + hmac.new(mac_key, b"SB" + body, sha256).digest(), 0)
    io.truncate(lay.size)
    table = bytearray(lay.pages * PAGE)
    io.pwrite(bytes(table), lay.meta[0] + PAGE)
    io.pwrite(_meta_header(mac_key, disk_id, 1, 0, blocks, _page_hashes(table, lay.pages), 0),
              lay.meta[0])
    io.pwrite(bytes(PAGE), lay.meta[1])
    io.sync()
    return disk_id


def _page_hashes(table: bytearray | memoryview, pages: int) -> list[bytes]:
    mv = memoryview(table)
    return [sha256(mv[i * PAGE:(i + 1) * PAGE]).digest() for i in range(pages)]


def _root(mac_key: bytes, disk_id: bytes, gen: int, writes: int, blocks: int,
          hashes: list[bytes], owner: int) -> bytes:
    m = hmac.new(mac_key, b"ROOT" + disk_id + struct.pack("<QQQQ", gen, writes, blocks, owner),
                 sha256)
    for h in hashes:
        m.update(h)
    return m.digest()


def _meta_header(mac_key: bytes, disk_id: bytes, gen: int, writes: int, blocks: int,
                 hashes: list[bytes], owner: int) -> bytes:
    hdr = _META.pack(META_MAGIC, gen, writes, blocks, owner) + _root(
        mac_key, disk_id, gen, writes, blocks, hashes, owner)
    return hdr + bytes(PAGE - len(hdr))


def _decrypt_unchecked(key: bytes, nonce: bytes, ct: bytes) -> bytes:
    """GCM's keystream without its tag check: what a disk without integrity would return."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    dec = Cipher(algorithms.AES(key), modes.CTR(nonce + b"\0\0\0\2")).decryptor()
    return dec.update(ct) + dec.finalize()


class SealedDisk:
    """An open sealed disk.  Not thread-safe: one queue worker drives it."""

    def __init__(self, io: FileIO, key: bytes, *, min_generation: int = 0,
                 nonce_log: list | None = None, verify: bool = True, owner=None,
                 witness: FdWitness | None = None):
        self.io = io
        self._witness = witness
        self._owner = owner                 # () -> this copy's owner generation, or None
        self.verify = verify                # False only for a security test's paired control
        self._aead_key, self._mac_key = derive_keys(key)
        self._aead = AESGCM(self._aead_key)
        self.nonce_log = nonce_log          # tests: every nonce used, in order
        self.tampered = 0
        sb = io.pread(_SB.size + 32, 0)
        if len(sb) < _SB.size + 32:
            raise DiskTamper(-1, "missing", "file shorter than its superblock")
        magic, fmt, bsize, blocks, disk_id = _SB.unpack_from(sb)
        if magic != SB_MAGIC or fmt != 1 or bsize != BLOCK:
            raise DiskError("not a sealed disk (bad superblock magic or format)")
        if not hmac.compare_digest(sb[_SB.size:], hmac.new(self._mac_key, b"SB" + sb[:_SB.size],
                                                            sha256).digest()):
            raise DiskTamper(-1, "altered", "superblock MAC does not verify: wrong key, or altered")
        self.layout = lay = Layout(blocks)
        self.disk_id = disk_id
        self.blocks = blocks
        size = io.size()
        if size != lay.size and verify:
            raise DiskTamper(-1, "truncated" if size < lay.size else "extended",
                             f"file is {size} bytes, the disk needs exactly {lay.size}")
        best = None
        for which in (0, 1):
            got = self._load_meta(which)
            if got and (best is None or got[0] > best[0]):
                best = (*got, which)
        if best is None:
            raise DiskTamper(-1, "altered", "neither metadata copy verifies")
        self.generation, self.writes, self.table, self.hashes, self.owner, self.active = best
        if self.generation < min_generation:
            raise DiskTamper(-1, "rollback", f"generation {self.generation} is older than "
                                             f"the {min_generation} the owner last saw")
        if witness is not None:
            seen = witness.read(disk_id)
            if self.generation < seen:
                raise DiskTamper(-1, "rollback", f"generation {self.generation} is older than "
                                                 f"the {seen} this host's launcher saw committed")
            witness.advance(disk_id, self.generation)   # a commit cut before its record
        mine = owner() if owner is not None else self.owner
        if self.owner > mine:
            raise DiskTamper(-1, "fenced", f"copy {self.owner} of the VM owns this disk; "
                                           f"this is copy {mine}, an older one")
        self.committed_slot = self.table[36::ENTRY]     # the slot byte of every entry
        self.pending: set[int] = set()                  # blocks written since the last commit
        # Pages each metadata copy lacks compared with the in-memory table.
        self.behind: list[set[int]] = [set(), set()]
        self.behind[1 - self.active] = set(range(lay.pages))
        self.dirty_pages: set[int] = set()
        if self.owner < mine:
            self._commit()                              # claim it

    def _load_meta(self, which: int):
        lay = self.layout
        raw = self.io.pread(lay.meta_len, lay.meta[which])
        if len(raw) != lay.meta_len:
            return None
        magic, gen, writes, blocks, owner = _META.unpack_from(raw)
        if magic != META_MAGIC or blocks != self.layout.blocks:
            return None
        table = bytearray(raw[PAGE:])
        hashes = _page_hashes(table, lay.pages)
        want = _root(self._mac_key, self.disk_id, gen, writes, blocks, hashes, owner)
        if not hmac.compare_digest(raw[_META.size:_META.size + 32], want):
            return None
        return gen, writes, table, hashes, owner

    # ---- blocks ------------------------------------------------------------
    def entry(self, block: int) -> tuple[int, bytes, bytes, int]:
        return _ENTRY.unpack_from(self.table, block * ENTRY)

    def _aad(self, block: int, version: int) -> bytes:
        return _AAD.pack(self.disk_id, block, version)

    def read_block(self, block: int) -> bytes:
        """The plaintext of `block`; raises DiskTamper (and counts it) if the host changed it."""
        return self.read_blocks(block, 1)[0]

    def read_blocks(self, first: int, count: int) -> list[bytes]:
        """Plaintexts of `count` blocks from `first`: one pread per run of adjacent slots."""
        end = first + count
        if not 0 <= first <= end <= self.blocks:
            raise ValueError(f"blocks {first}+{count} outside the disk")
        out: list[bytes] = []
        t, b = self.table, first
        while b < end:
            slot = t[b * ENTRY + 36]
            if not any(t[b * ENTRY:b * ENTRY + 8]):       # version 0: never written
                out.append(ZERO_BLOCK)
                b += 1
                continue
            run = b + 1
            while run < end and t[run * ENTRY + 36] == slot and any(t[run * ENTRY:run * ENTRY + 8]):
                run += 1
            got = self.io.pread((run - b) * SLOT, self.layout.slot(b, slot))
            buf = bytearray((run - b) * SLOT + 16)    # + room for the last block's tag
            buf[:len(got)] = got
            for i in range(b, run):
                out.append(self._open(i, buf, (i - b) * SLOT, len(got)))
            b = run
        return out

    def _open(self, block: int, buf: bytearray, at: int, got: int) -> bytes:
        """Check and decrypt the slot at buf[at:] (`got` bytes of buf came from the file)."""
        version, nonce, tag, _ = self.entry(block)
        end = at + SLOT
        if not self.verify:
            return _decrypt_unchecked(self._aead_key, nonce, bytes(buf[at + SLOT_HEADER:end]))
        # The tag goes right after the ciphertext, over the next slot's header for a moment.
        saved = bytes(buf[end:end + 16])
        buf[end:end + 16] = tag
        try:
            if got < end:
                raise InvalidTag
            return self._aead.decrypt(nonce, memoryview(buf)[at + SLOT_HEADER:end + 16],
                                      self._aad(block, version))
        except InvalidTag:
            self.tampered += 1
            raw = bytes(buf[at:min(end, got)])
            raise DiskTamper(block, *self._classify(block, version, raw)) from None
        finally:
            buf[end:end + 16] = saved

    def _classify(self, block: int, version: int, raw: bytes) -> tuple[str, str]:
        """Best-effort name of what the host did (the slot header is not trusted)."""
        if len(raw) != SLOT or not any(raw):
            return "missing", "slot truncated or zeroed"
        b, v, _, _ = _SLOTHDR.unpack_from(raw)
        if b != block:
            return "swapped", f"slot holds block {b}"
        if v < version:
            return "stale", f"slot holds version {v}, expected {version}"
        return "altered", "authentication tag does not verify"

    def write_block(self, block: int, data) -> None:
        self.write_blocks(block, data)

    def write_blocks(self, first: int, data) -> None:
        """Seal len(data) // 4096 blocks from `first` (any buffer), each as its next version in
        its uncommitted slot; one pwrite per run of adjacent slots."""
        n, rest = divmod(len(data), BLOCK)
        if rest or not n or not 0 <= first <= first + n <= self.blocks:
            raise ValueError(f"bad block write {first} len {len(data)}")
        if self.writes + n > MAX_WRITES:
            raise DiskError("this disk key has sealed 2**32 blocks; re-key it (export/import)")
        self._check_owner()                  # an old copy must not overwrite the new one's slots
        buf = bytearray(n * SLOT + 16)       # clear header + ciphertext per slot, back to back
        mv, src = memoryview(buf), memoryview(data)
        sealed = []
        for i in range(n):
            b, at = first + i, i * SLOT
            version, slot, nonce = self.entry(b)[0] + 1, 1 - self.committed_slot[b], os.urandom(12)
            if self.nonce_log is not None:
                self.nonce_log.append(nonce)
            self._aead.encrypt_into(nonce, src[i * BLOCK:(i + 1) * BLOCK], self._aad(b, version),
                                    mv[at + SLOT_HEADER:at + SLOT + 16])
            tag = bytes(buf[at + SLOT:at + SLOT + 16])   # next slot's header overwrites it
            _SLOTHDR.pack_into(buf, at, b, version, nonce, tag)
            sealed.append((version, nonce, tag, slot))
        i = 0
        while i < n:
            j = i + 1
            while j < n and sealed[j][3] == sealed[i][3]:
                j += 1
            self.io.pwrite(mv[i * SLOT:j * SLOT], self.layout.slot(first + i, sealed[i][3]))
            i = j
        for i, entry in enumerate(sealed):     # the table names them only once written
            b = first + i
            _ENTRY.pack_into(self.table, b * ENTRY, *entry)
            self.pending.add(b)
            page = b // ENTRIES_PER_PAGE
            self.dirty_pages.add(page)
            self.behind[0].add(page)
            self.behind[1].add(page)
        self.writes += n

    # ---- commit --------------------------------------------------------------
    def flush(self) -> None:
        """Make every write so far durable and the new table the committed one."""
        if self.pending:
            self._commit()

    def _check_owner(self) -> int:
        """This copy's owner generation, unless a newer copy's header sits where this copy
        writes its next one (it claimed the disk): then DiskTamper `fenced`."""
        owner = self._owner() if self._owner is not None else self.owner
        if self._owner is None:
            return owner
        raw = self.io.pread(_META.size, self.layout.meta[1 - self.active]).ljust(_META.size, b"\0")
        magic, *_, theirs = _META.unpack(raw)
        if magic == META_MAGIC and theirs > owner:
            raise DiskTamper(-1, "fenced", f"copy {theirs} of the VM took this disk over; "
                                           f"this is copy {owner}: it writes nothing more")
        return owner

    def _commit(self) -> None:
        lay = self.layout
        target = 1 - self.active
        owner = self._check_owner()
        self.io.sync()                       # data slots before the table naming them
        mv = memoryview(self.table)
        for p in self.dirty_pages:
            self.hashes[p] = sha256(mv[p * PAGE:(p + 1) * PAGE]).digest()
        self.dirty_pages.clear()
        for p in sorted(self.behind[target]):
            self.io.pwrite(bytes(mv[p * PAGE:(p + 1) * PAGE]), lay.meta[target] + PAGE * (1 + p))
        gen = self.generation + 1
        self.io.pwrite(_meta_header(self._mac_key, self.disk_id, gen, self.writes, self.blocks,
                                    self.hashes, owner), lay.meta[target])
        self.io.sync()
        if self._witness is not None:        # recorded before the FLUSH is acknowledged
            self._witness.advance(self.disk_id, gen)
        self.behind[target].clear()
        self.generation, self.active, self.owner = gen, target, owner
        for b in self.pending:
            self.committed_slot[b] = self.table[b * ENTRY + 36]
        self.pending.clear()
