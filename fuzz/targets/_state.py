"""A minimal valid VM state record (one vCPU, no virtio devices), for seeds."""
from __future__ import annotations

import ctypes

from sealvm.core import vmstate, vmstate_devices


def state() -> dict:
    cpu = {"id": 0, "msrs": [[0x10, 5]], "mp_state": 0}
    for name, cls in vmstate._BLOBS.items():
        cpu[name] = "00" * ctypes.sizeof(cls)
    serial = {r: 0 for r in (*vmstate_devices.SERIAL_REGS, *vmstate_devices.SERIAL_BITS)}
    serial["rx"] = ""
    st = {"format": vmstate.FORMAT, "version": vmstate.VERSION, "memory": 2 << 20,
          "vcpus": [cpu], "devices": {"serial": serial, "virtio": []}, "clock": 1,
          "irqchip": None, "pit": None}
    vmstate.check_state(st)
    return st
