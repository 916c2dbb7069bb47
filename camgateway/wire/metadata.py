"""Decoding of the 0x000B metadata frame (PROTOCOL.md section 6).

A camera may send one metadata frame before a file. Its layout depends on the
camera: DualCam/DashCam send a versioned big-endian binary record (v1..v4),
DSM and ADAS fixed-size binary records, and cameras with protocol_id >= 6 a
JSON object. :func:`decode_metadata` turns any of them into a JSON-serialisable
dict and never raises: whatever it cannot parse is kept as hex under
``layout == "raw"`` so that a strange frame never fails a transfer.
"""

from __future__ import annotations

import datetime
import json
import math
import struct

from camgateway.wire.codec import DUALCAM_SOURCE_BITS

__all__ = ["decode_metadata", "capture_time", "DUALCAM_LAYOUTS", "DUALCAM_FILE_TYPES", "DSM_LAYOUT", "ADAS_LAYOUT"]

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

#: DualCam/DashCam binary metadata by version (the first byte); each version appends fields.
DUALCAM_LAYOUTS: dict[int, struct.Struct] = {
    1: struct.Struct(">BBQBH"),  # version, file_type, ts ms, trigger, length s
    2: struct.Struct(">BBQBHB"),  # + framerate
    3: struct.Struct(">BBQBHBhdd"),  # + timezone min, latitude, longitude
    4: struct.Struct(">BBQBHBhddQ"),  # + trigger timestamp ms
}
#: The DualCam metadata's file_type of each source: its settings bit, shifted down (bits 26-29 as 4..32).
DUALCAM_FILE_TYPES: dict[str, int] = {source: bit >> 24 for source, bit in DUALCAM_SOURCE_BITS.items()}
_DUALCAM_FILE_TYPE_NAMES = {file_type: source for source, file_type in DUALCAM_FILE_TYPES.items()}
_DUALCAM_TRIGGERS = (
    "server request", "DIN1", "DIN2", "crash", "towing", "idling", "geofence",
    "unplug", "green driving", "periodic", "DIN3", "DIN4",
)

#: DSM binary metadata (26 bytes).
DSM_LAYOUT = struct.Struct(">IBBiiH10s")
#: ADAS binary metadata (15 bytes).
ADAS_LAYOUT = struct.Struct(">IBBiiB")
_DSM_FILE_TYPES = ("video", "snapshot", "current snapshot", "retransmitted snapshot")
_DSM_TRIGGERS = (
    "none", "DIN1", "DIN2", "DIN3", "DIN4", "crash", "towing", "idling",
    "geofence", "unplug", "green driving", "server request", "periodic",
    "DSM event", "file retransmit",
)
# ADAS uses the DSM triggers 0..10, except that 0 means "server request".
_ADAS_TRIGGERS = ("server request",) + _DSM_TRIGGERS[1:11]
_DSM_EVENTS = (
    "drowsiness", "distraction", "yawning", "phone", "smoking",
    "driver absence", "mask", "seat belt", "g-sensor",
)


class _Unparseable(Exception):
    """Internal: the payload does not fit the chosen layout."""


def _name(table: tuple[str, ...] | dict[int, str], value: int) -> str | None:
    if isinstance(table, dict):
        return table.get(value)
    return table[value] if 0 <= value < len(table) else None


def _iso(ms: int) -> str:
    """ISO 8601 UTC with "Z"; milliseconds only when non-zero. May raise."""
    when = _EPOCH + datetime.timedelta(milliseconds=ms)
    spec = "milliseconds" if ms % 1000 else "seconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")


def _put_time(out: dict[str, object], key: str, ms: int, raw: object) -> None:
    """Store ``out[key]`` as ISO, or None plus ``<key>_raw`` when out of range."""
    try:
        out[key] = _iso(ms)
    except (OverflowError, ValueError, OSError):
        out[key] = None
        out[key + "_raw"] = raw


