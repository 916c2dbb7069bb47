"""Group sync: one flush to disk makes the writes of many callers durable.

Flushed one by one, a finished photo costs its own ``fdatasync`` in the
spool, then an ``fsync`` of its sidecar and of its folder in the disk sink;
on an ext4 disk each is a journal commit (about 0.3 ms, serialised by the
filesystem however many threads ask at once), so a gateway receiving
hundreds of files a second would spend its time waiting for commits.

:class:`GroupSync` batches them the way a database group-commits: callers ask
:meth:`GroupSync.sync` after their writes; while one flush runs, later callers
wait together for the next one, which covers all of them. With one caller
waiting, the flush is that caller's ``fdatasync`` (if it named a file); with
more, or when directory entries must be durable too, it is one ``syncfs(2)``
of the filesystem, which writes back every dirty file and commits the
journal once. No caller ever waits on a timer: a lone caller is flushed at
once.

What no caller flushes builds up meanwhile: a slow camera's bytes trickle
into its partial file every few seconds and wait there, dirty, until the
file ends. The next ``syncfs`` writes all of them back, and its callers wait
for that: in the benchmark's idle-10k, 9,850 slow cameras' 10-20 seconds of
bytes met the fast cameras' first flushes, the kernel's writeback took
about a sixth of a CPU from them, and they kept 68-71 % of their bulk-100 rate
(84 % with the backlog flushed just before). So the writers of such bytes
report them (:meth:`GroupSync.written`), and once ``writeback_bytes`` of
them are counted the filesystem is flushed as if a caller had asked: no
caller's flush ever writes back more than about that much of them.

``syncfs`` is Linux's (glibc 2.14+) and reports writeback errors since
Linux 5.8. Where it is missing, :func:`syncfs` falls back to ``os.sync()``
(every filesystem, no error report) and :data:`HAVE_SYNCFS` is False, so
callers that can fsync file by file instead (the disk sink) do so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from camgateway.perf.groupcommit import BatchThread, GroupCommitThread

__all__ = ["GroupSync", "syncfs", "fsync_dir", "HAVE_SYNCFS", "WRITEBACK_BYTES"]

log = Logger(namespace="camgateway.perf.durability")

#: Bytes written that no caller will flush soon (slow cameras' trickles into
#: the spool) after which the spool's filesystem is flushed anyway: at the
#: benchmark's 9,850 slow cameras (10 MB/s) a ``syncfs`` every 0.4 s, each
#: writing back about 800 partial files' few KiB.
WRITEBACK_BYTES = 4 * 1024 * 1024


def _load_syncfs() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()
#: Whether this platform has syncfs(2).
HAVE_SYNCFS = _syncfs is not None


def syncfs(path: Path) -> None:
    """Make everything written to the filesystem holding ``path`` durable (blocking)."""
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


#: What a caller of GroupSync.sync waits for: (fd, before, after).
_Item = tuple[Optional[int], Optional[Callable[[], object]], Optional[Callable[[], object]]]


class GroupSync:
    """Flushes one filesystem for many callers at a time, on a thread (its own, or ``shared``).

    ``root`` is a directory on the filesystem. Every caller's Deferred fires
    once a flush that *started after* its call has completed (or fails with
    that flush's error). ``fdatasync`` and ``syncfs`` are the flushes of one
    file and of the whole filesystem (replaceable for tests). With
    ``writeback_bytes``, :meth:`written` flushes the filesystem once that
    many bytes no caller flushes were written (see the module docstring).
    """

    def __init__(self, root: Path, reactor: Any, *, fdatasync: Callable[[int], None] = os.fdatasync,
                 syncfs: Callable[[Path], None] = syncfs, name: str = "camgateway-group-sync",
                 shared: Optional[BatchThread] = None, writeback_bytes: Optional[int] = None) -> None:
        self.root = Path(root)
        self._fdatasync = fdatasync
        self._syncfs = syncfs
        self._thread: GroupCommitThread[_Item] = GroupCommitThread(self._flush, reactor, name, shared)
        self.writeback_bytes = writeback_bytes
        self._unflushed = 0  # bytes reported by written() since the last writeback was asked
        self._writeback: Optional[defer.Deferred] = None
        #: Flushes asked by written() (for tests).
        self.writebacks = 0

    @property
    def flushes(self) -> int:
        """Flushes done."""
        return self._thread.batches

    @property
    def served(self) -> int:
        """Callers those flushes served."""
        return self._thread.served

    def sync(self, fd: Optional[int] = None, before: Optional[Callable[[], object]] = None,
             after: Optional[Callable[[], object]] = None) -> defer.Deferred:
        """Fires when what was written before this call is durable.

        With ``fd``, the caller needs only that file's data (``fdatasync``
        will do when it is alone); without, the whole filesystem, directory
        entries included. ``before`` is a last write, run on the flush's
        thread just before the flush (so a photo's bytes and hash cost the
        reactor nothing); if it raises, this caller fails alone. ``after``
        runs there once the flush succeeded (closing the file: one system
        call less on the reactor thread); if it raises, that caller fails.
        """
        return self._thread.submit((fd, before, after))

    def written(self, nbytes: int) -> None:
        """``nbytes`` were written to the filesystem that no caller will flush soon (a slow camera's trickle).

        Once ``writeback_bytes`` of them are counted, the filesystem is
        flushed (a ``syncfs``, queued like a caller's; one at a time), so that
        they never pile up for a caller's flush to wait on. Nothing waits for
        it: if it fails, it is logged, and every file is still made durable
        by its own flush when it ends.
        """
        if self.writeback_bytes is None:
            return
        self._unflushed += nbytes
        if self._unflushed < self.writeback_bytes or self._writeback is not None:
            return
        self._unflushed = 0
        self.writebacks += 1
        d = self._writeback = self.sync()
        d.addErrback(self._writeback_failed)
        d.addBoth(self._writeback_over)

    def _writeback_failed(self, failure: Failure) -> None:
        log.warn("flushing {root} (the slow cameras' bytes) failed: {error}; each file is still flushed when it"
                 " ends", root=self.root, error=failure.getErrorMessage())

    def _writeback_over(self, _: object) -> None:
        self._writeback = None

    def close(self) -> defer.Deferred:
        """Flush what is asked, then end the thread."""
        return self._thread.close()

    def _flush(self, items: list[_Item]) -> list[Optional[Failure]]:
        """On the thread: the callers' last writes, one flush for all of them, then their ``after``."""
        outcomes: list[Optional[Failure]] = [None] * len(items)
        for i, (_, before, _) in enumerate(items):
            if before is not None:
                outcomes[i] = _run(before)
        if all(outcomes):
            return outcomes
        fd = items[0][0]
        if len(items) == 1 and fd is not None:
            self._fdatasync(fd)
        else:
            self._syncfs(self.root)
        for i, (_, _, after) in enumerate(items):
            if after is not None and outcomes[i] is None:
                outcomes[i] = _run(after)
        return outcomes


def _run(step: Callable[[], object]) -> Optional[Failure]:
    """``step()``; its Failure if it raised (for that caller alone)."""
    try:
        step()
    except Exception:
        failure = Failure()
        failure.cleanFailure()
        return failure
    return None


def fsync_dir(path: "str | os.PathLike[str]") -> None:
    """Make a folder's entries (names created, renamed, removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
