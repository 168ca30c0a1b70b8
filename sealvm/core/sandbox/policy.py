"""The seccomp allow-list of a running core, with the reason for every system call.

Measured, not guessed: `strace -f` of `sealvm run` for the rng, compute
(2 vCPUs), memtouch and idle guests, counting only the calls made after
`Machine.build()` returned (vCPU and queue threads, KVM_RUN loops, device work,
stop, close, interpreter exit), and of the core process (`sealvm.core.main`:
portal socket send/recv, accept4 + SO_PEERCRED for a re-attaching host,
shutdown), plus what timers and event loops need (poll/epoll, clock_nanosleep).
Everything that reaches the file system, makes sockets or processes, changes
credentials or limits, or touches another process is absent and kills the core
(the unit test lists the notable ones and proves each is killed).

Four calls are allowed only with argument checks, and clone3 is answered ENOSYS
so glibc falls back to clone, whose flags a filter can see (the technique of
Docker's and Chromium's policies).  Numbers are x86-64's (the unit test checks
them against <asm/unistd_64.h>); the filter kills any other architecture.
"""
from __future__ import annotations

import errno
import os

from .bpf import ArgCheck, Insn, SyscallRule, SECCOMP_RET_ALLOW, assemble, ret_errno

TIOCSTI, TIOCLINUX, TIOCSETD = 0x5412, 0x541C, 0x5423
CLONE_THREAD = 0x0001_0000
PROT_EXEC = 0x4

# name -> x86-64 number, each with why a running core needs it.
# Order = order in the program (hot calls first).
CORE_ALLOWED_SYSCALLS: dict[str, int] = {
    # KVM_RUN, KVM_GET/SET_* on the kvm, VM and vCPU fds opened during setup (and Python's
    # own TCGETS); TIOCSTI/TIOCLINUX/TIOCSETD refused: they inject input into, or
    # reconfigure, a terminal.
    "ioctl": 16,
    "futex": 202,                           # every lock, Condition and Event of the threads
    "read": 0, "write": 1,                  # eventfds, the portal socket, console output
    "readv": 19, "writev": 20,              # vectored forms on already-open fds (same power)
    "recvfrom": 45, "sendto": 44,           # portal socket (connected: no new peers)
    "recvmsg": 47, "sendmsg": 46,           # portal socket, messages
    # The listening portal socket (handed over by the launcher): a restarted host daemon
    # re-attaches; the connection is checked with SO_PEERCRED (getsockopt).
    "accept4": 288, "getsockopt": 55,
    "shutdown": 48,                         # closing a portal connection when a new host takes over
    "getsockname": 51, "getpeername": 52,   # repr() of a socket already held (log lines)
    "poll": 7, "ppoll": 271, "select": 23, "pselect6": 270,   # waiting on fds already held
    "epoll_create1": 291, "epoll_ctl": 233,                   # selectors (an anonymous fd)
    "epoll_wait": 232, "epoll_pwait": 281, "epoll_pwait2": 441,   # waiting on that epoll
    "eventfd2": 290,                        # ioeventfds for queues (anonymous fd, no file system)
    "close": 3,                             # closing fds at stop and in Machine.close()
    "dup": 32, "dup2": 33, "dup3": 292,     # duplicating an fd already held
    "fcntl": 72,                            # F_GETFL/F_SETFL/F_GETFD on existing fds
    "lseek": 8, "fstat": 5,                 # file objects on already-open fds (and SEEK_DATA
                                            # over the RAM memfd for a snapshot)
    "fsync": 74,                            # a sealed snapshot on its attached fd is durable
    # A sealed snapshot written at known offsets from two threads; the sealed disk: the
    # core reads and writes the disk file the host attached (an fd it already holds, no
    # path) and makes a FLUSH durable (fdatasync) before acknowledging it.
    "pwrite64": 18, "pread64": 17, "fdatasync": 75,
    # glibc's fstat (AT_EMPTY_PATH); with a path it only reads metadata, and os.stat is
    # what linecache uses before printing a traceback.
    "newfstatat": 262,
    "mmap": 9, "mprotect": 10,              # malloc, thread stacks; PROT_EXEC refused
    "munmap": 11, "mremap": 25, "brk": 12,   # free, realloc, the main heap
    "madvise": 28,                          # glibc frees exited threads' stacks (MADV_DONTNEED)
    "mlock": 149, "mlock2": 325,            # lock buffers at run time (munlock stays denied)
    "clone": 56,                            # threading.Thread; only with CLONE_THREAD: no fork
    "clone3": 435,                          # answered ENOSYS: glibc falls back to checked clone
    "set_robust_list": 273, "rseq": 334,    # every new thread (glibc start_thread)
    "sigaltstack": 131,                     # faulthandler / signals on an alternate stack
    "exit": 60, "exit_group": 231,          # a thread ends; the process ends
    "rt_sigaction": 13, "rt_sigprocmask": 14,   # the kick handler; thread start/exit masks
    "rt_sigreturn": 15, "restart_syscall": 219,  # return from / resume after the kick signal
    "tgkill": 234,                          # pthread_kill kicks a vCPU; only our own threads
    "getpid": 39, "gettid": 186,            # tgkill needs them; logging, native thread ids
    "sched_yield": 24,                      # lock back-off in glibc and CPython
    "clock_gettime": 228, "clock_getres": 229, "gettimeofday": 96,   # when the vDSO cannot
    "clock_nanosleep": 230, "nanosleep": 35,   # time.sleep
    "getrandom": 318,                       # os.urandom: virtio-rng entropy, nonces, keys
}


def _checks(name: str, pid: int) -> tuple[ArgCheck, ...]:
    """Argument conditions under which `name` kills instead of running."""
    if name == "ioctl":  # arg1 = request (the kernel takes it as unsigned int)
        return (ArgCheck(1, TIOCSTI), ArgCheck(1, TIOCLINUX), ArgCheck(1, TIOCSETD))
    if name == "clone":  # arg0 = flags; without CLONE_THREAD it makes a process
        return (ArgCheck(0, 0, mask=CLONE_THREAD),)
    if name in ("mmap", "mprotect"):  # arg2 = prot
        return (ArgCheck(2, PROT_EXEC, mask=PROT_EXEC),)
    if name == "tgkill":  # arg0 = thread group: only our own
        return (ArgCheck(0, pid, equal=False),)
    return ()


def core_program(pid: int | None = None) -> list[Insn]:
    """The assembled core filter for process `pid` (default action: kill the process)."""
    pid = os.getpid() if pid is None else pid
    rules = []
    for name, nr in CORE_ALLOWED_SYSCALLS.items():
        if name == "clone3":
            rules.append(SyscallRule(nr, ret_errno(errno.ENOSYS)))
        else:
            rules.append(SyscallRule(nr, SECCOMP_RET_ALLOW, _checks(name, pid)))
    return assemble(rules)
