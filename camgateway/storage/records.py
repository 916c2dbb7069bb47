"""What the stores keep: interrupted transfers (the resume-offset store), received files and outbox entries.

A *partial* is a file a camera started to send and did not finish. Its bytes
live in a spool file (:mod:`camgateway.transfer.spool`); the store records what the
file is and how many of its bytes are known to be durable, so that when the
camera offers the same file again, on any later connection, the gateway asks
it to RESUME where it stopped (PROTOCOL.md section 9).

Write order, which makes the store and the spool agree after a crash:

1. the record is inserted (``held`` 0) before the spool file gets any byte;
2. bytes are appended to the spool file as frames pass their CRC;
3. a checkpoint ``fdatasync``\\ s the spool file, *then* records ``held``
   (and the kernel's boot id) in the store.

So ``held`` never exceeds what is on stable storage. On start the gateway
reconciles (:func:`camgateway.transfer.spool.reconcile`): when the machine has not
rebooted since the checkpoint (same boot id), the page cache survived a
``kill -9`` and every byte in the spool file is good; after a reboot only
``held`` bytes are trusted and the file is truncated to them. Spool files
with no record, and records with no spool file, are dropped.

The store is an interface (:class:`IResumeStore`) so that other backends
(for example a shared one for several instances) can replace the embedded
SQLite one (:class:`camgateway.storage.sqlite.SQLiteStore`), the default.
:class:`camgateway.storage.memory.MemoryStore` is for tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = ["Partial", "IResumeStore", "ReceivedFile", "OutboxEntry", "IOutboxStore", "remove_files", "FileEvent",
           "StoredFile", "FileQuery", "CameraSighting", "CameraRecord", "IHistoryStore", "file_kind", "DAY",
           "next_status", "file_position", "history_columns", "file_name", "sweep_in_batches"]


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

    @property
    def key(self) -> tuple[str, str, bytes]:
        """The file's identity (what :meth:`IResumeStore.find` looks up; ``FileOffer.key``)."""
        return (self.imei, self.flow, self.identifier)

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


def _iso(t: datetime.datetime) -> str:
    return t.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class ReceivedFile:
    """A finished file and what is known about it."""

    path: Path  # the complete spool file; read-only for sinks
    imei: str
    peer: str
    protocol_id: int
    camera: str  # dualcam | dashcam | dsm | adas | unknown
    flow: str  # dualcam | path
    source: str  # photof, photor, videof, videor, dsm, adas, dashcam, dualcam_front ...
    identifier: bytes  # "%photof" or the device path exactly as received
    media: str  # photo | video | unknown
    metadata: Mapping[str, Any]
    size: int
    sha256: str
    start_total: int
    start_crc: int
    computed_crc: int
    received_at: datetime.datetime
    capture_time: Optional[datetime.datetime]
    resumed_from: int  # bytes already held when this connection's transfer began
    crc_errors: int
    derived: Optional[str] = None  # made by a sink from the camera's file: "mp4", "poster"...
    #: The file's outbox entry id, stable across retries and restarts: a sink
    #: that is given the same id (and sha256) again is seeing the same delivery
    #: again. Empty only for files no outbox has recorded (old records).
    id: str = ""

    @property
    def device_path(self) -> Optional[str]:
        """The device's path (path flow), printable, without the trailing NUL."""
        if self.flow != "path":
            return None
        return self.identifier.rstrip(b"\0").decode("utf-8", "backslashreplace")

    def sidecar(self) -> dict[str, Any]:
        """The JSON record stored beside the file (documented in docs/configuration.md)."""
        return {
            "id": self.id,
            "imei": self.imei,
            "protocol_id": self.protocol_id,
            "camera": self.camera,
            "flow": self.flow,
            "source": self.source,
            "device_path": self.device_path,
            "media": self.media,
            "size": self.size,
            "sha256": self.sha256,
            "start": {"total": self.start_total, "crc": self.start_crc,
                      "unit": "packets" if self.flow == "dualcam" else "bytes"},
            "computed_crc": self.computed_crc,
            "crc_match": None if self.flow == "dualcam" else self.start_crc == self.computed_crc,
            "capture_time": _iso(self.capture_time) if self.capture_time else None,
            "received_at": _iso(self.received_at),
            "resumed_from": self.resumed_from,
            "crc_errors": self.crc_errors,
            "derived": self.derived,
            "peer": self.peer,
            "metadata": dict(self.metadata),
        }

    def to_record(self) -> dict[str, Any]:
        """Everything but the path, as JSON-safe values (for the outbox)."""
        record = {name: getattr(self, name) for name in _RECORD_FIELDS}
        record["identifier"] = self.identifier.hex()
        record["received_at"] = self.received_at.timestamp()
        record["capture_time"] = self.capture_time.timestamp() if self.capture_time else None
        record["metadata"] = dict(self.metadata)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any], path: Path) -> "ReceivedFile":
        """The inverse of :meth:`to_record`."""
        utc = datetime.timezone.utc
        values = dict(record)
        values["identifier"] = bytes.fromhex(record["identifier"])
        values["received_at"] = datetime.datetime.fromtimestamp(record["received_at"], utc)
        stamp = record.get("capture_time")
        values["capture_time"] = datetime.datetime.fromtimestamp(stamp, utc) if stamp is not None else None
        return cls(path=path, **{k: v for k, v in values.items() if k in _RECORD_KNOWN})


