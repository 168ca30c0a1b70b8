"""Live migration between two hosts (each its own daemon, the target in its own network
namespace) over a TCP stream the hosts carry and a relay in between can read and change.

Checked: the memtouch guest keeps writing and verifying its memory across the move and
the old copy is stopped; a cut stream, a tampered stream and a replayed stream never
give a running target and leave the VM running on the source; the old copy cannot
resume once the target took over; the guest's secret never crosses the wire in the
clear (the control pushes the same secret through the same relay and finds it).
"""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from tests.conftest import guest_image, needs_kvm
from tests.security.owner_world import (DISK_LOAD, MEMTOUCH, OwnerGateway, console,  # noqa: F401
                                        create, generation, host_b, make_disk,
                                        read_guest_secret, wait_for, world)

pytestmark = needs_kvm


class Relay:
    """The untrusted network: forwards one TCP connection, records what the source sent,
    and can flip one byte of it or cut it after some bytes."""

    def __init__(self, target: tuple[str, int], flip_at: int | None = None,
                 cut_at: int | None = None, on_cut=None):
        self.target, self.flip_at, self.cut_at, self.on_cut = target, flip_at, cut_at, on_cut
        self.captured = bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if record:
                    start = len(self.captured)
                    self.captured += data
                    if self.flip_at is not None and start <= self.flip_at < start + len(data):
                        data = bytearray(data)
                        data[self.flip_at - start] ^= 0x20
                    if self.cut_at is not None and len(self.captured) >= self.cut_at:
                        if self.on_cut is None:
                            break
                        self.on_cut()           # e.g. kill the target, then keep relaying
                        self.cut_at = None
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self) -> None:
        conn, _ = self.server.accept()
        out = socket.create_connection(self.target)
        t = threading.Thread(target=self._pipe, args=(out, conn, False), daemon=True)
        t.start()
        self._pipe(conn, out, True)
        t.join(10)


def migrate(w, b, vm: str, name: str, relay_kw: dict | None = None, broker=None):
    """Incoming core on host B, the stream through a Relay, then finish on host A.
    Returns (migrate response, target state, finish response, relay)."""
    r = b["hostd"].api().post("/v1/incoming", json=dict(
        name=name, manifest=str(w["public"] / "vms" / "snap"), broker=broker or b["url"],
        listen="10.201.0.2"))
    assert r.status_code == 201, r.text
    relay = Relay(("10.201.0.2", r.json()["port"]), **(relay_kw or {}))
    m = w["hostd"].api().post(f"/v1/vms/{vm}/migrate", json={"to": f"127.0.0.1:{relay.port}"})
    state, deadline = "incoming", time.monotonic() + 60
    while state in ("incoming", "configured") and time.monotonic() < deadline:
        time.sleep(0.05)
        state = b["hostd"].api().get(f"/v1/vms/{name}").json()["state"]
    fin = None
    if m.status_code == 200:
        fin = w["hostd"].api().post(f"/v1/vms/{vm}/migrate/finish",
                                    json={"taken_over": state == "running"})
    return m, state, fin, relay


def replay_to(w, b, name: str, data: bytes, broker: str) -> str:
    """Send an old captured stream to a new incoming target; its final state."""
    r = b["hostd"].api().post("/v1/incoming", json=dict(
        name=name, manifest=str(w["public"] / "vms" / "snap"), broker=broker,
        listen="10.201.0.2"))
    assert r.status_code == 201, r.text
    with socket.create_connection(("10.201.0.2", r.json()["port"])) as c:
        c.settimeout(10)
        try:
            c.sendall(data)
            c.recv(1 << 16)
        except OSError:
            pass
        state, deadline = "incoming", time.monotonic() + 30
        while state in ("incoming", "configured") and time.monotonic() < deadline:
            time.sleep(0.05)
            state = b["hostd"].api().get(f"/v1/vms/{name}").json()["state"]
    return state


