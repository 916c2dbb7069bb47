"""The sessions the half-second scan visits: only those with something due.

A slow camera's session has two things that come due with time alone, with
no byte from the camera: its pending bytes, written :data:`FLUSH_AGE` or
:data:`TRICKLE_AGE` seconds after they began to wait
(:mod:`camgateway.transfer.receiver`), and its held read mark, dropped once the
connection has not been read for twice its wait (:mod:`camgateway.perf.slow_reads`).
The plain scan (``flush_stale``, twice a second) asks every session of the
worker. With 9,850 slow cameras on two workers that is 19,700 visits a
second, most of them finding nothing due: 0.013 of a core, of the 0.08-0.10
the slow cameras cost the gateway (docs/performance.md, ``due_heap``).

With the heap a session files itself here for the earliest moment something of its own
may come due (:meth:`DueSessions.at`), and the scan takes only those whose
moment has come (:meth:`DueSessions.take`). A visit that finds its thing not
due after all (the camera was read since, its mark is not stale) files the
session again for the new moment. Filing is cheap when the session is
already filed for an earlier moment (one dict look-up), so a session may ask
at every read.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Hashable, Mapping

__all__ = ["DueSessions", "NoDueSessions"]


class DueSessions:
    """Items (sessions) to visit at a time each: a heap of (time, order, item), compared in C.

    An item is filed once, for its earliest time; filing it for a later time
    while it waits for an earlier one does nothing, and filing it for an
    earlier one supersedes the later (whose heap entry is skipped when it
    comes up).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._when: dict[Hashable, float] = {}
        self._order = itertools.count()

    def at(self, item: Hashable, when: float) -> None:
        """Visit ``item`` at ``when`` (seconds on the scan's clock), or sooner if it is filed sooner."""
        filed = self._when.get(item)
        if filed is not None and filed <= when:
            return
        self._when[item] = when
        heapq.heappush(self._heap, (when, next(self._order), item))

    def take(self, now: float) -> list[Any]:
        """The items due at ``now``, earliest first, each once; they are no longer filed."""
        heap, filed, due = self._heap, self._when, []
        pop = heapq.heappop
        while heap and heap[0][0] <= now:
            when, _, item = pop(heap)
            if filed.get(item) == when:  # (else superseded by an earlier filing, or discarded)
                del filed[item]
                due.append(item)
        return due

    def discard(self, item: Hashable) -> None:
        """Do not visit ``item`` (a connection gone); its heap entry is skipped when it comes up."""
        self._when.pop(item, None)

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, item: Hashable) -> bool:
        return item in self._when


class NoDueSessions:
    """Files nothing (``performance.due_heap: false``): the scan visits every session of ``sessions``."""

    def __init__(self, sessions: Mapping[Any, Any]) -> None:
        self._sessions = sessions

    def at(self, item: Hashable, when: float) -> None:
        """Nothing to file: every session is visited at every scan."""

    def take(self, now: float) -> list[Any]:
        """Every session."""
        return list(self._sessions.values())

    def discard(self, item: Hashable) -> None:
        """Nothing is filed."""

    def __len__(self) -> int:
        return 0

    def __contains__(self, item: Hashable) -> bool:
        return False
