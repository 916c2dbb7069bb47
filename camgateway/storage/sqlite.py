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
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from camgateway.perf.groupcommit import BatchThread, GroupCommitThread
from camgateway.storage.records import (DAY, CameraRecord, CameraSighting, FileEvent, FileQuery, IHistoryStore,
                                        IOutboxStore, IResumeStore, OutboxEntry, Partial, StoredFile,
                                        history_columns, remove_files, sweep_in_batches)

__all__ = ["SQLiteStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 3
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
    # The history: every file (a camera's, or one a sink made from it: ``parent``) and every camera seen.
    3: """
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    parent TEXT,
    imei TEXT NOT NULL,
    camera TEXT,
    kind TEXT NOT NULL,
    media TEXT,
    source TEXT,
    trigger INTEGER,
    trigger_name TEXT,
    received_at REAL NOT NULL,
    stored_at REAL,
    status TEXT NOT NULL,
    places TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX files_received ON files (received_at);
CREATE INDEX files_imei ON files (imei, received_at) WHERE parent IS NULL;
CREATE INDEX files_camera ON files (camera, received_at) WHERE parent IS NULL;
CREATE INDEX files_kind ON files (kind, received_at) WHERE parent IS NULL;
CREATE INDEX files_parent ON files (parent) WHERE parent IS NOT NULL;
CREATE TABLE cameras (
    imei TEXT PRIMARY KEY,
    camera TEXT,
    first_seen REAL,
    last_seen REAL,
    peer TEXT,
    files_total INTEGER NOT NULL DEFAULT 0,
    last_file_at REAL,
    latitude REAL,
    longitude REAL,
    position_at REAL,
    last_error TEXT,
    last_error_at REAL
);
""",
}


def _effect(cursor: sqlite3.Cursor) -> None:
    """Nothing: a statement run for its effect (its cursor is not read)."""


def _row(row: tuple[Any, ...]) -> Partial:
    return Partial(*row[:3], bytes(row[3]), *row[4:])  # type: ignore[call-arg]


_COLUMNS = ("id, imei, flow, identifier, total, start_crc, meta_timestamp, held, boot_id,"
            " spool_name, first_seen, last_seen")


