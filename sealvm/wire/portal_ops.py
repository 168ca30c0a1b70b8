"""The portal's operation table: every request and event, its capability and schemas.

`OPS` maps an op number to an `OpSpec` (name, kind, capability needed, the
request or event payload schema, the reply schema, and cross-field checks).
It is the single source for the codec, `docs/portal.md` and the TCB tool,
which counts `REQUEST_OPS` (SeKVM's KCore exposes 19 hypercalls; the portal
aims to stay at or under 20 operations in total).

Numbering leaves room for later subsystems; each takes a range of 16:

    0x01-0x0F  lifecycle (this file)        0x30-0x3F  snapshot
    0x10-0x1F  block backend                 0x40-0x4F  migration
    0x20-0x2F  network relay                 0x50-0x5F  attestation
    0x100-0x1FF events (core -> host)

Adding an op: pick a number in its range, add an `OpSpec` to `_SPECS`, and
document it in docs/portal.md.  tests/unit/test_portal.py checks the table:
unique numbers, no field named like an encode argument, every payload <= MAX_PAYLOAD.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .portal_schema import (I32, U8, U16, U32, U64, Bytes, Enum, PortalError, Schema, Status,
                            Str, Token, max_size)

MAGIC = 0x5356                 # "VS" little-endian: b"VS" on the wire
VERSION = 1
HEADER_SIZE = 32
MAX_PAYLOAD = 2 * 1024 * 1024
MAX_MESSAGE = 1024             # reply messages, stop reasons, log lines
MAX_IMAGE = 1 << 30            # a kernel or initrd image
MAX_IMAGE_CHUNK = 1 << 20      # one LOAD_IMAGE chunk
MAX_CMDLINE = 4095
MAX_CONSOLE_INPUT = 4096
MAX_CONSOLE_OUTPUT = 64 * 1024
MAX_VCPUS = 64
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 2, 65536
CAP_VM = "vm"                  # the per-VM token HELLO hands out


class Kind(enum.IntEnum):
    REQUEST = 1                # host -> core
    REPLY = 2                  # core -> host, echoes the request's seq and op
    EVENT = 3                  # core -> host, seq 0


class Op(enum.IntEnum):
    HELLO = 0x01
    LOAD_IMAGE = 0x02
    CONFIGURE = 0x03
    START = 0x04
    PAUSE = 0x05
    RESUME = 0x06
    STOP = 0x07
    QUERY = 0x08
    CONSOLE_INPUT = 0x09
    ATTACH = 0x0A
    SNAPSHOT = 0x30
    RESTORE = 0x31
    MIGRATE_OUT = 0x40
    MIGRATE_IN = 0x41
    # events
    CONSOLE_OUTPUT = 0x100
    VM_STOPPED = 0x101
    LOG = 0x102
    PROGRESS = 0x103


class VmState(enum.IntEnum):
    EMPTY = 0
    CONFIGURED = 1
    RUNNING = 2
    PAUSED = 3
    STOPPED = 4


class ImageKind(enum.IntEnum):
    KERNEL = 1
    INITRD = 2
    MANIFEST = 3      # the owner's signed manifest bundle (docs/attestation.md)


class AttachKind(enum.IntEnum):
    """What an fd handed over with ATTACH is for (docs/portal.md)."""
    BLOCK = 1         # a disk's sealed image or metadata file: the core reads and writes it
    NET = 2           # a datagram socket the host relays to the owner's gateway
    SNAPSHOT = 3      # where the next snapshot is written, or a restore is read from
    MIGRATION = 4     # a migration stream to or from another host


MAX_ATTACH_INDEX = 7
MAX_TICKET = 4096              # a snapshot's generation ticket or the broker's receipt


class EntryMode(enum.IntEnum):
    PVH = 1
    LONG = 2
    LINUX = 3         # KERNEL is a bzImage (64-bit boot protocol), INITRD optional


class LogLevel(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40


CONFIG_FLAG_RNG = 1 << 0
CONFIG_FLAG_PREFAULT = 1 << 1     # populate guest RAM before the guest runs
CONFIG_FLAG_THP = 1 << 2          # transparent huge pages for guest RAM
CONFIG_FLAG_HUGETLB = 1 << 3      # guest RAM from the reserved huge-page pool
CONFIG_FLAG_BENCH_SINKS = 1 << 4  # the exit-cost benchmark's MMIO sink and ioeventfd
CONFIG_FLAGS = (CONFIG_FLAG_RNG | CONFIG_FLAG_PREFAULT | CONFIG_FLAG_THP | CONFIG_FLAG_HUGETLB
                | CONFIG_FLAG_BENCH_SINKS)

Check = Callable[[Mapping[str, Any]], None]


def _check_load_image(f: Mapping[str, Any]) -> None:
    if f["offset"] + len(f["data"]) > f["total"]:
        raise PortalError(Status.OUT_OF_RANGE, f"image chunk at {f['offset']} of {len(f['data'])} "
                          f"bytes runs past the image size {f['total']}")


@dataclass(frozen=True)
class OpSpec:
    """One operation: `fields` is the request (or event) payload; `reply` the OK reply's."""
    number: int
    name: str
    kind: Kind                 # REQUEST or EVENT
    cap: str | None            # capability the request must carry; None: cap must be zero
    fields: Schema
    reply: Schema = ()
    check: Check | None = None         # cross-field check of the request/event payload

    @property
    def max_payload(self) -> int:
        return max_size(self.fields)

    @property
    def max_reply(self) -> int:
        return max_size(REPLY_PREFIX) + max_size(self.reply)


