"""The `sealvm` command line.

`sealvm run GUEST` boots one VM and exits with the guest's own exit status;
`sealvm hostd` runs the launcher and the host daemon; `sealvm vm ...` talks
to that daemon.  Exit codes of the monitor itself stay out of the guest's
usual range: 125 the VM could not be built or started (the message says why),
126 the VM crashed (triple fault, KVM internal error: the message names the
exit, the vCPU and RIP), 130 stopped with Ctrl-C.

Imports are deferred to the command that needs them: `sealvm run` is on the
start-up path that the benchmarks measure.
"""
from __future__ import annotations

import argparse
import re
import sys

# virtio_mmio devices are appended by the core; panic=-1 turns a guest panic into a reset,
# which ends the VM with 126 instead of leaving it hung.
LINUX_DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 pci=off"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*$")
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'256M', '1G', '512MiB' or a plain number of MiB (as QEMU's -m) -> bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 256M or 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


MAX_USER_CMDLINE = 3000   # the rest of the 4095-byte line is kept for sealvm's own words


def _cmdline(text: str) -> str:
    n = len(text.encode())
    if n > MAX_USER_CMDLINE or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"command line too long or has a NUL: {n} bytes, at most {MAX_USER_CMDLINE}")
    return text


def _net_address(text: str) -> str:
    from .host.netrelay import parse_address
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sealvm",
        description="A KVM virtual machine monitor whose guests stay sealed from the host's "
                    "management stack.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    r = sub.add_parser(
        "run", help="boot one VM in the foreground and exit with the guest's status",
        description="Boot GUEST (a PVH ELF kernel), or a Linux kernel (bzImage or PVH vmlinux) given "
                    "with --kernel "
                    "(and --initrd), in a new KVM virtual machine, show its serial "
                    "console on stdout (and send stdin to its serial input), and exit with the status "
                    "the guest writes to its exit port 0xf4. Ctrl-C stops the VM cleanly. "
                    "Exit codes: the guest's status; 125 the VM could not start; 126 the VM "
                    "crashed; 130 interrupted. A Linux guest ends the VM by powering off "
                    "(status 0); a reboot or a kernel panic (with panic=-1) ends it with 126.")
    r.add_argument("guest", metavar="GUEST", nargs="?",
                   help="PVH ELF image, e.g. guests/build/hello.elf (omit with --kernel)")
    r.add_argument("--kernel", metavar="KERNEL",
                   help="boot this Linux kernel: a bzImage (e.g. /boot/vmlinuz-*, 64-bit boot "
                        "protocol) or an uncompressed vmlinux ELF with a PVH note (CONFIG_PVH=y, "
                        "PVH entry), told apart by their headers; the same as GUEST with "
                        "--entry linux")
    r.add_argument("--initrd", metavar="FILE", help="initramfs for --kernel")
    r.add_argument("--memory", "-m", type=parse_size, default=parse_size("256M"),
                   help="guest RAM, e.g. 256M or 1G (default 256M)")
    r.add_argument("--vcpus", type=_positive_int, default=1, help="number of vCPUs (default 1)")
    r.add_argument("--cmdline", default="", type=_cmdline,
                   help="kernel command line passed to the guest (at most 3000 bytes; a Linux "
                        f"kernel's default is '{LINUX_DEFAULT_CMDLINE}')")
    r.add_argument("--entry", choices=("pvh", "long", "linux"), default=None,
                   help="start at the PVH 32-bit entry (default), directly in 64-bit long mode, "
                        "or boot GUEST as a Linux kernel ('linux', the default with --kernel)")
    r.add_argument("--no-rng", action="store_true", help="do not attach the virtio-rng device")
    r.add_argument("--console-log", metavar="FILE",
                   help="write the guest console to FILE instead of stdout")
    r.add_argument("--insecure-dev", action="store_true",
                   help="development only: run even where the machine cannot apply every "
                        "defence (no root: the core runs under your uid; no seccomp)")
    r.add_argument("--prefault", action="store_true",
                   help="populate all guest RAM on the host before the guest starts "
                        "(MADV_POPULATE_WRITE): the guest's first touch of a page gets several "
                        "times cheaper, but start-up takes longer (about 1 ms per MiB with 4 KiB "
                        "pages) and all of RAM is resident from the start (default: off). "
                        "Not yet carried to the VM's core process: refused for now")
    r.add_argument("--hugepages", choices=("thp", "hugetlb"), default=None,
                   help="back guest RAM with 2 MiB pages: 'thp' = transparent huge pages (the "
                        "host must allow them for shared memory: "
                        "/sys/kernel/mm/transparent_hugepage/shmem_enabled = advise, within_size "
                        "or always), 'hugetlb' = the reserved pool (vm.nr_hugepages must cover "
                        "the RAM size) (default: off)")
    r.add_argument("--manifest", metavar="DIR",
                   help="the owner's signed manifest for this VM (a directory with manifest.json "
                        "and manifest.json.sig, as `sealvm owner sign` writes it): the core "
                        "checks the guest against it and gets the VM's keys from --broker")
    r.add_argument("--owner-pub", metavar="FILE",
                   help="the owner's public keys (default: owner.pub.json two levels above "
                        "--manifest)")
    r.add_argument("--broker", metavar="URL", default="http://127.0.0.1:8470",
                   help="the owner's key broker (default %(default)s)")
    r.add_argument("--net", metavar="GATEWAY_HOST:PORT", type=_net_address,
                   help="give the guest a virtio-net card whose frames the core seals into a "
                        "tunnel to the owner's gateway (`sealvm owner gateway`) at this UDP "
                        "address; this process only relays the sealed datagrams. The tunnel key "
                        "is the VM's net key, released with --manifest")
    r.add_argument("--net-direct", action="store_true",
                   help="with --net: hand the core a UDP socket connected to the gateway instead "
                        "of relaying its datagrams through this process (faster; the host still "
                        "chooses the destination and sees only sealed datagrams)")
    r.add_argument("--disk", metavar="FILE",
                   help="attach a sealed disk image (made by `sealvm disk create`) as a "
                        "virtio-blk device; the key comes from the owner's broker")
    r.add_argument("--bench-sinks", action="store_true", help=argparse.SUPPRESS)

    h = sub.add_parser(
        "hostd", help="run the launcher (root) and the unprivileged host daemon",
        description="Start the launcher, which keeps root only to start one core process per "
                    "VM under a uid of its own, and the host daemon, which runs as --host-uid "
                    "with no capabilities and serves the REST API on RUN_DIR/hostd.sock. The "
                    "launcher restarts the daemon if it dies; running VMs are re-attached.")
    h.add_argument("--state-dir", default="/var/lib/sealvm", help="VM records (default %(default)s)")
    h.add_argument("--run-dir", default="/run/sealvm", help="sockets (default %(default)s)")
    h.add_argument("--host-uid", type=int, default=63999,
                   help="uid the daemon runs as (default %(default)s)")
    h.add_argument("--uid-range", default="64000-64999",
                   help="uids given to VM cores, one per VM (default %(default)s)")
    h.add_argument("--insecure-dev", action="store_true",
                   help="development only: run without root (all cores under your uid)")
    h.add_argument("--print-openapi", action="store_true",
                   help="print the REST API's OpenAPI document and exit")

    from .host.cli_vm import add_parser as add_vm_parser
    add_vm_parser(sub, parse_size)
    from .owner.cli import add_parser as add_owner_parser
    add_owner_parser(sub)
    from .owner.disk import add_parser as add_disk_parser
    add_disk_parser(sub)
    from .fleet.cli import add_parser as add_fleet_parser
    add_fleet_parser(sub)
    sub.add_parser("measure", help="print this host's root key and core measurement (for the "
                                   "owner's policy)",
                   description="Measure the core as the launcher does before every VM and print "
                               "the host's software root public key and the core measurement, "
                               "as JSON, for `sealvm owner policy add host|core`; with "
                               "SEALVM_TPM=HOST:PORT set, also that TPM's attestation key "
                               "(tpm_ak_pub, DER hex) for `sealvm owner policy add tpm`.")
    return p


