"""Malformed migration streams and snapshot metadata are refused with the errors the core's
handlers catch (MigrationError, SnapshotError, VmStateError), never anything else.

Each case was found by fuzzing (fuzz/targets/{migration,snapshot}.py; their inputs are in
fuzz/regressions/): a record made by a core that holds the VM's key, so it passes every
MAC, but whose content is malformed.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from fuzz.targets import migration as FM
from fuzz.targets import snapshot as FS
from sealvm.core import migration as MG
from sealvm.core import snapshot as S
from sealvm.core import vmstate


def _receive(records: bytes):
    FM.setup()
    a, b = socket.socketpair()
    t = threading.Thread(target=FM._source, args=(b, records))
    t.start()
    try:
        return MG.receive(a, lambda vm, g: FM.KEY, lambda: FM.ram, FM.Built, lambda d, t: None)
    finally:
        a.close()
        t.join()
        b.close()


def test_a_memory_chunk_shorter_than_its_offset_is_refused():
    with pytest.raises(MG.MigrationError, match="is not memory"):
        _receive(FM._rec(1, b"\0\0\0"))


@pytest.mark.parametrize("meta", [b"[]", b"5", b'{"state":5,"config":{}}', b"[" * 5000,
                                  b'{"state":"{}","config":{},"wall_ns":"x","tsc_khz":1}'])
def test_malformed_vm_state_in_a_migration_stream_is_refused(meta):
    with pytest.raises(MG.MigrationError, match="malformed VM state"):
        _receive(FM._rec(4, meta))


def test_a_genuine_stream_still_arrives():
    built, generation, _ = _receive(FM.seeds()[0][1:])
    config, state = built.config, built.state
    assert config == {"memory_mib": 2} and state["vcpus"][0]["id"] == 0 and generation == FM.GEN
    clock = state["clock"]
    time.sleep(0.05)
    built.before_run[0]()              # at its first instruction the clock has gone on
    assert state["clock"] - clock >= 50_000_000
    assert FM.ram.read(4096, 4096) == b"\x01" * 4096


@pytest.mark.parametrize("meta", [{"config": {}, "state": 5, "ranges": []}, None])
def test_malformed_snapshot_metadata_is_refused(meta):
    FS.setup()
    raw = json.dumps(meta).encode() if meta is not None else b"[" * 5000 + b"]" * 5000
    fd = os.memfd_create("t")
    try:
        os.write(fd, FS._file(raw))
        os.lseek(fd, 0, os.SEEK_SET)
        reader = S.Reader(fd)
        with pytest.raises(S.SnapshotError, match="metadata malformed"):
            S.load(reader, FS.KEY, FS.VM, reader.header.generation, FS._build, lambda d, t: None)
    finally:
        os.close(fd)


def test_deeply_nested_vm_state_is_a_vmstate_error():
    with pytest.raises(vmstate.VmStateError):
        vmstate.from_bytes(b"[" * 5000 + b"]" * 5000)
