"""The seccomp allow-list of a running core, one reason per system call.

Measured, not guessed: `strace -f` of `sealvm run` for the rng, compute
(2 vCPUs), memtouch and idle guests, counting only the calls made after
`Machine.build()` returned (vCPU and queue threads, KVM_RUN loops, device work,
stop, close, interpreter exit), and of the core process (`sealvm.core.main`:
portal socket send/recv, accept4 + SO_PEERCRED for a re-attaching host,
shutdown), plus what timers and event loops need (poll/epoll, clock_nanosleep).  Everything that reaches
the file system, makes sockets or processes, changes credentials or limits, or
touches another process is absent and kills the core.

Four calls are allowed only with argument checks, and clone3 is answered ENOSYS
so glibc falls back to clone, whose flags a filter can see (the technique of
Docker's and Chromium's policies).
"""
from __future__ import annotations

import errno
import os
from typing import Iterable

from .bpf import ArgCheck, Insn, SyscallRule, SECCOMP_RET_ALLOW, assemble, ret_errno
from .syscalls import number

TIOCSTI, TIOCLINUX, TIOCSETD = 0x5412, 0x541C, 0x5423
CLONE_THREAD = 0x0001_0000
PROT_EXEC = 0x4

# name -> why a running core needs it.  Order = order in the program (hot calls first).
CORE_ALLOWED_SYSCALLS: dict[str, str] = {
    "ioctl": "KVM_RUN, KVM_GET/SET_* and KVM_IRQ_LINE on the kvm, VM and vCPU fds opened "
             "during setup (Python's own TCGETS too); TIOCSTI/TIOCLINUX/TIOCSETD refused: "
             "they inject input into, or reconfigure, a terminal",
    "futex": "every lock, Condition and Event of the vCPU, queue and control threads",
    "read": "eventfd_read in queue workers, the host socket, stdin pump",
    "write": "console output, eventfd_write (queue stop, kicks), the host socket",
    "readv": "vectored read on already-open fds (same power as read)",
    "writev": "vectored write on already-open fds (same power as write)",
    "recvfrom": "host channel socket: receive a length-prefixed message",
    "sendto": "host channel socket: send a message (connected socket; no new peers)",
    "recvmsg": "host channel socket: messages, possibly carrying fds (SCM_RIGHTS)",
    "sendmsg": "host channel socket: sealed blobs out to the host",
    "accept4": "the core's listening portal socket (handed over by the launcher): a restarted "
               "host daemon re-attaches; the new connection is checked with SO_PEERCRED",
    "getsockopt": "SO_PEERCRED on an accepted portal connection (who is the peer)",
    "shutdown": "closing a portal connection (SHUT_RDWR) when a new host takes over",
    "getsockname": "repr() of a socket (log lines, the ResourceWarning of an unclosed socket) "
                   "asks for its own address; nothing about other sockets",
    "getpeername": "as getsockname, for the peer of a socket already held",
    "poll": "selectors / waiting on the host socket and eventfds",
    "ppoll": "as poll, with a timespec and signal mask",
    "select": "select.select on existing fds",
    "pselect6": "as select (glibc may use pselect6)",
    "epoll_create1": "selectors.EpollSelector for the host channel loop (anonymous fd)",
    "epoll_ctl": "register existing fds with that epoll",
    "epoll_wait": "wait on that epoll",
    "epoll_pwait": "as epoll_wait",
    "epoll_pwait2": "as epoll_wait, timespec timeout",
    "eventfd2": "new ioeventfd/irqfd for a queue (anonymous fd, no file system)",
    "close": "closing fds at stop and in Machine.close()",
    "dup": "socket.dup / duplicating an fd already held",
    "dup2": "os.dup2: as dup, onto a chosen fd number",
    "dup3": "as dup, with O_CLOEXEC",
    "fcntl": "os.set_blocking / F_GETFL, F_SETFL, F_GETFD on existing fds",
    "lseek": "file objects on already-open fds (console log)",
    "fstat": "file objects on already-open fds",
    "newfstatat": "glibc's fstat (AT_EMPTY_PATH); with a path it only reads metadata, "
                  "and os.stat is what linecache uses before printing a traceback",
    "mmap": "malloc arenas, thread stacks, mmap of fds already held; PROT_EXEC refused "
            "(no new executable memory after setup)",
    "munmap": "free, thread stack release",
    "mprotect": "thread stack guard pages, malloc arena growth; PROT_EXEC refused",
    "madvise": "glibc frees exited threads' stacks with MADV_DONTNEED; MADV_DONTDUMP",
    "mremap": "realloc of large buffers",
    "brk": "malloc's main heap",
    "mlock": "lock key buffers created at run time (munlock stays denied)",
    "mlock2": "as mlock, with MLOCK_ONFAULT (guest RAM locked as it is touched)",
    "clone": "threading.Thread (pthread_create); only with CLONE_THREAD: no fork",
    "clone3": "answered ENOSYS, so glibc falls back to clone whose flags are checked",
    "set_robust_list": "every new thread (glibc start_thread)",
    "rseq": "every new thread registers restartable sequences (glibc 2.35+)",
    "sigaltstack": "faulthandler / signal handling on an alternate stack",
    "exit": "a thread ends",
    "exit_group": "the process ends",
    "rt_sigaction": "the vCPU kick handler, interpreter shutdown resets handlers",
    "rt_sigprocmask": "pthread_create and thread exit block/unblock signals",
    "rt_sigreturn": "return from the kick signal handler",
    "restart_syscall": "a sleep or wait interrupted by the kick signal resumes",
    "tgkill": "signal.pthread_kill kicks a vCPU out of KVM_RUN; only to our own threads",
    "getpid": "pthread_kill/tgkill need our pid; logging records it",
    "gettid": "threading.get_native_id and glibc internals",
    "sched_yield": "lock back-off in glibc and CPython",
    "clock_gettime": "time.monotonic/time.time when the vDSO cannot serve it",
    "clock_getres": "time.get_clock_info",
    "gettimeofday": "time.time fallback without the vDSO",
    "clock_nanosleep": "time.sleep (glibc implements nanosleep with it)",
    "nanosleep": "time.sleep (older paths)",
    "getrandom": "os.urandom: virtio-rng entropy, nonces, key wrapping",
}

