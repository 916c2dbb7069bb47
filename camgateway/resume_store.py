"""Where interrupted transfers are remembered: the resume-offset store.

A *partial* is a file a camera started to send and did not finish. Its bytes
live in a spool file (:mod:`camgateway.spool`); the store records what the
file is and how many of its bytes are known to be durable, so that when the
camera offers the same file again, on any later connection, the gateway asks
it to RESUME where it stopped (PROTOCOL.md section 9).

Write order, which makes the store and the spool agree after a crash:

1. the record is inserted (``held`` 0) before the spool file gets any byte;
2. bytes are appended to the spool file as frames pass their CRC;
3. a checkpoint ``fdatasync``\\ s the spool file, *then* records ``held``
   (and the kernel's boot id) in the store.

So ``held`` never exceeds what is on stable storage. On start the gateway
reconciles (:func:`camgateway.spool.reconcile`): when the machine has not
rebooted since the checkpoint (same boot id), the page cache survived a
``kill -9`` and every byte in the spool file is good; after a reboot only
``held`` bytes are trusted and the file is truncated to them. Spool files
with no record, and records with no spool file, are dropped.

The store is an interface (:class:`IResumeStore`) so that other backends
(for example a shared one for several instances) can replace the embedded
SQLite one, :class:`SQLiteResumeStore`, which is the default.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

__all__ = ["Partial", "IResumeStore", "SQLiteResumeStore", "MemoryResumeStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
T = TypeVar("T")

_SCHEMA_V1 = """
CREATE TABLE version (version INTEGER NOT NULL);
CREATE TABLE partials (
    id TEXT PRIMARY KEY,
    imei TEXT NOT NULL,
    flow TEXT NOT NULL,
    identifier BLOB NOT NULL,
    total INTEGER NOT NULL,
    start_crc INTEGER NOT NULL,
    meta_timestamp TEXT,
    held INTEGER NOT NULL DEFAULT 0,
    boot_id TEXT NOT NULL DEFAULT '',
    spool_name TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    UNIQUE (imei, flow, identifier)
);
CREATE INDEX partials_last_seen ON partials (last_seen);
"""


@dataclasses.dataclass
class Partial:
    """One interrupted transfer: what the file is, and how much of it is held."""

    id: str
    imei: str
    flow: str  # "dualcam" or "path"
    identifier: bytes  # b"%videof" or the device path as received
    total: int  # START's u32: packets (DualCam) or bytes (path flow)
    start_crc: int
    meta_timestamp: Optional[str]
    held: int  # bytes durable in the spool file
    boot_id: str
    spool_name: str
    first_seen: float
    last_seen: float

    def matches(self, total: int, start_crc: int, meta_timestamp: Optional[str]) -> bool:
        """Whether a file offered now is the one this partial holds the start of."""
        if total != self.total or start_crc != self.start_crc:
            return False
        if meta_timestamp and self.meta_timestamp and meta_timestamp != self.meta_timestamp:
            return False
        return True


class IResumeStore(Interface):
    """Records partial transfers. Every method returns a Deferred."""

    def find(imei: str, flow: str, identifier: bytes) -> Deferred:
        """The :class:`Partial` for this file identity, or None."""

    def add(partial: Partial) -> Deferred:
        """Record a new partial, replacing any other with the same identity."""

    def checkpoint(partial_id: str, held: int, boot_id: str, now: float) -> Deferred:
        """Record that ``held`` bytes of the partial are durable."""

    def remove(partial_id: str) -> Deferred:
        """Forget a partial (finished, discarded or expired)."""

    def all() -> Deferred:
        """Every partial, oldest first."""

    def expired(before: float) -> Deferred:
        """Partials last seen before ``before`` (a POSIX time)."""

    def close() -> Deferred:
        """Release the store's resources."""


def _row(row: tuple[Any, ...]) -> Partial:
    return Partial(*row[:3], bytes(row[3]), *row[4:])  # type: ignore[arg-type]


_COLUMNS = ("id, imei, flow, identifier, total, start_crc, meta_timestamp, held, boot_id,"
            " spool_name, first_seen, last_seen")


