"""The core's process sandbox on this kernel: seccomp, dumpable, ptrace, fds, mlock.

Every defence is exercised in a child process (os.fork, or a fresh interpreter
for the VM runs and the test switches), never in pytest itself: the defences
are irreversible.  Attacks come in pairs: with the defence on they fail, and
the same attack against an unhardened control succeeds, so a failing attack
proves the defence rather than a broken test.
"""
from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest

from sealvm.core import sandbox
from sealvm.core.sandbox.bpf import SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
from sealvm.core.sandbox.libc import (PR_GET_DUMPABLE, PR_GET_NO_NEW_PRIVS, PR_SET_DUMPABLE,
                                      SandboxError, prctl, raw_syscall)
from sealvm.core.sandbox.policy import TIOCSTI
from sealvm.core.sandbox.process import CAP_SYS_RESOURCE, has_capability
from tests.unit.syscall_numbers import number
from tests.conftest import ROOT, guest_image, needs_kvm

PR_SET_PTRACER, PR_SET_PTRACER_ANY = 0x59616D61, 0xFFFF_FFFF_FFFF_FFFF
UNPRIVILEGED_UID = 64123
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
WALL = 0x4000_0000
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to switch to an unprivileged uid")
CHILD_CRASHED = 70
SECRET_LEN = 32


# ---- helpers -------------------------------------------------------------
def fork_call(fn, *args) -> int:
    """Run fn(*args) in a forked child; its return value is the exit code. Returns the pid."""
    pid = os.fork()
    if pid == 0:
        code = CHILD_CRASHED
        try:
            code = fn(*args) or 0
        except BaseException:
            try:
                traceback.print_exc()
            except BaseException:
                pass
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} did not finish in {timeout}s")
        time.sleep(0.01)


def in_child(fn, *args) -> int:
    """Run fn in a forked child and return its wait status."""
    return wait(fork_call(fn, *args))


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited {os.WEXITSTATUS(status)}"


def exited_ok(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def killed_by_sigsys(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def no_core_files() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def sandboxed(action) -> int:
    """Child body: harden, install the core filter, then do `action`."""
    no_core_files()
    sandbox.harden_process(mlock_limit_needed=0)
    sandbox.install_core_filter()
    action()
    return 0


def become_unprivileged(*, ordinary: bool = True) -> None:
    """Drop to UNPRIVILEGED_UID, then (ordinary) be dumpable as a normal user process is.

    Changing uid resets the dumpable flag to fs.suid_dumpable; set it back so
    the only difference between the hardened child and its control is
    harden_process.  PR_SET_PTRACER_ANY takes Yama (if present) out of the picture.
    """
    os.setgroups([])
    os.setgid(UNPRIVILEGED_UID)
    os.setuid(UNPRIVILEGED_UID)
    if ordinary:
        prctl(PR_SET_DUMPABLE, 1)
        try:
            prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)
        except SandboxError:
            pass  # no Yama LSM


def python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter at the repo root."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("SEALVM_TEST_MODE", "SEALVM_INSECURE_TEST_DISABLE")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, timeout=timeout)


# ---- (a) the allow-list is enough for what a running core does ------------
def _ordinary_core_work() -> None:
    r, w = os.pipe()
    sock_a, sock_b = socket.socketpair()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"\0sealvm-sandbox-test-{os.getpid()}")
    listener.listen(1)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(listener.getsockname())
    sandbox.harden_process(mlock_limit_needed=0)
    sandbox.install_core_filter()
    conn, _ = listener.accept()                # a host daemon re-attaching to the portal
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    if int.from_bytes(creds[:4], "little") != os.getpid():   # (pid, uid, gid) of the peer
        raise RuntimeError("SO_PEERCRED")
    repr(conn)                                 # getsockname / getpeername
    conn.shutdown(socket.SHUT_RDWR)
    conn.close()
    os.write(w, b"x")
    if os.read(r, 1) != b"x":
        raise RuntimeError("pipe")
    sock_a.sendall(b"msg")                     # host channel: send / recv on a held socket
    if sock_b.recv(3) != b"msg":
        raise RuntimeError("socket")
    poller = select.poll()
    poller.register(r, select.POLLIN)
    poller.poll(1)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(efd, 1)
    os.eventfd_read(efd)
    os.close(efd)
    got = []
    cond = threading.Condition()

    def worker() -> None:
        with cond:
            got.append(threading.get_native_id())
            cond.notify_all()
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    with cond:
        cond.wait_for(lambda: len(got) == 3, 5)
    for t in threads:
        t.join()
    signal.pthread_kill(threading.get_ident(), 0)
    buf = mmap.mmap(-1, 1 << 20)
    buf[:4] = b"ok!!"
    buf.close()
    big = bytearray(64 << 20)                  # malloc -> mmap/munmap
    del big
    time.sleep(0.001)
    os.urandom(32)
    time.monotonic()
    time.time()
    logging_like = "".join(traceback.format_stack())  # source lines from the primed cache
    if "sandboxed" not in logging_like and "_ordinary_core_work" not in logging_like:
        raise RuntimeError("stack formatting")


