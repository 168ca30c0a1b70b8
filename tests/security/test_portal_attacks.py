"""A malicious host speaks to a running core over the portal.

Each malformed message class is sent on a real connection to a core whose
guest is running. The core must answer with the precise refusal, log it, and
keep the VM running (checked over the legitimate host's own connection, and
by the guest still printing). The paired controls show that the same bytes,
made well-formed, are accepted, so the refusals come from the checks and not
from a connection that simply does not work.
"""
from __future__ import annotations

import socket
import struct
import time

import pytest

from sealvm.wire import portal as P
from tests.conftest import needs_kvm
from tests.security.harness import start_core

pytestmark = needs_kvm
RUNNING = 2


@pytest.fixture(scope="module")
def core():
    c = start_core("memtouch", "mib=4 secs=0 rate=1000", ready="memtouch t=1")
    yield c
    c.close()


def connect(core) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(core.handle.socket_path)
    s.settimeout(10)
    return s


def next_reply(sock):
    """The next REPLY frame, skipping the events an attached host also receives."""
    reader = P.FrameReader(sock)
    while True:
        frame = reader.read()
        if frame is None:
            return None
        if frame.header.kind == P.Kind.REPLY:
            return P.decode_response(frame.header, frame.payload)


def reply(sock) -> tuple[int, str, bool]:
    """(status, message, connection still open) of the next reply."""
    msg = next_reply(sock)
    if msg is None:
        return -1, "closed", False
    return int(msg.fields["status"]), msg.fields["message"], True


def hello(sock) -> bytes:
    sock.sendall(P.encode_request(P.OP.HELLO, 1, None, host_version=1))
    return next_reply(sock).fields["vm_token"]


def raw(op, payload=b"", *, cap=P.ZERO_CAP, kind=1, magic=P.MAGIC, version=1, flags=0,
        length=None, seq=7) -> bytes:
    n = len(payload) if length is None else length
    return P.pack_header(kind, op, seq, n, cap, magic=magic, version=version, flags=flags) + payload


def u32(n):
    return struct.pack("<I", n)


def s(text: bytes):
    return u32(len(text)) + text


def still_running(core) -> None:
    core.reattach()                   # the legitimate host re-attaches (new token)
    before = core.console.count(b"memtouch t=")
    assert core.link.query()["state"] == RUNNING
    deadline = time.monotonic() + 5
    while core.console.count(b"memtouch t=") <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert core.console.count(b"memtouch t=") > before, "the guest stopped making progress"
    assert b"MISMATCH" not in core.console


# (name, frame builder given a valid token, expected status, connection stays usable)
CONFIGURE_OK = (u32(64) + struct.pack("<HB", 1, 1) + u32(1) + s(b""))
CASES = [
    ("bad magic", lambda t: raw(P.OP.QUERY, cap=t, magic=0x1234), P.STATUS.MALFORMED, False),
    ("wrong version", lambda t: raw(P.OP.QUERY, cap=t, version=9), P.STATUS.BAD_VERSION, True),
    ("unknown kind", lambda t: raw(P.OP.QUERY, cap=t, kind=9), P.STATUS.BAD_KIND, True),
    ("reply kind from host", lambda t: raw(P.OP.QUERY, cap=t, kind=2), P.STATUS.MALFORMED, True),
    ("unknown op", lambda t: raw(0x77, cap=t), P.STATUS.UNKNOWN_OP, True),
    ("flags set", lambda t: raw(P.OP.QUERY, cap=t, flags=1), P.STATUS.MALFORMED, True),
    ("oversize length", lambda t: raw(P.OP.QUERY, cap=t, length=P.MAX_PAYLOAD + 1),
     P.STATUS.TOO_BIG, False),
    ("no capability", lambda t: raw(P.OP.QUERY), P.STATUS.BAD_CAPABILITY, True),
    ("forged capability", lambda t: raw(P.OP.QUERY, cap=bytes(b ^ 1 for b in t)),
     P.STATUS.BAD_CAPABILITY, True),
    ("payload on an op that takes none", lambda t: raw(P.OP.QUERY, b"x", cap=t),
     P.STATUS.TOO_BIG, True),
    ("trailing bytes", lambda t: raw(P.OP.CONSOLE_INPUT, s(b"hi") + b"x", cap=t),
     P.STATUS.MALFORMED, True),
    ("truncated field", lambda t: raw(P.OP.CONFIGURE, u32(64), cap=t), P.STATUS.MALFORMED, True),
    ("memory out of range", lambda t: raw(P.OP.CONFIGURE, u32(1 << 30) + CONFIGURE_OK[4:], cap=t),
     P.STATUS.OUT_OF_RANGE, True),
    ("enum not allowed", lambda t: raw(P.OP.CONFIGURE, CONFIGURE_OK[:6] + b"\x07" + CONFIGURE_OK[7:],
                                       cap=t), P.STATUS.OUT_OF_RANGE, True),
    ("string too long", lambda t: raw(P.OP.CONFIGURE, CONFIGURE_OK[:11] + s(b"a" * 5000), cap=t),
     P.STATUS.TOO_BIG, True),
    ("invalid utf-8", lambda t: raw(P.OP.CONFIGURE, CONFIGURE_OK[:11] + s(b"\xff\xfe"), cap=t),
     P.STATUS.MALFORMED, True),
    ("console input too big", lambda t: raw(P.OP.CONSOLE_INPUT, s(b"x" * 5000), cap=t),
     P.STATUS.TOO_BIG, True),
    ("wrong state: configure a running VM", lambda t: raw(P.OP.CONFIGURE, CONFIGURE_OK, cap=t),
     P.STATUS.WRONG_STATE, True),
    ("wrong state: start twice", lambda t: raw(P.OP.START, cap=t), P.STATUS.WRONG_STATE, True),
    ("wrong state: image into a running VM",
     lambda t: raw(P.OP.LOAD_IMAGE, b"\x01" + struct.pack("<QQ", 0, 4) + s(b"\x7fELF"), cap=t),
     P.STATUS.WRONG_STATE, True),
]


