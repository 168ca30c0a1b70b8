"""The launcher's request format: one fixed-size record, parsed strictly.

The daemon that sends these is untrusted, so the parser accepts exactly one
layout and nothing else: a 96-byte request

    magic u32 = 0x53564c31 ('SVL1') | op u8 | flags u8 | reserved u16 (0)
    memory_mib u32 | reserved u32 (0) | vm_id 64 bytes (ASCII, NUL padded) | reserved 16 (0)

and answers with a 264-byte reply (magic, status u32, pid u32, uid u32,
message 248 bytes) plus, for a successful SPAWN, the portal socket as an
SCM_RIGHTS fd.  Anything else is refused with a message, never a traceback.
"""
from __future__ import annotations

import array
import socket
import struct
from dataclasses import dataclass

from .spawn import MAX_MEMORY_MIB, LaunchError, check_vm_id

MAGIC = 0x53564C31
OP_SPAWN = 1
OP_PING = 2
FLAG_INSECURE_SAME_UID = 1
FLAG_ATTEST = 2                 # measure the core and start its preboot stage
REQUEST = struct.Struct("<IBBHII64s16s")
REPLY = struct.Struct("<IIII248s")
REQUEST_SIZE = REQUEST.size
REPLY_SIZE = REPLY.size
STATUS_OK, STATUS_REFUSED, STATUS_FAILED = 0, 1, 2


@dataclass(frozen=True)
class Request:
    op: int
    vm_id: str
    memory_mib: int
    flags: int


def encode_request(op: int, vm_id: str = "", memory_mib: int = 0, flags: int = 0) -> bytes:
    return REQUEST.pack(MAGIC, op, flags, 0, memory_mib, 0, vm_id.encode("ascii"), b"")


def parse_request(data: bytes) -> Request:
    if len(data) != REQUEST_SIZE:
        raise LaunchError(f"request is {len(data)} bytes, expected {REQUEST_SIZE}")
    magic, op, flags, r1, memory_mib, r2, raw_id, r3 = REQUEST.unpack(data)
    if magic != MAGIC:
        raise LaunchError(f"bad magic {magic:#x}")
    if r1 or r2 or any(r3):
        raise LaunchError("reserved fields must be zero")
    if op == OP_PING:
        if flags or memory_mib or any(raw_id):
            raise LaunchError("PING carries no fields")
        return Request(op, "", 0, 0)
    if op != OP_SPAWN:
        raise LaunchError(f"unknown op {op}")
    if flags & ~(FLAG_INSECURE_SAME_UID | FLAG_ATTEST):
        raise LaunchError(f"unknown flags {flags:#x}")
    name, _, pad = raw_id.partition(b"\0")
    if any(pad):
        raise LaunchError("vm id has bytes after its terminating NUL")
    try:
        vm_id = check_vm_id(name.decode("ascii"))
    except UnicodeDecodeError:
        raise LaunchError("vm id is not ASCII") from None
    if not 2 <= memory_mib <= MAX_MEMORY_MIB:
        raise LaunchError(f"memory {memory_mib} MiB outside 2..{MAX_MEMORY_MIB}")
    return Request(op, vm_id, memory_mib, flags)


def encode_reply(status: int, pid: int = 0, uid: int = 0, message: str = "") -> bytes:
    return REPLY.pack(MAGIC, status, pid, uid, message.encode("utf-8", "replace")[:248])


def decode_reply(data: bytes) -> tuple[int, int, int, str]:
    if len(data) != REPLY_SIZE:
        raise LaunchError(f"launcher reply is {len(data)} bytes, expected {REPLY_SIZE}")
    magic, status, pid, uid, msg = REPLY.unpack(data)
    if magic != MAGIC:
        raise LaunchError("launcher reply has a bad magic")
    return status, pid, uid, msg.rstrip(b"\0").decode("utf-8", "replace")


def send_with_fd(sock: socket.socket, data: bytes, fd: int | None) -> None:
    if fd is None:
        sock.sendall(data)
        return
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def recv_with_fd(sock: socket.socket, size: int) -> tuple[bytes, int | None]:
    """Receive one record of exactly `size` bytes and at most one passed fd."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(size, socket.CMSG_LEN(fds.itemsize))
    fd = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for extra in fds[1:]:
                socket.close(extra)
            fd = fds[0] if fds else None
    if flags & socket.MSG_CTRUNC:
        raise LaunchError("passed file descriptors were truncated")
    while data and len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            break
        data += more
    return data, fd
