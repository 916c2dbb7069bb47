"""Finished files the store could not record yet: a durable note each, handed to the outbox later.

When a file is complete and flushed in the spool but the store (SQLite or
Redis) cannot record its outbox entry (it is down, or its disk is full), the
file is not dropped: its entry is written as a note, one JSON file under
``<spool>/finished/<instance>/<entry id>.json`` (written to a temporary
name, fsynced, renamed, the folder fsynced). Only once the note is durable is
the camera told the file is done. The notes are replayed into the store
every few seconds while any wait, and at start-up before the spool is
reconciled: each is enqueued with the entry id it was given (enqueuing is an
upsert, so a replay after an answer that was lost records nothing twice),
then removed. A note whose spool file is gone was delivered already and is
removed too.

Each instance replays its own notes (the folder is named for the instance),
so instances sharing a spool never replay one note twice at the same time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer, task
from twisted.logger import Logger

from camgateway.base.deferreds import after
from camgateway.perf.durability import fsync_dir
from camgateway.base.health import SPOOL, STORE
from camgateway.storage.records import OutboxEntry
from camgateway.base.reasons import reason

if TYPE_CHECKING:
    from camgateway.runtime.context import Services

__all__ = ["FinishJournal", "Note", "REPLAY_EVERY"]

log = Logger(namespace="camgateway.transfer.journal")

#: Seconds between two replays while notes wait for the store.
REPLAY_EVERY = 5.0


@dataclasses.dataclass
class Note:
    """A finished file waiting for the store: its outbox entry and the partial it forgets."""

    entry: OutboxEntry
    partial_id: Optional[str]
    reason: str

    def to_json(self) -> bytes:
        """The note's file content."""
        return json.dumps({"entry": dataclasses.asdict(self.entry), "partial_id": self.partial_id,
                           "reason": self.reason}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Note":
        """The inverse of :meth:`to_json`."""
        doc = json.loads(data)
        return cls(OutboxEntry(**doc["entry"]), doc.get("partial_id"), doc.get("reason") or "")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "local"


def _write_note(folder: Path, note: Note) -> None:
    """Write ``note`` durably (runs in a thread)."""
    made = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    target = folder / f"{note.entry.id}.json"
    temp = folder / f".{note.entry.id}.json.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(note.to_json())
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    os.close(fd)
    os.rename(temp, target)
    fsync_dir(folder)
    if made:
        fsync_dir(folder.parent)
        fsync_dir(folder.parent.parent)


def _read_notes(folder: Path) -> list[tuple[Path, Optional[Note], str]]:
    """Every note in ``folder``: ``(path, note or None, error)`` (runs in a thread)."""
    found: list[tuple[Path, Optional[Note], str]] = []
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    except FileNotFoundError:
        return found
    for path in paths:
        try:
            found.append((path, Note.from_json(path.read_bytes()), ""))
        except (OSError, ValueError, TypeError, KeyError) as e:
            found.append((path, None, str(e)))
    return found


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class FinishJournal:
    """The notes of one instance, and the loop that hands them to the store."""

    def __init__(self, services: "Services", every: float = REPLAY_EVERY) -> None:
        self.s = services
        self.folder = services.spool.root / "finished" / _safe(services.instance)
        self.every = every
        #: The notes waiting, by entry id.
        self.notes: dict[str, Note] = {}
        self._loop: Optional[task.LoopingCall] = None
        self._replaying: Optional[defer.Deferred] = None

    @property
    def spool_names(self) -> set[str]:
        """The spool files the notes hold (neither orphans nor anybody's partial)."""
        return {note.entry.spool_name for note in self.notes.values()}

    def holds(self, spool_name: str) -> bool:
        """Whether a note holds spool file ``spool_name``."""
        return spool_name in self.spool_names

    def write(self, entry: OutboxEntry, partial_id: Optional[str], why: str) -> defer.Deferred:
        """Write a note for ``entry`` (the store said ``why``); fires once it is durable.

        On failure nothing is held: the caller must not tell the camera the file is done.
        """
        note = Note(entry, partial_id, why)
        d = self.s.run_in_thread(_write_note, self.folder, note)

        def written(_: object) -> None:
            self.notes[entry.id] = note
            self.s.health.working(SPOOL)
            self.s.health.failing(STORE, self._waiting(why))

        def failed(failure: Any) -> Any:
            self.s.health.failing(SPOOL, f"cannot write to the spool: {failure.getErrorMessage()}")
            return failure

        d.addCallbacks(written, failed)
        return d

    def _waiting(self, why: str) -> str:
        n = len(self.notes)
        return (f"cannot record finished files ({why}); {n} complete file{'s' if n != 1 else ''}"
                f" kept in the spool until it can")

    @defer.inlineCallbacks
    def load(self) -> Any:
        """Read the notes left by an earlier run (start-up, before the reconcile)."""
        found = yield self.s.run_in_thread(_read_notes, self.folder)
        for path, note, error in found:
            if note is None:
                log.error("finish note {path} cannot be read ({error}); left in place for an operator",
                          path=path, error=error)
                continue
            self.notes[note.entry.id] = note
        if self.notes:
            log.warn("{n} finished files wait in the spool for the store to record them; handing them over",
                     n=len(self.notes))
        return len(self.notes)

    def start(self) -> None:
        """Replay now and every :attr:`every` seconds (each round guarded: the loop never stops)."""
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.s.clock
        self._loop.start(self.every, now=True)

    def stop(self) -> defer.Deferred:
        """Stop the loop; fires when a replay in flight is over."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return after(self._replaying)

    def _tick(self) -> None:
        if self._replaying is not None:
            return
        if self.notes:
            d = self.replay()
        elif self.s.health.problem(STORE) is not None:
            d = self._probe()
        else:
            return
        self._replaying = d

        def over(_: object) -> None:
            self._replaying = None

        d.addErrback(lambda f: log.failure("replaying finish notes failed", f))
        d.addBoth(over)

    @defer.inlineCallbacks
    def _probe(self) -> Any:
        """With no note waiting, ask the store something cheap: an answer clears its problem."""
        try:
            yield self.s.store.find("", "", b"")
        except Exception:
            return
        self.s.health.working(STORE)

    @defer.inlineCallbacks
    def replay(self) -> Any:
        """Hand every note to the store, oldest first; stop at the first the store refuses."""
        s = self.s
        handed = 0
        for entry_id, note in sorted(self.notes.items(), key=lambda item: item[1].entry.created):
            path = self.folder / f"{entry_id}.json"
            present = yield s.run_in_thread(os.path.exists, s.spool.path(note.entry.spool_name))
            if not present:  # delivered and removed before the answer was lost
                log.info("finish note {id}: its spool file is gone (delivered already); note removed",
                         id=entry_id)
            else:
                try:
                    yield s.store.enqueue(note.entry, note.partial_id)
                except Exception as e:
                    s.health.failing(STORE, self._waiting(reason(e)))
                    log.warn("the store still cannot record finished files ({error}); {n} wait in the spool,"
                             " next try in {t:g} s", error=reason(e), n=len(self.notes),
                             t=self.every)
                    return handed
                handed += 1
                record = note.entry.record
                log.info("finished file handed to the outbox after the store came back: camera {imei} {source}"
                         " {size} bytes sha256 {sha256}", imei=record.get("imei"), source=record.get("source"),
                         size=record.get("size"), sha256=record.get("sha256"), event="file_recorded_late")
            yield s.run_in_thread(_remove, path)
            self.notes.pop(entry_id, None)
        s.health.working(STORE)
        if handed and s.outbox is not None:
            s.outbox.kick()
        return handed

