"""What sessions see of cameras (connected, gone, an error), written to the history a few at a time.

A session tells :class:`CameraSightings` when its camera connects, when it
goes and what went wrong; none of that is on the DATA path. Each camera's
news is written to the store (:meth:`IHistoryStore.note_camera`) at once
when nothing was written for it in the last :data:`QUIET` seconds, else
kept and written together when that time is over: at most one store write
per camera per :data:`QUIET` seconds, however often it reconnects or fails.
A camera that goes is written at once (its last-seen time is then right).
The files a camera sends count for it in the store itself, in the same step
that records them (:class:`~camgateway.storage.records.CameraRecord`).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger

from camgateway.storage.records import CameraSighting, IHistoryStore

__all__ = ["CameraSightings", "QUIET"]

log = Logger(namespace="camgateway.storage.sightings")

#: Seconds after a camera's write during which its news is kept for the next one.
QUIET = 5.0


class CameraSightings:
    """Coalesces the cameras' news into store writes (see the module)."""

    def __init__(self, store: Any, clock: Any, quiet: float = QUIET) -> None:
        self.store = store
        self.clock = clock
        self.quiet = quiet
        #: News not written yet, by IMEI.
        self._pending: dict[str, CameraSighting] = {}
        #: The cameras written less than ``quiet`` ago: the call that ends their quiet time.
        self._quiet: dict[str, Any] = {}
        self._writes: set[defer.Deferred] = set()
        self._closed = False
        self._enabled = IHistoryStore.providedBy(store)

    def connected(self, imei: str, peer: str) -> None:
        """A session of camera ``imei`` began, from ``peer``."""
        self._note(imei, peer=peer)

    def error(self, imei: str, why: str) -> None:
        """Something went wrong with camera ``imei`` (its session, one of its files)."""
        self._note(imei, error=why)

    def gone(self, imei: str) -> None:
        """The session of camera ``imei`` ended: its news is written now."""
        if self._note(imei):
            self._write(imei)

    def _note(self, imei: str, peer: Optional[str] = None, error: Optional[str] = None) -> bool:
        if not imei or not self._enabled or self._closed:
            return False
        now = self.clock.seconds()
        news = self._pending.get(imei)
        if news is None:
            news = self._pending[imei] = CameraSighting(imei, now)
        news.at = now
        if peer is not None:
            news.peer = peer
        if error is not None:
            news.error, news.error_at = error, now
        if imei not in self._quiet:
            self._write(imei)
        return True

    def _write(self, imei: str) -> None:
        """Write the camera's news, if any; its quiet time begins (or ends, with nothing new)."""
        call = self._quiet.pop(imei, None)
        if call is not None and call.active():
            call.cancel()
        news = self._pending.pop(imei, None)
        if news is None or self._closed:
            return
        self._quiet[imei] = self.clock.callLater(self.quiet, self._write, imei)
        d = defer.maybeDeferred(self.store.note_camera, news)
        self._writes.add(d)
        d.addErrback(lambda f: log.warn("could not record camera {imei} in the history: {why}", imei=imei,
                                        why=f.getErrorMessage()))
        d.addBoth(lambda _: self._writes.discard(d))

    def close(self) -> defer.Deferred:
        """Write what is pending and stop; fires once every write is over (before the store closes)."""
        for imei in list(self._pending):
            self._write(imei)
        self._closed = True
        for call in self._quiet.values():
            if call.active():
                call.cancel()
        self._quiet.clear()
        return defer.DeferredList(list(self._writes), consumeErrors=True)
