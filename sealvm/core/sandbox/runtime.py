"""Making CPython live with a filter that forbids opening files.

A Python process opens source files when it prints a traceback: `linecache`
(used by `traceback` and `logging`) and the interpreter's C traceback printer
(the default `sys.excepthook` and `threading.excepthook`) read the .py file to
show each line.  Under the core filter `openat` kills the process, so an ordinary
logged exception would turn into a SIGSYS death and lose its message.

`prepare_runtime()` runs just before the filter goes on:

* every already-loaded module's source is read into `linecache` now, so
  tracebacks still show their lines;
* `linecache.updatecache` is replaced by a version that never opens a file
  (frames from anything not cached print without their source line);
* `sys.excepthook` and `threading.excepthook` become Python hooks that go
  through `traceback`, hence through that cache, instead of the C printer.

Everything the core runs afterwards must already be imported: an `import` of
a new module opens files and is killed.

glibc opens files on its own twice: the first time a thread's malloc arena
gives memory back (shrink_heap) it reads /proc/sys/vm/overcommit_memory, and
when a process's ninth arena is made (a core with a network device has that many
threads) it reads /sys/devices/system/cpu/online to size the arena limit.
`_settle_malloc` raises the trim threshold so thread heaps are never shrunk (the
memory stays with the process for its next use), makes the first read happen
now, and fixes the arena limit so the second never happens.
"""
from __future__ import annotations

import linecache
import sys
import threading
import traceback

_prepared = False


def _updatecache_without_io(filename: str, module_globals=None) -> list[str]:
    """linecache.updatecache that never touches the file system."""
    entry = linecache.cache.get(filename)
    if entry is not None and len(entry) == 4:
        return entry[2]
    return []


def _print_uncaught(exc_type, exc, tb) -> None:
    try:
        traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def _thread_excepthook(args) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else threading.get_ident()
    try:
        sys.stderr.write(f"Exception in thread {name}:\n")
    except (OSError, ValueError, AttributeError):
        return
    _print_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def prime_source_cache() -> int:
    """Read the source of every loaded module into linecache; returns how many files."""
    count = 0
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.endswith(".py"):
            if linecache.getlines(path):
                count += 1
    return count


M_TRIM_THRESHOLD = -1
M_ARENA_MAX = -8
ARENA_MAX = 8      # glibc's own limit at one CPU; threads beyond it share arenas


def _settle_malloc() -> None:
    """Keep glibc from shrinking thread heaps (the path that reads the file) and read it
    now anyway: a fixed trim threshold also stops the dynamic one from moving back."""
    import ctypes
    # SAFETY: mallopt(int, int) of this process's own libc.
    libc = ctypes.CDLL(None)
    libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(1 << 30))
    libc.mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(ARENA_MAX))

    def churn() -> None:
        blocks = [bytearray(4000) for _ in range(2000)]      # above pymalloc's 512 bytes
        del blocks
    t = threading.Thread(target=churn, name="malloc-settle")
    t.start()
    t.join()


def prepare_runtime() -> None:
    """Prime the source cache and route traceback printing through it (idempotent)."""
    global _prepared
    prime_source_cache()
    if _prepared:
        return
    _settle_malloc()
    linecache.updatecache = _updatecache_without_io
    sys.excepthook = _print_uncaught
    threading.excepthook = _thread_excepthook
    _prepared = True
