"""Attacks on measured boot and key release, against the real launcher, core, preboot and broker.

Each test runs `sealvm run` with the owner's manifest against a live broker
and asserts that no key was released and both sides say why; each has a
paired control that removes only the one thing the defence looks at and
shows the VM then gets its keys. Tampering with the code the core loads is
done in a copy of the project, so the checkout under test is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, guest_image, needs_kvm
from tests.security.harness import start_broker

pytestmark = needs_kvm
GOOD_CMDLINE = "greeting=owner"


def cli(*args, cwd=ROOT, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sealvm.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """An owner with a signed hello guest, a policy trusting this host, and a live broker."""
    d = tmp_path_factory.mktemp("owner") / "o"
    assert cli("owner", "init", str(d)).returncode == 0
    r = cli("owner", "sign", "--dir", str(d), str(guest_image("hello")), "--name", "demo",
            "--cmdline", GOOD_CMDLINE)
    assert r.returncode == 0, r.stderr
    m = json.loads(cli("measure").stdout)
    for kind, value in (("host", m["host_pub"]), ("core", m["core_measurement"])):
        assert cli("owner", "policy", "--dir", str(d), "add", kind, value).returncode == 0
    broker, url = start_broker(d)
    yield {"dir": d, "url": url, "measurement": m["core_measurement"]}
    broker.terminate()
    broker.wait(10)


def run_vm(owner, *, cmdline=GOOD_CMDLINE, image=None, manifest=None, cwd=ROOT):
    return cli("run", str(image or guest_image("hello")), "--cmdline", cmdline,
               "--manifest", str(manifest or owner["dir"] / "vms" / "demo"),
               "--broker", owner["url"], cwd=cwd)


def broker_log(owner) -> list[dict]:
    return [json.loads(l) for l in (owner["dir"] / "broker.log").read_text().splitlines()]


def released(r) -> bool:
    return r.returncode == 0 and "keys released" in r.stderr and "HELLO" in r.stdout


def test_control_the_genuine_vm_gets_its_keys(owner):
    r = run_vm(owner)
    assert released(r), r.stderr
    assert broker_log(owner)[-1]["event"] == "release"


@pytest.mark.attack(adversary='host operator', asset='launcher',
                    technique="boot an altered guest image under the owner's manifest",
                    defence='manifest check at the broker',
                    outcome="no keys (exit 125): 'image_sha256: signed ...'",
                    control='test_control_the_genuine_vm_gets_its_keys', baseline=True)
def test_altered_guest_image_is_refused(owner, tmp_path):
    image = tmp_path / "hello.elf"
    data = bytearray(guest_image("hello").read_bytes())
    data[-1] ^= 1
    image.write_bytes(bytes(data))
    r = run_vm(owner, image=image)
    assert r.returncode == 125 and not released(r)
    assert "image_sha256: signed" in r.stderr


@pytest.mark.attack(adversary='host operator', asset='launcher',
                    technique='boot with another command line',
                    defence='manifest check at the broker',
                    outcome="no keys: 'cmdline: signed ..., measured ...'",
                    control='test_control_the_genuine_vm_gets_its_keys', baseline=True)
def test_altered_command_line_is_refused(owner):
    r = run_vm(owner, cmdline="greeting=intruder")
    assert r.returncode == 125 and not released(r)
    assert "cmdline: signed 'greeting=owner', measured 'greeting=intruder'" in r.stderr


@pytest.mark.attack(adversary='host operator', asset='launcher',
                    technique='edit the manifest, unsigned or with a forged signature',
                    defence='owner signature on the manifest',
                    outcome="'owner manifest refused' (exit 125)",
                    control='test_control_the_genuine_vm_gets_its_keys', baseline=True, variants=True)
@pytest.mark.parametrize("how", ["unsigned", "forged"])
def test_manifest_without_the_owners_signature_is_refused(owner, tmp_path, how):
    d = tmp_path / "vms" / "demo"
    shutil.copytree(owner["dir"] / "vms" / "demo", d)
    m = json.loads((d / "manifest.json").read_text())
    m["cmdline"] = "greeting=intruder"
    (d / "manifest.json").write_text(json.dumps(m, sort_keys=True, separators=(",", ":")))
    if how == "unsigned":
        (d / "manifest.json.sig").write_bytes(b"")
    r = cli("run", str(guest_image("hello")), "--cmdline", "greeting=intruder", "--manifest",
            str(d), "--owner-pub", str(owner["dir"] / "owner.pub.json"), "--broker", owner["url"])
    assert r.returncode == 125 and not released(r)
    assert "owner manifest refused" in r.stderr


def world_readable_dir() -> Path:
    """A directory the VM's core (its own uid) can read: pytest's tmp dirs are 0700."""
    d = Path(tempfile.mkdtemp(prefix="sealvm-tree-", dir="/tmp"))
    os.chmod(d, 0o755)
    return d


@pytest.fixture(scope="module")
def project_copy():
    """A copy of the project (same interpreter and venv) whose core files can be altered."""
    dst = world_readable_dir()
    shutil.copytree(ROOT / "sealvm", dst / "sealvm")
    yield dst
    shutil.rmtree(dst, ignore_errors=True)


def forge_pyc(tree: Path, module: str) -> Path:
    """The attacker's bytecode under an intact checked-hash header: Python accepts it,
    because the header still carries the hash of the untouched source."""
    import importlib._bootstrap_external as ext
    import importlib.util
    src_path = tree / f"sealvm/core/{module}.py"
    source = src_path.read_bytes()
    evil = compile(source + b"\nATTACKER = True\n", str(src_path), "exec")
    pyc = Path(importlib.util.cache_from_source(str(src_path)))
    pyc.write_bytes(ext._code_to_hash_pyc(evil, importlib.util.source_hash(source), True))
    return pyc


@pytest.mark.functional('baseline: an unaltered copy of the core measures the same')
def test_control_an_unaltered_copy_of_the_project_measures_the_same(owner, project_copy):
    assert json.loads(cli("measure", cwd=project_copy).stdout)["core_measurement"] == \
        owner["measurement"]


@pytest.mark.attack(adversary='host operator', asset='launcher',
                    technique="alter the core's code (.py or a forged .pyc)",
                    defence='launcher measures core sources and bytecode',
                    outcome='a different core measurement: no keys',
                    control='test_control_forged_bytecode_runs_when_only_the_header_is_checked', variants=True)
@pytest.mark.parametrize("what", ["pyc", "py"])
def test_altered_core_code_fails_attestation(owner, project_copy, what):
    tree = world_readable_dir()
    try:
        shutil.copytree(project_copy / "sealvm", tree / "sealvm")
        if what == "pyc":
            forge_pyc(tree, "machine")
        else:
            target = tree / "sealvm/core/machine.py"
            target.write_bytes(target.read_bytes() + b"\nATTACKER = True\n")
        r = run_vm(owner, cwd=tree)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    assert not released(r)
    assert "core measurement" in r.stderr and "not in policy" in r.stderr, r.stderr
    assert broker_log(owner)[-1]["event"] == "refused"


def test_control_forged_bytecode_runs_when_only_the_header_is_checked(project_copy):
    """What the measurement defends against: Python itself runs the forged .pyc."""
    tree = world_readable_dir()
    try:
        shutil.copytree(project_copy / "sealvm", tree / "sealvm")
        forge_pyc(tree, "machine")
        r = subprocess.run([sys.executable, "-I", "-S", "-B", "-c",
                            "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import sealvm.core.machine as m; print(getattr(m, 'ATTACKER', False))",
                            str(tree)], capture_output=True, text=True, timeout=30)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    assert r.stdout.strip() == "True", r.stderr


@pytest.mark.functional('the attested path through the host daemon')
def test_daemon_boots_an_attested_vm_and_refuses_an_unsigned_one(owner, tmp_path):
    """The same flow through `sealvm hostd` and `sealvm vm create --manifest`."""
    from tests.e2e.conftest import Hostd
    public = world_readable_dir()            # the manifest and public keys are not secret
    try:
        shutil.copytree(owner["dir"] / "vms" / "demo", public / "demo")
        shutil.copy(owner["dir"] / "owner.pub.json", public / "owner.pub.json")
        for p in public.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        hd = Hostd(world_readable_dir(), "64500-64599")
        try:
            args = ["--manifest", str(public / "demo"), "--owner-pub",
                    str(public / "owner.pub.json"), "--broker", owner["url"], "--start"]
            r = hd.cli("create", str(guest_image("hello")), "--name", "att", "--cmdline",
                       GOOD_CMDLINE, *args)
            assert r.returncode == 0, r.stderr
            deadline = time.monotonic() + 20
            while b"HELLO" not in hd.cli("console", "att").stdout and time.monotonic() < deadline:
                time.sleep(0.1)
            assert b"HELLO" in hd.cli("console", "att").stdout
            assert b"attestation: attested to" in hd.cli("logs", "att").stdout
            r = hd.cli("create", str(guest_image("hello")), "--name", "bad", "--cmdline",
                       "greeting=intruder", *args)
            assert r.returncode != 0 and b"cmdline: signed" in r.stderr
        finally:
            hd.close()
    finally:
        shutil.rmtree(public, ignore_errors=True)


needs_venv = pytest.mark.skipif(not (ROOT / ".venv" / "pyvenv.cfg").exists(),
                                reason="needs the project's .venv (make test creates it)")


def env_with_python(tamper: bool) -> Path:
    """A virtual environment like the project's whose interpreter is a copy of the real one,
    with bytes appended when `tamper` (ELF ignores them: it still runs, but hashes differently)."""
    venv = world_readable_dir()
    (venv / "bin").mkdir()
    (venv / "lib" / "python3.11").mkdir(parents=True)
    shutil.copy(ROOT / ".venv" / "pyvenv.cfg", venv / "pyvenv.cfg")
    os.symlink(ROOT / ".venv" / "lib" / "python3.11" / "site-packages",
               venv / "lib" / "python3.11" / "site-packages")
    python = venv / "bin" / "python3"
    shutil.copy(os.path.realpath(sys.executable), python)
    if tamper:
        with open(python, "ab") as f:
            f.write(b"\0sealvm-test-tamper")
    return venv


@pytest.mark.attack(adversary='host operator', asset='launcher',
                    technique='replace the Python interpreter',
                    defence='launcher measures the interpreter',
                    outcome='a different measurement: no keys',
                    control='self:tamper=control-copy', baseline=True)
@needs_venv
@pytest.mark.parametrize("tamper", [True, False], ids=["altered-interpreter", "control-copy"])
def test_altered_interpreter_fails_attestation(owner, tamper):
    venv = env_with_python(tamper)
    try:
        r = subprocess.run([str(venv / "bin" / "python3"), "-m", "sealvm.cli", "run",
                            str(guest_image("hello")), "--cmdline", GOOD_CMDLINE, "--manifest",
                            str(owner["dir"] / "vms" / "demo"), "--broker", owner["url"]],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(venv, ignore_errors=True)
    if tamper:
        assert not released(r) and "not in policy" in r.stderr, r.stderr
    else:
        assert released(r), r.stderr


@pytest.mark.attack(adversary='host operator', asset='launcher',
                    technique="add a .pth file to the core's environment",
                    defence='launcher measures site-packages .pth files',
                    outcome='a different measurement: no keys',
                    control='self:add_pth=control-none', baseline=True)
@needs_venv
@pytest.mark.parametrize("add_pth", [True, False], ids=["new-pth-file", "control-none"])
def test_a_new_pth_file_in_the_environment_fails_attestation(owner, add_pth):
    pth = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "zz-sealvm-test.pth"
    try:
        if add_pth:
            pth.write_text("# a .pth file the core never runs, but it changes the environment\n")
        r = run_vm(owner)
    finally:
        pth.unlink(missing_ok=True)
    if add_pth:
        assert not released(r) and "not in policy" in r.stderr, r.stderr
    else:
        assert released(r), r.stderr


# ---- a Linux guest: the kernel and its initrd are measured together ----------------------
# This machine's KVM cannot run the kernel, but the attestation and key release happen before
# the guest's first instruction, so the refusal (and the control's release) is real here.
LINUX_CMDLINE = "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 pci=off"


@pytest.fixture(scope="module")
def linux_owner(owner, tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests" / "linux"))
    import nested
    d = tmp_path_factory.mktemp("linux")
    kernel, initrd = nested.debian_kernel(), d / "initrd"
    initrd.write_bytes(b"an initramfs the owner signed\n" * 100)
    r = cli("owner", "sign", "--dir", str(owner["dir"]), "--kernel", str(kernel), "--initrd",
            str(initrd), "--name", "lx", "--memory", "512M", "--cmdline", LINUX_CMDLINE)
    assert r.returncode == 0, r.stderr
    return {**owner, "kernel": kernel, "initrd": initrd, "tmp": d}


def run_linux(o, kernel, initrd, timeout=60) -> tuple[int, str]:
    """`sealvm run --kernel` under the owner's manifest, until the keys are released (then
    stopped with SIGINT: the kernel cannot run on this KVM) or the run ends."""
    p = subprocess.Popen([sys.executable, "-m", "sealvm.cli", "run", "--kernel", str(kernel),
                          "--initrd", str(initrd), "-m", "512M", "--cmdline", LINUX_CMDLINE,
                          "--manifest", str(o["dir"] / "vms" / "lx"), "--broker", o["url"]],
                         cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.monotonic() + timeout
    try:
        for line in p.stderr:
            lines.append(line)
            if "keys released" in line or time.monotonic() > deadline:
                p.send_signal(2)
                break
        lines += p.stderr.read().splitlines(keepends=True)
        return p.wait(30), "".join(lines)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.functional("baseline: the signed Linux kernel and initrd get their keys")
def test_control_the_signed_linux_kernel_and_initrd_get_their_keys(linux_owner):
    rc, err = run_linux(linux_owner, linux_owner["kernel"], linux_owner["initrd"])
    assert "keys released: disk, net, snapshot" in err, err
    assert broker_log(linux_owner)[-1]["event"] == "release"


@pytest.mark.attack(adversary='host operator', asset='launcher',
                    technique="boot the owner's Linux kernel with another initrd, or another "
                              "kernel with the owner's initrd",
                    defence='kernel and initrd measured as one image',
                    outcome="no keys (exit 125): 'image_sha256: signed ...'",
                    control='test_control_the_signed_linux_kernel_and_initrd_get_their_keys',
                    baseline=True, variants=True)
@pytest.mark.parametrize("swap", ["initrd", "kernel"])
def test_swapped_linux_initrd_or_kernel_is_refused(linux_owner, swap):
    kernel, initrd = linux_owner["kernel"], linux_owner["initrd"]
    evil = linux_owner["tmp"] / f"evil-{swap}"
    data = bytearray((initrd if swap == "initrd" else kernel).read_bytes())
    data[-1] ^= 1                       # one bit: a kernel that still boots, an initrd's tail
    evil.write_bytes(bytes(data))
    before = len(broker_log(linux_owner))
    rc, err = run_linux(linux_owner, evil if swap == "kernel" else kernel,
                        evil if swap == "initrd" else initrd)
    assert rc == 125 and "keys released" not in err, err
    assert "image_sha256: signed" in err
    assert all(e["event"] != "release" for e in broker_log(linux_owner)[before:])
