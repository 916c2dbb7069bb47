"""One session per camera across instances: the instance side of the leases.

With a shared store (``storage.resume: redis://...``) every session holds its
camera's lease (:class:`camgateway.storage.redis.RedisLeases`), taken when the
camera's init arrives. A new connection from a camera whose lease another
live instance holds **takes over**: it asks the holder to let go, the holder
stops its session at a frame boundary (everything received so far is written
and checkpointed), releases the lease, and the new session goes on and
RESUMEs from what the old one persisted. The new session logs at once which
instance holds the camera and that it waits up to ``storage.lease_ttl`` for
it: a holder that is down (or cannot be reached) never lets go, and its
lease expires at most ``lease_ttl`` after its last renewal, when the new
session takes it and goes on. Only a holder that keeps renewing and never
lets go is still there ``lease_ttl`` plus 5 seconds later: the new connection
is then closed with a log line naming it, and the camera retries.

:class:`LeaseKeeper` runs once per instance: it renews the leases of the
local sessions every ``lease_ttl / 3`` and collects takeover requests twice a
second. A renewal or poll that fails is logged, and the loops go on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from camgateway.runtime.context import Services

__all__ = ["LeaseKeeper", "instance_of"]

log = Logger(namespace="camgateway.session.leasing")


def instance_of(token: Optional[str]) -> str:
    """The instance part of a session's lease token (``instance|session``)."""
    return (token or "").split("|", 1)[0]


def _logged(what: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` for a LoopingCall, its errors logged as ``what`` failing instead of stopping the loop.

    A LoopingCall stops for good when its function raises or returns a
    Deferred that fails (an ``inlineCallbacks`` function's error is such a
    Deferred).
    """
    def tick() -> Any:
        return defer.maybeDeferred(fn).addErrback(
            lambda f: log.failure("{what} failed; it runs again at its next tick", f, what=what))

    return tick


class LeaseKeeper:
    """Renews local sessions' leases and answers takeover requests.

    Both loops outlive their errors: each renewal and each takeover is
    guarded (a store error or a session that raises is logged with the
    camera, and the others go on), and a tick that fails as a whole is
    logged and runs again at the next.
    """

    def __init__(self, services: "Services", takeover_poll: float = 0.5) -> None:
        self.s = services
        self._renew = task.LoopingCall(_logged("renewing the leases", self.renew))
        self._renew.clock = services.clock
        self._poll = task.LoopingCall(_logged("collecting takeover requests", self.collect))
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

    @property
    def running(self) -> bool:
        """Both loops run (neither was stopped by an error)."""
        return self._renew.running and self._poll.running

    @defer.inlineCallbacks
    def renew(self) -> Any:
        """Extend every local session's lease; stop the sessions whose lease is gone."""
        leases, ttl = self.s.leases, self.s.config.lease_ttl
        failed, first = 0, None
        for imei, session in list(self.s.sessions.items()):
            token = getattr(session, "lease_token", None)
            if token is None or not session.leased:
                continue
            try:
                kept = yield leases.renew(imei, token, ttl)
                if not kept and self.s.sessions.get(imei) is session:
                    yield self._lost(imei, session)
            except Exception:
                failed += 1
                if first is None:
                    first = (imei, Failure())
        if first is not None:
            # One line a tick, not one a camera: a store that is down fails them all.
            imei, failure = first
            log.failure("renewing the lease of camera {imei} failed ({failed} of this round failed; each is"
                        " tried again in {period:g} s, and its session goes on meanwhile)", failure,
                        imei=imei, failed=failed, period=ttl / 3)

    @defer.inlineCallbacks
    def _lost(self, imei: str, session: Any) -> Any:
        """A renewal found ``session``'s lease gone: say who holds it now, stop the session.

        The lease cannot have been taken from under a live renewal: another
        instance only takes a lease that expired (or that the store lost), or
        one its holder released. So it lapsed; the holder tells what followed.
        """
        how = f"lapsed (not renewed within storage.lease_ttl, {self.s.config.lease_ttl:g} s, or lost by the store)"
        try:
            holder = yield self.s.leases.holder(imei)
        except Exception as e:
            how += f"; the store could not say who holds it now ({e})"
        else:
            owner = instance_of(holder)
            if not holder:
                how += "; no instance holds it now"
            elif owner == self.s.instance:
                how += f"; another session of this instance holds it now ({holder})"
            else:
                how += f"; instance {owner} holds it now"
        log.warn("the lease of camera {imei} {how}: closing its session here", imei=imei, how=how)
        current = self.s.sessions.get(imei)
        if current is not None and current is session:
            current.stop("its lease lapsed")

    @defer.inlineCallbacks
    def collect(self) -> Any:
        """Stop the local sessions other instances asked for."""
        try:
            imeis = yield self.s.leases.takeovers(self.s.instance)
        except Exception as e:  # (the store: a warning, not a traceback twice a second while it is down)
            log.warn("reading takeover requests failed: {error}; read again in {t:g} s", error=e,
                     t=self.takeover_poll)
            return
        for imei in imeis:
            session = self.s.sessions.get(imei)
            if session is None:
                continue
            try:
                session.stop("another gateway instance took the camera over")
            except Exception:
                log.failure("stopping the session of camera {imei} for a takeover failed", imei=imei)
