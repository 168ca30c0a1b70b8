"""`sealvm run`: one VM in the foreground, through the same launcher and core as the daemon.

This process plays both roles the daemon splits: it is the launcher (it
starts the core under a VM uid of its own, so it needs root unless
--insecure-dev) and then the untrusted host (it only sends the image and the
configuration over the portal and prints the console bytes the core relays).
There is no path that runs a guest without a core process.

Exit codes: the guest's status; 125 the VM could not start; 126 it crashed
(triple fault, KVM internal error); 130 Ctrl-C.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading

from ..launcher.spawn import LaunchError, spawn_core

EXIT_CANNOT_START = 125
EXIT_VM_CRASHED = 126
EXIT_INTERRUPTED = 130


def _fail(msg: str) -> int:
    print(f"sealvm: {msg}", file=sys.stderr)
    return EXIT_CANNOT_START


def preflight(insecure: bool) -> str | None:
    """What this machine cannot do for a sealed VM, or None when it can do it all."""
    from ..core.sandbox.probe import probe_capabilities
    missing = [k for k, ok in probe_capabilities().items() if not ok]
    if not missing or insecure:
        if missing:
            print(f"sealvm: WARNING --insecure-dev: running without {', '.join(missing)}",
                  file=sys.stderr)
        return None
    return (f"this machine cannot {', '.join(missing)}; refusing to run a VM without those "
            "defences (pass --insecure-dev to run anyway, for development only)")


def _shmem_thp() -> str:
    for path in ("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled",
                 "/sys/kernel/mm/transparent_hugepage/shmem_enabled"):
        try:
            text = open(path).read()
        except OSError:
            continue
        word = text[text.find("[") + 1:text.find("]")]
        if word != "inherit":
            return word
    return "never"


def _free_hugepages_mib() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1]) * 2
    except OSError:
        pass
    return 0


def config_flags(args, memory_mib: int) -> int:
    """CONFIGURE flags for the run options; the host checks what its kernel allows first."""
    from ..wire.portal_ops import (CONFIG_FLAG_BENCH_SINKS, CONFIG_FLAG_HUGETLB,
                                   CONFIG_FLAG_PREFAULT, CONFIG_FLAG_RNG, CONFIG_FLAG_THP)
    flags = 0 if args.no_rng else CONFIG_FLAG_RNG
    flags |= CONFIG_FLAG_PREFAULT if args.prefault else 0
    flags |= CONFIG_FLAG_BENCH_SINKS if args.bench_sinks else 0
    if args.hugepages == "thp":
        if _shmem_thp() not in ("advise", "within_size", "always", "force"):
            raise ValueError("--hugepages thp: this host does not give shared memory transparent "
                             "huge pages (transparent_hugepage/shmem_enabled is "
                             f"'{_shmem_thp()}'; set it to 'advise')")
        flags |= CONFIG_FLAG_THP
    elif args.hugepages == "hugetlb":
        if _free_hugepages_mib() < memory_mib:
            raise ValueError(f"--hugepages hugetlb: {_free_hugepages_mib()} MiB of free huge pages,"
                             f" {memory_mib} MiB needed (raise vm.nr_hugepages)")
        flags |= CONFIG_FLAG_HUGETLB
    return flags


def manifest_bundle(args) -> bytes | None:
    """The owner's manifest, its signature, keys and broker, for the core to check."""
    if not args.manifest:
        return None
    return read_manifest_bundle(args.manifest, args.owner_pub, args.broker)


def read_manifest_bundle(manifest: str, owner_pub: str | None, broker: str) -> bytes:
    import json
    from pathlib import Path
    d = Path(manifest)
    pub = Path(owner_pub) if owner_pub else d.parent.parent / "owner.pub.json"
    try:
        owner = json.loads(pub.read_text())
        return json.dumps({"manifest": (d / "manifest.json").read_text(),
                           "signature": (d / "manifest.json.sig").read_bytes().hex(),
                           "owner_sign": owner["sign"], "owner_wrap": owner["wrap"],
                           "broker": broker}).encode()
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read the owner's manifest or keys: {e}") from None


