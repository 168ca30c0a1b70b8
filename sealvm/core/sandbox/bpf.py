"""A small classic-BPF assembler for seccomp allow-lists.

The program it emits has one fixed shape, chosen so that no jump ever needs
more than a handful of instructions (classic BPF jump offsets are u8):

    ld  arch ; jeq AUDIT_ARCH_X86_64 ? +1 : 0 ; ret KILL      wrong ABI: kill
    ld  nr   ; jge X32_SYSCALL_BIT  ? 0 : +1 ; ret KILL      x32 call: kill
    per rule:  jeq nr ? 0 : +len(body) ; body                 body ends in ret
    ret DEFAULT                                               not listed: kill

A plain rule's body is `ret ACTION` (two instructions per syscall).  A rule
with argument checks loads one argument word per check and jumps forward to a
`ret DENY` that closes its body, so every jump stays inside one short body,
whatever the number of rules.  Arguments are compared on their low 32 bits:
use checks only for arguments the kernel itself reads as 32-bit (ioctl request,
clone flags, mmap prot, pids).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Iterable, NamedTuple

# Classic BPF opcodes (linux/bpf_common.h).
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x04, 0x05, 0x06
BPF_W, BPF_ABS, BPF_K = 0x00, 0x20, 0x00
BPF_AND = 0x50
BPF_JEQ, BPF_JGE = 0x10, 0x30
BPF_MAXINSNS = 4096
MAX_JUMP = 255

# seccomp return actions (linux/seccomp.h); lower 16 bits carry data (errno).
SECCOMP_RET_KILL_PROCESS = 0x8000_0000
SECCOMP_RET_ERRNO = 0x0005_0000
SECCOMP_RET_ALLOW = 0x7FFF_0000

AUDIT_ARCH_X86_64 = 0xC000_003E
X32_SYSCALL_BIT = 0x4000_0000

# struct seccomp_data layout: int nr; u32 arch; u64 instruction_pointer; u64 args[6].
OFF_NR, OFF_ARCH, OFF_ARGS = 0, 4, 16
U32 = 0xFFFF_FFFF


def ret_errno(err: int) -> int:
    """The action 'fail this call with errno `err`'."""
    if not 0 < err <= 0xFFF:
        raise ValueError(f"errno {err} out of range")
    return SECCOMP_RET_ERRNO | err


class Insn(NamedTuple):
    """One struct sock_filter: opcode, jump-if-true, jump-if-false, constant."""
    code: int
    jt: int
    jf: int
    k: int


class SockFilter(ctypes.Structure):
    # SAFETY: mirrors struct sock_filter (linux/filter.h): u16 code, u8 jt, u8 jf, u32 k = 8 bytes.
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    # SAFETY: mirrors struct sock_fprog: unsigned short len, padding, struct sock_filter *filter.
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def stmt(code: int, k: int) -> Insn:
    if not 0 <= k <= U32:
        raise ValueError(f"BPF constant {k:#x} does not fit 32 bits")
    return Insn(code, 0, 0, k)


def jump(op: int, k: int, jt: int, jf: int) -> Insn:
    if not (0 <= jt <= MAX_JUMP and 0 <= jf <= MAX_JUMP):
        raise ValueError(f"BPF jump offset out of range: jt={jt} jf={jf} (max {MAX_JUMP})")
    if not 0 <= k <= U32:
        raise ValueError(f"BPF constant {k:#x} does not fit 32 bits")
    return Insn(BPF_JMP | op | BPF_K, jt, jf, k)


def load(offset: int) -> Insn:
    return stmt(BPF_LD | BPF_W | BPF_ABS, offset)


def ret(action: int) -> Insn:
    return stmt(BPF_RET | BPF_K, action)


def arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument `index` (x86-64 is little-endian)."""
    return OFF_ARGS + 8 * index


