"""Run sealvm on a real Linux guest inside an outer VM (QEMU TCG with emulated SVM).

This machine's KVM cannot run an unmodified Linux kernel, but QEMU's software
CPU (`-cpu max`) emulates AMD SVM: a Debian cloud kernel in the outer VM loads
kvm_amd, and sealvm runs there on a real /dev/kvm.

    image = outer_image()                  # cached, keyed on its inputs (~1.5 min cold)
    job = Job(image)                       # what the outer VM runs
    job.add_guest_initrd("hello.cpio.gz", HELLO_INIT)
    job.script = "sealvm run --kernel vmlinuz --initrd hello.cpio.gz"
    out = job.run(timeout=300)             # the outer console; run.sh's status in out.rc

Inside, the job directory is /job: sealvm's source (with checked bytecode),
`sealvm` on PATH, the guest kernel as /job/vmlinuz and whatever was added.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import sysconfig
import tarfile
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "nested-image.sh"
CACHE = Path(os.environ.get("SEALVM_CACHE", "/var/cache/sealvm"))
DEFAULT_KERNEL_PACKAGE = "linux-image-6.1.0-56-cloud-amd64"
GUEST_MODULES = ("kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
                 "kernel/drivers/virtio/virtio_mmio.ko", "kernel/drivers/char/hw_random/virtio-rng.ko")

# /init of the guest: load the virtio modules (virtio_mmio finds its devices in
# the ACPI tables), read the virtio-rng device, print a marker, power off.
HELLO_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
UP=$(cut -d' ' -f1 /proc/uptime)
echo "GUEST-INIT uptime=$UP"
insmod /lib/virtio_ring.ko && insmod /lib/virtio.ko && insmod /lib/virtio_mmio.ko \
    && insmod /lib/virtio-rng.ko || echo "GUEST-ERROR insmod failed"
for i in $(seq 50); do [ -c /dev/hwrng ] && break; sleep 0.1; done
RNG=$(od -An -tx1 -N16 /dev/hwrng | tr -d ' \n')
echo "GUEST-MARKER cpus=$(nproc) online=$(cat /sys/devices/system/cpu/online) rng=$RNG source=$(cat /sys/class/misc/hw_random/rng_current) kernel=$(uname -r)"
poweroff -f
"""

# /init that dies: the kernel panics ("Attempted to kill init!").
PANIC_INIT = r"""#!/bin/busybox sh
echo "GUEST-PANIC-NEXT"
exit 3
"""


def kernel_package() -> str:
    """The cloud kernel package the Debian metapackage points at (this machine's apt lists)."""
    try:
        out = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], text=True,
                             capture_output=True, timeout=60).stdout
        m = re.search(r"Depends: (linux-image-[0-9][^\s]*-cloud-amd64)", out)
        if m:
            return m.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return DEFAULT_KERNEL_PACKAGE


def debian_kernel(package: str | None = None) -> Path:
    """The cloud kernel's bzImage alone (apt-get download, cached per package)."""
    package = package or kernel_package()
    out = CACHE / f"kernel-{package}" / "vmlinuz"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, check=True,
                       capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
        kv = package[len("linux-image-"):]
        shutil.copy(f"{tmp}/x/boot/vmlinuz-{kv}", f"{out}.tmp")
        os.chmod(f"{out}.tmp", 0o644)
        os.replace(f"{out}.tmp", out)
    return out


