"""The embedded store: partial transfers and the outbox in one SQLite file.

One database under the spool (``resume.sqlite``), one thread: every
statement runs there, so the reactor never waits on the disk and statements
never interleave; statements queued while a commit runs share the next one
(:class:`~camgateway.perf.groupcommit.GroupCommitThread`, in the gateway a lane of
the thread its spool flushes and disk sink use too). The schema is
versioned (``version`` table); a new database is built in a temporary file
and renamed into place, and an older one is upgraded in place, one script
per version, inside a transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from camgateway.perf.groupcommit import BatchThread, GroupCommitThread
from camgateway.storage.records import IOutboxStore, IResumeStore, OutboxEntry, Partial, remove_files

__all__ = ["SQLiteStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2
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

# Each script takes the schema from the version before it to its own.
_UPGRADES = {
    2: """
CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    spool_name TEXT NOT NULL,
    sink INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    record TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX outbox_due ON outbox (next_attempt);
""",
}


def _row(row: tuple[Any, ...]) -> Partial:
    return Partial(*row[:3], bytes(row[3]), *row[4:])  # type: ignore[arg-type]


_COLUMNS = ("id, imei, flow, identifier, total, start_crc, meta_timestamp, held, boot_id,"
            " spool_name, first_seen, last_seen")


@implementer(IResumeStore, IOutboxStore)
class SQLiteStore:
    """The embedded store (``":memory:"`` is for tests)."""

    #: IOutboxStore.shared
    shared = False

    def __init__(self, path: str | Path, reactor: Any = None, shared: Optional[BatchThread] = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self.path = str(path)
        self._db: sqlite3.Connection | None = None
        self._thread: GroupCommitThread[Callable[[sqlite3.Connection], Any]] = GroupCommitThread(
            lambda fns: self._in_thread(fns), reactor, "camgateway-resume-store", shared)
        # The keys of every partial (imei, flow, identifier) -> id, once :meth:`all`
        # has read them (the start-up reconcile does), kept up to date by this
        # object's own changes (the only writer of the partials table): a file
        # with no partial, nearly every file, is then found absent with no
        # round trip to the store's thread.
        self._keys: Optional[dict[tuple[str, str, bytes], str]] = None
        self._key_of: dict[str, tuple[str, str, bytes]] = {}

    # -- running statements on the store's thread

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> "Deferred[T]":
        """Queue ``fn`` for the store's thread; statements queued meanwhile share one commit."""
        return self._thread.submit(fn)

    def _in_thread(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        """Group commit: every queued statement in one transaction, one fsync.

        First all together; if one fails, the transaction is rolled back and
        the batch runs again with each in its own savepoint, so one failing
        does not undo the others. (Savepoints for every statement cost three
        more steps each, every one a GIL hand-off.)
        """
        if self._db is None:
            self._db = self._open()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            outcomes = [fn(db) for fn in fns]
            db.execute("COMMIT")
            return _committed(outcomes)
        except Exception:
            if db.in_transaction:
                db.execute("ROLLBACK")
        outcomes = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for fn in fns:
                db.execute("SAVEPOINT op")
                try:
                    outcomes.append(fn(db))
                except Exception:
                    outcomes.append(Failure())
                    db.execute("ROLLBACK TO op")
                db.execute("RELEASE op")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return _committed(outcomes)

    def _open(self) -> sqlite3.Connection:
        if self.path != ":memory:" and not os.path.exists(self.path):
            self._create_atomically()
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY")
        db.execute("PRAGMA synchronous=FULL")
        if self.path == ":memory:":
            db.executescript(_SCHEMA_V1)
            db.execute("INSERT INTO version VALUES (1)")
        self._upgrade(db)
        return db  # autocommit mode: _in_thread begins and commits each batch itself

    def _create_atomically(self) -> None:
        tmp = f"{self.path}.new-{os.getpid()}"
        if os.path.exists(tmp):
            os.unlink(tmp)
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.executescript(_SCHEMA_V1)
            db.execute("INSERT INTO version VALUES (1)")
            self._upgrade(db)
        finally:
            db.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)

    def _upgrade(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("SELECT version FROM version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this camgateway"
                f" ({SCHEMA_VERSION}); upgrade camgateway or move the file away"
            )
        while version < SCHEMA_VERSION:
            version += 1
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _UPGRADES[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("UPDATE version SET version = ?", (version,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # -- IResumeStore

    def _forget_key(self, partial_id: str) -> None:
        key = self._key_of.pop(partial_id, None)
        if key is not None and self._keys is not None and self._keys.get(key) == partial_id:
            del self._keys[key]

    def find(self, imei: str, flow: str, identifier: bytes) -> "Deferred[Optional[Partial]]":
        if self._keys is not None and (imei, flow, identifier) not in self._keys:
            return succeed(None)

        def q(db: sqlite3.Connection) -> Optional[Partial]:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM partials WHERE imei=? AND flow=? AND identifier=?",
                (imei, flow, identifier),
            ).fetchone()
            return _row(row) if row else None

        return self._run(q)

    def add(self, partial: Partial) -> "Deferred[None]":
        values = (partial.id, partial.imei, partial.flow, partial.identifier, partial.total, partial.start_crc,
                  partial.meta_timestamp, partial.held, partial.boot_id, partial.spool_name, partial.first_seen,
                  partial.last_seen)  # _COLUMNS (not dataclasses.astuple: a deep copy per field)
        key = partial.key
        if self._keys is not None:
            old = self._keys.get(key)
            if old is not None:
                self._key_of.pop(old, None)
            self._keys[key] = partial.id
        self._key_of[partial.id] = key

        def q(db: sqlite3.Connection) -> None:  # REPLACE also drops an older row with the same key
            db.execute(f"INSERT OR REPLACE INTO partials ({_COLUMNS}) VALUES"
                       f" ({', '.join('?' * len(values))})", values)

        return self._run(q)

    def checkpoint(self, partial_id: str, held: int, boot_id: str, now: float) -> "Deferred[None]":
        def q(db: sqlite3.Connection) -> None:
            db.execute("UPDATE partials SET held=?, boot_id=?, last_seen=? WHERE id=?",
                       (held, boot_id, now, partial_id))

        return self._run(q)

    def remove(self, partial_id: str) -> "Deferred[None]":
        self._forget_key(partial_id)
        return self._run(lambda db: db.execute("DELETE FROM partials WHERE id=?", (partial_id,)) and None)

    def all(self) -> "Deferred[list[Partial]]":
        d = self._run(lambda db: [_row(r) for r in db.execute(
            f"SELECT {_COLUMNS} FROM partials ORDER BY first_seen")])
        if self._keys is None:
            d.addCallback(self._learn_keys)
        return d

    def _learn_keys(self, partials: list[Partial]) -> list[Partial]:
        """Start the key cache from a full read (and what was added since it was asked for)."""
        if self._keys is None:
            keys: dict[tuple[str, str, bytes], str] = {}
            key_of: dict[str, tuple[str, str, bytes]] = {}
            for p in partials:
                keys[p.key] = p.id
                key_of[p.id] = p.key
            for partial_id, key in self._key_of.items():  # added meanwhile (removals only leave stale keys)
                keys[key] = partial_id
                key_of[partial_id] = key
            self._keys, self._key_of = keys, key_of
        return partials

    def expired(self, before: float) -> "Deferred[list[Partial]]":
        return self._run(lambda db: [_row(r) for r in db.execute(
            f"SELECT {_COLUMNS} FROM partials WHERE last_seen < ? ORDER BY last_seen", (before,))])

    def close(self) -> "Deferred[None]":
        def shut(_: object) -> None:
            if self._db is not None:  # the thread is over: nothing else uses the connection
                self._db.close()
                self._db = None

        return self._thread.close().addCallback(shut)

    # -- IOutboxStore

    def enqueue(self, entry: OutboxEntry, partial_id: Optional[str]) -> "Deferred[None]":
        if partial_id is not None:
            self._forget_key(partial_id)

        def q(db: sqlite3.Connection) -> None:
            _insert_entry(db, entry)
            if partial_id is not None:
                db.execute("DELETE FROM partials WHERE id=?", (partial_id,))

        return self._run(q)

    def due(self, now: float, limit: int, exclude: frozenset) -> "Deferred[list[OutboxEntry]]":
        # The entries in flight are left out by the query, so only the records
        # returned are decoded (a scan for one free slot beside 31 deliveries
        # in flight used to decode 32 records to keep one).
        skip = sorted(exclude)
        not_in = f" AND id NOT IN ({', '.join('?' * len(skip))})" if skip else ""

        def q(db: sqlite3.Connection) -> list[OutboxEntry]:
            rows = db.execute(f"SELECT {_OUTBOX} FROM outbox WHERE next_attempt <= ?{not_in}"
                              " ORDER BY next_attempt LIMIT ?", (now, *skip, limit))
            return [_entry(row) for row in rows]

        return self._run(q)

    def update(self, entry: OutboxEntry) -> "Deferred[None]":
        return self._run(lambda db: db.execute(
            "UPDATE outbox SET sink=?, attempts=?, next_attempt=?, last_error=? WHERE id=?",
            (entry.sink, entry.attempts, entry.next_attempt, entry.last_error, entry.id)) and None)

    def replace(self, entry_id: str, entries: list[OutboxEntry],
                remove: Sequence[str] = ()) -> "Deferred[list[tuple[str, str]]]":
        def q(db: sqlite3.Connection) -> Any:
            db.execute("DELETE FROM outbox WHERE id=?", (entry_id,))
            for entry in entries:
                _insert_entry(db, entry)
            return _AfterCommit(lambda: remove_files(remove)) if remove else []

        return self._run(q)

    def pending(self) -> "Deferred[list[OutboxEntry]]":
        return self._run(lambda db: [_entry(r) for r in db.execute(
            f"SELECT {_OUTBOX} FROM outbox ORDER BY created")])


_OUTBOX = "id, spool_name, sink, attempts, next_attempt, last_error, record, created"


class _AfterCommit:
    """A statement's outcome that is work to do once its transaction is committed."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], Any]) -> None:
        self.run = run


def _committed(outcomes: list[Any]) -> list[Any]:
    """After COMMIT: run the statements' after-commit work; its result is their outcome."""
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, _AfterCommit):
            try:
                outcomes[i] = outcome.run()
            except Exception:
                failure = outcomes[i] = Failure()
                failure.cleanFailure()  # (it crosses to the reactor's thread, as GroupCommitThread's do)
    return outcomes


def _insert_entry(db: sqlite3.Connection, entry: OutboxEntry) -> None:
    # Not dataclasses.astuple: it deep-copies the record, which was over half
    # of the store thread's time holding the GIL under photo load (py-spy --gil).
    db.execute(f"INSERT OR REPLACE INTO outbox ({_OUTBOX}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (entry.id, entry.spool_name, entry.sink, entry.attempts, entry.next_attempt, entry.last_error,
                json.dumps(entry.record), entry.created))


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    return OutboxEntry(*row[:6], json.loads(row[6]), row[7])  # type: ignore[arg-type]
