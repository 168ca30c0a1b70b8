"""A worker thread per virtqueue, woken by the ioeventfd KVM signals.

The guest's write to QueueNotify never leaves the kernel: KVM bumps the
eventfd and this thread does the queue's work, so a request costs the guest
~4 µs instead of a full exit to Python.  Notifications that arrive while the
worker is busy coalesce into one wake-up; the queue code drains everything
available on each pass, so nothing is lost.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

log = logging.getLogger("sealvm.core.io")


class QueueWorker:
    def __init__(self, name: str, work: Callable[[], object]):
        self.name = name
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._work = work
        self._stop = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.wakeups = 0

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        while True:
            os.eventfd_read(self.fd)
            if self._stop:
                return
            self.wakeups += 1
            try:
                self._work()
            except Exception:  # a device bug must not silently kill the queue
                log.exception("%s: queue processing failed", self.name)

    def stop(self) -> None:
        self._stop = True
        os.eventfd_write(self.fd, 1)
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        os.close(self.fd)
