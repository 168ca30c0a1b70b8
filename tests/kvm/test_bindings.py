"""KVM bindings against the real /dev/kvm: exits, replies and kicks.

Guests are a few hand-assembled 64-bit instructions at CPL0 (emulated one by
one under kvm_pvm), started in long mode by conftest.enter_long_mode.
"""
from __future__ import annotations

import errno
import signal
import threading
import time

import pytest

from sealvm.core.kvm import ioctls as K
from sealvm.core.kvm.api import KvmError, VcpuInterrupted, exit_name

pytestmark = pytest.mark.kvm

# mov $0x3f8,%dx ; mov $'A',%al ; out %al,(%dx)
# mov $0xf4,%dx ; mov $0x2a,%eax ; out %eax,(%dx) ; jmp .
PIO_OUT = bytes.fromhex("66baf803" "b041" "ee"
                        "66baf400" "b82a000000" "ef" "ebfe")
# mov $0xd0000000,%ebx ; mov $0x12345678,%eax ; mov %eax,(%rbx) ; jmp .
MMIO_WRITE = bytes.fromhex("bb000000d0" "b878563412" "8903" "ebfe")
# mov $0xd0000000,%ebx ; mov (%rbx),%eax ; mov $0x3f8,%dx ; out %eax,(%dx) ; jmp .
MMIO_READ_ECHO = bytes.fromhex("bb000000d0" "8b03" "66baf803" "ef" "ebfe")
# mov $0x3f8,%dx ; in (%dx),%al ; mov $0xf4,%dx ; out %al,(%dx) ; jmp .
PIO_IN_ECHO = bytes.fromhex("66baf803" "ec" "66baf400" "ee" "ebfe")
# jmp .
SPIN = bytes.fromhex("ebfe")


def run_io(g):
    """Run to the next exit, which must be port I/O: (direction, port, size, data bytes)."""
    reason = g.vcpu.run()
    assert reason == K.KVM_EXIT_IO, exit_name(reason)
    io = g.run.io
    assert io.data_offset >= 4096  # the PIO page, after struct kvm_run
    data = bytes(g.vcpu.run_buffer[io.data_offset:io.data_offset + io.size * io.count])
    return io.direction, io.port, io.size, data


def test_pio_out_exits_with_port_and_data(guest):
    g = guest(PIO_OUT)
    assert run_io(g) == (K.KVM_EXIT_IO_OUT, 0x3F8, 1, b"A")
    assert run_io(g) == (K.KVM_EXIT_IO_OUT, 0xF4, 4, (0x2A).to_bytes(4, "little"))


def test_mmio_write_exits_with_address_and_data(guest):
    g = guest(MMIO_WRITE)
    reason = g.vcpu.run()
    assert reason == K.KVM_EXIT_MMIO, exit_name(reason)
    m = g.run.mmio
    assert (m.phys_addr, m.len, m.is_write) == (0xD0000000, 4, 1)
    assert bytes(m.data)[:4] == (0x12345678).to_bytes(4, "little")


def test_mmio_read_reply_reaches_the_guest(guest):
    g = guest(MMIO_READ_ECHO)
    assert g.vcpu.run() == K.KVM_EXIT_MMIO
    m = g.run.mmio
    assert (m.phys_addr, m.len, m.is_write) == (0xD0000000, 4, 0)
    m.data[:4] = list((0xCAFEF00D).to_bytes(4, "little"))
    assert run_io(g) == (K.KVM_EXIT_IO_OUT, 0x3F8, 4, (0xCAFEF00D).to_bytes(4, "little"))


def test_pio_in_reply_reaches_the_guest(guest):
    g = guest(PIO_IN_ECHO)
    assert run_io(g)[:3] == (K.KVM_EXIT_IO_IN, 0x3F8, 1)
    g.vcpu.run_buffer[g.run.io.data_offset] = ord("Z")
    assert run_io(g) == (K.KVM_EXIT_IO_OUT, 0xF4, 1, b"Z")


