"""Whole-VM state: capture a paused Machine, serialise it, restore it into a new one.

    m.pause()
    state = vmstate.capture_vm(m)              # vCPUs, devices, VM clock
    ram = vmstate.read_ram(m.memory)           # still paused: consistent with `state`
    blob = vmstate.to_bytes(state)             # canonical JSON, versioned, size-capped
    m2 = Machine(MachineConfig(image=b"", memory=..., vcpus=...,
                               restore=vmstate.Restore(vmstate.from_bytes(blob), ram)), console)
    m2.build(); m2.start(); m2.resume()        # a restore starts paused unless paused=False

Loaded only by snapshot/restore (not by a core that just runs a guest), so it
does not count in the running core's TCB until used.  Device state lives in
`vmstate_devices.py`.

Host quirks (kvm_pvm, Debian 12): MXCSR travels only in XSAVE, so XSAVE, not
KVM_GET_FPU, carries the FPU/SSE state; some MSRs KVM lists cannot be written
back (MSR_KVM_ASYNC_PF_INT, 0x4b564d06, here), so the MSR set is what a
scratch vCPU of a scratch VM can both read and write back (`savable_msrs`,
once per Kvm).  A Linux machine has the in-kernel irqchip (PIC pair, IOAPIC,
one LAPIC per vCPU) and PIT; their state travels too (`capture_platform`), the
LAPICs in the vCPU records.  The TSC travels as MSR_IA32_TSC and, with the VM
clock, is written again just before the restored guest first runs
(`restart_clock`): its clocks continue from the capture, so the time the restore
took is invisible to it.  (kvm_pvm ignores a TSC written from the host: its guests
read the host's TSC; there only kvmclock continues.)
"""
from __future__ import annotations

import ctypes
import json
import weakref
from dataclasses import dataclass

from .kvm import state as KS, state_structs as SS, structs as S
from .kvm.api import Kvm, KvmError, VcpuFd, VcpuInterrupted
from .vcpu import Vcpu, VcpuControl
from . import vmstate_devices as devstate

FORMAT = "sealvm-vmstate"
VERSION = 1
MAX_STATE_BYTES = 4 << 20          # 64 vCPUs with 4 KiB XSAVE areas fit easily

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
# The ctypes blobs a vCPU record carries, in restore order (see restore_vcpu).
_BLOBS = {"sregs": S.kvm_sregs, "regs": S.kvm_regs, "xcrs": SS.kvm_xcrs, "xsave": SS.kvm_xsave,
          "debugregs": SS.kvm_debugregs, "lapic": SS.kvm_lapic_state,
          "events": SS.kvm_vcpu_events}


class VmStateError(ValueError):
    """A state blob or record is malformed, of another version, or does not fit this VM."""


@dataclass(frozen=True)
class Restore:
    """What `MachineConfig.restore` takes: a state dict and the guest RAM, in RAM-region order
    (None: the caller writes RAM itself after build())."""
    state: dict
    memory: bytes | None
    paused: bool = True


# ---- MSRs ------------------------------------------------------------------------------
_MSR_CACHE: "weakref.WeakKeyDictionary[Kvm, tuple[int, ...]]" = weakref.WeakKeyDictionary()


def savable_msrs(kvm: Kvm) -> tuple[int, ...]:
    """MSRs from KVM's index list that a fresh vCPU (full supported CPUID) can read and
    write back on this host; probed once per Kvm in a throwaway VM."""
    cached = _MSR_CACHE.get(kvm)
    if cached is not None:
        return cached
    keep = []
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.set_cpuid2(kvm.supported_cpuid())
        for index in KS.msr_index_list(kvm):
            try:
                KS.set_msrs(vcpu, KS.get_msrs(vcpu, [index]))
            except KvmError:
                continue          # e.g. a paravirtual MSR whose feature CPUID leaves off
            keep.append(index)
    _MSR_CACHE[kvm] = result = tuple(sorted(keep))
    return result