def _coord(value: object) -> float | None:
    """A finite float, or None (JSON cannot carry NaN or infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _decode_dualcam(payload: bytes) -> dict[str, object]:
    if not payload:
        raise _Unparseable("empty payload")
    version = payload[0]
    layout = DUALCAM_LAYOUTS.get(version)
    if layout is None:
        raise _Unparseable(f"unknown dualcam version {version}")
    if len(payload) < layout.size:
        raise _Unparseable(
            f"dualcam v{version} needs {layout.size} bytes, got {len(payload)}")
    fields = layout.unpack_from(payload)
    out: dict[str, object] = {
        "layout": f"dualcam-v{version}",
        "version": version,
        "file_type": fields[1],
        "file_type_name": _name(_DUALCAM_FILE_TYPE_NAMES, fields[1]),
    }
    _put_time(out, "timestamp", fields[2], fields[2])
    out["trigger"] = fields[3]
    out["trigger_name"] = _name(_DUALCAM_TRIGGERS, fields[3])
    out["length_s"] = fields[4]
    if version >= 2:
        out["framerate"] = fields[5]
    if version >= 3:
        out["timezone_minutes"] = fields[6]
        out["latitude"] = _coord(fields[7])
        out["longitude"] = _coord(fields[8])
    if version >= 4:
        _put_time(out, "trigger_timestamp", fields[9], fields[9])
    if len(payload) > layout.size:
        out["extra"] = payload[layout.size:].hex()
    return out


def _decode_common(payload: bytes, layout: struct.Struct, name: str,
                   triggers: tuple[str, ...]) -> tuple[dict[str, object], tuple]:
    """The fields DSM and ADAS share: timestamp, file type, trigger, position."""
    if len(payload) < layout.size:
        raise _Unparseable(f"{name} needs {layout.size} bytes, got {len(payload)}")
    fields = layout.unpack_from(payload)
    out: dict[str, object] = {"layout": name}
    _put_time(out, "timestamp", fields[0] * 1000, fields[0])
    out["file_type"] = fields[1]
    out["file_type_name"] = _name(_DSM_FILE_TYPES, fields[1])
    out["trigger"] = fields[2]
    out["trigger_name"] = _name(triggers, fields[2])
    out["latitude"] = fields[3] / 1e6
    out["longitude"] = fields[4] / 1e6
    return out, fields


def _decode_dsm(payload: bytes) -> dict[str, object]:
    out, fields = _decode_common(payload, DSM_LAYOUT, "dsm", _DSM_TRIGGERS)
    events = fields[5]
    out["events"] = events
    out["event_names"] = [n for bit, n in enumerate(_DSM_EVENTS) if events >> bit & 1]
    name = fields[6].strip(b"\x00")[::-1].decode("utf-8", errors="replace").strip()
    out["driver_name"] = name or None
    if len(payload) > DSM_LAYOUT.size:
        out["extra"] = payload[DSM_LAYOUT.size:].hex()
    return out


def _decode_adas(payload: bytes) -> dict[str, object]:
    out, fields = _decode_common(payload, ADAS_LAYOUT, "adas", _ADAS_TRIGGERS)
    out["length_s"] = fields[5]
    if len(payload) > ADAS_LAYOUT.size:
        out["extra"] = payload[ADAS_LAYOUT.size:].hex()
    return out


def _finite_or_none(text: str) -> float | None:
    number = float(text)
    return number if math.isfinite(number) else None


def _lookup(obj: object, *keys: str) -> object:
    """``obj[k1][k2]...``, or None when any level is missing or not an object."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _decode_json(text: bytes) -> dict[str, object]:
    try:
        fields = json.loads(
            text.decode("utf-8"),
            parse_float=_finite_or_none,  # 1e400 would otherwise be inf
            parse_constant=lambda _name: None,  # NaN, Infinity, -Infinity
        )
    except Exception as e:  # ValueError, RecursionError, huge ints...
        raise _Unparseable(f"invalid JSON: {type(e).__name__}") from None
    if not isinstance(fields, dict):
        raise _Unparseable("JSON is not an object")
    out: dict[str, object] = {"layout": "json", "fields": fields}
    stamp = _lookup(fields, "file", "file_timestamp")
    if isinstance(stamp, str):
        out["timestamp"] = stamp
    elif isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        # Seconds or milliseconds, told apart by size (1e11 s is year 5138).
        ms = round(stamp * 1000) if abs(stamp) < 1e11 else round(stamp)
        _put_time(out, "timestamp", ms, stamp)
    for key, path in (("file_type", ("file", "file_type")),
                      ("length_s", ("file", "duration")),
                      ("framerate", ("file", "framerate")),
                      ("driver_name", ("driver_name",))):
        value = _lookup(fields, *path)
        if value is not None:
            out[key] = value
    trigger = _lookup(fields, "fm_trigger", "type")
    if trigger is None:
        trigger = _lookup(fields, "cam_trigger", "type")
    if trigger is not None:
        out["trigger_name"] = trigger
    for key in ("latitude", "longitude"):
        value = _lookup(fields, "location", key)
        if value is not None:
            out[key] = _coord(value)
    return out


