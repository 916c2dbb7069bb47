"""What the device's STATUS codes mean (PROTOCOL.md section 7)."""

from __future__ import annotations

__all__ = ["STATUS_MEANINGS", "status_meaning"]

STATUS_MEANINGS: dict[int, str] = {
    0: "success",
    1: "reconnect limit reached",
    2: "failed to close GPRS",
    3: "failed to close socket",
    4: "device aborted",
    5: "invalid response to init",
    6: "invalid response to resume",
    7: "SD card: file create failed",
    8: "SD card: file open failed",
    9: "SD card: file write failed",
    10: "SD card: file flush failed",
    11: "undefined event",
    13: "file CRC recalculation failed",
    17: "file not available / camera not configured",
}


def status_meaning(code: int) -> str:
    """A readable meaning for a device STATUS code."""
    if code in STATUS_MEANINGS:
        return STATUS_MEANINGS[code]
    if code <= 26:
        return "device error (undocumented code)"
    return "unknown status"