def _uid_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit() or int(lo) > int(hi):
        raise SystemExit(f"sealvm: --uid-range must look like 64000-64999, not {text!r}")
    return int(lo), int(hi)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("\nsealvm: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        from .host.oneshot import run_oneshot
        return run_oneshot(args)
    if args.command == "hostd" and args.print_openapi:
        import json
        from .host.api import openapi_document
        print(json.dumps(openapi_document(), indent=1, sort_keys=True))
        return 0
    if args.command == "hostd":
        import logging
        from .launcher.service import run_hostd
        logging.basicConfig(level=logging.INFO, format="launcher %(levelname)s %(message)s")
        return run_hostd(args.state_dir, args.run_dir, args.host_uid, _uid_range(args.uid_range),
                         args.insecure_dev,
                         ["--insecure-dev"] if args.insecure_dev else [])
    if args.command == "measure":
        import json
        from .launcher.attest_boot import describe
        from .launcher.tpm_boot import TpmBootError
        try:
            print(json.dumps(describe(sys.executable), indent=1))
        except TpmBootError as e:
            print(f"sealvm: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "owner":
        from .owner.cli import run as run_owner
        return run_owner(args)
    if args.command == "disk":
        from .owner.disk import run as run_disk
        return run_disk(args)
    if args.command == "vm":
        from .host.cli_vm import run as run_vm_command
        return run_vm_command(args)
    if args.command == "fleet":
        from .fleet.cli import run as run_fleet
        return run_fleet(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
