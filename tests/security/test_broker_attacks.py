"""Attacks on key release, against the real key broker over HTTP.

The broker runs as it does in production (uvicorn on 127.0.0.1, a free port) from a
real owner directory: keys from `sealvm owner init`, a signed manifest for VM `web1`,
and a signed policy trusting one core measurement and one launcher host key
(software root).  The "core" is made of the pure helpers the real core uses
(sealvm.wire.attest): a measured log, a per-VM attestation key, an ephemeral X25519 key.

Each attack asserts that no key is released, the broker's 403 reason, and the refusal
line in broker.log.  Its paired control starts a broker with exactly the targeted
defence off (SEALVM_TEST_MODE=1 SEALVM_BROKER_TEST_DISABLE=<defence>) and shows the
same attack then succeeds: the attacker ends up holding the VM's real keys.  The
attacks on the answer (a swapped wrapped blob) are caught by the core, not the broker;
there the control is the unaltered blob, and a blob sealed with the owner's wrap key.
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealvm.owner import client, keys, manifest, policy
from sealvm.owner.broker import create_app
from sealvm.wire import attest as A

VM = "web1"
IMAGE = b"\x7fELF sealed guest image " * 64
CMDLINE = "console=hvc0 quiet"
HOST = Ed25519PrivateKey.generate()            # the trusted launcher's host root key
CODE = (("interpreter", "/usr/bin/python3.11", b"python3.11"),
        ("core-file", "sealvm/core/main.py", b"core main v1"),
        ("stdlib-file", "json/__init__.py", b"json"),
        ("pth-file", "distutils-precedence.pth", b"pth"))


def same_keys(payload: bytes, owner) -> bool:
    """The released payload carries exactly the owner's keys (and the VM's generation)."""
    keys, generation = A.parse_release(payload)
    return keys == A.parse_vm_keys(owner.keys) and generation >= 1


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def build_log(ak: Ed25519PrivateKey, owner_wrap: bytes, code=CODE, image=IMAGE,
              cmdline=CMDLINE) -> list[dict]:
    return ([A.make_entry(kind, name, h(data)) for kind, name, data in code]
            + [A.core_config_entry(1, owner_wrap), A.ak_entry(ak.public_key()),
               *A.guest_entries(h(image), cmdline, 256, 1, "pvh", ["rng"])])


@dataclass
class Core:
    """A test core: what the trusted core holds for one attestation."""
    owner_wrap: bytes
    host: Ed25519PrivateKey = HOST
    code: tuple = CODE
    image: bytes = IMAGE
    cmdline: str = CMDLINE
    ak: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    eph: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)

    @property
    def log(self) -> list[dict]:
        return build_log(self.ak, self.owner_wrap, self.code, self.image, self.cmdline)

    def evidence(self, nonce: bytes, eph_pub=None) -> tuple[bytes, bytes]:
        log = self.log
        root = A.software_root(self.host.public_key(), A.sign_log(self.host, log))
        return A.make_evidence(VM, nonce, log, self.ak, eph_pub or self.eph.public_key(), root)

    def open(self, answer: dict, nonce: bytes) -> bytes:
        return A.unwrap_keys(bytes.fromhex(answer["wrapped"]), bytes.fromhex(answer["salt"]),
                             self.eph, nonce, self.owner_wrap)


@dataclass
class Owner:
    dir: Path
    keys: bytes
    wrap_pub: bytes

    def core(self, **kw) -> Core:
        return Core(self.wrap_pub, **kw)


@pytest.fixture(scope="module")
def owner(tmp_path_factory) -> Owner:
    d = tmp_path_factory.mktemp("owner") / "owner"
    keys.init(d)
    (d.parent / "guest.elf").write_bytes(IMAGE)
    manifest.sign_guest(d, d.parent / "guest.elf", VM, cmdline=CMDLINE, memory_mib=256,
                        vcpus=1, entry="pvh", devices=["rng"])
    policy.edit(d, "add", "core", A.core_measurement(build_log(HOST, bytes(32))).hex())
    policy.edit(d, "add", "host", HOST.public_key().public_bytes_raw().hex())
    return Owner(d, manifest.load_vm_keys(d, VM), keys.load_public(d)["wrap"])


@dataclass
class Clock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


class Broker:
    """The real broker app served by uvicorn in a thread on a free 127.0.0.1 port."""

    def __init__(self, directory: Path, disable: str = "", clock=time.time):
        env = {"SEALVM_TEST_MODE": "1", "SEALVM_BROKER_TEST_DISABLE": disable} if disable else {}
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(directory, clock, env),
                                                    log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "broker did not start"
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)

    def challenge(self, vm: str = VM) -> bytes:
        r = self.http.post("/v1/challenge", json={"vm": vm})
        assert r.status_code == 200, r.text
        return bytes.fromhex(r.json()["nonce"])

    def attest(self, evidence: bytes, sig: bytes) -> httpx.Response:
        return self.http.post("/v1/attest", json={"evidence": evidence.decode(),
                                                  "signature": sig.hex()})

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def broker(owner):
    b = Broker(owner.dir)
    yield b
    b.close()


@pytest.fixture
def broker_without(owner):
    """broker_without("ak_sig"): the paired control's broker, one defence off."""
    started = []

    def start(defence: str, clock=time.time) -> Broker:
        started.append(Broker(owner.dir, defence, clock))
        return started[-1]
    yield start
    for b in started:
        b.close()


