"""The owner's key directory: create it, and read keys only from files nobody else can read.

Layout (docs/attestation.md, "Owner keys"):

    DIR/                 0700
      owner-sign.key     Ed25519 private key, raw 32 bytes, 0600
      owner-wrap.key     X25519 private key, raw 32 bytes, 0600
      owner.pub.json     {"sign": hex, "wrap": hex}, 0644
      policy.json(.sig)  written by sealvm.owner.policy
      vms/NAME/          manifest.json(.sig) and keys.json (0600), by sealvm.owner.manifest

Every secret is read through `read_private`, which opens the file without following
symlinks and refuses it, naming the path and its mode, when it is not a regular file
owned by the caller or when group or others have any access to it.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                          PublicFormat)

SIGN_KEY = "owner-sign.key"
WRAP_KEY = "owner-wrap.key"
PUB_FILE = "owner.pub.json"
MAX_PRIVATE_FILE = 1 << 20


class OwnerError(Exception):
    """The owner's directory or one of its files is wrong; the message says which and why."""


def _raw_private(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def raw_public(key) -> bytes:
    """Raw public bytes of an Ed25519/X25519 private or public key."""
    pub = key.public_key() if hasattr(key, "public_key") else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def read_private(path: str | Path) -> bytes:
    """The bytes of a secret file, refused unless it is ours and closed to group and others."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OwnerError(f"{path}: no such file (run `sealvm owner init` first?)") from None
    except OSError as e:
        raise OwnerError(f"{path}: cannot open: {e.strerror} (a symlink is refused)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OwnerError(f"{path}: not a regular file")
        if st.st_uid != os.geteuid():
            raise OwnerError(f"{path}: owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); "
                             "refusing to use a key someone else controls")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise OwnerError(f"{path}: mode {mode:04o} lets group or others at a secret; "
                             f"refusing it (fix with: chmod 600 {path})")
        if st.st_size > MAX_PRIVATE_FILE:
            raise OwnerError(f"{path}: {st.st_size} bytes, too large for a key file")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read(MAX_PRIVATE_FILE + 1)
    finally:
        if fd >= 0:
            os.close(fd)


def write_file(path: str | Path, data: bytes, mode: int, force: bool = False) -> None:
    """Write `data` with exactly `mode`; refuse to replace an existing file unless `force`."""
    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        raise OwnerError(f"{path} already exists; refusing to overwrite it (use --force)")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)          # the umask must not widen or narrow it
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_private_dir(path: str | Path) -> Path:
    """Create `path` (and parents) if needed and make it 0700."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise OwnerError(f"{path}: not a directory")
    os.chmod(path, 0o700)
    return path


def init(directory: str | Path, force: bool = False) -> dict[str, str]:
    """Create the owner's keys, public key file and an empty signed policy; returns the pubs."""
    from .policy import default_policy, save_policy
    d = Path(directory)
    existing = [n for n in (SIGN_KEY, WRAP_KEY, PUB_FILE, "policy.json")
                if (d / n).exists() or (d / n).is_symlink()]
    if existing and not force:
        raise OwnerError(f"{d} already holds owner keys ({', '.join(existing)}); refusing to "
                         "replace them (--force makes new keys: sign every manifest again)")
    make_private_dir(d)
    sign, wrap = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    write_file(d / SIGN_KEY, _raw_private(sign), 0o600, force)
    write_file(d / WRAP_KEY, _raw_private(wrap), 0o600, force)
    pubs = {"sign": raw_public(sign).hex(), "wrap": raw_public(wrap).hex()}
    write_file(d / PUB_FILE, (json.dumps(pubs, sort_keys=True) + "\n").encode(), 0o644, force)
    save_policy(d, default_policy(), sign)
    return pubs


def _load_raw_key(directory: str | Path, name: str) -> bytes:
    raw = read_private(Path(directory) / name)
    if len(raw) != 32:
        raise OwnerError(f"{Path(directory) / name}: {len(raw)} bytes, a raw key is 32")
    return raw


def load_sign_key(directory: str | Path) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_load_raw_key(directory, SIGN_KEY))


def load_wrap_key(directory: str | Path) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_load_raw_key(directory, WRAP_KEY))


def load_public(path: str | Path) -> dict[str, bytes]:
    """{"sign": 32 bytes, "wrap": 32 bytes} from owner.pub.json (a file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / PUB_FILE
    try:
        obj = json.loads(path.read_text())
        out = {k: bytes.fromhex(obj[k]) for k in ("sign", "wrap")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise OwnerError(f"{path}: not an owner public key file: {e}") from None
    if any(len(v) != 32 for v in out.values()) or set(obj) != {"sign", "wrap"}:
        raise OwnerError(f"{path}: expected exactly {{'sign', 'wrap'}}, 32 bytes each")
    return out
