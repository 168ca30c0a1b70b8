"""The seccomp BPF assembler and the core's policy, checked without installing anything.

A small classic-BPF interpreter (below) runs the assembled programs on
synthetic `seccomp_data`, so the tests state behaviour ("ioctl(TIOCSTI) kills")
as well as shape ("the program starts with the arch check").
"""
from __future__ import annotations

import ctypes
import errno
import re
from pathlib import Path

import pytest

from sealvm.core.sandbox import bpf
from sealvm.core.sandbox.bpf import (AUDIT_ARCH_X86_64, BPF_MAXINSNS, SECCOMP_RET_ALLOW,
                                     SECCOMP_RET_KILL_PROCESS, ArgCheck, Insn, SyscallRule,
                                     assemble, ret_errno)
from sealvm.core.sandbox import memlock, policy, process, seccomp
from sealvm.core.sandbox.policy import (CLONE_THREAD, CORE_ALLOWED_SYSCALLS, PROT_EXEC, TIOCSTI,
                                        core_program)
from tests.unit.syscall_numbers import NOTABLY_DENIED, X86_64, number

AUDIT_ARCH_I386 = 0x4000_0003
KVM_RUN = 0xAE80
PID = 4242
UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


# ---- a classic BPF interpreter for seccomp programs ----------------------
def seccomp_data(nr: int, args=(), arch: int = AUDIT_ARCH_X86_64) -> bytes:
    words = list(args) + [0] * (6 - len(args))
    data = nr.to_bytes(4, "little", signed=nr < 0) + arch.to_bytes(4, "little")
    data += (0x401000).to_bytes(8, "little")
    return data + b"".join((a & (2**64 - 1)).to_bytes(8, "little") for a in words)


def run(prog: list[Insn], nr: int, args=(), arch: int = AUDIT_ARCH_X86_64) -> int:
    """Execute `prog` like the kernel would; returns the seccomp action."""
    data = seccomp_data(nr, args, arch)
    acc, pc, steps = 0, 0, 0
    while True:
        steps += 1
        assert steps <= len(prog), "programs must only jump forward"
        code, jt, jf, k = prog[pc]
        cls = code & 0x07
        if cls == bpf.BPF_LD:
            assert code == bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS and k % 4 == 0 and k + 4 <= 64
            acc = int.from_bytes(data[k:k + 4], "little")
            pc += 1
        elif cls == bpf.BPF_ALU:
            assert code == bpf.BPF_ALU | bpf.BPF_AND | bpf.BPF_K
            acc &= k
            pc += 1
        elif cls == bpf.BPF_JMP:
            op = code & 0xF0
            taken = {bpf.BPF_JEQ: acc == k, bpf.BPF_JGE: acc >= k}[op]
            pc += 1 + (jt if taken else jf)
        elif cls == bpf.BPF_RET:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        assert pc < len(prog), "jumped past the end of the program"


def check_structure(prog: list[Insn]) -> None:
    assert 0 < len(prog) <= BPF_MAXINSNS
    for pc, (code, jt, jf, k) in enumerate(prog):
        assert 0 <= jt <= 255 and 0 <= jf <= 255
        if code & 0x07 == bpf.BPF_JMP:
            assert pc + 1 + max(jt, jf) < len(prog)
    assert prog[-1].code & 0x07 == bpf.BPF_RET


# ---- shape ---------------------------------------------------------------
def test_program_starts_with_arch_and_x32_checks_and_ends_with_kill():
    prog = assemble([SyscallRule(0)])
    ld_abs = bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS
    ret_k = bpf.BPF_RET | bpf.BPF_K
    assert prog[:6] == [
        Insn(ld_abs, 0, 0, 4),                                              # seccomp_data.arch
        Insn(bpf.BPF_JMP | bpf.BPF_JEQ, 1, 0, AUDIT_ARCH_X86_64),
        Insn(ret_k, 0, 0, SECCOMP_RET_KILL_PROCESS),
        Insn(ld_abs, 0, 0, 0),                                              # seccomp_data.nr
        Insn(bpf.BPF_JMP | bpf.BPF_JGE, 0, 1, bpf.X32_SYSCALL_BIT),
        Insn(ret_k, 0, 0, SECCOMP_RET_KILL_PROCESS),
    ]
    assert prog[-1] == Insn(ret_k, 0, 0, SECCOMP_RET_KILL_PROCESS)


