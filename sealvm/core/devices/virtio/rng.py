"""virtio-rng: the entropy device (VIRTIO 1.2 §5.4).

Device ID 4, one queue ("requestq", index 0), no feature bits, no
configuration space.  The driver posts device-writable buffers; the device
fills them with entropy and returns them with the number of bytes written.
The spec lets the device fill less than the whole buffer, so each request is
capped (`max_request`, 64 KiB by default): a guest cannot make the monitor
allocate or copy more than that per chain, and it cannot make it do more than
one ring's worth of chains per pass (the transport bounds the passes).

The entropy source is a capability passed in (`os.urandom` by default):
`entropy(n) -> bytes` of exactly n bytes.  If it fails or returns the wrong
amount, that is the host's fault: `DeviceBackendError` propagates and the
transport marks the device as needing reset — the guest never receives
bytes that did not come from the source.

Device-readable segments carry nothing for this device; the driver must not
post them (§5.4.6.1) and they are ignored.
"""
from __future__ import annotations

import os
from typing import Callable

from .chain import DescriptorChain
from .device import VIRTIO_ID_RNG, DeviceBackendError, VirtioDevice

EntropySource = Callable[[int], bytes]

DEFAULT_QUEUE_SIZE = 256
DEFAULT_MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    """The entropy device model."""

    device_id = VIRTIO_ID_RNG
    features = 0

    def __init__(self, entropy: EntropySource = os.urandom, *, name: str = "virtio-rng",
                 queue_size: int = DEFAULT_QUEUE_SIZE, max_request: int = DEFAULT_MAX_REQUEST):
        super().__init__()
        if max_request <= 0:
            raise ValueError(f"max_request {max_request} must be positive")
        self.name = name
        self.queue_max_sizes = (queue_size,)
        self._entropy = entropy
        self.max_request = max_request
        self.bytes_served = 0

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        want = min(chain.writable_len, self.max_request)
        if want == 0:
            self.log_guest_error(f"request at head {chain.head} has no writable buffer")
            return 0
        try:
            data = self._entropy(want)
        except Exception as e:
            raise DeviceBackendError(f"entropy source failed: {e!r}") from e
        if not isinstance(data, (bytes, bytearray)) or len(data) != want:
            got = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
            raise DeviceBackendError(f"entropy source returned {got} instead of {want} bytes")
        written = chain.write(data)
        self.bytes_served += written
        return written
