"""Group sync: one flush to disk makes the writes of many callers durable.

A finished photo used to cost its own ``fdatasync`` in the spool, then an
``fsync`` of its sidecar and of its folder in the disk sink; on this kind of
disk each is a journal commit (about 0.3 ms, serialised by the filesystem
however many threads ask at once), so a gateway receiving hundreds of files a
second spent its time waiting for commits.

:class:`GroupSync` batches them the way a database group-commits: callers ask
:meth:`GroupSync.sync` after their writes; while one flush runs, later callers
wait together for the next one, which covers all of them. No caller ever
waits on a timer: a lone caller is flushed at once.

A flush syncs the callers' own files, never the whole filesystem
(:class:`FlushSet`): it starts the writeback of every file of the group
(``sync_file_range``), then calls ``fdatasync`` on each and ``fsync`` on
the folders named. The first of those commits the filesystem's journal for the
whole group, so the others cost a cache flush each, not a commit: 20 photos
of 30 KiB took 1.6-1.8 ms here, against 3.2 ms with each file synced alone.
(``syncfs(2)`` of the filesystem, which the group flushes used before, took
0.6 ms for them on an idle filesystem, but it writes back every dirty file
there: with 5,000 slow cameras' partial files dirty it took 60-130 ms, and
in the benchmark's idle-10k it cost the gateway's fast cameras 10-15 % of
their throughput; see benchmarks/README.md, the sixteenth session.) A caller
that names no file still gets a ``syncfs``: it needs the filesystem's
directory entries too.

``syncfs`` is Linux's (glibc 2.14+) and reports writeback errors since
Linux 5.8. Where it is missing, :func:`syncfs` falls back to ``os.sync()``
(every filesystem, no error report) and :data:`HAVE_SYNCFS` is False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from camgateway.groupcommit import BatchThread, GroupCommitThread

__all__ = ["GroupSync", "FlushSet", "syncfs", "start_writeback", "fsync_dir", "HAVE_SYNCFS"]


def _load_libc(name: str, argtypes: list[Any]) -> Optional[Callable[..., int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_libc("syncfs", [ctypes.c_int])
_sync_file_range = _load_libc("sync_file_range", [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                                  ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages, wait for nothing
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


def start_writeback(fd: int) -> None:
    """Start writing file ``fd``'s dirty pages to disk without waiting (Linux; elsewhere nothing).

    Advisory: it makes nothing durable and reports nothing (the ``fdatasync``
    after it does both); it lets a group's files go to disk together.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: str) -> None:
    """Make ``path``'s directory entries durable (blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FlushSet:
    """Files and folders to make durable together, each on behalf of its owners.

    :meth:`run` starts the writeback of every file, then calls ``fdatasync``
    on each file and ``fsync`` on each folder once, however many owners named it.
    A failure is its owners' alone: :meth:`run` returns them.
    """

    __slots__ = ("_files", "_folders", "_fdatasync", "_fsync_dir", "_start")

    def __init__(self, fdatasync: Callable[[int], None] = os.fdatasync,
                 fsync_dir: Callable[[str], None] = fsync_dir,
                 start_writeback: Optional[Callable[[int], None]] = start_writeback) -> None:
        self._files: list[tuple[int, Any, bool]] = []
        self._folders: dict[str, list[Any]] = {}
        self._fdatasync = fdatasync
        self._fsync_dir = fsync_dir
        self._start = start_writeback

    def __bool__(self) -> bool:
        return bool(self._files or self._folders)

    def add_file(self, fd: int, owner: Any, close: bool = False) -> None:
        """Sync file ``fd`` for ``owner`` (and close it afterwards if ``close``)."""
        self._files.append((fd, owner, close))

    def add_folder(self, path: str, owner: Any) -> None:
        """Sync folder ``path``'s entries for ``owner``."""
        self._folders.setdefault(path, []).append(owner)

    def run(self) -> dict[Any, Failure]:
        """On a thread: flush everything; the owners whose file or folder failed, with the failure."""
        failed: dict[Any, Failure] = {}
        files = self._files
        if self._start is not None and len(files) > 1:
            for fd, _, _ in files:
                try:
                    self._start(fd)
                except OSError:
                    pass  # (advisory: its fdatasync will say)
        for fd, owner, close in files:
            try:
                self._fdatasync(fd)
            except Exception:
                failed.setdefault(owner, _caught())
            finally:
                if close:
                    os.close(fd)
        for path, owners in self._folders.items():
            try:
                self._fsync_dir(path)
            except Exception:
                failure = _caught()
                for owner in owners:
                    failed.setdefault(owner, failure)
        return failed