def test_exit_names():
    assert exit_name(K.KVM_EXIT_IO) == "KVM_EXIT_IO"
    assert exit_name(K.KVM_EXIT_SYSTEM_EVENT) == "KVM_EXIT_SYSTEM_EVENT"
    assert exit_name(999) == "KVM_EXIT_999 (unknown)"


@pytest.fixture
def sigusr1_noop():
    """A no-op SIGUSR1 handler in the main thread, so the kick interrupts instead of killing."""
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    yield signal.SIGUSR1
    signal.signal(signal.SIGUSR1, old)


class RunThread(threading.Thread):
    """Runs the vCPU until it is interrupted; records how it ended and when."""

    def __init__(self, vcpu):
        super().__init__(daemon=True)
        self.vcpu = vcpu
        self.entered = threading.Event()
        self.result = None
        self.ended_at = None

    def run(self) -> None:
        self.entered.set()
        try:
            self.result = ("exit", self.vcpu.run())
        except VcpuInterrupted:
            self.result = ("interrupted", None)
        except Exception as e:  # reported by the test
            self.result = ("error", e)
        self.ended_at = time.monotonic()

    def stop(self, signum) -> None:
        """Cleanup for a failed test: kick until the thread leaves KVM_RUN."""
        for _ in range(50):
            if not self.is_alive():
                return
            self.vcpu.run_struct.immediate_exit = 1
            signal.pthread_kill(self.ident, signum)
            self.join(0.1)


def test_kick_interrupts_spinning_vcpu(guest, sigusr1_noop):
    g = guest(SPIN)
    t = RunThread(g.vcpu)
    t.start()
    t.entered.wait(5)
    time.sleep(0.2)  # let it get into KVM_RUN; the main thread runs meanwhile (GIL released)
    assert t.is_alive(), f"vCPU left KVM_RUN on its own: {t.result}"
    kicked_at = time.monotonic()
    g.run.immediate_exit = 1
    signal.pthread_kill(t.ident, sigusr1_noop)
    t.join(5)
    try:
        assert t.result == ("interrupted", None)
        assert t.ended_at - kicked_at < 1.0
    finally:
        t.stop(sigusr1_noop)
    assert g.run.immediate_exit == 1  # the caller clears it
    g.run.immediate_exit = 0


def test_signal_alone_interrupts_run(guest, sigusr1_noop):
    """Without immediate_exit, the signal by itself must end KVM_RUN (no EINTR retry)."""
    g = guest(SPIN)
    t = RunThread(g.vcpu)
    t.start()
    t.entered.wait(5)
    time.sleep(0.2)
    signal.pthread_kill(t.ident, sigusr1_noop)
    t.join(5)
    try:
        assert t.result == ("interrupted", None)
    finally:
        t.stop(sigusr1_noop)
        g.run.immediate_exit = 0


def test_immediate_exit_returns_at_once(guest):
    g = guest(PIO_OUT)
    g.run.immediate_exit = 1
    start = time.monotonic()
    with pytest.raises(VcpuInterrupted):
        g.vcpu.run()
    assert time.monotonic() - start < 0.5
    g.run.immediate_exit = 0
    # the guest did not advance and now runs normally
    assert run_io(g) == (K.KVM_EXIT_IO_OUT, 0x3F8, 1, b"A")


def test_spin_then_kick_resumes_at_same_place(guest, sigusr1_noop):
    g = guest(SPIN)
    g.run.immediate_exit = 1
    with pytest.raises(VcpuInterrupted):
        g.vcpu.run()
    g.run.immediate_exit = 0
    assert g.vcpu.get_regs().rip == 0x1000


def test_closed_vcpu_raises_clear_error(guest):
    g = guest(SPIN)
    g.vcpu.close()
    with pytest.raises(KvmError) as ei:
        g.vcpu.get_regs()
    assert ei.value.errno == errno.EBADF
    g.vcpu = None