def last_log(owner: Owner) -> dict:
    return json.loads((owner.dir / "broker.log").read_text().splitlines()[-1])


def refused(owner: Owner, r: httpx.Response, reason: str) -> None:
    """403, the reason, no key material in the answer, and the refusal in broker.log."""
    assert r.status_code == 403, r.text
    body = r.json()
    assert set(body) == {"error"} and reason in body["error"], body
    line = last_log(owner)
    assert line["event"] == "refused" and reason in line["reason"], line


def released(owner: Owner, r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    assert last_log(owner)["event"] == "release"
    return r.json()


def paired(owner: Owner, defended: Broker, control: Broker, attack, reason: str) -> None:
    """`attack(broker) -> (response, steal)`: refused with `reason` by the defended broker;
    against the control, released, and `steal(answer)` yields the VM's real keys."""
    r, _ = attack(defended)
    refused(owner, r, reason)
    r, steal = attack(control)
    assert same_keys(steal(released(owner, r)), owner)


def stolen_by(key: X25519PrivateKey, nonce: bytes, owner: Owner):
    return lambda answer: A.unwrap_keys(bytes.fromhex(answer["wrapped"]),
                                        bytes.fromhex(answer["salt"]), key, nonce, owner.wrap_pub)


# ---- the baseline: a genuine core gets its keys --------------------------------------------

@pytest.mark.functional('baseline: a genuine core gets its keys')
def test_genuine_core_gets_its_keys_through_the_preboot_client(owner, broker):
    core = owner.core()
    seen = {}

    def make_evidence(nonce: bytes):
        seen["nonce"] = nonce
        return core.evidence(nonce)
    wrapped, salt = client.attest(broker.url, VM, make_evidence)
    got = A.unwrap_keys(wrapped, salt, core.eph, seen["nonce"], owner.wrap_pub)
    assert same_keys(got, owner) and set(A.parse_release(got)[0]) == {"disk", "net", "snapshot"}
    line = last_log(owner)
    assert line["event"] == "release" and line["nonce"] == seen["nonce"].hex()
    assert line["core_measurement"] == A.core_measurement(core.log).hex()
    assert "wrapped" not in line and owner.keys.decode() not in json.dumps(line)


@pytest.mark.functional("the preboot client reports the broker's refusal")
def test_client_raises_the_brokers_reason(owner, broker):
    with pytest.raises(client.BrokerRefused, match="evidence signature does not verify"):
        client.attest(broker.url, VM, lambda n: (owner.core().evidence(n)[0], bytes(64)))
    with pytest.raises(client.BrokerRefused, match="unknown VM 'nobody'"):
        client.attest(broker.url, "nobody", lambda n: (b"", b""))


# ---- nonces: the attacker later got an old core's ephemeral key (from its memory, say) -----

@pytest.mark.attack(adversary='key-broker impostor', asset='attestation',
                    technique='replay evidence captured more than 60 s earlier',
                    defence='nonce_fresh',
                    outcome="403 'nonce expired'; no key released",
                    control='inline')
def test_replayed_old_nonce_is_refused(owner, broker_without):
    """Evidence captured and held back past the nonce's 60 s, then sent."""
    clock = Clock()

    def attack(b):
        core = owner.core()
        nonce = b.challenge()
        captured = core.evidence(nonce)
        clock.now += 61
        return b.attest(*captured), lambda answer: core.open(answer, nonce)
    defended = Broker(owner.dir, clock=clock)
    try:
        paired(owner, defended, broker_without("nonce_fresh", clock), attack,
               "nonce expired: issued 61 s ago, a nonce is good for 60 s")
    finally:
        defended.close()


@pytest.mark.attack(adversary='key-broker impostor', asset='attestation',
                    technique='send the same evidence twice (nonce reuse)',
                    defence='nonce_once',
                    outcome="403 'nonce already used'",
                    control='inline')
def test_nonce_used_twice_is_refused(owner, broker, broker_without):
    def attack(b):
        core = owner.core()
        nonce = b.challenge()
        request = core.evidence(nonce)
        assert same_keys(core.open(released(owner, b.attest(*request)), nonce), owner)
        return b.attest(*request), lambda answer: core.open(answer, nonce)
    paired(owner, broker, broker_without("nonce_once"), attack, "nonce already used")


@pytest.mark.attack(adversary='key-broker impostor', asset='attestation',
                    technique='reuse a spent nonce after the broker restarts',
                    defence='nonce journal in broker.log',
                    outcome="403 'nonce already used'; an unused pre-restart nonce still works",
                    control='inline', baseline=True)
def test_a_restart_does_not_reopen_a_spent_nonce(owner):
    b = Broker(owner.dir)
    core, waiting = owner.core(), owner.core()
    nonce, open_nonce = b.challenge(), b.challenge()
    request = core.evidence(nonce)
    released(owner, b.attest(*request))
    b.close()
    b = Broker(owner.dir)                          # a new process reading broker.log
    try:
        refused(owner, b.attest(*request), "nonce already used")
        # paired: a challenge issued before the restart and not yet used still works
        assert same_keys(waiting.open(released(owner, b.attest(*waiting.evidence(open_nonce))),
                                      open_nonce), owner)
    finally:
        b.close()


# ---- who signed, and what code -------------------------------------------------------------

@pytest.mark.attack(adversary='key-broker impostor', asset='attestation',
                    technique='evidence from a patched core (different measurement)',
                    defence='core_measurement',
                    outcome="403 'core measurement ... is not in policy'",
                    control='inline')
def test_evidence_from_a_different_core_measurement_is_refused(owner, broker, broker_without):
    code = (*CODE[:1], ("core-file", "sealvm/core/main.py", b"core main, patched"), *CODE[2:])
    patched = A.core_measurement(owner.core(code=code).log).hex()

    def attack(b):
        core = owner.core(code=code)
        nonce = b.challenge()
        return b.attest(*core.evidence(nonce)), lambda answer: core.open(answer, nonce)
    paired(owner, broker, broker_without("core_measurement"), attack,
           f"core measurement {patched} is not in policy core_measurements")


@pytest.mark.attack(adversary='key-broker impostor', asset='attestation',
                    technique="genuine log with the impostor's own ephemeral key, signed by another key",
                    defence='ak_sig',
                    outcome="403 'evidence signature does not verify'",
                    control='inline')
def test_forged_evidence_signature_is_refused(owner, broker, broker_without):
    """An impostor replays a genuine core's log, AK and host signature with its own key."""
    genuine = owner.core()

    def attack(b):
        attacker = X25519PrivateKey.generate()
        nonce = b.challenge()
        ev = json.loads(genuine.evidence(nonce)[0])
        ev["ephemeral_pub"] = A._raw(attacker.public_key()).hex()
        forged = A.canonical(ev)
        return (b.attest(forged, Ed25519PrivateKey.generate().sign(forged)),
                stolen_by(attacker, nonce, owner))
    paired(owner, broker, broker_without("ak_sig"), attack,
           "evidence signature does not verify with ak_pub")


@pytest.mark.attack(adversary='key-broker impostor', asset='attestation',
                    technique='a rogue launcher key vouching for the trusted core',
                    defence='root_trust',
                    outcome="403 'host key ... is not in policy trusted_hosts'",
                    control='inline')
def test_host_key_not_in_policy_is_refused(owner, broker, broker_without):
    """The attacker's own launcher key vouches for a log claiming the trusted core."""
    rogue = Ed25519PrivateKey.generate()

    def attack(b):
        core = owner.core(host=rogue)
        nonce = b.challenge()
        return b.attest(*core.evidence(nonce)), lambda answer: core.open(answer, nonce)
    paired(owner, broker, broker_without("root_trust"), attack,
           f"software root: host key {A._raw(rogue.public_key()).hex()} is not in policy "
           "trusted_hosts")


@pytest.mark.attack(adversary='key-broker impostor', asset='attestation',
                    technique='claim the trusted host key over a log it never signed',
                    defence='root_sig',
                    outcome="403 'log signature does not verify'",
                    control='inline')
def test_log_signature_not_by_the_trusted_host_is_refused(owner, broker, broker_without):
    """The evidence names the trusted host key, but the host never signed this log."""
    def attack(b):
        core = owner.core()
        nonce = b.challenge()
        ev = json.loads(core.evidence(nonce)[0])
        ev["root"]["log_sig"] = Ed25519PrivateKey.generate().sign(b"x").hex()
        data = A.canonical(ev)
        return b.attest(data, core.ak.sign(data)), lambda answer: core.open(answer, nonce)
    paired(owner, broker, broker_without("root_sig"), attack,
           "software root: log signature does not verify with host_pub")


# ---- a man in the middle ---------------------------------------------------------------------

@pytest.mark.attack(adversary='host daemon', asset='attestation',
                    technique="man in the middle swaps the core's ephemeral key",
                    defence='ak_sig',
                    outcome='403; the real core cannot open a release made for another key',
                    control='inline')
def test_mitm_swapping_the_ephemeral_key_is_refused(owner, broker, broker_without):
    def attack(b):
        core, attacker = owner.core(), X25519PrivateKey.generate()
        nonce = b.challenge()
        data, sig = core.evidence(nonce)
        ev = json.loads(data)
        ev["ephemeral_pub"] = A._raw(attacker.public_key()).hex()
        steal = stolen_by(attacker, nonce, owner)

        def steal_and_check(answer):
            with pytest.raises(A.AttestError):        # and the real core cannot open it
                core.open(answer, nonce)
            return steal(answer)
        return b.attest(A.canonical(ev), sig), steal_and_check   # the core's signature, kept
    paired(owner, broker, broker_without("ak_sig"), attack,
           "evidence signature does not verify with ak_pub")


@pytest.mark.attack(adversary='host daemon', asset='attestation',
                    technique="swap the broker's wrapped keys (attacker-sealed, other session, bit flip)",
                    defence='owner binding of the wrap (HPKE-style auth)',
                    outcome="the core refuses each blob: 'do not open'",
                    control='inline')
def test_mitm_swapping_the_wrapped_keys_is_caught_by_the_core(owner, broker):
    """The broker's answer travels through the host: the core must notice a swap."""
    core = owner.core()
    nonce = broker.challenge()
    answer = released(owner, broker.attest(*core.evidence(nonce)))
    wrapped, salt = bytes.fromhex(answer["wrapped"]), bytes.fromhex(answer["salt"])
    # keys the attacker chose, sealed to the core's (public) ephemeral key and the nonce
    chosen = A.canonical({k: "ee" * 32 for k in A.VM_KEY_NAMES})
    forged = A.wrap_keys(chosen, core.eph.public_key(), nonce, X25519PrivateKey.generate())
    n2 = broker.challenge()                           # a release made for another attestation
    stale = released(owner, broker.attest(*owner.core().evidence(n2)))
    swaps = {"attacker-sealed keys": forged,
             "another session's blob": (bytes.fromhex(stale["wrapped"]),
                                        bytes.fromhex(stale["salt"])),
             "one bit flipped": (wrapped[:-5] + bytes([wrapped[-5] ^ 1]) + wrapped[-4:], salt)}
    for name, (w, s) in swaps.items():
        with pytest.raises(A.AttestError, match="do not open"):
            A.unwrap_keys(w, s, core.eph, nonce, owner.wrap_pub)
            pytest.fail(f"the core accepted {name}")
    # paired controls: the unaltered answer opens; so does a blob sealed with the owner's
    # wrap key, so the refusal above is the owner binding and not a broken construction
    assert same_keys(A.unwrap_keys(wrapped, salt, core.eph, nonce, owner.wrap_pub), owner)
    with_owner_key = A.wrap_keys(chosen, core.eph.public_key(), nonce,
                                 keys.load_wrap_key(owner.dir))
    assert A.unwrap_keys(*with_owner_key, core.eph, nonce, owner.wrap_pub) == chosen


# ---- the guest the core would boot ---------------------------------------------------------

@pytest.mark.attack(adversary='key-broker impostor', asset='attestation',
                    technique='evidence for a different guest image or command line',
                    defence='manifest',
                    outcome="403 'manifest mismatch: <item>'",
                    control='inline', variants='item')
@pytest.mark.parametrize("change, item", [
    ({"image": IMAGE + b"\x90 backdoor"}, "image_sha256"),
    ({"cmdline": CMDLINE + " init=/bin/sh"}, "cmdline")])
def test_manifest_mismatch_is_refused(owner, broker, broker_without, change, item):
    def attack(b):
        core = owner.core(**change)
        nonce = b.challenge()
        r = b.attest(*core.evidence(nonce))
        assert r.status_code != 403 or r.json()["error"].count(": signed ") == 1
        return r, lambda answer: core.open(answer, nonce)
    paired(owner, broker, broker_without("manifest"), attack, f"manifest mismatch: {item}: signed ")


@pytest.mark.attack(adversary='key-broker impostor', asset='attestation',
                    technique='software-root evidence where the owner requires a TPM',
                    defence='require_tpm',
                    outcome="403 'policy requires a TPM root'",
                    control='inline')
def test_require_tpm_refuses_a_software_root(owner, broker, broker_without):
    def attack(b):
        core = owner.core()
        nonce = b.challenge()
        return b.attest(*core.evidence(nonce)), lambda answer: core.open(answer, nonce)
    policy.edit(owner.dir, "require-tpm", value=True)
    try:
        paired(owner, broker, broker_without("require_tpm"), attack,
               "policy requires a TPM root; this evidence has a software root")
    finally:
        policy.edit(owner.dir, "require-tpm", value=False)