def decompress_payload(bzimage: bytes) -> bytes:
    """The bzImage's compressed payload (setup header: payload_offset/length), decompressed.

    That is the kernel's vmlinux ELF (symbols stripped, relocations appended).
    gzip and xz with Python's own modules; lz4 (Debian's cloud kernels: the
    legacy frame Linux writes) and zstd with the Debian tools of those names.
    """
    setup_end = ((bzimage[0x1F1] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    payload = bzimage[setup_end + offset:setup_end + offset + length]
    if payload[:2] == b"\x1f\x8b":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if payload[:6] == b"\xfd7zXZ\0":
        return lzma.LZMADecompressor().decompress(payload)
    tools = {b"\x02\x21\x4c\x18": "lz4", b"\x28\xb5\x2f\xfd": "zstd"}
    tool = tools.get(payload[:4])
    if tool is None:
        raise ValueError(f"unknown kernel compression (payload starts {payload[:6].hex()})")
    # Linux appends the uncompressed size (4 bytes) after the compressed stream.
    return subprocess.run([tool, "-dc"], input=payload[:-4], capture_output=True,
                          check=True).stdout


def debian_vmlinux(package: str | None = None) -> Path:
    """The cloud kernel's vmlinux ELF, taken out of its bzImage (cached per package)."""
    bz = debian_kernel(package)
    out = bz.parent / "vmlinux"
    if not out.exists():
        data = decompress_payload(bz.read_bytes())
        if data[:4] != b"\x7fELF":
            raise ValueError(f"{bz}: the decompressed payload is not an ELF file")
        out.with_suffix(".tmp").write_bytes(data)
        os.chmod(out.with_suffix(".tmp"), 0o644)
        os.replace(out.with_suffix(".tmp"), out)
    return out


def outer_image(package: str | None = None) -> Path:
    """The outer image directory, built once per (kernel package, build script)."""
    package = package or kernel_package()
    key = hashlib.sha256(package.encode() + b"\0" + SCRIPT.read_bytes()).hexdigest()[:16]
    out = CACHE / f"nested-{key}"
    if (out / "kernel-version").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"nested-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)           # one build at a time; others wait for it
        if not (out / "kernel-version").exists():
            print(f"building the outer image for the nested Linux tests in {out} (~1.5 min)",
                  flush=True)
            subprocess.run([str(SCRIPT), package, str(out)], check=True)
    return out


CONSOLE_NODE = (0o20600, b"", (5, 1))      # /dev/console: the kernel opens it for init


def _cpio_newc(files: dict[str, tuple]) -> bytes:
    """A newc cpio archive of {path: (mode, data[, (rdev major, minor)])}."""
    out = io.BytesIO()
    for ino, (name, entry) in enumerate(list(files.items()) + [("TRAILER!!!", (0, b""))], 1):
        mode, data = entry[:2]
        rdev = entry[2] if len(entry) > 2 else (0, 0)
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(raw), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4) + data + b"\0" * (-len(data) % 4))
    return out.getvalue()


def _with_libraries(paths: tuple[str, ...]) -> dict[str, bytes]:
    """{path inside the initramfs: bytes} of these host programs (under usr/bin; run them by
    that full path, as busybox's shell prefers its own applets to anything on PATH) and the libraries (and the dynamic loader) `ldd`
    says they need, at the same paths (this host is Debian too)."""
    out: dict[str, bytes] = {}
    for prog in paths:
        real = shutil.which(prog) or prog
        out[f"usr/bin/{Path(prog).name}"] = Path(real).read_bytes()
        ldd = subprocess.run(["ldd", real], capture_output=True, text=True, check=True).stdout
        for lib in re.findall(r"(?:=> )?(/\S+) \(0x", ldd):
            out[lib.lstrip("/")] = Path(lib).resolve().read_bytes()
    return out


def guest_initrd(image: Path, init: str, modules: tuple[str, ...] = (),
                 programs: tuple[str, ...] = (), extra: dict[str, bytes] | None = None) -> bytes:
    """A gzip'd initramfs: static busybox, the guest's virtio modules (and `modules`, paths
    under the kernel's module tree), `programs` from this host with their libraries, the
    `extra` files ({path: bytes}, e.g. etc/mke2fs.conf; executable under bin/ and usr/bin/)
    and `init`."""
    kv = (image / "kernel-version").read_text().strip()
    mods = image / "modules" / kv
    files: dict[str, tuple[int, bytes]] = {d: (0o40755, b"") for d in
                                           ("bin", "dev", "proc", "sys", "lib", "mnt", "etc")}
    files["dev/console"] = CONSOLE_NODE
    files["bin/busybox"] = (0o100755, Path("/bin/busybox").read_bytes())
    for rel in GUEST_MODULES + modules:
        files[f"lib/{Path(rel).name}"] = (0o100644, (mods / rel).read_bytes())
    for path, data in _with_libraries(programs).items():
        for i in range(1, path.count("/") + 1):          # parent directories first
            files.setdefault("/".join(path.split("/")[:i]), (0o40755, b""))
        files[path] = (0o100755, data)
    for path, data in (extra or {}).items():
        for i in range(1, path.count("/") + 1):
            files.setdefault("/".join(path.split("/")[:i]), (0o40755, b""))
        files[path] = (0o100755 if path.startswith(("bin/", "usr/bin/")) else 0o100644, data)
    files["init"] = (0o100755, init.encode())
    return gzip.compress(_cpio_newc(files), compresslevel=1, mtime=0)


@dataclass
class Outcome:
    rc: int | None          # run.sh's status (None: the outer VM never reported one)
    console: str            # everything the outer VM printed

    def section(self, name: str) -> tuple[int | None, str]:
        """(status, output) of one `scenario NAME ...` step of run.sh."""
        m = re.search(rf"=== BEGIN {re.escape(name)}\n(.*?)=== END {re.escape(name)} rc=(\d+)",
                      self.console, re.S)
        return (int(m.group(2)), m.group(1)) if m else (None, "")


