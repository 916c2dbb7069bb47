"""camgateway.perf.groupcommit: batches on a thread, several lanes sharing one (BatchThread)."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from camgateway.perf.groupcommit import BatchThread, GroupCommitThread


class Lane:
    """A lane's batch runner that records where and with what it ran, and can be held."""

    def __init__(self, name: str, hold: threading.Event | None = None) -> None:
        self.name = name
        self.hold = hold
        self.batches: list[list[Any]] = []
        self.threads: list[str] = []
        self.started = threading.Event()

    def __call__(self, items: list[Any]) -> list[Any]:
        self.started.set()
        if self.hold is not None:
            self.hold.wait(10)
        self.threads.append(threading.current_thread().name)
        self.batches.append(list(items))
        if "raise" in items:
            raise RuntimeError(f"{self.name} failed")
        return [f"{self.name}:{item}" for item in items]


class BatchThreadTests(TestCase):
    def setUp(self) -> None:
        self.shared = BatchThread(reactor, "test-disk")
        self.hold = threading.Event()
        self.first, self.second = Lane("first", self.hold), Lane("second")
        self.a = GroupCommitThread(self.first, reactor, "a", self.shared)
        self.b = GroupCommitThread(self.second, reactor, "b", self.shared)
        self.addCleanup(self.close)

    def close(self) -> defer.Deferred:
        self.hold.set()
        return defer.gatherResults([self.a.close(), self.b.close()])

    @defer.inlineCallbacks
    def test_lanes_run_on_one_thread_and_answer_together(self) -> Any:
        held = self.a.submit(1)  # the thread is now busy with it
        self.assertTrue(self.first.started.wait(10))
        queued = [self.a.submit(2), self.b.submit("x"), self.a.submit(3), self.b.submit("y")]
        answers: list[str] = []
        for d in queued:
            d.addCallback(lambda r: (answers.append(r), r)[1])
        self.hold.set()
        self.assertEqual((yield held), "first:1")
        self.assertEqual((yield defer.gatherResults(queued)), ["first:2", "second:x", "first:3", "second:y"])
        # One wake-up took what both lanes had queued, each lane's items as one batch, in order.
        self.assertEqual(self.first.batches, [[1], [2, 3]])
        self.assertEqual(self.second.batches, [["x", "y"]])
        self.assertEqual(set(self.first.threads + self.second.threads), {"test-disk"})
        self.assertEqual(answers, ["first:2", "first:3", "second:x", "second:y"])  # lanes in the order made
        self.assertEqual((self.a.batches, self.a.served, self.b.batches, self.b.served), (2, 3, 1, 2))

    @defer.inlineCallbacks
    def test_a_failing_batch_fails_its_own_lane_only(self) -> Any:
        self.hold.set()
        yield self.a.submit(0)
        self.hold.clear()
        self.first.started.clear()
        held = self.a.submit(1)
        self.assertTrue(self.first.started.wait(10))
        failing, fine = self.a.submit("raise"), self.b.submit("z")
        self.hold.set()
        yield held
        self.assertEqual((yield fine), "second:z")
        with self.assertRaises(RuntimeError):
            yield failing

    @defer.inlineCallbacks
    def test_the_thread_ends_once_every_lane_is_closed(self) -> Any:
        self.hold.set()
        yield self.a.submit(1)
        thread = self.shared._thread
        assert thread is not None
        last = self.b.submit("last")
        yield self.a.close()
        self.assertTrue(thread.is_alive())  # b is still open
        with self.assertRaises(RuntimeError):
            yield self.a.submit(2)  # a closed lane takes nothing
        self.assertEqual((yield last), "second:last")
        yield self.b.close()
        thread.join(10)
        self.assertFalse(thread.is_alive())

    @defer.inlineCallbacks
    def test_lanes_never_started_close_at_once(self) -> Any:
        shared = BatchThread(reactor, "idle")
        lanes = [GroupCommitThread(Lane(str(n)), reactor, str(n), shared) for n in range(2)]
        yield defer.gatherResults([lane.close() for lane in lanes])
        self.assertIsNone(shared._thread)

    @defer.inlineCallbacks
    def test_a_lane_of_its_own_by_default(self) -> Any:
        own = Lane("own")
        lane = GroupCommitThread(own, reactor, "alone")
        self.assertEqual((yield lane.submit(5)), "own:5")
        yield lane.close()
        self.assertEqual(own.threads, ["alone"])


class UnbatchedTests(TestCase):
    """``batching=False`` (``performance.group_commit: false``): every item a batch of its own, in order."""

    @defer.inlineCallbacks
    def test_items_queued_meanwhile_run_one_at_a_time(self) -> Any:
        hold = threading.Event()
        lane = Lane("alone", hold)
        thread = GroupCommitThread(lane, reactor, "unbatched", batching=False)
        self.addCleanup(thread.close)
        self.addCleanup(hold.set)
        held = thread.submit(1)
        self.assertTrue(lane.started.wait(10))
        queued = [thread.submit(2), thread.submit(3)]
        hold.set()
        self.assertEqual((yield held), "alone:1")
        self.assertEqual((yield defer.gatherResults(queued)), ["alone:2", "alone:3"])
        self.assertEqual(lane.batches, [[1], [2], [3]])
        self.assertEqual((thread.batches, thread.served), (3, 3))
        yield thread.close()

    @defer.inlineCallbacks
    def test_an_unbatched_sqlite_store_commits_each_statement(self) -> Any:
        from camgateway.storage.sqlite import SQLiteStore

        for batching, most in ((True, 1), (False, 4)):
            store = SQLiteStore(":memory:", reactor, batching=batching)
            yield store.all()  # (opened)
            before = store._thread.batches
            yield defer.gatherResults([store.pending() for _ in range(4)])
            self.assertLessEqual(store._thread.batches - before, most)
            if not batching:
                self.assertEqual(store._thread.batches - before, 4)
            yield store.close()
