"""Guest RAM: one memfd, mapped only in this process, split around the MMIO hole.

Every access from a device model goes through `GuestMemory`, which checks that
the whole range lies inside one RAM region before touching a byte.  A guest
that hands a device an address outside RAM gets `GuestMemoryError`, which the
device turns into a failed request; it never reaches the mapping.
"""
from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass

from .addr import GPA, MMIO_HOLE_END, MMIO_HOLE_START, PAGE_SIZE, HostOffset, MIN_MEMORY


MADV_HUGEPAGE, MADV_POPULATE_WRITE = 14, 23     # the latter: Linux 5.14+


class GuestMemoryError(Exception):
    """A guest-supplied address range is not backed by guest RAM (guest's fault)."""


class MemoryConfigError(ValueError):
    """The requested memory size cannot be built (user's fault)."""


@dataclass(frozen=True)
class RamOptions:
    """How guest RAM is backed: GuestMemory.create's options, all off by default."""
    prefault: bool = False
    hugepages: str | None = None      # None, "thp" or "hugetlb"


@dataclass(frozen=True)
class RamRegion:
    gpa: GPA
    size: int
    offset: HostOffset  # where the region starts in the memfd

    @property
    def end(self) -> GPA:
        return self.gpa + self.size


def layout_ram(size: int) -> list[RamRegion]:
    """Split `size` bytes of RAM around the MMIO hole."""
    if size < MIN_MEMORY or size % PAGE_SIZE:
        raise MemoryConfigError(
            f"memory size {size} must be a multiple of 4 KiB and at least {MIN_MEMORY >> 20} MiB")
    low = min(size, int(MMIO_HOLE_START))
    regions = [RamRegion(GPA(0), low, HostOffset(0))]
    if size > low:
        regions.append(RamRegion(GPA(int(MMIO_HOLE_END)), size - low, HostOffset(low)))
    return regions


class GuestMemory:
    """Bounds-checked access to guest RAM backed by `buf` (an mmap or bytearray)."""

    def __init__(self, buf, regions: list[RamRegion], fd: int = -1):
        self._buf = buf
        self._view = memoryview(buf)
        self.regions = regions
        self.fd = fd
        self.size = sum(r.size for r in regions)
        self._written: set[int] | None = None      # pages the core wrote (track_writes)
        self._written_lock = threading.Lock()

    # ---- construction -------------------------------------------------
    @classmethod
    def create(cls, size: int, name: str = "sealvm-ram", *, prefault: bool = False,
               hugepages: str | None = None) -> "GuestMemory":
        """Guest RAM in a new memfd.  Both options are off by default.

        prefault: populate every page on the host (MADV_POPULATE_WRITE) before
            the guest runs, so a guest's first touch of a page costs only the
            hypervisor's own fault; costs start-up time (about 1 ms per MiB
            with 4 KiB pages here) and makes all of RAM resident at once.
        hugepages: "thp" advises transparent huge pages (MADV_HUGEPAGE), which
            the host must allow for shared memory (transparent_hugepage/
            shmem_enabled: advise, within_size or always; otherwise the advice
            has no effect, so the caller checks that); "hugetlb" takes 2 MiB
            pages from the reserved pool (MFD_HUGETLB; the mmap fails with
            ENOMEM when vm.nr_hugepages cannot cover `size`).
        """
        regions = layout_ram(size)
        if hugepages not in (None, "thp", "hugetlb"):
            raise MemoryConfigError(f"unknown huge-page mode {hugepages!r}")
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugepages == "hugetlb" else 0)
        fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(fd, size)
            # SAFETY: maps exactly `size` bytes of a memfd we just sized to `size`.
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        mem = cls(buf, regions, fd)
        for wanted, advice in ((hugepages == "thp", MADV_HUGEPAGE), (prefault, MADV_POPULATE_WRITE)):
            if wanted:
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                # SAFETY: the range is exactly our own mapping of the guest RAM memfd.
                if libc.madvise(ctypes.c_void_p(mem.host_address()), ctypes.c_size_t(size),
                                ctypes.c_int(advice)) != 0:
                    err = ctypes.get_errno()
                    mem.close()
                    raise MemoryConfigError(f"madvise({advice}) on guest RAM failed: "
                                            f"{os.strerror(err)}")
        return mem

    @classmethod
    def anonymous(cls, size: int) -> "GuestMemory":
        """RAM without a memfd, for device-model tests that need no KVM."""
        return cls(bytearray(size), layout_ram(size))

    @property
    def buffer(self):
        """The mapping itself (for mlock/madvise by the sandbox), never handed to devices."""
        return self._buf

    def close(self) -> None:
        self._view.release()
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def host_address(self) -> int:
        """Userspace address of the mapping (for KVM_SET_USER_MEMORY_REGION)."""
        import ctypes
        # SAFETY: from_buffer pins the mmap for the lifetime of the returned pointer use.
        c = ctypes.c_char.from_buffer(self._buf)
        addr = ctypes.addressof(c)
        del c
        return addr

    # ---- translation --------------------------------------------------
    def translate(self, gpa: int, length: int) -> HostOffset:
        """Host offset of [gpa, gpa+length), which must lie inside one RAM region."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r.offset + (int(gpa) - int(r.gpa))
        raise GuestMemoryError(f"guest range {int(gpa):#x}+{length:#x} is not RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.translate(gpa, length)
            return True
        except GuestMemoryError:
            return False

    # ---- access -------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        off = self.translate(gpa, length)
        return self._view[off:off + length]

    def writable_view(self, gpa: int, length: int) -> memoryview:
        """A view the caller writes into (counted by `track_writes`)."""
        off = self.translate(gpa, length)
        if self._written is not None:
            self._mark(off, length)
        return self._view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data) -> None:
        self.writable_view(gpa, len(data))[:] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.writable_view(gpa, length)[:] = bytes([byte]) * length

    # ---- pages the core writes ------------------------------------------
    # KVM's dirty log sees only the guest's own stores; a live migration also needs the
    # pages the devices write (buffers, used rings, status bytes), recorded here.
    def track_writes(self, on: bool) -> None:
        with self._written_lock:
            self._written = set() if on else None

    def take_written(self) -> set[int]:
        """Memfd page numbers written through this object since the last call."""
        with self._written_lock:
            taken, self._written = self._written or set(), set() if self._written is not None else None
        return taken

    def _mark(self, off: int, length: int) -> None:
        with self._written_lock:
            if self._written is not None:
                self._written.update(range(off >> 12, (off + max(length, 1) - 1 >> 12) + 1))

    def read_u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self._view, self.translate(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self._view, self.translate(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self._view, self.translate(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        off = self.translate(gpa, 2)
        if self._written is not None:
            self._mark(off, 2)
        struct.pack_into("<H", self._view, off, value)

    def write_u32(self, gpa: int, value: int) -> None:
        off = self.translate(gpa, 4)
        if self._written is not None:
            self._mark(off, 4)
        struct.pack_into("<I", self._view, off, value)

    def write_u64(self, gpa: int, value: int) -> None:
        off = self.translate(gpa, 8)
        if self._written is not None:
            self._mark(off, 8)
        struct.pack_into("<Q", self._view, off, value)
