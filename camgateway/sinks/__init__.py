"""Where finished files go: the sink interface and the sinks shipped.

A sink receives a :class:`ReceivedFile` (a complete, durable spool file plus
everything known about it) and returns a Deferred that fires once the file is
durably delivered. The gateway tells the camera the file is done (REPEAT
INIT) only after every configured sink has fired, and removes the spool file
only then. Sinks must not modify or move the spool file: they link, copy or
read it.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from camgateway.config import ConfigError

__all__ = ["IFileSink", "ReceivedFile", "validate_sink_config", "make_sinks", "SINK_TYPES"]


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

    @property
    def device_path(self) -> Optional[str]:
        """The device's path (path flow), printable, without the trailing NUL."""
        if self.flow != "path":
            return None
        return self.identifier.rstrip(b"\0").decode("utf-8", "backslashreplace")

    def sidecar(self) -> dict[str, Any]:
        """The JSON record stored beside the file (documented in README.md)."""
        return {
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
            "peer": self.peer,
            "metadata": dict(self.metadata),
        }


class IFileSink(Interface):
    """Delivers finished files somewhere."""

    name = Attribute("A short name for logs, e.g. 'disk:/var/lib/camgateway/files'.")

    def deliver(received: ReceivedFile) -> Deferred:
        """Deliver ``received``; fire (with a description of where it went) once durable."""


def _disk(config: Mapping[str, Any], key: str, base: Path) -> Mapping[str, Any]:
    allowed = {"type", "root"}
    for name in config:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}", f"unknown key for a disk sink (known: {', '.join(sorted(allowed))})")
    root = config.get("root")
    if not isinstance(root, str) or not root:
        raise ConfigError(f"{key}.root", "a disk sink needs root: the directory files are stored under")
    return {"type": "disk", "root": str(base / Path(root).expanduser())}


#: Sink type -> validator of its configuration.
SINK_TYPES: dict[str, Callable[[Mapping[str, Any], str, Path], Mapping[str, Any]]] = {
    "disk": _disk,
}


def validate_sink_config(item: object, key: str, base: Path) -> Mapping[str, Any]:
    """Check one entry of ``sinks:``; relative paths resolve against ``base``."""
    if not isinstance(item, Mapping):
        raise ConfigError(key, "must be a mapping such as {type: disk, root: /var/lib/camgateway/files}")
    kind = item.get("type")
    if kind not in SINK_TYPES:
        raise ConfigError(f"{key}.type", f"must be one of {', '.join(SINK_TYPES)}, got {kind!r}")
    return SINK_TYPES[kind](item, key, base)


def make_sinks(configs: tuple[Mapping[str, Any], ...], run_in_thread: Callable[..., Deferred]) -> list[Any]:
    """Build the configured sinks, in order."""
    from camgateway.sinks.disk import DiskSink

    sinks: list[Any] = []
    for config in configs:
        if config["type"] == "disk":
            sinks.append(DiskSink(Path(config["root"]), run_in_thread))
    return sinks
