"""The two-step preboot stage: attest to the owner's broker, hand the keys to the core, exit.

BitVisor's two-step execution: this process does the security work before the
guest's first instruction, with the HTTP client (and TPM stack) the runtime
core must not carry, and is gone before the guest runs.  The core drives it:

  core -> preboot  {"vm", "broker"}            (or {"skip": true}: no attestation)
  preboot -> core  {"nonce"}                   after POST /v1/challenge
  core -> preboot  {"evidence", "signature"}   evidence signed with the core's AK
  preboot -> core  {"wrapped", "salt"} | {"error"}   after POST /v1/attest
The preboot stage never sees a key in the clear: the broker seals the keys to
the core's ephemeral key, and only the core opens them.
"""
from __future__ import annotations

import socket
import sys

from ..wire import bootchannel as channel


def parse_args(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("--core-fd="):
        raise SystemExit("sealvm-preboot: usage: --core-fd=N")
    return int(argv[0].split("=", 1)[1])


def run(core: socket.socket) -> int:
    request = channel.recv(core)
    if request.get("skip"):
        return 0
    from ..owner.client import BrokerRefused, BrokerUnavailable, attest

    def make_evidence(nonce: bytes) -> tuple[bytes, bytes]:
        channel.send(core, {"nonce": nonce.hex()})
        answer = channel.recv(core)
        return answer["evidence"].encode(), bytes.fromhex(answer["signature"])

    try:
        wrapped, salt = attest(str(request["broker"]), str(request["vm"]), make_evidence)
    except (BrokerRefused, BrokerUnavailable, channel.ChannelError, KeyError, ValueError) as e:
        channel.send(core, {"error": str(e)[:2000]})
        return 1
    channel.send(core, {"wrapped": wrapped.hex(), "salt": salt.hex()})
    return 0


def main(argv: list[str] | None = None) -> int:
    fd = parse_args(sys.argv[1:] if argv is None else argv)
    core = socket.socket(fileno=fd)
    try:
        return run(core)
    except channel.ChannelError:
        return 2
    finally:
        core.close()
