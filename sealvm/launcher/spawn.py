"""Start one core process per VM under a uid of its own (the jailer pattern).

This is the only code in sealvm that keeps root.  For each VM it:
picks a uid from the configured range that no running process uses, makes a
socketpair (one end for the core, one for the caller) and a listening socket
the daemon can re-attach through after a restart, opens /dev/kvm, and starts
`python -I -B -m sealvm.core.main` with exactly those fds, no supplementary
groups, and the memory-lock limit the guest needs.  It does nothing else: it
never reads a portal message and never sees guest memory.
"""
from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

DEFAULT_UID_RANGE = (64000, 64999)
VM_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")   # whole string: fullmatch
LOCK_SLACK = 64 << 20          # keys, stacks and queues the core locks beside guest RAM
MAX_MEMORY_MIB = 65536


class LaunchError(Exception):
    """The core could not be started (the message says why)."""


@dataclass
class CoreHandle:
    vm_id: str
    pid: int
    uid: int
    socket_path: str
    portal: socket.socket      # the caller's end of the socketpair
    process: subprocess.Popen
    preboot: subprocess.Popen | None = None   # the short-lived attestation stage


def uids_in_use(lo: int, hi: int) -> set[int]:
    """Real uids in [lo, hi] of every running process (so a uid is never shared)."""
    used = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        uid = int(line.split()[1])
                        if lo <= uid <= hi:
                            used.add(uid)
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    return used


def pick_uid(uid_range: tuple[int, int], reserved: set[int] = frozenset()) -> int:
    lo, hi = uid_range
    if not 0 < lo <= hi < 2**31:
        raise LaunchError(f"bad uid range {lo}-{hi}")
    used = uids_in_use(lo, hi) | set(reserved)
    for uid in range(lo, hi + 1):
        if uid not in used:
            return uid
    raise LaunchError(f"no free uid left in {lo}-{hi}: too many VMs running")


def check_vm_id(vm_id: str) -> str:
    if not isinstance(vm_id, str) or not VM_ID_RE.fullmatch(vm_id):
        raise LaunchError(f"bad VM id {vm_id!r}: use 1-63 of a-z, 0-9 and '-'")
    return vm_id


CORE_ENTRY = Path(__file__).resolve().parents[1] / "core" / "entry.py"
PREBOOT_ENTRY = Path(__file__).resolve().parents[1] / "preboot" / "entry.py"


def core_command(python: str = sys.executable) -> list[str]:
    # -I: no PYTHON* variables, no user site; -S: no site module, so no .pth file
    # runs; -B: write no bytecode (the checked-hash .pyc files built at install
    # are verified against their source on every import).
    return [python, "-I", "-S", "-B", str(CORE_ENTRY)]


def preboot_command(python: str = sys.executable) -> list[str]:
    return [python, "-I", "-B", str(PREBOOT_ENTRY)]


