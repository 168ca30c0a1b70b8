"""The sealed disk under a real core: blkbench through `sealvm run --disk`, and SIGKILL loops.

* sequential and random I/O at queue depths 1 and 32 (direct and indirect descriptors,
  4 KiB and 64 KiB requests) all check out in the guest;
* data written and flushed in one VM is read back by the next one, and
  `sealvm disk verify` / `export` agree with the guest's pattern;
* the core is SIGKILLed at random moments while the guest writes and flushes: the disk
  always opens again without a tampering alarm, each block holds the old or the new
  generation's data, and all of it the new one once the guest saw its FLUSH complete;
  no nonce found in any slot of the file across all the rounds seals two different slots.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import time

import pytest

from sealvm.core.diskseal import BLOCK, SLOT
from tests.conftest import needs_kvm, sealvm
from tests.diskrun import Disk, pattern, result

pytestmark = needs_kvm


@pytest.fixture
def disk(tmp_path):
    return Disk(tmp_path)


@pytest.mark.parametrize("opts", ["qd=1", "qd=32 indirect=1", "qd=4 bs=65536",
                                  "qd=16 bs=16384 indirect=1"])
def test_blkbench_patterns_check_out(disk, opts):
    r = disk.run(f"tests=seqwrite,seqread,randwrite,randread {opts} count=200")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    for phase in ("seqwrite", "seqread", "randwrite", "randread"):
        w = result(out, phase)
        assert w["errors"] == "0" and w["mismatches"] == "0" and int(w["ops"]) == 200
    assert "0 tampering detected" in r.stderr.decode()


def test_data_survives_the_vm_and_matches_the_owner_export(disk, tmp_path):
    r = disk.run("tests=seqwrite qd=8 count=64 seed=7")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    r = disk.run("tests=seqread qd=8 count=64 seed=7")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert result(r.stdout.decode(), "seqread")["mismatches"] == "0"
    raw = tmp_path / "plain.raw"
    r = sealvm("disk", "export", str(disk.path), "-o", str(raw), "--key-file", str(disk.key_file))
    assert r.returncode == 0, r.stderr.decode()
    plain = raw.read_bytes()
    assert len(plain) == 4 << 20
    assert all(plain[u * BLOCK:(u + 1) * BLOCK] == pattern(7, u) for u in (0, 31, 63))
    assert plain[64 * BLOCK:] == bytes(len(plain) - 64 * BLOCK)
    # and import of that plaintext gives a disk the guest reads the same
    again = tmp_path / "again.img"
    r = sealvm("disk", "import", str(raw), "-o", str(again), "--key-file", str(disk.key_file))
    assert r.returncode == 0, r.stderr.decode()
    disk.path = again
    r = disk.run("tests=seqread qd=8 count=64 seed=7")
    assert r.returncode == 0 and result(r.stdout.decode(), "seqread")["mismatches"] == "0"


def test_a_clean_stop_commits_unflushed_writes(disk):
    r = disk.run("tests=seqwrite flush=0 qd=8 count=32 seed=9")
    assert r.returncode == 0, r.stderr.decode()
    r = disk.run("tests=seqread qd=8 count=32 seed=9")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def core_pid(run_pid: int, timeout: float = 20) -> int:
    """The core process `sealvm run` started (its child running sealvm.core)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = open(f"/proc/{pid}/stat").read()
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == run_pid and b"core/entry.py" in cmd:
                return int(pid)
        time.sleep(0.02)
    raise AssertionError("no core process found")


def test_sigkill_of_the_core_never_loses_a_flushed_write(disk):
    blocks = 1024           # the whole 4 MiB disk
    r = disk.run(f"tests=seqwrite qd=8 count={blocks} seed=1")
    assert r.returncode == 0, r.stderr.decode()
    rng = random.Random(6)
    acked_seed, kills = 1, 0
    nonces: dict[bytes, bytes] = {}     # nonce -> the one sealed slot it was used for
    for seed in range(2, 12):
        p = disk.popen(f"tests={','.join(['seqwrite'] * 40)} qd={rng.choice([1, 8, 32])} "
                       f"count={blocks} seed={seed}")
        core = core_pid(p.pid)
        time.sleep(rng.uniform(0.05, 1.5))   # the 40 passes take several seconds
        try:
            os.kill(core, signal.SIGKILL)
        except ProcessLookupError:      # it finished first: then every FLUSH completed
            pass
        out, _ = p.communicate(timeout=60)
        kills += p.returncode == 126
        flushed = b"blkbench seqwrite " in out      # printed after its FLUSH completed
        d = disk.open()                             # no tampering alarm, ever
        try:
            got = [d.read_block(u) for u in range(blocks)]
            for u in range(blocks):                 # every sealed slot still in the file
                for k in (0, 1):
                    slot = d.io.pread(SLOT, d.layout.slot(u, k))
                    if any(slot):
                        nonce = slot[16:28]
                        digest = hashlib.sha256(slot).digest()
                        assert nonces.setdefault(nonce, digest) == digest, "nonce reused"
        finally:
            os.close(d.io.fd)
        for u, data in enumerate(got):
            want = {pattern(seed, u)} if flushed else {pattern(acked_seed, u), pattern(seed, u)}
            assert data in want, f"block {u} after kill {seed} (flushed={flushed})"
        if flushed or all(data == pattern(seed, u) for u, data in enumerate(got)):
            acked_seed = seed
        else:       # a mix survived: make the next round's baseline uniform again
            r = disk.run(f"tests=seqwrite qd=8 count={blocks} seed={seed}")
            assert r.returncode == 0
            acked_seed = seed
    assert kills >= 8          # the rounds were really cut short by the kill
    r = sealvm("disk", "verify", str(disk.path), "--key-file", str(disk.key_file))
    assert r.returncode == 0, r.stderr.decode()