def _guess(payload: bytes) -> dict[str, object]:
    """Layout for camera "unknown": exact sizes only."""
    if payload and payload[0] in DUALCAM_LAYOUTS and len(payload) == DUALCAM_LAYOUTS[payload[0]].size:
        return _decode_dualcam(payload)
    if len(payload) == DSM_LAYOUT.size:
        return _decode_dsm(payload)
    if len(payload) == ADAS_LAYOUT.size:
        return _decode_adas(payload)
    raise _Unparseable(f"unrecognised layout ({len(payload)} bytes)")


def decode_metadata(payload: bytes, camera: str) -> dict[str, object]:
    """Decode a 0x000B payload. Never raises.

    ``camera`` is which camera the gateway believes sent it: ``"dualcam"``,
    ``"dsm"``, ``"adas"``, ``"json"`` or ``"unknown"`` (anything else counts
    as ``"unknown"``, whose layout is guessed from the payload's size). A
    payload starting with ``{`` is decoded as JSON whatever ``camera`` says.

    The result is JSON-serialisable and always has a ``"layout"`` key
    (``"dualcam-v1"``..``"dualcam-v4"``, ``"dsm"``, ``"adas"``, ``"json"`` or
    ``"raw"``); a payload that does not parse gives
    ``{"layout": "raw", "raw": <hex>, "error": <reason>}``.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        return {"layout": "raw", "raw": "",
                "error": f"payload is {type(payload).__name__}, not bytes"}
    try:
        payload = bytes(payload)
    except Exception as e:  # e.g. a non-contiguous memoryview
        return {"layout": "raw", "raw": "", "error": f"unreadable payload: {e}"}
    try:
        text = payload.rstrip(b"\x00 \t\r\n")
        kind = camera.lower() if isinstance(camera, str) else "unknown"
        if text.startswith(b"{"):
            return _decode_json(text)
        if kind == "dualcam":
            return _decode_dualcam(payload)
        if kind == "dsm":
            return _decode_dsm(payload)
        if kind == "adas":
            return _decode_adas(payload)
        if kind == "json":
            raise _Unparseable("not JSON")
        return _guess(payload)
    except _Unparseable as e:
        return {"layout": "raw", "raw": payload.hex(), "error": str(e)}
    except Exception as e:  # a bug here must not fail a transfer
        return {"layout": "raw", "raw": payload.hex(),
                "error": f"decoder error: {type(e).__name__}: {e}"}


def capture_time(decoded: dict[str, object]) -> datetime.datetime | None:
    """The file's capture time (UTC, tz-aware) from a decoded dict, or None.

    None when there is no usable ``timestamp`` or when it is the epoch itself
    (a camera without a clock sends 0). A naive ISO string (possible from a
    JSON camera) is taken as UTC.
    """
    stamp = decoded.get("timestamp") if isinstance(decoded, dict) else None
    if not isinstance(stamp, str):
        return None
    text = stamp.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"  # fromisoformat accepts "Z" only from 3.11
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    try:
        when = when.astimezone(datetime.timezone.utc)
    except (OverflowError, ValueError):
        return None
    return None if when == _EPOCH else when