# uds.py, for job scripts: GET from a host daemon's UNIX socket with the standard library
# only (each `sealvm vm ...` call would start a Python with httpx, seconds of TCG time).
UDS_PY = r"""
import http.client, socket
class _Conn(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("sealvm", timeout=30)
        self.path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path)
def get(sock, path):
    # (status, body text) of GET path on the daemon at sock; (0, error) if it is not there
    c = _Conn(sock)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)
    finally:
        c.close()
"""


# dump.py, for job scripts when a step is stuck: every sealvm process (daemons, cores)
# writes its threads' stacks to its log (SIGUSR1, faulthandler); then the logs' tails.
DUMP_PY = r"""
import glob, os, signal, time
for d in glob.glob("/proc/[0-9]*"):
    try:
        cmd = open(d + "/cmdline", "rb").read()
        if b"sealvm" in cmd and (b"hostd" in cmd or b"sealvm.core" in cmd):
            os.kill(int(d[6:]), signal.SIGUSR1)
    except OSError:
        pass
time.sleep(2)
for path in sorted(glob.glob("/run/hostd-*.log") + glob.glob("/run/sealvm-launcher/*.log")
                   + glob.glob("/run/*/state/**/*.log", recursive=True)):
    print(f"----- {path}")
    print(open(path, errors="replace").read()[-6000:])
"""


RUN_SH_HEAD = """#!/bin/sh
export PATH=/job/bin:$PATH PYTHONDONTWRITEBYTECODE=1
scenario() {  # NAME COMMAND...: run it, bracket its output, status and seconds for the test
    name=$1; shift
    echo "=== BEGIN $name"
    t0=$(date +%s)
    "$@" 2>&1
    rc=$?
    echo "=== END $name rc=$rc s=$(($(date +%s) - t0))"
}
"""


class Job:
    """The files and script one outer-VM run carries (a raw tar on its second disk)."""

    def __init__(self, image: Path, name: str = "job"):
        self.image = image
        self.name = name                    # of the console log, /tmp/sealvm-nested-NAME.console
        self.files: dict[str, bytes] = {}
        self.script = ""

    def add(self, name: str, data: bytes) -> None:
        self.files[name] = data

    def _tar(self, path: Path) -> None:
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            def add_bytes(name: str, data: bytes, mode: int = 0o644) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
            src = ROOT / "sealvm"
            for p in sorted(src.rglob("*")):
                if p.is_file() and (p.suffix == ".py" or p.suffix == ".pyc"):
                    add_bytes(f"src/{p.relative_to(ROOT)}", p.read_bytes())
            # the cryptography the venv has (Debian 12's python3-cryptography is older)
            site = Path(sysconfig.get_path("purelib", vars={"base": str(ROOT / ".venv")}))
            for p in [*site.glob("_cffi_backend*.so"), *(site / "cffi").rglob("*"),
                      *(site / "cryptography").rglob("*")]:
                if p.is_file() and "__pycache__" not in p.parts:
                    add_bytes(f"src/{p.relative_to(site)}", p.read_bytes())
            add_bytes("bin/sealvm", b"#!/bin/sh\nPYTHONPATH=/job/src exec python3 -m sealvm.cli "
                      b"\"$@\"\n", 0o755)
            add_bytes("vmlinuz", (self.image / "vmlinuz").read_bytes())
            for name, data in self.files.items():
                add_bytes(name, data, 0o755 if name.endswith((".sh", ".py")) else 0o644)
            add_bytes("uds.py", UDS_PY.encode())
            add_bytes("dump.py", DUMP_PY.encode())
            add_bytes("run.sh", (RUN_SH_HEAD + self.script).encode(), 0o755)

    def run(self, timeout: float = 600, memory: str = "2048", smp: int = 1) -> Outcome:
        """Boot the outer VM on this job; return its console and run.sh's status."""
        if shutil.which("qemu-system-x86_64") is None:
            raise RuntimeError("qemu-system-x86_64 is missing (make deps installs it)")
        subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "compileall", "-q",
                        "--invalidation-mode", "checked-hash", str(ROOT / "sealvm")], check=True)
        tmp = Path(tempfile.mkdtemp(prefix="sealvm-nested-", dir="/tmp"))
        try:
            tar = tmp / "job.tar"
            self._tar(tar)
            cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", memory,
                   "-smp", str(smp), "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                   "-kernel", str(self.image / "vmlinuz"),
                   "-initrd", str(self.image / "stage1.cpio.gz"),
                   "-drive", f"file={self.image / 'rootfs.ext4'},if=virtio,format=raw,snapshot=on",
                   "-drive", f"file={tar},if=virtio,format=raw,readonly=on",
                   "-append", "console=ttyS0 panic=-1 quiet"]
            # the console goes to a file as it comes: `tail -f` it to follow a long run
            log = Path(tempfile.gettempdir()) / f"sealvm-nested-{self.name}.console"
            with open(log, "wb") as out, subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent) as p:
                _RUNNING.add(p)
                try:
                    p.wait(timeout=timeout)
                    note = ""
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    note = f"\n[outer VM killed after {timeout} s]\n"
                finally:
                    _RUNNING.discard(p)
            console = log.read_bytes().decode(errors="replace").replace("\r\n", "\n") + note
            m = re.search(r"L1-RESULT rc=(\d+)", console)
            return Outcome(int(m.group(1)) if m else None, console)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# Outer-VM runs started early: a test module's job begins when the session has collected
