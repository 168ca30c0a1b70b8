"""The machine's run loop on real KVM: exits, pause/resume/stop, crashes named clearly.

Tiny hand-assembled images (long-mode entry, CPL0) keep these independent of
the C guests, so each exit kind is produced on purpose.
"""
from __future__ import annotations

import time

import pytest

from sealvm.core.addr import MiB
from sealvm.core.machine import Machine, MachineConfig, MachineError
from tests.conftest import needs_kvm
from tests.unit.test_loader_elfbuild import Elf, Seg

pytestmark = needs_kvm

BASE = 0x100000
COUNTER = 0x200000
OUT_EXIT_5 = bytes.fromhex("66baf400" "b805000000" "ef")   # mov $0xf4,%dx; mov $5,%eax; out %eax,(%dx)


def image(code: bytes) -> bytes:
    return Elf([Seg(BASE, code, memsz=0x200000)], entry=BASE).build()


def machine(code: bytes, **kw) -> tuple[Machine, list[bytes]]:
    out: list[bytes] = []
    m = Machine(MachineConfig(image=image(code), memory=16 * MiB, entry="long", rng=False, **kw),
                out.append)
    m.build()
    return m, out


def run_to_stop(m: Machine, timeout: float = 10) -> None:
    m.start()
    assert m.wait(timeout), "VM did not stop"


def test_guest_exit_status_and_serial_output():
    # mov $0x3f8,%dx; mov $'K',%al; out %al,(%dx); then exit 5
    m, out = machine(bytes.fromhex("66baf803" "b04b" "ee") + OUT_EXIT_5)
    try:
        run_to_stop(m)
        assert b"".join(out) == b"K"
        assert m.exit_status == 5
    finally:
        m.close()


def test_triple_fault_stops_the_vm_naming_exit_vcpu_and_rip():
    m, _ = machine(bytes.fromhex("0f0b"))               # ud2 with no IDT -> triple fault
    try:
        run_to_stop(m)
        assert m.exit_status is None
        assert "vcpu0" in m.stop_reason and "SHUTDOWN" in m.stop_reason
        assert "rip=0x100000" in m.stop_reason
    finally:
        m.close()


def test_an_unexpected_exit_stops_the_vm_with_its_name():
    m, _ = machine(bytes.fromhex("cc"))                 # int3, no IDT: KVM reports an internal error
    try:
        run_to_stop(m)
        assert m.exit_status is None
        assert "vcpu0" in m.stop_reason and "KVM_EXIT_" in m.stop_reason and "rip=" in m.stop_reason
    finally:
        m.close()


def test_hlt_parks_the_vcpu_until_an_event():
    m, _ = machine(bytes.fromhex("f4") + OUT_EXIT_5)   # hlt; exit 5
    try:
        m.start()
        assert not m.wait(0.5), "the halted vCPU should stay parked"
        m._device_event()
        assert m.wait(5) and m.exit_status == 5
    finally:
        m.close()


def test_pause_freezes_the_guest_and_resume_continues_it():
    # 1: incq (COUNTER); jmp 1b
    loop = bytes.fromhex("48ff0425") + COUNTER.to_bytes(4, "little") + bytes.fromhex("ebf4")
    m, _ = machine(loop)
    try:
        m.start()
        time.sleep(0.2)
        m.pause()
        a = m.memory.read_u64(COUNTER)
        time.sleep(0.3)
        assert m.memory.read_u64(COUNTER) == a > 0
        m.resume()
        time.sleep(0.3)
        assert m.memory.read_u64(COUNTER) > a
        m.stop()
        assert m.wait(5)
    finally:
        m.close()


def test_two_vcpus_can_be_paused_and_stopped():
    loop = bytes.fromhex("48ff0425") + COUNTER.to_bytes(4, "little") + bytes.fromhex("ebf4")
    elf = Elf([Seg(BASE, loop, memsz=0x200000)], entry=BASE, symbols={"ap_entry64": BASE}).build()
    m = Machine(MachineConfig(image=elf, memory=16 * MiB, entry="long", rng=False, vcpus=2),
                lambda b: None)
    m.build()
    try:
        m.start()
        time.sleep(0.2)
        m.pause()
        assert m.control.parked == 2
        m.resume()
        m.stop()
        assert m.wait(5)
    finally:
        m.close()


@pytest.mark.parametrize("kw,needle", [({"vcpus": 0}, "--vcpus"), ({"entry": "real"}, "--entry")])
def test_bad_machine_config_is_refused(kw, needle):
    with pytest.raises(MachineError, match=needle):
        Machine(MachineConfig(image=b"", **kw), lambda b: None)
