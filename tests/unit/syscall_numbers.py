"""x86-64 system call numbers for the sandbox tests, and the calls the core denies on purpose.

Numbers come from the kernel's arch/x86/entry/syscalls/syscall_64.tbl (as in
<asm/unistd_64.h>); test_seccomp_bpf checks them against the installed header.
"""
from __future__ import annotations

X86_64: dict[str, int] = {
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6,
    "poll": 7, "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12,
    "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16,
    "pread64": 17, "pwrite64": 18, "readv": 19, "writev": 20, "access": 21, "pipe": 22,
    "select": 23, "sched_yield": 24, "mremap": 25, "madvise": 28, "dup": 32, "dup2": 33,
    "nanosleep": 35, "getpid": 39, "socket": 41, "connect": 42, "accept": 43,
    "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "shutdown": 48,
    "bind": 49, "listen": 50, "getsockname": 51, "getpeername": 52, "socketpair": 53, "setsockopt": 54, "getsockopt": 55,
    "clone": 56, "fork": 57, "vfork": 58,
    "execve": 59, "exit": 60, "kill": 62, "fcntl": 72, "fsync": 74, "fdatasync": 75, "truncate": 76, "ftruncate": 77,
    "getcwd": 79, "chdir": 80, "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85,
    "link": 86, "unlink": 87, "symlink": 88, "chmod": 90, "fchmod": 91, "chown": 92,
    "fchown": 93, "gettimeofday": 96, "getrlimit": 97, "ptrace": 101, "getuid": 102,
    "setuid": 105, "setgid": 106, "setpgid": 109, "getppid": 110, "setsid": 112, "setreuid": 113,
    "setregid": 114, "setgroups": 116, "setresuid": 117, "setresgid": 119,
    "setfsuid": 122, "setfsgid": 123, "capset": 126, "sigaltstack": 131, "mknod": 133,
    "personality": 135, "mlock": 149, "munlock": 150, "mlockall": 151, "munlockall": 152,
    "pivot_root": 155, "prctl": 157, "setrlimit": 160, "chroot": 161, "mount": 165,
    "umount2": 166, "swapon": 167, "reboot": 169, "sethostname": 170, "iopl": 172,
    "ioperm": 173, "init_module": 175, "delete_module": 176, "gettid": 186,
    "tkill": 200, "futex": 202, "restart_syscall": 219, "clock_gettime": 228,
    "clock_getres": 229, "clock_nanosleep": 230, "exit_group": 231, "epoll_wait": 232,
    "epoll_ctl": 233, "tgkill": 234, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "openat": 257, "mkdirat": 258, "newfstatat": 262,
    "unlinkat": 263, "renameat": 264, "linkat": 265, "symlinkat": 266, "fchmodat": 268,
    "pselect6": 270, "ppoll": 271, "unshare": 272, "set_robust_list": 273,
    "splice": 275, "accept4": 288, "vmsplice": 278, "epoll_pwait": 281, "eventfd2": 290,
    "epoll_create1": 291, "dup3": 292, "pipe2": 293, "rt_tgsigqueueinfo": 297,
    "perf_event_open": 298, "prlimit64": 302, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "seccomp": 317,
    "getrandom": 318, "memfd_create": 319, "kexec_file_load": 320, "bpf": 321,
    "execveat": 322, "userfaultfd": 323, "mlock2": 325, "pkey_mprotect": 329, "statx": 332, "rseq": 334,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsmount": 432, "pidfd_open": 434,
    "clone3": 435, "close_range": 436, "openat2": 437, "pidfd_getfd": 438,
    "faccessat2": 439, "process_madvise": 440, "epoll_pwait2": 441,
    "mount_setattr": 442, "landlock_create_ruleset": 444, "memfd_secret": 447,
}


def number(name: str) -> int:
    """The x86-64 number of syscall `name`; KeyError names the unknown call."""
    try:
        return X86_64[name]
    except KeyError:
        raise KeyError(f"unknown x86-64 syscall {name!r} (add it to tests/unit/syscall_numbers.py)") from None


# Denied on purpose (kill): the tests prove each one stays out of the core's allow-list.
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
