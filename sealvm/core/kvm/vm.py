"""`VmFd`: one KVM VM (memory slots, vCPUs, in-kernel irqchip/PIT, eventfds, dirty log)."""
from __future__ import annotations

import ctypes
import errno
import os

from . import ioctls as K
from . import structs as S
from .raw import KvmError, ioctl

_IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)


class VmFd:
    """A VM fd from `Kvm.create_vm()`.  `vcpu_mmap_size` comes from the system fd."""

    def __init__(self, fd: int, vcpu_mmap_size: int):
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self._slot_sizes: dict[int, int] = {}  # slot -> bytes, to size dirty bitmaps safely

    # ---- memory ----------------------------------------------------------
    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int) -> None:
        """Map [userspace_addr, +memory_size) of this process at guest_phys_addr.

        memory_size 0 deletes the slot.  The caller keeps the host mapping alive
        for as long as the slot exists (KVM holds only the address).
        """
        r = S.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                                          memory_size=memory_size, userspace_addr=userspace_addr)
        try:
            # SAFETY: KVM records the address only; the caller keeps the range mapped (above).
            ioctl(self._fd(), K.KVM_SET_USER_MEMORY_REGION, r)
        except KvmError as e:
            raise KvmError(e.op, e.errno, f"{os.strerror(e.errno)} (slot {slot}, flags {flags:#x}, "
                           f"gpa {guest_phys_addr:#x}, size {memory_size:#x})") from None
        if memory_size:
            self._slot_sizes[slot] = memory_size
        else:
            self._slot_sizes.pop(slot, None)

    def get_dirty_log(self, slot: int, npages: int | None = None) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per page of `slot` (bit i = page i), LSB first.

        Returns ceil(npages/64)*8 bytes.  `npages`, if given, must be the slot's
        page count (the kernel writes a bitmap for the whole slot).  Reading also
        resets the log unless KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled (then
        see clear_dirty_log).
        """
        size = self._slot_sizes.get(slot)
        if size is None:
            raise ValueError(f"slot {slot} was not set through this VmFd")
        slot_pages = (size + 4095) // 4096
        if npages is not None and npages != slot_pages:
            raise ValueError(f"slot {slot} has {slot_pages} pages, not {npages}")
        words = (slot_pages + 63) // 64
        bitmap = (ctypes.c_uint64 * words)()
        # SAFETY: the kernel writes ALIGN(slot pages, 64)/8 bytes: exactly `bitmap`'s size.
        d = S.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        ioctl(self._fd(), K.KVM_GET_DIRTY_LOG, d)
        return bytes(bitmap)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect the pages whose bits are set in `bitmap`.

        first_page must be a multiple of 64; num_pages a multiple of 64 or reach the
        slot's end.  `bitmap` bit i stands for page first_page + i.
        """
        need = (num_pages + 63) // 64 * 8
        if len(bitmap) < need:
            raise ValueError(f"bitmap of {len(bitmap)} bytes is short of {need} for {num_pages} pages")
        buf = ctypes.create_string_buffer(bytes(bitmap[:need]), need)
        # SAFETY: the kernel reads ALIGN(num_pages, 64)/8 bytes from `buf`, which holds `need`.
        c = S.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                  dirty_bitmap=ctypes.addressof(buf))
        ioctl(self._fd(), K.KVM_CLEAR_DIRTY_LOG, c)

    # ---- vCPUs and capabilities ---------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> "VcpuFd":
        from .vcpu import VcpuFd
        fd = ioctl(self._fd(), K.KVM_CREATE_VCPU, vcpu_id)
        try:
            return VcpuFd(fd, self.vcpu_mmap_size, vcpu_id)
        except BaseException:
            os.close(fd)
            raise

    def check_extension(self, cap: int) -> int:
        """Per-VM KVM_CHECK_EXTENSION (some answers, e.g. XSAVE2, differ per VM)."""
        return ioctl(self._fd(), K.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        c = S.kvm_enable_cap(cap=cap, flags=flags)
        for i, a in enumerate(args):
            c.args[i] = a
        ioctl(self._fd(), K.KVM_ENABLE_CAP, c)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self._fd(), K.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self._fd(), K.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    # ---- eventfds ----------------------------------------------------------
    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """Make a guest write of `length` bytes to `addr` signal eventfd `fd` (no exit).

        With `datamatch`, only writes of that value do.  `pio` selects port I/O
        space.  Deassign with the same arguments and deassign=True.
        """
        if length not in _IOEVENTFD_LENGTHS:
            raise ValueError(f"ioeventfd length must be one of {_IOEVENTFD_LENGTHS}, not {length}")
        if datamatch is not None and length == 0:
            raise ValueError("ioeventfd datamatch needs a non-zero length")
        flags = ((K.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
                 | (K.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
                 | (K.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0))
        e = S.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        ioctl(self._fd(), K.KVM_IOEVENTFD, e)

    def irqfd(self, fd: int, gsi: int, resamplefd: int | None = None,
              deassign: bool = False) -> None:
        """Make a write to eventfd `fd` raise interrupt `gsi` (needs the in-kernel irqchip).

        With `resamplefd`, the line is level-triggered and KVM signals
        `resamplefd` when the guest EOIs it.
        """
        flags = ((K.KVM_IRQFD_FLAG_RESAMPLE if resamplefd is not None else 0)
                 | (K.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0))
        i = S.kvm_irqfd(fd=fd, gsi=gsi, flags=flags,
                        resamplefd=resamplefd if resamplefd is not None else 0)
        ioctl(self._fd(), K.KVM_IRQFD, i)

    # ---- in-kernel irqchip, PIT, interrupts -----------------------------------
    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and LAPICs.  Call before creating vCPUs."""
        ioctl(self._fd(), K.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        ioctl(self._fd(), K.KVM_CREATE_PIT2, S.kvm_pit_config(flags=flags))

    def get_irqchip(self, chip_id: int) -> S.kvm_irqchip:
        c = S.kvm_irqchip(chip_id=chip_id)
        ioctl(self._fd(), K.KVM_GET_IRQCHIP, c)
        return c

    def set_irqchip(self, chip: S.kvm_irqchip) -> None:
        ioctl(self._fd(), K.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> S.kvm_pit_state2:
        p = S.kvm_pit_state2()
        ioctl(self._fd(), K.KVM_GET_PIT2, p)
        return p

    def set_pit2(self, state: S.kvm_pit_state2) -> None:
        ioctl(self._fd(), K.KVM_SET_PIT2, state)

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self._fd(), K.KVM_IRQ_LINE, S.kvm_irq_level(irq=irq, level=level))

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """Inject an MSI; returns >0 if delivered, 0 if the guest blocked it."""
        m = S.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data,
                      flags=flags, devid=devid)
        return ioctl(self._fd(), K.KVM_SIGNAL_MSI, m)

    def set_gsi_routing(self, entries) -> None:
        """Replace the whole GSI routing table with `entries` (kvm_irq_routing_entry)."""
        entries = list(entries)
        t = S.kvm_irq_routing_n(len(entries))(nr=len(entries))
        for i, e in enumerate(entries):
            t.entries[i] = e
        # SAFETY: t holds exactly nr entries; the kernel reads nr.
        ioctl(self._fd(), K.KVM_SET_GSI_ROUTING, t)

    # ---- clock -------------------------------------------------------------------
    def get_clock(self) -> S.kvm_clock_data:
        c = S.kvm_clock_data()
        ioctl(self._fd(), K.KVM_GET_CLOCK, c)
        return c

    def set_clock(self, clock: S.kvm_clock_data | int) -> None:
        if isinstance(clock, int):
            clock = S.kvm_clock_data(clock=clock)
        ioctl(self._fd(), K.KVM_SET_CLOCK, clock)

    # ---- lifetime ----------------------------------------------------------------
    def _fd(self) -> int:
        if self.fd < 0:
            raise KvmError("VM", errno.EBADF, "the VM fd is closed")
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "VmFd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dirty_pages(bitmap: bytes, first_page: int = 0) -> list[int]:
    """Page numbers whose bits are set in a dirty bitmap (bit i -> first_page + i)."""
    pages = []
    for byte_index, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            pages.append(first_page + byte_index * 8 + low.bit_length() - 1)
            byte ^= low
    return pages