@pytest.mark.attack(adversary='host daemon', asset='portal',
                    technique='malformed portal frames',
                    defence='portal schema validation',
                    outcome='refused with a status; the VM keeps running',
                    control='test_control_well_formed_requests_are_accepted', baseline=True, variants=True)
@pytest.mark.parametrize("name,build,status,usable", CASES, ids=[c[0] for c in CASES])
def test_malformed_message_is_refused_and_vm_keeps_running(core, name, build, status, usable):
    sock = connect(core)
    try:
        token = hello(sock)
        sock.sendall(build(token))
        got, message, _ = reply(sock)
        assert got == status, f"{name}: got {got} ({message})"
        if usable:   # the same connection still answers a good request
            sock.sendall(P.encode_request(P.OP.QUERY, 8, token))
            assert reply(sock)[0] == P.STATUS.OK
        else:        # the stream could not be framed: the core dropped this connection only
            assert next_reply(sock) is None
    finally:
        sock.close()
    still_running(core)


@pytest.mark.attack(adversary='host daemon', asset='portal',
                    technique='reuse a capability revoked by a new HELLO',
                    defence='capability tokens',
                    outcome='BAD_CAPABILITY',
                    control='test_control_well_formed_requests_are_accepted', baseline=True)
def test_old_token_is_revoked_by_a_new_hello(core):
    a, b, c = connect(core), connect(core), connect(core)
    try:
        old = hello(a)
        hello(b)                       # b replaces a: a is hung up on, its token revoked
        assert next_reply(a) is None
        c.sendall(P.encode_request(P.OP.QUERY, 2, old))
        assert reply(c)[0] == P.STATUS.BAD_CAPABILITY
    finally:
        for x in (a, b, c):
            x.close()
    still_running(core)


def test_control_well_formed_requests_are_accepted(core):
    sock = connect(core)
    try:
        token = hello(sock)
        for op in (P.OP.QUERY, P.OP.PAUSE, P.OP.RESUME):
            sock.sendall(P.encode_request(op, 3, token))
            assert reply(sock)[0] == P.STATUS.OK, op
        sock.sendall(raw(P.OP.QUERY, cap=token))    # the raw builder itself makes good frames
        assert reply(sock)[0] == P.STATUS.OK
    finally:
        sock.close()
    still_running(core)


@pytest.mark.attack(adversary='host daemon', asset='portal',
                    technique="connect to a core's portal from another uid",
                    defence='socket file mode',
                    outcome='PermissionError',
                    control='test_control_well_formed_requests_are_accepted', baseline=True)
def test_connection_from_another_uid_is_refused(core):
    from tests.security.harness import as_uid

    def attempt(path):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        return "connected"
    kind, value = as_uid(64777, attempt, core.handle.socket_path)
    assert kind == "error" and "PermissionError" in value


# ---- fds passed with frames (ATTACH) ---------------------------------------------------

def core_fds(core) -> int:
    return len(__import__("os").listdir(f"/proc/{core.handle.pid}/fd"))


def send_with_fds(sock, frame: bytes, n: int) -> None:
    import array
    import os
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
    try:
        sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", fds).tobytes())] if fds else [])
    finally:
        for fd in fds:
            os.close(fd)


def attach_frame(token, kind, index=0):
    return P.encode_request(P.OP.ATTACH, 5, token, kind=kind, index=index)


FD_CASES = [
    ("fd with a request that takes none", lambda t: P.encode_request(P.OP.QUERY, 5, t), 1,
     P.STATUS.MALFORMED),
    ("attach without an fd", lambda t: attach_frame(t, P.AttachKind.SNAPSHOT), 0,
     P.STATUS.MALFORMED),
    ("attach with three fds", lambda t: attach_frame(t, P.AttachKind.SNAPSHOT), 3,
     P.STATUS.MALFORMED),
    ("attach a disk to a running VM", lambda t: attach_frame(t, P.AttachKind.BLOCK), 1,
     P.STATUS.WRONG_STATE),
    ("attach with a forged capability", lambda t: attach_frame(bytes(16), P.AttachKind.SNAPSHOT), 1,
     P.STATUS.BAD_CAPABILITY),
]


@pytest.mark.attack(adversary='host daemon', asset='portal',
                    technique='pass file descriptors where none are expected',
                    defence='ATTACH fd rules',
                    outcome='refused; the fds closed in the core',
                    control='test_control_attach_keeps_exactly_one_fd', baseline=True, variants=True)
@pytest.mark.parametrize("name,build,nfds,status", FD_CASES, ids=[c[0] for c in FD_CASES])
def test_fds_passed_outside_attach_are_refused_and_closed(core, name, build, nfds, status):
    sock = connect(core)
    try:
        token = hello(sock)
        before = core_fds(core)
        send_with_fds(sock, build(token), nfds)
        got, message, usable = reply(sock)
        assert (got, usable) == (status, True), message
        assert core_fds(core) == before, "the core kept an fd it refused"
    finally:
        sock.close()
    still_running(core)


def test_control_attach_keeps_exactly_one_fd(core):
    """The same frames made well-formed are accepted: one fd kept, a second replaces it."""
    sock = connect(core)
    try:
        token = hello(sock)
        before = core_fds(core)
        for _ in range(2):
            send_with_fds(sock, attach_frame(token, P.AttachKind.SNAPSHOT), 1)
            assert reply(sock)[0] == P.STATUS.OK
            assert core_fds(core) == before + 1
    finally:
        sock.close()
    still_running(core)
