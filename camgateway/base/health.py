"""What keeps the gateway from recording files right now, for ``/healthz`` and ``/metrics``.

A part of the gateway that fails (the store cannot record a finished file,
the spool cannot be written) sets a problem under its name with the reason
in words; the next success of that part clears it. ``/healthz`` answers 503
``degraded`` with the reasons while any problem is set. A warning (a part
that works, but not as configured: instances whose spools are not shared)
makes ``/healthz`` say ``degraded`` with the reason and still answer 200, so
that a load balancer does not take every instance out for it.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["Health", "STORE", "SPOOL", "SHARED_SPOOL"]

#: The problem names.
STORE = "store"
SPOOL = "spool"
#: A warning's name: instances sharing a store do not share their spool.
SHARED_SPOOL = "shared_spool"


class Health:
    """The gateway's current problems, by part: ``{"store": "why"}``."""

    def __init__(self) -> None:
        self._problems: dict[str, str] = {}
        self._warnings: dict[str, str] = {}

    def failing(self, part: str, reason: str) -> None:
        """``part`` cannot do its work; ``reason`` says why, in words."""
        self._problems[part] = reason

    def working(self, part: str) -> None:
        """``part`` did its work again."""
        self._problems.pop(part, None)

    def problem(self, part: str) -> Optional[str]:
        """The reason ``part`` is failing, or None."""
        return self._problems.get(part)

    @property
    def ok(self) -> bool:
        """No part is failing."""
        return not self._problems

    def problems(self) -> dict[str, str]:
        """A copy of the problems, by part."""
        return dict(self._problems)

    def warn(self, part: str, reason: str) -> None:
        """``part`` works, but not as it should (``/healthz`` says so and still answers 200)."""
        self._warnings[part] = reason

    def warning_over(self, part: str) -> None:
        """``part``'s warning no longer holds."""
        self._warnings.pop(part, None)

    def warnings(self) -> dict[str, str]:
        """A copy of the warnings, by part."""
        return dict(self._warnings)
