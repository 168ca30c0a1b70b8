"""`sealvm run --kernel` refuses what it cannot boot, with exit 125 and a message (no nesting:
every check here happens before the guest's first instruction)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import needs_kvm, sealvm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "linux"))
import nested  # noqa: E402

pytestmark = needs_kvm


@pytest.fixture(scope="module")
def files():
    d = tempfile.mkdtemp(dir="/tmp")
    os.chmod(d, 0o755)
    kernel = nested.debian_kernel()
    data = bytearray(kernel.read_bytes())
    data[0x202:0x206] = b"XXXX"                              # the setup header's magic
    paths = {"kernel": str(kernel), "corrupt": f"{d}/corrupt-vmlinuz", "big": f"{d}/big-initrd",
             "small": f"{d}/small-initrd"}
    Path(paths["corrupt"]).write_bytes(data)
    with open(paths["big"], "wb") as f:
        f.truncate(200 << 20)
    Path(paths["small"]).write_bytes(b"\0" * 4096)
    yield paths
    for name in ("corrupt", "big", "small"):
        os.unlink(paths[name])
    os.rmdir(d)


def _refused(r, *needles):
    err = r.stderr.decode()
    assert r.returncode == 125, (r.returncode, err, r.stdout.decode()[-2000:])
    for n in needles:
        assert n in err, err


def test_corrupt_bzimage_is_refused(files):
    r = sealvm("run", "--kernel", files["corrupt"], "--initrd", files["small"])
    _refused(r, "not a Linux bzImage")


def test_oversized_initrd_is_refused(files):
    r = sealvm("run", "--kernel", files["kernel"], "--initrd", files["big"], "-m", "128M")
    _refused(r, "initrd (209715200 bytes) does not fit")


def test_too_long_command_line_is_refused(files):
    r = sealvm("run", "--kernel", files["kernel"], "--cmdline", "x" * 2100)
    _refused(r, "kernel command line is 2100 bytes", "at most 2047 bytes")


def test_initrd_needs_a_linux_kernel(files):
    from tests.conftest import guest_image
    r = sealvm("run", str(guest_image("hello")), "--initrd", files["small"])
    _refused(r, "--initrd needs a Linux kernel")
    r = sealvm("run", str(guest_image("hello")), "--kernel", files["kernel"])
    _refused(r, "either GUEST")
