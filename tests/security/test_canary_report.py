"""The canary report: secrets only the guests know, searched for everywhere the host side
can reach.

Three attested VMs run under the host daemon, each with a secret drawn by the guest itself
from RDRAND (so neither the guest image nor the manifest holds it):

- `canary` fills 16 MiB of its RAM with its secret (memory);
- `blkbench canary=rand` writes its secret at the start of every block of its sealed disk,
  and then sleeps with the disk open (disk writes);
- `netecho canary=rand` sends its secret in a UDP datagram every second through the
  sealed tunnel to the owner's gateway (network payloads).

Then the host does what hosts do: it snapshots all three VMs to files, and live-migrates
the memory VM to a second host (its own network namespace and daemon) through a relay that
records the stream.  The test learns the secrets the owner's way (the memory one from the
core's RAM as root, the disk one from the owner's export of the disk, the network one from
the owner's gateway) and searches, raw and in hex:

- the memory of every process running as the daemons' uid (both hosts' daemons and all
  their children), read as root through /proc/PID/mem;
- every file under the test world except the owner's own directory (daemon state and run
  dirs, logs, consoles, the disk image, the snapshot files, the second host's files), and
  every file the daemon uid owns under /tmp, /var/tmp and /dev/shm;
- a packet capture of every interface in the host's namespace (loopback, the veth to the
  second host) for the whole run, and the recorded migration stream;
- what the daemon's API hands out: every VM's record and console.

The VMs' own keys (disk, network, snapshot) are searched for too.  The attack passes
with zero occurrences.  The paired control runs the same search over
the same things with the one defence each relies on taken away: the cores' own memory
(what the daemon would hold without a uid of its own for each core), the disk and the
snapshots opened with the owner's keys, and the frames the tunnel carried opened at the
gateway; there the search finds every secret, so the zero above is not the search's
blindness.  The counts go into docs/security.md through the attack catalogue.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import guest_image, needs_kvm, poll
from tests.netlab import Capture
from tests.e2e.conftest import HOST_UID
from tests.security.harness import readable_regions
from tests.security.owner_world import (OwnerGateway, cli, create, host_b, publish,  # noqa: F401
                                        read_guest_secret, snap_dir, snapshot, wait_for, world)

pytestmark = needs_kvm

MEM_CMDLINE = "mib=16 secs=600"
DISK_CMDLINE = "tests=seqwrite,sleep canary=rand check=0 qd=8 count=256 sleep_ms=600000"
NET_CMDLINE = "canary=rand secs=0"


class CanaryGateway(OwnerGateway):
    """The owner's gateway for netecho: answers its ARP request and keeps every frame."""

    def __init__(self, key: bytes):
        self.frames: list[bytes] = []
        super().__init__(key)

    def on_frame(self, frame: bytes, peer) -> None:
        from tests.e2e.test_net_daemon import OWNER_IP, OWNER_MAC
        self.frames.append(frame)
        if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x01" and \
                frame[38:42] == OWNER_IP:
            self.send(frame[22:28] + OWNER_MAC + b"\x08\x06" + frame[14:20] + b"\x00\x02"
                      + OWNER_MAC + OWNER_IP + frame[22:32], peer)

    def secret(self) -> bytes | None:
        for f in self.frames:
            m = re.search(rb"CANARY:([0-9a-f]{32})", f)
            if m:
                return m.group(1)
        return None


class Scanner:
    """Counts where any of the needles (raw and hex) occurs; each place is read once."""

    def __init__(self, secrets: dict[str, bytes]):
        self.needles = {}
        for name, s in secrets.items():
            self.needles[name] = s
            self.needles[f"{name} (hex)"] = s.hex().encode()
        self.hits: list[tuple[str, str]] = []
        self.places = 0
        self.bytes = 0

    def data(self, place: str, data: bytes) -> None:
        self.places += 1
        self.bytes += len(data)
        for name, n in self.needles.items():
            if n in data:
                self.hits.append((name, place))

    def file(self, path: Path) -> None:
        try:
            if path.is_file() and not path.is_symlink():
                self.data(str(path), path.read_bytes())
        except OSError:
            pass

    def tree(self, root: Path, skip: tuple[Path, ...] = ()) -> None:
        for dirpath, dirs, files in os.walk(root):
            if any(Path(dirpath).is_relative_to(s) for s in skip):
                dirs[:] = []
                continue
            for f in files:
                self.file(Path(dirpath) / f)

    def process(self, pid: int) -> None:
        for line, data in readable_regions(pid):
            self.data(f"pid {pid} {line.split()[-1]}", data)


