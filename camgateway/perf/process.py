"""glibc's allocator, kept from handing a streaming camera's read buffers back to the kernel.

A camera streaming at full speed is read up to 256 KiB at a time
(:data:`camgateway.perf.sockets.WIDE_READ`): each read is a new ``bytes`` of that
size, appended to the decoder's buffer, then freed, and the spool writes
swap buffers of about as much. glibc serves blocks this large with
``mmap`` and frees them with ``munmap`` (its threshold grows only past the
size of a block freed), and trims the heap's free top whenever it passes
128 KiB. Every such block is then new memory, page-faulted in again on its
first bytes: 110,000-200,000 minor faults for 1.68 GB in bulk-100, against
33,000-48,000 with 64 KiB reads. On a virtual machine a fault is expensive
(the host may have to back the page too: benchmarks/README.md).

:func:`tune_malloc` raises both limits (``mallopt``), so these blocks come
from the heap and go back to it: 25,000-41,000 faults, and about 6 % less
CPU per GB (benchmarks/README.md, step 43). The cost is at most
:data:`TRIM_THRESHOLD` of free memory an arena keeps instead of returning.

An operator's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
(glibc's environment settings) wins: the gateway then changes nothing.
Elsewhere than glibc it does nothing either.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Mapping, Optional

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

#: Blocks under this many bytes come from the heap, not from ``mmap``.
MMAP_THRESHOLD = 2 * 1024 * 1024
#: Free memory at the top of a heap kept for the next blocks, not trimmed.
TRIM_THRESHOLD = 8 * 1024 * 1024

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


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