#: ReceivedFile's fields but the path: those of an outbox record (computed once,
#: not per file on the reactor thread).
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(ReceivedFile) if f.name != "path")
_RECORD_KNOWN = frozenset(_RECORD_FIELDS)


@dataclasses.dataclass
class OutboxEntry:
    """A file on its way along the sink chain."""

    id: str
    spool_name: str
    sink: int  # index of the next sink to deliver to
    attempts: int  # failed attempts at this sink
    next_attempt: float
    last_error: Optional[str]
    record: dict[str, Any]  # ReceivedFile.to_record()
    created: float


class IOutboxStore(Interface):
    """Where outbox entries are kept. Every method returns a Deferred."""

    shared = Attribute(
        "True when several instances share the store: an entry is then delivered only once "
        "``due`` has claimed it for this instance, never straight after ``enqueue``.")

    def enqueue(entry: OutboxEntry, partial_id: Optional[str]) -> defer.Deferred:
        """Record ``entry`` and forget the partial it came from, atomically."""

    def due(now: float, limit: int, exclude: frozenset) -> defer.Deferred:
        """Up to ``limit`` entries whose next attempt is due, oldest first."""

    def update(entry: OutboxEntry) -> defer.Deferred:
        """Save an entry's sink, attempts, next attempt and last error."""

    def replace(entry_id: str, entries: list, remove: Sequence[str] = ()) -> defer.Deferred:
        """Remove an entry and record others in its place, atomically.

        Once that is committed, remove the files at the paths in ``remove``
        (spool files no entry names any more) on the store's own thread, in
        the same step: a delivered photo's spool name costs no hand-off of
        its own. Fires with the ``(path, error)`` of those that could not be
        removed (a missing one is removed); the start-up reconcile removes
        them as orphans.
        """

    def pending() -> defer.Deferred:
        """Every entry."""


def remove_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Remove each file (blocking); the ``(path, error)`` of those that could not be (missing is removed)."""
    left: list[tuple[str, str]] = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            left.append((path, e.strerror or str(e)))
    return left


# -- the history: stored files and the cameras seen, for the status API

#: Seconds in a day (a camera's ``files_24h``).
DAY = 86400.0


def file_kind(media: Optional[str]) -> str:
    """``photo``, ``video`` or ``other``: what a file is for a person looking at it."""
    return media if media in ("photo", "video") else "other"


def next_status(current: str, new: Optional[str], retried: bool = False) -> str:
    """A file's status (``delivering``, ``stored`` or ``dead-letter``) after an event saying ``new`` (None: no change).

    A dead letter stays one when another part of the file is stored, until a
    retried delivery of it (``retried``) is stored.
    """
    if new is None or new == current:
        return current
    if new == "stored" and current == "dead-letter" and not retried:
        return current
    return new


def file_position(record: Mapping[str, Any]) -> Optional[tuple[float, float, float]]:
    """``(latitude, longitude, when)`` a file's metadata gives, or None."""
    meta = record.get("metadata") or {}
    lat, lon = meta.get("latitude"), meta.get("longitude")
    if (not isinstance(lat, (int, float)) or not isinstance(lon, (int, float))
            or isinstance(lat, bool) or isinstance(lon, bool)):
        return None
    if lat == 0 and lon == 0:  # no fix
        return None
    when = record.get("capture_time") or record.get("received_at") or 0.0
    return float(lat), float(lon), float(when)


