"""Run the blkbench guest on a sealed disk under `sealvm run`, and look at the host's file.

The disk key is random per test and reaches the (unattested) core through the
test-mode environment switch, as no owner's broker takes part here.  `pattern`
computes, in Python, the bytes blkbench writes to a 4 KiB unit for a seed, so a
test can check the disk's contents without the guest.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

from sealvm.core.diskseal import SLOT, FileIO, SealedDisk
from tests.conftest import ROOT, guest_image, sealvm

M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    x ^= x >> 33
    x = x * 0xFF51AFD7ED558CCD & M64
    x ^= x >> 33
    x = x * 0xC4CEB9FE1A85EC53 & M64
    return x ^ (x >> 33)


def pattern(seed: int, unit: int) -> bytes:
    """blkbench's fill_unit(seed, unit) without the canary."""
    x = _mix((seed * 0x9E3779B97F4A7C15 + unit) & M64)
    words = []
    for _ in range(512):
        x ^= (x << 13) & M64
        x ^= x >> 7
        x ^= (x << 17) & M64
        words.append(x)
    return struct.pack("<512Q", *words)


class Disk:
    """A sealed disk file with its key, made by `sealvm disk create`."""

    def __init__(self, directory: Path, size: str = "4M"):
        self.dir = Path(directory)
        self.key = os.urandom(32)
        self.key_file = self.dir / "disk.key"
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, self.key)
        os.close(fd)
        self.path = self.dir / "disk.img"
        r = sealvm("disk", "create", size, "-o", str(self.path), "--key-file", str(self.key_file))
        assert r.returncode == 0, r.stderr.decode()

    def env(self, disable: str = "") -> dict:
        env = {"SEALVM_TEST_MODE": "1", "SEALVM_TEST_DISK_KEY": self.key.hex()}
        if disable:
            env["SEALVM_INSECURE_TEST_DISABLE"] = disable
        return env

    def args(self, cmdline: str) -> list[str]:
        return ["run", str(guest_image("blkbench")), "--disk", str(self.path),
                "--cmdline", cmdline]

    def run(self, cmdline: str, *, disable: str = "", timeout: float = 120):
        return sealvm(*self.args(cmdline), env=self.env(disable), timeout=timeout)

    def popen(self, cmdline: str, *, disable: str = "") -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sealvm.cli", *self.args(cmdline)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **self.env(disable)})

    def open(self) -> SealedDisk:
        fd = os.open(self.path, os.O_RDONLY)
        return SealedDisk(FileIO(fd), self.key)

    def slot_offset(self, block: int, which: str = "current") -> int:
        d = self.open()
        try:
            cur = d.entry(block)[3]
            return d.layout.slot(block, cur if which == "current" else 1 - cur)
        finally:
            os.close(d.io.fd)

    def read_slot(self, offset: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(SLOT)

    def write_at(self, offset: int, data: bytes) -> None:
        """Change the file in place (the core holds an fd on this very inode)."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)


def words(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


def result(out: str, phase: str) -> dict[str, str]:
    (line,) = [l for l in out.splitlines() if l.startswith(f"blkbench {phase} ")]
    return words(line)
