"""`sealvm disk`: the owner's tools for sealed disk images (docs/sealed-disk.md).

    sealvm disk create SIZE -o FILE (--owner DIR --vm NAME | --key-file F)
    sealvm disk import RAW -o FILE  (...)          a raw image, sealed (size rounded up to 4 KiB)
    sealvm disk export FILE -o RAW  (...)          the plaintext, every block checked
    sealvm disk verify FILE [--min-generation N]   every block checked; prints the generation

The key is the VM's "disk" key from the owner's directory (DIR/vms/NAME/keys.json, made
by `sealvm owner sign`), the same one the broker releases to the VM's attested core.
These run on the owner's machine: the file is what the host stores, the key never
leaves the owner.  `verify` and `export` remember the highest generation they saw
for the VM (DIR/vms/NAME/disk-generation) and refuse an older one: the owner's copy of
the disk's freshness counter, which the host cannot roll back.

Exit codes: 0 ok; 1 the disk failed a check (tampering, rollback, wrong key);
2 usage or unreadable input.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..core.diskseal import (BLOCK, DiskError, DiskTamper, FileIO, SealedDisk, ZERO_BLOCK,
                             format_disk)

GEN_FILE = "disk-generation"


def add_parser(sub) -> None:
    d = sub.add_parser("disk", help="the owner's sealed disk tools: create, import, export, verify",
                       description="Make and check sealed disk images. A sealed disk is one "
                                   "file the host stores: every 4 KiB block encrypted and "
                                   "authenticated (AES-256-GCM) and bound to its position and "
                                   "version, under a MACed hash tree with a generation counter. "
                                   "The key is the VM's disk key from the owner's directory.")
    acts = d.add_subparsers(dest="disk_command", metavar="ACTION")
    acts.required = True

    def key_args(p):
        p.add_argument("--owner", metavar="DIR", help="the owner's directory (with --vm)")
        p.add_argument("--vm", metavar="NAME", help="the VM whose disk key to use")
        p.add_argument("--key-file", metavar="FILE",
                       help="a raw 32-byte key file (0600) instead of --owner/--vm (tests)")

    c = acts.add_parser("create", help="a new, all-zero sealed disk of SIZE bytes")
    c.add_argument("size", metavar="SIZE", help="size with a K/M/G suffix (a bare number is MiB), a multiple of 4K")
    c.add_argument("-o", "--output", required=True, metavar="FILE")
    key_args(c)
    i = acts.add_parser("import", help="seal a raw disk image")
    i.add_argument("raw", metavar="RAW")
    i.add_argument("-o", "--output", required=True, metavar="FILE")
    key_args(i)
    e = acts.add_parser("export", help="check every block and write the plaintext image")
    e.add_argument("disk", metavar="FILE")
    e.add_argument("-o", "--output", required=True, metavar="RAW")
    e.add_argument("--min-generation", type=int, default=None, metavar="N")
    key_args(e)
    v = acts.add_parser("verify", help="check every block and the generation")
    v.add_argument("disk", metavar="FILE")
    v.add_argument("--min-generation", type=int, default=None, metavar="N",
                   help="refuse a disk older than generation N (default: the highest this "
                        "owner directory has seen for the VM)")
    key_args(v)


def _key(args) -> bytes:
    if args.key_file:
        from .keys import read_private
        key = read_private(args.key_file)
    elif args.owner and args.vm:
        from ..wire.attest import parse_vm_keys
        from .manifest import load_vm_keys
        key = parse_vm_keys(load_vm_keys(args.owner, args.vm))["disk"]
    else:
        raise ValueError("give --owner DIR --vm NAME (or --key-file FILE)")
    if len(key) != 32:
        raise ValueError("a disk key is 32 bytes")
    return key


def _gen_file(args) -> Path | None:
    if args.owner and args.vm:
        from .manifest import vm_dir
        return vm_dir(args.owner, args.vm) / GEN_FILE
    return None


def _floor(args) -> int:
    if getattr(args, "min_generation", None) is not None:
        return args.min_generation
    f = _gen_file(args)
    try:
        return int(f.read_text()) if f else 0
    except (OSError, ValueError):
        return 0


def _remember(args, generation: int) -> None:
    f = _gen_file(args)
    if f and generation > _floor(args):
        f.write_text(f"{generation}\n")


def _parse_size(text: str) -> int:
    import argparse
    from ..cli import parse_size
    try:
        return parse_size(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e).replace("memory size", "disk size")) from None


def _new_file(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty() and (done % 4096 == 0 or done == total):
        print(f"\r{done}/{total} blocks", end="\n" if done == total else "", file=sys.stderr)


def create(path: str, key: bytes, size: int) -> SealedDisk:
    if size <= 0 or size % BLOCK:
        raise ValueError(f"size {size} is not a positive multiple of 4096")
    fd = _new_file(path)
    format_disk(FileIO(fd), key, size // BLOCK)
    return SealedDisk(FileIO(fd), key)


def import_raw(raw: str, path: str, key: bytes) -> SealedDisk:
    size = os.path.getsize(raw)
    disk = create(path, key, max(BLOCK, -(-size // BLOCK) * BLOCK))
    with open(raw, "rb") as f:
        for b in range(disk.blocks):
            data = f.read(BLOCK).ljust(BLOCK, b"\0")
            if data != ZERO_BLOCK:       # zero blocks stay holes
                disk.write_block(b, data)
            _progress(b + 1, disk.blocks)
    disk.flush()
    return disk


def check_all(disk: SealedDisk, out=None) -> int:
    """Read (and so check) every block; returns the number of written blocks."""
    written = 0
    for b in range(disk.blocks):
        data = disk.read_block(b)
        written += disk.entry(b)[0] != 0
        if out is not None:
            out.write(data)
        _progress(b + 1, disk.blocks)
    return written


def run(args) -> int:
    try:
        key = _key(args)
        cmd = args.disk_command
        if cmd == "create":
            disk = create(args.output, key, _parse_size(args.size))
            print(f"{args.output}: sealed disk of {disk.blocks} blocks, generation "
                  f"{disk.generation}")
            return 0
        if cmd == "import":
            disk = import_raw(args.raw, args.output, key)
            print(f"{args.output}: sealed {args.raw} ({disk.blocks} blocks), generation "
                  f"{disk.generation}")
            return 0
        fd = os.open(args.disk, os.O_RDONLY | os.O_CLOEXEC)
        try:
            disk = SealedDisk(FileIO(fd), key, min_generation=_floor(args))
            if cmd == "export":
                with open(args.output, "xb") as out:
                    written = check_all(disk, out)
            else:
                written = check_all(disk)
        finally:
            os.close(fd)
        _remember(args, disk.generation)
        print(f"{args.disk}: ok, {disk.blocks} blocks ({written} written), generation "
              f"{disk.generation}")
        return 0
    except DiskTamper as e:
        print(f"sealvm disk: TAMPERING DETECTED: {e}", file=sys.stderr)
        return 1
    except DiskError as e:
        print(f"sealvm disk: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"sealvm disk: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"sealvm disk: {e}", file=sys.stderr)
        return 2
    except Exception as e:   # OwnerError and friends: say what, not a traceback
        if type(e).__name__ in ("OwnerError", "AttestError"):
            print(f"sealvm disk: {e}", file=sys.stderr)
            return 2
        raise