@dataclasses.dataclass
class FileEvent:
    """Something that happened to a file on its way along the sink chain, for the history.

    ``file_id`` names the file's row, made from ``record`` (a
    :meth:`ReceivedFile.to_record`) if the history does not have it yet
    (status ``delivering``); ``parent`` is the id of the camera's file a sink
    made this one from (an MP4, a poster), None for the camera's own file.
    ``place`` is added to where it is stored; ``status`` applies to the row
    and to its parent (:func:`next_status`); ``made`` are the files a sink
    made from it, ``(id, record)``, listed under its original.
    """

    file_id: str
    record: Mapping[str, Any]
    at: float
    parent: Optional[str] = None
    place: Optional[str] = None
    status: Optional[str] = None
    retried: bool = False
    made: Sequence[tuple[str, Mapping[str, Any]]] = ()

    @property
    def root(self) -> str:
        """The id of the camera's file this event is about (its own, or its parent's)."""
        return self.parent or self.file_id

    def applied(self, status: str, stored_at: Optional[float], places: list[str],
                own: bool = True) -> tuple[str, Optional[float], list[str]]:
        """A row's status, stored time and places once this event is applied to it (its own row, or its parent's).

        The status follows :func:`next_status`; the row is stored (or refused)
        when it first leaves ``delivering``; ``place`` is added to its own row.
        ``places`` is returned as given when no place is added.
        """
        new = next_status(status, self.status, self.retried)
        if new != "delivering" and stored_at is None:
            stored_at = self.at
        if own and self.place is not None and self.place not in places:
            places = [*places, self.place]
        return new, stored_at, places


@dataclasses.dataclass
class StoredFile:
    """A file in the history: what it is (its record), where it is stored and how its delivery goes."""

    id: str
    record: dict[str, Any]
    status: str
    places: list[str]
    received_at: float
    stored_at: Optional[float] = None
    parent: Optional[str] = None
    #: The files sinks made from it (an MP4, a poster), in no set order; filled by the queries.
    derived: list["StoredFile"] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        """``photo``, ``video`` or ``other``."""
        return file_kind(self.record.get("media"))

    @property
    def made_as(self) -> Optional[str]:
        """What a sink made it as (``mp4``, ``poster``, ``h264``), None for a camera's file."""
        return self.record.get("derived") if self.parent else None


@dataclasses.dataclass
class FileQuery:
    """Which files of the history to list: filters (None: any), newest first, one page."""

    limit: int = 200
    offset: int = 0
    imei: Optional[str] = None
    camera: Optional[str] = None
    kind: Optional[str] = None
    media: Optional[str] = None
    source: Optional[str] = None
    #: A trigger's number, or its name (``trigger_name``).
    trigger: Optional[int | str] = None
    #: Received at or after / before (POSIX time).
    since: Optional[float] = None
    until: Optional[float] = None

    def filters(self) -> dict[str, Any]:
        """The equality filters set, by the history's column: imei, camera, kind, media, source, trigger."""
        out = {name: getattr(self, name) for name in ("imei", "camera", "kind", "media", "source")
               if getattr(self, name) is not None}
        if isinstance(self.trigger, int):
            out["trigger"] = self.trigger
        elif self.trigger is not None:
            out["trigger_name"] = self.trigger
        return out

    def matches(self, f: StoredFile) -> bool:
        """Whether ``f`` passes the filters (for stores that filter in Python)."""
        values = history_columns(f.record)
        if any(values.get(name) != wanted for name, wanted in self.filters().items()):
            return False
        if self.since is not None and f.received_at < self.since:
            return False
        return self.until is None or f.received_at < self.until