def test_ordinary_core_work_runs_under_the_filter():
    status = in_child(lambda: (no_core_files(), _ordinary_core_work(), 0)[-1])
    assert exited_ok(status), describe(status)


def test_an_exception_traceback_does_not_trip_the_filter():
    """Printing a traceback reads source files; prepare_runtime makes that file-free."""
    def child() -> int:
        no_core_files()
        sandbox.harden_process(mlock_limit_needed=0)
        sandbox.install_core_filter()
        t = threading.Thread(target=lambda: [][1])   # uncaught -> threading.excepthook
        t.start()
        t.join()
        try:
            {}["missing"]
        except KeyError:
            traceback.print_exc()
        return 0
    status = in_child(child)
    assert exited_ok(status), describe(status)


def test_clone3_says_enosys_so_glibc_falls_back_to_checked_clone():
    def child() -> int:
        no_core_files()
        sandbox.harden_process(mlock_limit_needed=0)
        sandbox.install_core_filter()
        return 0 if raw_syscall(number("clone3"), 0, 0) == (-1, errno.ENOSYS) else 3
    status = in_child(child)
    assert exited_ok(status), describe(status)


# ---- (b) what a compromised core would try is killed ----------------------
def _libc_call(name: str, *args: int):
    return lambda: raw_syscall(number(name), *args)


FORBIDDEN = {
    "open /etc/hostname": lambda: os.open("/etc/hostname", os.O_RDONLY),
    "execv /bin/true": lambda: os.execv("/bin/true", ["true"]),
    "socket()": lambda: socket.socket(),
    "setuid": lambda: os.setuid(0),          # (getuid itself would be killed first)
    "setgid": lambda: os.setgid(0),
    "fork": lambda: os._exit(0) if os.fork() == 0 else None,
    "kill another process": lambda: os.kill(1, 0),
    "tgkill another process": _libc_call("tgkill", 1, 1, 0),
    "ptrace": _libc_call("ptrace", PTRACE_ATTACH, 1, 0, 0),
    "process_vm_readv": _libc_call("process_vm_readv", 1, 0, 0, 0, 0, 0),
    "mount": _libc_call("mount", 0, 0, 0, 0, 0),
    "bpf": _libc_call("bpf", 0, 0, 0),
    "perf_event_open": _libc_call("perf_event_open", 0, 0, -1, -1, 0),
    "kexec_load": _libc_call("kexec_load", 0, 0, 0, 0),
    "init_module": _libc_call("init_module", 0, 0, 0),
    "prctl(PR_SET_DUMPABLE, 1)": lambda: prctl(PR_SET_DUMPABLE, 1),
    "memfd_create": lambda: os.memfd_create("x"),
    "pipe": lambda: os.pipe(),
    "munlock": _libc_call("munlock", 0, 4096),
    "ioctl(TIOCSTI)": _libc_call("ioctl", 0, TIOCSTI, 0),
    "mmap PROT_EXEC": lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC),
    "seccomp (stack another filter)": _libc_call("seccomp", 1, 0, 0),
    "x32 getpid": lambda: raw_syscall(0x4000_0000 | 39),
}


