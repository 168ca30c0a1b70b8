"""The owner's directory: keys, file modes, the signed policy, manifests and the CLI."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sealvm.owner import cli, keys, manifest, policy
from sealvm.owner.keys import OwnerError
from sealvm.wire import attest as A

H32 = "ab" * 32


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def owner_dir(tmp_path):
    d = tmp_path / "owner"
    keys.init(d)
    return d


@pytest.fixture
def guest(tmp_path):
    g = tmp_path / "guest.elf"
    g.write_bytes(os.urandom(100_000))
    return g


# ---- init and key files ----------------------------------------------------------------

def test_init_creates_private_files(owner_dir):
    assert mode(owner_dir) == 0o700
    for name in ("owner-sign.key", "owner-wrap.key", "policy.json", "policy.json.sig"):
        assert mode(owner_dir / name) == 0o600, name
    assert mode(owner_dir / "owner.pub.json") == 0o644
    pubs = keys.load_public(owner_dir)
    assert pubs["sign"] == keys.raw_public(keys.load_sign_key(owner_dir))
    assert pubs["wrap"] == keys.raw_public(keys.load_wrap_key(owner_dir))
    assert policy.load_policy(owner_dir) == policy.default_policy()


def test_init_ignores_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        keys.init(tmp_path / "o")
    finally:
        os.umask(old)
    assert mode(tmp_path / "o" / "owner-sign.key") == 0o600


def test_init_refuses_to_overwrite(owner_dir):
    before = (owner_dir / "owner-sign.key").read_bytes()
    with pytest.raises(OwnerError, match="already holds owner keys"):
        keys.init(owner_dir)
    assert (owner_dir / "owner-sign.key").read_bytes() == before
    keys.init(owner_dir, force=True)
    assert (owner_dir / "owner-sign.key").read_bytes() != before
    assert mode(owner_dir / "owner-sign.key") == 0o600


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o620])
def test_a_key_file_open_to_others_is_refused(owner_dir, bad_mode):
    path = owner_dir / "owner-sign.key"
    os.chmod(path, bad_mode)
    with pytest.raises(OwnerError) as e:
        keys.load_sign_key(owner_dir)
    assert str(path) in str(e.value) and f"mode {bad_mode:04o}" in str(e.value)
    os.chmod(path, 0o600)                       # paired control: the same file at 0600 loads
    assert isinstance(keys.load_sign_key(owner_dir), Ed25519PrivateKey)


def test_a_key_file_owned_by_someone_else_is_refused(owner_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    path = owner_dir / "owner-wrap.key"
    os.chown(path, 4242, -1)
    with pytest.raises(OwnerError, match="owned by uid 4242, not by you"):
        keys.load_wrap_key(owner_dir)
    os.chown(path, os.geteuid(), -1)
    keys.load_wrap_key(owner_dir)


def test_a_symlinked_key_file_is_refused(owner_dir, tmp_path):
    real = tmp_path / "elsewhere.key"
    os.replace(owner_dir / "owner-sign.key", real)
    os.symlink(real, owner_dir / "owner-sign.key")
    with pytest.raises(OwnerError, match="symlink is refused"):
        keys.load_sign_key(owner_dir)


def test_a_truncated_key_is_refused(owner_dir):
    (owner_dir / "owner-sign.key").write_bytes(b"short")
    with pytest.raises(OwnerError, match="5 bytes, a raw key is 32"):
        keys.load_sign_key(owner_dir)


# ---- policy --------------------------------------------------------------------------------

def test_policy_edits_round_trip(owner_dir):
    host = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    tpm = generate_private_key(SECP256R1()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    policy.edit(owner_dir, "add", "core", H32.upper())
    policy.edit(owner_dir, "add", "host", host)
    policy.edit(owner_dir, "add", "tpm", tpm.hex())
    policy.edit(owner_dir, "min-version", value=3)
    p = policy.edit(owner_dir, "require-tpm", value=True)
    assert p == policy.load_policy(owner_dir)
    assert p == {"version": 1, "core_measurements": [H32], "trusted_hosts": [host],
                 "trusted_tpms": [tpm.hex()], "min_core_version": 3, "require_tpm": True}
    policy.edit(owner_dir, "remove", "core", H32)
    policy.edit(owner_dir, "remove", "tpm", tpm.hex())
    assert policy.load_policy(owner_dir)["core_measurements"] == []
    assert policy.load_policy(owner_dir)["trusted_tpms"] == []
    with pytest.raises(OwnerError, match="does not list"):
        policy.edit(owner_dir, "remove", "core", H32)
    assert "require_tpm: yes" in policy.describe(policy.load_policy(owner_dir))


def test_policy_tpm_key_from_a_pem_file(owner_dir, tmp_path):
    key = generate_private_key(SECP256R1()).public_key()
    pem = tmp_path / "ak.pem"
    pem.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    p = policy.edit(owner_dir, "add", "tpm", f"@{pem}")
    assert p["trusted_tpms"] == [key.public_bytes(Encoding.DER,
                                                  PublicFormat.SubjectPublicKeyInfo).hex()]


@pytest.mark.parametrize("kind, value, why", [
    ("core", "xyz", "not hex"), ("core", "ab" * 31, "expected 32 bytes"),
    ("host", "ab" * 33, "expected 32 bytes"), ("tpm", "3059", "not a public key"),
    ("vm", H32, "unknown policy list")])
def test_policy_refuses_bad_values(owner_dir, kind, value, why):
    with pytest.raises(OwnerError, match=why):
        policy.edit(owner_dir, "add", kind, value)


def test_a_tampered_policy_is_refused(owner_dir):
    policy.edit(owner_dir, "add", "core", H32)
    path = owner_dir / "policy.json"
    signed = path.read_bytes()
    path.write_bytes(signed.replace(H32.encode(), b"cd" * 32))
    with pytest.raises(OwnerError, match="does not match its signature"):
        policy.load_policy(owner_dir)
    with pytest.raises(OwnerError, match="does not match its signature"):
        policy.edit(owner_dir, "add", "core", "ef" * 32)
    path.write_bytes(signed)                     # paired control: the signed bytes load
    assert policy.load_policy(owner_dir)["core_measurements"] == [H32]
    other = Ed25519PrivateKey.generate()
    (owner_dir / "policy.json.sig").write_bytes(other.sign(signed))
    with pytest.raises(OwnerError, match="does not match its signature"):
        policy.load_policy(owner_dir)


def test_a_policy_signed_but_malformed_is_refused(owner_dir):
    bad = policy.default_policy() | {"require_tpm": "yes"}
    data = A.canonical(bad)
    (owner_dir / "policy.json").write_bytes(data)
    (owner_dir / "policy.json.sig").write_bytes(keys.load_sign_key(owner_dir).sign(data))
    with pytest.raises(OwnerError, match="require_tpm"):
        policy.load_policy(owner_dir)


# ---- manifests and VM keys -------------------------------------------------------------------

def test_sign_writes_a_manifest_matching_the_image(owner_dir, guest):
    r = manifest.sign_guest(owner_dir, guest, "web1", cmdline="quiet", memory_mib=512, vcpus=2,
                            entry="long", devices=["rng", "net", "rng"], min_core_version=2)
    vdir = owner_dir / "vms" / "web1"
    m = json.loads((vdir / "manifest.json").read_bytes())
    assert m["image_sha256"] == hashlib.sha256(guest.read_bytes()).hexdigest()
    assert m == {"version": 1, "name": "web1", "image_sha256": m["image_sha256"],
                 "cmdline": "quiet", "memory_mib": 512, "vcpus": 2, "entry": "long",
                 "devices": ["net", "rng"], "min_core_version": 2}
    pub = keys.load_public(owner_dir)["sign"]
    assert A.verify_manifest(pub, (vdir / "manifest.json").read_bytes(),
                             (vdir / "manifest.json.sig").read_bytes()) == m
    assert manifest.load_manifest(owner_dir, "web1", pub) == m and r["keys_created"]
    assert mode(vdir / "keys.json") == 0o600
    assert set(A.parse_vm_keys(manifest.load_vm_keys(owner_dir, "web1"))) == \
        {"disk", "net", "snapshot"}


def test_resigning_keeps_the_vm_keys(owner_dir, guest):
    manifest.sign_guest(owner_dir, guest, "web1")
    first = manifest.load_vm_keys(owner_dir, "web1")
    r = manifest.sign_guest(owner_dir, guest, "web1", cmdline="new")
    assert not r["keys_created"] and manifest.load_vm_keys(owner_dir, "web1") == first
    other = manifest.sign_guest(owner_dir, guest, "web2")
    assert manifest.load_vm_keys(owner_dir, "web2") != first and other["keys_created"]


def test_vm_keys_open_to_others_are_refused(owner_dir, guest):
    manifest.sign_guest(owner_dir, guest, "web1")
    path = owner_dir / "vms" / "web1" / "keys.json"
    os.chmod(path, 0o644)
    with pytest.raises(OwnerError, match=f"{path}: mode 0644"):
        manifest.load_vm_keys(owner_dir, "web1")


@pytest.mark.parametrize("name", ["../escape", "Web1", "", "a" * 64, "x/y"])
def test_vm_names_cannot_leave_the_directory(owner_dir, guest, name):
    with pytest.raises(OwnerError, match="VM name"):
        manifest.sign_guest(owner_dir, guest, name)


def test_an_altered_manifest_is_refused(owner_dir, guest):
    manifest.sign_guest(owner_dir, guest, "web1", cmdline="quiet")
    path = owner_dir / "vms" / "web1" / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b"quiet", b"init=/bin/sh"))
    with pytest.raises(OwnerError, match="manifest signature by the owner key does not verify"):
        manifest.load_manifest(owner_dir, "web1", keys.load_public(owner_dir)["sign"])


# ---- the CLI -------------------------------------------------------------------------------

def owner_cli(*argv: str) -> int:
    p = argparse.ArgumentParser(prog="sealvm")
    cli.add_parser(p.add_subparsers(dest="command"))
    return cli.run(p.parse_args(["owner", *argv]))


def test_cli_init_sign_policy_verify(tmp_path, guest, capsys):
    d = str(tmp_path / "o")
    assert owner_cli("init", d) == 0
    assert owner_cli("init", d) == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert owner_cli("sign", "--dir", d, str(guest), "--name", "web1", "--memory", "1G",
                     "--devices", "rng,net") == 0
    assert json.loads((tmp_path / "o/vms/web1/manifest.json").read_text())["memory_mib"] == 1024
    assert owner_cli("policy", "--dir", d, "add", "core", H32) == 0
    assert owner_cli("policy", "--dir", d, "require-tpm", "yes") == 0
    assert H32 in capsys.readouterr().out
    m = str(tmp_path / "o/vms/web1/manifest.json")
    assert owner_cli("verify", "--dir", d, "--manifest", m, "--image", str(guest)) == 0
    guest.write_bytes(b"other image")
    assert owner_cli("verify", "--dir", d, "--manifest", m, "--image", str(guest)) == 1
    assert "differs from the manifest" in capsys.readouterr().out
    os.chmod(tmp_path / "o/owner-sign.key", 0o644)
    assert owner_cli("policy", "--dir", d, "show") == 1
    assert "mode 0644" in capsys.readouterr().err


def test_cli_help_explains_each_action(capsys):
    for action in ("init", "sign", "policy", "broker", "verify"):
        with pytest.raises(SystemExit):
            owner_cli(action, "--help")
        out = capsys.readouterr().out
        assert len(out) > 300, action
