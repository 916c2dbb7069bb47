"""The shared things every camera session uses, handed down by the factory."""

from __future__ import annotations

import bisect
import collections
import dataclasses
import os
import threading
from typing import Any, Callable, Deque, Iterator, Optional

from twisted.internet.defer import Deferred

from camgateway.runtime.config import Config
from camgateway.perf.due import DueSessions, NoDueSessions
from camgateway.base.health import Health
from camgateway.perf.sockets import PlainWriter, TurnWriter, plain_write, write_now
from camgateway.transfer.spool import Spool
from camgateway.web.progress import DURATION_BOUNDS

__all__ = ["FileHeads", "RefusedCameras", "Services", "Stats", "SinkFailing", "DURATION_BOUNDS", "NOT_IN_SUMMARY"]

#: The metadata of the :class:`Stats` fields that ``/api/summary`` leaves out (not plain counters).
NOT_IN_SUMMARY = {"summary": False}


@dataclasses.dataclass
class SinkFailing:
    """A sink whose every delivery attempt has failed since :attr:`since`."""

    since: float
    #: The latest failure: when, and why.
    last: float
    reason: str
    #: The sink's count of deliveries when the failures began: any delivery since ends them.
    deliveries: int


@dataclasses.dataclass
class Stats:
    """Counters for logs and metrics (incremented per event, never per frame)."""

    connections: int = 0
    connections_refused: int = 0
    files_received: int = 0
    bytes_received: int = 0
    crc_errors: int = 0
    resumes: int = 0
    protocol_errors: int = 0
    delivery_failures: int = 0
    #: Protocol errors by ProtocolError.kind.
    protocol_errors_by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    #: Deliveries and failed delivery attempts, by sink name.
    sink_deliveries: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    sink_failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    #: Files stored, by transfer duration (START to stored): bucket ``i`` counts those of at most
    #: ``DURATION_BOUNDS[i]`` seconds not counted in an earlier one, the last bucket the longer ones.
    durations: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(DURATION_BOUNDS) + 1),
                                             metadata=NOT_IN_SUMMARY)
    #: The seconds of every transfer in :attr:`durations`, added up.
    durations_sum: float = dataclasses.field(default=0.0, metadata=NOT_IN_SUMMARY)
    #: When the latest file was stored (the clock's seconds), None before the first.
    last_file_at: Optional[float] = dataclasses.field(default=None, metadata=NOT_IN_SUMMARY)
    #: The sinks failing since their last delivery, by name (see :meth:`sink_failing`).
    failing_sinks: dict[str, SinkFailing] = dataclasses.field(default_factory=dict, metadata=NOT_IN_SUMMARY)

    def file_stored(self, seconds: float, at: float) -> None:
        """A file was stored ``seconds`` after its START, at time ``at``."""
        self.durations[bisect.bisect_left(DURATION_BOUNDS, seconds)] += 1
        self.durations_sum += seconds
        self.last_file_at = at

    def sink_failed(self, name: str, reason: str, at: float) -> None:
        """An attempt to deliver to sink ``name`` failed at time ``at``, for ``reason``."""
        failing = self.sink_failing(name)
        if failing is None:
            self.failing_sinks[name] = SinkFailing(at, at, reason, self.sink_deliveries[name])
        else:
            failing.last, failing.reason = at, reason

    def sink_failing(self, name: str) -> Optional[SinkFailing]:
        """How sink ``name`` fails, if no delivery to it worked since its latest failure; else None."""
        failing = self.failing_sinks.get(name)
        if failing is not None and failing.deliveries != self.sink_deliveries[name]:
            del self.failing_sinks[name]  # a delivery worked since
            return None
        return failing


#: How many recent failures are kept for the status service.
RECENT = 200


class FileHeads:
    """The first bytes of files just finished, by spool path, until a disk sink takes them.

    A photo's extension comes from its first bytes (camgateway.delivery.sinks.disk);
    the writes saw them, so the sink need not open and read the file again:
    three system calls less on its thread, each a GIL hand-off. Filled on the
    reactor thread, taken on the sink's (a lock keeps the two apart); the
    oldest are forgotten beyond ``maxlen`` (files no disk sink takes), and a
    file without an entry (delivered after a restart, or made by a sink) is
    read as before.
    """

    def __init__(self, maxlen: int = 1024) -> None:
        self.maxlen = maxlen
        self._items: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, path: str, head: bytes) -> None:
        """Remember ``head`` for the file at ``path``."""
        with self._lock:
            items = self._items
            if len(items) >= self.maxlen:
                del items[next(iter(items))]
            items[path] = head

    def take(self, path: str) -> Optional[bytes]:
        """The head remembered for ``path`` (forgotten from now on), or None."""
        with self._lock:
            return self._items.pop(path, None)

    def __len__(self) -> int:
        return len(self._items)


