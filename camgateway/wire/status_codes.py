"""What the device's STATUS codes mean (PROTOCOL.md section 7)."""

from __future__ import annotations

__all__ = ["STATUS_MEANINGS", "status_meaning", "INVALID_RESUME", "FILE_NOT_AVAILABLE"]

#: STATUS 6: what a real DualCam sent right after START when it gave a file up.
INVALID_RESUME = 6
#: STATUS 17 (0x11): the file is not available, or the camera is not configured for it.
FILE_NOT_AVAILABLE = 17

STATUS_MEANINGS: dict[int, str] = {
    0: "success",
    1: "reconnect limit reached",
    2: "failed to close GPRS",
    3: "failed to close socket",
    4: "device aborted",
    5: "invalid response to init",
    INVALID_RESUME: "invalid response to resume",
    7: "SD card: file create failed",
    8: "SD card: file open failed",
    9: "SD card: file write failed",
    10: "SD card: file flush failed",
    11: "undefined event",
    13: "file CRC recalculation failed",
    FILE_NOT_AVAILABLE: "file not available / camera not configured",
}


def status_meaning(code: int) -> str:
    """A readable meaning for a device STATUS code."""
    if code in STATUS_MEANINGS:
        return STATUS_MEANINGS[code]
    if code <= 26:
        return "device error (undocumented code)"
    return "unknown status"
