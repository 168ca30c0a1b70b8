"""`sealvm disk create/import/export/verify` with the VM's disk key from the owner's directory,
and the owner's generation record that catches a whole-disk rollback."""
from __future__ import annotations

import os
import shutil

import pytest

from sealvm.core.diskseal import BLOCK, FileIO, SealedDisk
from sealvm.owner import keys, manifest
from sealvm.wire.attest import parse_vm_keys
from tests.conftest import sealvm


@pytest.fixture
def owner(tmp_path):
    d = tmp_path / "owner"
    keys.init(d)
    g = tmp_path / "g.elf"
    g.write_bytes(b"guest")
    manifest.sign_guest(d, g, "web", devices=["blk", "rng"])
    return d


def disk_cli(owner, *args):
    return sealvm("disk", *args, "--owner", str(owner), "--vm", "web")


def test_import_export_round_trip_with_the_vms_key(owner, tmp_path):
    raw = tmp_path / "in.raw"
    data = os.urandom(5 * BLOCK) + bytes(3 * BLOCK) + b"tail"       # not a whole block
    raw.write_bytes(data)
    img = tmp_path / "d.img"
    r = disk_cli(owner, "import", str(raw), "-o", str(img))
    assert r.returncode == 0, r.stderr.decode()
    assert data[:BLOCK] not in img.read_bytes()
    key = parse_vm_keys(manifest.load_vm_keys(owner, "web"))["disk"]
    fd = os.open(img, os.O_RDONLY)
    d = SealedDisk(FileIO(fd), key)
    os.close(fd)
    assert d.blocks == 9 and d.entry(6)[0] == 0         # zero blocks stay holes
    out = tmp_path / "out.raw"
    r = disk_cli(owner, "export", str(img), "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == data.ljust(9 * BLOCK, b"\0")
    r = sealvm("disk", "verify", str(img), "--key-file", str(tmp_path / "nokey"))
    assert r.returncode == 2


def test_owner_record_catches_a_rollback(owner, tmp_path):
    img = tmp_path / "d.img"
    assert disk_cli(owner, "create", "1M", "-o", str(img)).returncode == 0
    old = tmp_path / "old.img"
    shutil.copyfile(img, old)
    key = parse_vm_keys(manifest.load_vm_keys(owner, "web"))["disk"]
    fd = os.open(img, os.O_RDWR)
    d = SealedDisk(FileIO(fd), key)
    d.write_block(0, b"x" * BLOCK)
    d.flush()
    os.close(fd)
    r = disk_cli(owner, "verify", str(img))
    assert r.returncode == 0 and b"generation 2" in r.stdout
    assert (owner / "vms" / "web" / "disk-generation").read_text().strip() == "2"
    shutil.copyfile(old, img)                                     # the host rolls back
    r = disk_cli(owner, "verify", str(img))
    assert r.returncode == 1 and b"rollback" in r.stderr
    r = disk_cli(owner, "verify", str(img), "--min-generation", "0")   # control: no record
    assert r.returncode == 0


def test_tampered_block_fails_verify(owner, tmp_path):
    img = tmp_path / "d.img"
    raw = tmp_path / "in.raw"
    raw.write_bytes(os.urandom(2 * BLOCK))
    assert disk_cli(owner, "import", str(raw), "-o", str(img)).returncode == 0
    key = parse_vm_keys(manifest.load_vm_keys(owner, "web"))["disk"]
    fd = os.open(img, os.O_RDWR)
    d = SealedDisk(FileIO(fd), key)
    at = d.layout.slot(1, d.entry(1)[3]) + 500
    os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 1]), at)
    os.close(fd)
    r = disk_cli(owner, "verify", str(img))
    assert r.returncode == 1 and b"TAMPERING DETECTED: block 1" in r.stderr
