"""The host daemon attacks its root launcher.

A compromised daemon holds the one socket to the root launcher that `sealvm hostd` gave
it, and may send anything on it.  The test plays that daemon for real: it takes a copy of
the running daemon's launcher socket (pidfd_getfd(2), as root) and sends its own
requests.  The launcher must refuse, with a reason, every request outside the strict
96-byte layout or its limits, keep serving afterwards, and never start a core that shares
the daemon's uid (which would give the daemon the core's memory) unless the machine's
owner started it with --insecure-dev.  The paired control is that launcher started with
--insecure-dev: the same request then yields a core running as the daemon's own uid.
"""
from __future__ import annotations

import ctypes
import os
import socket
import tempfile
from pathlib import Path

import pytest

from tests.conftest import needs_kvm
from tests.e2e.conftest import HOST_UID, Hostd
from tests.security.harness import SYS_pidfd_getfd, libc
from sealvm.launcher import protocol as L

pytestmark = needs_kvm


def steal_launcher_socket(h: Hostd) -> socket.socket:
    """The daemon's launcher socket, duplicated into this process."""
    pid = h.daemon_pid()
    assert pid, "no daemon process"
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    fd = int(next(a for a in args if a.startswith(b"--launcher-fd=")).split(b"=")[1])
    pidfd = os.pidfd_open(pid)
    try:
        libc.syscall.restype = ctypes.c_long
        got = libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0)
        assert got >= 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(pidfd)
    s = socket.socket(fileno=got)
    s.settimeout(30)
    return s


def ask(s: socket.socket, request: bytes):
    """(status, pid, uid, message) and the fd passed back, if any."""
    s.send(request)
    data, fd = L.recv_with_fd(s, L.REPLY_SIZE)
    return L.decode_reply(data), fd


def hostd(name: str, uid_range: str, *extra: str):
    base = Path(tempfile.mkdtemp(prefix=f"sealvm-{name}-", dir="/tmp"))
    os.chmod(base, 0o755)
    return Hostd(base, uid_range, extra)


@pytest.fixture(scope="module")
def daemon():
    h = hostd("launch", "64660-64669")
    s = steal_launcher_socket(h)
    yield h, s
    s.close()
    h.close()


def core_uid(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


def test_control_a_well_formed_spawn_gets_a_core_of_its_own_uid(daemon):
    h, s = daemon
    (status, pid, uid, msg), fd = ask(s, L.encode_request(L.OP_SPAWN, "lx-ok", 64))
    assert status == L.STATUS_OK and fd is not None, msg
    os.close(fd)
    assert uid != HOST_UID and core_uid(pid) == uid and 64660 <= uid <= 64669
    os.kill(pid, 9)


@pytest.mark.attack(adversary="host daemon", asset="launcher",
                    technique="ask the root launcher for a core that shares the daemon's uid",
                    defence="launcher refuses same-uid cores without --insecure-dev",
                    outcome="REFUSED 'same-uid cores need --insecure-dev'; no core started",
                    control="test_control_an_insecure_dev_launcher_gives_the_daemon_a_same_uid_core")
def test_daemon_cannot_get_a_core_sharing_its_uid(daemon):
    h, s = daemon
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    (status, pid, uid, msg), fd = ask(s, L.encode_request(
        L.OP_SPAWN, "lx-same", 64, L.FLAG_INSECURE_SAME_UID))
    assert status == L.STATUS_REFUSED and fd is None and pid == 0
    assert "same-uid cores need --insecure-dev" in msg
    started = {p for p in os.listdir("/proc") if p.isdigit()} - before
    assert not [p for p in started if _is_core(p, "lx-same")]


def _is_core(pid: str, vm: str) -> bool:
    try:
        return f"--vm-id={vm}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_control_an_insecure_dev_launcher_gives_the_daemon_a_same_uid_core():
    h = hostd("launch-insecure", "64670-64679", "--insecure-dev")
    s = steal_launcher_socket(h)
    try:
        (status, pid, uid, msg), fd = ask(s, L.encode_request(
            L.OP_SPAWN, "lx-same", 64, L.FLAG_INSECURE_SAME_UID))
        assert status == L.STATUS_OK, msg
        os.close(fd)
        assert uid == HOST_UID and core_uid(pid) == HOST_UID   # the daemon's own uid
        os.kill(pid, 9)
    finally:
        s.close()
        h.close()


def _raw(op=L.OP_SPAWN, flags=0, r1=0, mem=64, r2=0, vm=b"lx-bad", r3=b""):
    return L.REQUEST.pack(L.MAGIC, op, flags, r1, mem, r2, vm, r3)


BAD = [
    ("short", _raw()[:40], "request is 40 bytes"),
    ("long", _raw() + b"x", "request is 97 bytes"),
    ("bad magic", b"XXXX" + _raw()[4:], "bad magic"),
    ("reserved set", _raw(r2=7), "reserved fields must be zero"),
    ("unknown op", _raw(op=9), "unknown op 9"),
    ("unknown flag", _raw(flags=0x80), "unknown flags"),
    ("path in the vm id", _raw(vm=b"../../etc/x"), "bad VM id"),
    ("bytes after the NUL", _raw(vm=b"ok\0evil"), "after its terminating NUL"),
    ("not ascii", _raw(vm=b"\xff\xfe"), "not ASCII"),
    ("memory too big", _raw(mem=1 << 30), "outside 2..65536"),
    ("memory too small", _raw(mem=1), "outside 2..65536"),
]


@pytest.mark.attack(adversary="host daemon", asset="launcher",
                    technique="malformed or out-of-limit SPAWN requests to the root launcher",
                    defence="strict fixed-layout request parser",
                    outcome="REFUSED with the reason; the launcher keeps serving",
                    control="test_control_a_well_formed_spawn_gets_a_core_of_its_own_uid",
                    baseline=True, variants=True)
@pytest.mark.parametrize("name,request_,says", BAD, ids=[b[0] for b in BAD])
def test_launcher_refuses_malformed_requests_and_keeps_serving(daemon, name, request_, says):
    h, s = daemon
    (status, pid, uid, msg), fd = ask(s, request_)
    assert status == L.STATUS_REFUSED and fd is None and pid == 0, (status, msg)
    assert says in msg, msg
    (status, pid, _, msg), _ = ask(s, L.encode_request(L.OP_PING))
    assert status == L.STATUS_OK and msg == "pong"
    assert h.api().get("/v1/health").status_code == 200
