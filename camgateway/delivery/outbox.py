"""The durable outbox: every finished file reaches every sink, exactly as recorded.

When a file is complete and fsynced, one *entry* is recorded (in the same
transaction that forgets its partial) before the camera is told the file is
done. The entry names the spool file, the file's record and the next sink of
the chain to deliver to. The sinks form a chain: a sink either passes the file
on unchanged, or returns :class:`~camgateway.delivery.sinks.Transformed` files (an MP4
and its poster instead of the camera's video) that the following sinks get
instead. An entry moves along the chain one sink at a time and is removed,
with its spool file, after the last one; a crash or restart resumes it at the
sink it had reached, so nothing is lost and nothing half-made is delivered.

A delivery is recorded only after the sink confirmed it, so a crash, or a
store that cannot record (a full disk), between the two repeats it. The
entry's id is the file's :attr:`~camgateway.delivery.sinks.ReceivedFile.id`, the same
on every attempt and along the whole chain (files a sink makes get ids
derived from it, see :func:`derived_id`): sinks recognise a repeat by it.

With a store shared by several instances, an instance is given only the
entries whose spool file it has: the others are left to the instance that
has them, with no failed attempt (camgateway.storage.redis). An entry whose
file no running instance has becomes a dead letter of its record alone.

A failed delivery is retried with exponential backoff and jitter. A permanent
failure (:class:`~camgateway.delivery.sinks.PermanentFailure`, e.g. an HTTP 400), or a
transient one that lasts longer than ``outbox.give_up_after``, goes to the
dead-letter folder with its reason (``camgateway dead-letters`` lists and
retries them) and the file goes on to the next sink. A retried dead letter
goes to the sink that refused it, and only there: the file itself went on
along the chain when it was refused (its record carries :data:`RETRY`). Only
what that sink makes of it (an MP4 and its poster) goes on to the sinks after
it, which have not had those yet.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import random
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer, task
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from camgateway.base.ids import new_id
from camgateway.base.units import iso
from camgateway.base.reasons import is_bug, reason as reason_of
from camgateway.base.reasons import PermanentFailure
from camgateway.delivery.sinks import Transformed
from camgateway.storage.records import (FileEvent, IHistoryStore, IOutboxStore, OutboxEntry, ReceivedFile, file_name,
                                        remove_files)

if TYPE_CHECKING:
    from camgateway.runtime.context import Services

__all__ = ["OutboxEntry", "IOutboxStore", "Outbox", "backoff", "derived_id", "write_dead_letter", "remove_files",
           "RETRY", "ORIGIN", "history_row"]

log = Logger(namespace="camgateway.delivery.outbox")

#: Files an Outbox keeps in memory for its next free slots (see ``Outbox._ready``).
READY_MAX = 1024

#: The key of a retried dead letter's record (the refusing sink's index and
#: name): the entry ends at that sink instead of going on along the chain.
RETRY = "retry"

#: The key of a record that names the sinks that refused the file on its way
#: (dead letters): the last sink's log line says the file was not delivered everywhere.
REFUSED = "refused"

#: The key of the record of a file a sink made: the id of the camera's file it
#: was made from, under which the history lists it (camgateway.storage.records.FileEvent).
ORIGIN = "origin"

#: How the outbox's log lines name a file (the fields of :func:`_about`).
_FILE = "camera {imei} {file} (id {file_id}, sha256 {sha256:.12})"


def _about(entry: "OutboxEntry") -> dict[str, Any]:
    """The log fields that name ``entry``'s file: camera, the camera's name for it, source, id, sha256, size."""
    record = entry.record
    name = file_name(record)
    return {"imei": record.get("imei"), "file": name, "source": record.get("source"), "file_id": entry.id,
            "sha256": str(record.get("sha256") or ""), "size": record.get("size")}


def history_row(entry: "OutboxEntry") -> tuple[str, Optional[str]]:
    """The history's row for ``entry``'s file and its parent: the camera's file passed on by a sink
    (``derived: original``) is its original's row; an MP4 or poster a sink made has its own, under it."""
    origin = entry.record.get(ORIGIN)
    if origin is None:
        return entry.record.get("id") or entry.id, None  # (a retried dead letter's entry has an id of its own)
    if entry.record.get("derived") == "original":
        return origin, None
    return entry.record.get("id") or entry.id, origin