@pytest.mark.parametrize("attempt", list(FORBIDDEN), ids=list(FORBIDDEN))
def test_forbidden_call_kills_the_core_with_sigsys(attempt):
    status = in_child(sandboxed, FORBIDDEN[attempt])
    assert killed_by_sigsys(status), f"{attempt}: {describe(status)}"


@pytest.mark.parametrize("attempt", ["open /etc/hostname", "socket()", "pipe"])
def test_control_the_same_calls_work_without_the_filter(attempt):
    def child() -> int:
        no_core_files()
        FORBIDDEN[attempt]()
        return 0
    status = in_child(child)
    assert exited_ok(status), describe(status)


def test_tsync_filters_threads_that_already_exist():
    def child() -> int:
        no_core_files()
        go = threading.Event()
        opened = []
        t = threading.Thread(target=lambda: (go.wait(10), opened.append(os.open("/etc/hostname",
                                                                                 os.O_RDONLY))))
        t.start()
        sandbox.harden_process(mlock_limit_needed=0)
        sandbox.install_core_filter()
        go.set()
        t.join(10)
        return 5  # reached only if the older thread was not filtered
    status = in_child(child)
    assert killed_by_sigsys(status), describe(status)


# ---- (c)/(d) same-uid siblings cannot read or trace a hardened core -------
def _target(hardened: bool, report_w: int, done_r: int) -> int:
    secret = ctypes.create_string_buffer(SECRET_LEN)
    secret.raw = os.urandom(SECRET_LEN // 2).hex().encode()
    become_unprivileged()
    if hardened:
        sandbox.harden_process(mlock_limit_needed=0)
    # SAFETY (test): the address of our own live buffer, reported to the test only.
    os.write(report_w, ctypes.addressof(secret).to_bytes(8, "little") + secret.raw)
    os.read(done_r, 1)
    return 0


def _read_mem(pid: int, address: int, expected: bytes) -> int:
    become_unprivileged(ordinary=False)
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(address)
            data = f.read(len(expected))
    except PermissionError:
        return 13
    return 0 if data == expected else 2


def _ptrace_attach(pid: int) -> int:
    become_unprivileged(ordinary=False)
    r, err = raw_syscall(number("ptrace"), PTRACE_ATTACH, pid, 0, 0)
    if r == -1:
        return 13 if err == errno.EPERM else 3
    os.waitpid(pid, WALL)
    raw_syscall(number("ptrace"), PTRACE_DETACH, pid, 0, 0)
    return 0


def _attack(hardened: bool, attacker) -> int:
    """Start a target (hardened or not), run `attacker` against it, return its exit code."""
    report_r, report_w = os.pipe()
    done_r, done_w = os.pipe()
    target = fork_call(_target, hardened, report_w, done_r)
    try:
        data = b""
        while len(data) < 8 + SECRET_LEN:
            chunk = os.read(report_r, 64)
            if not chunk:
                pytest.fail("target died before reporting")
            data += chunk
        address, secret = int.from_bytes(data[:8], "little"), data[8:]
        status = in_child(attacker, target, address, secret) if attacker is _read_mem else \
            in_child(attacker, target)
        if not os.WIFEXITED(status):
            pytest.fail(f"attacker {describe(status)}")
        return os.WEXITSTATUS(status)
    finally:
        os.write(done_w, b"x")
        os.kill(target, signal.SIGKILL)
        os.waitpid(target, 0)
        for fd in (report_r, report_w, done_r, done_w):
            os.close(fd)


@needs_root
def test_non_dumpable_core_memory_is_unreadable_by_same_uid_sibling():
    assert _attack(True, _read_mem) == 13


@needs_root
def test_control_dumpable_process_memory_is_readable_by_same_uid_sibling():
    assert _attack(False, _read_mem) == 0


@needs_root
def test_non_dumpable_core_cannot_be_ptrace_attached_by_same_uid_sibling():
    assert _attack(True, _ptrace_attach) == 13


@needs_root
def test_control_dumpable_process_can_be_ptrace_attached_by_same_uid_sibling():
    assert _attack(False, _ptrace_attach) == 0


# ---- (e) close_other_fds --------------------------------------------------
def _open_fds() -> set[int]:
    fds = set()
    for fd in range(1024):
        try:
            os.fstat(fd)
            fds.add(fd)
        except OSError:
            pass
    return fds


def test_close_other_fds_leaves_only_the_kept_fds():
    def child() -> int:
        pipes = [os.pipe() for _ in range(4)]
        null = os.open("/dev/null", os.O_RDONLY)
        high = os.dup2(null, 700)
        keep = {0, 1, 2, pipes[1][0], high}
        sandbox.close_other_fds(keep)
        left = _open_fds()
        return 0 if left == keep else 4
    status = in_child(child)
    assert exited_ok(status), describe(status)


def test_harden_process_does_what_it_says():
    def child() -> int:
        extra = os.open("/dev/null", os.O_RDONLY)
        sandbox.harden_process(mlock_limit_needed=4096, keep_fds={0, 1, 2})
        ok = (prctl(PR_GET_DUMPABLE) == 0 and prctl(PR_GET_NO_NEW_PRIVS) == 1
              and sandbox.disabled_defences() == frozenset() and extra not in _open_fds())
        return 0 if ok else 6
    status = in_child(child)
    assert exited_ok(status), describe(status)


# ---- (f) memory locking ---------------------------------------------------
def _smaps_entry(address: int) -> dict[str, str]:
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{address:x}":
            entry = {}
            for rest in lines[i + 1:]:
                if "-" in rest.split()[0]:
                    break
                key, _, value = rest.partition(":")
                entry[key] = value.strip()
            return entry
    raise AssertionError(f"no mapping at {address:#x}")


def _address(buf) -> int:
    anchor = ctypes.c_char.from_buffer(buf)
    address = ctypes.addressof(anchor)
    del anchor
    return address


def test_lock_memory_and_dont_dump_on_an_mmap():
    buf = mmap.mmap(-1, 64 << 10)
    try:
        buf[:] = b"k" * len(buf)
        sandbox.lock_memory(buf)
        sandbox.dont_dump(buf)
        entry = _smaps_entry(_address(buf))
        assert entry["Locked"] == "64 kB"
        assert "dd" in entry["VmFlags"].split() and "lo" in entry["VmFlags"].split()
    finally:
        buf.close()


def test_lock_memory_by_address_and_dont_dump_round_to_pages():
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 3 * page)
    try:
        base = _address(buf)
        sandbox.lock_memory(base + 10, page)       # spans pages 0 and 1
        sandbox.dont_dump(base + 10, 100)          # inside page 0
        flags = [_smaps_entry(base + i * page)["VmFlags"].split() for i in range(3)]
        assert "lo" in flags[0] and "dd" in flags[0]
        assert "lo" in flags[1] and "dd" not in flags[1]
        assert "lo" not in flags[2]
    finally:
        buf.close()


