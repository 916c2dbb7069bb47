"""A store that forgets everything on restart: for tests and throw-away runs.

Every Deferred it returns has already fired, which makes sessions fully
synchronous under ``StringTransport`` and ``task.Clock``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from camgateway.storage.records import IOutboxStore, IResumeStore, OutboxEntry, Partial, remove_files

__all__ = ["MemoryStore"]


@implementer(IResumeStore, IOutboxStore)
class MemoryStore:
    """IResumeStore and IOutboxStore in dicts."""

    #: IOutboxStore.shared
    shared = False

    def __init__(self) -> None:
        self.partials: dict[str, Partial] = {}
        self.outbox: dict[str, OutboxEntry] = {}

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