@dataclass(frozen=True)
class ArgCheck:
    """A condition on the low 32 bits of one syscall argument.

    Holds when `(arg & mask) == value` (or `!=` with `equal=False`).
    """
    index: int
    value: int
    mask: int = U32
    equal: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 5:
            raise ValueError(f"syscall argument index {self.index} not in 0..5")
        if not (0 <= self.mask <= U32 and 0 <= self.value <= U32):
            raise ValueError("argument checks compare 32-bit words")
        if self.value & ~self.mask:
            raise ValueError(f"value {self.value:#x} has bits outside mask {self.mask:#x}: "
                             "the check could never hold")


@dataclass(frozen=True)
class SyscallRule:
    """What to do with syscall `nr`: `action`, unless one of `deny_if` holds."""
    nr: int
    action: int = SECCOMP_RET_ALLOW
    deny_if: tuple[ArgCheck, ...] = ()
    deny_action: int = SECCOMP_RET_KILL_PROCESS


def _rule_body(rule: SyscallRule) -> list[Insn]:
    """Per check: load its argument word, mask it, jump to the closing `ret deny_action`
    when it holds; then `ret action`, `ret deny_action`.  Built back to front, so each
    jump's distance is the length of what follows it."""
    if not rule.deny_if:
        return [ret(rule.action)]
    body = [ret(rule.action), ret(rule.deny_action)]
    for check in reversed(rule.deny_if):
        to_deny = len(body) - 1                 # skip all that follows but the last insn
        jt, jf = (to_deny, 0) if check.equal else (0, to_deny)
        mask = [stmt(BPF_ALU | BPF_AND | BPF_K, check.mask)] if check.mask != U32 else []
        body = [load(arg_low(check.index)), *mask, jump(BPF_JEQ, check.value, jt, jf), *body]
    return body


def assemble(rules: Iterable[SyscallRule], *, arch: int = AUDIT_ARCH_X86_64,
             default: int = SECCOMP_RET_KILL_PROCESS) -> list[Insn]:
    """The whole filter program for `rules` (first match wins; duplicates refused)."""
    prog = [
        load(OFF_ARCH),
        jump(BPF_JEQ, arch, 1, 0),
        ret(SECCOMP_RET_KILL_PROCESS),
        load(OFF_NR),
        jump(BPF_JGE, X32_SYSCALL_BIT, 0, 1),
        ret(SECCOMP_RET_KILL_PROCESS),
    ]
    seen: set[int] = set()
    for rule in rules:
        if rule.nr in seen:
            raise ValueError(f"syscall {rule.nr} listed twice in the seccomp policy")
        if not 0 <= rule.nr < X32_SYSCALL_BIT:
            raise ValueError(f"syscall number {rule.nr} out of range")
        seen.add(rule.nr)
        body = _rule_body(rule)
        prog.append(jump(BPF_JEQ, rule.nr, 0, len(body)))
        prog.extend(body)
    prog.append(ret(default))
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"seccomp program has {len(prog)} instructions, "
                         f"more than BPF_MAXINSNS={BPF_MAXINSNS}")
    return prog


class CompiledFilter:
    """A program as the kernel takes it: a sock_fprog pointing at a sock_filter array.

    Keep this object alive for as long as the kernel may read `fprog`.
    """

    def __init__(self, insns: list[Insn]):
        if not 0 < len(insns) <= BPF_MAXINSNS:
            raise ValueError(f"program length {len(insns)} not in 1..{BPF_MAXINSNS}")
        self.insns = list(insns)
        # SAFETY: an array of exactly len(insns) elements, each built from a range-checked Insn.
        self.array = (SockFilter * len(insns))(*(SockFilter(*i) for i in insns))
        # SAFETY: `filter` points at self.array, which lives exactly as long as self.
        self.fprog = SockFprog(len(insns), ctypes.cast(self.array, ctypes.POINTER(SockFilter)))

    def pointer(self) -> ctypes.c_void_p:
        # SAFETY: the address of self.fprog, kept alive by self for the duration of the call.
        return ctypes.c_void_p(ctypes.addressof(self.fprog))

