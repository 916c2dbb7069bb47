"""Group commit on a thread of its own: one slow step (a commit, a flush) serves many callers.

:class:`GroupCommitThread` runs a blocking ``run_batch(items)`` on a dedicated
thread. Items submitted while a batch runs make up the next batch, and the
thread takes that batch *itself*, the moment the running one is over: it never
waits for the reactor to hear about one batch before starting the next. (The
reactor-side version of this loop paid one reactor turn between batches, and
under load a turn is milliseconds: a photo's commits spent most of their time
in that gap, the store's thread idle.) A lone item is run at once, never held
back by a timer.

Results come back to the reactor thread once per batch (``callFromThread``),
each caller's Deferred firing with its own outcome.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generic, Sequence, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from camgateway.deferreds import after
from camgateway.threads import wait_for_work

__all__ = ["GroupCommitThread"]

Item = TypeVar("Item")
_CLOSE = object()


class GroupCommitThread(Generic[Item]):
    """Runs batches of submitted items on one thread, one batch at a time.

    ``run_batch(items)`` runs on the thread and returns one outcome per item
    (a :class:`Failure` among them fails that item's caller alone), or raises
    (every caller of the batch gets that failure). The thread starts with the
    first item and ends at :meth:`close`.
    """

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Any]], reactor: Any, name: str) -> None:
        self._run_batch = run_batch
        self._reactor = reactor
        self.name = name
        # A C queue: a submit is one put, with no Python lock or Condition to
        # run on the reactor thread (submit and close are called there only).
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed: defer.Deferred | None = None
        #: Batches run and items they served (for tests and metrics).
        self.batches = 0
        self.served = 0

    def submit(self, item: Item) -> defer.Deferred:
        """Fires with ``item``'s outcome, once a batch that started after this call is done."""
        if self._closed is not None:
            return defer.fail(RuntimeError(f"{self.name} is closed"))
        d: defer.Deferred = defer.Deferred()
        self._queue.put((item, d))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return d

    def close(self) -> defer.Deferred:
        """Run what is queued, then end the thread; fires once it has ended."""
        if self._closed is None:
            self._closed = defer.Deferred()
            if self._thread is None:
                self._closed.callback(None)
            else:
                self._queue.put(_CLOSE)
        return after(self._closed)

    def _loop(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        closing = False
        while not closing:
            batch = []
            entry = wait_for_work(get)  # the first item
            while True:
                if entry is _CLOSE:
                    closing = True
                else:
                    batch.append(entry)
                try:
                    entry = get_nowait()  # and takes every item queued meanwhile
                except queue.Empty:
                    break
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                outcomes: Any = list(self._run_batch(items))
                if len(outcomes) != len(items):
                    raise AssertionError(f"{self.name}: {len(outcomes)} outcomes for {len(items)} items")
            except BaseException:
                outcomes = Failure()
                outcomes.cleanFailure()  # no frames kept alive across threads
            self._reactor.callFromThread(self._deliver, outcomes, [d for _, d in batch])
            del batch, items, outcomes
        self._reactor.callFromThread(self._closed.callback, None)  # type: ignore[union-attr]

    def _deliver(self, outcomes: Any, waiting: list[defer.Deferred]) -> None:
        self.batches += 1
        self.served += len(waiting)
        if isinstance(outcomes, Failure):
            outcomes = [outcomes] * len(waiting)
        for d, outcome in zip(waiting, outcomes):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