@implementer(IResumeStore, IOutboxStore, IHistoryStore)
class SQLiteStore:
    """The embedded store (``":memory:"`` is for tests).

    ``batching`` False (``performance.group_commit: false``): one commit per
    statement, on a thread of the store's own (``shared`` is then None).
    """

    #: IOutboxStore.shared
    shared = False

    def __init__(self, path: str | Path, reactor: Any = None, shared: Optional[BatchThread] = None,
                 batching: bool = True) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self.path = str(path)
        self._db: sqlite3.Connection | None = None
        self._thread: GroupCommitThread[Callable[[sqlite3.Connection], Any]] = GroupCommitThread(
            lambda fns: self._in_thread(fns), reactor, "camgateway-resume-store", shared, batching)
        # The keys of every partial (imei, flow, identifier) -> id, once :meth:`all`
        # has read them (the start-up reconcile does), kept up to date by this
        # object's own changes (the only writer of the partials table): a file
        # with no partial, nearly every file, is then found absent with no
        # round trip to the store's thread.
        self._keys: Optional[dict[tuple[str, str, bytes], str]] = None
        self._key_of: dict[str, tuple[str, str, bytes]] = {}
        #: The history's reads: a thread and a connection of their own (:meth:`_read`), made on first use.
        self._readers: Optional[ThreadPool] = None
        self._reader: Optional[sqlite3.Connection] = None

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
        return self._run(lambda db: _effect(db.execute("DELETE FROM partials WHERE id=?", (partial_id,))))

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

        d = self._thread.close().addCallback(shut)
        readers, self._readers = self._readers, None
        if readers is not None:
            d.addCallback(lambda _: deferToThreadPool(self._reactor, readers, self._close_reader))
            d.addBoth(_then_stop, readers)
        return d

    # -- reading the history beside the writes

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> "Deferred[T]":
        """Run the query ``fn`` on a connection and thread of its own, in one read transaction.

        The status API's queries (a page of files and its count, the cameras)
        never wait for, nor hold up, the commits the cameras wait for (WAL:
        readers and the writer do not block each other). ``:memory:`` has
        one connection: there they queue with the writes.
        """
        if self.path == ":memory:":
            return self._run(fn)
        if self._readers is None:
            self._readers = ThreadPool(1, 1, name="camgateway-history-reads")
            self._readers.start()
            first = self._run(lambda db: None)  # the database made or upgraded first
        else:
            first = succeed(None)
        readers = self._readers
        return first.addCallback(lambda _: deferToThreadPool(self._reactor, readers, self._in_reader, fn))

    def _in_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._reader.execute("PRAGMA query_only = 1")
        db = self._reader
        db.execute("BEGIN")
        try:
            return fn(db)
        finally:
            db.execute("COMMIT")

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

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
        # returned are decoded (else a scan for one free slot beside 31
        # deliveries in flight would decode 32 records to keep one).
        skip = sorted(exclude)
        not_in = f" AND id NOT IN ({', '.join('?' * len(skip))})" if skip else ""

        def q(db: sqlite3.Connection) -> list[OutboxEntry]:
            rows = db.execute(f"SELECT {_OUTBOX} FROM outbox WHERE next_attempt <= ?{not_in}"
                              " ORDER BY next_attempt LIMIT ?", (now, *skip, limit))
            return [_entry(row) for row in rows]

        return self._run(q)

    def update(self, entry: OutboxEntry) -> "Deferred[None]":
        return self._run(lambda db: _effect(db.execute(
            "UPDATE outbox SET sink=?, attempts=?, next_attempt=?, last_error=? WHERE id=?",
            (entry.sink, entry.attempts, entry.next_attempt, entry.last_error, entry.id))))

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

    # -- IHistoryStore

    def note_file(self, event: FileEvent) -> "Deferred[None]":
        return self._run(lambda db: _note_file(db, event))

    def files(self, query: FileQuery) -> "Deferred[tuple[list[StoredFile], int]]":
        where, args = ["parent IS NULL"], []
        for column, value in query.filters().items():  # (column names from FileQuery, never from a request)
            where.append(f"{column} = ?")
            args.append(value)
        if query.since is not None:
            where.append("received_at >= ?")
            args.append(query.since)
        if query.until is not None:
            where.append("received_at < ?")
            args.append(query.until)
        condition = " AND ".join(where)

        def q(db: sqlite3.Connection) -> tuple[list[StoredFile], int]:
            (total,) = db.execute(f"SELECT COUNT(*) FROM files WHERE {condition}", args).fetchone()
            rows = db.execute(f"SELECT {_FILES} FROM files WHERE {condition} ORDER BY received_at DESC, id DESC"
                              " LIMIT ? OFFSET ?", (*args, query.limit, query.offset)).fetchall()
            return _with_derived(db, [_stored(row) for row in rows]), total

        return self._read(q)

    def file(self, file_id: str) -> "Deferred[Optional[StoredFile]]":
        def q(db: sqlite3.Connection) -> Optional[StoredFile]:
            row = db.execute(f"SELECT {_FILES} FROM files WHERE id = ?", (file_id,)).fetchone()
            return None if row is None else _with_derived(db, [_stored(row)])[0]

        return self._read(q)

    def note_camera(self, sighting: CameraSighting) -> "Deferred[None]":
        def q(db: sqlite3.Connection) -> None:
            camera = _camera(db, sighting.imei) or CameraRecord(sighting.imei)
            camera.saw(sighting)
            _save_camera(db, camera)

        return self._run(q)

    def cameras(self, now: float) -> "Deferred[list[CameraRecord]]":
        def q(db: sqlite3.Connection) -> list[CameraRecord]:
            recent = dict(db.execute("SELECT imei, COUNT(*) FROM files WHERE parent IS NULL AND received_at >= ?"
                                     " GROUP BY imei", (now - DAY,)))
            out = [CameraRecord(*row) for row in db.execute(f"SELECT {_CAMERAS} FROM cameras")]
            for camera in out:
                camera.files_24h = recent.get(camera.imei, 0)
            return out

        return self._read(q)

    def camera(self, imei: str, now: float) -> "Deferred[Optional[CameraRecord]]":
        def q(db: sqlite3.Connection) -> Optional[CameraRecord]:
            camera = _camera(db, imei)
            if camera is not None:
                (camera.files_24h,) = db.execute("SELECT COUNT(*) FROM files WHERE imei = ? AND parent IS NULL"
                                                 " AND received_at >= ?", (imei, now - DAY)).fetchone()
            return camera

        return self._read(q)

    def sweep_history(self, before: float) -> "Deferred[int]":
        """Forget old files a batch at a time (each its own step on the store's thread)."""
        def q(db: sqlite3.Connection) -> int:
            ids = [i for (i,) in db.execute("SELECT id FROM files WHERE parent IS NULL AND received_at < ?"
                                            " LIMIT ?", (before, _SWEEP_BATCH))]
            marks = ", ".join("?" * len(ids))
            if ids:
                db.execute(f"DELETE FROM files WHERE parent IN ({marks})", ids)
                db.execute(f"DELETE FROM files WHERE id IN ({marks})", ids)
            return len(ids)

        return sweep_in_batches(lambda: self._run(q), _SWEEP_BATCH)