def running_on(api, vm: str, after: int = 0) -> str:
    """The console once the guest has printed a new progress line."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = api.get(f"/v1/vms/{vm}/console").content.decode(errors="replace")
        if text.count("memtouch t=") > after:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{vm} made no progress: {text[-500:]!r}")


def cleanup(w, b, *names):
    for n in names:
        w["hostd"].api().delete(f"/v1/vms/{n}")
        b["hostd"].api().delete(f"/v1/vms/{n}")


@pytest.mark.functional('live migration works')
def test_migrated_vm_keeps_running_and_the_old_copy_stops(world, host_b):
    w, b = world, host_b
    vm = create(w, "snap", "memtouch", MEMTOUCH, "mig-a", b["url"])
    wait_for(w, vm, r"memtouch t=2 ")
    gen = generation(w, "snap")["generation"]
    m, state, fin, _ = migrate(w, b, vm, "mig-a")
    assert m.status_code == 200, m.text
    report = m.json()
    assert report["rounds"] >= 1 and report["pages"] > 0 and report["stop_ms"] > 0
    assert state == "running" and fin.json()["state"] == "stopped"
    assert generation(w, "snap")["generation"] == gen + 1
    text = running_on(b["hostd"].api(), "mig-a", 1)
    assert "memtouch base=" not in text and "MISMATCH" not in text
    assert " ok" in text
    cleanup(w, b, "mig-a")


@pytest.mark.functional('faults mid-stream: the VM stays on the source')
@pytest.mark.parametrize("how", ["stream cut", "target core killed"])
def test_failure_mid_stream_leaves_the_vm_running_on_the_source(world, host_b, how):
    w, b = world, host_b
    vm = create(w, "snap", "memtouch", MEMTOUCH, f"mig-cut{len(how)}", b["url"])
    wait_for(w, vm, r"memtouch t=1 ")

    def kill_target():
        os.kill(b["hostd"].api().get(f"/v1/vms/{vm}").json()["pid"], 9)
    kw = {"cut_at": 3 << 20} if how == "stream cut" else {"cut_at": 3 << 20,
                                                          "on_cut": kill_target}
    m, state, fin, _ = migrate(w, b, vm, vm, kw)
    # Either the source saw the stream fail (and resumed at once), or every byte was already
    # in the socket buffers when the target died: then the target never commits and the
    # source resumes with the broker's receipt for its own ticket.
    assert (m.status_code >= 400 and "stays here" in m.json()["detail"]) or (
        m.status_code == 200 and fin.json()["state"] == "running"), (m.text, fin and fin.text)
    assert state == "failed"
    assert w["hostd"].api().get(f"/v1/vms/{vm}").json()["state"] == "running"
    before = console(w, vm).count("memtouch t=")
    assert "MISMATCH" not in running_on(w["hostd"].api(), vm, before)
    cleanup(w, b, vm)


@pytest.mark.functional('a dead source never starts a half VM')
def test_source_killed_mid_stream_never_starts_the_target(world, host_b):
    """The source's core dies with half the VM sent: the target never has the whole VM,
    so it never commits or starts, and the owner's generation does not move (the VM is
    lost with its host, and comes back from its last sealed snapshot)."""
    w, b = world, host_b
    vm = create(w, "snap", "memtouch", MEMTOUCH, "mig-srckill", b["url"])
    wait_for(w, vm, r"memtouch t=1 ")
    gen = generation(w, "snap")["generation"]
    pid = w["hostd"].api().get(f"/v1/vms/{vm}").json()["pid"]
    m, state, fin, relay = migrate(w, b, vm, vm, {"cut_at": 3 << 20,
                                                  "on_cut": lambda: os.kill(pid, 9)})
    assert m.status_code >= 400, m.text
    assert state == "failed", state
    assert generation(w, "snap")["generation"] == gen
    assert 3 << 20 <= len(relay.captured) < 64 << 20
    cleanup(w, b, vm)


@pytest.mark.attack(adversary='network relay', asset='migration',
                    technique='flip a byte of the migration stream in transit',
                    defence='AEAD on every stream record',
                    outcome='the target refuses; the source resumes',
                    control='test_control_the_same_relay_without_tampering_carries_the_vm', baseline=True, variants=True)
@pytest.mark.parametrize("where", [200, 5 << 20])      # the handshake, a memory chunk
def test_tampered_stream_is_refused_and_the_source_resumes(world, host_b, where):
    w, b = world, host_b
    vm = create(w, "snap", "memtouch", MEMTOUCH, f"mig-t{where}", b["url"])
    wait_for(w, vm, r"memtouch t=1 ")
    m, state, fin, _ = migrate(w, b, vm, vm, {"flip_at": where})
    assert state == "failed"
    reason = b["hostd"].api().get(f"/v1/vms/{vm}").json()["stop_reason"]
    assert "altered" in reason or "prove" in reason or "malformed" in reason, reason
    assert w["hostd"].api().get(f"/v1/vms/{vm}").json()["state"] == "running"
    cleanup(w, b, vm)


def test_control_the_same_relay_without_tampering_carries_the_vm(world, host_b):
    w, b = world, host_b
    vm = create(w, "snap", "memtouch", MEMTOUCH, "mig-ctl", b["url"])
    wait_for(w, vm, r"memtouch t=1 ")
    m, state, fin, _ = migrate(w, b, vm, "mig-ctl")
    assert m.status_code == 200 and state == "running", (m.text, state)
    cleanup(w, b, vm)


@pytest.mark.attack(adversary='migration peer', asset='migration',
                    technique='replay a captured migration stream to a new target',
                    defence='broker generation check',
                    outcome="the target stops: 'stale migration'",
                    control='test_control_replay_with_the_generation_check_off_still_fails_on_the_session_key', control_kind='the other defence alone (one-time session key)')
def test_old_stream_replayed_to_a_new_target_is_refused(world, host_b):
    w, b = world, host_b
    vm = create(w, "snap", "memtouch", MEMTOUCH, "mig-r", b["url"])
    wait_for(w, vm, r"memtouch t=1 ")
    m, state, _, relay = migrate(w, b, vm, "mig-r")
    assert state == "running"
    assert replay_to(w, b, "mig-r2", bytes(relay.captured), b["url"]) == "failed"
    reason = b["hostd"].api().get("/v1/vms/mig-r2").json()["stop_reason"]
    assert "stale migration" in reason, reason
    cleanup(w, b, "mig-r", "mig-r2")


def test_control_replay_with_the_generation_check_off_still_fails_on_the_session_key(
        world, host_b):
    """Second line: the replayed stream was sealed under a key agreed with the old
    target's one-time key, so even a broker that lets the stale generation through
    gives the new target nothing it can open."""
    w, b = world, host_b
    vm = create(w, "snap", "memtouch", MEMTOUCH, "mig-rc", b["url"])
    wait_for(w, vm, r"memtouch t=1 ")
    m, state, _, relay = migrate(w, b, vm, "mig-rc")
    assert state == "running"
    assert replay_to(w, b, "mig-rc2", bytes(relay.captured), b["lax_url"]) == "failed"
    reason = b["hostd"].api().get("/v1/vms/mig-rc2").json()["stop_reason"]
    assert "stale" not in reason and ("altered" in reason or "prove" in reason), reason
    cleanup(w, b, "mig-rc", "mig-rc2")


@pytest.mark.attack(adversary='host daemon', asset='migration',
                    technique='ask the migrated-away core to resume',
                    defence='core refuses RESUME without a receipt',
                    outcome="PortalRefused 'migrated away'; the old copy is fenced",
                    control='inline', baseline=True)
def test_old_copy_cannot_resume_after_the_target_took_over(world, host_b):
    w, b = world, host_b
    vm = create(w, "snap", "memtouch", MEMTOUCH, "mig-f", b["url"])
    wait_for(w, vm, r"memtouch t=1 ")
    r = b["hostd"].api().post("/v1/incoming", json=dict(
        name="mig-f", manifest=str(w["public"] / "vms" / "snap"), broker=b["url"],
        listen="10.201.0.2"))
    m = w["hostd"].api().post(f"/v1/vms/{vm}/migrate",
                              json={"to": f"10.201.0.2:{r.json()['port']}"})
    assert m.status_code == 200, m.text
    deadline = time.monotonic() + 30
    while b["hostd"].api().get("/v1/vms/mig-f").json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # A lying host asks the old core itself to resume: it refuses without a receipt.
    from sealvm.wire.portal_client import PortalClient, PortalRefused
    from sealvm.wire.portal_ops import Op
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(w["hostd"].run / "vms" / f"{vm}.sock"))
    with PortalClient(sock) as pc:
        pc.hello()
        with pytest.raises(PortalRefused, match="migrated away"):
            pc.call(Op.RESUME)
        fin = w["hostd"].api().post(f"/v1/vms/{vm}/migrate/finish", json={"taken_over": False})
        pc.call(Op.STOP)                  # this connection holds the core's token now
    assert fin.json()["state"] == "stopped" and "fenced" in fin.json()["stop_reason"]
    cleanup(w, b, "mig-f")


@pytest.mark.attack(adversary='network relay', asset='migration',
                    technique="capture the whole migration stream and search it for the guest's secret",
                    defence='migration stream sealing',
                    outcome='zero occurrences in > 4 MiB captured',
                    control='inline')
def test_guest_secret_never_crosses_the_wire_in_the_clear(world, host_b):
    w, b = world, host_b
    vm = create(w, "secret", "canary", "mib=4 secs=600", "mig-s", b["url"])
    wait_for(w, vm, "canary ready")
    secret = read_guest_secret(w["hostd"].api().get(f"/v1/vms/{vm}").json()["pid"])
    assert len(secret) == 16 and secret != bytes(16)
    r = b["hostd"].api().post("/v1/incoming", json=dict(
        name="mig-s", manifest=str(w["public"] / "vms" / "secret"), broker=b["url"],
        listen="10.201.0.2"))
    relay = Relay(("10.201.0.2", r.json()["port"]))
    m = w["hostd"].api().post(f"/v1/vms/{vm}/migrate", json={"to": f"127.0.0.1:{relay.port}"})
    assert m.status_code == 200, m.text
    relay.thread.join(30)
    assert len(relay.captured) > 4 << 20 and secret not in relay.captured
    # Control: the same capture of the guest's RAM sent in the clear holds the secret.
    with socket.create_server(("127.0.0.1", 0)) as sink:
        plain = Relay(("127.0.0.1", sink.getsockname()[1]))
        def drain():
            conn = sink.accept()[0]
            while conn.recv(1 << 16):
                pass
        threading.Thread(target=drain, daemon=True).start()
        with socket.create_connection(("127.0.0.1", plain.port)) as c:
            pid = b["hostd"].api().get("/v1/vms/mig-s").json()["pid"]
            maps = open(f"/proc/{pid}/maps").read()
            addr = int(next(l for l in maps.splitlines() if "memfd:sealvm-ram" in l)
                       .split("-")[0], 16)
            with open(f"/proc/{pid}/mem", "rb") as f:
                f.seek(addr)
                c.sendall(f.read(4 << 20))
        plain.thread.join(10)
    assert secret in plain.captured
    w["hostd"].api().post(f"/v1/vms/{vm}/migrate/finish", json={"taken_over": True})
    cleanup(w, b, "mig-s")


@pytest.mark.functional('migration under disk load')
def test_vm_migrates_in_the_middle_of_random_disk_writes(world, host_b):
    """blkbench is in the middle of 40,000 random 4 KiB writes at queue depth 8 to its
    sealed disk (shared storage both hosts reach) when it is migrated: the requests in
    flight are finished before the stop and the rest run on the target, whose final
    sequential read checks every block against what was written."""
    w, b = world, host_b
    disk = make_disk(w, "mig-dsk.img", "dskload")
    manifest = str(w["public"] / "vms" / "dskload")
    r = w["hostd"].api().post("/v1/vms", json=dict(
        image=str(guest_image("blkbench")), name="mdsk", memory_mib=64, cmdline=DISK_LOAD,
        start=True, manifest=manifest, broker=b["url"], disk=str(disk)))
    assert r.status_code == 201, r.text
    wait_for(w, "mdsk", "blkbench seqwrite", timeout=60)
    r = b["hostd"].api().post("/v1/incoming", json=dict(
        name="mdsk", manifest=manifest, broker=b["url"], listen="10.201.0.2", disk=str(disk)))
    assert r.status_code == 201, r.text
    m = w["hostd"].api().post("/v1/vms/mdsk/migrate", json={"to": f"10.201.0.2:{r.json()['port']}"})
    assert m.status_code == 200, m.text
    on_source = console(w, "mdsk")
    assert "blkbench randwrite" not in on_source, "the writes ended before the migration"
    deadline = time.monotonic() + 30
    while b["hostd"].api().get("/v1/vms/mdsk").json()["state"] != "running":
        assert time.monotonic() < deadline, b["hostd"].api().get("/v1/vms/mdsk").json()
        time.sleep(0.05)
    w["hostd"].api().post("/v1/vms/mdsk/migrate/finish", json={"taken_over": True})
    deadline = time.monotonic() + 120
    while "blkbench done" not in (text := b["hostd"].api().get("/v1/vms/mdsk/console").text):
        assert time.monotonic() < deadline, text[-1000:]
        time.sleep(0.2)
    assert "blkbench done errors=0 mismatches=0" in text, text[-1500:]
    assert "blkbench randwrite" in text and "blkbench seqwrite" not in text
    cleanup(w, b, "mdsk")


class EchoLoad(OwnerGateway):
    """The owner's gateway under load: a UDP datagram to the guest's echo port every
    2 ms through the tunnel, counting the echoes that come back."""

    def __init__(self, key: bytes):
        self.sent, self.echoed = 0, []
        super().__init__(key, bind="10.201.0.1", tick=0.002)       # both hosts reach it

    def on_tick(self) -> None:
        from tests.e2e.test_net_daemon import udp_frame
        if self.tunnel.current is not None and self.peer is not None:
            self.send(udp_frame(b"load %d" % self.sent))
            self.sent += 1

    def on_frame(self, frame: bytes, peer) -> None:
        if b"load " in frame[-16:]:
            self.echoed.append((time.monotonic(), peer))


@pytest.mark.functional('migration under network load')
def test_vm_migrates_while_echoing_a_udp_stream(world, host_b):
    """netecho echoes a datagram every 2 ms through the sealed tunnel while it is migrated;
    the target's core makes its own tunnel session with the owner's gateway and the
    echoes go on from the new host."""
    from sealvm.wire import attest as A
    w, b = world, host_b
    keys = A.parse_vm_keys((w["owner"] / "vms" / "netvm" / "keys.json").read_bytes())
    load = EchoLoad(keys["net"])
    manifest, gw = str(w["public"] / "vms" / "netvm"), f"10.201.0.1:{load.port}"
    try:
        r = w["hostd"].api().post("/v1/vms", json=dict(
            image=str(guest_image("netecho")), name="mnet", memory_mib=64, cmdline="secs=0",
            start=True, manifest=manifest, broker=b["url"], net=gw))
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while len(load.echoed) < 200:
            assert time.monotonic() < deadline, (load.sent, len(load.echoed), console(w, "mnet"))
            time.sleep(0.05)
        r = b["hostd"].api().post("/v1/incoming", json=dict(
            name="mnet", manifest=manifest, broker=b["url"], listen="10.201.0.2", net=gw))
        assert r.status_code == 201, r.text
        switch = time.monotonic()
        m = w["hostd"].api().post("/v1/vms/mnet/migrate",
                                  json={"to": f"10.201.0.2:{r.json()['port']}"})
        assert m.status_code == 200, m.text
        w["hostd"].api().post("/v1/vms/mnet/migrate/finish", json={"taken_over": True})
        deadline = time.monotonic() + 30
        while not any(t > switch and p[0] == "10.201.0.2" for t, p in load.echoed[-50:]):
            assert time.monotonic() < deadline, (load.peers, console(w, "mnet"))
            time.sleep(0.05)
        before = len(load.echoed)
        time.sleep(1.0)
        assert len(load.echoed) - before > 100          # the stream goes on from the target
        assert w["hostd"].api().get("/v1/vms/mnet").json()["state"] == "stopped"
        assert b["hostd"].api().get("/v1/vms/mnet").json()["state"] == "running"
    finally:
        load.stop()
        cleanup(w, b, "mnet")