def backoff(attempts: int, rng: random.Random, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds before the next try: exponential, capped, with ±50 % jitter."""
    return min(cap, base * 2 ** max(0, attempts - 1)) * rng.uniform(0.5, 1.5)


def derived_id(parent: str, index: int) -> str:
    """The id of the ``index``-th file a sink made from entry ``parent`` (32 hex digits).

    The same on every run of that sink: when a crash repeats a transforming
    step, the files it makes again keep the ids the first run's had, so the
    sinks after it see a repeat (same id), not a new file.
    """
    return hashlib.blake2b(f"{parent}/{index}".encode(), digest_size=16).hexdigest()


def write_dead_letter(dead_dir: str, entry: OutboxEntry, source_path: Optional[str], sink_name: str, reason: str,
                      when: float) -> str:
    """Keep a file a sink refused, with its record and the reason (runs in a thread).

    One folder per entry and sink (``<entry id>-<sink index>``): a file two
    sinks refused is two dead letters. ``dead-letter.json`` names the sink by
    index and name, says when (ISO 8601 UTC) and after how many attempts.
    """
    folder = os.path.join(dead_dir, f"{entry.id}-{entry.sink}")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "file")
    if source_path is not None and not os.path.exists(target):  # None: the file is lost, only its record is kept
        os.link(source_path, target)
    kept = dataclasses.asdict(entry)
    kept["next_attempt"], kept["created"] = iso(entry.next_attempt), iso(entry.created)
    info = {"sink": entry.sink, "sink_name": sink_name, "reason": reason, "time": iso(when),
            "attempts": entry.attempts + 1, "entry": kept}
    tmp = os.path.join(folder, "dead-letter.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(folder, "dead-letter.json"))
    return folder


class Outbox:
    """Delivers outbox entries along the sink chain, a bounded number at a time."""

    def __init__(self, services: "Services", concurrency: int = 8, poll: float = 5.0,
                 give_up_after: float = 7 * 86400.0, rng: Optional[random.Random] = None) -> None:
        self.s = services
        self.concurrency = concurrency
        self.poll = poll
        self.give_up_after = give_up_after
        self.rng = rng or random.Random()
        self.in_flight: dict[str, defer.Deferred] = {}
        self.delivered = 0
        self.failures = 0
        self.dead_letters = 0
        self._scanning = False
        self._again = False
        #: Entries may be due that no delivery has taken (no room when they came,
        #: or the last scan filled every slot): a finished delivery scans again.
        self._backlog = True
        self._loop: Optional[task.LoopingCall] = None
        self._idle_waiters: list[defer.Deferred] = []
        self._stopped = False
        #: Files recorded while every slot was taken, oldest first, with the
        #: ReceivedFile they were made from: a freed slot takes the next one from
        #: here, with no query to the store and no record decoded again (at
        #: hundreds of files a second, two files in three came back through a
        #: scan). Only with a store of this instance's own, and at most
        #: :data:`READY_MAX`; beyond that a file waits in the store for a scan.
        self._ready: "collections.OrderedDict[str, tuple[OutboxEntry, ReceivedFile]]" = collections.OrderedDict()
        #: The store's entries whose spool file no instance has, by id, with the
        #: reason (camgateway.storage.redis), or None: dead letters, not deliveries.
        self._unreadable: Optional[dict[str, str]] = getattr(services.store, "unreadable", None)

    # -- running

    def start(self) -> None:
        """Deliver what is due now and every ``poll`` seconds."""
        self._stopped = False
        self._loop = task.LoopingCall(self.kick)
        self._loop.clock = self.s.clock
        self._loop.start(self.poll, now=True)

    def stop(self) -> defer.Deferred:
        """Stop polling and starting deliveries; fires when those in flight are over.

        Files recorded meanwhile, or kept for a free slot, stay in the store
        for the next start.
        """
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return defer.DeferredList(list(self.in_flight.values()), consumeErrors=True)

    def add(self, received: ReceivedFile, partial_id: Optional[str]) -> defer.Deferred:
        """Record a finished file (its partial forgotten in the same step) and deliver it.

        The entry's id is ``received.id`` if it has one, else a new one; the
        file recorded and delivered carries it (:attr:`ReceivedFile.id`).
        """
        now = self.s.clock.seconds()
        if not received.id:
            received = dataclasses.replace(received, id=new_id())
        entry = OutboxEntry(received.id, received.path.name, 0, 0, now, None, received.to_record(), now)
        d = self.s.store.enqueue(entry, partial_id)
        self._note(entry)
        d.addCallback(lambda _: self._start_new(entry, received))
        return d

    def _note(self, entry: OutboxEntry, place: Any = None, status: Optional[str] = None,
              made: tuple[tuple[str, dict[str, Any]], ...] = (), retried: bool = False) -> None:
        """Tell the store's history what happened to ``entry``'s file (a failure there is logged, never the delivery's)."""
        store = self.s.store
        if not IHistoryStore.providedBy(store):
            return
        file_id, parent = history_row(entry)
        where = str(place) if isinstance(place, (str, os.PathLike)) else None
        event = FileEvent(file_id, entry.record, self.s.clock.seconds(), parent, where, status, retried, made)
        d = defer.maybeDeferred(store.note_file, event)
        d.addErrback(lambda f: log.warn("could not record " + _FILE + " in the history: {why}", why=f.getErrorMessage(),
                                        **_about(entry)))

    def _start_new(self, entry: OutboxEntry, received: ReceivedFile) -> None:
        """Deliver a file just recorded at once if there is room, else keep it for the next free slot.

        Either way with no scan and no record read again. Only with a store
        of this instance's own: a shared store hands entries out by claims,
        which only a scan (``due``) takes.
        """
        if entry.id in self.in_flight or entry.id in self._ready or self._stopped:
            return
        if not self.s.own_store or (len(self.in_flight) >= self.concurrency and len(self._ready) >= READY_MAX):
            self._backlog = True
            self.kick()  # a scan takes it when there is room
        elif len(self.in_flight) >= self.concurrency:
            self._ready[entry.id] = (entry, received)
        else:
            self._track(entry, self._deliver(entry, received))

    def _take_ready(self) -> None:
        """Fill the free slots with the files kept for them, oldest first."""
        ready = self._ready
        while ready and len(self.in_flight) < self.concurrency and not self._stopped:
            _, (entry, received) = ready.popitem(last=False)
            self._track(entry, self._deliver(entry, received))

    def kick(self) -> None:
        """Look for due entries now (coalesced: one scan at a time)."""
        if self._scanning:
            self._again = True
            return
        self._scanning = True
        d = self._scan()
        d.addErrback(lambda f: log.failure("outbox scan failed", f))
        d.addBoth(self._scanned)

    def _scanned(self, _: object) -> None:
        self._scanning = False
        if self._again:
            self._again = False
            self.kick()
        elif not self.in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    @defer.inlineCallbacks
    def _scan(self) -> Any:
        self._take_ready()
        free = self.concurrency - len(self.in_flight)
        if free <= 0 or self._stopped:
            return
        self._backlog = False
        entries = yield self.s.store.due(self.s.clock.seconds(), free, frozenset(self.in_flight))
        if len(entries) >= free:
            self._backlog = True
        for entry in entries:
            if (entry.id not in self.in_flight and entry.id not in self._ready
                    and len(self.in_flight) < self.concurrency and not self._stopped):
                self._track(entry, self._deliver(entry))

    def _track(self, entry: OutboxEntry, d: defer.Deferred) -> None:
        self.in_flight[entry.id] = d
        d.addErrback(lambda f: log.failure("outbox delivery crashed", f))
        d.addBoth(self._finished, entry.id)

    def _finished(self, _: object, entry_id: str) -> None:
        del self.in_flight[entry_id]
        self._take_ready()
        if self._backlog or self._idle_waiters:
            self.kick()

    def idle(self) -> defer.Deferred:
        """Fires once nothing is in flight and nothing is due (for tests and benchmarks)."""
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        self.kick()
        return d

    # -- one delivery

    @defer.inlineCallbacks
    def _deliver(self, entry: OutboxEntry, received: Optional[ReceivedFile] = None) -> Any:
        s = self.s
        sink = s.sinks[entry.sink]
        if received is None:
            if self._unreadable and entry.id in self._unreadable:
                yield self._lost(entry, sink, self._unreadable.pop(entry.id))
                return
            received = ReceivedFile.from_record(entry.record, s.spool.path(entry.spool_name))
            if not received.id:  # recorded before files carried their entry's id
                received = dataclasses.replace(received, id=entry.id)
        try:
            result = yield defer.maybeDeferred(sink.deliver, received)
        except Exception:
            yield self._failed(entry, sink, Failure(), received)
            return
        self.delivered += 1
        s.stats.sink_deliveries[sink.name] += 1
        if isinstance(result, Transformed):
            made = []
            own, parent = history_row(entry)
            for index, f in enumerate(result.files):
                made_id = derived_id(entry.id, index)
                record = f.to_record()
                record["id"] = made_id
                record[ORIGIN] = parent or own  # (the history lists it under the camera's file)
                if REFUSED in entry.record:  # refused on its way here: so are the files made from it
                    record[REFUSED] = entry.record[REFUSED]
                made.append(dataclasses.replace(entry, id=made_id, spool_name=f.path.name, record=record,
                                                attempts=0, last_error=None))
            self._note(entry, made=tuple((m.id, m.record) for m in made if m.record.get("derived") != "original"))
            yield self._advance(entry, made)
        elif RETRY in entry.record:  # a retried dead letter went on when it was refused: it ends here
            self._note(entry, result, "stored", retried=True)
            yield self._advance(entry, [])
            log.info("retried dead letter delivered to {sink}: " + _FILE + " {size} bytes",
                     sink=sink.name, event="dead_letter_delivered", **_about(entry))
        else:
            if entry.sink + 1 >= len(s.sinks):
                self._note(entry, result, "dead-letter" if entry.record.get(REFUSED) else "stored")
            elif isinstance(result, (str, os.PathLike)):
                self._note(entry, result)
            yield self._advance(entry, [entry])

    @defer.inlineCallbacks
    def _advance(self, entry: OutboxEntry, carried: list[OutboxEntry]) -> Any:
        """``entry`` is done at its sink: ``carried`` go on to the next one."""
        s = self.s
        nxt = entry.sink + 1
        following = [] if nxt >= len(s.sinks) else [
            dataclasses.replace(e, sink=nxt, attempts=0, next_attempt=s.clock.seconds(), last_error=None)
            for e in carried]
        keep = {e.spool_name for e in following}
        done = sorted(({entry.spool_name} | {e.spool_name for e in carried}) - keep)
        left = yield s.store.replace(entry.id, following, [str(s.spool.path(name)) for name in done])
        if following:
            self._backlog = True  # the next sink's entries: the next scan takes them
        for path, error in left:
            log.warn("could not remove delivered spool file {path}: {error} (removed at the next start)",
                     path=path, error=error)
        if not following and (carried or RETRY not in entry.record):
            last = carried[0] if carried else entry
            refused = last.record.get(REFUSED) or []
            if refused:
                log.warn("file delivered to {delivered} of {sinks} sinks; refused by {refused_by}: " + _FILE,
                         delivered=len(s.sinks) - len(set(refused)), sinks=len(s.sinks), refused=refused,
                         refused_by=", ".join(refused), event="file_partly_delivered", **_about(last))
            else:
                log.info("file delivered to every sink: " + _FILE + " {size} bytes", sinks=len(s.sinks),
                         event="file_delivered", **_about(last))

    @defer.inlineCallbacks
    def _lost(self, entry: OutboxEntry, sink: Any, reason: str) -> Any:
        """No instance has the entry's spool file: keep its record as a dead letter, drop the entry."""
        s = self.s
        self.dead_letters += 1
        folder = yield s.run_in_thread(write_dead_letter, str(s.spool.dead), entry, None, sink.name, reason,
                                       s.clock.seconds())
        record = entry.record
        log.error(_FILE + " cannot be delivered to {sink}: {reason}; its record is kept in {folder}",
                  sink=sink.name, reason=reason, folder=folder, event="delivery_lost", **_about(entry))
        s.failed(record.get("imei", ""), record.get("peer", ""), f"delivery to {sink.name}", reason)
        self._note(entry, status="dead-letter")
        yield s.store.replace(entry.id, [])

    @defer.inlineCallbacks
    def _failed(self, entry: OutboxEntry, sink: Any, failure: Failure, received: ReceivedFile) -> Any:
        s = self.s
        self.failures += 1
        s.stats.sink_failures[sink.name] += 1
        s.stats.delivery_failures += 1
        reason = reason_of(failure)
        now = s.clock.seconds()
        s.stats.sink_failed(sink.name, reason, now)  # /healthz: a sink failing for long (outbox.degraded_after)
        permanent = failure.check(PermanentFailure) is not None
        if permanent or now - entry.created > self.give_up_after:
            self.dead_letters += 1
            why = reason if permanent else f"still failing after {self.give_up_after:.0f} s: {reason}"
            folder = yield s.run_in_thread(write_dead_letter, str(s.spool.dead), entry,
                                           str(received.path), sink.name, why, now)
            log.error("{sink} refused " + _FILE + ": {reason}; kept in {folder}", sink=sink.name, reason=why,
                      folder=folder, event="delivery_refused", **_about(entry))
            s.failed(received.imei, received.peer, f"delivery to {sink.name}", why)
            self._note(entry, status="dead-letter")
            onward = dataclasses.replace(entry, record={**entry.record, REFUSED: [*entry.record.get(REFUSED, ()),
                                                                                  sink.name]})
            yield self._advance(entry, [] if RETRY in entry.record else [onward])
            return
        entry.attempts += 1
        entry.last_error = reason
        entry.next_attempt = now + backoff(entry.attempts, self.rng)
        fields = dict(_about(entry), sink=sink.name, attempt=entry.attempts, retry_in=entry.next_attempt - now,
                      reason=reason)
        text = "delivery to {sink} failed (attempt {attempt}), retrying in {retry_in:.1f} s: {reason}; " + _FILE
        if is_bug(failure):  # a mistake in the sink's code, not the world outside: its traceback helps
            log.failure(text, failure, LogLevel.error, event="delivery_error", **fields)
        else:
            log.warn(text, event="delivery_failed", **fields)
        yield s.store.update(entry)
