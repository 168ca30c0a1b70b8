"""`sealvm owner ...`: the VM owner's tools (keys, manifests, policy, key broker, verify).

    sealvm owner init DIR [--force]
    sealvm owner sign GUEST | --kernel K [--initrd I]  --name NAME [--cmdline ..] [--memory 256M] [--vcpus N]
                      [--entry pvh|long|linux] [--devices rng,...] [--min-core-version N]
    sealvm owner policy show | add KIND VALUE | remove KIND VALUE | min-version N
                        | require-tpm yes|no          (KIND: core, host, tpm)
    sealvm owner broker [--listen ADDR] [--port N]
    sealvm owner verify --manifest FILE [--sig FILE] [--image GUEST]
    sealvm owner verify --evidence FILE --signature FILE

Every command but `init` takes the owner directory from --dir, or $SEALVM_OWNER_DIR.
`add_parser(sub)` adds the `owner` command to sealvm's parser; `run(args)` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ENV_DIR = "SEALVM_OWNER_DIR"
_SIZE = re.compile(r"^\s*(\d+)\s*([mMgG]?)(i?[bB])?\s*$")


def _memory_mib(text: str) -> int:
    m = _SIZE.match(text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 256M or 1G)")
    return int(m.group(1)) * (1024 if m.group(2).lower() == "g" else 1)


def _devices(text: str) -> list[str]:
    return [d.strip() for d in text.split(",") if d.strip()]


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "on", "1"):
        return True
    if text.lower() in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, not {text!r}")


def _add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=os.environ.get(ENV_DIR),
                   help=f"the owner directory made by `sealvm owner init` (default ${ENV_DIR})")


def add_parser(sub) -> None:
    o = sub.add_parser(
        "owner", help="the VM owner's tools: keys, signed manifests, policy, key broker",
        description="Tools for the owner of sealed VMs. The owner keeps a private directory "
                    "with an Ed25519 signing key and an X25519 wrap key, a signed policy saying "
                    "which core code and which hosts or TPMs to trust, and for each VM a signed "
                    "manifest plus its secret keys. The key broker releases a VM's keys only to "
                    "a core whose attestation evidence passes that policy and manifest; see "
                    "docs/attestation.md.")
    actions = o.add_subparsers(dest="owner_command", metavar="ACTION")
    actions.required = True

    i = actions.add_parser("init", help="create the owner's keys and an empty signed policy",
                       description="Create DIR (0700) with owner-sign.key and owner-wrap.key "
                                   "(0600), owner.pub.json (public halves) and a signed policy "
                                   "that trusts nothing yet. Refuses to replace existing keys.")
    i.add_argument("directory", metavar="DIR")
    i.add_argument("--force", action="store_true",
                   help="replace existing keys and policy (every manifest must be signed again)")

    s = actions.add_parser("sign", help="sign a guest image's manifest for a VM",
                       description="Hash GUEST and write DIR/vms/NAME/manifest.json and its "
                                   "signature, fixing the image, command line, memory, vCPUs, "
                                   "entry mode and devices the VM must be started with. Creates "
                                   "DIR/vms/NAME/keys.json (fresh disk, net and snapshot keys, "
                                   "0600) if absent; existing keys are kept.")
    _add_dir(s)
    s.add_argument("guest", metavar="GUEST", nargs="?",
                   help="the guest image (PVH ELF) to measure (or --kernel)")
    s.add_argument("--kernel", metavar="FILE",
                   help="a Linux kernel (bzImage or vmlinux) instead of GUEST: entry linux; "
                        "it is measured together with --initrd")
    s.add_argument("--initrd", metavar="FILE", help="the Linux kernel's initramfs")
    s.add_argument("--name", required=True, help="VM name: 1-63 of a-z, 0-9 and '-'")
    s.add_argument("--cmdline", default="", help="the guest's exact kernel command line")
    s.add_argument("--memory", "-m", type=_memory_mib, default=256,
                   help="guest RAM, e.g. 256M or 1G (default 256M)")
    s.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    s.add_argument("--entry", choices=("pvh", "long", "linux"), default=None,
                   help="boot entry mode (default pvh; linux with --kernel)")
    s.add_argument("--devices", type=_devices, default=["rng"],
                   help="comma-separated device list (default rng; empty string for none)")
    s.add_argument("--min-core-version", type=int, default=1,
                   help="refuse cores older than this (default 1)")

    p = actions.add_parser("policy", help="show or change what the owner trusts",
                       description="Show or edit DIR/policy.json. Every change is re-signed with "
                                   "the owner key; a policy changed any other way is refused.")
    _add_dir(p)
    ps = p.add_subparsers(dest="policy_action", metavar="CHANGE")
    ps.required = True
    ps.add_parser("show", help="print the policy")
    for action, verb in (("add", "trust"), ("remove", "stop trusting")):
        a = ps.add_parser(action, help=f"{verb} a core measurement, host key or TPM key")
        a.add_argument("kind", choices=("core", "host", "tpm"),
                       help="core: a core measurement (hex); host: a launcher's Ed25519 host "
                            "key (hex, software root); tpm: a TPM attestation key (hex DER, "
                            "or @FILE with DER or PEM)")
        a.add_argument("value")
    mv = ps.add_parser("min-version", help="the lowest core version accepted")
    mv.add_argument("version", type=int)
    rt = ps.add_parser("require-tpm", help="refuse evidence without a TPM quote (yes/no)")
    rt.add_argument("value", type=_yes_no)

    b = actions.add_parser("broker", help="run the key broker (HTTP)",
                       description="Serve POST /v1/challenge and POST /v1/attest: appraise a "
                                   "core's evidence against the signed policy and the VM's "
                                   "signed manifest, and release the VM's keys wrapped to that "
                                   "core. Every release and refusal is appended to "
                                   "DIR/broker.log.")
    _add_dir(b)
    b.add_argument("--listen", default="127.0.0.1", help="address (default %(default)s)")
    b.add_argument("--port", type=int, default=8470, help="TCP port (default %(default)s)")

    v = actions.add_parser("verify", help="check a manifest or an evidence file offline",
                       description="Check a signed manifest (and optionally that GUEST matches "
                                   "it), or appraise evidence.json + evidence.sig against the "
                                   "policy and manifests in DIR exactly as the broker would, "
                                   "except for the nonce, and print each check. Exit 0 when "
                                   "everything passes, 1 otherwise.")
    _add_dir(v)
    v.add_argument("--owner-pub", metavar="FILE",
                   help="owner.pub.json to verify a manifest with, instead of --dir")
    v.add_argument("--manifest", metavar="FILE", help="a manifest.json to check")
    v.add_argument("--sig", metavar="FILE", help="its signature (default MANIFEST.sig)")
    v.add_argument("--image", metavar="GUEST", help="also check GUEST's hash against it")
    v.add_argument("--evidence", metavar="FILE", help="an evidence.json to appraise")
    v.add_argument("--signature", metavar="FILE",
                   help="the evidence signature: 64 raw bytes or 128 hex digits")

    from .gateway import add_parser as add_gateway_parser
    add_gateway_parser(actions)


def _need_dir(args) -> Path:
    if not args.dir:
        raise SystemExit(f"sealvm owner: no owner directory: pass --dir DIR or set ${ENV_DIR}")
    return Path(args.dir)


def _policy(args) -> int:
    from . import policy as P
    d = _need_dir(args)
    act = args.policy_action
    if act == "show":
        pol = P.load_policy(d)
    elif act in ("add", "remove"):
        pol = P.edit(d, act, args.kind, args.value)
    elif act == "min-version":
        pol = P.edit(d, act, value=args.version)
    else:
        pol = P.edit(d, act, value=args.value)
    print(P.describe(pol))
    return 0


def _verify_manifest(args) -> int:
    from .keys import load_public
    from .manifest import image_sha256, verify_manifest_files
    pub = load_public(args.owner_pub or _need_dir(args))["sign"]
    m = verify_manifest_files(args.manifest, pub, args.sig)
    print(f"manifest {args.manifest}: signature by the owner key OK")
    print(json.dumps(m, indent=2, sort_keys=True))
    if args.image:
        got = image_sha256(args.image)
        if got != m["image_sha256"]:
            print(f"image {args.image}: sha256 {got} differs from the manifest's "
                  f"{m['image_sha256']}")
            return 1
        print(f"image {args.image}: matches")
    return 0


def _sign_target(args) -> tuple[str, str]:
    """(the file to measure, entry mode) of `owner sign`: GUEST, or --kernel for Linux."""
    if (args.guest is None) == (args.kernel is None):
        raise SystemExit("sealvm owner sign: give either GUEST (an ELF image) or --kernel")
    if args.kernel is not None:
        if args.entry not in (None, "linux"):
            raise SystemExit(f"sealvm owner sign: --kernel is entry linux, not {args.entry}")
        return args.kernel, "linux"
    if args.initrd is not None and args.entry != "linux":
        raise SystemExit("sealvm owner sign: --initrd needs a Linux kernel (--kernel)")
    return args.guest, args.entry or "pvh"


def _read_signature(path: str) -> bytes:
    raw = Path(path).read_bytes()
    text = raw.strip()
    if len(text) == 128:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except ValueError:
            pass
    return raw


def _verify_evidence(args) -> int:
    from .appraise import Context, report
    from .keys import OwnerError, load_public, load_sign_key
    from .manifest import load_manifest
    from .policy import load_policy
    if not args.signature:
        raise SystemExit("sealvm owner verify: --evidence needs --signature FILE")
    d = _need_dir(args)
    sign_pub = load_sign_key(d).public_key()
    policy = load_policy(d, sign_pub)
    wrap_pub = load_public(d)["wrap"]

    def ctx_for(ev: dict) -> Context:
        try:
            manifest = load_manifest(d, ev["vm"], sign_pub)
        except OwnerError as e:
            print(f"note: {e}")
            manifest = None
        return Context(policy, manifest, wrap_pub)

    results = report(Path(args.evidence).read_bytes(), _read_signature(args.signature), ctx_for)
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    passed = all(ok for _, ok, _ in results) and len(results) > 1
    print("appraisal: PASS (nonce not checked offline)" if passed else "appraisal: FAIL")
    return 0 if passed else 1


def run(args) -> int:
    from .keys import OwnerError
    try:
        cmd = args.owner_command
        if cmd == "init":
            from .keys import init
            pubs = init(args.directory, args.force)
            print(f"owner keys written to {args.directory}\n  sign {pubs['sign']}\n"
                  f"  wrap {pubs['wrap']}\npolicy: trusts nothing yet (sealvm owner policy add)")
            return 0
        if cmd == "sign":
            from .manifest import sign_guest
            guest, entry = _sign_target(args)
            r = sign_guest(_need_dir(args), guest, args.name, args.cmdline, args.memory,
                           args.vcpus, entry, args.devices, args.min_core_version,
                           initrd=args.initrd)
            print(f"signed {r['path']} (image {r['manifest']['image_sha256']})")
            print("VM keys: " + ("created keys.json" if r["keys_created"] else "kept keys.json"))
            return 0
        if cmd == "policy":
            return _policy(args)
        if cmd == "gateway":
            from .gateway import run as run_gateway
            return run_gateway(args)
        if cmd == "broker":
            from .broker import serve
            return serve(_need_dir(args), args.listen, args.port)
        if cmd == "verify":
            if bool(args.manifest) == bool(args.evidence):
                raise SystemExit("sealvm owner verify: give either --manifest or --evidence")
            return _verify_manifest(args) if args.manifest else _verify_evidence(args)
    except (OwnerError, ValueError) as e:
        print(f"sealvm owner: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sealvm owner: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    return 2
