"""Group commit off the reactor thread: one slow step (a commit, a flush) serves many callers.

:class:`GroupCommitThread` runs a blocking ``run_batch(items)`` on a thread.
Items submitted while a batch runs make up the next batch, and the thread
takes that batch *itself*, the moment the running one is over: it never
waits for the reactor to hear about one batch before starting the next. (The
reactor-side version of this loop paid one reactor turn between batches, and
under load a turn is milliseconds: a photo's commits spent most of their time
in that gap, the store's thread idle.) A lone item is run at once, never held
back by a timer.

Several GroupCommitThreads (*lanes*) may share one :class:`BatchThread`: the
gateway's embedded store, its spool flushes and its disk sink each have a
lane, and a photo passes through all three. Each lane keeps its own batches
(one transaction, one flush), and one wake-up of the thread runs what every
lane has queued. Results come back to the reactor thread once per wake-up
(``callFromThread``), each caller's Deferred firing with its own outcome.

With ``batching`` off (``performance.group_commit: false``, see
docs/performance.md) a thread runs each item as a batch of its own: one
transaction, one flush per call, in the order submitted.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from camgateway.base.deferreds import after
from camgateway.perf.threads import wait_for_work

__all__ = ["GroupCommitThread", "BatchThread"]

Item = TypeVar("Item")
_CLOSE = object()


class BatchThread:
    """One thread that runs the batches of several :class:`GroupCommitThread` lanes.

    Each wake-up takes every item queued for every lane, runs each lane's
    batch in turn (lanes in the order they were made), and answers the
    reactor once for all of them. The spool's flushes, the store's commits
    and the disk sink's stores of one worker share one: every thread a
    photo's steps pass through costs it a wake-up and a GIL hand-off there
    and back (about 40 us of CPU on a busy two-core VM, 110 us on an idle
    one), and with one thread a single wake-up serves them all. The thread
    starts with the first item and ends once every lane is closed. With
    ``batching`` False each wake-up takes one item, a batch of its own.
    """

    def __init__(self, reactor: Any, name: str, batching: bool = True) -> None:
        self._reactor = reactor
        self.name = name
        self.batching = batching
        # A C queue: a submit is one put, with no Python lock or Condition to
        # run on the reactor thread (submit and close are called there only).
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lanes: list["GroupCommitThread[Any]"] = []
        self._open = 0  # lanes not closed (changed under _lock: the thread reads it)
        self._lock = threading.Lock()

    def _add(self, lane: "GroupCommitThread[Any]") -> None:
        with self._lock:
            self._lanes.append(lane)
            self._open += 1

    def _closed_one(self) -> None:
        with self._lock:
            self._open -= 1

    def _put(self, entry: Any) -> None:
        self._queue.put(entry)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        lanes = self._lanes  # (all made before the first item: see camgateway.runtime.service)
        batching = self.batching
        while self._open:
            queued: dict[Any, list[Any]] = {}
            closing: list[Any] = []
            entry = wait_for_work(get)  # the first item
            while True:
                lane, item = entry
                if item is _CLOSE:
                    closing.append(lane)
                else:
                    queued.setdefault(lane, []).append(item)
                if not batching:
                    break
                try:
                    entry = get_nowait()  # and takes every item queued meanwhile
                except queue.Empty:
                    break
            answers = []
            for lane in lanes:
                if lane in queued:
                    answers.append((lane, lane._run(queued[lane]), [d for _, d in queued[lane]]))
            closed = []
            for lane in closing:
                self._closed_one()
                closed.append(lane._closed)
            self._reactor.callFromThread(_deliver_all, answers, closed)
            del queued, answers  # (nothing of a wake outlives its answer here)


def _deliver_all(answers: list[tuple[Any, Any, list[defer.Deferred]]], closed: list[Any]) -> None:
    for lane, outcomes, waiting in answers:
        lane._deliver(outcomes, waiting)
    for d in closed:
        d.callback(None)


class GroupCommitThread(Generic[Item]):
    """Runs batches of submitted items, one batch at a time, off the reactor thread.

    ``run_batch(items)`` runs on the thread and returns one outcome per item
    (a :class:`Failure` among them fails that item's caller alone), or raises
    (every caller of the batch gets that failure). The thread is ``shared``
    (a :class:`BatchThread` other lanes use too) or one of its own; it starts
    with the first item and ends at :meth:`close` (a shared one once all of
    its lanes are closed). With ``batching`` False (a thread of its own
    only) every item is a batch of its own.
    """

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Any]], reactor: Any, name: str,
                 shared: Optional[BatchThread] = None, batching: bool = True) -> None:
        self._run_batch = run_batch
        self.name = name
        self._runner = shared if shared is not None else BatchThread(reactor, name, batching)
        self._runner._add(self)
        self._closed: defer.Deferred | None = None
        #: Batches run and items they served (for tests and metrics).
        self.batches = 0
        self.served = 0

    def submit(self, item: Item) -> defer.Deferred:
        """Fires with ``item``'s outcome, once a batch that started after this call is done."""
        if self._closed is not None:
            return defer.fail(RuntimeError(f"{self.name} is closed"))
        d: defer.Deferred = defer.Deferred()
        self._runner._put((self, (item, d)))
        return d

    def close(self) -> defer.Deferred:
        """Run what is queued, then end this lane; fires once that is done."""
        if self._closed is None:
            self._closed = defer.Deferred()
            if self._runner._thread is None:  # never started: nothing to wait for
                self._runner._closed_one()
                self._closed.callback(None)
            else:
                self._runner._put((self, _CLOSE))
        return after(self._closed)

    def _run(self, batch: list[tuple[Item, defer.Deferred]]) -> Any:
        """On the thread: this lane's batch, its outcomes (or one Failure for all)."""
        items = [item for item, _ in batch]
        try:
            outcomes: Any = list(self._run_batch(items))
            if len(outcomes) != len(items):
                raise AssertionError(f"{self.name}: {len(outcomes)} outcomes for {len(items)} items")
        except BaseException:
            outcomes = Failure()
            outcomes.cleanFailure()  # no frames kept alive across threads
        return outcomes

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
