"""Unique ids that cost no system call.

``uuid.uuid4()`` reads the kernel's random source on every call
(``getrandom(2)``), and the call gives up the GIL: on the reactor thread, and
in pool threads, each id could wait for a busy thread to let the GIL go. The
ids here are a 64-bit random prefix drawn once per process, then a counter:
unique across processes and restarts (the prefix) and within one (the
counter), 32 hex digits like ``uuid4().hex``. They name spool files, partials
and outbox entries; nothing relies on them being unguessable.
"""

from __future__ import annotations

import itertools
import os

__all__ = ["new_id"]

_prefix = os.urandom(8).hex()
_counter = itertools.count(1)


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex()
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)  # a forked child must not repeat its parent's ids


def new_id() -> str:
    """A new id (32 lowercase hex digits)."""
    return f"{_prefix}{next(_counter):016x}"