def history_columns(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a file's record gives the history to filter on."""
    meta = record.get("metadata") or {}
    trigger = meta.get("trigger")
    name = meta.get("trigger_name")
    return {"imei": record.get("imei"), "camera": record.get("camera"), "kind": file_kind(record.get("media")),
            "media": record.get("media"), "source": record.get("source"),
            "trigger": trigger if isinstance(trigger, int) and not isinstance(trigger, bool) else None,
            "trigger_name": name if isinstance(name, str) else None}


@dataclasses.dataclass
class CameraSighting:
    """What a session saw of a camera: that it was there (``at``), from where, and what went wrong."""

    imei: str
    at: float
    peer: Optional[str] = None
    error: Optional[str] = None
    error_at: Optional[float] = None


@dataclasses.dataclass
class CameraRecord:
    """A camera the gateway has seen, as the history keeps it."""

    imei: str
    camera: Optional[str] = None
    first_seen: Optional[float] = None
    last_seen: Optional[float] = None
    peer: Optional[str] = None
    files_total: int = 0
    last_file_at: Optional[float] = None
    latitude: Optional[float] = None
    longitude: Optional[float] = None
    position_at: Optional[float] = None
    last_error: Optional[str] = None
    last_error_at: Optional[float] = None
    #: Files received in the day before the query (filled by the queries).
    files_24h: int = 0
    #: Whether a session of the camera is live, when the store knows (Redis leases); None: ask the sessions.
    online: Optional[bool] = None

    def count_file(self, record: Mapping[str, Any]) -> None:
        """A file of this camera entered the history: count it, and take its kind and position."""
        received = float(record.get("received_at") or 0.0)
        self.files_total += 1
        self.last_file_at = max(self.last_file_at or received, received)
        self.first_seen = min(self.first_seen or received, received)
        self.last_seen = max(self.last_seen or received, received)
        if record.get("camera") and record.get("camera") != "unknown":
            self.camera = record["camera"]
        position = file_position(record)
        if position is not None and (self.position_at is None or position[2] >= self.position_at):
            self.latitude, self.longitude, self.position_at = position

    def saw(self, sighting: CameraSighting) -> None:
        """Take what a session saw."""
        self.first_seen = min(self.first_seen or sighting.at, sighting.at)
        self.last_seen = max(self.last_seen or sighting.at, sighting.at)
        if sighting.peer is not None:
            self.peer = sighting.peer
        if sighting.error is not None:
            self.last_error = sighting.error
            self.last_error_at = sighting.error_at if sighting.error_at is not None else sighting.at

    def stored_fields(self) -> dict[str, Any]:
        """What a store keeps of it (the fields but ``files_24h`` and ``online``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("files_24h", "online")}


class IHistoryStore(Interface):
    """The history of stored files and of the cameras seen. Every method returns a Deferred.

    Shared by every instance that shares the store, kept across restarts,
    bounded by :meth:`sweep_history`.
    """

    def note_file(event: FileEvent) -> Deferred:
        """Apply ``event`` (see :class:`FileEvent`). A camera's file seen for the first time counts for its camera."""

    def files(query: FileQuery) -> Deferred:
        """``(files, total)``: one page of camera files (with their derived files), newest first, and how many match."""

    def file(file_id: str) -> Deferred:
        """The :class:`StoredFile` with this id (a camera's, with its derived files, or one a sink made), or None."""

    def note_camera(sighting: CameraSighting) -> Deferred:
        """Record what a session saw of a camera (first and last seen, peer, last error)."""

    def cameras(now: float) -> Deferred:
        """Every camera seen (:class:`CameraRecord`, ``files_24h`` counted up to ``now``)."""

    def camera(imei: str, now: float) -> Deferred:
        """One camera's :class:`CameraRecord`, or None if never seen."""

    def sweep_history(before: float) -> Deferred:
        """Forget the files received before ``before`` (and what sinks made of them); fires with how many."""


def sweep_in_batches(step: Callable[[], Deferred], size: int) -> Deferred:
    """Run ``step`` (a Deferred of how many files it forgot, at most ``size``) until one forgets fewer.

    For :meth:`IHistoryStore.sweep_history`: each step is short, so the
    store serves other work between them. Fires with how many in all.
    """
    removed = 0

    def forgot(n: Any) -> Any:
        nonlocal removed
        removed += int(n)
        return step().addCallback(forgot) if int(n) == size else removed

    return step().addCallback(forgot)


def file_name(record: Mapping[str, Any]) -> str:
    """The camera's name for a recorded file (its identifier), else its source; a derived file says what it is."""
    try:
        name = bytes.fromhex(record.get("identifier") or "").rstrip(b"\0").decode("utf-8", "backslashreplace")
    except ValueError:
        name = ""
    name = name or str(record.get("source"))
    if record.get("derived"):
        name = f"{name} ({record['derived']})"
    return name