# ---- one vCPU --------------------------------------------------------------------------
def sync_vcpu(vcpu: VcpuFd) -> None:
    """Complete an I/O or MMIO exit the kernel still owes (KVM_RUN with immediate_exit):
    until then registers may not reflect the finished instruction.  The vCPU's thread
    must be parked."""
    run = vcpu.run_struct
    run.immediate_exit = 1
    try:
        reason = vcpu.run()
    except VcpuInterrupted:
        reason = None
    finally:
        run.immediate_exit = 0
    if reason is not None:
        raise KvmError("KVM_RUN", 0, f"vCPU {vcpu.vcpu_id} exited ({reason}) with immediate_exit set")


def capture_vcpu(vcpu: VcpuFd, msrs: tuple[int, ...], lapic: bool = False) -> dict:
    """The architectural state of one vCPU as a dict of hex blobs and ints."""
    rec = {"id": vcpu.vcpu_id, "sregs": vcpu.get_sregs(), "regs": vcpu.get_regs(),
           "xcrs": KS.get_xcrs(vcpu), "xsave": KS.get_xsave(vcpu),
           "debugregs": KS.get_debugregs(vcpu), "events": KS.get_vcpu_events(vcpu),
           "lapic": KS.get_lapic(vcpu) if lapic else None}
    out = {k: (bytes(v).hex() if k in _BLOBS and v is not None else v) for k, v in rec.items()}
    out["msrs"] = [[i, v] for i, v in sorted(KS.get_msrs(vcpu, msrs).items())]
    out["mp_state"] = KS.get_mp_state(vcpu)
    return out


def _blob(rec: dict, name: str):
    return _BLOBS[name].from_buffer_copy(bytes.fromhex(rec[name]))


def restore_vcpu(vcpu: VcpuFd, rec: dict) -> None:
    """Apply a `capture_vcpu` record (checked by `check_state`) to a vCPU with CPUID set.

    Order: sregs (EFER, CR0/CR4 decide what is valid next), regs, XCRs before XSAVE
    (XCR0 selects the components), MSRs (the TSC among them), debug registers,
    LAPIC then the TSC deadline again, MP state, and pending events last so nothing
    above clears them.
    """
    vcpu.set_sregs(_blob(rec, "sregs"))
    vcpu.set_regs(_blob(rec, "regs"))
    KS.set_xcrs(vcpu, _blob(rec, "xcrs"))
    KS.set_xsave(vcpu, _blob(rec, "xsave"))
    KS.set_msrs(vcpu, {i: v for i, v in rec["msrs"]})
    KS.set_debugregs(vcpu, _blob(rec, "debugregs"))
    if rec["lapic"] is not None:
        KS.set_lapic(vcpu, _blob(rec, "lapic"))
        # KVM drops a TSC deadline written while the LAPIC timer is not in TSC-deadline
        # mode (a fresh vCPU's is not): write it again now, or the guest's next timer
        # interrupt never comes
        KS.set_msrs(vcpu, {i: v for i, v in rec["msrs"] if i == MSR_IA32_TSC_DEADLINE})
    if KS.get_mp_state(vcpu) != rec["mp_state"]:   # without an irqchip only RUNNABLE exists
        KS.set_mp_state(vcpu, rec["mp_state"])
    KS.set_vcpu_events(vcpu, _blob(rec, "events"))


# ---- the in-kernel interrupt controllers and PIT (Linux machines) ----------------------
IRQCHIPS = 3                 # PIC master, PIC slave, IOAPIC


def capture_platform(vm) -> dict:
    return {"irqchip": [bytes(KS.get_irqchip(vm, i)).hex() for i in range(IRQCHIPS)],
            "pit": bytes(KS.get_pit2(vm)).hex()}


def restore_platform(vm, st: dict) -> None:
    """After the vCPUs (and their LAPICs) exist: the PICs, the IOAPIC's routes, the PIT."""
    for h in st["irqchip"]:
        KS.set_irqchip(vm, SS.kvm_irqchip.from_buffer_copy(bytes.fromhex(h)))
    KS.set_pit2(vm, SS.kvm_pit_state2.from_buffer_copy(bytes.fromhex(st["pit"])))


