"""sealvm boots the unmodified Debian cloud kernel, inside an outer VM with a real KVM.

One outer QEMU (TCG, emulated SVM) boot runs every scenario in turn with
`sealvm run` (launcher, core under its own uid, seccomp, portal: the whole
path) and brackets each one's console and exit status; the tests below read
them.  The outer image is built from Debian packages on first use and cached
under /var/cache/sealvm (tests/linux/nested.py).  `make test-linux` runs this
file; `make test` includes it where the machine has no VMX/SVM of its own.
"""
from __future__ import annotations

import re
import sys

import pytest

import nested as N

pytestmark = [pytest.mark.kvm]

# The hello guest that first reads one line from its console (sealvm's stdin) and echoes it.
ECHO_INIT = N.HELLO_INIT.replace("\npoweroff -f", """
echo "GUEST-READY"
read -r line
echo "GUEST-ECHO <$line>"
poweroff -f""")
assert "GUEST-ECHO" in ECHO_INIT

# Send a line once the guest is listening; relay everything, keep sealvm's status.
EXPECT_PY = r"""
import subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)
for line in p.stdout:
    sys.stdout.write(line.decode(errors="replace")); sys.stdout.flush()
    if b"GUEST-READY" in line:
        p.stdin.write(b"hello from the host\n"); p.stdin.flush()
sys.exit(p.wait())
"""

SCRIPT = """
scenario one python3 expect.py sealvm run --kernel vmlinuz --initrd echo.cpio.gz --vcpus 1
scenario smp2 sealvm run --kernel vmlinuz --initrd hello.cpio.gz --vcpus 2
scenario panic sealvm run --kernel vmlinuz --initrd panic.cpio.gz
scenario pvh sealvm run --kernel vmlinux --initrd hello.cpio.gz --vcpus 2
"""


NESTED_TIMEOUT = 600


def nested_job(image):
    job = N.Job(image)
    job.add("hello.cpio.gz", N.guest_initrd(image, N.HELLO_INIT))
    job.add("panic.cpio.gz", N.guest_initrd(image, N.PANIC_INIT))
    job.add("echo.cpio.gz", N.guest_initrd(image, ECHO_INIT))
    job.add("expect.py", EXPECT_PY.encode())
    kv = (image / "kernel-version").read_text().strip()     # the same kernel, as a vmlinux ELF
    job.add("vmlinux", N.debian_vmlinux(f"linux-image-{kv}").read_bytes())
    job.script = SCRIPT
    return job


@pytest.fixture(scope="module")
def outer():
    return N.module_outcome(sys.modules[__name__])


def _marker(text: str) -> dict[str, str]:
    m = re.search(r"^GUEST-MARKER (.*)$", text, re.M)
    assert m, f"no guest marker in:\n{text[-3000:]}"
    return dict(kv.split("=", 1) for kv in m.group(1).split())


@pytest.mark.parametrize("name,cpus", [("one", 1), ("smp2", 2)])
def test_linux_boots_reads_hwrng_and_powers_off(outer, name, cpus):
    rc, text = outer.section(name)
    assert rc == 0, f"sealvm run exited {rc}:\n{text[-3000:]}"
    marker = _marker(text)
    assert marker["cpus"] == str(cpus)
    assert marker["online"] == ("0" if cpus == 1 else f"0-{cpus - 1}")
    assert marker["source"].startswith("virtio_rng"), marker      # the core's virtio-rng
    assert re.fullmatch(r"[0-9a-f]{32}", marker["rng"]) and marker["rng"] != "0" * 32
    assert marker["kernel"].endswith("-cloud-amd64")


def test_vmlinux_boots_through_its_pvh_entry(outer):
    """The same kernel as an uncompressed ELF: PVH 32-bit entry, initrd as module 0, ACPI via
    rsdp_paddr (the virtio-rng and the second vCPU are only found through the ACPI tables)."""
    rc, text = outer.section("pvh")
    assert rc == 0, f"sealvm run exited {rc}:\n{text[-3000:]}"
    marker = _marker(text)
    assert marker["cpus"] == "2" and marker["online"] == "0-1", marker
    assert marker["source"].startswith("virtio_rng"), marker
    assert marker["kernel"].endswith("-cloud-amd64")


def test_two_boots_get_different_entropy(outer):
    a, b = (_marker(outer.section(n)[1])["rng"] for n in ("one", "smp2"))
    assert a != b


def test_guest_panic_ends_run_nonzero_with_panic_text(outer):
    rc, text = outer.section("panic")
    assert rc == 126, f"expected the crash status 126, got {rc}:\n{text[-3000:]}"
    assert "GUEST-PANIC-NEXT" in text
    assert "Kernel panic - not syncing: Attempted to kill init!" in text
    assert "the guest reset the machine" in text


def test_console_input_reaches_the_guest(outer):
    rc, text = outer.section("one")
    assert rc == 0, text[-3000:]
    assert "GUEST-ECHO <hello from the host>" in text
