"""What the status API says about stored files, partial transfers and outbox entries (JSON-ready dicts)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

from camgateway.web.progress import iso
from camgateway.wire.codec import PACKET

__all__ = ["file_id", "stored_path", "history_view", "camera_view", "partial_view", "outbox_view",
           "DERIVED_ORDER"]

#: How a file's derived files are listed: the MP4, the H.264 copy, the poster, then anything else.
DERIVED_ORDER = ("mp4", "h264", "poster")


def file_id(received: Any) -> str:
    """A received file's id: its outbox entry's (:attr:`ReceivedFile.id`, what the history and the
    sidecar say), else one made of its camera, identifier, arrival and digest."""
    if getattr(received, "id", ""):
        return received.id
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


def history_view(f: Any) -> dict[str, Any]:
    """A file of the history (:class:`~camgateway.storage.records.StoredFile`) for ``/api/files``.

    What it is, its metadata and where it can be fetched, its ``kind``, what
    to show for it (``thumb``: the photo itself or the video's poster;
    ``poster`` and ``play``, served by camgateway.web.media), the files sinks
    made of it (``derived``), and how its delivery went (``status``, ``stored_at``).
    """
    record = f.record
    meta = dict(record.get("metadata") or {})
    local = stored_path(f.places)
    derived = sorted(f.derived, key=lambda d: (DERIVED_ORDER.index(d.made_as) if d.made_as in DERIVED_ORDER
                                               else len(DERIVED_ORDER), d.id))
    made = [{"id": d.id, "kind": d.made_as, "name": path.name if path is not None else None,
             "url": f"files/{d.id}" if path is not None else None}
            for d in derived for path in [stored_path(d.places)]]
    url = f"files/{f.id}" if local is not None else None
    here = local is not None or any(m["url"] for m in made)  # something of it to make a poster or a video of
    kind = f.kind
    poster = f"files/{f.id}/poster" if kind == "video" and here else None
    received_at = record.get("received_at")
    capture_time = record.get("capture_time")
    flow = record.get("flow")
    try:
        device_path = (bytes.fromhex(record.get("identifier") or "").rstrip(b"\0").decode("utf-8", "backslashreplace")
                       if flow == "path" else None)
    except ValueError:
        device_path = None
    return {
        "id": f.id,
        "url": url,
        "name": local.name if local is not None else None,
        "imei": record.get("imei"),
        "peer": record.get("peer"),
        "camera": record.get("camera"),
        "source": record.get("source"),
        "media": record.get("media"),
        "kind": kind,
        "device_path": device_path,
        "size": record.get("size"),
        "sha256": record.get("sha256"),
        "received_at": iso(received_at) if isinstance(received_at, (int, float)) else None,
        "capture_time": iso(capture_time) if isinstance(capture_time, (int, float)) else None,
        "stored_at": iso(f.stored_at),
        "status": f.status,
        "trigger": meta.get("trigger"),
        "trigger_name": meta.get("trigger_name"),
        "latitude": meta.get("latitude"),
        "longitude": meta.get("longitude"),
        "resumed_from": record.get("resumed_from"),
        "crc_errors": record.get("crc_errors"),
        "places": list(f.places),
        "thumb": url if kind == "photo" else poster,
        "poster": poster,
        "play": f"files/{f.id}/play" if kind == "video" and here else None,
        "derived": made,
        "metadata": meta,
    }


def camera_view(c: Any, online: bool) -> dict[str, Any]:
    """A camera of the history (:class:`~camgateway.storage.records.CameraRecord`) for ``/api/cameras``."""
    return {
        "imei": c.imei,
        "camera": c.camera,
        "first_seen": iso(c.first_seen),
        "last_seen": iso(c.last_seen),
        "online": online,
        "peer": c.peer,
        "files_total": c.files_total,
        "files_24h": c.files_24h,
        "last_file_at": iso(c.last_file_at),
        "latitude": c.latitude,
        "longitude": c.longitude,
        "position_at": iso(c.position_at),
        "last_error": c.last_error,
        "last_error_at": iso(c.last_error_at),
    }


def _printable(identifier: bytes) -> str:
    text = identifier.rstrip(b"\0").decode("utf-8", "backslashreplace")
    text = text if len(text) <= 200 else text[:200] + "..."
    return repr(text)[1:-1]


def partial_view(partial: Any, receiving: set[str]) -> dict[str, Any]:
    """An interrupted transfer kept for resuming."""
    total = partial.total * PACKET if partial.flow == "dualcam" else partial.total
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