def _check_hex(what: str, h, cls) -> bytes:
    if not isinstance(h, str) or len(h) != 2 * ctypes.sizeof(cls) or h.strip("0123456789abcdef"):
        raise VmStateError(f"{what} is not {ctypes.sizeof(cls)} bytes of hex")
    return bytes.fromhex(h)


def check_platform(st: dict) -> None:
    if not isinstance(st["irqchip"], list) or len(st["irqchip"]) != IRQCHIPS:
        raise VmStateError(f"irqchip must be a list of {IRQCHIPS} chips")
    for i, h in enumerate(st["irqchip"]):
        if SS.kvm_irqchip.from_buffer_copy(_check_hex(f"irqchip {i}", h, SS.kvm_irqchip)).chip_id != i:
            raise VmStateError(f"irqchip {i} names another chip")
    _check_hex("pit", st["pit"], SS.kvm_pit_state2)


# ---- the whole VM ----------------------------------------------------------------------
def capture_vm(machine) -> dict:
    """State of a paused Machine: every vCPU, the devices, the VM clock.  Read guest RAM
    (`read_ram`) before resuming so it matches.  Refused unless every vCPU is parked."""
    c = machine.control
    with c.cond:
        if c.state != VcpuControl.PAUSED or c.parked != len(machine.vcpus):
            raise VmStateError("capture needs a paused machine (every vCPU parked)")
    devices = devstate.capture_devices(machine)     # drains queued work first
    if getattr(machine, "blk", None) is not None and machine.blk.disk is not None:
        from .diskseal import DiskError
        try:
            machine.blk.disk.flush()     # the sealed disk is left at least as new as the state
        except (OSError, DiskError) as e:
            raise VmStateError(f"the disk could not be committed: {e}") from None
    msrs = savable_msrs(machine.kvm)
    cpus = []
    for v in machine.vcpus:
        sync_vcpu(v.fd)
        cpus.append(capture_vcpu(v.fd, msrs, lapic=machine.linux))
    platform = capture_platform(machine.vm) if machine.linux else {"irqchip": None, "pit": None}
    return {"format": FORMAT, "version": VERSION, "memory": machine.memory.size,
            "vcpus": cpus, "devices": devices, "clock": KS.get_clock(machine.vm).clock,
            **platform}


def read_ram(memory) -> bytes:
    """Guest RAM, region after region (what `Restore.memory` takes)."""
    return b"".join(memory.read(r.gpa, r.size) for r in memory.regions)


def finish_restore(machine, restore: Restore) -> None:
    """Machine.build() for a restore, after RAM slots and devices exist: fill RAM, create
    the vCPUs with CPUID and the captured state, restore devices and the clock."""
    from .machine import MachineError
    st, cfg, mem = restore.state, machine.config, machine.memory
    try:
        check_state(st)
    except VmStateError as e:
        raise MachineError(f"cannot restore: {e}") from None
    got = mem.size if restore.memory is None else len(restore.memory)
    if st["memory"] != mem.size or got != mem.size:
        raise MachineError(f"cannot restore: the state is for {st['memory']} bytes of RAM and "
                           f"{got} came, the machine has {mem.size}")
    if (st["irqchip"] is not None) != machine.linux:
        raise MachineError("cannot restore: the state is of a "
                           f"{'Linux' if st['irqchip'] is not None else 'test'} guest's machine")
    if len(st["vcpus"]) != cfg.vcpus:
        raise MachineError(f"cannot restore: the state has {len(st['vcpus'])} vCPUs, "
                           f"the machine {cfg.vcpus}")
    if restore.memory is not None:       # else the caller fills RAM (a streamed snapshot)
        view = memoryview(restore.memory)
        for r in mem.regions:
            mem.write(r.gpa, view[int(r.offset):int(r.offset) + r.size])
    devstate.restore_devices(machine, st["devices"])
    for i, rec in enumerate(st["vcpus"]):
        fd = machine.vm.create_vcpu(i)
        fd.set_cpuid2(machine.cpuid_for(i))
        restore_vcpu(fd, rec)
        v = Vcpu(i, fd, machine.control, machine.pio, machine.mmio, machine.console,
                 machine._on_stop)
        v.wakeup.set()        # a guest parked on the idle doorbell re-polls its rings
        machine.vcpus.append(v)
    if st["irqchip"] is not None:
        restore_platform(machine.vm, st)
    KS.set_clock(machine.vm, st["clock"])
    machine.before_run.append(lambda: restart_clock(machine, st))
    if restore.paused:
        machine.control.state = VcpuControl.PAUSED


