"""A sealed disk through the daemon: `sealvm vm create --disk`, the daemon as an unprivileged
uid opens the file and hands it to the core; the guest's data persists across VMs."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import guest_image
from tests.diskrun import Disk
from tests.e2e.conftest import HOST_UID, processes_of_uids


def wait_stopped(hostd, name, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with hostd.api() as api:
            v = api.get(f"/v1/vms/{name}").json()
        if v["state"] == "stopped":
            return v
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not stop")


@pytest.fixture
def disk(monkeypatch):
    """Made before `hostd` starts: its environment carries the test-mode disk key."""
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="sealvm-disk-"))
    os.chmod(base, 0o755)                         # the daemon's uid must reach the file
    d = Disk(base)
    os.chown(d.path, HOST_UID, HOST_UID)          # the daemon's file, as in production
    for k, v in d.env().items():
        monkeypatch.setenv(k, v)
    yield d
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("hostd", ["64200-64209"], indirect=True)
def test_vm_create_with_a_disk(disk, hostd):
    blk = str(guest_image("blkbench"))
    r = hostd.cli("create", blk, "--name", "w", "--disk", str(disk.path), "--start",
                  "--cmdline", "tests=seqwrite qd=8 count=64 seed=5")
    assert r.returncode == 0, r.stderr
    v = wait_stopped(hostd, "w")
    assert v["exit_status"] == 0 and v["disk"] == str(disk.path)
    r = hostd.cli("create", blk, "--name", "r", "--disk", str(disk.path), "--start",
                  "--cmdline", "tests=seqread qd=8 count=64 seed=5")
    assert r.returncode == 0, r.stderr
    assert wait_stopped(hostd, "r")["exit_status"] == 0
    assert b"errors=0 mismatches=0" in hostd.cli("console", "r").stdout
    r = hostd.cli("create", blk, "--name", "bad", "--disk", "/nonexistent.img")
    assert r.returncode != 0 and b"cannot open the disk" in r.stderr
    # a disk the core refuses (wrong key): the VM fails to start, and its core goes away
    (disk.dir / "other").mkdir(mode=0o755)
    other = Disk(disk.dir / "other")
    os.chown(other.path, HOST_UID, HOST_UID)
    r = hostd.cli("create", blk, "--name", "wrong", "--disk", str(other.path), "--start")
    assert r.returncode != 0 and b"disk refused" in r.stderr
    assert hostd.cli("delete", "wrong").returncode == 0
    deadline = time.monotonic() + 15
    while processes_of_uids(64200, 64209) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_of_uids(64200, 64209), "a core outlived its VM"