def test_a_plain_rule_is_compare_then_return():
    prog = assemble([SyscallRule(39), SyscallRule(186)])
    assert prog[6:10] == [
        Insn(bpf.BPF_JMP | bpf.BPF_JEQ, 0, 1, 39), Insn(bpf.BPF_RET, 0, 0, SECCOMP_RET_ALLOW),
        Insn(bpf.BPF_JMP | bpf.BPF_JEQ, 0, 1, 186), Insn(bpf.BPF_RET, 0, 0, SECCOMP_RET_ALLOW),
    ]
    assert len(prog) == 6 + 4 + 1


def test_listed_calls_allowed_everything_else_killed():
    prog = assemble([SyscallRule(0), SyscallRule(1), SyscallRule(60)])
    check_structure(prog)
    for nr in (0, 1, 60):
        assert run(prog, nr) == SECCOMP_RET_ALLOW
    for nr in (2, 59, 257, 435, 0x3FFF_FFFF):
        assert run(prog, nr) == SECCOMP_RET_KILL_PROCESS


def test_other_architectures_and_x32_calls_are_killed():
    prog = assemble([SyscallRule(0), SyscallRule(1)])
    assert run(prog, 0, arch=AUDIT_ARCH_I386) == SECCOMP_RET_KILL_PROCESS
    assert run(prog, 0 | bpf.X32_SYSCALL_BIT) == SECCOMP_RET_KILL_PROCESS
    assert run(prog, 1 | bpf.X32_SYSCALL_BIT) == SECCOMP_RET_KILL_PROCESS
    assert run(prog, -1) == SECCOMP_RET_KILL_PROCESS


def test_long_lists_never_need_long_jumps():
    rules = [SyscallRule(nr) for nr in range(1000)]
    rules += [SyscallRule(1000 + i, deny_if=(ArgCheck(1, i), ArgCheck(2, 4, mask=4)))
              for i in range(100)]
    prog = assemble(rules)
    check_structure(prog)
    assert max(max(i.jt, i.jf) for i in prog) <= 8
    for nr in (0, 500, 999):
        assert run(prog, nr) == SECCOMP_RET_ALLOW
    assert run(prog, 1050, [0, 7, 0]) == SECCOMP_RET_ALLOW
    assert run(prog, 1050, [0, 50, 0]) == SECCOMP_RET_KILL_PROCESS
    assert run(prog, 1050, [0, 7, 4]) == SECCOMP_RET_KILL_PROCESS
    assert run(prog, 5000) == SECCOMP_RET_KILL_PROCESS


def test_program_longer_than_bpf_maxinsns_is_refused():
    # 6 header + 2 per rule + 1 default: 2044 rules fit, 2045 do not.
    assert len(assemble([SyscallRule(nr) for nr in range(2044)])) == BPF_MAXINSNS - 1
    with pytest.raises(ValueError, match="BPF_MAXINSNS"):
        assemble([SyscallRule(nr) for nr in range(2045)])


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="twice"):
        assemble([SyscallRule(1), SyscallRule(1)])
    with pytest.raises(ValueError):
        assemble([SyscallRule(bpf.X32_SYSCALL_BIT)])
    with pytest.raises(ValueError):
        ArgCheck(6, 0)
    with pytest.raises(ValueError, match="never hold"):
        ArgCheck(0, 0x10, mask=0x1)
    with pytest.raises(ValueError):
        ArgCheck(0, 1 << 32)
    with pytest.raises(ValueError, match="jump offset"):
        bpf.jump(bpf.BPF_JEQ, 0, 256, 0)
    with pytest.raises(ValueError):
        ret_errno(0)


def test_argument_checks_and_errno_actions():
    prog = assemble([SyscallRule(16, deny_if=(ArgCheck(1, TIOCSTI),)),
                     SyscallRule(234, deny_if=(ArgCheck(0, PID, equal=False),)),
                     SyscallRule(435, ret_errno(errno.ENOSYS))])
    check_structure(prog)
    assert run(prog, 16, [3, KVM_RUN]) == SECCOMP_RET_ALLOW
    assert run(prog, 16, [0, TIOCSTI]) == SECCOMP_RET_KILL_PROCESS
    assert run(prog, 234, [PID, PID + 1, 34]) == SECCOMP_RET_ALLOW
    assert run(prog, 234, [1, 1, 9]) == SECCOMP_RET_KILL_PROCESS
    assert run(prog, 435) == bpf.SECCOMP_RET_ERRNO | errno.ENOSYS


