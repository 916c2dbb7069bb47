"""Spool files made ahead of time, so a new file's RESUME waits for no thread.

Creating a spool file (and checking the spool's free space first) is
blocking work: done per file, it was a thread hop between a photo's START
and its RESUME, a reactor turn each way under load. :class:`SpoolReserve`
keeps empty spool files open (up to 128, an open descriptor each), made a
batch at a time by a pool thread when fewer than 32 are left, the free-space
check made with each batch. (With 32 and 8, a worker taking 500 files a
second ran out before a batch was in, about one new file in five: a pool
thread's 24 creations each wait to win the GIL back from a busy reactor.
With 128 and 32: one in a hundred.)

A file made ahead belongs to no partial until it is taken. A clean stop
removes the unused ones (:meth:`SpoolReserve.close`); after a crash they are
orphans, which the start-up reconcile removes. That is why a reserve is only
used with a store of this instance's own: a shared store's spool is not
reconciled at start (``IOutboxStore.shared``), and it must start only once
the reconcile is over, or the reconcile would take its files for orphans.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Deque, Optional, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from camgateway.base.deferreds import after

__all__ = ["SpoolReserve"]


class Spool(Protocol):
    """What the reserve needs of the spool it fills (:class:`camgateway.transfer.spool.Spool`)."""

    def free_bytes(self) -> int:
        """Bytes free on the spool's file system."""

    def new_name(self) -> str:
        """A fresh spool file name."""

    def open(self, name: str, held: int) -> int:
        """Open the spool file ``name`` for writing from ``held``: its descriptor."""

    def unlink(self, name: str) -> None:
        """Remove the spool file ``name``."""

log = Logger(namespace="camgateway.perf.reserve")


def _make(spool: Spool, n: int, min_free: int) -> tuple[int, list[tuple[str, int]]]:
    """In a thread: measure the free space, then create ``n`` empty spool files if there is room."""
    free = spool.free_bytes()
    if free < min_free:
        return free, []
    made: list[tuple[str, int]] = []
    try:
        for _ in range(n):
            name = spool.new_name()
            made.append((name, spool.open(name, 0)))
    except OSError:
        if not made:
            raise
    return free, made


class SpoolReserve:
    """Empty spool files, open and ready for new transfers.

    :meth:`take` answers at once: a ``(name, fd)`` made ahead, or None when
    the reserve is empty, its free-space check is older than ``max_age``
    seconds or found less than ``min_free()`` bytes (asked at each take), or
    it is not started or closed. On None the caller creates the file itself
    (and checks the free space, so a refusal always comes from a fresh
    check).
    """

    def __init__(self, spool: Spool, run_in_thread: Callable[..., defer.Deferred], clock: Any,
                 min_free: Callable[[], int], size: int = 128, low: int = 32, max_age: float = 1.0) -> None:
        self.spool = spool
        self._run = run_in_thread
        self._clock = clock
        self.min_free = min_free
        self.size = size
        self.low = low
        self.max_age = max_age
        self._ready: Deque[tuple[str, int]] = collections.deque()
        self._checked_at: Optional[float] = None
        self._free = 0  # bytes free at the last check
        self._filling: Optional[defer.Deferred] = None
        self._started = False
        self._closed = False
        #: Files handed out, and times take() had none to give (for tests and metrics).
        self.taken = 0
        self.missed = 0

    def names(self) -> set[str]:
        """The spool names of the files made ahead and not taken."""
        return {name for name, _ in self._ready}

    def start(self) -> None:
        """Begin making files (after the start-up reconcile)."""
        self._started = True
        self._refill()

    def take(self) -> Optional[tuple[str, int]]:
        """A new empty spool file ``(name, fd)``, or None (see the class)."""
        fresh = (self._checked_at is not None and self._free >= self.min_free()
                 and self._clock.seconds() - self._checked_at <= self.max_age)
        made = self._ready.popleft() if (fresh and self._ready) else None
        if made is None:
            self.missed += 1
        else:
            self.taken += 1
        if len(self._ready) < self.low or not fresh:
            self._refill()
        return made

    def _refill(self) -> None:
        if self._filling is not None or self._closed or not self._started:
            return
        n = max(0, self.size - len(self._ready))
        d = self._filling = self._run(_make, self.spool, n, self.min_free())
        d.addCallbacks(self._filled, self._failed)

    def _filled(self, result: tuple[int, list[tuple[str, int]]]) -> None:
        self._filling = None
        free, made = result
        self._ready.extend(made)
        if self._closed:
            return  # close() removes them
        self._checked_at = self._clock.seconds()
        self._free = free

    def _failed(self, failure: Any) -> None:
        self._filling = None
        self._free = 0  # take() gives nothing until a batch works: the slow path reports the error
        log.warn("making spool files ahead failed: {error}", error=failure.getErrorMessage())

    def close(self) -> defer.Deferred:
        """Remove the files not taken (once a batch being made is in); take() gives nothing from now on."""
        self._closed = True

        def discard(_: object) -> Optional[defer.Deferred]:
            made, self._ready = list(self._ready), collections.deque()
            return self._run(self._discard, made) if made else None

        return after(self._filling).addCallback(discard)

    def _discard(self, made: list[tuple[str, int]]) -> None:
        for name, fd in made:
            os.close(fd)
            self.spool.unlink(name)