def test_lock_memory_on_fault_locks_pages_as_they_are_touched():
    buf = mmap.mmap(-1, 16 * mmap.PAGESIZE)
    try:
        sandbox.lock_memory(buf, on_fault=True)
        entry = _smaps_entry(_address(buf))
        assert "lo" in entry["VmFlags"].split() and entry["Locked"] == "0 kB"
        buf[:mmap.PAGESIZE] = b"k" * mmap.PAGESIZE
        assert _smaps_entry(_address(buf))["Locked"] == f"{mmap.PAGESIZE >> 10} kB"
    finally:
        buf.close()


def test_lock_memory_refuses_bad_arguments():
    with pytest.raises(ValueError):
        sandbox.lock_memory(b"read-only bytes")
    with pytest.raises(ValueError):
        sandbox.lock_memory(0x1000)
    buf = mmap.mmap(-1, 4096)
    try:
        with pytest.raises(ValueError):
            sandbox.lock_memory(buf, 8192)
    finally:
        buf.close()


def test_dont_dump_of_unmapped_memory_is_a_sandbox_error():
    with pytest.raises(SandboxError, match="MADV_DONTDUMP"):
        sandbox.dont_dump(0x1000, 4096)


@needs_root
def test_too_low_memlock_limit_gives_a_clear_sandbox_error():
    def child() -> int:
        become_unprivileged(ordinary=False)     # no CAP_IPC_LOCK any more
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))
        buf = mmap.mmap(-1, 1 << 20)
        try:
            sandbox.lock_memory(buf)
            return 8
        except SandboxError as e:
            msg = str(e)
            if not ("RLIMIT_MEMLOCK is 65536 bytes" in msg and "ulimit -l" in msg):
                print(msg)
                return 9
        try:
            sandbox.harden_process(mlock_limit_needed=256 << 20)
            return 10
        except SandboxError as e:
            msg = str(e)
            if not ("must lock 268435456 bytes" in msg and "RLIMIT_MEMLOCK is 65536" in msg
                    and "ulimit -l" in msg):
                print(msg)
                return 11
        return 0
    status = in_child(child)
    assert exited_ok(status), describe(status)