class RefusedCameras:
    """The cameras ``devices.allow`` refused, by IMEI: the latest peer, how often, when last (clock seconds).

    Kept in memory per process (a camera always reaches the same worker),
    the most recently refused :attr:`maxlen` of them.
    """

    def __init__(self, maxlen: int = 1000) -> None:
        self.maxlen = maxlen
        self._items: dict[str, dict[str, Any]] = {}

    def refused(self, imei: str, peer: str, at: float) -> None:
        """Camera ``imei`` from ``peer`` was refused at time ``at``."""
        item = self._items.pop(imei, None) or {"imei": imei, "count": 0}
        item.update(peer=peer, count=item["count"] + 1, last_at=at)
        self._items[imei] = item  # (the most recent last)
        if len(self._items) > self.maxlen:
            del self._items[next(iter(self._items))]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Each refused camera, the most recently refused last."""
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)


def _write_then_sync(fd: int, before: Optional[Callable[[], object]],
                     after: Optional[Callable[[], object]] = None) -> None:
    if before is not None:
        before()
    os.fdatasync(fd)
    if after is not None:
        after()


@dataclasses.dataclass
class Services:
    """Configuration, stores, sinks and clock, shared by every session."""

    config: Config
    store: Any  # IResumeStore
    spool: Spool
    sinks: list[Any]  # IFileSink
    clock: Any  # IReactorTime
    run_in_thread: Callable[..., Deferred]
    boot_id: str = ""
    stats: Stats = dataclasses.field(default_factory=Stats)
    #: The live session of each IMEI (one per camera).
    sessions: dict[str, Any] = dataclasses.field(default_factory=dict)  # camgateway.session.machine.Session
    #: Work that must finish before shutdown (finalising and delivering files).
    pending: set[Deferred] = dataclasses.field(default_factory=set)
    #: Files being finished (digest, sinks), or released (a lost connection's
    #: partial being persisted), by identity: a new offer of the same file
    #: waits for them.
    finishing: dict[tuple[str, str, bytes], Deferred] = dataclasses.field(default_factory=dict)
    accepting: bool = True
    #: The outbox delivering finished files to the sinks (camgateway.delivery.outbox.Outbox).
    outbox: Any = None
    #: Camera leases when several instances share a store (RedisLeases), else None.
    leases: Any = None
    #: This instance's name (in lease tokens and outbox claims).
    instance: str = "local"
    heads: FileHeads = dataclasses.field(default_factory=FileHeads)
    #: The sessions the half-second scan visits, each when something of its own comes due
    #: (with ``performance.due_heap`` off, a NoDueSessions: the scan visits every session).
    due: DueSessions = dataclasses.field(default=None)  # type: ignore[assignment]
    #: The cameras ``devices.allow`` refused (``/api/refused``).
    refused: RefusedCameras = dataclasses.field(default_factory=RefusedCameras)
    #: The latest failures: dicts with time, imei, peer, what and why, newest last.
    failures: Deque[dict[str, Any]] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=RECENT))
    #: Flushes the spool's filesystem for many finishing files at once
    #: (camgateway.perf.durability.GroupSync); None: one fdatasync per file.
    spool_sync: Any = None
    #: The thread the spool's flushes, the embedded store and the disk sink share
    #: (camgateway.perf.groupcommit.BatchThread); None: each has its own.
    batch_thread: Any = None
    #: New spool files made ahead (camgateway.perf.reserve.SpoolReserve), or None.
    reserve: Any = None
    #: Which worker this process is (camgateway.runtime.workers.Shard), None with one process.
    shard: Any = None
    #: What keeps the gateway from recording files now (/healthz, /metrics).
    health: Health = dataclasses.field(default_factory=Health)
    #: Notes of finished files the store could not record yet (camgateway.transfer.journal.FinishJournal), or None.
    journal: Any = None
    #: Sends a reactor turn's replies to the cameras together at its end (made on :attr:`clock`),
    #: or each at once (a PlainWriter, ``performance.reply_batching`` off).
    writer: TurnWriter = dataclasses.field(default=None)  # type: ignore[assignment]
    #: Writes what sessions see of cameras to the history (camgateway.storage.sightings.CameraSightings), or None.
    sightings: Any = None

    def __post_init__(self) -> None:
        performance = self.config.performance
        if self.writer is None:
            send = write_now if performance.direct_send else plain_write
            writer: Any = TurnWriter(self.clock, send) if performance.reply_batching else PlainWriter(send)
            self.writer = writer
        if self.due is None:
            self.due = DueSessions() if performance.due_heap else NoDueSessions(self.sessions)

    @property
    def own_store(self) -> bool:
        """The store is this instance's alone (not ``IOutboxStore.shared``).

        Then the start-up reconcile runs, partial records may be committed
        beside the RESUME, new spool files may be made ahead, and the outbox
        may deliver a new file without a claim. A store that does not say is
        taken as shared, the safe side.
        """
        return not getattr(self.store, "shared", True)

    def durable(self, fd: int, before: Optional[Callable[[], object]] = None,
                after: Optional[Callable[[], object]] = None) -> Deferred:
        """Fires when what was written to spool file ``fd`` is on disk.

        ``before`` (a last write) runs on the same thread first; ``after``
        (closing the file) on that thread once the file is durable.
        """
        if self.spool_sync is None:
            return self.run_in_thread(_write_then_sync, fd, before, after)
        return self.spool_sync.sync(fd, before, after)

    def trickled(self, nbytes: int) -> None:
        """A slow camera's ``nbytes`` were written to its spool file, to wait there until the file ends.

        The spool's group sync counts them, and flushes the spool's filesystem
        once enough piled up (:meth:`GroupSync.written`).
        """
        if self.spool_sync is not None:
            self.spool_sync.written(nbytes)

    def failed(self, imei: str, peer: str, what: str, why: str) -> None:
        """Remember a failure for operators (it is logged separately)."""
        self.failures.append({"time": self.clock.seconds(), "imei": imei, "peer": peer, "what": what, "why": why})
        if self.sightings is not None:
            self.sightings.error(imei, f"{what}: {why}")

    def camera_connected(self, imei: str, peer: str) -> None:
        """A session of camera ``imei`` began (for the history of cameras)."""
        if self.sightings is not None:
            self.sightings.connected(imei, peer)

    def camera_gone(self, imei: str) -> None:
        """The session of camera ``imei`` ended (for the history of cameras)."""
        if self.sightings is not None:
            self.sightings.gone(imei)

    def track(self, d: Deferred) -> Deferred:
        """Keep ``d`` in :attr:`pending` until it fires."""
        self.pending.add(d)

        def done(result: object) -> object:
            self.pending.discard(d)
            return result

        d.addBoth(done)
        return d
