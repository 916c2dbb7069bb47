"""One session per camera across gateway instances: what a lease store does.

Several instances behind one address share a store; a camera's session lives
in one of them at a time. The instance serving a camera holds its lease and
renews it (camgateway.session.leasing); a new connection of the camera to
another instance asks the holder to let the camera go. Implemented on Redis by
:class:`camgateway.storage.redis_leases.RedisLeases`.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Interface

__all__ = ["ICameraLeases"]


class ICameraLeases(Interface):
    """Camera leases and takeover requests among the instances that share a store."""

    def acquire(imei: str, instance: str, ttl: float) -> Deferred:
        """Take the camera's lease for ``ttl`` seconds; fire True, or False while another instance holds it.

        An instance that holds the lease already extends it."""

    def renew(imei: str, instance: str, ttl: float) -> Deferred:
        """Extend the lease to ``ttl`` seconds from now if ``instance`` holds it still; fire whether it does."""

    def release(imei: str, instance: str) -> Deferred:
        """Give the lease up if ``instance`` holds it (otherwise nothing happens); fire None."""

    def holder(imei: str) -> Deferred:
        """Fire the name of the instance holding the camera's lease, or None."""

    def request_takeover(imei: str, holder: str) -> Deferred:
        """Ask ``holder`` to let the camera go: it sees the request once, in :meth:`takeovers`."""

    def takeovers(instance: str) -> Deferred:
        """Fire the IMEIs other instances asked ``instance`` to let go since the last call (each seen once)."""
