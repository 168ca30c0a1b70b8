"""Device state for `vmstate`: the serial port and each virtio-mmio transport with its queues.

Kept out of the device modules so a core that never snapshots does not load
(or count in its TCB) this code; it reads and sets the same attributes the
device models do, under the transport's lock.  Device-specific state beyond
the transport (virtio-rng has none) is not covered.
"""
from __future__ import annotations

from .addr import GPA
from .devices.virtio.chain import VirtioGuestError
from .devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from .devices.virtio.mmio import STATUS_DRIVER_OK

SERIAL_REGS = ("ier", "lcr", "mcr", "scr", "dll", "dlm")
SERIAL_RX_LIMIT = 4096
TRANSPORT_INTS = {"status": 32, "interrupt_status": 32, "device_features_sel": 32,
                  "driver_features_sel": 32, "driver_features": 64, "queue_sel": 32,
                  "shm_sel": 32, "config_generation": 32}
QUEUE_INTS = {"size": 32, "desc": 64, "avail": 64, "used": 64, "last_avail_idx": 16,
              "used_idx": 16, "avail_idx": 16, "signalled_used": 16}
_MAX_QUEUES = 64


def _err(msg: str):
    from .vmstate import VmStateError
    return VmStateError(msg)


def check_int(what: str, v, bits: int = 64) -> None:
    if type(v) is not int or not 0 <= v < 1 << bits:
        raise _err(f"{what} is not a {bits}-bit unsigned integer")


def check_keys(what: str, d, keys: set) -> None:
    if not isinstance(d, dict) or set(d) != keys:
        raise _err(f"{what} must have exactly the keys {sorted(keys)}")



# ---- serial --------------------------------------------------------------------------
# The UART's interrupt bits travel too: a THR-empty interrupt the guest has not yet taken
# (thr) and the line level the restored irqchip holds (level).  Lost, a Linux 8250 driver
# waits forever for the interrupt that sends its next byte.
SERIAL_BITS = {"thr": "_thr_int", "level": "_level"}


def serial_state(s) -> dict:
    with s._lock:
        return {**{r: getattr(s, r) for r in SERIAL_REGS}, "rx": bytes(s._rx).hex(),
                **{k: int(getattr(s, a)) for k, a in SERIAL_BITS.items()}}


def set_serial_state(s, st: dict) -> None:
    with s._lock:
        for r in SERIAL_REGS:
            setattr(s, r, st[r])
        s._thr_int, s._level = bool(st["thr"]), st["level"]
        s._rx.clear()
        s._rx.extend(bytes.fromhex(st["rx"]))


# ---- virtio-mmio ---------------------------------------------------------------------
def _queue_state(q) -> dict:
    return {"size": q.size, "desc": int(q.desc), "avail": int(q.avail), "used": int(q.used),
            "ready": q.ready, "last_avail_idx": q.last_avail_idx, "used_idx": q.used_idx,
            "avail_idx": q._avail_idx, "signalled_used": q._signalled_used}


def transport_state(t) -> dict:
    with t._lock:
        st = {k: getattr(t, k) for k in TRANSPORT_INTS}
        st["features_beyond_64"] = t._driver_features_beyond_64
        st["broken_reason"] = t.broken_reason
        st["queues"] = [_queue_state(q) for q in t.queues]
        return st


def set_transport_state(t, st: dict) -> None:
    """Into a freshly reset transport (no guest running): registers, the device's
    negotiated features, then each ready queue re-validated against guest RAM."""
    if len(st["queues"]) != len(t.queues):
        raise _err(f"{t.name}: state has {len(st['queues'])} queues, device {len(t.queues)}")
    with t._lock:
        for k in TRANSPORT_INTS:
            setattr(t, k, st[k])
        t._driver_features_beyond_64 = st["features_beyond_64"]
        t.broken_reason = st["broken_reason"]
        if t.status & STATUS_DRIVER_OK:
            t.device.activate(t.driver_features)
        for q, qs in zip(t.queues, st["queues"]):
            q.size, q.desc, q.avail, q.used = qs["size"], GPA(qs["desc"]), GPA(qs["avail"]), \
                GPA(qs["used"])
            if not qs["ready"]:
                continue
            try:
                q.activate(t.memory, event_idx=bool(t.driver_features & VIRTIO_F_EVENT_IDX),
                           indirect=bool(t.driver_features & VIRTIO_F_INDIRECT_DESC))
            except VirtioGuestError as e:
                raise _err(f"{t.name}: restored queue is unusable: {e}") from None
            q.last_avail_idx, q.used_idx = qs["last_avail_idx"], qs["used_idx"]
            q._avail_idx, q._signalled_used = qs["avail_idx"], qs["signalled_used"]