def restart_clock(machine, st: dict) -> None:
    """Just before a restored guest first runs: its TSC (and TSC deadline, which counts
    in TSC ticks) and the VM clock again, as captured.  Between capture and this moment
    RAM was streamed in and keys were fetched; a guest clock set only at build time
    would count all of that and jump."""
    for v, rec in zip(machine.vcpus, st["vcpus"]):
        for index in (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE):      # in this order
            KS.set_msrs(v.fd, {i: val for i, val in rec["msrs"] if i == index})
    KS.set_clock(machine.vm, st["clock"])


# ---- serialisation ---------------------------------------------------------------------
def to_bytes(state: dict) -> bytes:
    """Canonical JSON (sorted keys, no spaces, ASCII) of a checked state."""
    check_state(state)
    blob = json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    if len(blob) > MAX_STATE_BYTES:
        raise VmStateError(f"state of {len(blob)} bytes exceeds {MAX_STATE_BYTES}")
    return blob


def from_bytes(blob: bytes) -> dict:
    """Parse and check a `to_bytes` blob; VmStateError says what is wrong."""
    if len(blob) > MAX_STATE_BYTES:
        raise VmStateError(f"state of {len(blob)} bytes exceeds {MAX_STATE_BYTES}")
    try:
        state = json.loads(bytes(blob).decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise VmStateError("not a vmstate blob (truncated or malformed JSON)") from None
    check_state(state)
    return state




def check_state(st) -> None:
    """Check the shape of a whole state: version, keys, integer ranges, blob sizes."""
    if not isinstance(st, dict) or st.get("format") != FORMAT:
        raise VmStateError(f"not a {FORMAT} record")
    if st.get("version") != VERSION:
        raise VmStateError(f"unsupported vmstate version {st.get('version')!r} "
                           f"(this monitor reads version {VERSION})")
    devstate.check_keys("state", st, {"format", "version", "memory", "vcpus", "devices",
                                      "clock", "irqchip", "pit"})
    devstate.check_int("memory", st["memory"])
    devstate.check_int("clock", st["clock"])
    if (st["irqchip"] is None) != (st["pit"] is None):
        raise VmStateError("irqchip and PIT state come together or not at all")
    if st["irqchip"] is not None:
        check_platform(st)
    cpus = st["vcpus"]
    if not isinstance(cpus, list) or not 1 <= len(cpus) <= 64:
        raise VmStateError("vcpus must be a list of 1 to 64 records")
    for i, rec in enumerate(cpus):
        devstate.check_keys(f"vcpu {i}", rec, {"id", "msrs", "mp_state", *_BLOBS})
        if rec["id"] != i:
            raise VmStateError(f"vcpu record {i} has id {rec['id']!r}")
        devstate.check_int(f"vcpu {i} mp_state", rec["mp_state"], 32)
        for name, cls in _BLOBS.items():
            if name != "lapic" or rec[name] is not None:
                _check_hex(f"vcpu {i} {name}", rec[name], cls)
        msrs = rec["msrs"]
        if not isinstance(msrs, list) or len(msrs) > 256:
            raise VmStateError(f"vcpu {i} msrs must be a list of at most 256 pairs")
        for pair in msrs:
            if not isinstance(pair, list) or len(pair) != 2:
                raise VmStateError(f"vcpu {i} msrs holds a non-pair")
            devstate.check_int(f"vcpu {i} MSR index", pair[0], 32)
            devstate.check_int(f"vcpu {i} MSR {pair[0]:#x}", pair[1])
    devstate.check_devices(st["devices"])