@pytest.mark.skipif(not has_capability(CAP_SYS_RESOURCE),
                    reason="raising a hard rlimit needs CAP_SYS_RESOURCE (this root lacks it)")
def test_a_limit_raised_by_the_launcher_satisfies_harden_process():
    def child() -> int:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (300 << 20, 300 << 20))   # the launcher's step
        sandbox.harden_process(mlock_limit_needed=300 << 20)
        return 0
    status = in_child(child)
    assert exited_ok(status), describe(status)


# ---- (g) the test-only switches -------------------------------------------
DEFENCE_STATE = """
import ctypes, importlib, json, mmap, os
from sealvm.core import sandbox
from sealvm.core.sandbox.libc import (PR_GET_DUMPABLE, PR_GET_NO_NEW_PRIVS, PR_SET_DUMPABLE,
                                      SandboxError, prctl)
if os.geteuid() == 0:   # be an ordinary process: no CAP_IPC_LOCK, dumpable
    os.setgroups([]); os.setgid(UNPRIVILEGED_UID); os.setuid(UNPRIVILEGED_UID)
    prctl(PR_SET_DUMPABLE, 1)
status_fd = os.open("/proc/self/status", os.O_RDONLY)
extra = os.open("/dev/null", os.O_RDONLY)
buf = mmap.mmap(-1, 1 << 16)
buf[:1] = b"x"
anchor = ctypes.c_char.from_buffer(buf); address = ctypes.addressof(anchor); del anchor
from sealvm.core import diskseal
from sealvm.core.sandbox.switches import disabled
disk_fd = os.memfd_create("disk"); disk_io = diskseal.FileIO(disk_fd)
diskseal.format_disk(disk_io, bytes(32), 1)
disk = diskseal.SealedDisk(disk_io, bytes(32), verify=not disabled("disk_integrity"))
disk.write_block(0, bytes(4096))
at = disk.layout.slot(0, disk.entry(0)[3]) + 100      # flip a bit: a set byte may not change
os.pwrite(disk_fd, bytes([os.pread(disk_fd, 1, at)[0] ^ 1]), at)
try:
    disk.read_block(0)
    disk_integrity = False
except diskseal.DiskTamper:
    disk_integrity = True
try:
    sandbox.harden_process(mlock_limit_needed=1 << 60)
    memlock_check = False
except SandboxError:
    memlock_check = True
sandbox.close_other_fds({0, 1, 2, status_fd})
sandbox.lock_memory(buf)
sandbox.dont_dump(buf)
with open("/proc/self/smaps") as f:
    lines = f.read().splitlines()
i = next(n for n, l in enumerate(lines) if l.split("-", 1)[0] == f"{address:x}")
vma = {l.split(":")[0]: l.split(":", 1)[1].strip() for l in lines[i + 1:i + 30] if ":" in l}
state = {
    "dumpable": prctl(PR_GET_DUMPABLE) == 0,
    "no_new_privs": prctl(PR_GET_NO_NEW_PRIVS) == 1,
    "memlock_check": memlock_check,
    "close_fds": not os.path.exists(f"/proc/self/fd/{extra}"),
    "mlock": vma["Locked"] != "0 kB",
    "dont_dump": "dd" in vma["VmFlags"].split(),
    "disk_integrity": disk_integrity,
    # Machine.open_disk reads these two; their wiring is proved against real cores by the
    # paired controls in tests/security (test_snapshots.py, test_disk_attacks.py).
    "disk_fencing": not disabled("disk_fencing"),
    "disk_witness": not disabled("disk_witness"),
    # read once when the descriptor walker is imported (its control: test_hostile_guest.py)
    "virtio_chain_bound": importlib.import_module("sealvm.core.devices.virtio.chain")._BOUNDED,
}
try:
    sandbox.install_core_filter()
except SandboxError as e:   # unprivileged without no_new_privs: the kernel refuses
    state["seccomp_error"] = str(e)
os.lseek(status_fd, 0, 0)
status = os.read(status_fd, 16384).decode()
state["seccomp"] = "Seccomp:\\t2" in status
print(json.dumps(state), flush=True)
""".replace("UNPRIVILEGED_UID", str(UNPRIVILEGED_UID))


