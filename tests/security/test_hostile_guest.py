"""A hostile guest attacks its own core, next to a well-behaved VM on the same daemon.

guests/hostile.c makes one attack per run on its virtio-rng device or its CPU (see the
file for each mode): descriptor loops and chains longer than the queue, buffers outside
RAM or in the MMIO hole, lengths near 4 GiB, an available index far ahead of the ring, a
head outside the table, a storm of notifications, invalid device status sequences, and a
triple fault.  For each, the core must refuse the request (return it used with no bytes,
or put the device in DEVICE_NEEDS_RESET), keep serving after the guest resets the device,
or, for the triple fault, stop that VM with the reason; it must never crash with a
traceback or hang.  Meanwhile the neighbour (memtouch, checking its own memory every
pass) keeps making progress without a checksum error, and the daemon keeps answering.

Paired control: the same descriptor loop against a core whose loop bound is switched
off (SEALVM_INSECURE_TEST_DISABLE=virtio_chain_bound): that core's device worker walks
the cycle forever and the hostile VM hangs (its vCPU never gets the device's answer),
while the neighbour, in its own process, still runs.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

from tests.conftest import environ, guest_image, needs_kvm, poll
from tests.e2e.conftest import Hostd

pytestmark = needs_kvm

# mode -> (what the device did with the attack, what a fresh request after a reset got)
MODES = {
    "loop": ("refused", "served"),
    "long": ("refused", "served"),
    "oob": ("refused", "served"),
    "hole": ("refused", "served"),
    "huge": ("refused", "served"),
    "avail": ("needs_reset", "served"),
    "head": ("needs_reset", "served"),
    "storm": ("served", "served"),
    "status": ("nothing", "served"),
}


def make_host(name: str, uids: str) -> Hostd:
    base = Path(tempfile.mkdtemp(prefix=f"sealvm-{name}-", dir="/tmp"))
    os.chmod(base, 0o755)
    return Hostd(base, uids)


def console(h: Hostd, vm: str) -> str:
    return h.api().get(f"/v1/vms/{vm}/console").content.decode(errors="replace")


def start(h: Hostd, vm: str, guest: str, cmdline: str) -> None:
    r = h.api().post("/v1/vms", json={"image": str(guest_image(guest)), "name": vm,
                                      "memory_mib": 64, "cmdline": cmdline, "start": True})
    assert r.status_code == 201, r.text


class Neighbour:
    """memtouch on the same daemon: its progress lines, and never a MISMATCH."""

    def __init__(self, h: Hostd, vm: str):
        self.h, self.vm = h, vm
        start(h, vm, "memtouch", "mib=8 secs=0 rate=2000")
        assert poll(lambda: self.passes() >= 1, 20), console(h, vm)

    def passes(self) -> int:
        return console(self.h, self.vm).count("memtouch t=")

    def still_fine(self, since: int) -> None:
        assert poll(lambda: self.passes() > since, 20), "the neighbour stopped making progress"
        text = console(self.h, self.vm)
        assert "MISMATCH" not in text
        assert self.h.api().get(f"/v1/vms/{self.vm}").json()["state"] == "running"


@pytest.fixture(scope="module")
def host():
    h = make_host("hostile", "64700-64719")
    n = Neighbour(h, "calm")
    yield h, n
    h.close()


def record(h: Hostd, vm: str) -> dict:
    return h.api().get(f"/v1/vms/{vm}").json()


@pytest.mark.attack(adversary="guest", asset="vCPU state",
                    technique="hostile virtqueues and device states against its own core",
                    defence="descriptor walker bounds, ring checks, virtio status machine",
                    outcome="request refused or device NEEDS_RESET; a reset device serves "
                            "again; the neighbour VM and the daemon unaffected",
                    control="test_control_without_the_loop_bound_the_hostile_vm_hangs",
                    variants=True)
@pytest.mark.parametrize("mode", list(MODES))
def test_hostile_guest_cannot_break_its_core_or_the_neighbour(host, mode):
    h, calm = host
    before = calm.passes()
    vm = f"hostile-{mode}"
    start(h, vm, "hostile", f"mode={mode}")
    m = poll(lambda: re.search(rf"hostile {mode} after=(\w+)", console(h, vm)), 30)
    text = console(h, vm)
    assert m, f"the hostile VM's core hung or died: {text[-500:]!r} {record(h, vm)}"
    result = re.search(rf"hostile {mode} result=(\w+)", text).group(1)
    assert (result, m.group(1)) == MODES[mode], text
    if mode == "status":                    # DRIVER_OK without FEATURES_OK was not taken
        assert "driver_ok_first=0x3 " in text, text
    assert poll(lambda: record(h, vm)["state"] == "stopped", 20), record(h, vm)
    assert "Traceback" not in (h.base / "hostd.log").read_text(errors="replace")
    calm.still_fine(before)
    h.api().delete(f"/v1/vms/{vm}")


@pytest.mark.attack(adversary="guest", asset="vCPU state",
                    technique="triple fault (IDT wiped, then an exception)",
                    defence="the core stops the VM on KVM_EXIT_SHUTDOWN",
                    outcome="that VM stopped with 'triple fault'; the neighbour unaffected",
                    control="test_hostile_guest_cannot_break_its_core_or_the_neighbour",
                    baseline=True)
def test_triple_fault_stops_only_that_vm(host):
    h, calm = host
    before = calm.passes()
    start(h, "hostile-triple", "hostile", "mode=triple")
    assert poll(lambda: record(h, "hostile-triple")["state"] == "stopped", 30), \
        record(h, "hostile-triple")
    rec = record(h, "hostile-triple")
    assert "triple fault" in rec["stop_reason"], rec
    assert "hostile triple start" in console(h, "hostile-triple")
    assert "hostile triple survived" not in console(h, "hostile-triple")
    calm.still_fine(before)
    h.api().delete("/v1/vms/hostile-triple")


def test_control_without_the_loop_bound_the_hostile_vm_hangs():
    with environ(SEALVM_TEST_MODE="1", SEALVM_INSECURE_TEST_DISABLE="virtio_chain_bound"):
        h = make_host("hostile-lax", "64720-64729")
    try:
        calm = Neighbour(h, "calm-lax")
        before = calm.passes()
        start(h, "loop-lax", "hostile", "mode=loop wait=2000")
        assert poll(lambda: "hostile loop start" in console(h, "loop-lax"), 20)
        # the guest would print its result after 2 s; its core is lost in the cycle
        assert not poll(lambda: "result=" in console(h, "loop-lax"), 8), console(h, "loop-lax")
        assert record(h, "loop-lax")["state"] == "running"
        calm.still_fine(before)              # the neighbour's own core is untouched
    finally:
        h.close()
