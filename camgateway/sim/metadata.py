"""Builders of METADATA (0x000B) payloads, one per layout of PROTOCOL.md section 6."""

from __future__ import annotations

import json
from typing import Optional, Union

from camgateway.wire.metadata import ADAS_LAYOUT, DSM_LAYOUT, DUALCAM_FILE_TYPES, DUALCAM_LAYOUTS

__all__ = [
    "dualcam_metadata",
    "dsm_metadata",
    "adas_metadata",
    "json_metadata",
]

#: How many fields the DualCam layout of each version has.
_DUALCAM_FIELDS = {version: len(layout.unpack(bytes(layout.size))) for version, layout in DUALCAM_LAYOUTS.items()}


def _micro_degrees(value: float) -> int:
    return int(round(value * 1_000_000))


def dualcam_metadata(
    file_type: Union[str, int],
    *,
    timestamp_ms: int,
    trigger: int = 0,
    length_s: int = 0,
    framerate: int = 0,
    timezone_min: int = 0,
    latitude: float = 0.0,
    longitude: float = 0.0,
    version: int = 3,
    trigger_timestamp_ms: Optional[int] = None,
) -> bytes:
    """The DualCam/DashCam binary layout (versions 1-4; real devices send 3).

    ``file_type`` is a DualCam source (``"videof"`` → 16) or the number itself.
    """
    layout = DUALCAM_LAYOUTS.get(version)
    if layout is None:
        raise ValueError(f"DualCam metadata version must be 1-4, not {version}")
    kind = DUALCAM_FILE_TYPES[file_type] if isinstance(file_type, str) else file_type
    fields = (version, kind, timestamp_ms, trigger, length_s, framerate, timezone_min, latitude, longitude,
              timestamp_ms if trigger_timestamp_ms is None else trigger_timestamp_ms)
    return layout.pack(*fields[: _DUALCAM_FIELDS[version]])


def dsm_metadata(
    *,
    timestamp: int,
    file_type: int,
    trigger: int = 0,
    latitude: float = 0.0,
    longitude: float = 0.0,
    events: int = 0,
    driver_name: str = "",
) -> bytes:
    """The 26-byte DSM layout.

    ``timestamp`` is in seconds, coordinates in degrees (sent as signed
    millionths). The driver name is cut to 10 bytes, reversed, then padded
    with NULs at the end.
    """
    name = driver_name.encode("utf-8")[:10][::-1].ljust(10, b"\0")
    return DSM_LAYOUT.pack(
        timestamp, file_type, trigger, _micro_degrees(latitude), _micro_degrees(longitude), events, name
    )


def adas_metadata(
    *,
    timestamp: int,
    file_type: int,
    trigger: int = 0,
    latitude: float = 0.0,
    longitude: float = 0.0,
    length_s: int = 0,
) -> bytes:
    """The 15-byte ADAS layout (``timestamp`` in seconds, coordinates in degrees)."""
    return ADAS_LAYOUT.pack(
        timestamp, file_type, trigger, _micro_degrees(latitude), _micro_degrees(longitude), length_s
    )


def json_metadata(
    *,
    file_type: Union[str, int],
    timestamp_ms: int,
    duration: int = 0,
    framerate: int = 0,
    trigger: int = 0,
    latitude: float = 0.0,
    longitude: float = 0.0,
    driver_name: Optional[str] = None,
    version: int = 1,
) -> bytes:
    """The JSON text that firmware with protocol id >= 6 sends."""
    doc: dict[str, object] = {
        "version": version,
        "file": {
            "file_type": file_type,
            "file_timestamp": timestamp_ms,
            "duration": duration,
            "framerate": framerate,
        },
        "fm_trigger": {"type": trigger},
        "cam_trigger": {"type": trigger},
        "location": {"latitude": latitude, "longitude": longitude},
    }
    if driver_name is not None:
        doc["driver_name"] = driver_name
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")
