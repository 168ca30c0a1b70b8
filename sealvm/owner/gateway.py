"""`sealvm owner gateway`: the owner's end of a VM's sealed network tunnel.

Runs on a machine the owner trusts, with the VM's keys from the owner's
directory (DIR/vms/NAME/keys.json, key "net").  It listens on a UDP address
the host's relay sends to, answers the core's handshakes (Noise NNpsk0, see
sealvm/core/net_tunnel.py) and opens the guest's frames.  Frames go to and
from a TAP device, so the VM is an ordinary host on the owner's network
(`--tap NAME --tap-addr 10.77.0.1/24` brings it up with that address).

The reply address is the source of the last datagram that authenticated,
never of an unauthenticated one (a relay may move, but cannot redirect the
tunnel by forging a source).  `--stats FILE` rewrites FILE with the tunnel's
counters (JSON) twice a second.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..core.net_tunnel import Tunnel

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def net_key(directory: str | Path, vm: str) -> bytes:
    from ..owner.manifest import load_vm_keys
    from ..wire.attest import parse_vm_keys
    return parse_vm_keys(load_vm_keys(directory, vm))["net"]


def newest_generation(directory: str | Path, vm: str):
    """What the gateway fences by: the owner's newest generation of `vm` (kept by the
    broker), read at every handshake; an unreadable record admits no copy at all."""
    from .broker import GENERATION_FILE      # the broker's record (fastapi: owner side only)
    path = Path(directory) / "vms" / vm / GENERATION_FILE

    def read() -> int:
        try:
            return int(json.loads(path.read_text())["generation"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError):
            return 1 << 64
    return read


class Gateway:
    def __init__(self, key: bytes, listen: tuple[str, int] | socket.socket, *, tap_fd: int,
                 tunnel_options: dict | None = None):
        if isinstance(listen, socket.socket):    # already bound (tests: in another namespace)
            self.sock = listen
        else:
            info = socket.getaddrinfo(listen[0], listen[1], type=socket.SOCK_DGRAM)[0]
            self.sock = socket.socket(info[0], socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.sock.bind(info[4])
        self.tunnel = Tunnel(key, initiator=False, **(tunnel_options or {}))
        self.tap = tap_fd
        self.peer = None
        self.counts = {"to_tap": 0, "from_tap": 0, "from_tap_no_session": 0}
        self._stop = threading.Event()

    def stats(self) -> dict:
        return {**self.tunnel.stats, **self.counts}

    def from_relay(self) -> None:
        while not self._stop.is_set():
            try:
                d, addr = self.sock.recvfrom(65536)
            except OSError:
                return
            rx = self.tunnel.stats["rx"]
            frame, reply = self.tunnel.receive(d)
            if reply is not None:
                self.sock.sendto(reply, addr)
            if self.tunnel.stats["rx"] != rx:      # authenticated: this is where the VM is
                self.peer = addr
            if frame is not None:
                try:
                    os.write(self.tap, frame)
                    self.counts["to_tap"] += 1
                except OSError:
                    pass

    def from_tap(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.tap], [], [], 0.5)
            if not r:
                continue
            try:
                frame = os.read(self.tap, 65536)
            except OSError:
                return
            d = self.tunnel.seal(frame)
            if d is None or self.peer is None:
                self.counts["from_tap_no_session"] += 1
                continue
            self.counts["from_tap"] += 1
            try:
                self.sock.sendto(d, self.peer)
            except OSError:
                pass

    def serve(self, stats_path: str | None = None) -> None:
        threads = [threading.Thread(target=f, daemon=True) for f in (self.from_relay, self.from_tap)]
        for t in threads:
            t.start()
        try:
            while all(t.is_alive() for t in threads):
                if stats_path:
                    tmp = stats_path + ".tmp"
                    Path(tmp).write_text(json.dumps(self.stats()))
                    os.replace(tmp, stats_path)
                time.sleep(0.5)
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def run(args) -> int:
    from ..host.netrelay import parse_address
    try:
        listen = parse_address(args.listen)
        key = net_key(args.dir, args.vm)
    except (ValueError, OSError) as e:
        print(f"sealvm owner gateway: {e}", file=sys.stderr)
        return 2
    try:
        tap = open_tap(args.tap)
    except OSError as e:
        print(f"sealvm owner gateway: cannot create TAP device {args.tap}: {e.strerror} "
              "(needs root or CAP_NET_ADMIN)", file=sys.stderr)
        return 125
    if args.tap_addr:
        for cmd in (["ip", "addr", "add", args.tap_addr, "dev", args.tap],
                    ["ip", "link", "set", args.tap, "up"]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                print(f"sealvm owner gateway: {' '.join(cmd)}: {r.stderr.strip()}", file=sys.stderr)
                return 125
    try:
        gw = Gateway(key, listen, tap_fd=tap,
                     tunnel_options={"min_generation": newest_generation(args.dir, args.vm)})
    except OSError as e:
        print(f"sealvm owner gateway: cannot listen on {args.listen}: {e.strerror}", file=sys.stderr)
        return 125
    print(f"sealvm owner gateway: VM {args.vm} tunnel on udp {args.listen}, frames on {args.tap}",
          file=sys.stderr, flush=True)
    try:
        gw.serve(args.stats)
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(actions) -> None:
    g = actions.add_parser(
        "gateway", help="end a VM's sealed network tunnel and put its frames on a TAP device",
        description="Listen on UDP --listen for the sealed datagrams a host relays for VM NAME "
                    "(started with `sealvm run --net HOST:PORT`), authenticate the core with "
                    "the VM's net key from DIR/vms/NAME/keys.json, and exchange the guest's "
                    "Ethernet frames with TAP device --tap. Needs CAP_NET_ADMIN for the TAP.")
    g.add_argument("--dir", required=True, help="the owner's directory (sealvm owner init)")
    g.add_argument("--vm", required=True, metavar="NAME", help="the VM's name (sealvm owner sign)")
    g.add_argument("--listen", default="0.0.0.0:51820", metavar="ADDR:PORT",
                   help="UDP address to receive the relay's datagrams on (default %(default)s)")
    g.add_argument("--tap", default="sealvm0", help="TAP device name (default %(default)s)")
    g.add_argument("--tap-addr", metavar="CIDR",
                   help="give the TAP this address and bring it up, e.g. 10.77.0.1/24")
    g.add_argument("--stats", metavar="FILE", help="keep the tunnel's counters in FILE (JSON)")
