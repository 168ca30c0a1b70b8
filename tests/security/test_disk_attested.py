"""The sealed disk on the owner's path: key released by the broker to the attested core.

No test-mode key here: the owner signs blkbench with the devices blk and rng, makes the
disk with the VM's key (`sealvm disk create --owner --vm`), and the broker releases that
key to the measured core.  Attacks: the host hands over another VM's disk (refused at
start: its superblock does not verify under this VM's key), or withholds the disk
(refused: the manifest names a disk device).  Control: the owner's own disk works and
the owner's export reads back what the guest wrote.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import guest_image, needs_kvm
from tests.diskrun import pattern
from tests.security.harness import start_broker
from tests.security.test_measured_boot import cli

pytestmark = needs_kvm
CMDLINE = "tests=seqwrite,seqread qd=8 count=32 seed=11"


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    base = tmp_path_factory.mktemp("owner")
    d = base / "o"
    assert cli("owner", "init", str(d)).returncode == 0
    for name in ("demo", "other"):
        r = cli("owner", "sign", "--dir", str(d), str(guest_image("blkbench")), "--name", name,
                "--cmdline", CMDLINE, "--devices", "blk,rng")
        assert r.returncode == 0, r.stderr
    m = json.loads(cli("measure").stdout)
    for kind, value in (("host", m["host_pub"]), ("core", m["core_measurement"])):
        assert cli("owner", "policy", "--dir", str(d), "add", kind, value).returncode == 0
    disks = {}
    for name in ("demo", "other"):
        disks[name] = base / f"{name}.img"
        r = cli("disk", "create", "4M", "-o", str(disks[name]), "--owner", str(d), "--vm", name)
        assert r.returncode == 0, r.stderr
    broker, url = start_broker(d)
    yield {"dir": d, "url": url, "disks": disks, "base": base}
    broker.terminate()
    broker.wait(10)


def run(owner, *disk: str):
    return cli("run", str(guest_image("blkbench")), "--cmdline", CMDLINE,
               "--manifest", str(owner["dir"] / "vms" / "demo"), "--broker", owner["url"],
               *disk, timeout=120)


def test_control_the_owners_disk_gets_its_key_and_keeps_the_data(owner):
    r = run(owner, "--disk", str(owner["disks"]["demo"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "keys released" in r.stderr and "mismatches=0" in r.stdout
    assert "INSECURE" not in r.stderr                       # no test-mode key on this path
    out = owner["base"] / "plain.raw"
    r = cli("disk", "export", str(owner["disks"]["demo"]), "-o", str(out),
            "--owner", str(owner["dir"]), "--vm", "demo")
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert all(data[u * 4096:(u + 1) * 4096] == pattern(11, u) for u in range(32))


@pytest.mark.attack(adversary='host storage', asset='sealed disk',
                    technique="hand over another VM's sealed disk",
                    defence='per-VM disk key from the broker',
                    outcome="refused at start: 'superblock MAC does not verify'",
                    control='test_control_the_owners_disk_gets_its_key_and_keeps_the_data', baseline=True)
def test_another_vms_disk_is_refused(owner):
    r = run(owner, "--disk", str(owner["disks"]["other"]))
    assert r.returncode == 125 and "disk refused" in r.stderr, r.stderr
    assert "superblock MAC does not verify" in r.stderr


@pytest.mark.attack(adversary='host daemon', asset='sealed disk',
                    technique='start the VM without the disk the manifest names',
                    defence='devices in the measured manifest',
                    outcome='refused at start: devices signed vs measured',
                    control='test_control_the_owners_disk_gets_its_key_and_keeps_the_data', baseline=True)
def test_a_withheld_disk_is_refused(owner):
    r = run(owner)
    assert r.returncode == 125, r.stderr
    assert "devices: signed ['blk', 'rng'], measured ['rng']" in r.stderr
