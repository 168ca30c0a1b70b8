"""The launcher's request parser against arbitrary bytes (it runs as root)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealvm.launcher import protocol as L
from sealvm.launcher.spawn import VM_ID_RE, LaunchError

GOOD = L.encode_request(L.OP_SPAWN, "vm-1", 256)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2 * L.REQUEST_SIZE))
def test_random_bytes_are_parsed_or_refused(data):
    try:
        req = L.parse_request(data)
    except LaunchError:
        return
    assert req.op in (L.OP_SPAWN, L.OP_PING)
    if req.op == L.OP_SPAWN:
        assert VM_ID_RE.fullmatch(req.vm_id) and 2 <= req.memory_mib <= 65536


@settings(max_examples=400, deadline=None)
@given(st.integers(0, L.REQUEST_SIZE - 1), st.integers(0, 255))
def test_any_single_byte_change_is_caught_or_still_valid(pos, value):
    data = bytearray(GOOD)
    data[pos] = value
    try:
        req = L.parse_request(bytes(data))
    except LaunchError:
        return
    assert VM_ID_RE.fullmatch(req.vm_id) and 2 <= req.memory_mib <= 65536


@given(st.from_regex(VM_ID_RE, fullmatch=True), st.integers(2, 65536))
def test_valid_requests_round_trip(vm_id, mib):
    req = L.parse_request(L.encode_request(L.OP_SPAWN, vm_id, mib))
    assert (req.vm_id, req.memory_mib) == (vm_id, mib)


@pytest.mark.parametrize("data,needle", [
    (GOOD[:-1], "bytes, expected"),
    (struct.pack("<I", 0) + GOOD[4:], "magic"),
    (GOOD[:4] + b"\x09" + GOOD[5:], "unknown op"),
    (GOOD[:5] + b"\x80" + GOOD[6:], "flags"),
    (L.encode_request(L.OP_SPAWN, "../etc", 256), "bad VM id"),
    (L.encode_request(L.OP_SPAWN, "Upper", 256), "bad VM id"),
    (L.encode_request(L.OP_SPAWN, "vm-1\n", 256), "bad VM id"),   # found by fuzz/targets/launcher
    (L.encode_request(L.OP_SPAWN, "vm", 1), "memory"),
    (L.encode_request(L.OP_SPAWN, "vm", 1 << 20), "memory"),
    (GOOD[:16] + b"vm\0x" + GOOD[20:], "after its terminating NUL"),
    (GOOD[:-1] + b"\x01", "reserved"),
])
def test_each_bad_request_class_is_refused_with_a_reason(data, needle):
    with pytest.raises(LaunchError, match=needle):
        L.parse_request(data)