def spawn_core(vm_id: str, *, memory_mib: int, run_dir: str | os.PathLike, host_uid: int,
               uid_range: tuple[int, int] = DEFAULT_UID_RANGE, insecure_same_uid: bool = False,
               reserved_uids: set[int] = frozenset(), log_fd: int | None = None,
               force_uid: int | None = None, attest: bool = False) -> CoreHandle:
    """Start the core for `vm_id`; the caller gets the portal socket and the pid.

    `force_uid` skips the one-uid-per-VM rule; only the security tests' paired
    controls use it, to show what an attacker sharing the core's uid could do.
    """
    check_vm_id(vm_id)
    if not 2 <= memory_mib <= MAX_MEMORY_MIB:
        raise LaunchError(f"memory {memory_mib} MiB is outside 2..{MAX_MEMORY_MIB}")
    root = os.geteuid() == 0
    if not root and not insecure_same_uid:
        raise LaunchError("the launcher needs root to give each VM its own uid "
                          "(use --insecure-dev to run every core under your own uid)")
    # as root, a same-uid core shares the daemon's uid (never root's); otherwise our own
    uid = (host_uid if insecure_same_uid else pick_uid(uid_range, reserved_uids)) if root \
        else os.getuid()
    if force_uid is not None:
        uid = force_uid
    vm_dir = Path(run_dir) / "vms"
    vm_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    sock_path = str(vm_dir / f"{vm_id}.sock")
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    kvm_fd = -1
    boot_r = boot_w = -1
    core_pb = pb_core = witness = None
    preboot = None
    tpm_lock = -1
    try:
        listener.bind(sock_path)
        if root:
            os.chown(sock_path, host_uid, -1)   # only the daemon (and root) may connect
        os.chmod(sock_path, 0o600)
        listener.listen(4)
        try:
            kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise LaunchError(f"cannot open /dev/kvm: {e.strerror}") from None
        from .witness import start as start_witness
        witness = start_witness(run_dir)
        fds = {"kvm": kvm_fd, "portal": theirs.fileno(), "listen": listener.fileno(),
               "attest": -1, "preboot": -1, "witness": witness.fileno()}
        if attest:
            # Measure before the core exists; the bundle reaches only the core, by a pipe.
            # With a TPM, the lock on PCR 23 passes to the preboot stage (tpm_boot.py).
            from .attest_boot import BootKeyError, boot_bundle, launcher_dir
            from .tpm_boot import TpmBootError, configured, take_lock
            try:
                tpm = configured()
                if tpm is not None:
                    tpm_lock = take_lock(launcher_dir())
                bundle = boot_bundle(sys.executable, tpm=tpm)
            except (BootKeyError, TpmBootError, OSError) as e:
                raise LaunchError(f"cannot prepare attestation: {e}") from None
            boot_r, boot_w = os.pipe()
            core_pb, pb_core = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds.update(attest=boot_r, preboot=core_pb.fileno())
        argv = core_command() + [f"--vm-id={vm_id}", f"--host-uid={host_uid}",
                                 f"--memory-mib={memory_mib}"] + \
            [f"--{k}-fd={v}" for k, v in fds.items()]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        for k in ("SEALVM_TEST_MODE", "SEALVM_INSECURE_TEST_DISABLE", "SEALVM_PREBOOT_TEST_EXTEND",
                  "SEALVM_TEST_NET_KEY", "SEALVM_TEST_NET_REKEY", "SEALVM_TEST_DISK_KEY"):
            if k in os.environ:
                env[k] = os.environ[k]
        kw = {}
        if root and uid != 0:
            kw = dict(user=uid, group=uid, extra_groups=[])
        out = dict(stdin=subprocess.DEVNULL, stdout=log_fd or subprocess.DEVNULL,
                   stderr=log_fd or subprocess.DEVNULL, start_new_session=True, cwd="/", **kw)
        proc = subprocess.Popen(argv, pass_fds=tuple(v for v in fds.values() if v >= 0),
                                env=env, **out)
        if attest:
            # The two-step stage: the network and TPM code the core must not carry.
            lock = [f"--tpm-lock-fd={tpm_lock}"] if tpm_lock >= 0 else []
            preboot = subprocess.Popen(preboot_command() + [f"--core-fd={pb_core.fileno()}"] + lock,
                                       pass_fds=(pb_core.fileno(),) + ((tpm_lock,) if lock else ()),
                                       env=env, **out)
            threading.Thread(target=_write_all, args=(boot_w, bundle), daemon=True).start()
            boot_w = -1
        if root:
            need = memory_mib * (1 << 20) + LOCK_SLACK
            # The core locks guest RAM only after CONFIGURE, which comes later over the portal.
            try:
                resource.prlimit(proc.pid, resource.RLIMIT_MEMLOCK, (need, need))
            except PermissionError:
                pass   # no CAP_SYS_RESOURCE here: the core checks what it can lock and says so
    except BaseException:
        ours.close()
        listener.close()
        raise
    finally:
        theirs.close()
        for fd in (kvm_fd, boot_r, boot_w, tpm_lock):
            if fd >= 0:
                os.close(fd)
        for end in (core_pb, pb_core, witness):     # the children hold their own copies
            if end is not None:
                end.close()
    listener.close()
    return CoreHandle(vm_id, proc.pid, uid, sock_path, ours, proc, preboot)


def _write_all(fd: int, data: bytes) -> None:
    try:
        os.write(fd, len(data).to_bytes(4, "little"))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass
    finally:
        os.close(fd)