# Denied on purpose (kill); listed so tests prove each one stays out of the list.
NOTABLY_DENIED: tuple[str, ...] = (
    "open", "openat", "openat2", "creat", "stat", "access", "faccessat2", "statx",
    "execve", "execveat", "fork", "vfork", "socket", "socketpair", "connect", "bind",
    "listen", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "pidfd_open", "pidfd_getfd", "kill", "tkill", "rt_tgsigqueueinfo", "mount", "umount2",
    "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen",
    "fsmount", "mount_setattr", "bpf", "perf_event_open", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "setuid", "setgid", "setreuid",
    "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid", "setgroups", "capset",
    "prctl", "seccomp", "personality", "setrlimit", "prlimit64", "munlock", "munlockall",
    "mlockall", "memfd_create", "memfd_secret", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "keyctl", "add_key", "request_key",
    "pkey_mprotect", "process_madvise", "chmod", "fchmod", "fchmodat", "chown", "fchown",
    "unlink", "unlinkat", "rename", "renameat", "link", "linkat", "symlink", "symlinkat",
    "mkdir", "mkdirat", "rmdir", "mknod", "truncate", "ftruncate", "chdir", "getcwd",
    "name_to_handle_at", "open_by_handle_at", "iopl", "ioperm", "reboot", "swapon",
    "sethostname", "splice", "vmsplice", "pipe", "pipe2", "setsid", "setpgid",
    "landlock_create_ruleset",
)


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


def core_rules(pid: int | None = None, extra: Iterable[str] = ()) -> list[SyscallRule]:
    """The rules of the core's filter; `pid` is the process it will be installed in."""
    pid = os.getpid() if pid is None else pid
    names = list(CORE_ALLOWED_SYSCALLS)
    for name in extra:
        if name in NOTABLY_DENIED:
            raise ValueError(f"{name} may not be added to the core's allow-list: "
                             "it is denied on purpose (see sandbox/policy.py)")
        if name not in CORE_ALLOWED_SYSCALLS:
            names.append(name)
    rules = []
    for name in names:
        if name == "clone3":
            rules.append(SyscallRule(number(name), ret_errno(errno.ENOSYS)))
        else:
            rules.append(SyscallRule(number(name), SECCOMP_RET_ALLOW, _checks(name, pid)))
    return rules


def core_program(pid: int | None = None, extra: Iterable[str] = ()) -> list[Insn]:
    """The assembled core filter (default action: kill the process)."""
    return assemble(core_rules(pid, extra))
