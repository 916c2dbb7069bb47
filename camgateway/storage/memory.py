"""A store that forgets everything on restart: for tests and throw-away runs.

Every Deferred it returns has already fired, which makes sessions fully
synchronous under ``StringTransport`` and ``task.Clock``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from camgateway.storage.records import (DAY, CameraRecord, CameraSighting, FileEvent, FileQuery, IHistoryStore,
                                        IOutboxStore, IResumeStore, OutboxEntry, Partial, StoredFile, remove_files)

__all__ = ["MemoryStore"]


@implementer(IResumeStore, IOutboxStore, IHistoryStore)
class MemoryStore:
    """IResumeStore, IOutboxStore and IHistoryStore in dicts."""

    #: IOutboxStore.shared
    shared = False

    def __init__(self) -> None:
        self.partials: dict[str, Partial] = {}
        self.outbox: dict[str, OutboxEntry] = {}
        self.history: dict[str, StoredFile] = {}
        self.camera_records: dict[str, CameraRecord] = {}

    def find(self, imei: str, flow: str, identifier: bytes) -> "Deferred[Optional[Partial]]":
        for p in self.partials.values():
            if p.key == (imei, flow, identifier):
                return succeed(dataclasses.replace(p))
        return succeed(None)

    def add(self, partial: Partial) -> "Deferred[None]":
        for other in list(self.partials.values()):
            if other.key == partial.key:
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

    def enqueue(self, entry: OutboxEntry, partial_id: Optional[str]) -> "Deferred[None]":
        self.outbox[entry.id] = dataclasses.replace(entry)
        if partial_id is not None:
            self.partials.pop(partial_id, None)
        return succeed(None)

    def due(self, now: float, limit: int, exclude: frozenset) -> "Deferred[list[OutboxEntry]]":
        ready = sorted((e for e in self.outbox.values() if e.next_attempt <= now and e.id not in exclude),
                       key=lambda e: e.next_attempt)
        return succeed([dataclasses.replace(e) for e in ready[:limit]])

    def update(self, entry: OutboxEntry) -> "Deferred[None]":
        if entry.id in self.outbox:
            self.outbox[entry.id] = dataclasses.replace(entry)
        return succeed(None)

    def replace(self, entry_id: str, entries: list[OutboxEntry],
                remove: Sequence[str] = ()) -> "Deferred[list[tuple[str, str]]]":
        self.outbox.pop(entry_id, None)
        for entry in entries:
            self.outbox[entry.id] = dataclasses.replace(entry)
        return succeed(remove_files(remove))

    def pending(self) -> "Deferred[list[OutboxEntry]]":
        return succeed(sorted((dataclasses.replace(e) for e in self.outbox.values()), key=lambda e: e.created))

    # -- IHistoryStore

    def note_file(self, event: FileEvent) -> "Deferred[None]":
        self._insert(event.file_id, event.record, event.parent)
        self._apply(event.file_id, event, True)
        if event.parent is not None and event.status is not None:
            self._apply(event.parent, event, False)
        for made_id, record in event.made:
            self._insert(made_id, record, event.root)
        return succeed(None)

    def _insert(self, file_id: str, record: Any, parent: Optional[str]) -> None:
        """A file's row unless the history has it (or its parent no more); a camera's file counts for its camera."""
        if file_id in self.history or (parent is not None and parent not in self.history):
            return
        self.history[file_id] = StoredFile(file_id, dict(record), "delivering", [],
                                           float(record.get("received_at") or 0.0), parent=parent)
        if parent is None:
            imei = str(record.get("imei"))
            self.camera_records.setdefault(imei, CameraRecord(imei)).count_file(record)

    def _apply(self, file_id: str, event: FileEvent, own: bool) -> None:
        row = self.history.get(file_id)
        if row is not None:
            row.status, row.stored_at, row.places = event.applied(row.status, row.stored_at, row.places, own)

    def _with_derived(self, row: StoredFile) -> StoredFile:
        out = dataclasses.replace(row, places=list(row.places))
        out.derived = sorted((dataclasses.replace(f, places=list(f.places)) for f in self.history.values()
                              if f.parent == row.id), key=lambda f: f.id)
        return out

    def files(self, query: FileQuery) -> "Deferred[tuple[list[StoredFile], int]]":
        found = sorted((f for f in self.history.values() if f.parent is None and query.matches(f)),
                       key=lambda f: (f.received_at, f.id), reverse=True)
        page = found[query.offset:query.offset + query.limit]
        return succeed(([self._with_derived(f) for f in page], len(found)))

    def file(self, file_id: str) -> "Deferred[Optional[StoredFile]]":
        row = self.history.get(file_id)
        return succeed(None if row is None else self._with_derived(row))

    def note_camera(self, sighting: CameraSighting) -> "Deferred[None]":
        self.camera_records.setdefault(sighting.imei, CameraRecord(sighting.imei)).saw(sighting)
        return succeed(None)

    def _camera(self, record: CameraRecord, now: float) -> CameraRecord:
        out = dataclasses.replace(record)
        out.files_24h = sum(1 for f in self.history.values()
                            if f.parent is None and f.record.get("imei") == record.imei and f.received_at >= now - DAY)
        return out

    def cameras(self, now: float) -> "Deferred[list[CameraRecord]]":
        return succeed([self._camera(c, now) for c in self.camera_records.values()])

    def camera(self, imei: str, now: float) -> "Deferred[Optional[CameraRecord]]":
        record = self.camera_records.get(imei)
        return succeed(None if record is None else self._camera(record, now))

    def sweep_history(self, before: float) -> "Deferred[int]":
        old = {f.id for f in self.history.values() if f.parent is None and f.received_at < before}
        for file_id in [f.id for f in self.history.values() if f.id in old or f.parent in old]:
            del self.history[file_id]
        return succeed(len(old))
