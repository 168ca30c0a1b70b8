"""The machine: guest RAM, vCPUs, devices and their wiring into one KVM VM.

`Machine.build()` does every fallible step (open /dev/kvm, RAM, load the
image, create vCPUs) before any guest code runs, so a bad configuration fails
with a clear message and nothing half-started.  `start()` launches the vCPU
threads; `wait()` returns the guest's exit status.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

from .addr import (DEFAULT_MEMORY, EXIT_PORT, IDLE_DOORBELL_GPA, SERIAL_PORT,
                   VIRTIO_MMIO_BASE, VIRTIO_MMIO_FIRST_IRQ, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_STRIDE)
from .boot.loader import load_guest
from .bus import Bus
from .cpu_setup import apply_cpu_state
from .devices.serial import Serial16550
from .devices.simple import AcpiPower, ExitPort, IdleDoorbell
from .devices.virtio.mmio import MmioTransport
from .devices.virtio.rng import VirtioRng
from .ioworker import QueueWorker
from .kvm.api import Kvm
from .memory import GuestMemory, RamOptions
from .vcpu import Vcpu, VcpuControl, install_kick_handler

MAX_VCPUS = 64
ATTACH_BLOCK = 1                    # wire.portal_ops.AttachKind.BLOCK
BENCH_MMIO_SINK = 0xD020_0000
BENCH_IOEVENT_ADDR = 0xD020_1000
# Linux guests: KVM's VMX real-mode helpers sit just below the BIOS area at 4 GiB (as in QEMU).
TSS_GPA, IDENTITY_MAP_GPA = 0xFFFB_D000, 0xFFFB_C000
SERIAL_IRQ = 4
KVM_CAP_TSC_DEADLINE_TIMER = 72
NET_KIND = 2                       # AttachKind.NET (wire/portal_ops.py)
NET_MAC = bytes.fromhex("025345414c01")   # locally administered: 02:53:45:41:4c:01


# Every vCPU of a Linux guest starts with the syscall/sysenter MSRs clear, the TSCs equal
# (0, so the kernel finds them synchronised) and fast strings on, as firmware leaves them.
LINUX_BOOT_MSRS = {0x174: 0, 0x175: 0, 0x176: 0,                  # IA32_SYSENTER_CS/ESP/EIP
                   0xC0000081: 0, 0xC0000082: 0, 0xC0000083: 0,   # STAR, LSTAR, CSTAR
                   0xC0000084: 0, 0xC0000102: 0,                  # SYSCALL_MASK, KERNEL_GS_BASE
                   0x10: 0, 0x1A0: 1}                             # IA32_TSC, MISC_ENABLE


class MachineError(Exception):
    """The VM cannot be built as configured (user's fault; message says why)."""


@dataclass
class MachineConfig:
    image: bytes
    memory: int = DEFAULT_MEMORY
    vcpus: int = 1
    cmdline: str = ""
    entry: str = "pvh"               # "pvh", "long" (ELF images) or "linux" (bzImage or vmlinux)
    initrd: bytes | None = None      # Linux only
    rng: bool = True
    bench_sinks: bool = False
    entropy: Callable[[int], bytes] = os.urandom
    ram: RamOptions = RamOptions()   # pre-faulting / huge pages for guest RAM (off)
    kvm_fd: int | None = None        # an open /dev/kvm handed over by the launcher
    restore: object | None = None    # a vmstate.Restore: build() restores it, ignores `image`
    ram_filled: object | None = None  # a GuestMemory received already (migration target)
    # fds the host attached for devices, (AttachKind, index) -> fd; the machine owns them
    attached: dict = field(default_factory=dict)
    net_key: Callable[[], bytes] | None = None   # the tunnel key, asked for at start
    net_report: Callable[[str], None] = lambda m: None   # tunnel counters for the host's log
    net_options: dict = field(default_factory=dict)     # Tunnel() options (tests: rekey limits)
    disk_report: Callable[[str], None] = lambda message: None   # tampering/storage errors


@dataclass
class VirtioSlot:
    transport: MmioTransport
    gpa: int
    irq: int
    workers: list = field(default_factory=list)


class Machine:
    def __init__(self, config: MachineConfig, console: Callable[[bytes], None],
                 on_stopped: Callable[[str, int | None], None] | None = None):
        if not 1 <= config.vcpus <= MAX_VCPUS:
            raise MachineError(f"--vcpus must be between 1 and {MAX_VCPUS}, not {config.vcpus}")
        if config.entry not in ("pvh", "long", "linux"):
            raise MachineError(f"--entry must be 'pvh', 'long' or 'linux', not {config.entry!r}")
        if config.initrd is not None and config.entry != "linux":
            raise MachineError("an initrd can only be given to a Linux kernel (entry 'linux')")
        self.linux = config.entry == "linux"
        self.config = config
        self.console = console
        self._on_stopped = on_stopped
        self.control = VcpuControl()
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.serial = Serial16550()
        self.vcpus: list[Vcpu] = []
        self.virtio: list[VirtioSlot] = []
        self.kvm: Kvm | None = None
        self.vm = None
        self.memory: GuestMemory | None = None
        self.exit_status: int | None = None
        self.stop_reason = ""
        self._stopped = threading.Event()
        self._extra_fds: list[int] = []
        self.net = None
        self.blk = None
        self.before_run: list[Callable[[], None]] = []

    # ---- build --------------------------------------------------------
    def build(self) -> None:
        cfg = self.config
        install_kick_handler()
        try:
            self.kvm = Kvm() if cfg.kvm_fd is None else Kvm(fd=os.dup(cfg.kvm_fd))
        except OSError as e:
            raise MachineError(f"cannot open /dev/kvm: {e.strerror}") from None
        if self.linux and cfg.restore is None:  # (a restored VM's kernel is in its RAM)
            from .boot.vmlinux import check_kernel
            check_kernel(cfg.image)            # a bad kernel is refused before anything is made
        self.vm = self.kvm.create_vm()
        if self.linux:
            self._linux_platform()
        self.memory = cfg.ram_filled or GuestMemory.create(cfg.memory, prefault=cfg.ram.prefault,
                                                           hugepages=cfg.ram.hugepages)
        base = self.memory.host_address()
        for slot, region in enumerate(self.memory.regions):
            # SAFETY: userspace_addr+offset..+size lies inside our own mapping of the memfd.
            self.vm.set_user_memory_region(slot, 0, int(region.gpa), region.size,
                                           base + int(region.offset))
        self._add_devices()
        if cfg.restore is not None:
            from .vmstate import finish_restore  # snapshot code loads only when used
            return finish_restore(self, cfg.restore)
        if self.linux:
            return self._load_linux()
        words = [f"sealvm.idle={int(IDLE_DOORBELL_GPA):#x}"]
        if cfg.vcpus > 1:
            words.append(f"sealvm.vcpus={cfg.vcpus}")
        if cfg.bench_sinks:
            words.append(f"sealvm.ioevent={BENCH_IOEVENT_ADDR:#x}")
        for v in self.virtio:
            words.append(f"virtio_mmio.device=4K@{v.gpa:#x}:{v.irq}")
        cmdline = " ".join(filter(None, [cfg.cmdline.strip(), *words]))
        plan = load_guest(cfg.image, self.memory, cmdline, entry=cfg.entry, vcpus=cfg.vcpus)
        cpuid = self.kvm.supported_cpuid()
        for i, state in enumerate(plan.cpus):
            fd = self.vm.create_vcpu(i)
            fd.set_cpuid2(cpuid)
            apply_cpu_state(fd, state)
            self.vcpus.append(Vcpu(i, fd, self.control, self.pio, self.mmio,
                                   self.console, self._on_stop))

    def _linux_platform(self) -> None:
        """In-kernel PIC/IOAPIC/LAPICs and PIT, and the serial line on IRQ 4 (Linux only)."""
        from .kvm import state
        self.vm.set_tss_addr(TSS_GPA)
        self.vm.set_identity_map_addr(IDENTITY_MAP_GPA)
        state.create_irqchip(self.vm)
        state.create_pit2(self.vm)
        self.serial = Serial16550(irq=lambda level: state.irq_line(self.vm, SERIAL_IRQ, level))

    def cpuid_for(self, i: int):
        """vCPU i's CPUID: KVM's as it is, or filtered for Linux (topology, TSC deadline)."""
        supported = self.kvm.supported_cpuid()
        if not self.linux:
            return supported
        from .cpu_setup import linux_cpuid
        from .kvm import state
        deadline = state.check_extension(self.vm, KVM_CAP_TSC_DEADLINE_TIMER) > 0
        return linux_cpuid(supported, i, self.config.vcpus, deadline)

    def _load_linux(self) -> None:
        from .boot.vmlinux import load_kernel
        cfg = self.config
        devices = [(v.gpa, VIRTIO_MMIO_SIZE, v.irq) for v in self.virtio]   # announced by ACPI
        plan = load_kernel(cfg.image, cfg.initrd, self.memory, cfg.cmdline.strip(),
                           vcpus=cfg.vcpus, virtio=devices)
        from .kvm import state
        for i in range(cfg.vcpus):
            fd = self.vm.create_vcpu(i)
            fd.set_cpuid2(self.cpuid_for(i))
            state.set_msrs(fd, LINUX_BOOT_MSRS)
            if i == 0:                       # the others wait in the kernel for INIT/SIPI
                apply_cpu_state(fd, plan.cpus[0])
            self.vcpus.append(Vcpu(i, fd, self.control, self.pio, self.mmio,
                                   self.console, self._on_stop))

    def _add_devices(self) -> None:
        s = self.serial
        self.pio.add(SERIAL_PORT, s.PORTS, lambda o, n: s.read(o),
                     lambda o, v, n: s.write(o, v), "serial")
        if self.linux:
            from .boot.acpi import POWER_PORT
            pm = AcpiPower()
            self.pio.add(POWER_PORT, pm.PORTS, pm.read, pm.write, "acpi-pm")
        ep = ExitPort()
        self.pio.add(EXIT_PORT, ep.PORTS, lambda o, n: ep.read(o), ep.write, "exit-port")
        db = IdleDoorbell()
        self.mmio.add(IDLE_DOORBELL_GPA, db.SIZE, db.read, db.write, "idle-doorbell")
        if self.config.rng:
            self._add_virtio(VirtioRng(entropy=self.config.entropy), "virtio-rng")
        if (ATTACH_BLOCK, 0) in self.config.attached:
            from .devices.virtio.blk import VirtioBlk   # loads only with a disk
            self.blk = VirtioBlk(report=self.config.disk_report, serial=b"sealvm-disk0")
            self._add_virtio(self.blk, "virtio-blk")
        net_fd = self.config.attached.get((NET_KIND, 0))
        if net_fd is not None:
            self._add_net(net_fd)
        if self.config.bench_sinks:
            self.mmio.add(BENCH_MMIO_SINK, 0x1000, lambda o, n: 0, lambda o, v, n: None, "bench-sink")
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._extra_fds.append(efd)
            self.vm.ioeventfd(efd, BENCH_IOEVENT_ADDR, 4)

    def _add_net(self, fd: int) -> None:
        from .devices.virtio.net import VirtioNet   # loaded only for a VM with a network
        if self.config.net_key is None:
            raise MachineError("a network was attached but this core has no network key "
                               "(it needs the owner's manifest and key broker)")
        link = socket.socket(fileno=os.dup(fd))
        if link.type not in (socket.SOCK_SEQPACKET, socket.SOCK_DGRAM):
            link.close()
            raise MachineError("the attached network link is not a datagram socket")
        self.net = VirtioNet(link, self.config.net_key, NET_MAC, report=self.config.net_report,
                             tunnel_options=self.config.net_options)
        self._add_virtio(self.net, "virtio-net")

    def _add_virtio(self, device, name: str) -> None:
        n = len(self.virtio)
        gpa = int(VIRTIO_MMIO_BASE) + n * VIRTIO_MMIO_STRIDE
        interrupt = self._device_event
        if self.linux:                   # the line is raised by the kernel, no exit
            from .kvm import state
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._extra_fds.append(efd)
            state.irqfd(self.vm, efd, VIRTIO_MMIO_FIRST_IRQ + n)
            interrupt = lambda efd=efd: os.eventfd_write(efd, 1)  # noqa: E731
        transport = MmioTransport(device, self.memory, interrupt=interrupt,
                                  name=f"{name}@{gpa:#x}")
        self.mmio.add(gpa, VIRTIO_MMIO_SIZE, transport.read,
                      lambda o, v, sz, t=transport: t.write(o, sz, v), name)
        slot = VirtioSlot(transport, gpa, VIRTIO_MMIO_FIRST_IRQ + n)
        for q in range(len(transport.queues)):
            w = QueueWorker(f"{name}-q{q}", lambda q=q, t=transport: self._serve(t, q))
            self.vm.ioeventfd(w.fd, gpa + 0x50, 4, datamatch=q)
            slot.workers.append(w)
        self.virtio.append(slot)
        return slot

    def open_disk(self, key: bytes, min_generation: int = 0, owner=None,
                  witness_fd: int = -1) -> str:
        """Check the attached disk with its key (before the guest runs); DiskError if bad.
        `owner()`: this copy's owner generation, stamped on every commit (fencing);
        `witness_fd`: the launcher's record of the disk's newest generation (rollback)."""
        from .diskseal import FdWitness, FileIO, SealedDisk
        from .sandbox.switches import disabled
        witness = FdWitness(witness_fd) if witness_fd >= 0 and not disabled("disk_witness") \
            else None
        disk = SealedDisk(FileIO(self.config.attached[(ATTACH_BLOCK, 0)]), key,
                          min_generation=min_generation, verify=not disabled("disk_integrity"),
                          owner=None if disabled("disk_fencing") else owner, witness=witness)
        self.blk.open(disk)
        return f"disk: {disk.blocks * 4} KiB sealed, generation {disk.generation}"

    def _commit_disk(self) -> None:
        """A clean stop commits writes the guest did not flush (a crash would lose them)."""
        from .diskseal import DiskError
        try:
            self.blk.disk.flush()
        except (OSError, ValueError, DiskError) as e:
            self.config.disk_report(f"disk: final commit failed: {e}")

    @contextlib.contextmanager
    def devices_held(self):
        """Every virtio transport's lock held: no device touches guest RAM or its queues
        (the network's receive path included) while a paused machine is captured."""
        with contextlib.ExitStack() as held:
            for slot in self.virtio:
                held.enter_context(slot.transport._lock)
            yield

    # ---- run ----------------------------------------------------------
    def _serve(self, transport: MmioTransport, queue: int) -> None:
        # Guests here poll their used rings and may park on the idle doorbell
        # meanwhile: wake them after every batch, whatever the driver's
        # interrupt suppression says.
        while (transport.process_queue(queue) and not self._stopped.is_set()
               and transport.device.has_work(queue)):
            pass
        if not self.linux:
            self._device_event()

    def _device_event(self) -> None:
        for v in self.vcpus:
            v.wakeup.set()

    def _on_stop(self, why: str, status: int | None) -> None:
        with self.control.cond:
            if self._stopped.is_set():
                return
            self.stop_reason = why
            self.exit_status = status
            self.control.state = VcpuControl.STOPPING
            self.control.cond.notify_all()
            self._stopped.set()
        for v in self.vcpus:
            v.kick()
        if self._on_stopped is not None:
            self._on_stopped(why, status)

    def start(self) -> None:
        while self.before_run:           # once, just before the guest runs (a restore's clock)
            self.before_run.pop(0)()
        if self.net is not None:
            t = next(s.transport for s in self.virtio if s.transport.device is self.net)
            self.net.start(lambda: self._serve(t, 0))
        for slot in self.virtio:
            for w in slot.workers:
                w.start()
        for v in self.vcpus:
            v.start()

    def stop(self, why: str = "stopped by request") -> None:
        self._on_stop(why, None)

    def pause(self, timeout: float = 5.0) -> None:
        c = self.control
        with c.cond:
            if c.state != c.RUNNING:
                return
            c.state = c.PAUSED
        for v in self.vcpus:
            v.kick()
        with c.cond:
            if not c.cond.wait_for(lambda: c.parked == len(self.vcpus) or c.state != c.PAUSED,
                                   timeout):
                raise TimeoutError("vCPUs did not pause in time")

    def resume(self) -> None:
        c = self.control
        with c.cond:
            if c.state == c.PAUSED:
                c.state = c.RUNNING
                c.cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def close(self) -> None:
        self.stop("machine closed")
        for v in self.vcpus:
            if v.thread is not None:
                v.thread.join(timeout=5)
        for slot in self.virtio:
            for w in slot.workers:
                w.stop()
        if self.blk is not None and self.blk.disk is not None:
            self._commit_disk()
        if self.net is not None:
            self.net.stop()
        for fd in self._extra_fds + list(self.config.attached.values()):
            os.close(fd)
        self.config.attached.clear()
        for v in self.vcpus:
            v.fd.close()
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()
        if self.memory is not None:
            self.memory.close()
