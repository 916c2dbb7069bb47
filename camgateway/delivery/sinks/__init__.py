"""Where finished files go: the sink interface and the sinks shipped.

A sink receives a :class:`ReceivedFile` (a complete, durable spool file plus
everything known about it) and returns a Deferred that fires once the file is
durably delivered, or fails: with :class:`PermanentFailure` when retrying
cannot help. Sinks form a chain (see :mod:`camgateway.delivery.outbox`): a sink passes
the file on, or returns :class:`Transformed` files that the following sinks
get instead. Sinks must not modify or move the file they are given.

A sink may be given the same file again: the outbox records a delivery only
after the sink confirmed it, so a crash (or a failure to record) in between
repeats it. Every file carries its outbox entry's :attr:`ReceivedFile.id`,
the same on every attempt: a sink that can, recognises a repeat by it (the
disk sink does); the others pass it on for their receivers to de-duplicate.

Sink types are found by name in ``sinks:`` (:mod:`camgateway.delivery.sinks.registry`):
the shipped ``disk``, ``http``, ``command`` and ``mp4``, and third-party ones
registered under the entry point group ``camgateway.delivery.sinks``.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any, Mapping, Optional

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


__all__ = ["IFileSink", "ReceivedFile", "PermanentFailure", "Transformed", "validate_sink_config", "make_sinks"]


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
        """The JSON record stored beside the file (documented in README.md)."""
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


class PermanentFailure(Exception):
    """A delivery that retrying cannot fix (the file goes to the dead-letter folder)."""


@dataclasses.dataclass(frozen=True)
class Transformed:
    """A sink's result: the files the following sinks get instead of the one it was given."""

    files: list[ReceivedFile]


class IFileSink(Interface):
    """Delivers finished files somewhere."""

    name = Attribute("A short name for logs, e.g. 'disk:/var/lib/camgateway/files'.")

    def deliver(received: ReceivedFile) -> Deferred:
        """Deliver ``received``; fire (with a description of where it went) once durable.

        A sink may also have ``close()`` (returning a Deferred or None), called
        when the gateway stops, to release connections or processes."""


def validate_sink_config(item: object, key: str, base: Path) -> Mapping[str, Any]:
    """Check one entry of ``sinks:``; relative paths resolve against ``base``."""
    from camgateway.delivery.sinks.registry import validate

    return validate(item, key, base)


def make_sinks(configs: tuple[Mapping[str, Any], ...], services: Any) -> list[Any]:
    """Build the configured sinks, in order, each under its name (unique in the chain)."""
    from camgateway.delivery.sinks.registry import make_chain

    return make_chain(configs, services)