#: What a caller of GroupSync.sync waits for: (fd, before, after).
_Item = tuple[Optional[int], Optional[Callable[[], object]], Optional[Callable[[], object]]]


class GroupSync:
    """Flushes many callers' files at a time, on a thread (its own, or ``shared``).

    ``root`` is a directory on the filesystem. Every caller's Deferred fires
    once a flush that *started after* its call has completed (or fails with
    that flush's error, or its own file's). ``directory``, if given, is
    fsynced in every flush of files: the folder they were created in.
    ``fdatasync``, ``fsync_dir``, ``start_writeback`` and ``syncfs`` are the
    flushes of one file, of a folder, the start of a file's writeback and
    the flush of the whole filesystem (replaceable for tests).
    """

    def __init__(self, root: Path, reactor: Any, *, directory: Optional[Path] = None,
                 fdatasync: Callable[[int], None] = os.fdatasync,
                 fsync_dir: Callable[[str], None] = fsync_dir,
                 start_writeback: Optional[Callable[[int], None]] = start_writeback,
                 syncfs: Callable[[Path], None] = syncfs, name: str = "camgateway-group-sync",
                 shared: Optional[BatchThread] = None) -> None:
        self.root = Path(root)
        self.directory = None if directory is None else os.fspath(directory)
        self._fdatasync = fdatasync
        self._fsync_dir = fsync_dir
        self._start = start_writeback
        self._syncfs = syncfs
        self._thread: GroupCommitThread[_Item] = GroupCommitThread(self._flush, reactor, name, shared)

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

        With ``fd``, the caller needs only that file's data (and
        ``directory``'s entries); without, the whole filesystem, directory
        entries included (a ``syncfs``). ``before`` is a last write, run on the flush's
        thread just before the flush (so a photo's bytes and hash cost the
        reactor nothing); if it raises, this caller fails alone. ``after``
        runs there once the flush succeeded (closing the file: one system
        call less on the reactor thread); if it raises, that caller fails.
        """
        return self._thread.submit((fd, before, after))

    def close(self) -> defer.Deferred:
        """Flush what is asked, then end the thread."""
        return self._thread.close()

    def _flush(self, items: list[_Item]) -> list[Optional[Failure]]:
        """On the thread: the callers' last writes, one flush for all of them, then their ``after``."""
        outcomes: list[Optional[Failure]] = [None] * len(items)
        for i, (_, before, _) in enumerate(items):
            if before is not None:
                outcomes[i] = _run(before)
        live = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if not live:
            return outcomes
        if any(items[i][0] is None for i in live):  # a caller needs the whole filesystem
            self._syncfs(self.root)  # (if it fails, every caller of the batch fails)
        else:
            flush = FlushSet(self._fdatasync, self._fsync_dir, self._start)
            for i in live:
                flush.add_file(items[i][0], i)  # type: ignore[arg-type]
                if self.directory is not None:
                    flush.add_folder(self.directory, i)
            for i, failure in flush.run().items():
                outcomes[i] = failure
        for i, (_, _, after) in enumerate(items):
            if after is not None and outcomes[i] is None:
                outcomes[i] = _run(after)
        return outcomes


def _run(step: Callable[[], object]) -> Optional[Failure]:
    """``step()``; its Failure if it raised (for that caller alone)."""
    try:
        step()
    except Exception:
        return _caught()
    return None


def _caught() -> Failure:
    """The exception being handled, as a Failure that keeps no frames alive across threads."""
    failure = Failure()
    failure.cleanFailure()
    return failure