_OUTBOX = "id, spool_name, sink, attempts, next_attempt, last_error, record, created"
_FILES = "id, record, status, places, received_at, stored_at, parent"
_CAMERAS = ("imei, camera, first_seen, last_seen, peer, files_total, last_file_at, latitude, longitude,"
            " position_at, last_error, last_error_at")
#: Files a step of the history sweep forgets at most (a step holds the store's thread).
_SWEEP_BATCH = 2000


def _then_stop(result: Any, pool: ThreadPool) -> Any:
    pool.stop()
    return result


def _stored(row: tuple[Any, ...]) -> StoredFile:
    return StoredFile(row[0], json.loads(row[1]), row[2], json.loads(row[3]), row[4], row[5], row[6])


def _with_derived(db: sqlite3.Connection, files: list[StoredFile]) -> list[StoredFile]:
    """``files`` with the files sinks made from them."""
    by_id = {f.id: f for f in files if f.parent is None}
    if by_id:
        marks = ", ".join("?" * len(by_id))
        for row in db.execute(f"SELECT {_FILES} FROM files WHERE parent IN ({marks}) ORDER BY id", list(by_id)):
            made = _stored(row)
            by_id[made.parent].derived.append(made)  # type: ignore[index]
    return files


def _insert_file(db: sqlite3.Connection, file_id: str, record: Any, parent: Optional[str]) -> None:
    """A file's row (status delivering) unless the history has it (or its parent no more); a camera's file
    counts for its camera."""
    if db.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone() is not None:
        return  # (most events: the record is not encoded again)
    if parent is not None and db.execute("SELECT 1 FROM files WHERE id = ?", (parent,)).fetchone() is None:
        return  # its original is swept
    columns = history_columns(record)
    db.execute(
        "INSERT INTO files (id, parent, imei, camera, kind, media, source, trigger, trigger_name,"
        " received_at, stored_at, status, places, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL,"
        " 'delivering', '[]', ?)",
        (file_id, parent, str(columns["imei"]), columns["camera"], columns["kind"], columns["media"],
         columns["source"], columns["trigger"], columns["trigger_name"], float(record.get("received_at") or 0.0),
         json.dumps(record)))
    if parent is None:
        camera = _camera(db, str(columns["imei"])) or CameraRecord(str(columns["imei"]))
        camera.count_file(record)
        _save_camera(db, camera)


def _apply(db: sqlite3.Connection, file_id: str, event: FileEvent, own: bool) -> None:
    row = db.execute("SELECT status, stored_at, places FROM files WHERE id = ?", (file_id,)).fetchone()
    if row is None:
        return
    before = (row[0], row[1], json.loads(row[2]))
    after = event.applied(*before, own)
    if after != before:
        db.execute("UPDATE files SET status = ?, stored_at = ?, places = ? WHERE id = ?",
                   (after[0], after[1], json.dumps(after[2]), file_id))


def _note_file(db: sqlite3.Connection, event: FileEvent) -> None:
    _insert_file(db, event.file_id, event.record, event.parent)
    _apply(db, event.file_id, event, True)
    if event.parent is not None and event.status is not None:
        _apply(db, event.parent, event, False)
    for made_id, record in event.made:
        _insert_file(db, made_id, record, event.root)


def _camera(db: sqlite3.Connection, imei: str) -> Optional[CameraRecord]:
    row = db.execute(f"SELECT {_CAMERAS} FROM cameras WHERE imei = ?", (imei,)).fetchone()
    return None if row is None else CameraRecord(*row)


def _save_camera(db: sqlite3.Connection, camera: CameraRecord) -> None:
    fields = camera.stored_fields()
    db.execute(f"INSERT OR REPLACE INTO cameras ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
               tuple(fields.values()))


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
    return OutboxEntry(*row[:6], json.loads(row[6]), row[7])  # type: ignore[call-arg]
