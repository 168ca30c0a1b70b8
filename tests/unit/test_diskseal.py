"""The sealed disk format: round trips, every kind of tampering, crashes at hundreds of points.

The crash loops drive `SealedDisk` on a `FaultFile` (tests/disk_faults.py): a workload
of writes and flushes is cut at every I/O operation in turn, both as SIGKILL (the
page cache survives) and as a power cut (only synced data plus any subset of the rest).
After each cut the disk must open without a tampering alarm, every block must read as
the value of its last acknowledged flush or a value written after it, and no nonce
may ever repeat under the key.
"""
from __future__ import annotations

import os
import random

import pytest

from sealvm.core.diskseal import (BLOCK, SLOT, DiskError, DiskTamper, FileIO, SealedDisk,
                                  ZERO_BLOCK, format_disk)
from tests.disk_faults import FaultFile, Killed

KEY = bytes(range(32))
BLOCKS = 300        # 5 table pages: page boundaries are crossed


def blk(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (BLOCK // 8)


def fresh(blocks: int = BLOCKS, **kw) -> tuple[FaultFile, SealedDisk]:
    f = FaultFile()
    format_disk(f, KEY, blocks)
    return f, SealedDisk(f, KEY, **kw)


def slot_of(disk: SealedDisk, b: int) -> int:
    return disk.layout.slot(b, disk.entry(b)[3])


def test_round_trip_unwritten_blocks_are_zero_and_flush_persists():
    f, d = fresh()
    assert d.read_block(7) == ZERO_BLOCK
    d.write_block(7, blk(1))
    d.write_block(299, blk(2))
    assert d.read_block(7) == blk(1)
    d.flush()
    d.write_block(7, blk(3))
    d.flush()
    again = SealedDisk(f, KEY)
    assert again.read_block(7) == blk(3) and again.read_block(299) == blk(2)
    assert again.generation == 3


def test_real_file_is_sparse_and_holds_no_plaintext(tmp_path):
    fd = os.open(tmp_path / "d.img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        format_disk(FileIO(fd), KEY, 2560)             # 10 MiB
        d = SealedDisk(FileIO(fd), KEY)
        secret = b"PLAINTEXT-CANARY" * 256
        d.write_block(100, secret)
        d.flush()
        st = os.fstat(fd)
        assert st.st_blocks * 512 < st.st_size // 4    # sparse
        assert b"PLAINTEXT-CANARY" not in (tmp_path / "d.img").read_bytes()
    finally:
        os.close(fd)


def test_wrong_key_is_refused():
    f, _ = fresh()
    with pytest.raises(DiskTamper, match="superblock"):
        SealedDisk(f, bytes(32))


def test_flipped_ciphertext_byte_is_altered():
    f, d = fresh()
    d.write_block(3, blk(3))
    f.view[slot_of(d, 3) + 100] ^= 1
    with pytest.raises(DiskTamper) as e:
        d.read_block(3)
    assert (e.value.block, e.value.kind) == (3, "altered")
    assert d.tampered == 1


def test_swapped_blocks_are_detected_both_ways():
    f, d = fresh()
    d.write_block(3, blk(3))
    d.write_block(4, blk(4))
    a, b = slot_of(d, 3), slot_of(d, 4)
    f.view[a:a + SLOT], f.view[b:b + SLOT] = f.view[b:b + SLOT], f.view[a:a + SLOT]
    for n, other in ((3, 4), (4, 3)):
        with pytest.raises(DiskTamper) as e:
            d.read_block(n)
        assert e.value.kind == "swapped" and f"block {other}" in str(e.value)


def test_older_version_of_one_block_is_stale():
    f, d = fresh()
    d.write_block(5, blk(1))
    d.flush()
    old = bytes(f.view[slot_of(d, 5):slot_of(d, 5) + SLOT])
    d.write_block(5, blk(2))
    d.flush()
    d.write_block(5, blk(3))    # the third version goes back to the first one's slot
    d.flush()
    f.view[slot_of(d, 5):slot_of(d, 5) + SLOT] = old
    with pytest.raises(DiskTamper) as e:
        d.read_block(5)
    assert e.value.kind == "stale"
    assert SealedDisk(f, KEY).generation == d.generation   # the tree is intact: only data


def test_zeroed_slot_is_missing_and_truncated_or_extended_file_refused():
    f, d = fresh()
    d.write_block(9, blk(9))
    d.flush()
    f.view[slot_of(d, 9):slot_of(d, 9) + SLOT] = bytes(SLOT)
    with pytest.raises(DiskTamper) as e:
        d.read_block(9)
    assert e.value.kind == "missing"
    short = FaultFile(bytes(f.view[:-SLOT]))
    with pytest.raises(DiskTamper, match="truncated"):
        SealedDisk(short, KEY)
    long = FaultFile(bytes(f.view) + b"x")
    with pytest.raises(DiskTamper, match="extended"):
        SealedDisk(long, KEY)


def test_table_tampering_makes_that_copy_invalid_and_both_copies_refuse():
    f, d = fresh()
    d.write_block(1, blk(1))
    d.flush()                    # generation 2 in copy 1, generation 1 in copy 0
    lay = d.layout
    f.view[lay.meta[1] + 4096 + 70] ^= 1      # the table entry of block 1, copy 1
    older = SealedDisk(f, KEY)
    assert older.generation == 1 and older.read_block(1) == ZERO_BLOCK
    f.view[lay.meta[0] + 4096 + 5] ^= 1
    with pytest.raises(DiskTamper, match="neither metadata copy"):
        SealedDisk(f, KEY)


def test_whole_disk_rollback_needs_a_generation_floor():
    f, d = fresh()
    d.write_block(2, blk(1))
    d.flush()
    snapshot = bytes(f.view)
    d.write_block(2, blk(2))
    d.flush()
    seen = d.generation
    rolled = FaultFile(snapshot)
    # Without a trusted floor the older disk is indistinguishable from a valid one ...
    assert SealedDisk(rolled, KEY).read_block(2) == blk(1)
    # ... with the owner's record of the last generation it is refused.
    with pytest.raises(DiskTamper) as e:
        SealedDisk(rolled, KEY, min_generation=seen)
    assert e.value.kind == "rollback"


def test_rollback_while_open_is_caught_by_the_in_memory_tree():
    f, d = fresh()
    d.write_block(2, blk(1))
    d.flush()
    snapshot = bytes(f.view)
    d.write_block(2, blk(2))
    d.flush()
    d.write_block(2, blk(3))      # back in the slot that held version 1
    d.flush()
    f.view[:] = snapshot          # the host restores every byte it holds
    with pytest.raises(DiskTamper) as e:
        d.read_block(2)
    assert e.value.kind == "stale"


def test_integrity_switch_off_returns_tampered_data_silently():
    """The paired control of the tampering tests: the same flip without the check."""
    f, d = fresh(verify=False)
    d.write_block(3, blk(3))
    f.view[slot_of(d, 3) + 64 + 8] ^= 0xFF
    data = d.read_block(3)
    assert data != blk(3) and data[8] == blk(3)[8] ^ 0xFF


def test_bad_arguments():
    _, d = fresh()
    with pytest.raises(ValueError):
        d.read_block(BLOCKS)
    with pytest.raises(ValueError):
        d.write_block(0, b"short")
    with pytest.raises(DiskError):
        format_disk(FaultFile(), b"short key", 1)


# ---- crash consistency ------------------------------------------------------------------
def workload(disk: SealedDisk, rng: random.Random, model: "Model", steps: int) -> None:
    for _ in range(steps):
        r = rng.random()
        if r < 0.7:
            b = rng.randrange(disk.blocks)
            v = rng.randrange(1, 1 << 62)
            model.written(b, v)
            disk.write_block(b, blk(v))
        elif r < 0.85:
            disk.flush()
            model.acked()
        else:
            b = rng.randrange(disk.blocks)
            want = blk(model.current[b]) if b in model.current else ZERO_BLOCK
            assert disk.read_block(b) == want


class Model:
    """What a block may read as after a crash: its last acknowledged value or a later one."""

    def __init__(self):
        self.committed: dict[int, int] = {}
        self.current: dict[int, int] = {}
        self.since: dict[int, set[int]] = {}

    def written(self, b: int, v: int) -> None:
        self.current[b] = v
        self.since.setdefault(b, set()).add(v)

    def acked(self) -> None:
        self.committed = dict(self.current)
        self.since = {}

    def check(self, disk: SealedDisk) -> None:
        for b in set(self.committed) | set(self.since):
            got = disk.read_block(b)
            allowed = {blk(self.committed[b]) if b in self.committed else ZERO_BLOCK}
            allowed |= {blk(v) for v in self.since.get(b, ())}
            assert got in allowed, f"block {b} lost its acknowledged value"


def run_until_killed(seed: int, kill_at: int | None, nonces: list) -> tuple[FaultFile, Model, bool]:
    rng = random.Random(seed)
    f, disk = fresh(60, nonce_log=nonces)
    f.base = f.ops
    f.kill_at = None if kill_at is None else f.ops + kill_at
    model = Model()
    try:
        workload(disk, rng, model, 200)
        return f, model, False
    except Killed:
        return f, model, True


def test_kill_and_power_cut_at_every_io_operation_lose_no_acknowledged_write():
    nonces: list[bytes] = []
    f, _, killed = run_until_killed(1, None, nonces)
    assert not killed
    total = f.ops - f.base
    assert total >= 200
    points = 0
    for kill_at in range(1, total + 1):
        f, model, killed = run_until_killed(1, kill_at, nonces)
        assert killed
        cut_rng = random.Random(kill_at)
        for image in (f.killed_copy(), f.power_cut_copy(cut_rng), f.power_cut_copy(cut_rng)):
            reopened = SealedDisk(image, KEY, nonce_log=nonces)   # never a tampering alarm
            model.check(reopened)
            # the disk goes on working after the crash: a new write, flushed, then reopened
            reopened.write_block(0, blk(kill_at))
            reopened.flush()
            assert SealedDisk(image, KEY).read_block(0) == blk(kill_at)
            points += 1
    assert points >= 3 * 200
    assert len(nonces) == len(set(nonces)), "a nonce was used twice under one key"


# ---- fencing: once a newer copy of the VM opened the disk, the old one commits nothing ----
@pytest.mark.parametrize("fencing", [True, False], ids=["fenced", "control-no-fencing"])
def test_an_old_copy_cannot_commit_after_a_newer_copy_claimed_the_disk(fencing):
    f, a = fresh(owner=(lambda: 3) if fencing else None)
    a.write_block(1, blk(1))
    a.flush()
    b = SealedDisk(f, KEY, owner=(lambda: 4) if fencing else None)   # restored elsewhere
    assert b.read_block(1) == blk(1)
    b.write_block(1, blk(2))
    b.flush()
    if fencing:                       # the old copy, still running on its host
        with pytest.raises(DiskTamper) as ei:
            a.write_block(1, blk(3))
        assert ei.value.kind == "fenced" and "copy 4" in str(ei.value)
        a.flush()                                      # nothing of the old copy's to commit
        assert SealedDisk(f, KEY).read_block(1) == blk(2)
        with pytest.raises(DiskTamper, match="fenced"):
            SealedDisk(f, KEY, owner=lambda: 3)        # and cannot open it again
        assert SealedDisk(f, KEY, owner=lambda: 4).owner == 4
    else:
        a.write_block(1, blk(3))
        a.flush()                                      # the split brain fencing stops:
        assert SealedDisk(f, KEY).read_block(1) == blk(3)   # the old copy's write wins


def test_a_newer_copy_claims_the_disk_when_it_opens_and_the_stamp_is_authenticated():
    f, a = fresh(owner=lambda: 2)
    assert a.owner == 2 and a.generation == 2          # claimed at once (format says 0)
    again = SealedDisk(f, KEY)
    assert again.owner == 2
    # The stamp is under the root MAC: changing it in place makes that copy not verify.
    hdr = f.pread(64, again.layout.meta[again.active])
    f.pwrite(hdr[:32] + (9).to_bytes(8, "little") + hdr[40:], again.layout.meta[again.active])
    assert SealedDisk(f, KEY).generation == 1          # the other (older, intact) copy


# ---- the launcher's witness: whole-disk rollback between runs ----------------------------
def witnessed(tmp_path):
    from sealvm.launcher.witness import Store, serve
    import socket
    import threading
    ours, theirs = socket.socketpair()
    store = Store(tmp_path / "witness")
    threading.Thread(target=serve, args=(ours, store), daemon=True).start()
    from sealvm.core.diskseal import FdWitness
    return FdWitness(theirs.detach()), store


def test_the_witness_catches_a_whole_disk_rollback_and_follows_every_commit(tmp_path):
    w, store = witnessed(tmp_path)
    f, d = fresh(witness=w)
    assert store.read(d.disk_id) == 1                 # opened: the record catches up
    earlier = bytes(f.view)                           # everything the host can write, copied
    d.write_block(3, blk(1))
    d.flush()
    assert store.read(d.disk_id) == 2 == d.generation
    f.view[:] = earlier                               # ... and put back
    with pytest.raises(DiskTamper) as ei:
        SealedDisk(f, KEY, witness=w)
    assert ei.value.kind == "rollback" and "launcher" in str(ei.value)
    assert SealedDisk(f, KEY).generation == 1         # control: without the witness it opens


def test_a_commit_cut_before_its_record_is_taken_up_at_the_next_open(tmp_path):
    w, store = witnessed(tmp_path)
    f, d = fresh(witness=w)
    d.write_block(3, blk(1))
    d._witness = None                                 # the record never made it (a crash)
    d.flush()
    assert store.read(d.disk_id) == 1 and d.generation == 2
    again = SealedDisk(f, KEY, witness=w)             # newer than the record: fine, and recorded
    assert again.generation == 2 and store.read(d.disk_id) == 2


def test_a_lost_witness_fails_the_commit(tmp_path):
    from sealvm.core.diskseal import FdWitness
    import socket
    a, b = socket.socketpair()
    b.close()
    w = FdWitness(a.detach())
    f = FaultFile()
    format_disk(f, KEY, BLOCKS)
    with pytest.raises(DiskError, match="witness"):
        SealedDisk(f, KEY, witness=w)
