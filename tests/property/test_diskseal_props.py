"""Property tests of the sealed disk against a plain dict model.

Random sequences of write / read / flush / crash (SIGKILL or power cut) / reopen on a
small disk: every read agrees with the model, a crash keeps every acknowledged write
and may keep any later one, the disk always reopens without a tampering alarm, and
any single byte the host changes in a written block's slot is refused on read.
"""
from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealvm.core.diskseal import BLOCK, SLOT, DiskTamper, SealedDisk, ZERO_BLOCK, format_disk
from tests.disk_faults import FaultFile

KEY = bytes(range(1, 33))
BLOCKS = 70
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, BLOCKS - 1), st.integers(1, 2**60)),
    st.tuples(st.just("read"), st.integers(0, BLOCKS - 1), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
    st.tuples(st.sampled_from(["kill", "powercut", "reopen"]), st.just(0), st.integers(0, 2**32)),
)


def blk(v: int) -> bytes:
    return v.to_bytes(8, "little") * (BLOCK // 8)


@SETTINGS
@given(st.lists(op, max_size=60))
def test_disk_agrees_with_a_dict_through_crashes(ops):
    f = FaultFile()
    format_disk(f, KEY, BLOCKS)
    disk = SealedDisk(f, KEY)
    acked: dict[int, int] = {}          # value at the last acknowledged flush
    maybe: dict[int, set[int]] = {}     # values written since
    current: dict[int, int] = {}        # what a read must return while the disk is open
    for kind, b, v in ops:
        if kind == "write":
            disk.write_block(b, blk(v))
            current[b] = v
            maybe.setdefault(b, set()).add(v)
        elif kind == "read":
            assert disk.read_block(b) == (blk(current[b]) if b in current else ZERO_BLOCK)
        elif kind == "flush":
            disk.flush()
            acked, maybe = dict(current), {}
        else:
            if kind == "reopen":
                disk.flush()
                acked, maybe = dict(current), {}
                f = f.killed_copy()
            else:
                f = f.killed_copy() if kind == "kill" else f.power_cut_copy(random.Random(v))
            disk = SealedDisk(f, KEY)
            current = {}
            for blk_no in set(acked) | set(maybe):
                got = disk.read_block(blk_no)
                allowed = {blk(acked[blk_no]) if blk_no in acked else ZERO_BLOCK}
                allowed |= {blk(x) for x in maybe.get(blk_no, ())}
                assert got in allowed
                if got != ZERO_BLOCK:
                    current[blk_no] = int.from_bytes(got[:8], "little")
            # what survived is now the state to build on
            acked = {k: x for k, x in current.items()}
            maybe = {}
            disk.flush()


@SETTINGS
@given(st.integers(0, BLOCKS - 1), st.integers(0, SLOT - 1), st.integers(1, 255))
def test_any_changed_byte_of_a_written_block_is_refused(b, offset, xor):
    f = FaultFile()
    format_disk(f, KEY, BLOCKS)
    disk = SealedDisk(f, KEY)
    disk.write_block(b, blk(b + 1))
    at = disk.layout.slot(b, disk.entry(b)[3]) + offset
    f.view[at] ^= xor
    if offset < 64:      # the clear slot header is not used for the check: still readable
        assert disk.read_block(b) == blk(b + 1)
    else:
        try:
            disk.read_block(b)
        except DiskTamper as e:
            assert e.block == b
        else:
            raise AssertionError("a changed ciphertext byte was accepted")
