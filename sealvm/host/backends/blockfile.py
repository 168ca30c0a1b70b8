"""The disk backend: a sealed disk image in one sparse host file.

The host opens the file and hands the open descriptor to the core (portal ATTACH,
kind BLOCK, index 0); the core reads and writes it with pread/pwrite/fdatasync.  The
host never sees a key or a plaintext byte, and nothing the host does to the file
goes unnoticed by the core (docs/sealed-disk.md).  Why an fd and not a byte relay
over the portal: the bytes are ciphertext either way, and an fd saves two copies and
a portal round trip per request while giving the host no new power: it could change
the file at any time anyway.

The file is made by the owner (`sealvm disk create/import`); this module only checks
that the path names a regular file the daemon can read and write.
"""
from __future__ import annotations

import os
import stat

DISK_MAGIC = b"SEALDSK1"


class DiskFileError(ValueError):
    """The disk file cannot be used (the message names the path and why)."""


def open_disk_file(path: str) -> int:
    """An O_RDWR fd on the sealed disk image at `path` (the caller closes it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise DiskFileError(f"{path}: cannot open the disk: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DiskFileError(f"{path}: not a regular file")
        if os.pread(fd, len(DISK_MAGIC), 0) != DISK_MAGIC:
            raise DiskFileError(f"{path}: not a sealed disk (make one with `sealvm disk create`)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach_disk(link, path: str) -> None:
    """Open the disk at `path` and hand it to the core behind `link` (before CONFIGURE)."""
    from ...wire.portal_ops import AttachKind
    fd = open_disk_file(path)
    try:
        link.attach(AttachKind.BLOCK, 0, fd)
    finally:
        os.close(fd)
