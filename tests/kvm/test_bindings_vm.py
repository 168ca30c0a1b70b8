"""KVM bindings against the real /dev/kvm: the system fd, ioeventfds, memory slots, vCPU state."""
from __future__ import annotations

import errno
import os

import pytest

from sealvm.core.kvm import ioctls as K
from sealvm.core.kvm import structs as S
from sealvm.core.kvm.api import Kvm, KvmError, VcpuInterrupted, exit_name, ioctl

pytestmark = pytest.mark.kvm

# mov $0xd0001000,%ebx ; mov $7,%eax ; mov %eax,(%rbx)        -> ioeventfd A (datamatch 7)
# mov $0xd0002000,%ecx ; mov %eax,(%rcx)                      -> ioeventfd B (any value)
# mov $0x510,%dx ; out %ax,(%dx)                              -> ioeventfd C (port, 2 bytes)
# mov $8,%eax ; mov %eax,(%rbx)                               -> MMIO exit (8 != 7)
# mov $0xf4,%dx ; out %al,(%dx) ; jmp .                       -> PIO exit
IOEVENTFD_BLOB = bytes.fromhex("bb001000d0" "b807000000" "8903" "b90020" "00d0" "8901"
                               "66ba1005" "66ef" "b808000000" "8903" "66baf400" "ee" "ebfe")
SPIN = bytes.fromhex("ebfe")


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_system_queries(kvm):
    assert kvm.vcpu_mmap_size >= 2 * 4096
    cpuid = kvm.supported_cpuid()
    assert 0 < cpuid.nent <= K.MAX_CPUID_ENTRIES
    assert any(e.function == 0x80000001 for e in cpuid.entries[:cpuid.nent])


def test_kvm_takes_over_a_given_fd_and_closes_it():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    with Kvm(fd=fd) as kvm:
        assert kvm.fd == fd
    assert kvm.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(KvmError) as ei:
        kvm.create_vm()
    assert ei.value.errno == errno.EBADF


def test_ioctl_refuses_wrong_argument_sizes(kvm):
    with pytest.raises(ValueError):   # a request that carries a struct needs one
        ioctl(kvm.fd, K.KVM_GET_SUPPORTED_CPUID, 0)
    with pytest.raises(ValueError):   # and one at least as large as the request encodes
        ioctl(kvm.fd, K.KVM_SET_USER_MEMORY_REGION, S.kvm_dtable())


def test_memory_region_errors_name_the_slot(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as ei:   # not page-aligned
            vm.set_user_memory_region(0, 0, 0x1001, 0x1000, 0)
        assert ei.value.op == "KVM_SET_USER_MEMORY_REGION" and ei.value.errno == errno.EINVAL
        assert "slot 0" in str(ei.value) and "gpa 0x1001" in str(ei.value)


def test_ioeventfd_signals_without_exit(guest):
    g = guest(IOEVENTFD_BLOB)
    a, b, c = eventfd(), eventfd(), eventfd()
    try:
        g.vm.ioeventfd(a, 0xD0001000, 4, datamatch=7)
        g.vm.ioeventfd(b, 0xD0002000, 4)
        g.vm.ioeventfd(c, 0x510, 2, pio=True)
        reason = g.vcpu.run()
        assert reason == K.KVM_EXIT_MMIO, exit_name(reason)
        m = g.run.mmio
        assert (m.phys_addr, bytes(m.data)[:4], m.is_write) == (0xD0001000, (8).to_bytes(4, "little"), 1)
        assert (eventfd_count(a), eventfd_count(b), eventfd_count(c)) == (1, 1, 1)
        assert g.vcpu.run() == K.KVM_EXIT_IO and g.run.io.port == 0xF4
        g.vm.ioeventfd(b, 0xD0002000, 4, deassign=True)
        with pytest.raises(KvmError) as ei:  # not registered any more
            g.vm.ioeventfd(b, 0xD0002000, 4, deassign=True)
        assert ei.value.op == "KVM_IOEVENTFD" and ei.value.errno == errno.ENOENT
        with pytest.raises(ValueError):
            g.vm.ioeventfd(a, 0xD0003000, 3)
        with pytest.raises(ValueError):
            g.vm.ioeventfd(a, 0xD0003000, 0, datamatch=1)
    finally:
        for fd in (a, b, c):
            os.close(fd)


def test_vcpu_state_round_trips(guest):
    g = guest(SPIN)
    v = g.vcpu
    regs = v.get_regs()
    regs.rax = 0x1122334455667788
    v.set_regs(regs)
    assert v.get_regs().rax == 0x1122334455667788
    sregs = v.get_sregs()
    v.set_sregs(sregs)
    assert v.get_sregs().efer & 0x500 == 0x500 and v.get_sregs().cr3 == sregs.cr3
    g.run.immediate_exit = 1  # the state survives a (kicked) KVM_RUN
    with pytest.raises(VcpuInterrupted):
        v.run()
    g.run.immediate_exit = 0
    assert v.get_regs().rax == 0x1122334455667788


def test_set_cpuid2_refuses_a_short_buffer(guest):
    g = guest(SPIN)
    short = S.kvm_cpuid2_n(1)(nent=2)
    with pytest.raises(ValueError):
        g.vcpu.set_cpuid2(short)