# ---- the machine's devices ---------------------------------------------------------
DRAIN_ROUNDS = 64


def capture_devices(machine) -> dict:
    """Serial and virtio state of a paused machine.  Each queue is drained first (a
    worker may still hold notifications from before the pause), so guest RAM read
    afterwards matches the captured indices."""
    virtio = []
    for slot in machine.virtio:
        for q in range(len(slot.transport.queues)):
            for _ in range(DRAIN_ROUNDS):   # bounded: a receive queue may never run dry
                if not slot.transport.process_queue(q):
                    break
        virtio.append({"gpa": slot.gpa, "device_id": slot.transport.device.device_id,
                       "transport": transport_state(slot.transport)})
    return {"serial": serial_state(machine.serial), "virtio": virtio}


def restore_devices(machine, st: dict) -> None:
    if len(st["virtio"]) != len(machine.virtio):
        raise _err(f"state has {len(st['virtio'])} virtio devices, the machine "
                   f"{len(machine.virtio)} (same rng setting?)")
    for slot, ds in zip(machine.virtio, st["virtio"]):
        if ds["gpa"] != slot.gpa or ds["device_id"] != slot.transport.device.device_id:
            raise _err(f"virtio device {ds['device_id']} at {ds['gpa']:#x} does not match "
                       f"{slot.transport.name}")
        set_transport_state(slot.transport, ds["transport"])
    set_serial_state(machine.serial, st["serial"])


def check_devices(st) -> None:
    check_keys("devices", st, {"serial", "virtio"})
    check_keys("serial", st["serial"], {*SERIAL_REGS, "rx", *SERIAL_BITS})
    for r in (*SERIAL_REGS, *SERIAL_BITS):
        check_int(f"serial {r}", st["serial"][r], 1 if r in SERIAL_BITS else 8)
    rx = st["serial"]["rx"]
    if not isinstance(rx, str) or len(rx) > 2 * SERIAL_RX_LIMIT or len(rx) % 2 or \
            rx.strip("0123456789abcdef"):
        raise _err("serial rx is not hex of at most 4096 bytes")
    if not isinstance(st["virtio"], list) or len(st["virtio"]) > 32:
        raise _err("virtio must be a list of at most 32 devices")
    for i, d in enumerate(st["virtio"]):
        check_keys(f"virtio {i}", d, {"gpa", "device_id", "transport"})
        check_int(f"virtio {i} gpa", d["gpa"], 64)
        check_int(f"virtio {i} device_id", d["device_id"], 32)
        t = d["transport"]
        check_keys(f"virtio {i} transport", t, {*TRANSPORT_INTS, "features_beyond_64",
                                            "broken_reason", "queues"})
        for k, bits in TRANSPORT_INTS.items():
            check_int(f"virtio {i} {k}", t[k], bits)
        if type(t["features_beyond_64"]) is not bool:
            raise _err(f"virtio {i} features_beyond_64 is not a boolean")
        if t["broken_reason"] is not None and not (isinstance(t["broken_reason"], str)
                                                   and len(t["broken_reason"]) <= 1024):
            raise _err(f"virtio {i} broken_reason is not a short string or null")
        if not isinstance(t["queues"], list) or len(t["queues"]) > _MAX_QUEUES:
            raise _err(f"virtio {i} queues must be a list of at most {_MAX_QUEUES}")
        for j, q in enumerate(t["queues"]):
            check_keys(f"virtio {i} queue {j}", q, {*QUEUE_INTS, "ready"})
            for k, bits in QUEUE_INTS.items():
                check_int(f"virtio {i} queue {j} {k}", q[k], bits)
            if type(q["ready"]) is not bool:
                raise _err(f"virtio {i} queue {j} ready is not a boolean")
