"""The owner's world for the snapshot and migration attacks: an owner with signed
guests and a policy trusting this host, its key broker (and a paired broker with the
generation check off), a host daemon, and a second host in its own network namespace.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, guest_image, poll
from tests.e2e.conftest import Hostd
from tests.security.harness import start_broker

# what stays with the owner when a VM's directory is published: its keys, the broker's state
PRIVATE = shutil.ignore_patterns("keys.json", "generation*", "*.lock")
MEMTOUCH = "mib=8 secs=0 rate=2000"
BLKBENCH = "tests=seqwrite,sleep,seqread sleep_ms=5000 qd=4 count=64 seed=7"
DISK_LOAD = "tests=seqwrite,randwrite,seqread qd=8 count=40000 seed=11"


def cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sealvm.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world():
    """Owner (two signed guests, policy trusting this host), broker, a paired broker with
    the generation check off, and a host daemon that can read the published manifests."""
    base = Path(tempfile.mkdtemp(prefix="sealvm-snap-", dir="/tmp"))
    os.chmod(base, 0o755)
    owner = base / "owner"
    assert cli("owner", "init", str(owner)).returncode == 0
    for name, guest, cmdline, devices in (("snap", "memtouch", MEMTOUCH, "rng"),
                                          ("secret", "canary", "mib=4 secs=600", "rng"),
                                          ("dsk", "blkbench", BLKBENCH, "blk,rng"),
                                          ("dskload", "blkbench", DISK_LOAD, "blk,rng"),
                                          ("netvm", "netecho", "secs=0", "net,rng"),
                                          ("netc", "netecho", "canary=FENCE secs=0", "net,rng")):
        r = cli("owner", "sign", "--dir", str(owner), str(guest_image(guest)), "--name", name,
                "--cmdline", cmdline, "--memory", "64", "--devices", devices)
        assert r.returncode == 0, r.stderr
    m = json.loads(cli("measure").stdout)
    for kind, value in (("host", m["host_pub"]), ("core", m["core_measurement"])):
        assert cli("owner", "policy", "--dir", str(owner), "add", kind, value).returncode == 0
    public = base / "public"          # what the owner publishes: manifests and public keys
    for name in ("snap", "secret", "dsk", "dskload", "netvm", "netc"):
        shutil.copytree(owner / "vms" / name, public / "vms" / name, ignore=PRIVATE)
    shutil.copy(owner / "owner.pub.json", public / "owner.pub.json")
    for p in [public, *public.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    broker, url = start_broker(owner)
    env = dict(os.environ, SEALVM_TEST_MODE="1", SEALVM_BROKER_TEST_DISABLE="generation")
    lax, lax_url = start_broker(owner, env)
    (base / "host").mkdir(mode=0o755)
    hostd = Hostd(base / "host", "64300-64399")
    w = dict(base=base, owner=owner, public=public, url=url, lax_url=lax_url, hostd=hostd)
    yield w
    hostd.close()
    for b in (broker, lax):
        b.terminate()
        b.wait(10)
    if not os.environ.get("SEALVM_KEEP_TEST_DIRS"):
        shutil.rmtree(base, ignore_errors=True)


def publish(w, name: str, guest: str, cmdline: str, devices: str) -> None:
    """The owner signs one more guest for the world and publishes its manifest."""
    r = cli("owner", "sign", "--dir", str(w["owner"]), str(guest_image(guest)), "--name", name,
            "--cmdline", cmdline, "--memory", "64", "--devices", devices)
    assert r.returncode == 0, r.stderr
    shutil.copytree(w["owner"] / "vms" / name, w["public"] / "vms" / name, ignore=PRIVATE)
    for q in [w["public"] / "vms" / name, *(w["public"] / "vms" / name).rglob("*")]:
        os.chmod(q, 0o755 if q.is_dir() else 0o644)


def create(w, name: str, guest: str, cmdline: str, vm_id: str, broker: str | None = None) -> str:
    r = w["hostd"].api().post("/v1/vms", json=dict(
        image=str(guest_image(guest)), name=vm_id, memory_mib=64, cmdline=cmdline, start=True,
        manifest=str(w["public"] / "vms" / name), broker=broker or w["url"]))
    assert r.status_code == 201, r.text
    return vm_id


def console(w, vm: str) -> str:
    return w["hostd"].api().get(f"/v1/vms/{vm}/console").content.decode(errors="replace")


def wait_for(w, vm: str, pattern: str, timeout: float = 20) -> re.Match:
    found = poll(lambda: list(re.finditer(pattern, console(w, vm))), timeout)
    if not found:
        raise AssertionError(f"{vm}: no {pattern!r} in {console(w, vm)[-2000:]!r}")
    return found[-1]


def snapshot(w, vm: str, out: Path) -> dict:
    r = w["hostd"].cli("snapshot", vm, "--output", str(out))
    assert r.returncode == 0, r.stderr
    path, _, gen, *_ = r.stdout.decode().split()
    assert path == str(out)
    return {"path": out, "generation": int(gen)}


def restore(w, snap: Path, name: str, vm_id: str, broker: str | None = None):
    return w["hostd"].api().post("/v1/restore", json=dict(
        snapshot=str(snap), name=vm_id, manifest=str(w["public"] / "vms" / name),
        broker=broker or w["url"], start=True))


def snap_dir(w) -> Path:
    d = Path(tempfile.mkdtemp(dir=w["base"]))
    shutil.chown(d, 63970, 63970)      # the daemon's uid writes the snapshot files
    return d


def generation(w, name: str) -> dict:
    return json.loads((w["owner"] / "vms" / name / "generation").read_text())


# ---- the sealed file's records -----------------------------------------------------------
def records(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def join(recs: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(r)) + r for r in recs)


@pytest.fixture(scope="module")
def host_b(world):
    """A second host: a network namespace joined to this one by a veth pair, its own
    `sealvm hostd` inside it, and the owner's broker reachable at 10.201.0.1."""
    tag = f"{os.getpid() % 100000}"
    ns, va, vb = f"svsnap{tag}", f"svsa{tag}", f"svsb{tag}"

    def sh(*cmd):
        subprocess.run(cmd, check=True, capture_output=True)
    try:
        sh("ip", "netns", "add", ns)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot make a network namespace here: {e}")
    try:
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        sh("ip", "link", "set", vb, "netns", ns)
        sh("ip", "addr", "add", "10.201.0.1/24", "dev", va)
        sh("ip", "link", "set", va, "up")
        sh("ip", "-n", ns, "addr", "add", "10.201.0.2/24", "dev", vb)
        sh("ip", "-n", ns, "link", "set", vb, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        port = free_port()
        brokers = []
        for p, env in ((port, None), (lax_port := free_port(), dict(
                os.environ, SEALVM_TEST_MODE="1", SEALVM_BROKER_TEST_DISABLE="generation"))):
            brokers.append(subprocess.Popen(
                [sys.executable, "-m", "sealvm.cli", "owner", "broker", "--dir",
                 str(world["owner"]), "--listen", "10.201.0.1", "--port", str(p)], cwd=ROOT,
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        base = world["base"] / "host-b"
        base.mkdir(mode=0o755)
        log = open(base / "hostd.log", "wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "sealvm.cli", "hostd",
             f"--state-dir={base / 'state'}", f"--run-dir={base / 'run'}", "--host-uid=63970",
             "--uid-range=64400-64499"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        hb = Hostd.__new__(Hostd)
        hb.base, hb.state, hb.run, hb.log, hb.proc = base, base / "state", base / "run", log, proc
        hb.sock = str(base / "run" / "hostd.sock")
        hb.wait_ready()
        for p in (port, lax_port):
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("10.201.0.1", p), 0.2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "a broker did not start"
                    time.sleep(0.1)
        yield {"hostd": hb, "url": f"http://10.201.0.1:{port}", "ns": ns,
               "lax_url": f"http://10.201.0.1:{lax_port}"}
        hb.close()
        for broker in brokers:
            broker.terminate()
            broker.wait(10)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", va], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def read_guest_secret(pid: int) -> bytes:
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "memfd:sealvm-ram" in line:
                addr = int(line.split("-")[0], 16)
                break
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(addr + 0x200000)
        return f.read(16)


def make_disk(w, name: str, vm: str, size: str = "4M") -> Path:
    """A new sealed disk made with the owner's tools, for `vm`'s key, owned by the daemon."""
    disk = w["base"] / name
    r = cli("disk", "create", size, "-o", str(disk), "--owner", str(w["owner"]), "--vm", vm)
    assert r.returncode == 0, r.stderr
    shutil.chown(disk, 63970, 63970)             # the daemon's uid opens it
    return disk


class OwnerGateway:
    """The owner's end of a VM's network tunnel, played by a test on a thread: answers
    handshakes (fencing by `min_generation` if given, as `sealvm owner gateway` does) and
    hands each frame to `on_frame(frame, peer)`; `on_tick()` runs between datagrams."""

    def __init__(self, key: bytes, bind: str = "127.0.0.1", min_generation=None,
                 tick: float = 0.1):
        import threading
        from sealvm.core.net_tunnel import Tunnel
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind, 0))
        self.sock.settimeout(tick)
        self.port = self.sock.getsockname()[1]
        self.tunnel = Tunnel(key, initiator=False, min_generation=min_generation)
        self.peer, self.peers = None, []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def on_frame(self, frame: bytes, peer) -> None:
        pass

    def on_tick(self) -> None:
        pass

    def send(self, frame: bytes, peer=None) -> None:
        self.sock.sendto(self.tunnel.seal(frame), peer or self.peer)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.on_tick()
            try:
                d, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            frame, reply = self.tunnel.receive(d)
            if reply is not None:                 # a handshake: maybe a new core
                self.sock.sendto(reply, peer)
                self.peer = peer
                if peer not in self.peers:
                    self.peers.append(peer)
            if frame is not None:
                self.peer = peer
                self.on_frame(frame, peer)

    def wait(self, pred, what: str, timeout: float = 30) -> None:
        assert poll(pred, timeout, 0.05), (what, self.tunnel.stats)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()