def defence_state(env: dict) -> tuple[dict, str]:
    r = python(DEFENCE_STATE, env)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout.decode().strip().splitlines()[-1]), r.stderr.decode()


def test_all_defences_on_by_default():
    state, err = defence_state({})
    assert state == {d: True for d in sandbox.DEFENCES}
    assert "INSECURE" not in err


@needs_root
@pytest.mark.parametrize("defence", sandbox.DEFENCES)
def test_switch_disables_exactly_the_named_defence(defence):
    state, err = defence_state({"SEALVM_TEST_MODE": "1", "SEALVM_INSECURE_TEST_DISABLE": defence})
    expected = {d: d != defence for d in sandbox.DEFENCES}
    if defence == "no_new_privs":
        # Kernel rule: without CAP_SYS_ADMIN, seccomp needs no_new_privs (see switches.py).
        expected["seccomp"] = False
        assert "set no_new_privs first" in state.pop("seccomp_error")
    assert state == expected
    assert "INSECURE TEST MODE" in err and defence in err


def test_switch_is_ignored_outside_test_mode():
    state, err = defence_state({"SEALVM_INSECURE_TEST_DISABLE": "dumpable,seccomp"})
    assert state == {d: True for d in sandbox.DEFENCES}
    assert "IGNORING" in err


def test_switch_with_an_unknown_name_refuses_to_harden():
    r = python("from sealvm.core import sandbox\nsandbox.harden_process(mlock_limit_needed=0)",
               {"SEALVM_TEST_MODE": "1", "SEALVM_INSECURE_TEST_DISABLE": "dumpabel"})
    assert r.returncode != 0 and b"unknown defences" in r.stderr


def test_disabled_seccomp_lets_the_attack_succeed():
    """The paired control for test_forbidden_call_kills_the_core_with_sigsys."""
    code = """
    import os
    from sealvm.core import sandbox
    sandbox.harden_process(mlock_limit_needed=0)
    installed = sandbox.install_core_filter()
    os.close(os.open("/etc/hostname", os.O_RDONLY))
    print("opened", installed)
    """
    r = python(code, {"SEALVM_TEST_MODE": "1", "SEALVM_INSECURE_TEST_DISABLE": "seccomp"})
    assert r.returncode == 0 and r.stdout.strip() == b"opened False", r.stderr.decode()
    r = python(code)
    assert r.returncode == -signal.SIGSYS, r.stderr.decode()


