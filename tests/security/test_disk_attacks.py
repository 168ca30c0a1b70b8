"""Attacks by the host on a running VM's sealed disk, each with its paired control.

The host owns the disk file: it may flip bytes, swap blocks, put back an older version
of one block, restore the whole file from an earlier copy, truncate or extend it.  Each
attack is made against a real core running blkbench: the guest must get an I/O error
for the touched blocks (never wrong data), the core must report the block and the kind
of tampering, the counter in QUERY must move, and the VM must keep running (blkbench
reads every other block and prints its summary).  The paired control runs the same
attack with exactly one defence off (SEALVM_INSECURE_TEST_DISABLE=disk_integrity): the
guest then silently receives data that is not what it wrote.

Whole-disk rollback between two runs (every file the host can write restored together)
is caught by the launcher's record of the disk's newest committed generation, which the
host cannot write (docs/sealed-disk.md); its control shows the core alone would serve
the older disk, and that the owner's own record still catches it.  A canary the guest writes never appears in the
host's file; the control writes the same canary through QEMU to a raw file, where it does.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, guest_image, needs_kvm, sealvm
from tests.diskrun import Disk, result

pytestmark = needs_kvm

N = 64                       # blocks the guest writes and reads back
READ = f"tests=seqread qd=4 count={N}"


@pytest.fixture
def disk(tmp_path):
    d = Disk(tmp_path)
    for seed in (1, 2):      # two versions: every block's older slot holds version 1
        r = d.run(f"tests=seqwrite qd=8 count={N} seed={seed}")
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    return d


def detected(r, blocks: set[int], kind: str) -> None:
    out, err = r.stdout.decode(), r.stderr.decode()
    w = result(out, "seqread")
    assert r.returncode == 4, out + err
    assert int(w["errors"]) == len(blocks) and w["mismatches"] == "0", out
    errs = {int(l.split("sector=")[1].split()[0]) // 8 for l in out.splitlines()
            if l.startswith("blkbench ioerr")}
    first = set(sorted(blocks)[:16])     # the guest prints, and the core reports, 16 in full
    assert errs == first
    for b in first:
        assert f"TAMPERING DETECTED: block {b}: {kind}" in err, err
    assert f"{len(blocks)} tampering detected" in err
    assert "blkbench done" in out                        # the VM kept running


def undetected(r) -> None:
    out, err = r.stdout.decode(), r.stderr.decode()
    w = result(out, "seqread")
    assert int(w["mismatches"]) > 0 and w["errors"] == "0", out
    assert "TAMPERING" not in err


def flip(d: Disk, block: int) -> None:
    off = d.slot_offset(block) + 64 + 1000
    d.write_at(off, bytes([d.read_slot(off)[0] ^ 0x5A]))


def swap(d: Disk, a: int, b: int) -> None:
    oa, ob = d.slot_offset(a), d.slot_offset(b)
    sa, sb = d.read_slot(oa), d.read_slot(ob)
    d.write_at(oa, sb)
    d.write_at(ob, sa)


def stale(d: Disk, block: int) -> None:
    d.write_at(d.slot_offset(block), d.read_slot(d.slot_offset(block, "older")))


@pytest.mark.attack(adversary='host storage', asset='sealed disk',
                    technique='flip one byte of a block',
                    defence='disk_integrity',
                    outcome="the guest gets an I/O error for that block; the core names it 'altered'",
                    control='self:disable')
@pytest.mark.parametrize("disable", ["", "disk_integrity"])
def test_flipped_byte(disk, disable):
    flip(disk, 5)
    r = disk.run(READ + " seed=2", disable=disable)
    detected(r, {5}, "altered") if not disable else undetected(r)


@pytest.mark.attack(adversary='host storage', asset='sealed disk',
                    technique='swap two blocks',
                    defence='disk_integrity',
                    outcome="I/O errors for both blocks, named 'swapped'",
                    control='self:disable')
@pytest.mark.parametrize("disable", ["", "disk_integrity"])
def test_swapped_blocks(disk, disable):
    swap(disk, 10, 20)
    r = disk.run(READ + " seed=2", disable=disable)
    detected(r, {10, 20}, "swapped") if not disable else undetected(r)


@pytest.mark.attack(adversary='host storage', asset='sealed disk',
                    technique='put back an older version of one block',
                    defence='disk_integrity',
                    outcome="I/O error, named 'stale'",
                    control='self:disable')
@pytest.mark.parametrize("disable", ["", "disk_integrity"])
def test_older_version_of_one_block(disk, disable):
    stale(disk, 33)
    r = disk.run(READ + " seed=2", disable=disable)
    detected(r, {33}, "stale") if not disable else undetected(r)


def attack_while_running(d: Disk, attack, disable: str = "", seed: int = 3):
    """blkbench writes version `seed`, idles while `attack()` runs, then reads back."""
    p = d.popen(f"tests=seqwrite,sleep,seqread qd=4 count={N} seed={seed} sleep_ms=3000",
                disable=disable)
    lines = []
    for raw in p.stdout:
        lines.append(raw)
        if raw.startswith(b"blkbench sleeping"):
            attack()
            break
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, b"".join(lines) + out, err)


@pytest.mark.attack(adversary='host storage', asset='sealed disk',
                    technique='restore the whole file from an earlier copy while the VM runs',
                    defence='disk_integrity',
                    outcome="every restored block refused as 'stale'; the VM keeps running",
                    control='self:disable')
@pytest.mark.parametrize("disable", ["", "disk_integrity"])
def test_restore_every_host_file_from_an_earlier_copy_while_running(disk, tmp_path, disable):
    copy = tmp_path / "earlier.img"
    shutil.copyfile(disk.path, copy)       # after versions 1 and 2

    def restore():                         # same inode: the core's fd sees it
        with open(disk.path, "r+b") as f:
            f.write(copy.read_bytes())
    r = attack_while_running(disk, restore, disable)
    if disable:
        undetected(r)
    else:
        detected(r, set(range(N)), "stale")   # version 3 went where version 1 was


@pytest.mark.attack(adversary='host storage', asset='sealed disk',
                    technique='truncate the disk file while the VM runs',
                    defence='disk_integrity',
                    outcome="'missing' blocks refused; the next start refused 'truncated'",
                    control='self:disable')
@pytest.mark.parametrize("disable", ["", "disk_integrity"])
def test_truncated_file_while_running(disk, disable):
    keep = disk.slot_offset(N // 2, "older")   # where block 32's new version goes

    def truncate():
        os.truncate(disk.path, keep)
    r = attack_while_running(disk, truncate, disable)
    if disable:
        undetected(r)
        return
    out = r.stdout.decode()
    cut = {int(l.split("sector=")[1].split()[0]) // 8 for l in out.splitlines()
           if l.startswith("blkbench ioerr")}
    assert cut and all("missing" in l for l in r.stderr.decode().splitlines()
                       if "TAMPERING" in l)
    assert r.returncode == 4 and "blkbench done" in out
    # and the truncated disk is refused at the next start
    r = disk.run(READ + " seed=3")
    assert r.returncode == 125 and "truncated" in r.stderr.decode()


@pytest.mark.attack(adversary='host storage', asset='sealed disk',
                    technique='extend the disk file',
                    defence='disk_integrity',
                    outcome="refused at start: 'extended' (exit 125)",
                    control='self:disable')
@pytest.mark.parametrize("disable", ["", "disk_integrity"])
def test_extended_file_is_refused_at_start(disk, disable):
    with open(disk.path, "ab") as f:
        f.write(b"\0" * 4096)
    r = disk.run(READ + " seed=2", disable=disable)
    if disable:
        assert r.returncode == 0, r.stderr.decode()          # opened and served as if whole
    else:
        assert r.returncode == 125 and "extended" in r.stderr.decode()


@pytest.mark.attack(adversary='host storage', asset='sealed disk',
                    technique='roll back every file the daemon uid can write between two runs',
                    defence='disk_witness',
                    outcome="refused at open: 'rollback'",
                    control='self:disable')
@pytest.mark.parametrize("disable", ["", "disk_witness"])
def test_rollback_of_everything_between_runs(disk, tmp_path, disable):
    """The host copies every file it can write (the image holds both metadata copies;
    there is no other counter file), lets the VM write and commit, then puts the copy
    back.  The next core finds the disk older than the generation this host's launcher
    recorded at the last commit, and refuses it.  Control: with the launcher's witness
    off, the core serves the rolled-back disk; the owner's own record still catches it."""
    copy = tmp_path / "earlier.img"
    shutil.copyfile(disk.path, copy)
    r = disk.run(f"tests=seqwrite qd=8 count={N} seed=3", disable=disable)
    assert r.returncode == 0, r.stderr.decode()
    v = sealvm("disk", "verify", str(disk.path), "--key-file", str(disk.key_file))
    assert v.returncode == 0
    generation = int(v.stdout.decode().rsplit("generation", 1)[1])
    shutil.copyfile(copy, disk.path)                        # the host rolls everything back
    r = disk.run(READ + " seed=2", disable=disable)
    if not disable:
        assert r.returncode == 125, r.stdout.decode() + r.stderr.decode()
        assert "rollback" in r.stderr.decode() and "launcher" in r.stderr.decode()
        return
    assert r.returncode == 0, r.stderr.decode()             # the control: served
    # The owner, who recorded the generation, sees the rollback.
    v = sealvm("disk", "verify", str(disk.path), "--key-file", str(disk.key_file),
               "--min-generation", str(generation))
    assert v.returncode == 1 and "rollback" in v.stderr.decode()


@pytest.mark.attack(adversary='host storage', asset='sealed disk',
                    technique='search the disk file for a canary the guest wrote',
                    defence='disk sealing (AES-GCM per block)',
                    outcome='zero occurrences',
                    control='inline')
def test_canary_written_by_the_guest_is_never_in_the_host_file(disk, tmp_path):
    r = disk.run(f"tests=seqwrite,seqread canary=1 check=0 qd=8 count={N} seed=4")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert b"SEALVM-CANARY-" not in disk.path.read_bytes()
    # control: the same guest writing the same canary to a plain raw disk (QEMU virtio-blk)
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("no QEMU for the raw-disk control")
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(4 << 20))
    q = subprocess.run(["sh", str(ROOT / "guests/run-qemu.sh"), str(guest_image("blkbench")), "kvm",
                        "tests=seqwrite", "canary=1", f"count={N}", "seed=4"],
                       env={**os.environ, "DISK": str(raw), "TIMEOUT": "60"},
                       capture_output=True, timeout=90)
    assert q.returncode == 0, q.stdout.decode() + q.stderr.decode()
    assert b"SEALVM-CANARY-" in raw.read_bytes()
