"""What the status API says about stored files, partial transfers and outbox entries (JSON-ready dicts)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

from camgateway.web.progress import iso

__all__ = ["file_id", "stored_path", "file_view", "partial_view", "outbox_view"]


def file_id(received: Any) -> str:
    """A stable id of a received file (its camera, identifier, arrival and digest)."""
    key = "\0".join((received.imei, received.identifier.hex(), received.received_at.isoformat(), received.sha256))
    return hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


def stored_path(places: list[Any]) -> Optional[Path]:
    """The first place a sink reported that is a local file the gateway wrote."""
    for place in places:
        if isinstance(place, (str, os.PathLike)):
            path = Path(place)
            if path.is_absolute() and path.is_file():
                return path
    return None


def file_view(received: Any, places: list[Any]) -> dict[str, Any]:
    """A received file for the API: what it is, its metadata, and where it can be fetched."""
    meta = dict(received.metadata)
    local = stored_path(places)
    fid = file_id(received)
    return {
        "id": fid,
        "url": f"files/{fid}" if local is not None else None,
        "name": local.name if local is not None else None,
        "imei": received.imei,
        "peer": received.peer,
        "camera": received.camera,
        "source": received.source,
        "media": received.media,
        "device_path": received.device_path,
        "derived": getattr(received, "derived", None),
        "size": received.size,
        "sha256": received.sha256,
        "received_at": iso(received.received_at.timestamp()),
        "capture_time": iso(received.capture_time.timestamp()) if received.capture_time else None,
        "trigger": meta.get("trigger"),
        "trigger_name": meta.get("trigger_name"),
        "latitude": meta.get("latitude"),
        "longitude": meta.get("longitude"),
        "resumed_from": received.resumed_from,
        "crc_errors": received.crc_errors,
        "places": [str(p) for p in places if isinstance(p, (str, os.PathLike))],
        "metadata": meta,
    }


def _printable(identifier: bytes) -> str:
    text = identifier.rstrip(b"\0").decode("utf-8", "backslashreplace")
    text = text if len(text) <= 200 else text[:200] + "..."
    return repr(text)[1:-1]


def partial_view(partial: Any, receiving: set[str]) -> dict[str, Any]:
    """An interrupted transfer kept for resuming."""
    total = partial.total * 1024 if partial.flow == "dualcam" else partial.total
    return {
        "id": partial.id,
        "imei": partial.imei,
        "flow": partial.flow,
        "file": _printable(partial.identifier),
        "held": partial.held,
        "total": total,
        "percent": round(min(100.0, 100.0 * partial.held / max(total, 1)), 1),
        "first_seen": iso(partial.first_seen),
        "last_seen": iso(partial.last_seen),
        "receiving": partial.id in receiving,
    }


def outbox_view(entry: Any, sinks: list[Any], in_flight: Any) -> dict[str, Any]:
    """A file waiting in the outbox for its next sink."""
    record = getattr(entry, "record", None) or {}
    index = getattr(entry, "sink", None)
    sink = sinks[index].name if isinstance(index, int) and 0 <= index < len(sinks) else index
    return {
        "id": getattr(entry, "id", None),
        "imei": record.get("imei"),
        "source": record.get("source"),
        "media": record.get("media"),
        "size": record.get("size"),
        "sink": sink,
        "attempts": getattr(entry, "attempts", None),
        "last_error": getattr(entry, "last_error", None),
        "next_attempt": iso(getattr(entry, "next_attempt", None)),
        "created": iso(getattr(entry, "created", None)),
        "in_flight": getattr(entry, "id", None) in (in_flight or ()),
    }
