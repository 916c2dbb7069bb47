"""camgateway.perf.threads: blocking calls on threads, answers on the reactor thread.

WorkerPool, and TwistedPool, its plain path (``performance.worker_pool: false``).
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from camgateway.perf.threads import TwistedPool, WorkerPool


class WorkerPoolTests(TestCase):
    def setUp(self) -> None:
        self.pool = WorkerPool(reactor, 3, name="test-pool")
        self.addCleanup(self.pool.close)

    @defer.inlineCallbacks
    def test_result_and_failure_come_back_on_the_reactor_thread(self) -> Any:
        seen: list[str] = []

        def where(x: int) -> int:
            seen.append(threading.current_thread().name)
            return x * 2

        answers: list[str] = []
        d = self.pool.run(where, 21)
        d.addCallback(lambda r: (answers.append(threading.current_thread().name), r)[1])
        self.assertEqual((yield d), 42)
        self.assertEqual(seen, ["test-pool-1"])
        self.assertEqual(answers, [threading.current_thread().name])  # the reactor's (this test's) thread
        with self.assertRaises(ZeroDivisionError):
            yield self.pool.run(lambda: 1 / 0)
        self.assertEqual(self.pool.outstanding, 0)

    @defer.inlineCallbacks
    def test_positional_and_keyword_arguments(self) -> Any:
        self.assertEqual((yield self.pool.run(lambda a, b=0, *, c: (a, b, c), 1, c=3)), (1, 0, 3))

    @defer.inlineCallbacks
    def test_calls_run_side_by_side_up_to_max_threads(self) -> Any:
        barrier = threading.Barrier(3, timeout=10)  # passes only with three calls running at once
        release = threading.Event()

        def meet() -> int:
            barrier.wait()
            release.wait(10)
            return 1

        first = [self.pool.run(meet) for _ in range(3)]
        later = self.pool.run(lambda: 2)  # queued behind them: no fourth thread
        self.assertEqual(self.pool.threads, 3)
        release.set()
        self.assertEqual((yield defer.gatherResults(first + [later])), [1, 1, 1, 2])
        self.assertEqual(self.pool.threads, 3)

    @defer.inlineCallbacks
    def test_threads_start_only_when_calls_need_them(self) -> Any:
        for n in range(5):
            self.assertEqual((yield self.pool.run(lambda: n)), n)
        self.assertEqual(self.pool.threads, 1)  # one call at a time: one thread

    @defer.inlineCallbacks
    def test_close_runs_what_was_asked_then_refuses(self) -> Any:
        release = threading.Event()
        done: list[int] = []
        calls = [self.pool.run(lambda i=i: (release.wait(10), done.append(i))) for i in range(5)]
        closed = self.pool.close()
        self.assertFalse(closed.called)
        release.set()
        yield defer.gatherResults(calls)
        yield closed
        self.assertEqual(sorted(done), [0, 1, 2, 3, 4])
        with self.assertRaises(RuntimeError):
            yield self.pool.run(lambda: None)
        yield self.pool.close()  # again: fires too

    @defer.inlineCallbacks
    def test_close_of_an_unused_pool(self) -> Any:
        pool = WorkerPool(reactor, 2)
        yield pool.close()
        self.assertEqual(pool.threads, 0)

    def test_needs_a_thread(self) -> None:
        with self.assertRaises(ValueError):
            WorkerPool(reactor, 0)


class TwistedPoolTests(TestCase):
    """The same calls on Twisted's own ThreadPool."""

    def setUp(self) -> None:
        self.pool = TwistedPool(reactor, 3, name="test-pool")
        self.addCleanup(self.pool.close)

    @defer.inlineCallbacks
    def test_result_and_failure_come_back_on_the_reactor_thread(self) -> Any:
        seen: list[str] = []

        def where(x: int, *, times: int) -> int:
            seen.append(threading.current_thread().name)
            return x * times

        answers: list[str] = []
        d = self.pool.run(where, 21, times=2)
        d.addCallback(lambda r: (answers.append(threading.current_thread().name), r)[1])
        self.assertEqual((yield d), 42)
        self.assertNotEqual(seen, [threading.current_thread().name])
        self.assertEqual(answers, [threading.current_thread().name])
        with self.assertRaises(ZeroDivisionError):
            yield self.pool.run(lambda: 1 / 0)
        self.assertEqual(self.pool.outstanding, 0)

    @defer.inlineCallbacks
    def test_calls_run_side_by_side_up_to_max_threads(self) -> Any:
        barrier = threading.Barrier(3, timeout=10)
        release = threading.Event()

        def meet() -> int:
            barrier.wait()
            release.wait(10)
            return 1

        first = [self.pool.run(meet) for _ in range(3)]
        later = self.pool.run(lambda: 2)
        release.set()
        self.assertEqual((yield defer.gatherResults(first + [later])), [1, 1, 1, 2])
        self.assertLessEqual(self.pool.threads, 3)

    @defer.inlineCallbacks
    def test_close_runs_what_was_asked_then_refuses(self) -> Any:
        release = threading.Event()
        done: list[int] = []
        calls = [self.pool.run(lambda i=i: (release.wait(10), done.append(i))) for i in range(5)]
        closed = self.pool.close()
        self.assertFalse(closed.called)
        release.set()
        yield defer.gatherResults(calls)
        yield closed
        self.assertEqual(sorted(done), [0, 1, 2, 3, 4])
        self.assertEqual(self.pool.threads, 0)
        with self.assertRaises(RuntimeError):
            yield self.pool.run(lambda: None)
        yield self.pool.close()

    @defer.inlineCallbacks
    def test_close_of_an_unused_pool(self) -> Any:
        pool = TwistedPool(reactor, 2)
        yield pool.close()
        self.assertEqual(pool.threads, 0)

    def test_needs_a_thread(self) -> None:
        with self.assertRaises(ValueError):
            TwistedPool(reactor, 0)