def test_compiled_filter_matches_struct_sock_fprog():
    assert ctypes.sizeof(bpf.SockFilter) == 8
    assert ctypes.sizeof(bpf.SockFprog) == 16
    prog = assemble([SyscallRule(0)])
    cf = bpf.CompiledFilter(prog)
    assert cf.fprog.len == len(prog)
    assert [Insn(f.code, f.jt, f.jf, f.k) for f in cf.array] == prog
    assert ctypes.addressof(cf.fprog.filter.contents) == ctypes.addressof(cf.array)


# ---- the core's policy ---------------------------------------------------
@pytest.fixture(scope="module")
def core():
    prog = core_program(PID)
    check_structure(prog)
    return prog


def test_core_program_fits_and_every_allowed_call_has_a_reason(core):
    assert len(core) <= BPF_MAXINSNS
    source = Path(policy.__file__).read_text()
    table = source[source.index("CORE_ALLOWED_SYSCALLS: dict"):source.index("\n}\n")]
    lines = table.splitlines()
    for name, nr in CORE_ALLOWED_SYSCALLS.items():
        assert X86_64[name] == nr, name
        # the reason is a comment on the entry's line, or the comment lines just above it
        i = next(i for i, line in enumerate(lines) if f'"{name}": {nr},' in line)
        assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"{name} needs a reason"


def test_core_program_allows_each_listed_call_in_its_ordinary_use(core):
    ordinary_args = {"ioctl": [5, KVM_RUN], "clone": [0x3D0F00], "mmap": [0, 4096, 3],
                     "mprotect": [0, 4096, 3], "tgkill": [PID, PID + 1, 34]}
    for name in CORE_ALLOWED_SYSCALLS:
        action = run(core, number(name), ordinary_args.get(name, []))
        if name == "clone3":
            assert action == bpf.SECCOMP_RET_ERRNO | errno.ENOSYS
        else:
            assert action == SECCOMP_RET_ALLOW, name


def test_core_program_kills_every_notably_denied_call(core):
    assert not set(NOTABLY_DENIED) & set(CORE_ALLOWED_SYSCALLS)
    for name in NOTABLY_DENIED:
        assert run(core, number(name)) == SECCOMP_RET_KILL_PROCESS, name


def test_core_program_argument_checks(core):
    ioctl, clone, mmap_, mprotect, tgkill = (number(n) for n in
                                              ("ioctl", "clone", "mmap", "mprotect", "tgkill"))
    # terminal injection / reconfiguration, including with junk in the upper 32 bits
    for req in (TIOCSTI, 0x541C, 0x5423, (1 << 32) | TIOCSTI):
        assert run(core, ioctl, [0, req]) == SECCOMP_RET_KILL_PROCESS
    assert run(core, ioctl, [0, 0x5401]) == SECCOMP_RET_ALLOW           # TCGETS
    # fork (SIGCHLD | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID) is not a thread
    assert run(core, clone, [0x01200011]) == SECCOMP_RET_KILL_PROCESS
    assert run(core, clone, [CLONE_THREAD | 0x100 | 0x800 | 0x200]) == SECCOMP_RET_ALLOW
    for nr in (mmap_, mprotect):
        assert run(core, nr, [0, 4096, 1 | PROT_EXEC]) == SECCOMP_RET_KILL_PROCESS
        assert run(core, nr, [0, 4096, 0]) == SECCOMP_RET_ALLOW
    assert run(core, tgkill, [1, 1, 9]) == SECCOMP_RET_KILL_PROCESS


@pytest.mark.skipif(not UNISTD_64.exists(), reason="no kernel headers")
def test_syscall_numbers_match_the_kernel_headers():
    header = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD_64.read_text()))
    for name, nr in X86_64.items():
        assert int(header[name]) == nr, name
    # the numbers the sandbox itself calls
    for name, nr in (("seccomp", seccomp.SYS_SECCOMP), ("mlock2", memlock.SYS_MLOCK2),
                     ("close_range", process.SYS_CLOSE_RANGE)):
        assert int(header[name]) == nr, name
