"""Whole-VM capture and restore on real KVM: the guest carries on in a new Machine."""
from __future__ import annotations

import threading
import time

import pytest

from sealvm.core import vmstate
from sealvm.core.addr import MiB
from sealvm.core.boot.elf import parse_elf
from sealvm.core.machine import Machine, MachineConfig
from tests.conftest import guest_image, needs_kvm

pytestmark = needs_kvm


class Console:
    def __init__(self):
        self.data = bytearray()
        self.lock = threading.Lock()

    def __call__(self, b: bytes) -> None:
        with self.lock:
            self.data += b

    def lines(self) -> list[str]:
        with self.lock:
            return bytes(self.data).decode(errors="replace").splitlines()

    def wait_for(self, pred, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred(self.lines()):
                return True
            time.sleep(0.02)
        return False


def start(name: str, cmdline: str, memory: int = 64 * MiB, vcpus: int = 1, rng: bool = False):
    con = Console()
    image = guest_image(name).read_bytes()
    m = Machine(MachineConfig(image=image, memory=memory, vcpus=vcpus, cmdline=cmdline,
                              rng=rng), con)
    m.build()
    m.start()
    return m, con, image


def capture_and_restore(m: Machine, paused: bool = True, **kw):
    """Pause, capture through a serialised blob, close, and build the restored machine."""
    m.pause()
    state = vmstate.capture_vm(m)
    ram = vmstate.read_ram(m.memory)
    cfg = m.config
    m.close()
    blob = vmstate.to_bytes(state)
    assert vmstate.to_bytes(vmstate.from_bytes(blob)) == blob      # canonical
    con = Console()
    m2 = Machine(MachineConfig(image=b"", memory=cfg.memory, vcpus=cfg.vcpus, rng=cfg.rng,
                               restore=vmstate.Restore(vmstate.from_bytes(blob), ram,
                                                       paused=paused)), con)
    m2.build()
    return m2, con, state


def test_memtouch_continues_after_restore_without_mismatch():
    m, con, image = start("memtouch", "mib=8 secs=0 rate=2000")
    progress = parse_elf(image).symbols["progress"]
    assert con.wait_for(lambda ls: any(l.startswith("memtouch t=2") for l in ls), 20), con.lines()
    m2, con2, _ = capture_and_restore(m)
    try:
        before = [m2.memory.read_u64(progress + off) for off in (8, 16, 24)]
        m2.start()
        time.sleep(0.3)
        assert [m2.memory.read_u64(progress + off) for off in (8, 16, 24)] == before  # paused
        m2.resume()
        assert con2.wait_for(lambda ls: len([l for l in ls if l.startswith("memtouch t=")]) >= 2,
                             10), con2.lines()
        ticks = [l for l in con2.lines() if l.startswith("memtouch t=")]
        assert all(l.endswith(" ok") for l in ticks), ticks
        assert int(ticks[0].split()[1][2:]) >= 3          # the guest's clock did not restart
        after = [m2.memory.read_u64(progress + off) for off in (8, 16, 24)]
        assert all(a > b for a, b in zip(after, before)), (before, after)
        assert m2.memory.read_u64(progress + 32) == 0     # no mismatches
    finally:
        m2.close()


def kvm_sets_the_tsc(kvm) -> bool:
    """Whether this KVM honours a guest TSC written from the host (kvm_pvm does not)."""
    from sealvm.core.kvm import state as KS
    with kvm.create_vm() as vm, vm.create_vcpu(0) as v:
        v.set_cpuid2(kvm.supported_cpuid())
        KS.set_msrs(v, {MSR_IA32_TSC: 1000})
        return KS.get_msrs(v, [MSR_IA32_TSC])[MSR_IA32_TSC] < 1 << 40


def test_a_restored_guest_clock_counts_nothing_between_build_and_start():
    """Between building a restored machine and starting it, RAM streams in and keys are
    fetched; the guest's TSC and kvmclock must go on from the capture when it starts."""
    from sealvm.core.kvm import state as KS
    m, con, _ = start("memtouch", "mib=8 secs=0 rate=2000")
    assert con.wait_for(lambda ls: any(l.startswith("memtouch t=1") for l in ls), 20), con.lines()
    m2, _, st = capture_and_restore(m)
    try:
        fd, captured = m2.vcpus[0].fd, dict(st["vcpus"][0]["msrs"])[MSR_IA32_TSC]
        t0 = KS.get_msrs(fd, [MSR_IA32_TSC])[MSR_IA32_TSC]
        # over a second: KVM takes a TSC write within a second of the last as a CPU sync
        time.sleep(2.0)
        idle = KS.get_msrs(fd, [MSR_IA32_TSC])[MSR_IA32_TSC] - t0   # 2 s of TSC ticks
        m2.start()                                                  # (its vCPUs park)
        assert KS.get_clock(m2.vm).clock - st["clock"] < 250_000_000
        if kvm_sets_the_tsc(m2.kvm):    # (kvm_pvm's guests read the host's TSC: it cannot)
            assert KS.get_msrs(fd, [MSR_IA32_TSC])[MSR_IA32_TSC] - captured < idle // 8
    finally:
        m2.close()


def test_compute_on_two_vcpus_finishes_equal_after_restore():
    m, con, _ = start("compute", "iters=3000000000", vcpus=2)
    time.sleep(1.0)
    assert not m.wait(0), con.lines()
    m2, con2, state = capture_and_restore(m, paused=False)
    assert len(state["vcpus"]) == 2
    try:
        m2.start()
        assert m2.wait(120), con2.lines()
        assert m2.exit_status == 0, (m2.stop_reason, con2.lines())
        assert "compute vcpus=2 results=equal" in con2.lines()
    finally:
        m2.close()


def test_rng_completes_after_restore_mid_run():
    m, con, _ = start("rng", "chunk=4096 count=200000 timeout=60", rng=True)
    transport = m.virtio[0].transport
    end = time.monotonic() + 20
    while transport.queues[0].used_idx < 1000 and time.monotonic() < end:
        time.sleep(0.01)
    m2, con2, state = capture_and_restore(m)
    q = state["devices"]["virtio"][0]["transport"]["queues"][0]
    assert q["ready"] and q["last_avail_idx"] > 0
    try:
        m2.start()
        m2.resume()
        assert m2.wait(60), con2.lines()
        assert m2.exit_status == 0, (m2.stop_reason, con2.lines())
        assert any(l.startswith("rng bytes=") and l.endswith(" ok") for l in con2.lines())
        assert not m2.virtio[0].transport.broken
    finally:
        m2.close()


def test_capture_is_refused_while_running():
    m, con, _ = start("memtouch", "mib=8 secs=0 rate=2000")
    try:
        with pytest.raises(vmstate.VmStateError, match="paused"):
            vmstate.capture_vm(m)
    finally:
        m.close()


def _small_state() -> dict:
    m, _, _ = start("memtouch", "mib=8 secs=0 rate=2000", memory=16 * MiB)
    try:
        time.sleep(0.2)
        m.pause()
        return vmstate.capture_vm(m)
    finally:
        m.close()


def test_from_bytes_refuses_bad_blobs():
    blob = vmstate.to_bytes(_small_state())
    with pytest.raises(vmstate.VmStateError, match="version"):
        vmstate.from_bytes(blob.replace(b'"version":1', b'"version":2'))
    with pytest.raises(vmstate.VmStateError, match="truncated"):
        vmstate.from_bytes(blob[:-10])
    with pytest.raises(vmstate.VmStateError, match="exceeds"):
        vmstate.from_bytes(b" " * (vmstate.MAX_STATE_BYTES + 1))
    with pytest.raises(vmstate.VmStateError, match="not a sealvm-vmstate"):
        vmstate.from_bytes(b"{}")
    with pytest.raises(vmstate.VmStateError, match="sregs"):
        vmstate.from_bytes(blob.replace(b'"sregs":"', b'"sregs":"00'))


# ---- state a Linux guest uses that the test guests never touch --------------------------
MSR_IA32_TSC, MSR_TSC_DEADLINE = 0x10, 0x6E0
LVTT, LVT_TSC_DEADLINE = 0x320, 2 << 17


def test_a_tsc_deadline_timer_survives_restore_into_a_fresh_vcpu(kvm, guest):
    """Linux arms its LAPIC timer in TSC-deadline mode; KVM ignores the deadline MSR while
    the LAPIC is in another mode (a fresh vCPU's is), so a restore that writes it only
    with the other MSRs leaves a guest that never gets another timer tick."""
    from sealvm.core.kvm import state
    src = guest(bytes.fromhex("ebfe"), irqchip=True).vcpu
    lapic = state.get_lapic(src)
    lapic.regs[LVTT:LVTT + 4] = (LVT_TSC_DEADLINE | 0xEC).to_bytes(4, "little")
    state.set_lapic(src, lapic)
    deadline = state.get_msrs(src, [MSR_IA32_TSC])[MSR_IA32_TSC] + (1 << 40)
    state.set_msrs(src, {MSR_TSC_DEADLINE: deadline})
    assert state.get_msrs(src, [MSR_TSC_DEADLINE])[MSR_TSC_DEADLINE] == deadline
    rec = vmstate.capture_vcpu(src, vmstate.savable_msrs(kvm), lapic=True)
    assert [MSR_TSC_DEADLINE, deadline] in rec["msrs"]
    dst = guest(bytes.fromhex("ebfe"), irqchip=True).vcpu
    vmstate.restore_vcpu(dst, rec)
    assert state.get_msrs(dst, [MSR_TSC_DEADLINE])[MSR_TSC_DEADLINE] == deadline


def test_a_pending_serial_interrupt_survives_capture():
    """A THR-empty interrupt the guest has not taken yet travels with the UART: without it
    a Linux console driver waits for ever to send its next byte."""
    from sealvm.core import vmstate_devices as D
    from sealvm.core.devices.serial import Serial16550
    levels = []
    src = Serial16550(irq=levels.append)
    src.write(1, 0x02)                     # IER: THR-empty interrupts on -> one is pending
    assert levels == [1]
    st = D.serial_state(src)
    dst = Serial16550(irq=levels.append)
    D.set_serial_state(dst, st)
    assert dst.read(2) & 0x0F == 0x02      # IIR: the THR-empty interrupt is still there
    dst.read(2)
    assert levels == [1, 0]                # taking it lowers the line the irqchip holds high
    D.check_devices({"serial": st, "virtio": []})
    with pytest.raises(vmstate.VmStateError, match="thr"):
        D.check_devices({"serial": {**st, "thr": 2}, "virtio": []})