def _terminate(signum, frame):
    raise KeyboardInterrupt      # SIGTERM stops the VM as Ctrl-C does (else its core lingers)


def run_oneshot(args) -> int:
    import signal
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except KeyboardInterrupt:     # Ctrl-C at any point: the core has been stopped or killed
        print("\nsealvm: stopped (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED


def guest_files(args) -> tuple[str, str | None]:
    """(kernel or ELF image path, initrd path) of `run` or `vm create`; sets args.entry and a
    Linux kernel's default command line.  Raises ValueError (usage)."""
    from ..cli import LINUX_DEFAULT_CMDLINE
    guest = args.guest if hasattr(args, "guest") else args.image
    if (guest is None) == (args.kernel is None):
        raise ValueError("give either GUEST (an ELF image) or --kernel KERNEL (a Linux bzImage "
                         "or vmlinux)")
    if args.kernel is not None:
        if args.entry not in (None, "linux"):
            raise ValueError(f"--kernel boots Linux; --entry {args.entry} is for ELF images")
        args.entry = "linux"
    args.entry = args.entry or "pvh"
    if args.initrd is not None and args.entry != "linux":
        raise ValueError("--initrd needs a Linux kernel (--kernel, or --entry linux)")
    if args.entry == "linux" and not args.cmdline:
        args.cmdline = LINUX_DEFAULT_CMDLINE
    if args.entry == "linux" and os.path.isdir("/sys/module/kvm_pvm"):
        print("sealvm: WARNING: this host's KVM is kvm_pvm, which runs only kernels built as PVM "
              "guests: an unmodified Linux kernel will not get past its first instructions "
              "(see docs/linux.md)", file=sys.stderr)
    return args.kernel or guest, args.initrd


def guest_images(args) -> tuple[bytes, bytes | None]:
    """(kernel or ELF image, initrd) as read by the host; see guest_files."""
    from .corelink import read_image
    image, initrd = guest_files(args)
    return read_image(image), (read_image(initrd) if initrd is not None else None)


def _run(args) -> int:
    try:
        image, initrd = guest_images(args)
    except ValueError as e:
        return _fail(str(e))
    memory_mib = args.memory >> 20
    if args.memory % (1 << 20) or not 2 <= memory_mib <= 65536:
        return _fail(f"memory size must be a whole number of MiB between 2M and 64G, "
                     f"not {args.memory} bytes")
    try:
        flags = config_flags(args, memory_mib)
        manifest = manifest_bundle(args)
        relay = None
        if getattr(args, "net", None):
            from .netrelay import DirectLink, Relay, parse_address
            relay = (DirectLink if args.net_direct else Relay)(parse_address(args.net))
    except (ValueError, OSError) as e:
        return _fail(str(e))
    console_fd = 1
    if args.console_log:
        try:
            console_fd = os.open(args.console_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            return _fail(f"cannot open console log {args.console_log}: {e.strerror}")
    run_dir = tempfile.mkdtemp(prefix="sealvm-run-")
    os.chmod(run_dir, 0o711)
    handle = None
    try:
        try:
            handle = spawn_core(f"run-{os.getpid()}", memory_mib=memory_mib, run_dir=run_dir,
                                host_uid=os.getuid(), insecure_same_uid=os.geteuid() != 0,
                                attest=manifest is not None)
        except LaunchError as e:
            return _fail(str(e))
        # The core is starting (its interpreter and imports take most of the
        # start-up time); check the machine's defences meanwhile.
        problem = preflight(args.insecure_dev)
        if problem:
            handle.process.kill()
            return _fail(problem)
        return _drive(handle, image, manifest, memory_mib, flags, args, console_fd, initrd,
                      relay)
    finally:
        if relay is not None:
            relay.close()
        if handle is not None:
            try:       # after STOP the core exits by itself; otherwise it never got going
                handle.process.wait(10 if handle.process.poll() is None and _stopped(handle) else 0)
            except Exception:
                handle.process.kill()
                handle.process.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
        if console_fd != 1:
            os.close(console_fd)


def _stopped(handle) -> bool:
    return getattr(handle, "stop_sent", False)


def _show_attestation(level: int, message: str) -> None:
    if message.startswith(("attestation", "the owner's broker", "attestation failed")) \
            or level >= 40:
        print(f"sealvm: {message}", file=sys.stderr)


def core_exit_reason(handle) -> str:
    """Why the core process went away, as far as its exit status tells."""
    import signal
    try:
        rc = handle.process.wait(2)
    except Exception:
        return "the core closed the portal"
    if rc == -signal.SIGSYS:
        return "the core was killed by its seccomp filter (a forbidden system call)"
    if rc < 0:
        return f"the core was killed by signal {-rc}"
    return f"the core exited with status {rc}"


def _report_disk(link) -> None:
    """The core's disk counters (QUERY), on stderr."""
    from .corelink import CoreRefused
    try:
        q = link.query()
    except (CoreRefused, RuntimeError, OSError):
        return
    print(f"sealvm: disk: {q['disk_requests']} requests, {q['disk_tampered']} tampering "
          f"detected, {q['disk_io_errors']} host I/O errors, generation {q['disk_generation']}",
          file=sys.stderr)


def _forward_stdin(link, stopped: threading.Event) -> None:
    """Copy our stdin to the guest's serial console until EOF or the VM stops (not from a
    terminal we do not own: reading it from the background would stop us with SIGTTIN)."""
    from .corelink import CoreRefused
    try:
        if os.isatty(0) and os.tcgetpgrp(0) != os.getpgrp():
            return
    except OSError:
        return
    while not stopped.is_set():
        try:
            data = os.read(0, 4096)
        except OSError:
            return
        if not data:
            return
        try:
            link.console_input(data)
        except (CoreRefused, RuntimeError, OSError):
            return


def _drive(handle, image: bytes, manifest: bytes | None, memory_mib: int, flags: int, args,
           console_fd: int, initrd: bytes | None = None, relay=None) -> int:
    from .corelink import CoreLink, CoreRefused
    stopped = threading.Event()
    link = CoreLink(handle.vm_id, handle.portal, None,
                    on_stopped=lambda *_: stopped.set(),
                    on_console=lambda data: os.write(console_fd, data),
                    on_log=_show_attestation)
    try:
        try:
            link.hello()
            link.load_image(image)
            if initrd is not None:
                link.load_image(initrd, kind=2)
            if manifest is not None:
                link.load_image(manifest, kind=3)
            if relay is not None:
                from ..wire.portal_ops import AttachKind
                link.attach(AttachKind.NET, 0, relay.core_end.fileno())
                relay.start()
            if getattr(args, "disk", None):
                from .backends.blockfile import DiskFileError, attach_disk
                try:
                    attach_disk(link, args.disk)
                except DiskFileError as e:
                    return _fail(str(e))
            link.configure(memory_mib, args.vcpus, args.entry,
                           flags, args.cmdline)
            link.start()
        except CoreRefused as e:
            return _fail(str(e))
        threading.Thread(target=_forward_stdin, args=(link, stopped), daemon=True).start()
        try:
            while not stopped.wait(0.5):
                if link.client.closed:
                    print(f"sealvm: {core_exit_reason(handle)}", file=sys.stderr)
                    return EXIT_VM_CRASHED
        except KeyboardInterrupt:
            print("\nsealvm: stopped (Ctrl-C)", file=sys.stderr)
            return EXIT_INTERRUPTED
        status, reason = link.stopped
        if getattr(args, "disk", None):
            _report_disk(link)
        if status < 0:
            print(f"sealvm: VM stopped: {reason}", file=sys.stderr)
            return EXIT_VM_CRASHED
        return status & 0xFF
    finally:
        try:
            link.stop()
            handle.stop_sent = True
        except (CoreRefused, RuntimeError):   # RuntimeError: the core never said HELLO
            pass
        link.wait_closed(5)
        link.close()
