"""Sealed snapshots against a live host daemon, the owner's broker and real cores.

A VM signed by the owner runs under `sealvm hostd`; the daemon writes its snapshot
and holds it, the owner's broker keeps the VM's newest generation.  Checked: a
restored VM continues exactly where it stopped (the memtouch guest's own checksums
and progress log); every tampering of the file is refused with its kind; an older
snapshot is refused (rollback) and a fenced copy cannot snapshot again, each with a
paired control whose broker has that one check switched off; the guest's secret is
never in the file, and is there once the owner's key opens it (the control).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import guest_image, needs_kvm
from tests.security.owner_world import (MEMTOUCH, OwnerGateway, create, console,  # noqa: F401
                                        generation, host_b, make_disk,
                                        join, read_guest_secret, records, restore, snap_dir,
                                        snapshot, wait_for, world)

pytestmark = needs_kvm


@pytest.mark.functional('snapshot and restore work')
def test_restored_vm_continues_where_it_stopped(world):
    w = world
    vm = create(w, "snap", "memtouch", MEMTOUCH, "snap-a")
    wait_for(w, vm, r"memtouch t=2 ")
    s = snapshot(w, vm, snap_dir(w) / "a.svs")
    assert generation(w, "snap")["generation"] == s["generation"]
    t_at = int(wait_for(w, vm, r"memtouch t=(\d+) ").group(1))
    w["hostd"].api().delete(f"/v1/vms/{vm}")
    r = restore(w, s["path"], "snap", "snap-a2")
    assert r.status_code == 201, r.text
    assert r.json()["generation"] == s["generation"] + 1 == generation(w, "snap")["generation"]
    m = wait_for(w, "snap-a2", r"memtouch t=(\d+) writes=(\d+) sum=0x[0-9a-f]+ (ok|MISMATCH)")
    text = console(w, "snap-a2")
    assert "memtouch base=" not in text, "the guest started afresh instead of continuing"
    again = snapshot(w, "snap-a2", snap_dir(w) / "a2.svs")     # a restored core seals again
    assert again["generation"] == s["generation"] + 2
    assert "MISMATCH" not in text and m.group(3) == "ok"
    first_t = int(re.search(r"memtouch t=(\d+) ", text).group(1))
    assert 2 <= first_t <= t_at + 1, (first_t, t_at)
    w["hostd"].api().delete("/v1/vms/snap-a2")


TAMPER = {
    "flipped ciphertext byte": (lambda r: r[:2] + [r[2][:100] + bytes([r[2][100] ^ 1]) + r[2][101:]] + r[3:], "altered"),
    "swapped chunks": (lambda r: r[:1] + [r[2], r[1]] + r[3:], "reordered"),
    "dropped chunk": (lambda r: r[:2] + r[3:], "reordered"),
    "duplicated chunk": (lambda r: r[:3] + [r[2]] + r[3:], "reordered"),
    "truncated": (lambda r: r[:-2], "truncated"),
    "extended": (lambda r: r + [r[-2]], "extra"),
    "altered manifest": (lambda r: r[:-1] + [r[-1][:-1] + bytes([r[-1][-1] ^ 1])], "altered"),
}


@pytest.fixture(scope="module")
def sealed_snapshot(world):
    """A committed snapshot (the newest) of a VM that is then deleted; restores of
    tampered copies must not use it up."""
    w = world
    vm = create(w, "snap", "memtouch", MEMTOUCH, "snap-t")
    wait_for(w, vm, r"memtouch t=1 ")
    s = snapshot(w, vm, snap_dir(w) / "t.svs")
    w["hostd"].api().delete(f"/v1/vms/{vm}")
    return s


@pytest.mark.attack(adversary='snapshot store', asset='snapshots',
                    technique='tamper with a sealed snapshot file',
                    defence='AEAD chunk set',
                    outcome='restore refused, the kind named',
                    control='test_control_the_untampered_snapshot_restores', baseline=True, variants=True)
@pytest.mark.parametrize("name", list(TAMPER))
def test_tampered_snapshot_is_refused(world, sealed_snapshot, name):
    w = world
    change, kind = TAMPER[name]
    recs = records(sealed_snapshot["path"].read_bytes())
    assert len(recs) >= 5, "the snapshot should hold several memory chunks"
    n = list(TAMPER).index(name)
    bad = sealed_snapshot["path"].with_name(f"bad-{n}.svs")
    bad.write_bytes(join(change(recs)))
    os.chmod(bad, 0o644)
    before = generation(w, "snap")
    r = restore(w, bad, "snap", f"tamper-{n}")
    assert r.status_code >= 400, r.text
    assert f"({kind})" in r.json()["detail"], r.json()["detail"]
    assert generation(w, "snap") == before, "a refused restore must not move the generation"


def test_control_the_untampered_snapshot_restores(world, sealed_snapshot):
    r = restore(world, sealed_snapshot["path"], "snap", "snap-t2")
    assert r.status_code == 201, r.text
    wait_for(world, "snap-t2", r"memtouch t=\d+ .* ok")
    world["hostd"].api().delete("/v1/vms/snap-t2")


def two_snapshots(w, vm_id: str):
    vm = create(w, "snap", "memtouch", MEMTOUCH, vm_id)
    wait_for(w, vm, r"memtouch t=1 ")
    d = snap_dir(w)
    old = snapshot(w, vm, d / "old.svs")
    new = snapshot(w, vm, d / "new.svs")
    assert new["generation"] == old["generation"] + 1
    return vm, old, new


@pytest.mark.attack(adversary='snapshot store', asset='snapshots',
                    technique='restore an older snapshot (rollback)',
                    defence='broker generation check',
                    outcome='refused: stale generation',
                    control='test_control_older_snapshot_restores_without_the_generation_check')
def test_older_snapshot_is_refused(world):
    vm, old, new = two_snapshots(world, "snap-r")
    r = restore(world, old["path"], "snap", "snap-r2")
    assert r.status_code >= 400 and "rollback" in r.json()["detail"], r.text
    world["hostd"].api().delete(f"/v1/vms/{vm}")


def test_control_older_snapshot_restores_without_the_generation_check(world):
    vm, old, new = two_snapshots(world, "snap-rc")
    r = restore(world, old["path"], "snap", "snap-rc2", broker=world["lax_url"])
    assert r.status_code == 201, r.text
    for v in (vm, "snap-rc2"):
        world["hostd"].api().delete(f"/v1/vms/{v}")


def fenced_source(w, vm_id: str, broker: str) -> tuple[str, Path]:
    vm = create(w, "snap", "memtouch", MEMTOUCH, vm_id, broker)
    wait_for(w, vm, r"memtouch t=1 ")
    d = snap_dir(w)
    s = snapshot(w, vm, d / "s.svs")
    r = restore(w, s["path"], "snap", vm_id + "-copy", broker=broker)
    assert r.status_code == 201, r.text
    return vm, d


@pytest.mark.attack(adversary='host daemon', asset='snapshots',
                    technique='snapshot a fenced (superseded) copy',
                    defence='broker generation check',
                    outcome='refused: fenced',
                    control='test_control_fenced_source_snapshots_without_the_generation_check')
def test_fenced_source_cannot_snapshot_again(world):
    vm, d = fenced_source(world, "snap-f", world["url"])
    r = world["hostd"].cli("snapshot", vm, "--output", str(d / "after.svs"))
    assert r.returncode != 0 and b"fenced" in r.stderr, r.stderr
    assert not (d / "after.svs").exists(), "an uncommitted snapshot must not be left behind"
    for v in (vm, vm + "-copy"):
        world["hostd"].api().delete(f"/v1/vms/{v}")


def test_control_fenced_source_snapshots_without_the_generation_check(world):
    vm, d = fenced_source(world, "snap-fc", world["lax_url"])
    r = world["hostd"].cli("snapshot", vm, "--output", str(d / "after.svs"))
    assert r.returncode == 0, r.stderr
    for v in (vm, vm + "-copy"):
        world["hostd"].api().delete(f"/v1/vms/{v}")


@pytest.mark.attack(adversary='key-broker impostor', asset='snapshots',
                    technique='advance the generation with a ticket under a guessed key',
                    defence='ticket MAC under the snapshot key',
                    outcome="403 'forged'",
                    control='inline', baseline=True)
def test_forged_ticket_is_refused_by_the_broker(world):
    import httpx
    from sealvm.wire import attest as A
    ticket = A.advance_ticket(b"\x01" * 32, "snap", generation(world, "snap")["generation"],
                              b"\x02" * 16, b"\x03" * 16)
    r = httpx.post(world["url"] + "/v1/generation", json={"ticket": ticket.decode()})
    assert r.status_code == 403 and "forged" in r.json()["error"]
    keys = A.parse_vm_keys((world["owner"] / "vms" / "snap" / "keys.json").read_bytes())
    assert A.check_ticket(keys["snapshot"], A.advance_ticket(keys["snapshot"], "snap", 1,
                                                             b"\x02" * 16, b"\x03" * 16))


# ---- another host: its own network namespace and daemon ----------------------------------
@pytest.mark.attack(adversary='host daemon', asset='snapshots',
                    technique='restore on a second host and keep the first copy',
                    defence='generation fencing',
                    outcome='the first copy cannot snapshot: fenced',
                    control='test_control_fenced_source_snapshots_without_the_generation_check')
def test_snapshot_restores_on_another_host_and_fences_the_first(world, host_b):
    w, b = world, host_b
    vm = create(w, "snap", "memtouch", MEMTOUCH, "snap-x", b["url"])
    wait_for(w, vm, r"memtouch t=1 ")
    s = snapshot(w, vm, snap_dir(w) / "x.svs")
    moved = b["hostd"].base / "x.svs"            # what an operator copies between hosts
    shutil.copy(s["path"], moved)
    os.chmod(moved, 0o644)
    r = b["hostd"].api().post("/v1/restore", json=dict(
        snapshot=str(moved), name="snap-x", manifest=str(w["public"] / "vms" / "snap"),
        broker=b["url"], start=True))
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 20
    while "memtouch t=" not in b["hostd"].api().get("/v1/vms/snap-x/console").text:
        assert time.monotonic() < deadline, "the restored VM did not run on host B"
        time.sleep(0.1)
    text = b["hostd"].api().get("/v1/vms/snap-x/console").text
    assert "MISMATCH" not in text and "memtouch base=" not in text
    again = w["hostd"].cli("snapshot", vm, "--output", str(snap_dir(w) / "x2.svs"))
    assert again.returncode != 0 and b"fenced" in again.stderr, again.stderr
    w["hostd"].api().delete(f"/v1/vms/{vm}")
    b["hostd"].api().delete("/v1/vms/snap-x")


@pytest.mark.attack(adversary='snapshot store', asset='snapshots',
                    technique="search the snapshot file for the guest's secret",
                    defence='snapshot sealing',
                    outcome="zero occurrences; the owner's key finds it",
                    control='inline')
def test_guest_secret_is_not_in_the_snapshot(world):
    w = world
    vm = create(w, "secret", "canary", "mib=4 secs=600", "secret-a")
    wait_for(w, vm, "canary ready")
    secret = read_guest_secret(w["hostd"].api().get(f"/v1/vms/{vm}").json()["pid"])
    assert len(secret) == 16 and secret != bytes(16)
    s = snapshot(w, vm, snap_dir(w) / "c.svs")
    data = s["path"].read_bytes()
    assert secret not in data
    # Control: with the owner's key (what the sealing keeps from the host) it is there.
    from sealvm.wire import attest as A, sealed as SL
    keys = A.parse_vm_keys((w["owner"] / "vms" / "secret" / "keys.json").read_bytes())
    plain = b"".join(p for _, p in SL.open_set(keys["snapshot"], "secret", s["generation"],
                                                "snapshot", data, exact=True))
    assert secret in plain
    w["hostd"].api().delete(f"/v1/vms/{vm}")


@pytest.mark.functional('snapshots of a VM with a sealed disk')
def test_vm_with_a_sealed_disk_restores_and_reads_back_what_it_wrote(world):
    """blkbench writes its pattern, sleeps (the snapshot is taken then), and after the
    restore reads every block back through the same sealed disk and checks it."""
    from tests.security.owner_world import BLKBENCH
    w = world
    disk = make_disk(w, "dsk.img", "dsk")
    r = w["hostd"].api().post("/v1/vms", json=dict(
        image=str(guest_image("blkbench")), name="dsk-a", memory_mib=64, cmdline=BLKBENCH,
        start=True, manifest=str(w["public"] / "vms" / "dsk"), broker=w["url"],
        disk=str(disk)))
    assert r.status_code == 201, r.text
    wait_for(w, "dsk-a", "blkbench sleeping")
    s = snapshot(w, "dsk-a", snap_dir(w) / "d.svs")
    w["hostd"].api().delete("/v1/vms/dsk-a")
    r = w["hostd"].api().post("/v1/restore", json=dict(
        snapshot=str(s["path"]), name="dsk-b", manifest=str(w["public"] / "vms" / "dsk"),
        broker=w["url"], start=True, disk=str(disk)))
    assert r.status_code == 201, r.text
    m = wait_for(w, "dsk-b", r"blkbench done errors=(\d+) mismatches=(\d+)", timeout=60)
    assert m.groups() == ("0", "0"), console(w, "dsk-b")
    assert "blkbench seqread" in console(w, "dsk-b")
    assert "blkbench seqwrite" not in console(w, "dsk-b")     # it went on, not started over
    w["hostd"].api().delete("/v1/vms/dsk-b")


@pytest.mark.functional('snapshots of a VM with a sealed network')
def test_vm_with_a_sealed_network_restores_and_echoes_again(world):
    """netecho answers a UDP datagram through the tunnel to the owner's gateway (played by
    the test with the owner's net key); snapshot, restore into a new core: the core makes
    a fresh tunnel session and the guest's driver, in the middle of its loop, echoes again."""
    from tests.e2e.test_net_daemon import LoopbackGateway, udp_frame
    from sealvm.wire import attest as A
    w = world
    keys = A.parse_vm_keys((w["owner"] / "vms" / "netvm" / "keys.json").read_bytes())
    gw = LoopbackGateway(keys["net"])

    def echoes(tag: bytes) -> bool:
        end = time.monotonic() + 20
        while gw.tunnel.current is None:              # handshake from the (new) core
            assert time.monotonic() < end, "no handshake from the core"
            for _ in gw.frames(0.2):
                pass
        for _ in range(20):
            gw.send(udp_frame(tag))
            if any(f.endswith(tag) for f in gw.frames(0.5)):
                return True
        return False

    r = w["hostd"].api().post("/v1/vms", json=dict(
        image=str(guest_image("netecho")), name="net-a", memory_mib=64, cmdline="secs=0",
        start=True, manifest=str(w["public"] / "vms" / "netvm"), broker=w["url"],
        net=f"127.0.0.1:{gw.port}"))
    assert r.status_code == 201, r.text
    assert echoes(b"before the snapshot")
    s = snapshot(w, "net-a", snap_dir(w) / "n.svs")
    w["hostd"].api().delete("/v1/vms/net-a")
    gw.tunnel = type(gw.tunnel)(keys["net"], initiator=False)    # the gateway sees a new peer
    r = w["hostd"].api().post("/v1/restore", json=dict(
        snapshot=str(s["path"]), name="net-b", manifest=str(w["public"] / "vms" / "netvm"),
        broker=w["url"], start=True, net=f"127.0.0.1:{gw.port}"))
    assert r.status_code == 201, r.text
    assert echoes(b"after the restore"), console(w, "net-b")
    w["hostd"].api().delete("/v1/vms/net-b")


