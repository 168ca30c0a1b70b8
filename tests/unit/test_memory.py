"""Guest memory layout, address types and bounds checks (no KVM needed)."""
import pytest

from sealvm.core.addr import GPA, MMIO_HOLE_END, MMIO_HOLE_START, HostOffset, MiB
from sealvm.core.memory import GuestMemory, GuestMemoryError, MemoryConfigError, layout_ram


def test_small_ram_is_one_region_below_the_hole():
    (r,) = layout_ram(64 * MiB)
    assert (int(r.gpa), r.size, int(r.offset)) == (0, 64 * MiB, 0)


def test_large_ram_is_split_around_the_mmio_hole():
    size = int(MMIO_HOLE_START) + 512 * MiB
    low, high = layout_ram(size)
    assert low.end == MMIO_HOLE_START
    assert high.gpa == MMIO_HOLE_END and high.size == 512 * MiB
    assert int(high.offset) == int(MMIO_HOLE_START)


@pytest.mark.parametrize("size", [0, 1 * MiB, 4 * MiB + 1])
def test_bad_sizes_are_refused(size):
    with pytest.raises(MemoryConfigError):
        layout_ram(size)


def test_gpa_and_host_offset_do_not_mix():
    with pytest.raises(TypeError):
        GPA(0x1000) + HostOffset(4)
    with pytest.raises(TypeError):
        HostOffset(4) + GPA(0x1000)
    assert isinstance(GPA(0x1000) + 8, GPA)
    assert GPA(0x2000) - GPA(0x1000) == 0x1000


def test_access_outside_ram_raises_guest_error():
    mem = GuestMemory.anonymous(4 * MiB)
    mem.write_u32(0x1000, 0xDEADBEEF)
    assert mem.read_u32(0x1000) == 0xDEADBEEF
    for gpa, n in [(4 * MiB - 2, 4), (int(MMIO_HOLE_START), 1), (-1, 1), (0, -1)]:
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, n)


def test_memfd_ram_is_shared_with_its_mapping():
    mem = GuestMemory.create(4 * MiB)
    try:
        mem.write(0x2000, b"sealed")
        import os
        assert os.pread(mem.fd, 6, 0x2000) == b"sealed"
        assert mem.host_address() != 0
    finally:
        mem.close()
