"""What the running gateway is doing, read at a glance: sessions and transfers in progress.

These are read-only views over :class:`~camgateway.runtime.context.Services`, built
when asked (a status request, a metrics scrape, a progress tick), never per
frame. :class:`ProgressReporter` logs one ``transfer_progress`` event per
active transfer per ``log.progress_interval``, spread over the interval.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional

from camgateway.base.units import iso
from camgateway.wire.codec import ANY_DUALCAM_BITS, uses_path_flow

from twisted.logger import Logger

__all__ = ["camera_kind", "session_view", "transfer_view", "active_transfers", "iso", "ProgressReporter"]

log = Logger(namespace="camgateway.web.progress")

#: The kind of camera each live session last offered a file of (a session
#: between two files has no offer).
_KINDS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()

#: Upper bounds (seconds) of the transfer-duration histogram's buckets; one more bucket counts the longer ones.
DURATION_BOUNDS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def camera_kind(session: Any) -> str:
    """``dualcam``, ``dashcam``, ``dsm``, ``adas`` or ``unknown`` for a live session."""
    offer = getattr(session, "offer", None)
    if offer is not None and offer.camera != "unknown":
        _KINDS[session] = offer.camera
        return offer.camera
    known = _KINDS.get(session)
    if known:
        return known
    settings = getattr(session, "settings", 0)
    if settings & ANY_DUALCAM_BITS and not uses_path_flow(getattr(session, "protocol_id", 0), settings):
        return "dualcam"
    return "unknown"


def session_view(session: Any, now: float) -> dict[str, Any]:
    """One live camera session, JSON-ready."""
    offer = session.offer
    return {
        "imei": session.imei,
        "peer": session.link.peer,
        "camera": camera_kind(session),
        "protocol_id": session.protocol_id,
        "state": session.state.value,
        "connected_at": iso(session.connected_at),
        "connected_s": round(now - session.connected_at, 3),
        "files_done": session.files_done,
        "file": offer.printable if offer is not None else None,
        "transferring": session.transfer is not None,
    }


def transfer_view(session: Any, now: float) -> Optional[dict[str, Any]]:
    """The transfer a session is receiving, JSON-ready; None between files."""
    transfer, offer = session.transfer, session.offer
    if transfer is None or offer is None:
        return None
    started = session.file_started_at if session.file_started_at is not None else now
    elapsed = max(0.0, now - started)
    total = max(transfer.limit, 1)
    fresh = transfer.held - transfer.resumed_from
    return {
        "imei": session.imei,
        "peer": session.link.peer,
        "file": offer.printable,
        "camera": offer.camera,
        "source": offer.source,
        "media": offer.media,
        "state": session.state.value,
        "held": transfer.held,
        "total": transfer.limit,
        "percent": round(min(100.0, 100.0 * transfer.held / total), 1),
        "resumed_from": transfer.resumed_from,
        "crc_errors": transfer.crc_errors,
        "started_at": iso(started),
        "elapsed_s": round(elapsed, 3),
        "rate_bps": round(fresh / elapsed) if elapsed > 0 else 0,
    }


def active_transfers(services: Any) -> list[dict[str, Any]]:
    """Every transfer in progress, oldest first."""
    now = services.clock.seconds()
    views = [transfer_view(session, now) for session in list(services.sessions.values())]
    return sorted((v for v in views if v is not None), key=lambda v: v["started_at"] or "")


#: Progress events logged in one reactor turn; the rest of a tick's follow in
#: the next turns. 9,850 slow cameras on two workers were 4,925 events a worker
#: in one turn, a 0.22-0.26 s stall of every camera of that worker every
#: ``log.progress_interval``; 256 are about 13 ms.
PROGRESS_BATCH = 256
#: The share of ``log.progress_interval`` over which a tick's events are spread.
PROGRESS_SPREAD = 0.8
#: Seconds between two slices of a spread tick, at most (more events, larger slices).
PROGRESS_STEP = 0.1
#: A tick with at most this many transfers logs them all at once; a spread one's slices are no smaller.
PROGRESS_SMALL = 16


class ProgressReporter:
    """Logs where each long transfer is: one event per active transfer per call.

    Called by a TimerService every ``log.progress_interval`` seconds; the rate
    is over the last interval (since the transfer began, the first time).
    A tick's events are logged at most ``batch`` to a reactor turn, so that
    thousands of transfers never hold the reactor for long. With ``spread``
    (seconds, under the interval) they are also spread evenly over that
    time, a slice every :data:`PROGRESS_STEP` or so: 9,850 transfers logged
    as fast as the turns allow took both cores of a 2-core machine for
    0.4 s every 30 s (about 15 µs an event), which took that much from every
    camera streaming at the time; spread, they cost under 1 % of a core at any moment.
    """

    def __init__(self, services_getter: Any, batch: int = PROGRESS_BATCH, spread: float = 0.0) -> None:
        self._services = services_getter
        self._batch = batch
        self._spread = spread
        self._last: "weakref.WeakKeyDictionary[Any, tuple[Any, int, float]]" = weakref.WeakKeyDictionary()
        self._busy = False  # a tick's events are still being logged

    def __call__(self) -> None:
        services = self._services()
        if services is None or self._busy:
            return
        sessions = [s for s in services.sessions.values() if s.transfer is not None]
        size, gap = self.slicing(len(sessions))
        self._busy = True
        self._next(services, sessions, 0, size, gap)

    def slicing(self, n: int) -> tuple[int, float]:
        """``(events a slice, seconds between slices)`` for a tick of ``n`` transfers."""
        if self._spread <= 0 or n <= PROGRESS_SMALL:
            return self._batch, 0.0
        size = min(self._batch, max(PROGRESS_SMALL, math.ceil(n * PROGRESS_STEP / self._spread)))
        return size, self._spread * size / n

    def _next(self, services: Any, sessions: list[Any], start: int, size: int, gap: float) -> None:
        """Log the events of ``sessions[start:start + size]``, then schedule the rest ``gap`` s later."""
        end = start + size
        try:
            self._report(services, sessions[start:end])
        except Exception:  # one bad tick must not stop the timer
            log.failure("progress report failed")
            end = len(sessions)
        if end < len(sessions):
            services.clock.callLater(gap, self._next, services, sessions, end, size, gap)
        else:
            self._busy = False

    def _report(self, services: Any, sessions: list[Any]) -> None:
        now = services.clock.seconds()
        for session in sessions:
            transfer = session.transfer
            if transfer is None or session.offer is None or not session.connected:  # (gone since the tick)
                continue
            previous = self._last.get(session)
            if previous is not None and previous[0] is transfer:
                _, held_before, since = previous
            else:
                held_before = transfer.resumed_from
                since = session.file_started_at if session.file_started_at is not None else now
            rate = (transfer.held - held_before) / (now - since) if now > since else 0.0
            self._last[session] = (transfer, transfer.held, now)
            total = max(transfer.limit, 1)
            log.info("transfer progress: camera {imei} {file} {held} of {total} bytes ({percent:.0f} %),"
                     " {rate:.0f} B/s", event="transfer_progress", imei=session.imei, file=session.offer.printable,
                     held=transfer.held, total=transfer.limit, percent=min(100.0, 100.0 * transfer.held / total),
                     rate=round(rate), peer=session.link.peer, camera=session.offer.camera)