class CanaryGateway(OwnerGateway):
    """The owner's gateway for a netecho guest sending "CANARY:FENCE" every second: answers
    its ARP request and records which host-side address each canary came from."""

    def __init__(self, key: bytes, min_generation):
        self.canaries: list[tuple[float, tuple]] = []
        super().__init__(key, min_generation=min_generation)

    def on_frame(self, frame: bytes, peer) -> None:
        from tests.e2e.test_net_daemon import OWNER_IP, OWNER_MAC
        if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x01" and \
                frame[38:42] == OWNER_IP:             # who has the owner's address?
            self.send(frame[22:28] + OWNER_MAC + b"\x08\x06" + frame[14:20] + b"\x00\x02"
                      + OWNER_MAC + OWNER_IP + frame[22:32], peer)
        elif b"CANARY:FENCE" in frame:
            self.canaries.append((time.monotonic(), peer))


@pytest.mark.attack(adversary='host daemon', asset='network',
                    technique='run the old copy after its snapshot was restored',
                    defence='tunnel generation fencing',
                    outcome="the gateway drops the old copy's frames",
                    control='self:fencing=control-no-fencing')
@pytest.mark.parametrize("fencing", [True, False], ids=["fenced", "control-no-fencing"])
def test_the_old_copy_cannot_use_the_network_after_a_restore(world, fencing):
    """Copy A keeps running after its snapshot is restored as copy B (the host runs both).
    The owner's gateway admits only the newest generation: A's frames stop reaching the
    owner's network the moment B's session is up, and A's new handshake is refused as
    fenced.  Control: a gateway without the generation check keeps taking A's frames."""
    from sealvm.owner.gateway import newest_generation
    from sealvm.wire import attest as A
    w = world
    keys = A.parse_vm_keys((w["owner"] / "vms" / "netc" / "keys.json").read_bytes())
    gw = CanaryGateway(keys["net"], newest_generation(w["owner"], "netc") if fencing else None)
    tag = "f" if fencing else "c"
    manifest = str(w["public"] / "vms" / "netc")
    try:
        r = w["hostd"].api().post("/v1/vms", json=dict(
            image=str(guest_image("netecho")), name=f"fence-a{tag}", memory_mib=64,
            cmdline="canary=FENCE secs=0", start=True, manifest=manifest, broker=w["url"],
            net=f"127.0.0.1:{gw.port}"))
        assert r.status_code == 201, r.text
        gw.wait(lambda: len(gw.canaries) >= 2, "no canary from copy A")
        peer_a = gw.canaries[-1][1]
        s = snapshot(w, f"fence-a{tag}", snap_dir(w) / f"fence{tag}.svs")
        assert w["hostd"].api().get(f"/v1/vms/fence-a{tag}").json()["state"] == "running"
        r = w["hostd"].api().post("/v1/restore", json=dict(
            snapshot=str(s["path"]), name=f"fence-b{tag}", manifest=manifest, broker=w["url"],
            start=True, net=f"127.0.0.1:{gw.port}"))
        assert r.status_code == 201, r.text
        gw.wait(lambda: any(p != peer_a for _, p in gw.canaries), "no canary from copy B")
        switch = next(t for t, p in gw.canaries if p != peer_a) + 0.5
        if fencing:
            # A hears nothing more, hands its session up after 15 s and handshakes again.
            gw.wait(lambda: gw.tunnel.stats["drop_fenced"] >= 1, "A never tried again", 30)
            assert not [t for t, p in gw.canaries if p == peer_a and t > switch]
            assert gw.tunnel.stats["drop_session"] >= 1     # A's frames under its old session
            assert any(p != peer_a and t > switch for t, p in gw.canaries)   # B goes on
        else:
            gw.wait(lambda: any(p == peer_a and t > switch for t, p in gw.canaries),
                    "the control: A's frames should still get through", 15)
    finally:
        gw.stop()
        for n in (f"fence-a{tag}", f"fence-b{tag}"):
            w["hostd"].api().delete(f"/v1/vms/{n}")


