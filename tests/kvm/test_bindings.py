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
from sealvm.core.kvm.api import (Io, KvmError, Mmio, OtherExit, VcpuInterrupted,
                                 complete_mmio_read, complete_pio_in, decode_exit)

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


def run_exit(g):
    reason = g.vcpu.run()
    return reason, decode_exit(g.run, g.vcpu.run_buffer)


def test_pio_out_exits_with_port_and_data(guest):
    g = guest(PIO_OUT)
    reason, e = run_exit(g)
    assert reason == K.KVM_EXIT_IO, K.EXIT_REASON_NAMES.get(reason)
    assert e == Io(K.KVM_EXIT_IO_OUT, 1, 0x3F8, 1, g.run.io.data_offset, b"A")
    assert e.data_offset >= 4096  # the PIO page, after struct kvm_run
    reason, e = run_exit(g)
    assert (reason, e.port, e.size, e.data) == (K.KVM_EXIT_IO, 0xF4, 4, (0x2A).to_bytes(4, "little"))


def test_mmio_write_exits_with_address_and_data(guest):
    g = guest(MMIO_WRITE)
    reason, e = run_exit(g)
    assert reason == K.KVM_EXIT_MMIO, K.EXIT_REASON_NAMES.get(reason)
    assert e == Mmio(0xD0000000, (0x12345678).to_bytes(4, "little"), 4, True)


def test_mmio_read_reply_reaches_the_guest(guest):
    g = guest(MMIO_READ_ECHO)
    reason, e = run_exit(g)
    assert reason == K.KVM_EXIT_MMIO
    assert (e.phys_addr, e.len, e.is_write) == (0xD0000000, 4, False)
    with pytest.raises(ValueError):
        complete_mmio_read(g.run, b"\x01\x02")  # wrong length is refused, nothing written
    complete_mmio_read(g.run, (0xCAFEF00D).to_bytes(4, "little"))
    reason, e = run_exit(g)
    assert (reason, e.port, e.size) == (K.KVM_EXIT_IO, 0x3F8, 4)
    assert e.data == (0xCAFEF00D).to_bytes(4, "little")


def test_pio_in_reply_reaches_the_guest(guest):
    g = guest(PIO_IN_ECHO)
    reason, e = run_exit(g)
    assert reason == K.KVM_EXIT_IO
    assert (e.direction, e.port, e.size, e.data) == (K.KVM_EXIT_IO_IN, 0x3F8, 1, None)
    complete_pio_in(g.run, g.vcpu.run_buffer, b"Z")
    reason, e = run_exit(g)
    assert (reason, e.port, e.data) == (K.KVM_EXIT_IO, 0xF4, b"Z")
    with pytest.raises(ValueError):
        complete_pio_in(g.run, g.vcpu.run_buffer, b"Z")  # an OUT exit cannot be answered


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
            self.vcpu.kick(self.ident, signum)
            self.join(0.1)


def test_kick_interrupts_spinning_vcpu(guest, sigusr1_noop):
    g = guest(SPIN)
    t = RunThread(g.vcpu)
    t.start()
    t.entered.wait(5)
    time.sleep(0.2)  # let it get into KVM_RUN; the main thread runs meanwhile (GIL released)
    assert t.is_alive(), f"vCPU left KVM_RUN on its own: {t.result}"
    kicked_at = time.monotonic()
    g.vcpu.kick_prepare()
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
    g.vcpu.kick_prepare()
    start = time.monotonic()
    with pytest.raises(VcpuInterrupted):
        g.vcpu.run()
    assert time.monotonic() - start < 0.5
    g.run.immediate_exit = 0
    reason, e = run_exit(g)  # the guest did not advance and now runs normally
    assert (reason, e.port, e.data) == (K.KVM_EXIT_IO, 0x3F8, b"A")


def test_spin_then_kick_resumes_at_same_place(guest, sigusr1_noop):
    g = guest(SPIN)
    g.vcpu.kick_prepare()
    with pytest.raises(VcpuInterrupted):
        g.vcpu.run()
    g.run.immediate_exit = 0
    assert g.vcpu.get_regs().rip == 0x1000


def test_decode_other_exits():
    from sealvm.core.kvm.structs import kvm_run
    run = kvm_run(exit_reason=K.KVM_EXIT_SHUTDOWN)
    assert decode_exit(run) == OtherExit(K.KVM_EXIT_SHUTDOWN, "KVM_EXIT_SHUTDOWN", 0)
    run = kvm_run(exit_reason=K.KVM_EXIT_IO)
    run.io.direction, run.io.size, run.io.count, run.io.data_offset = 1, 4, 4, 4096 - 8
    with pytest.raises(KvmError):  # data would run past the 4 KiB buffer
        decode_exit(run, bytearray(4096))


def test_closed_vcpu_raises_clear_error(guest):
    g = guest(SPIN)
    g.vcpu.close()
    with pytest.raises(KvmError) as ei:
        g.vcpu.get_regs()
    assert ei.value.errno == errno.EBADF
    g.vcpu = None