# ---- capabilities ---------------------------------------------------------
def seccomp_mode() -> int:
    """This thread's seccomp mode from /proc/self/status (0 none, 1 strict, 2 filter)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Seccomp:")).split()[1])


def test_probe_capabilities_on_this_machine():
    caps = sandbox.probe_capabilities()
    assert all(isinstance(v, bool) for v in caps.values())
    assert caps["seccomp_filter"] and caps["seccomp_kill_process"]
    assert caps["no_new_privs"] and caps["non_dumpable"]
    assert caps["setuid"] == IS_ROOT
    assert caps["mlock"]                    # 1 MiB of keys fits the default 8 MiB hard limit
    assert prctl(PR_GET_DUMPABLE) == 1      # probing changed nothing here
    assert seccomp_mode() == 0
    assert (sandbox.capability_problems(caps) == []) == IS_ROOT
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    if hard != resource.RLIM_INFINITY and not has_capability(CAP_SYS_RESOURCE):
        assert not sandbox.probe_capabilities(mlock_bytes=hard + 1)["mlock"]


def test_kill_process_is_probed_without_killing_anything():
    from sealvm.core.sandbox.probe import _action_available
    assert _action_available(SECCOMP_RET_KILL_PROCESS)
    assert _action_available(SECCOMP_RET_ALLOW)
    assert not _action_available(0x1234_5678)          # no such action


def test_capability_problems_name_what_is_missing():
    caps = {"seccomp_filter": False, "no_new_privs": True, "setuid": False, "mlock": False}
    problems = sandbox.capability_problems(caps)
    assert len(problems) == 3
    text = "\n".join(problems)
    assert "seccomp" in text and "own uid" in text and "RLIMIT_MEMLOCK" in text


# ---- a real VM under the filter ---------------------------------------------
VM_UNDER_FILTER = """
import os, resource, sys, time
from sealvm.core.sandbox.libc import PR_GET_DUMPABLE, prctl
from sealvm.core.machine import Machine, MachineConfig
from sealvm.core import sandbox
image, vcpus, cmdline, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
m = Machine(MachineConfig(image=open(image, "rb").read(), vcpus=vcpus, cmdline=cmdline, memory=64 << 20),
            lambda b: os.write(1, b))
m.build()
decoy = os.open("/dev/null", os.O_RDONLY)
keep = {int(fd) for fd in os.listdir("/proc/self/fd")} - {decoy}
try:   # the root launcher's step
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (m.memory.size, m.memory.size))
except (ValueError, OSError):
    pass  # no CAP_SYS_RESOURCE: harden_process decides (CAP_IPC_LOCK lifts the limit)
sandbox.harden_process(mlock_limit_needed=m.memory.size, keep_fds=keep)
dumpable = prctl(PR_GET_DUMPABLE) != 0    # read back now: prctl is denied under the filter
sandbox.lock_memory(m.memory.host_address(), m.memory.size)
sandbox.dont_dump(m.memory.host_address(), m.memory.size)
sandbox.install_core_filter()
m.start()
if pause:
    time.sleep(0.2)
    m.pause()
    m.resume()
while not m.wait(0.5):
    pass
status, reason = m.exit_status, m.stop_reason
m.close()
sys.stderr.write(f"sandboxed-core: status={status} reason={reason} dumpable={dumpable}\\n")
sys.exit(126 if status is None else status & 0xFF)
"""


@needs_kvm
@pytest.mark.parametrize("guest,vcpus,cmdline,pause,expect", [
    ("rng", 1, "", False, "rng histogram"),
    ("compute", 2, "", True, "compute vcpus=2 results=equal"),
    ("idle", 1, "secs=1", False, "idle done"),
    ("memtouch", 1, "mib=16 secs=1", False, "mismatches=0"),
])
def test_real_vm_runs_to_completion_under_the_core_filter(guest, vcpus, cmdline, pause, expect):
    if not IS_ROOT:
        pytest.skip("locking 64 MiB of guest RAM needs root or a raised RLIMIT_MEMLOCK")
    r = subprocess.run([sys.executable, "-c", VM_UNDER_FILTER, str(guest_image(guest)), str(vcpus),
                        cmdline, "1" if pause else "0"], cwd=ROOT, capture_output=True,
                       timeout=120)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, f"rc={r.returncode}\n{out[-2000:]}\n{err[-2000:]}"
    assert expect in out
    assert "status=0 reason=guest exited with status 0 dumpable=False" in err
