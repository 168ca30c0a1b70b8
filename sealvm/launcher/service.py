"""`sealvm hostd` as root: the launcher, which starts and supervises the daemon.

The root process does three things only: it starts the host daemon under an
unprivileged uid (no capabilities, no new privileges), answers the daemon's
SPAWN requests by starting a core (spawn.py) and passing back the portal
socket, and restarts the daemon if it dies.  Cores it started keep running
whatever happens to the daemon; a restarted daemon re-attaches to them.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .protocol import (OP_PING, OP_SPAWN, REQUEST_SIZE, STATUS_FAILED, STATUS_OK, STATUS_REFUSED,
                       FLAG_ATTEST, FLAG_INSECURE_SAME_UID, encode_reply, parse_request,
                       send_with_fd)
from .spawn import DEFAULT_UID_RANGE, CoreHandle, LaunchError, spawn_core

log = logging.getLogger("sealvm.launcher")
DEFAULT_HOST_UID = 63999
RESTART_DELAY = 0.5


class Launcher:
    def __init__(self, run_dir: str, host_uid: int, uid_range=DEFAULT_UID_RANGE,
                 insecure: bool = False, core_log: str | None = None):
        self.run_dir = run_dir
        self.host_uid = host_uid
        self.uid_range = uid_range
        self.insecure = insecure
        self.core_log = core_log
        self.cores: dict[int, CoreHandle] = {}
        self.prebooted: list = []          # preboot stages still to be reaped
        self._lock = threading.Lock()

    def serve(self, sock: socket.socket) -> None:
        """Answer one daemon's requests until it goes away (SOCK_SEQPACKET: one record each)."""
        while True:
            try:
                data = sock.recv(REQUEST_SIZE + 1)
            except OSError:
                return
            if not data:
                return
            try:
                req = parse_request(data)
            except LaunchError as e:
                log.warning("launcher: refused request: %s", e)
                sock.send(encode_reply(STATUS_REFUSED, message=str(e)))
                continue
            if req.op == OP_PING:
                sock.send(encode_reply(STATUS_OK, os.getpid(), 0, "pong"))
                continue
            if req.op == OP_SPAWN:
                self._spawn(sock, req)

    def _spawn(self, sock: socket.socket, req) -> None:
        insecure = bool(req.flags & FLAG_INSECURE_SAME_UID)
        if insecure and not self.insecure:
            sock.send(encode_reply(STATUS_REFUSED, message="same-uid cores need --insecure-dev"))
            return
        log_fd = None
        try:
            if self.core_log:
                log_fd = os.open(self.core_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with self._lock:
                reserved = {h.uid for h in self.cores.values() if h.process.poll() is None}
                h = spawn_core(req.vm_id, memory_mib=req.memory_mib, run_dir=self.run_dir,
                               host_uid=self.host_uid, uid_range=self.uid_range,
                               insecure_same_uid=insecure or self.insecure, reserved_uids=reserved,
                               log_fd=log_fd, attest=bool(req.flags & FLAG_ATTEST))
                self.cores[h.pid] = h
                if h.preboot is not None:
                    self.prebooted.append(h.preboot)
        except (LaunchError, OSError) as e:
            sock.send(encode_reply(STATUS_FAILED, message=str(e)))
            return
        finally:
            if log_fd is not None:
                os.close(log_fd)
        log.info("launcher: core for %s is pid %d uid %d", req.vm_id, h.pid, h.uid)
        send_with_fd(sock, encode_reply(STATUS_OK, h.pid, h.uid, h.socket_path), h.portal.fileno())
        h.portal.close()

    def reap(self) -> None:
        with self._lock:
            self.prebooted = [p for p in self.prebooted if p.poll() is None]
            for pid, h in list(self.cores.items()):
                rc = h.process.poll()
                if rc is None:
                    continue
                del self.cores[pid]
                if rc == -signal.SIGSYS:
                    log.error("core %s (pid %d) killed by seccomp: it made a forbidden syscall",
                              h.vm_id, pid)
                elif rc < 0:
                    log.warning("core %s (pid %d) killed by signal %d", h.vm_id, pid, -rc)
                else:
                    log.info("core %s (pid %d) exited with %d", h.vm_id, pid, rc)


def _prepare_dirs(state_dir: Path, run_dir: Path, host_uid: int) -> None:
    for d, mode in ((state_dir, 0o700), (run_dir, 0o755)):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, mode)
    if os.geteuid() == 0:
        os.chown(state_dir, host_uid, host_uid)
        (run_dir / "vms").mkdir(exist_ok=True, mode=0o711)
        os.chown(run_dir, 0, host_uid)
        os.chmod(run_dir, 0o775)


def daemon_command(state_dir: Path, run_dir: Path, fd: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "sealvm.host.daemon", f"--launcher-fd={fd}",
            f"--state-dir={state_dir}", f"--run-dir={run_dir}", *extra]


def run_hostd(state_dir: str, run_dir: str, host_uid: int = DEFAULT_HOST_UID,
              uid_range=DEFAULT_UID_RANGE, insecure: bool = False,
              daemon_args: list[str] | None = None) -> int:
    state, run = Path(state_dir), Path(run_dir)
    if os.geteuid() != 0 and not insecure:
        print("sealvm hostd: the launcher needs root to give each VM its own uid; "
              "run as root or pass --insecure-dev", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        host_uid = os.getuid()
    from ..core.sandbox.probe import probe_capabilities
    missing = [k for k, ok in probe_capabilities().items() if not ok]
    if missing and not insecure:
        print(f"sealvm hostd: this machine cannot {', '.join(missing)}; refusing to run VMs "
              "without those defences (--insecure-dev runs anyway, for development only)",
              file=sys.stderr)
        return 1
    _prepare_dirs(state, run, host_uid)
    launcher = Launcher(str(run), host_uid, uid_range, insecure, core_log=str(run / "cores.log"))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    daemon = None
    while not stopping.is_set():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        kw = {}
        if os.geteuid() == 0 and host_uid != 0:
            kw = dict(user=host_uid, group=host_uid, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if k.startswith(("SEALVM_", "PATH", "LANG"))}
        # the daemon imports sealvm from where the launcher did (a source tree or a venv)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        daemon = subprocess.Popen(daemon_command(state, run, theirs.fileno(), daemon_args or []),
                                  pass_fds=(theirs.fileno(),), env=env, **kw)
        theirs.close()
        threading.Thread(target=launcher.serve, args=(ours,), daemon=True).start()
        while daemon.poll() is None and not stopping.is_set():
            stopping.wait(0.2)
            launcher.reap()
        ours.close()
        if not stopping.is_set():
            log.warning("host daemon exited (%s); restarting it", daemon.returncode)
            time.sleep(RESTART_DELAY)
    if daemon is not None and daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
    return 0