# Every reply payload starts with these; the op's reply fields follow only when status is OK.
REPLY_PREFIX: Schema = (Enum("status", U16, Status), Str("message", MAX_MESSAGE))
MAX_REFUSAL = max_size(REPLY_PREFIX)

_STATE = Enum("state", U8, VmState)

_SPECS = (
    # attach; the core issues a fresh vm token and revokes the previous one
    OpSpec(Op.HELLO, "HELLO", Kind.REQUEST, None,
           (U16("host_version"),),
           (U16("core_version"), Token("vm_token"), _STATE)),
    # one chunk of the kernel or initrd; chunks arrive in order
    OpSpec(Op.LOAD_IMAGE, "LOAD_IMAGE", Kind.REQUEST, CAP_VM,
           (Enum("kind", U8, ImageKind), U64("offset", hi=MAX_IMAGE),
            U64("total", lo=1, hi=MAX_IMAGE), Bytes("data", MAX_IMAGE_CHUNK)),
           check=_check_load_image),
    # size and boot the VM from the loaded kernel
    OpSpec(Op.CONFIGURE, "CONFIGURE", Kind.REQUEST, CAP_VM,
           (U32("memory_mib", lo=MIN_MEMORY_MIB, hi=MAX_MEMORY_MIB),
            U16("vcpus", lo=1, hi=MAX_VCPUS), Enum("entry", U8, EntryMode),
            U32("flags", mask=CONFIG_FLAGS), Str("cmdline", MAX_CMDLINE))),
    # start the vCPUs
    OpSpec(Op.START, "START", Kind.REQUEST, CAP_VM, ()),
    # stop the vCPUs, keep state
    OpSpec(Op.PAUSE, "PAUSE", Kind.REQUEST, CAP_VM, ()),
    # continue after PAUSE
    OpSpec(Op.RESUME, "RESUME", Kind.REQUEST, CAP_VM, ()),
    # stop the VM for good
    OpSpec(Op.STOP, "STOP", Kind.REQUEST, CAP_VM, ()),
    # state and counters; exit_status -1 while none
    OpSpec(Op.QUERY, "QUERY", Kind.REQUEST, CAP_VM, (),
           (_STATE, I32("exit_status"), Str("stop_reason", MAX_MESSAGE),
            U16("vcpus", hi=MAX_VCPUS), U32("memory_mib", hi=MAX_MEMORY_MIB), U64("exits"),
            # the sealed disk: requests served, tampering detected, host I/O errors, commits
            U64("disk_requests"), U64("disk_tampered"), U64("disk_io_errors"),
            U64("disk_generation"))),
    # bytes for the guest's serial console
    OpSpec(Op.CONSOLE_INPUT, "CONSOLE_INPUT", Kind.REQUEST, CAP_VM,
           (Bytes("data", MAX_CONSOLE_INPUT),)),
    # hand the core one fd (SCM_RIGHTS, in the same message as the frame)
    OpSpec(Op.ATTACH, "ATTACH", Kind.REQUEST, CAP_VM,
           (Enum("kind", U8, AttachKind), U8("index", hi=MAX_ATTACH_INDEX))),
    # empty receipt: pause, seal the VM to the attached SNAPSHOT fd, answer the ticket
    # the owner's broker must sign; with the broker's receipt: the snapshot is the newest
    OpSpec(Op.SNAPSHOT, "SNAPSHOT", Kind.REQUEST, CAP_VM,
           (Bytes("receipt", MAX_TICKET),),
           (Bytes("ticket", MAX_TICKET), U64("generation"), U64("bytes"))),
    # empty receipt: attest as the restorer of the attached snapshot, rebuild the VM from
    # it, answer the ticket; with the broker's receipt the restored VM may start
    OpSpec(Op.RESTORE, "RESTORE", Kind.REQUEST, CAP_VM,
           (Bytes("receipt", MAX_TICKET),),
           (Bytes("ticket", MAX_TICKET), U64("generation"), U64("bytes"))),
    # empty receipt: send the running VM over the attached MIGRATION stream (pre-copy,
    # then stop-and-copy), answer the ticket the source needs to resume if the target
    # never takes over; with the broker's receipt: resume here
    OpSpec(Op.MIGRATE_OUT, "MIGRATE_OUT", Kind.REQUEST, CAP_VM,
           (Bytes("receipt", MAX_TICKET), U32("downtime_ms", lo=10, hi=60_000)),
           (Bytes("ticket", MAX_TICKET), U64("generation"), U64("bytes"),
            Str("report", MAX_MESSAGE))),
    # empty receipt: attest as the migration target, take the VM from the attached
    # MIGRATION stream, answer the ticket; with the broker's receipt the VM may start
    OpSpec(Op.MIGRATE_IN, "MIGRATE_IN", Kind.REQUEST, CAP_VM,
           (Bytes("receipt", MAX_TICKET),),
           (Bytes("ticket", MAX_TICKET), U64("generation"), U64("bytes"))),
    # bytes the guest wrote to its console
    OpSpec(Op.CONSOLE_OUTPUT, "CONSOLE_OUTPUT", Kind.EVENT, None,
           (Bytes("data", MAX_CONSOLE_OUTPUT),)),
    # the VM stopped
    OpSpec(Op.VM_STOPPED, "VM_STOPPED", Kind.EVENT, None,
           (I32("exit_status"), Str("reason", MAX_MESSAGE))),
    # a core log line (refusals among them)
    OpSpec(Op.LOG, "LOG", Kind.EVENT, None,
           (Enum("level", U8, LogLevel), Str("message", MAX_MESSAGE))),
    # how far a snapshot or restore has got
    OpSpec(Op.PROGRESS, "PROGRESS", Kind.EVENT, None, (U64("done"), U64("total"))),
)

OPS: dict[int, OpSpec] = {spec.number: spec for spec in _SPECS}
REQUEST_OPS = tuple(n for n, s in OPS.items() if s.kind is Kind.REQUEST)
EVENT_OPS = tuple(n for n, s in OPS.items() if s.kind is Kind.EVENT)
# Convenience for callers that name events: EVENTS["LOG"] == Op.LOG.
EVENTS: dict[str, Op] = {OPS[n].name: Op(n) for n in EVENT_OPS}


def op_name(op: int) -> str:
    """A printable name for any op number, known or not."""
    spec = OPS.get(op)
    return spec.name if spec is not None else f"op {op:#x}"
