"""Process-wide tuning: glibc's allocator, the garbage collector, the GIL switch interval.

:func:`tune_process` applies what the ``performance:`` section leaves on
(``malloc``, ``gc``, ``switch_interval``: docs/performance.md). It is called
by the processes that run a gateway, twistd's (:mod:`camgateway.runtime.tap`)
and each child worker's (:mod:`camgateway.runtime.worker`), never by the
gateway's service: a test that starts a gateway in its own process leaves
the interpreter as it found it.

The allocator
-------------

A camera streaming at full speed is read up to 256 KiB at a time
(:data:`camgateway.perf.sockets.WIDE_READ`): each read is a new ``bytes`` of that
size, appended to the decoder's buffer, then freed, and the spool writes
swap buffers of about as much. glibc serves blocks this large with
``mmap`` and frees them with ``munmap`` (its threshold grows only past the
size of a block freed), and trims the heap's free top whenever it passes
128 KiB. Every such block is then new memory, page-faulted in again on its
first bytes: 110,000-200,000 minor faults for 1.68 GB in bulk-100, against
33,000-48,000 with 64 KiB reads. On a virtual machine a fault is expensive
(the host may have to back the page too).

:func:`tune_malloc` raises both limits (``mallopt``), so these blocks come
from the heap and go back to it: 25,000-41,000 faults, and about 6 % less
CPU per GB. The cost is at most
:data:`TRIM_THRESHOLD` of free memory an arena keeps instead of returning.

An operator's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
(glibc's environment settings) wins: the gateway then changes nothing.
Elsewhere than glibc it does nothing either.

The collector and the switch interval
-------------------------------------
See :data:`GC_THRESHOLD`, :data:`GIL_SWITCH_INTERVAL` and
:data:`GIL_SWITCH_INTERVAL_WORKERS`.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from typing import Any, Mapping, Optional

from twisted.logger import Logger

from camgateway.perf.settings import Performance

__all__ = ["tune_process", "tune_malloc", "tune_gc", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "GC_THRESHOLD",
           "GIL_SWITCH_INTERVAL", "GIL_SWITCH_INTERVAL_WORKERS"]

log = Logger(namespace="camgateway.perf.process")

#: Blocks under this many bytes come from the heap, not from ``mmap``.
MMAP_THRESHOLD = 2 * 1024 * 1024
#: Free memory at the top of a heap kept for the next blocks, not trimmed.
TRIM_THRESHOLD = 8 * 1024 * 1024

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

#: sys.setswitchinterval for a gateway of one process. The reactor thread is
#: busy in Python while the store's thread and the pool threads come back from
#: blocking calls (sqlite3 steps, fsync, pwrite) and wait for the GIL: with
#: CPython's default of 5 ms, each of those waits can last up to 5 ms, and a
#: photo needs a dozen of them. 0.5 ms measured +30 % photos/s and no loss
#: on bulk.
GIL_SWITCH_INTERVAL = 0.0005
#: ... and with several workers: CPython's default. Each process then has a
#: share of the cameras and the two cores are the limit, not one GIL: forced
#: switches every 0.5 ms cost more CPU than the waits they shorten (three
#: paired photo runs with two workers: +6 to +9 % files/s at 5 ms).
GIL_SWITCH_INTERVAL_WORKERS = 0.005
#: gc.set_threshold's first argument: container allocations (net of frees)
#: between two collections of the youngest generation (CPython's default:
#: 700). A photo makes ~30 such objects that outlive it briefly (Deferreds,
#: records), and with 700 the collector ran every ~25 photos, its older
#: generations over everything imported: 0.1 s of each worker's CPU per
#: 1,000 photos, measured with gc.callbacks. With 10,000 and the start-up
#: objects frozen (gc.freeze), 0.025 s.
GC_THRESHOLD = 10_000


def _libc() -> Optional[Any]:
    """The C library this process already has loaded, if it is glibc (no search, no subprocess)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def tune_malloc(environ: Mapping[str, str] = os.environ, libc: Optional[Any] = None) -> bool:
    """Set this process's allocator limits (see the module docstring); True if they were set."""
    if any(name in environ for name in _ENVIRONMENT):
        return False
    libc = libc if libc is not None else _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def tune_gc() -> None:
    """Freeze what is loaded by now (it lives as long as the process) and raise the young generation's threshold.

    Collected first, so that no garbage is frozen with it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def tune_process(performance: Performance, workers: int = 1) -> list[str]:
    """Apply the process-wide tuning ``performance`` leaves on, for a gateway of ``workers`` processes.

    Returns the names of what was applied (``malloc``, ``gc``, ``switch_interval``), and logs them.
    """
    applied = []
    if performance.malloc and tune_malloc():
        applied.append("malloc")
    if performance.gc:
        tune_gc()
        applied.append("gc")
    if performance.switch_interval:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL if workers == 1 else GIL_SWITCH_INTERVAL_WORKERS)
        applied.append("switch_interval")
    log.debug("process tuning applied: {applied}", applied=", ".join(applied) or "none")
    return applied
