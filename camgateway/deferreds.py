"""Small Deferred helpers shared by the session's steps."""

from __future__ import annotations

from typing import Any, Callable, Generic, Optional, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["after", "Batcher"]

Item = TypeVar("Item")


def after(d: Optional[defer.Deferred]) -> defer.Deferred:
    """A new Deferred that fires with None once ``d`` has fired (at once if ``d`` is None).

    ``d``'s own result, success or failure, is left to its other callbacks.
    """
    later: defer.Deferred = defer.Deferred()
    if d is None:
        later.callback(None)
    else:
        d.addBoth(lambda result: (later.callback(None), result)[1])
    return later


class Batcher(Generic[Item]):
    """Group commit: items submitted while a batch runs make up the next batch.

    ``run_batch(items)`` returns a Deferred firing with one outcome per item
    (a :class:`Failure` fails that item's caller alone), or failing (every
    caller of the batch gets that failure). One batch runs at a time; a lone
    item is run at once, never held back by a timer.
    """

    def __init__(self, run_batch: Callable[[list[Item]], defer.Deferred]) -> None:
        self._run_batch = run_batch
        self._queue: list[tuple[Item, defer.Deferred]] = []
        self._idle_waiters: list[defer.Deferred] = []
        #: A batch is running.
        self.busy = False

    def submit(self, item: Item) -> defer.Deferred:
        """Fires with ``item``'s outcome, once a batch that started after this call is done."""
        d: defer.Deferred = defer.Deferred()
        self._queue.append((item, d))
        if not self.busy:
            self._next()
        return d

    def idle(self) -> defer.Deferred:
        """Fires once nothing is queued or running."""
        d: defer.Deferred = defer.Deferred()
        if self.busy:
            self._idle_waiters.append(d)
        else:
            d.callback(None)
        return d

    def _next(self) -> None:
        batch, self._queue = self._queue, []
        self.busy = bool(batch)
        if not batch:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        self._run_batch([item for item, _ in batch]).addBoth(self._done, [d for _, d in batch])

    def _done(self, outcomes: Any, waiting: list[defer.Deferred]) -> None:
        if isinstance(outcomes, Failure):
            outcomes = [outcomes] * len(waiting)
        for d, outcome in zip(waiting, outcomes):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
        self._next()