# it (tests/linux/conftest.py) and runs on a background thread beside the other tests, one
# outer VM at a time (each is one TCG thread), or one per core when the session runs
# nothing else (`make test-linux`); the module's fixture waits for its outcome.
_RUNNING: set[subprocess.Popen] = set()
_LOCK = threading.Lock()
_QUEUE: list[tuple[str, Callable[[Path], Job], float]] = []
_STARTED: set[str] = set()
_DONE: dict[str, Outcome | BaseException] = {}
_WAKE = threading.Condition(_LOCK)
_workers: list[threading.Thread] = []
_parallel = 1


def can_run() -> str | None:
    """Why the nested tests cannot run here (the skip reason), or None. (A missing QEMU is
    not a reason: `make deps` installs it, and the run fails saying so.)"""
    return None if have_kvm() else "no /dev/kvm on this machine: nested Linux tests skipped"


def set_parallel(n: int) -> None:
    """How many outer VMs may run at once (1 unless the session has nothing else to do)."""
    global _parallel
    _parallel = max(1, n)


def _work() -> None:
    while True:
        with _LOCK:
            if not _QUEUE:
                return
            key, build, timeout = _QUEUE.pop(0)
            _STARTED.add(key)
        try:
            job = build(outer_image())
            job.name = key.rsplit(".", 1)[-1]
            result: Outcome | BaseException = job.run(timeout=timeout)
        except BaseException as e:          # the fixture that waits re-raises it
            result = e
        with _WAKE:
            _DONE[key] = result
            _WAKE.notify_all()


def start(key: str, build: Callable[[Path], Job], timeout: float) -> None:
    """Queue this job (`build(image)` makes it) to run in the background, once."""
    with _LOCK:
        if key in _DONE or key in _STARTED or any(k == key for k, _, _ in _QUEUE):
            return
        _QUEUE.append((key, build, timeout))
        _workers[:] = [w for w in _workers if w.is_alive()]
        if len(_workers) < _parallel:
            w = threading.Thread(target=_work, name="nested-outer-vm", daemon=True)
            w.start()
            _workers.append(w)


def outcome(key: str, build: Callable[[Path], Job], timeout: float) -> Outcome:
    """The job's outcome: queued now if nothing started it, waited for if it is running."""
    start(key, build, timeout)
    with _WAKE:
        _WAKE.wait_for(lambda: key in _DONE)
        result = _DONE[key]
    if isinstance(result, BaseException):
        raise result
    return result


def module_outcome(module) -> Outcome:
    """A nested test module's `outer` fixture: its job's outcome, which must have finished
    (the module defines `nested_job(image)` and `NESTED_TIMEOUT`); skipped where nested
    tests cannot run."""
    import pytest
    if can_run():
        pytest.skip(can_run())
    out = outcome(module.__name__, module.nested_job, module.NESTED_TIMEOUT)
    assert out.rc == 0, f"the outer VM did not finish its job:\n{out.console[-6000:]}"
    return out


def stop() -> None:
    """End of the session: drop queued jobs and kill a running outer VM."""
    with _LOCK:
        _QUEUE.clear()
    for p in list(_RUNNING):
        p.kill()


def _die_with_parent() -> None:
    """In the outer VM's QEMU before exec: SIGKILL when the test process goes (a killed
    run leaves no outer VM behind)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG


def have_kvm() -> bool:
    return os.path.exists("/dev/kvm")


def have_host_virt() -> bool:
    """Whether this machine's CPU offers VMX or SVM itself (then Linux runs without nesting)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M))
