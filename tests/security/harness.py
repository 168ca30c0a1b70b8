"""The attack harness: real cores, real attacks from an untrusted uid.

A `SealedCore` is a core process started by the real launcher code, running a
real guest on /dev/kvm.  `as_uid` runs an attack function in a forked child
that has dropped to the uid of the host daemon (or any other adversary), so an
attack has exactly the rights that adversary would have, and nothing of the
test's root.  Defences are switched off one at a time, only through the
core's own test switches (SEALVM_TEST_MODE) or the launcher's uid choice, for
the paired controls.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from sealvm.host.corelink import CoreLink
from sealvm.launcher.spawn import spawn_core
from tests.conftest import ROOT, environ, guest_image

ATTACKER_UID = 63990            # plays the host daemon's uid in these tests
CORE_UID_RANGE = (64900, 64999)

libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class SealedCore:
    handle: object
    link: CoreLink
    run_dir: str
    console: bytearray = field(default_factory=bytearray)

    @property
    def pid(self) -> int:
        return self.handle.pid

    def guest_ram(self) -> tuple[int, int]:
        """(address, size) of the guest RAM mapping in the core (read as root, the oracle)."""
        with open(f"/proc/{self.pid}/maps") as f:
            for line in f:
                if "memfd:sealvm-ram" in line:
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    return lo, hi - lo
        raise LookupError("no guest RAM mapping in the core")

    def memfd_fd_number(self) -> int:
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if "memfd:sealvm-ram" in os.readlink(f"/proc/{self.pid}/fd/{name}"):
                    return int(name)
            except OSError:
                continue
        raise LookupError("no memfd in the core")

    def read_canary(self) -> bytes:
        """The guest's secret, read by root from the core's RAM (the test oracle)."""
        addr, _ = self.guest_ram()
        with open(f"/proc/{self.pid}/mem", "rb") as f:
            f.seek(addr + 0x200000)
            return f.read(16)

    def reattach(self) -> None:
        """Connect afresh as the host (a newer HELLO elsewhere drops the old connection)."""
        import socket
        self.link.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.handle.socket_path)
        self.link = CoreLink(self.handle.vm_id, sock, None, on_console=self._on_console)
        self.link.hello()

    def close(self) -> None:
        try:
            self.link.stop()
        except Exception:
            pass
        self.link.close()
        try:
            self.handle.process.wait(5)
        except Exception:
            self.handle.process.kill()
            self.handle.process.wait(5)


def start_core(guest: str = "canary", cmdline: str = "mib=4 secs=60", *,
               same_uid_as_attacker: bool = False, disable: tuple[str, ...] = (),
               ready: str = "canary ready", memory_mib: int = 64) -> SealedCore:
    """Start a core (optionally with one defence off) and boot `guest` until `ready` prints."""
    env = dict(SEALVM_TEST_MODE="1", SEALVM_INSECURE_TEST_DISABLE=",".join(disable)) \
        if disable else {}
    run_dir = tempfile.mkdtemp(prefix="sealvm-sec-")
    os.chmod(run_dir, 0o711)
    with environ(**env):
        h = spawn_core(f"sec-{os.getpid()}-{time.monotonic_ns() % 10**6}", memory_mib=memory_mib,
                       run_dir=run_dir, host_uid=ATTACKER_UID, uid_range=CORE_UID_RANGE,
                       force_uid=ATTACKER_UID if same_uid_as_attacker else None)
    core = SealedCore(h, None, run_dir)
    seen = threading.Event()

    def on_console(data: bytes) -> None:
        core.console += data
        if ready.encode() in core.console:
            seen.set()
    core._on_console = on_console
    core.link = CoreLink(h.vm_id, h.portal, None, on_console=on_console)
    core.link.hello()
    core.link.load_image(guest_image(guest).read_bytes())
    core.link.configure(memory_mib, 1, "pvh", 1, cmdline)
    core.link.start()
    if not seen.wait(20):
        core.close()
        raise TimeoutError(f"guest never printed {ready!r}: {bytes(core.console)!r}")
    return core


def as_uid(uid: int, fn, *args, timeout: float = 30):
    """Run fn(*args) in a child process that has become `uid` (no groups); return its result.

    Exceptions in the child come back as ('error', repr) so a test can assert on them.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                result = ("ok", fn(*args))
            except Exception as e:
                result = ("error", f"{type(e).__name__}: {e}")
            os.write(w, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        data += chunk
        if time.monotonic() > deadline:
            break
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(data) if data else ("error", "attacker process died")


# ---- attacks (run inside as_uid) ---------------------------------------------
PTRACE_ATTACH, PTRACE_DETACH = 16, 17


def attack_ptrace(pid: int):
    libc.ptrace.restype = ctypes.c_long
    rc = libc.ptrace(PTRACE_ATTACH, pid, None, None)
    if rc == 0:
        os.waitpid(pid, 0)
        libc.ptrace(PTRACE_DETACH, pid, None, None)
        return "attached"
    return f"errno {ctypes.get_errno()}"


def attack_proc_mem(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(addr)
        return f.read(size)


class _iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def attack_process_vm_readv(pid: int, addr: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    local = _iovec(ctypes.cast(buf, ctypes.c_void_p), size)
    remote = _iovec(addr, size)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        raise PermissionError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return buf.raw[:n]


def attack_open_memfd(pid: int, fd: int, size: int) -> bytes:
    with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
        f.seek(0x200000)
        return f.read(size)


SYS_pidfd_getfd = 438


def attack_pidfd_getfd(pid: int, fd: int, size: int) -> bytes:
    """Duplicate the core's RAM memfd into this process (pidfd_getfd(2), which needs
    ptrace access to the core) and read guest RAM through the copy."""
    pidfd = os.pidfd_open(pid)
    try:
        libc.syscall.restype = ctypes.c_long
        got = libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0)
        if got < 0:
            raise PermissionError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        try:
            return os.pread(got, size, 0x200000)
        finally:
            os.close(got)
    finally:
        os.close(pidfd)


def attack_signal(pid: int, sig: int) -> str:
    os.kill(pid, sig)
    return "delivered"


def search_readable(roots: list[str], needle: bytes, max_file: int = 64 << 20) -> list[str]:
    """Every readable file under `roots` that contains `needle` (as this uid sees them)."""
    hits = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    if not os.path.isfile(path) or os.path.getsize(path) > max_file:
                        continue
                    with open(path, "rb") as f:
                        if needle in f.read():
                            hits.append(path)
                except OSError:
                    continue
    return hits


def readable_regions(pid: int, max_region: int = 1 << 30):
    """(maps line, bytes) of every region of process `pid` this uid can read."""
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb")
    except OSError:
        return
    with mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) r", line)
            if not m:
                continue
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            if hi - lo > max_region:
                continue
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except (OSError, OverflowError, ValueError):
                continue
            yield line, data


def search_process_memory(pid: int, needle: bytes) -> list[str]:
    """Regions of process `pid` readable by this uid that contain `needle`."""
    return [line for line, data in readable_regions(pid) if needle in data]


def start_broker(owner_dir, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """The owner's key broker as its own process on a free loopback port, once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sealvm.cli", "owner", "broker", "--dir",
                             str(owner_dir), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"