@implementer(IResumeStore)
class SQLiteResumeStore:
    """The embedded store: one SQLite file under the spool, one thread.

    Every statement runs on a dedicated single-thread pool, so the reactor
    never waits on the disk and statements never interleave. A new database
    is built in a temporary file and renamed into place, so a crash during
    creation never leaves a half-made one. ``":memory:"`` is for tests.
    """

    def __init__(self, path: str | Path, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self.path = str(path)
        self._pool = ThreadPool(1, 1, name="camgateway-resume-store")
        self._pool.start()
        self._db: sqlite3.Connection | None = None

    # -- running statements on the store's thread

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> "Deferred[T]":
        return deferToThreadPool(self._reactor, self._pool, self._in_thread, fn)

    def _in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._db = self._open()
        with self._db:
            return fn(self._db)

    def _open(self) -> sqlite3.Connection:
        if self.path != ":memory:" and not os.path.exists(self.path):
            self._create_atomically()
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY")
        db.execute("PRAGMA synchronous=FULL")
        db.isolation_level = "DEFERRED"
        if self.path == ":memory:":
            db.executescript(_SCHEMA_V1)
            db.execute("INSERT INTO version VALUES (?)", (SCHEMA_VERSION,))
        self._check_version(db)
        return db

    def _create_atomically(self) -> None:
        tmp = f"{self.path}.new-{os.getpid()}"
        if os.path.exists(tmp):
            os.unlink(tmp)
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.executescript(_SCHEMA_V1)
            db.execute("INSERT INTO version VALUES (?)", (SCHEMA_VERSION,))
        finally:
            db.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)

    def _check_version(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("SELECT version FROM version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this camgateway"
                f" ({SCHEMA_VERSION}); upgrade camgateway or move the file away"
            )
        # Upgrades from older versions go here, one script per version.

    # -- IResumeStore

    def find(self, imei: str, flow: str, identifier: bytes) -> "Deferred[Optional[Partial]]":
        def q(db: sqlite3.Connection) -> Optional[Partial]:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM partials WHERE imei=? AND flow=? AND identifier=?",
                (imei, flow, identifier),
            ).fetchone()
            return _row(row) if row else None

        return self._run(q)

    def add(self, partial: Partial) -> "Deferred[None]":
        values = dataclasses.astuple(partial)

        def q(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM partials WHERE imei=? AND flow=? AND identifier=?",
                       (partial.imei, partial.flow, partial.identifier))
            db.execute(f"INSERT OR REPLACE INTO partials ({_COLUMNS}) VALUES"
                       f" ({', '.join('?' * len(values))})", values)

        return self._run(q)

    def checkpoint(self, partial_id: str, held: int, boot_id: str, now: float) -> "Deferred[None]":
        def q(db: sqlite3.Connection) -> None:
            db.execute("UPDATE partials SET held=?, boot_id=?, last_seen=? WHERE id=?",
                       (held, boot_id, now, partial_id))

        return self._run(q)

    def remove(self, partial_id: str) -> "Deferred[None]":
        return self._run(lambda db: db.execute("DELETE FROM partials WHERE id=?", (partial_id,)) and None)

    def all(self) -> "Deferred[list[Partial]]":
        return self._run(lambda db: [_row(r) for r in db.execute(
            f"SELECT {_COLUMNS} FROM partials ORDER BY first_seen")])

    def expired(self, before: float) -> "Deferred[list[Partial]]":
        return self._run(lambda db: [_row(r) for r in db.execute(
            f"SELECT {_COLUMNS} FROM partials WHERE last_seen < ? ORDER BY last_seen", (before,))])

    def close(self) -> "Deferred[None]":
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        d = deferToThreadPool(self._reactor, self._pool, shut)
        d.addBoth(lambda r: (self._pool.stop(), r)[1])
        return d


@implementer(IResumeStore)
class MemoryResumeStore:
    """A store that forgets everything on restart: for tests and throw-away runs.

    Every Deferred it returns has already fired, which makes sessions fully
    synchronous under ``StringTransport`` and ``task.Clock``.
    """

    def __init__(self) -> None:
        self.partials: dict[str, Partial] = {}

    def find(self, imei: str, flow: str, identifier: bytes) -> "Deferred[Optional[Partial]]":
        for p in self.partials.values():
            if (p.imei, p.flow, p.identifier) == (imei, flow, identifier):
                return succeed(dataclasses.replace(p))
        return succeed(None)

    def add(self, partial: Partial) -> "Deferred[None]":
        for other in list(self.partials.values()):
            if (other.imei, other.flow, other.identifier) == (partial.imei, partial.flow, partial.identifier):
                del self.partials[other.id]
        self.partials[partial.id] = dataclasses.replace(partial)
        return succeed(None)

    def checkpoint(self, partial_id: str, held: int, boot_id: str, now: float) -> "Deferred[None]":
        p = self.partials.get(partial_id)
        if p is not None:
            p.held, p.boot_id, p.last_seen = held, boot_id, now
        return succeed(None)

    def remove(self, partial_id: str) -> "Deferred[None]":
        self.partials.pop(partial_id, None)
        return succeed(None)

    def all(self) -> "Deferred[list[Partial]]":
        return succeed(sorted((dataclasses.replace(p) for p in self.partials.values()),
                              key=lambda p: p.first_seen))

    def expired(self, before: float) -> "Deferred[list[Partial]]":
        return succeed([dataclasses.replace(p) for p in self.partials.values() if p.last_seen < before])

    def close(self) -> "Deferred[None]":
        return succeed(None)
