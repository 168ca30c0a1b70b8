"""The host daemon process: unprivileged, started by the launcher (`sealvm hostd`).

    python -m sealvm.host.daemon --launcher-fd=N --state-dir=DIR --run-dir=DIR

It re-attaches to every core still running, then serves the REST API on
RUN_DIR/hostd.sock.  It holds no capability beyond its launcher channel and
the portal sockets of the cores it manages.
"""
from __future__ import annotations

import argparse
import ctypes
import faulthandler
import logging
import os
import signal
import socket
import sys
from pathlib import Path

PR_SET_NO_NEW_PRIVS = 38


def parse_args(argv):
    p = argparse.ArgumentParser(prog="sealvm-hostd-daemon")
    p.add_argument("--launcher-fd", type=int, required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--insecure-dev", action="store_true")
    return p.parse_args(argv)


def api_socket(run_dir: str) -> str:
    return str(Path(run_dir) / "hostd.sock")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="hostd %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # kill -USR1: stacks in the log
    # SAFETY: prctl with integer arguments only.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    import uvicorn

    from .api import build_app
    from .manager import LauncherClient, VmManager

    launcher = LauncherClient(socket.socket(fileno=args.launcher_fd),
                              insecure=args.insecure_dev)
    manager = VmManager(args.state_dir, launcher)
    manager.reattach_all()
    path = api_socket(args.run_dir)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o660)            # the API: the daemon's uid, its group, and root
    listener.listen(64)
    config = uvicorn.Config(build_app(manager), fd=listener.fileno(), log_level="warning",
                            access_log=False)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