def pids_of_uid(uid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.stat(f"/proc/{p}").st_uid == uid:
                    out.append(int(p))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def canary_run(world, host_b):
    """The whole run: three VMs with their secrets, snapshots, a migration, the capture;
    returns the secrets and everything the host side holds."""
    from tests.security.test_migration import Relay
    from sealvm.wire import attest as A
    w, b = world, host_b
    publish(w, "cmem", "canary", MEM_CMDLINE, "rng")
    publish(w, "cdsk", "blkbench", DISK_CMDLINE, "blk,rng")
    publish(w, "cnet", "netecho", NET_CMDLINE, "net,rng")
    keys = {n: A.parse_vm_keys((w["owner"] / "vms" / n / "keys.json").read_bytes())
            for n in ("cmem", "cdsk", "cnet")}
    sniffer = Capture(None, None)       # every interface of this namespace
    gw = CanaryGateway(keys["cnet"]["net"])
    disk = w["base"] / "cdsk.img"
    r = cli("disk", "create", "4M", "-o", str(disk), "--owner", str(w["owner"]), "--vm", "cdsk")
    assert r.returncode == 0, r.stderr
    shutil.chown(disk, HOST_UID, HOST_UID)
    api = w["hostd"].api()
    try:
        create(w, "cmem", "canary", MEM_CMDLINE, "cmem")
        r = api.post("/v1/vms", json=dict(
            image=str(guest_image("blkbench")), name="cdsk", memory_mib=64, cmdline=DISK_CMDLINE,
            start=True, manifest=str(w["public"] / "vms" / "cdsk"), broker=w["url"],
            disk=str(disk)))
        assert r.status_code == 201, r.text
        r = api.post("/v1/vms", json=dict(
            image=str(guest_image("netecho")), name="cnet", memory_mib=64, cmdline=NET_CMDLINE,
            start=True, manifest=str(w["public"] / "vms" / "cnet"), broker=w["url"],
            net=f"127.0.0.1:{gw.port}"))
        assert r.status_code == 201, r.text
        wait_for(w, "cmem", "canary ready")
        wait_for(w, "cdsk", "blkbench sleeping", timeout=60)
        gw.wait(lambda: sum(b"CANARY:" in f for f in gw.frames) >= 3, "no canary datagrams")
        pids = {vm: api.get(f"/v1/vms/{vm}").json()["pid"] for vm in ("cmem", "cdsk", "cnet")}
        secrets = {"memory": read_guest_secret(pids["cmem"]), "network": gw.secret()}
        snaps = {vm: snapshot(w, vm, snap_dir(w) / f"{vm}.svs") for vm in ("cmem", "cdsk", "cnet")}
        # the owner learns the disk's canary from its own export of the disk
        plain = w["owner"] / "cdsk-export.raw"           # the owner's, out of the host's view
        r = cli("disk", "export", str(disk), "-o", str(plain), "--owner", str(w["owner"]),
                "--vm", "cdsk")
        assert r.returncode == 0, r.stderr
        m = re.search(rb"SEALVM-CANARY-[0-9a-f]{16}", plain.read_bytes())
        assert m, "the guest's disk canary is not on the disk"
        secrets["disk"] = m.group(0)
        # live migration of the memory VM to host B through a recording relay
        r = b["hostd"].api().post("/v1/incoming", json=dict(
            name="cmem-b", manifest=str(w["public"] / "vms" / "cmem"), broker=b["url"],
            listen="10.201.0.2"))
        assert r.status_code == 201, r.text
        relay = Relay(("10.201.0.2", r.json()["port"]))
        m = api.post("/v1/vms/cmem/migrate", json={"to": f"127.0.0.1:{relay.port}"})
        assert m.status_code == 200, m.text
        relay.thread.join(60)
        assert poll(lambda: b["hostd"].api().get("/v1/vms/cmem-b").json()["state"] == "running",
                    30), "the migrated VM did not run on host B"
        api.post("/v1/vms/cmem/migrate/finish", json={"taken_over": True})
        time.sleep(1.5)                                  # more canary datagrams go by
        vms = {h: h_api.get("/v1/vms").json() for h, h_api in
               (("a", api), ("b", b["hostd"].api()))}
        consoles = {vm: api.get(f"/v1/vms/{vm}/console").content for vm in ("cdsk", "cnet")}
        consoles["cmem-b"] = b["hostd"].api().get("/v1/vms/cmem-b/console").content
        core_pids = [pids["cdsk"], pids["cnet"],
                     b["hostd"].api().get("/v1/vms/cmem-b").json()["pid"]]
        assert all(isinstance(s, bytes) and len(s) >= 16 for s in secrets.values()), secrets
        yield dict(secrets=secrets, sniffed=sniffer.stop(), stream=bytes(relay.captured),
                   snaps=snaps, plain=plain, keys=keys, gateway=list(gw.frames), vms=vms,
                   consoles=consoles, core_pids=core_pids, world=w, host_b=b)
    finally:
        sniffer.stop()
        gw.stop()
        for vm in ("cmem", "cdsk", "cnet"):
            api.delete(f"/v1/vms/{vm}")
        b["hostd"].api().delete("/v1/vms/cmem-b")


@pytest.mark.attack(adversary="host daemon", asset="guest memory",
                    technique="search all the host side holds (daemon memory, files, logs, "
                              "captures, snapshot and migration blobs) for guests' secrets",
                    defence="core isolation + disk, network, snapshot and migration sealing",
                    outcome="zero occurrences of any of the three secrets or the VMs' keys",
                    control="test_control_the_search_finds_every_secret_without_the_sealing")
def test_no_guest_secret_anywhere_the_host_side_can_reach(canary_run, record_property):
    run = canary_run
    w, b = run["world"], run["host_b"]
    # the guests' secrets, and the VMs' own keys (which only the owner and the cores hold)
    scan = Scanner({**run["secrets"], **{f"{vm} {k} key": v for vm, ks in run["keys"].items()
                                         for k, v in ks.items()}})
    daemon_pids = pids_of_uid(HOST_UID)
    assert len(daemon_pids) >= 2, "both hosts' daemons run as the daemon uid"
    for pid in daemon_pids:
        scan.process(pid)
    scan.tree(w["base"], skip=(w["owner"],))
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        for dirpath, _, files in os.walk(d):
            for f in files:
                p = Path(dirpath) / f
                try:
                    if p.lstat().st_uid == HOST_UID and not p.is_relative_to(w["base"]):
                        scan.file(p)
                except OSError:
                    pass
    scan.data("packet capture of every interface", run["sniffed"])
    scan.data("the recorded migration stream", run["stream"])
    for name, snap in run["snaps"].items():
        assert snap["path"].is_relative_to(w["base"])    # searched with the tree above
    scan.data("the daemons' VM records", json.dumps(run["vms"]).encode())
    for vm, text in run["consoles"].items():
        scan.data(f"console of {vm}", text)
    assert len(run["sniffed"]) > 100_000 and len(run["stream"]) > 8 << 20
    report = {"places": scan.places, "bytes": scan.bytes, "hits": scan.hits,
              "daemon_processes": len(daemon_pids)}
    (w["base"] / "canary-report.json").write_text(json.dumps(report))
    seen = (f"canary report: {len(run['secrets'])} guest secrets and "
            f"{sum(len(k) for k in run['keys'].values())} VM keys searched in {scan.places} "
            f"places ({scan.bytes >> 20} MiB: {len(daemon_pids)} daemon processes' memory, "
            f"files, logs, consoles, a {len(run['sniffed']) >> 20} MiB capture, 3 snapshots, "
            f"a {len(run['stream']) >> 20} MiB migration stream): {len(scan.hits)} occurrences")
    print(seen)
    record_property("observed", seen)
    assert scan.hits == [], scan.hits


def test_control_the_search_finds_every_secret_without_the_sealing(canary_run):
    from sealvm.wire import sealed as SL
    run = canary_run
    found = {}
    for name, places in {
        "memory": [("the core's own memory", "pid", run["core_pids"][2]),
                   ("the memory VM's snapshot, opened with the owner's key", "snap", "cmem")],
        "disk": [("the disk opened with the owner's key", "file", run["plain"]),
                 ("the disk VM's core memory", "pid", run["core_pids"][0])],
        "network": [("the frames the tunnel carried, opened at the gateway", "frames", None),
                    ("the network VM's core memory", "pid", run["core_pids"][1])],
    }.items():
        scan = Scanner({name: run["secrets"][name]})
        for label, kind, what in places:
            if kind == "pid":
                scan.process(what)
            elif kind == "file":
                scan.file(what)
            elif kind == "frames":
                scan.data(label, b"".join(run["gateway"]))
            else:
                s = run["snaps"][what]
                plain = b"".join(p for _, p in SL.open_set(
                    run["keys"][what]["snapshot"], what, s["generation"], "snapshot",
                    s["path"].read_bytes(), exact=True))
                scan.data(label, plain)
        found[name] = {n for n, _ in scan.hits}
        assert name in found[name], (name, scan.hits)
