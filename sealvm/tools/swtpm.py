"""Start and stop a software TPM 2.0 (swtpm) on loopback, for tests and the demo.

    python -m sealvm.tools.swtpm start STATE_DIR PORT   # data port PORT, control port PORT+1
    python -m sealvm.tools.swtpm stop STATE_DIR
    python -m sealvm.tools.swtpm status STATE_DIR

`start` runs

    swtpm socket --tpm2 --tpmstate dir=STATE
          --server type=tcp,port=P,bindaddr=127.0.0.1
          --ctrl type=tcp,port=P+1,bindaddr=127.0.0.1
          --flags not-need-init,startup-clear --daemon --pid file=STATE/swtpm.pid

and returns once the TPM answers a TPM2_GetRandom on the data port.  Both
commands are idempotent: starting an instance that already runs on the same
state directory and port is a no-op, stopping one that is not running too.
`stop` asks swtpm to shut down over its control channel (so it leaves its
state file consistent), then falls back to SIGTERM and SIGKILL, always by the
pid in STATE/swtpm.pid and only after checking that pid is a swtpm serving that
state directory.

swtpm keeps the TPM's seeds and NV in STATE/tpm2-00.permall: whoever can read or
replace that file can forge quotes.  It stands in for a hardware TPM in tests;
see the threat model in the README.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
PID_FILE = "swtpm.pid"
PORT_FILE = "swtpm.port"
LOG_FILE = "swtpm.log"
CMD_SHUTDOWN = 3                  # swtpm control channel: shut the TPM down and exit
# TPM2_GetRandom(8) with no sessions: tag ST_NO_SESSIONS, size 12, cc 0x17B.
GET_RANDOM_CMD = struct.pack(">HIIH", 0x8001, 12, 0x0000017B, 8)
INSTALL_HINT = "install it with: apt-get install -y swtpm swtpm-tools"


class SwtpmError(RuntimeError):
    """swtpm is missing, did not start, or a state directory is in use."""


def swtpm_binary() -> str:
    path = shutil.which("swtpm")
    if path is None:
        raise SwtpmError(f"swtpm is not installed (not found on PATH); {INSTALL_HINT}")
    return path


def _check_port(port: int) -> None:
    if not (isinstance(port, int) and 1024 <= port <= 65534):
        raise SwtpmError(f"port {port!r} out of range: need 1024..65534 (PORT+1 is the control port)")


def _port_free(port: int) -> bool:
    """No socket listens on loopback:port (connections left in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as swtpm binds
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free on loopback right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port <= 65534 and port >= 1024 and _port_free(port + 1):
            return port
    raise SwtpmError("found no free pair of adjacent loopback ports")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (its sockets are still open)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _swtpm_pid(state: Path) -> int | None:
    """The pid in STATE/swtpm.pid if it is a live swtpm serving STATE, else None."""
    pid = _read_int(state / PID_FILE)
    if pid is None or pid <= 1:
        return None
    if not _alive(pid):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not argv or os.path.basename(argv[0]) != b"swtpm":
        return None
    if f"dir={state}".encode() not in argv:
        return None
    return pid


def answers(port: int, timeout: float = 1.0) -> bool:
    """True when a TPM on loopback:port returns TPM_RC_SUCCESS to TPM2_GetRandom."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.sendall(GET_RANDOM_CMD)
            head = b""
            while len(head) < 10:
                chunk = s.recv(10 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    _tag, _size, rc = struct.unpack(">HII", head)
    return rc == 0


def status(state_dir: str | os.PathLike) -> tuple[int, int] | None:
    """(pid, port) of the swtpm serving state_dir, or None."""
    state = Path(state_dir).resolve()
    pid = _swtpm_pid(state)
    port = _read_int(state / PORT_FILE)
    if pid is None or port is None:
        return None
    return pid, port


def start(state_dir: str | os.PathLike, port: int, timeout: float = 10.0) -> int:
    """Start swtpm on loopback:port (control port+1) for state_dir; return its pid."""
    binary = swtpm_binary()
    _check_port(port)
    state = Path(state_dir).resolve()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    running = status(state)
    if running is not None:
        pid, old_port = running
        if old_port != port:
            raise SwtpmError(f"swtpm (pid {pid}) already serves {state} on port {old_port}, "
                             f"not {port}: stop it first")
        if not _wait_answers(port, timeout):
            raise SwtpmError(f"swtpm (pid {pid}) for {state} runs but does not answer on port {port}")
        return pid
    (state / PID_FILE).unlink(missing_ok=True)                  # stale
    for p in (port, port + 1):
        if not _port_free(p):
            raise SwtpmError(f"loopback port {p} is in use: choose another PORT")
    argv = [binary, "socket", "--tpm2",
            "--tpmstate", f"dir={state}",
            "--server", f"type=tcp,port={port},bindaddr={LOOPBACK}",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr={LOOPBACK}",
            "--flags", "not-need-init,startup-clear",
            "--log", f"file={state / LOG_FILE},level=1",
            "--daemon", "--pid", f"file={state / PID_FILE}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SwtpmError(f"swtpm failed to start (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip() or 'no message'}")
    (state / PORT_FILE).write_text(f"{port}\n")
    if not _wait_answers(port, timeout):
        stop(state)
        raise SwtpmError(f"swtpm started but did not answer on {LOOPBACK}:{port} within {timeout} s; "
                         f"see {state / LOG_FILE}")
    pid = _swtpm_pid(state)
    if pid is None:
        raise SwtpmError(f"swtpm answers on port {port} but {state / PID_FILE} names no swtpm")
    return pid


def start_on_free_port(state_dir: str | os.PathLike, tries: int = 5) -> int:
    """Start swtpm for state_dir on a free loopback port pair; return the port.

    The pair can be taken between finding it free and swtpm binding it, so a
    port that turns out to be in use is retried with another pair.
    """
    for _ in range(tries):
        port = free_port_pair()
        try:
            start(state_dir, port)
            return port
        except SwtpmError as e:
            if "in use" not in str(e):
                raise
    raise SwtpmError(f"no free port pair for swtpm after {tries} tries")


def _wait_answers(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(port):
            return True
        time.sleep(0.02)
    return False


def _ctrl_shutdown(port: int) -> None:
    try:
        with socket.create_connection((LOOPBACK, port + 1), timeout=2.0) as s:
            s.sendall(struct.pack(">I", CMD_SHUTDOWN))
            s.recv(4)
    except OSError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.01)
    return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop(state_dir: str | os.PathLike, timeout: float = 5.0) -> bool:
    """Stop the swtpm serving state_dir; False when none was running."""
    state = Path(state_dir).resolve()
    pid = _swtpm_pid(state)
    port = _read_int(state / PORT_FILE)
    if pid is None:
        (state / PID_FILE).unlink(missing_ok=True)
        return False
    if port is not None:
        _ctrl_shutdown(port)
    # The pid was checked to be a swtpm serving this state; it may have exited
    # since, so a signal to a pid no longer there is not an error.
    if not _wait_gone(pid, timeout):
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, timeout)
    (state / PID_FILE).unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sealvm.tools.swtpm",
                                 description="Run a loopback swtpm (TPM 2.0) for tests and the demo.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start (or keep) swtpm for STATE_DIR on PORT and PORT+1")
    p_start.add_argument("state_dir")
    p_start.add_argument("port", type=int)
    for name in ("stop", "status"):
        sub.add_parser(name).add_argument("state_dir")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            pid = start(args.state_dir, args.port)
            print(f"swtpm pid {pid} on {LOOPBACK}:{args.port} (control {args.port + 1}), "
                  f"state {Path(args.state_dir).resolve()}")
        elif args.cmd == "stop":
            print("stopped" if stop(args.state_dir) else "not running")
        else:
            st = status(args.state_dir)
            print("not running" if st is None else f"swtpm pid {st[0]} on {LOOPBACK}:{st[1]}")
            return 0 if st is not None else 3
    except SwtpmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
