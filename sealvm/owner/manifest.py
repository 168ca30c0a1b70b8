"""Signed VM manifests and the VM's secrets, in the owner's directory.

`sign_guest` hashes a guest image and writes `DIR/vms/NAME/manifest.json` (canonical
JSON) with `manifest.json.sig` (Ed25519 by the owner over its exact bytes), and
creates `DIR/vms/NAME/keys.json` (0600) with fresh 32-byte disk, net and snapshot
keys when it is absent.  Existing keys are never replaced: re-signing a manifest
after a guest update must not lose the data those keys protect.

`load_manifest` and `load_vm_keys` are what the key broker reads for each request.
"""
from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..wire import attest as A
from .keys import OwnerError, load_sign_key, make_private_dir, read_private, write_file

MANIFEST_FILE = "manifest.json"
MANIFEST_SIG = "manifest.json.sig"
KEYS_FILE = "keys.json"


def vm_dir(directory: str | Path, name: str) -> Path:
    """DIR/vms/NAME, after checking NAME cannot climb out of it."""
    if not isinstance(name, str) or not A.VM_NAME_RE.fullmatch(name):
        raise OwnerError(f"VM name {name!r}: use 1-63 of a-z, 0-9 and '-', starting with a "
                         "letter or digit")
    return Path(directory) / "vms" / name


def image_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a guest image file."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise OwnerError(f"{path}: cannot read the guest image: {e.strerror}") from None
    return h.hexdigest()


def linux_image_sha256(kernel: str | Path, initrd: str | Path | None) -> str:
    """Hex digest a Linux guest is measured by: its kernel and initrd together."""
    def read(path, what):
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise OwnerError(f"{path}: cannot read the {what}: {e.strerror}") from None
    return A.linux_image_sha256(read(kernel, "kernel"),
                                None if initrd is None else read(initrd, "initrd")).hex()


def new_vm_keys() -> bytes:
    """keys.json content: fresh random 32-byte disk, net and snapshot keys (canonical JSON)."""
    return A.canonical({k: secrets.token_bytes(32).hex() for k in A.VM_KEY_NAMES})


def build_manifest(name: str, image_hash: str, cmdline: str, memory_mib: int, vcpus: int,
                   entry: str, devices: list[str], min_core_version: int) -> dict:
    """The manifest object, checked; devices sorted without repeats."""
    try:
        cfg = A.guest_config(memory_mib, vcpus, entry, devices)
        return A.check_manifest({"version": 1, "name": name, "image_sha256": image_hash,
                                 "cmdline": cmdline, "min_core_version": min_core_version,
                                 **cfg})
    except A.AttestError as e:
        raise OwnerError(str(e)) from None


def sign_guest(directory: str | Path, guest: str | Path, name: str, cmdline: str = "",
               memory_mib: int = 256, vcpus: int = 1, entry: str = "pvh",
               devices: list[str] | None = None, min_core_version: int = 1,
               initrd: str | Path | None = None) -> dict:
    """Write the signed manifest for GUEST as VM `name`; create its keys if absent.
    With entry "linux", GUEST is the kernel and `initrd` its initramfs (measured together).

    Returns {"manifest": dict, "path": Path, "keys_created": bool}."""
    key = load_sign_key(directory)
    vdir = vm_dir(directory, name)
    if initrd is not None and entry != "linux":
        raise OwnerError("an initrd belongs to a Linux kernel (entry linux)")
    digest = linux_image_sha256(guest, initrd) if entry == "linux" else image_sha256(guest)
    manifest = build_manifest(name, digest, cmdline, memory_mib, vcpus, entry,
                              ["rng"] if devices is None else devices, min_core_version)
    make_private_dir(vdir.parent)
    make_private_dir(vdir)
    data = A.manifest_bytes(manifest)
    write_file(vdir / MANIFEST_FILE, data, 0o644, force=True)
    write_file(vdir / MANIFEST_SIG, key.sign(data), 0o644, force=True)
    created = False
    if not (vdir / KEYS_FILE).exists() and not (vdir / KEYS_FILE).is_symlink():
        write_file(vdir / KEYS_FILE, new_vm_keys(), 0o600)
        created = True
    else:
        load_vm_keys(directory, name)      # an existing keys.json must still be sound
    return {"manifest": manifest, "path": vdir / MANIFEST_FILE, "keys_created": created}


def read_manifest_files(manifest_path: str | Path,
                        sig_path: str | Path | None = None) -> tuple[bytes, bytes]:
    """(manifest bytes, signature bytes); the signature defaults to MANIFEST.sig."""
    manifest_path = Path(manifest_path)
    sig_path = Path(sig_path) if sig_path else manifest_path.with_name(manifest_path.name + ".sig")
    try:
        data, sig = manifest_path.read_bytes(), sig_path.read_bytes()
    except OSError as e:
        raise OwnerError(f"{e.filename}: cannot read: {e.strerror}") from None
    if len(data) > 64 << 10:
        raise OwnerError(f"{manifest_path}: {len(data)} bytes, too large for a manifest")
    return data, sig


def verify_manifest_files(manifest_path: str | Path, sign_pub: Ed25519PublicKey | bytes,
                          sig_path: str | Path | None = None) -> dict:
    data, sig = read_manifest_files(manifest_path, sig_path)
    try:
        return A.verify_manifest(sign_pub, data, sig)
    except A.AttestError as e:
        raise OwnerError(f"{manifest_path}: {e}") from None


def load_manifest(directory: str | Path, name: str, sign_pub: Ed25519PublicKey | bytes) -> dict:
    """The VM's verified manifest; refused if absent, unsigned, altered, or for another name."""
    path = vm_dir(directory, name) / MANIFEST_FILE
    if not path.exists():
        raise OwnerError(f"no signed manifest for VM {name!r} ({path} is absent)")
    manifest = verify_manifest_files(path, sign_pub)
    if manifest["name"] != name:
        raise OwnerError(f"{path}: names VM {manifest['name']!r}, not {name!r}")
    return manifest


def load_vm_keys(directory: str | Path, name: str) -> bytes:
    """The exact bytes of the VM's keys.json, after checking its mode and its structure."""
    path = vm_dir(directory, name) / KEYS_FILE
    data = read_private(path)
    try:
        A.parse_vm_keys(data)
    except A.AttestError as e:
        raise OwnerError(f"{path}: {e}") from None
    return data
