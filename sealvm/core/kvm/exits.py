"""Decoding a vCPU exit from kvm_run into a small value, and writing replies back.

`decode_exit(run, buffer)` turns the exit union into one frozen dataclass per
exit kind (copies, so the result stays valid after the next KVM_RUN).
`complete_pio_in` / `complete_mmio_read` write the device's answer where KVM
reads it on the next KVM_RUN.  Every offset taken from kvm_run is checked
against the mapping before use.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import ioctls as K
from .raw import KvmError


@dataclass(frozen=True, slots=True)
class Io:
    direction: int          # K.KVM_EXIT_IO_IN or K.KVM_EXIT_IO_OUT
    size: int               # bytes per access: 1, 2 or 4
    port: int
    count: int              # >1 for string I/O (rep ins/outs)
    data_offset: int        # offset of size*count data bytes inside the kvm_run mapping
    data: bytes | None      # for OUT: the bytes written; for IN: None (reply with complete_pio_in)

    @property
    def is_write(self) -> bool:
        return self.direction == K.KVM_EXIT_IO_OUT


@dataclass(frozen=True, slots=True)
class Mmio:
    phys_addr: int
    data: bytes             # for writes: the `len` bytes written; for reads: zeros
    len: int
    is_write: bool


@dataclass(frozen=True, slots=True)
class SystemEvent:
    type: int               # K.KVM_SYSTEM_EVENT_*
    flags: int
    data: tuple[int, ...]   # data[:ndata]


@dataclass(frozen=True, slots=True)
class InternalError:
    suberror: int           # K.KVM_INTERNAL_ERROR_*
    data: tuple[int, ...]   # data[:ndata]


@dataclass(frozen=True, slots=True)
class FailEntry:
    reason: int             # hardware_entry_failure_reason
    cpu: int


@dataclass(frozen=True, slots=True)
class ExceptionExit:
    exception: int
    error_code: int


@dataclass(frozen=True, slots=True)
class OtherExit:
    """An exit with no payload sealvm decodes (HLT, SHUTDOWN, INTR, UNKNOWN, ...)."""
    reason: int
    name: str
    hardware_exit_reason: int = 0


def exit_name(reason: int) -> str:
    return K.EXIT_REASON_NAMES.get(reason, f"KVM_EXIT_{reason} (unknown)")


def _io_span(io, buffer_len: int) -> tuple[int, int]:
    start, length = io.data_offset, io.size * io.count
    if io.size not in (1, 2, 4, 8) or start + length > buffer_len:
        raise KvmError("KVM_RUN", 0, f"KVM_EXIT_IO data {start:#x}+{length:#x} (size {io.size}) "
                       f"lies outside the {buffer_len:#x}-byte kvm_run area")
    return start, length


def decode_exit(run, buffer=None):
    """Decode `run.exit_reason` and its payload.

    `buffer` is the vCPU's whole kvm_run mapping (`VcpuFd.run_buffer`); it is
    needed only to copy the data of an OUT exit (Io.data is None without it).
    """
    reason = run.exit_reason
    if reason == K.KVM_EXIT_IO:
        io = run.io
        data = None
        if io.direction == K.KVM_EXIT_IO_OUT and buffer is not None:
            start, length = _io_span(io, len(buffer))
            # SAFETY: _io_span checked [start, start+length) lies inside the mapping.
            data = bytes(buffer[start:start + length])
        return Io(io.direction, io.size, io.port, io.count, io.data_offset, data)
    if reason == K.KVM_EXIT_MMIO:
        m = run.mmio
        n = min(m.len, 8)
        return Mmio(m.phys_addr, bytes(m.data)[:n], m.len, bool(m.is_write))
    if reason == K.KVM_EXIT_SYSTEM_EVENT:
        e = run.system_event
        return SystemEvent(e.type, e.flags, tuple(e.data[:min(e.ndata, 16)]))
    if reason == K.KVM_EXIT_INTERNAL_ERROR:
        i = run.internal
        return InternalError(i.suberror, tuple(i.data[:min(i.ndata, 16)]))
    if reason == K.KVM_EXIT_FAIL_ENTRY:
        f = run.fail_entry
        return FailEntry(f.hardware_entry_failure_reason, f.cpu)
    if reason == K.KVM_EXIT_EXCEPTION:
        return ExceptionExit(run.ex.exception, run.ex.error_code)
    hw = run.hw.hardware_exit_reason if reason == K.KVM_EXIT_UNKNOWN else 0
    return OtherExit(reason, exit_name(reason), hw)


def complete_pio_in(run, buffer, data: bytes) -> None:
    """Answer a KVM_EXIT_IO IN exit: `data` is exactly size*count bytes for the guest."""
    io = run.io
    if run.exit_reason != K.KVM_EXIT_IO or io.direction != K.KVM_EXIT_IO_IN:
        raise ValueError("the current exit is not a port I/O read")
    start, length = _io_span(io, len(buffer))
    if len(data) != length:
        raise ValueError(f"port {io.port:#x} read needs {length} bytes, got {len(data)}")
    # SAFETY: [start, start+length) was checked to lie inside the kvm_run mapping.
    buffer[start:start + length] = data


def complete_mmio_read(run, data: bytes) -> None:
    """Answer a KVM_EXIT_MMIO read: `data` is exactly mmio.len bytes for the guest."""
    m = run.mmio
    if run.exit_reason != K.KVM_EXIT_MMIO or m.is_write:
        raise ValueError("the current exit is not an MMIO read")
    if not 0 < m.len <= 8 or len(data) != m.len:
        raise ValueError(f"MMIO read at {m.phys_addr:#x} needs {m.len} bytes, got {len(data)}")
    # SAFETY: len(data) <= 8 == len(m.data), and ctypes arrays bounds-check each index.
    for i, b in enumerate(data):
        m.data[i] = b
