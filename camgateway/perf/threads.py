"""Blocking calls on worker threads, their results back on the reactor thread.

:class:`WorkerPool` does what ``deferToThreadPool`` on the reactor's pool
did, with less Python per call. Under photo load the pool carries several
calls per file (spool writes, the disk sink's stores, unlinks), and every
bytecode run for them holds the GIL the reactor needs: ``py-spy --gil``
showed Twisted's pool machinery (a coordinator worker per hand-off, a
``queue.Queue`` and a ``threading.Condition`` in Python, a log context per
call) at about a tenth of all the time the GIL was held. Here a call is one
``SimpleQueue.put`` (C) on the reactor thread and one ``callFromThread``
back.

Threads start as calls need them, up to ``max_threads``, and stay.
:meth:`WorkerPool.close` lets the calls already queued run, then ends the
threads; a call made after it fails at once rather than never firing.

:class:`TwistedPool` is the plain path (``performance.worker_pool: false``,
docs/performance.md): the same calls on Twisted's own ``ThreadPool``, with
``deferToThreadPool``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from camgateway.base.deferreds import after

__all__ = ["WorkerPool", "TwistedPool", "wait_for_work"]

_STOP = None
T = TypeVar("T")


def wait_for_work(get: Callable[[], T]) -> T:
    """``get()``, a worker thread's wait for its next job.

    In a frame of its own so that a profile (``benchmarks/report.py``) can
    tell a thread waiting for work, the innermost frame, from a busy one.
    """
    return get()


class WorkerPool:
    """Runs blocking callables on up to ``max_threads`` threads (daemon threads)."""

    def __init__(self, reactor: Any, max_threads: int, name: str = "camgateway-worker") -> None:
        if max_threads < 1:
            raise ValueError("a WorkerPool needs at least one thread")
        self._reactor = reactor
        self.max_threads = max_threads
        self.name = name
        self._queue: "queue.SimpleQueue[Optional[tuple[defer.Deferred, Callable[..., Any], tuple, dict]]]" = \
            queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        #: Calls made and not yet answered (counted on the reactor thread only).
        self.outstanding = 0
        self._ended = 0
        self._closed: Optional[defer.Deferred] = None

    @property
    def threads(self) -> int:
        """Threads started."""
        return len(self._threads)

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Fires with ``f(*args, **kwargs)`` run on a worker thread (or fails with what it raised)."""
        if self._closed is not None:
            return defer.fail(RuntimeError(f"{self.name} pool is closed"))
        d: defer.Deferred = defer.Deferred()
        self.outstanding += 1
        if self.outstanding > len(self._threads) and len(self._threads) < self.max_threads:
            thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads) + 1}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        self._queue.put((d, f, args, kwargs))
        return d

    def close(self) -> defer.Deferred:
        """Run the calls already made, then end every thread; fires once they have ended."""
        if self._closed is None:
            self._closed = defer.Deferred()
            for _ in self._threads:
                self._queue.put(_STOP)
            if not self._threads:
                self._closed.callback(None)
        return after(self._closed)

    def _work(self) -> None:
        get, call_back = self._queue.get, self._reactor.callFromThread
        while True:
            job = wait_for_work(get)
            if job is _STOP:
                call_back(self._thread_ended)
                return
            d, f, args, kwargs = job
            try:
                result, ok = f(*args, **kwargs), True
            except BaseException:
                result, ok = Failure(), False
                result.cleanFailure()  # no frames of this thread kept alive
            call_back(self._answer, d, ok, result)
            del job, d, f, args, kwargs, result

    def _answer(self, d: defer.Deferred, ok: bool, result: Any) -> None:
        self.outstanding -= 1
        if ok:
            d.callback(result)
        else:
            d.errback(result)

    def _thread_ended(self) -> None:
        self._ended += 1
        if self._ended == len(self._threads) and self._closed is not None and not self._closed.called:
            self._closed.callback(None)


class TwistedPool:
    """Runs blocking callables on Twisted's own ``ThreadPool`` of up to ``max_threads`` threads.

    The plain path of :class:`WorkerPool`, with the same methods:
    ``deferToThreadPool`` per call; :meth:`close` waits for the calls made,
    then stops the pool; a call made after it fails at once.
    """

    def __init__(self, reactor: Any, max_threads: int, name: str = "camgateway-worker") -> None:
        if max_threads < 1:
            raise ValueError("a TwistedPool needs at least one thread")
        self._reactor = reactor
        self.max_threads = max_threads
        self.name = name
        self._pool = ThreadPool(0, max_threads, name)
        self._pool.start()
        #: Calls made and not yet answered.
        self.outstanding = 0
        self._closed: Optional[defer.Deferred] = None

    @property
    def threads(self) -> int:
        """Threads running (started, not ended)."""
        return sum(thread.is_alive() for thread in self._pool.threads)

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Fires with ``f(*args, **kwargs)`` run on a pool thread (or fails with what it raised)."""
        if self._closed is not None:
            return defer.fail(RuntimeError(f"{self.name} pool is closed"))
        self.outstanding += 1
        d = deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)
        d.addBoth(self._answered)
        return d

    def _answered(self, result: Any) -> Any:
        self.outstanding -= 1
        if not self.outstanding and self._closed is not None and not self._closed.called:
            self._end()
        return result

    def close(self) -> defer.Deferred:
        """Wait for the calls made, then stop the pool's threads; fires once they have ended."""
        if self._closed is None:
            self._closed = defer.Deferred()
            if not self.outstanding:
                self._end()
        return after(self._closed)

    def _end(self) -> None:
        self._pool.stop()  # (every thread idle by now: the joins are short)
        assert self._closed is not None
        self._closed.callback(None)
