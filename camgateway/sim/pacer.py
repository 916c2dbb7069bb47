"""One timer for every rate-limited camera of a reactor.

A slow camera (``slow_bps``) sends a frame, then waits before the next. With
a reactor timer each (``callLater``), 10,000 slow cameras are 10,000 timers
set and fired a second, each a Python object sorted into the reactor's heap
by a Python comparison: that was a quarter of the emulator's CPU, on the
machine whose gateway it was measuring. :class:`Pacer` keeps the due times
in a heap of tuples (compared in C) and runs everything due within
:data:`TICK` of the earliest at once, so the reactor holds one timer for all
of them and fires it at most about once per tick.
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Pacer", "PacedCall", "pacer_for", "TICK"]

#: Calls due within this many seconds of the earliest run together (so up to this much early).
TICK = 0.001


class PacedCall:
    """A call the pacer will make (the part of ``IDelayedCall`` a sender uses)."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[[], object]) -> None:
        self.func: Optional[Callable[[], object]] = func

    def active(self) -> bool:
        """Not yet made, nor cancelled."""
        return self.func is not None

    def cancel(self) -> None:
        """Never make this call."""
        self.func = None


class Pacer:
    """Makes calls at (or up to :data:`TICK` before) their times, with one reactor timer."""

    def __init__(self, clock: IReactorTime, tick: float = TICK) -> None:
        self._clock = clock
        self.tick = tick
        self._heap: list[tuple[float, int, PacedCall]] = []
        self._order = itertools.count()
        self._timer: Optional[IDelayedCall] = None
        self._timer_at = 0.0
        self._running = False

    def call_later(self, delay: float, func: Callable[[], object]) -> PacedCall:
        """Call ``func()`` in ``delay`` seconds (or up to one tick sooner)."""
        return self.call_at(self._clock.seconds() + delay, func)

    def call_at(self, when: float, func: Callable[[], object]) -> PacedCall:
        """Call ``func()`` at ``when`` on the clock (or up to one tick sooner; at once if it is past)."""
        call = PacedCall(func)
        heapq.heappush(self._heap, (when, next(self._order), call))
        if not self._running and (self._timer is None or when < self._timer_at):
            self._arm(when)  # (while the calls due run, _run arms the timer once they are done)
        return call

    def _arm(self, when: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._run)

    def _run(self) -> None:
        self._timer = None
        heap = self._heap
        until = self._clock.seconds() + self.tick
        pop = heapq.heappop
        self._running = True
        try:
            while heap and heap[0][0] <= until:
                call = pop(heap)[2]
                func = call.func
                if func is not None:
                    call.func = None
                    func()
        finally:
            self._running = False
            while heap and heap[0][2].func is None:  # cancelled calls at the front need no timer
                pop(heap)
            if heap:  # the earliest call left, whether it was there before or made by a call just run
                self._arm(heap[0][0])


_pacers: "weakref.WeakKeyDictionary[Any, Pacer]" = weakref.WeakKeyDictionary()


def pacer_for(clock: IReactorTime) -> Pacer:
    """The pacer of ``clock`` (one per reactor or test clock)."""
    pacer = _pacers.get(clock)
    if pacer is None:
        pacer = _pacers[clock] = Pacer(clock)
    return pacer
