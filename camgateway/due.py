"""The sessions the half-second timer must look at, by when.

Twice a second (``FLUSH_AGE / 2``) a timer writes the bytes slow cameras
left pending and drops read marks that held a connection too long
(:meth:`camgateway.session.Session.write_stale`). Visiting every session for
that was a scan of all 10,000 connections twice a second, whatever they
were doing: a fifth of the gateway's own CPU with 9,850 slow cameras
(``benchmarks/README.md``, step 42). A session now tells :class:`DueQueue`
the earliest time it may need a look, as the things it waits for begin (bytes
start to wait; a read mark starts holding the connection), and the timer
visits only the sessions whose time has come. Each visit puts the session
back for its next time, so a look it does not need costs one heap entry.

Times only ever move earlier while a session waits (:meth:`DueQueue.at`
keeps the earlier of two); a later time is set after the visit. A heap
entry made obsolete by an earlier one stays in the heap until its time and
is then skipped, so at most a few entries per session are in the heap.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Hashable

__all__ = ["DueQueue"]


class DueQueue:
    """Things (sessions) with the time each must next be looked at."""

    __slots__ = ("_heap", "_when", "_order")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        #: The live time of each thing queued (its earliest entry in the heap).
        self._when: dict[Hashable, float] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        """How many things are queued."""
        return len(self._when)

    def at(self, thing: Hashable, when: float) -> None:
        """Look at ``thing`` at the first :meth:`due` at or after ``when`` (or sooner, if queued sooner)."""
        known = self._when.get(thing)
        if known is not None and known <= when:
            return
        self._when[thing] = when
        heapq.heappush(self._heap, (when, next(self._order), thing))

    def discard(self, thing: Hashable) -> None:
        """Never look at ``thing`` again unless queued again (its heap entries are skipped)."""
        self._when.pop(thing, None)

    def when(self, thing: Hashable) -> float | None:
        """When ``thing`` is to be looked at, or None."""
        return self._when.get(thing)

    def due(self, now: float) -> list[Any]:
        """Take out every thing whose time is ``now`` or earlier, earliest first.

        Each is no longer queued: the caller looks at it and queues it again
        for its next time. A time set during that look, even one already
        past, is for the next call.
        """
        heap, live = self._heap, self._when
        pop = heapq.heappop
        taken = []
        while heap and heap[0][0] <= now:
            when, _, thing = pop(heap)
            if live.get(thing) == when:  # (else an earlier entry replaced it, or it was discarded)
                del live[thing]
                taken.append(thing)
        return taken
