"""camgateway.perf.threads: blocking calls on threads, answers on the reactor thread.

WorkerPool, and TwistedPool, its plain path (``performance.worker_pool: false``).
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from camgateway.perf.threads import TwistedPool, WorkerPool


class PoolContract:
    """What both pools promise: each test runs on :attr:`pool_class` (a TestCase mixin)."""

    pool_class: Any
    #: Whether ``threads`` counts exactly the threads the calls needed (WorkerPool starts them itself).
    exact_threads = False

    def setUp(self) -> None:
        self.pool = self.pool_class(reactor, 3, name="test-pool")
        self.addCleanup(self.pool.close)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_result_and_failure_come_back_on_the_reactor_thread(self) -> Any:
        seen: list[str] = []

        def where(x: int, *, times: int) -> int:
            seen.append(threading.current_thread().name)
            return x * times

        answers: list[str] = []
        d = self.pool.run(where, 21, times=2)
        d.addCallback(lambda r: (answers.append(threading.current_thread().name), r)[1])
        self.assertEqual((yield d), 42)  # type: ignore[attr-defined]
        self.assertNotEqual(seen, [threading.current_thread().name])  # type: ignore[attr-defined]
        self.assertEqual(answers, [threading.current_thread().name])  # type: ignore[attr-defined]  # the reactor's
        with self.assertRaises(ZeroDivisionError):  # type: ignore[attr-defined]
            yield self.pool.run(lambda: 1 / 0)
        self.assertEqual(self.pool.outstanding, 0)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_positional_and_keyword_arguments(self) -> Any:
        self.assertEqual((yield self.pool.run(lambda a, b=0, *, c: (a, b, c), 1, c=3)), (1, 0, 3))  # type: ignore

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
        if self.exact_threads:
            self.assertEqual(self.pool.threads, 3)  # type: ignore[attr-defined]
        release.set()
        self.assertEqual((yield defer.gatherResults(first + [later])), [1, 1, 1, 2])  # type: ignore[attr-defined]
        self.assertLessEqual(self.pool.threads, 3)  # type: ignore[attr-defined]
        if self.exact_threads:
            self.assertEqual(self.pool.threads, 3)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_close_runs_what_was_asked_then_refuses(self) -> Any:
        release = threading.Event()
        done: list[int] = []
        calls = [self.pool.run(lambda i=i: (release.wait(10), done.append(i))) for i in range(5)]
        closed = self.pool.close()
        self.assertFalse(closed.called)  # type: ignore[attr-defined]
        release.set()
        yield defer.gatherResults(calls)
        yield closed
        self.assertEqual(sorted(done), [0, 1, 2, 3, 4])  # type: ignore[attr-defined]
        with self.assertRaises(RuntimeError):  # type: ignore[attr-defined]
            yield self.pool.run(lambda: None)
        yield self.pool.close()  # again: fires too

    @defer.inlineCallbacks
    def test_close_of_an_unused_pool(self) -> Any:
        pool = self.pool_class(reactor, 2)
        yield pool.close()
        self.assertEqual(pool.threads, 0)  # type: ignore[attr-defined]
        with self.assertRaises(RuntimeError):  # type: ignore[attr-defined]
            yield pool.run(lambda: None)

    def test_needs_a_thread(self) -> None:
        with self.assertRaises(ValueError):  # type: ignore[attr-defined]
            self.pool_class(reactor, 0)


class WorkerPoolTests(PoolContract, TestCase):
    """camgateway's own pool, and what it promises beyond the contract."""

    pool_class = WorkerPool
    exact_threads = True

    @defer.inlineCallbacks
    def test_threads_are_named_after_the_pool(self) -> Any:
        self.assertEqual((yield self.pool.run(lambda: threading.current_thread().name)), "test-pool-1")

    @defer.inlineCallbacks
    def test_threads_start_only_when_calls_need_them(self) -> Any:
        for n in range(5):
            self.assertEqual((yield self.pool.run(lambda: n)), n)
        self.assertEqual(self.pool.threads, 1)  # one call at a time: one thread


class TwistedPoolTests(PoolContract, TestCase):
    """The same calls on Twisted's own ThreadPool (``performance.worker_pool: false``)."""

    pool_class = TwistedPool

    @defer.inlineCallbacks
    def test_no_thread_runs_after_close(self) -> Any:
        yield defer.gatherResults([self.pool.run(lambda: None) for _ in range(3)])
        yield self.pool.close()
        self.assertEqual(self.pool.threads, 0)
