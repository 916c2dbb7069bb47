"""Configuration errors, and the units values are written in: sizes, durations and times."""

from __future__ import annotations

import datetime
import math
import re
from typing import Any, Iterable, Mapping, Optional

__all__ = ["ConfigError", "parse_size", "parse_duration", "size_text", "duration_text", "iso"]


class ConfigError(ValueError):
    """A configuration value is wrong; ``key`` is its dotted path.

    Validation raises one ConfigError for everything it found: ``errors``
    holds each error (a ConfigError naming its own key), in the order of the
    file's sections; ``key`` and ``message`` are the first one's. A single
    error's ``errors`` is itself, and its text is ``key: message``.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
        self.errors: tuple[ConfigError, ...] = (self,)

    @classmethod
    def several(cls, errors: Iterable["ConfigError"]) -> "ConfigError":
        """One error carrying all of ``errors`` (that error itself when there is one).

        Its text is one line per error, after a count: ``2 errors:\\n  listen[0]: ...``.
        """
        flat = [each for error in errors for each in error.errors]
        if len(flat) == 1:
            return flat[0]
        combined = cls(flat[0].key, flat[0].message)
        combined.errors = tuple(flat)
        combined.args = (f"{len(flat)} errors:\n" + "\n".join(f"  {error}" for error in flat),)
        return combined


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}
_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _number_with_unit(value: object, units: Mapping[str, float], key: str, what: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, f"must be {what}, not a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in units:
            raise ConfigError(key, f"must be {what}, got {value!r}")
        number = float(match.group(1)) * units[match.group(2).lower()]
    else:
        raise ConfigError(key, f"must be {what}, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ConfigError(key, f"must be {what}, got {value!r}")
    if number <= 0:
        raise ConfigError(key, f"must be positive, got {value!r}")
    return number


def parse_size(value: object, key: str = "size") -> int:
    """``1048576``, ``"200MB"``, ``"1GiB"`` -> bytes."""
    size = int(_number_with_unit(value, _UNITS, key, "a size such as 200MB"))
    if size <= 0:
        raise ConfigError(key, f"must be at least 1 byte, got {value!r}")
    return size


def parse_duration(value: object, key: str = "duration") -> float:
    """``120``, ``"10s"``, ``"7d"`` -> seconds."""
    return _number_with_unit(value, _SECONDS, key, "a duration such as 30s, 2h or 7d")


def iso(seconds: Optional[float]) -> Optional[str]:
    """``seconds`` since the epoch as ISO 8601 UTC with milliseconds (None stays None)."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration_text(seconds: float) -> Any:
    """A duration as the file may write it: ``7d``, ``2h``, ``30s`` (a fraction stays a number)."""
    if seconds != int(seconds):
        return seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds) // size}{unit}"
    return f"{int(seconds)}s"


def size_text(size: int) -> Any:
    """A size as the file may write it: ``4MiB``, ``200MB``, or a number of bytes."""
    for unit in ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB"):
        if size and size % _UNITS[unit.lower()] == 0:
            return f"{size // _UNITS[unit.lower()]}{unit}"
    return size