@pytest.fixture(scope="module")
def lax_disk_host(world):
    """A second daemon on this host whose cores run with the one disk defence the control
    switches off (disk_fencing), in test mode; the owner's broker is the same."""
    from tests.conftest import environ
    from tests.e2e.conftest import Hostd
    base = world["base"] / "lax-host"
    base.mkdir(mode=0o755)
    with environ(SEALVM_TEST_MODE="1", SEALVM_INSECURE_TEST_DISABLE="disk_fencing"):
        h = Hostd(base, "64600-64649")
    yield h
    h.close()


@pytest.mark.attack(adversary='host daemon', asset='sealed disk',
                    technique='let the old copy keep writing after a restore',
                    defence='disk_fencing',
                    outcome="the old copy's writes fail 'fenced'",
                    control='self:fencing=control-no-fencing')
@pytest.mark.parametrize("fencing", [True, False], ids=["fenced", "control-no-fencing"])
def test_the_old_copy_cannot_write_the_disk_after_a_restore(world, lax_disk_host, fencing):
    """Copy A is in the middle of 40,000 random writes to its sealed disk when its snapshot
    is restored as copy B on the same disk (shared storage).  B claims the disk as it
    opens: every write A makes from then on is refused (its guest gets I/O errors, its
    core says `fenced`), and B finishes and reads every block back intact.  Control: with
    disk fencing off in the cores, A goes on writing to the disk B owns, and the two
    copies' writes land in each other's slots (tampering detected: the split brain)."""
    from tests.security.owner_world import DISK_LOAD
    w, tag = world, "f" if fencing else "c"
    host = w["hostd"] if fencing else lax_disk_host
    disk = make_disk(w, f"fence-{tag}.img", "dskload")
    manifest = str(w["public"] / "vms" / "dskload")
    r = host.api().post("/v1/vms", json=dict(
        image=str(guest_image("blkbench")), name=f"dfa{tag}", memory_mib=64, cmdline=DISK_LOAD,
        start=True, manifest=manifest, broker=w["url"], disk=str(disk)))
    assert r.status_code == 201, r.text
    hw = dict(w, hostd=host)                     # the owner's world, on this daemon
    wait_for(hw, f"dfa{tag}", "blkbench seqwrite", 60)
    out = Path(tempfile.mkdtemp(dir=w["base"]))
    shutil.chown(out, 63970, 63970)
    snap = host.cli("snapshot", f"dfa{tag}", "--output", str(out / "s.svs"))
    assert snap.returncode == 0, snap.stderr
    r = host.api().post("/v1/restore", json=dict(
        snapshot=str(out / "s.svs"), name=f"dfb{tag}", manifest=manifest, broker=w["url"],
        start=True, disk=str(disk)))
    assert r.status_code == 201, r.text
    b = wait_for(hw, f"dfb{tag}", r"blkbench done errors=(\d+) mismatches=(\d+)", 120)
    a = wait_for(hw, f"dfa{tag}", r"blkbench done errors=(\d+) mismatches=(\d+)", 120)
    log = (host.state / "vms" / f"dfa{tag}" / "core.log").read_text(errors="replace")
    if fencing:
        assert b.groups() == ("0", "0"), console(hw, f"dfb{tag}")[-1500:]
        assert "ioerr op=write" in console(hw, f"dfa{tag}")
        assert int(a.group(1)) > 0 and "fenced" in log, log[-2000:]
    else:       # the old copy went on writing to the disk B owns: each damages the other
        assert re.search(r"blkbench randwrite .* errors=0 ", console(hw, f"dfa{tag}"))
        assert "fenced" not in log
        logs = log + (host.state / "vms" / f"dfb{tag}" / "core.log").read_text(errors="replace")
        assert "TAMPERING DETECTED" in logs
    for n in (f"dfa{tag}", f"dfb{tag}"):
        host.api().delete(f"/v1/vms/{n}")
