"""virtio devices: split virtqueues (`queue`, `chain`), the virtio-mmio v2 transport
(`mmio`), device models (`device`, `rng`).

Wiring for the run loop (one transport per device window):

    dev = VirtioRng(os.urandom, name="virtio-rng@0xd0000000")
    t = MmioTransport(dev, memory, interrupt=raise_irq, notify=kick_worker)

* MMIO exits in [base, base + 0x1000) go to `t.read(off, size)` /
  `t.write(off, size, value)`; neither raises on anything the guest does.
* QueueNotify (base + 0x50): either register an ioeventfd with datamatch = the
  queue index and have a worker call `t.process_queue(i)` (repeat while it
  returns True), or pass `notify=` (called with the index after a write), or
  pass neither and the writing thread processes the queue inline.
* `interrupt()` is called, without the transport's lock held, whenever
  InterruptStatus gained a bit: wire it to the device's irqfd and wake a
  parked vCPU.
* `t.broken` / `t.broken_reason`: the guest (or the host backend) broke the
  device; it stays inert until the driver writes Status = 0.
"""
