"""The core's half of attestation: check the signed manifest, prove itself, open its keys.

The launcher hands the core (by a pipe only it holds) the measured log of its
code, its own attestation key and the signed root.  At CONFIGURE the core
checks the owner's signed manifest against what it is about to run and adds
the owner's key and the guest's measurements to the log; at START, before any
guest instruction and before its seccomp filter, it answers the broker's
challenge through the preboot stage with evidence signed by its attestation
key, and opens the released keys with a fresh ephemeral key.  With a TPM
(the bundle names it instead of a software root) the preboot stage extends the
core's entries into PCR 23 and returns a quote as the root.  Keys the host
relays or swaps do not open: they must be sealed with the owner's wrap key.
"""
from __future__ import annotations

import json
import socket

from ..wire import bootchannel as channel

CORE_VERSION = 1
MAX_BUNDLE = 8 << 20


class AttestationFailed(Exception):
    """No keys: the manifest, the broker or the exchange said no (message says which)."""


def read_bundle(fd: int) -> dict | None:
    """The launcher's boot bundle from the pipe `fd` (-1: started without one)."""
    if fd < 0:
        return None
    import os
    with os.fdopen(fd, "rb") as f:
        n = int.from_bytes(f.read(4), "little")
        if not 0 < n <= MAX_BUNDLE:
            raise AttestationFailed(f"boot bundle of {n} bytes")
        data = f.read(n)
    return json.loads(data)


class Attestation:
    def __init__(self, bundle: dict, preboot_fd: int):
        self.bundle = bundle
        self.preboot = socket.socket(fileno=preboot_fd) if preboot_fd >= 0 else None
        self.launched = len(bundle["log"])       # entries the launcher made (and extended)
        self.manifest: dict | None = None
        self.keys: dict[str, bytes] | None = None
        self.generation = 0                      # the broker's count for this copy of the VM
        self.result = "no attestation (no owner manifest given)"

    def configure(self, blob: bytes, image: bytes | None, cmdline: str, memory_mib: int,
                  vcpus: int, entry: str, devices: list[str], restore: dict | None = None,
                  migrate_from: int | None = None, initrd: bytes | None = None) -> None:
        """Check the owner's manifest bundle; add owner and guest entries to the log.  For a
        restore (image None, `restore` = {"generation", "set"}), the guest is what the
        snapshot holds: the manifest's own values are measured, with the snapshot named."""
        from ..wire import attest as A
        try:
            m = json.loads(blob)
            owner_sign, owner_wrap = bytes.fromhex(m["owner_sign"]), bytes.fromhex(m["owner_wrap"])
            manifest = A.verify_manifest(owner_sign, m["manifest"].encode(),
                                         bytes.fromhex(m["signature"]))
            self.broker = str(m["broker"])
        except (ValueError, KeyError, TypeError) as e:
            raise AttestationFailed(f"owner manifest refused: {e}") from None
        if image is None:        # a restore: the snapshot must hold what the owner signed
            cmdline, memory_mib, vcpus, entry, devices = (
                manifest[k] for k in ("cmdline", "memory_mib", "vcpus", "entry", "devices"))
        digest = (bytes.fromhex(manifest["image_sha256"]) if image is None else
                  A.linux_image_sha256(image, initrd) if entry == "linux" else A.sha256(image))
        diffs = A.compare_manifest(manifest, digest, cmdline, memory_mib, vcpus, entry, devices)
        if diffs:
            raise AttestationFailed("the guest differs from the owner's signed manifest: "
                                    + "; ".join(diffs))
        self.manifest, self.owner_wrap = manifest, owner_wrap
        self.bundle["log"] += [A.core_config_entry(CORE_VERSION, owner_wrap),
                               *A.guest_entries(digest, cmdline, memory_mib, vcpus, entry,
                                                devices)]
        if restore is not None:
            self.bundle["log"].append(A.restore_entry(restore["generation"], restore["set"]))
        if migrate_from is not None:
            self.bundle["log"].append(A.migrate_in_entry(migrate_from))

    def release(self) -> None:
        """Run the broker round through the preboot stage; keep the opened keys."""
        if self.keys is not None:
            return
        if self.manifest is None:
            self._dismiss()
            return
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from ..wire import attest as A
        if self.preboot is None:
            raise AttestationFailed("no preboot stage to reach the owner's broker")
        ak = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(self.bundle["ak"]))
        eph = X25519PrivateKey.generate()
        request = {"vm": self.manifest["name"], "broker": self.broker}
        tpm = self.bundle.get("tpm")
        if tpm is not None:      # preboot extends our entries into PCR 23 and quotes it
            request.update(tpm=str(tpm), entries=self.bundle["log"][self.launched:],
                           ak_pub=A._raw(ak.public_key()).hex(),
                           ephemeral_pub=A._raw(eph.public_key()).hex())
        try:
            channel.send(self.preboot, request)
            answer = channel.recv(self.preboot)
            if "error" in answer:
                raise AttestationFailed(f"no keys: {answer['error']}")
            nonce = bytes.fromhex(answer["nonce"])
            root = self.bundle["root"] if tpm is None else answer["root"]
            if tpm is not None and (type(root) is not dict or root.get("kind") != "tpm"):
                raise AttestationFailed("the preboot stage returned no TPM root")
            evidence, sig = A.make_evidence(self.manifest["name"], nonce, self.bundle["log"], ak,
                                            eph.public_key(), root)
            channel.send(self.preboot, {"evidence": evidence.decode(), "signature": sig.hex()})
            answer = channel.recv(self.preboot)
            if "error" in answer:
                raise AttestationFailed(f"the owner's broker released no keys: {answer['error']}")
            payload = A.unwrap_keys(bytes.fromhex(answer["wrapped"]), bytes.fromhex(answer["salt"]),
                                    eph, nonce, self.owner_wrap)
            self.keys, self.generation = A.parse_release(payload)
        except (channel.ChannelError, KeyError, ValueError) as e:
            raise AttestationFailed(f"attestation failed: {e}") from None
        finally:
            self._close()
        root = root["kind"]
        self.result = (f"attested to {self.broker} ({root} root); keys released: "
                       f"{', '.join(sorted(self.keys))}; generation {self.generation}")

    def _dismiss(self) -> None:
        if self.preboot is not None:
            try:
                channel.send(self.preboot, {"skip": True})
            except OSError:
                pass
            self._close()

    def _close(self) -> None:
        if self.preboot is not None:
            self.preboot.close()
            self.preboot = None
