"""One session per camera across instances: the instance side of the leases.

With a shared store (``storage.resume: redis://...``) every session holds its
camera's lease (:class:`camgateway.redis_store.RedisLeases`), taken when the
camera's init arrives. A new connection from a camera whose lease another
live instance holds **takes over**: it asks the holder to let go, the holder
stops its session at a frame boundary (everything received so far is written
and checkpointed), releases the lease, and the new session goes on and
RESUMEs from what the old one persisted. If the holder does not let go within
``storage.lease_ttl`` plus a few seconds (it is unreachable but its lease has
not expired yet), the new connection is closed with a log line saying which
instance holds the camera; the camera retries and wins once the lease expires.

:class:`LeaseKeeper` runs once per instance: it renews the leases of the
local sessions every ``lease_ttl / 3`` and collects takeover requests twice a
second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer, task
from twisted.logger import Logger

if TYPE_CHECKING:
    from camgateway.services import Services

__all__ = ["LeaseKeeper", "instance_of"]

log = Logger(namespace="camgateway.leases")


def instance_of(token: Optional[str]) -> str:
    """The instance part of a session's lease token (``instance|session``)."""
    return (token or "").split("|", 1)[0]


class LeaseKeeper:
    """Renews local sessions' leases and answers takeover requests."""

    def __init__(self, services: "Services", takeover_poll: float = 0.5) -> None:
        self.s = services
        self._renew = task.LoopingCall(self.renew)
        self._renew.clock = services.clock
        self._poll = task.LoopingCall(self.collect)
        self._poll.clock = services.clock
        self.takeover_poll = takeover_poll

    def start(self) -> None:
        """Start renewing and collecting."""
        self._renew.start(self.s.config.lease_ttl / 3, now=False)
        self._poll.start(self.takeover_poll, now=False)

    def stop(self) -> None:
        """Stop the loops (sessions release their leases as they close)."""
        for loop in (self._renew, self._poll):
            if loop.running:
                loop.stop()

    @defer.inlineCallbacks
    def renew(self) -> Any:
        """Extend every local session's lease."""
        leases, ttl = self.s.leases, self.s.config.lease_ttl
        for imei, session in list(self.s.sessions.items()):
            token = getattr(session, "lease_token", None)
            if token is None or not session.leased:
                continue
            try:
                kept = yield leases.renew(imei, token, ttl)
            except Exception as e:
                log.warn("renewing the lease of camera {imei} failed: {error}", imei=imei, error=e)
                continue
            if not kept and self.s.sessions.get(imei) is session:
                session.stop("its lease was lost (another instance holds the camera now)")

    @defer.inlineCallbacks
    def collect(self) -> Any:
        """Stop the local sessions other instances asked for."""
        try:
            imeis = yield self.s.leases.takeovers(self.s.instance)
        except Exception as e:
            log.warn("reading takeover requests failed: {error}", error=e)
            return
        for imei in imeis:
            session = self.s.sessions.get(imei)
            if session is not None:
                session.stop("another gateway instance took the camera over")
