"""The core process: one per VM, started by the launcher, the only holder of the VM.

    python -I -B -m sealvm.core.main --vm-id=ID --host-uid=U --memory-mib=M \
        --kvm-fd=N --portal-fd=N --listen-fd=N --witness-fd=N

It hardens itself first (not dumpable, no new privileges, no other fds), then
serves the portal: the socketpair it was started with, and after that any
connection on the listening socket from the host daemon's uid (a restarted
daemon re-attaches this way).  One host at a time; a new HELLO revokes the
previous host's capability.  Seccomp goes on just before the guest starts,
when every file the core will ever open is open.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import struct
import sys
import threading
from types import SimpleNamespace

from ..wire import portal as P
from . import sandbox
from .attestation import Attestation, AttestationFailed, read_bundle
from .service import Refused, VmService
from .vcpu import install_kick_handler

log = logging.getLogger("sealvm.core")
HOST_VERSION_MIN = 1


class Portal:
    """The current host connection; events go there, or nowhere when detached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sock: socket.socket | None = None

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            old, self.sock = self.sock, sock
        if old is not None and old is not sock:
            _close(old)

    def detach(self, sock: socket.socket) -> None:
        with self._lock:
            if self.sock is sock:
                self.sock = None

    def send(self, frame: bytes, sock: socket.socket | None = None) -> bool:
        with self._lock:
            target = sock or self.sock
            if target is None:
                return False
            try:
                target.sendall(frame)
                return True
            except OSError:
                return False

    def emit(self, name: str, fields: dict) -> bool:
        return self.send(P.encode_event(P.EVENTS[name], **fields))


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class FdChannel:
    """A portal connection read with recvmsg, so fds the host passes (SCM_RIGHTS) are kept.

    A Unix stream socket delivers passed fds with the first byte of the message that
    carried them, and a read never runs past the frame the reader asked for, so the fds
    taken after a frame was read arrived with that frame.  At most MAX_FDS are accepted
    per read; the kernel closes any beyond what fits (MSG_CTRUNC).
    """
    MAX_FDS = 2

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fds: list[int] = []

    def recv_into(self, view, nbytes: int = 0, /) -> int:
        n, anc, flags, _ = self.sock.recvmsg_into([view], socket.CMSG_SPACE(4 * self.MAX_FDS),
                                                  socket.MSG_CMSG_CLOEXEC)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self.fds += struct.unpack(f"{len(data) // 4}i", data[:len(data) // 4 * 4])
        if flags & socket.MSG_CTRUNC:
            self.fds.append(-1)          # more fds than allowed: the frame is refused
        return n

    def take(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Dispatcher:
    def __init__(self, service: VmService, portal: Portal):
        self.service = service
        self.portal = portal
        s = service
        self.handlers = {
            P.OP.LOAD_IMAGE: lambda f: s.load_image(f["kind"], f["offset"], f["total"], f["data"]),
            P.OP.CONFIGURE: lambda f: s.configure(f["memory_mib"], f["vcpus"], f["entry"],
                                                  f["flags"], f["cmdline"]),
            P.OP.START: lambda f: s.start(),
            P.OP.PAUSE: lambda f: s.pause(),
            P.OP.RESUME: lambda f: s.resume(),
            P.OP.STOP: lambda f: s.stop(),
            P.OP.QUERY: lambda f: s.query(),
            P.OP.CONSOLE_INPUT: lambda f: s.console_input(f["data"]),
            P.OP.ATTACH: lambda f: None,          # done in handle(): it needs the fd
            P.OP.SNAPSHOT: lambda f: s.snapshot(f["receipt"]),
            P.OP.RESTORE: lambda f: s.restore(f["receipt"]),
            P.OP.MIGRATE_OUT: lambda f: s.migrate_out(f["receipt"], f["downtime_ms"]),
            P.OP.MIGRATE_IN: lambda f: s.migrate_in(f["receipt"]),
        }

    def serve(self, sock: socket.socket) -> None:
        """Serve one host connection until it closes or the stream can no longer be framed."""
        channel = FdChannel(sock)
        reader = P.FrameReader(channel)
        while True:
            try:
                frame = reader.read()
            except P.PortalError as e:
                self._refuse(sock, e.op, e.seq, e.status, str(e))
                if e.fatal:         # cannot resync: drop this connection, keep the VM
                    break
                continue
            if frame is None:
                break
            self.handle(sock, frame.header, frame.payload, channel.take())
        close_fds(channel.take())
        self.portal.detach(sock)
        _close(sock)

    def handle(self, sock, header, payload, fds=()) -> None:
        op, seq = header.op, header.seq
        fds = list(fds)
        try:
            # The capability is checked before any field of the payload is decoded.
            P.check_capability(header, {P.CAP_VM: self.service.token})
            msg = P.decode_payload(header, payload)
            if (op == P.OP.ATTACH) != (len(fds) == 1) or -1 in fds:
                raise P.PortalError(P.STATUS.MALFORMED, f"{len(fds)} fds with "
                                    f"{P.op_name(op)}: ATTACH carries exactly one, others none")
            if op == P.OP.HELLO:
                self._hello(sock, seq)
                return
            if op == P.OP.ATTACH:
                self.service.attach(msg.fields["kind"], msg.fields["index"], fds[0])
                fds.clear()                   # the service owns it now
            result = self.handlers[op](msg.fields) or {}
            self.portal.send(P.encode_reply(op, seq, P.STATUS.OK, "", **result), sock)
            if op == P.OP.STOP:
                self.service.finished.set()
            return
        except P.PortalError as e:
            refusal = (e.status, str(e))
        except Refused as e:
            refusal = (getattr(P.STATUS, e.status), e.message)
        except Exception as e:   # our own bug: answer, say it loudly, keep serving
            log.exception("portal: internal error in %s", P.op_name(op))
            refusal = (P.STATUS.FAILED, f"internal error in the core: {e!r}")
        finally:
            close_fds(fds)                    # refused fds are gone before the answer
        self._refuse(sock, op, seq, *refusal)

    def _hello(self, sock, seq: int) -> None:
        token = self.service.hello()
        self.portal.attach(sock)
        self.portal.send(P.encode_reply(P.OP.HELLO, seq, P.STATUS.OK, "", core_version=P.VERSION,
                                        vm_token=token, state=self.service.state), sock)
        self.service.flush_backlog()

    def _refuse(self, sock, op, seq, status, message) -> None:
        text = P.clip_message(f"refused {P.op_name(op)}: {message}")
        log.warning("portal: %s", text)
        self.portal.emit("LOG", {"level": 30, "message": text})
        self.portal.send(P.encode_reply(op, seq, status, P.clip_message(message)), sock)


def accept_loop(listener: socket.socket, host_uid: int, dispatcher: Dispatcher) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        uid = peer_uid(conn)
        if uid not in (host_uid, 0):
            log.warning("portal: refused a connection from uid %d", uid)
            conn.close()
            continue
        threading.Thread(target=dispatcher.serve, args=(conn,), daemon=True,
                         name="portal").start()


KEY_LOCK_BYTES = 1 << 20


def swap_active() -> bool:
    try:
        with open("/proc/swaps") as f:
            return len(f.read().strip().splitlines()) > 1
    except OSError:
        return True


def protect_guest_memory(machine) -> None:
    """Keep guest RAM out of core dumps, and out of swap.

    Guest RAM is locked on fault (mlock2 MLOCK_ONFAULT: no up-front population).
    Where RLIMIT_MEMLOCK is too low for that and cannot be raised (a root
    without CAP_SYS_RESOURCE), RAM can still not reach swap while no swap is
    active, and only root (trusted) can enable swap: the core says so and goes
    on; with swap active it refuses.
    """
    buf = machine.memory.buffer
    sandbox.dont_dump(buf)
    try:
        sandbox.lock_memory(buf, on_fault=True)
    except sandbox.SandboxError as e:
        if swap_active():
            raise sandbox.SandboxError(e.errno, f"{e}; swap is active, so guest memory could "
                                                "be written to it: refusing to run") from None
        log.warning("guest RAM not locked (%s): no swap is active, so it cannot be swapped "
                    "out; enabling swap needs root", e)


ARGS = {"vm-id": str, "host-uid": int, "memory-mib": int, "kvm-fd": int, "portal-fd": int,
        "listen-fd": int, "attest-fd": int, "preboot-fd": int, "witness-fd": int}


def parse_args(argv: list[str]) -> SimpleNamespace:
    """The launcher's `--name=value` words: every one of ARGS, nothing else."""
    got = {}
    for word in argv:
        name, sep, value = word.removeprefix("--").partition("=")
        if not word.startswith("--") or not sep or name not in ARGS or name in got:
            raise SystemExit(f"sealvm-core: unexpected argument {word!r}")
        got[name] = ARGS[name](value)
    if set(got) != set(ARGS):
        raise SystemExit(f"sealvm-core: missing {sorted(set(ARGS) - set(got))}")
    return SimpleNamespace(**{k.replace("-", "_"): v for k, v in got.items()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format=f"core[{args.vm_id}] %(levelname)s %(message)s")
    keep = {fd for fd in (0, 1, 2, args.kvm_fd, args.portal_fd, args.listen_fd, args.attest_fd,
                          args.preboot_fd, args.witness_fd) if fd >= 0}
    try:
        sandbox.harden_process(mlock_limit_needed=KEY_LOCK_BYTES, keep_fds=keep)
    except sandbox.SandboxError as e:
        log.error("cannot harden the core: %s", e)
        return 2
    try:
        bundle = read_bundle(args.attest_fd)
    except (AttestationFailed, OSError, ValueError) as e:
        log.error("cannot read the launcher's boot bundle: %s", e)
        return 2
    attestation = Attestation(bundle, args.preboot_fd) if bundle is not None else None
    install_kick_handler()            # signals can only be set up on the main thread
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # kill -USR1: stacks on stderr
    portal = Portal()
    service = VmService(args.vm_id, args.memory_mib, portal.emit, kvm_fd=args.kvm_fd,
                        attestation=attestation, witness_fd=args.witness_fd,
                        harden_memory=protect_guest_memory,
                        before_start=sandbox.install_core_filter)
    dispatcher = Dispatcher(service, portal)
    listener = socket.socket(fileno=args.listen_fd)
    first = socket.socket(fileno=args.portal_fd)
    threading.Thread(target=accept_loop, args=(listener, args.host_uid, dispatcher),
                     daemon=True, name="accept").start()
    threading.Thread(target=dispatcher.serve, args=(first,), daemon=True, name="portal").start()
    service.finished.wait()
    if service.machine is not None:
        service.machine.close()
    portal.emit("LOG", {"level": 20, "message": "core exiting"})
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
