"""One session per camera across gateway instances: leases in Redis.

An instance that serves a camera holds its lease, ``P:lease:<imei>`` (a string
naming the instance, expiring after ``ttl`` unless renewed). A new connection
from a camera whose lease another live instance holds asks that instance to let
go (``request_takeover``: the IMEI goes into the set ``P:takeover:<holder>``);
the holder polls ``takeovers`` (which pops its set atomically, so each request
is seen once), closes its session and releases the lease, which the new
instance then acquires. A request nobody collects (its holder died) disappears
after ``request_ttl``. Every call runs on the :class:`RedisStore`'s thread, in
order with the store's own commands. Import it from
:mod:`camgateway.storage.redis`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, cast

from twisted.internet.defer import Deferred
from zope.interface import implementer

from camgateway.storage.leases import ICameraLeases

if TYPE_CHECKING:
    from camgateway.storage.redis import RedisStore

__all__ = ["RedisLeases"]

# KEYS: lease; ARGV: instance, ttl ms. Also true when the instance holds it already (and extends it).
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""

# KEYS: lease; ARGV: instance, ttl ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease; ARGV: instance
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: takeover set
_POP_ALL = """
local imeis = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return imeis
"""


def _ms(seconds: float) -> int:
    if seconds <= 0:
        raise ValueError("a lease's ttl must be positive")
    return max(1, int(round(seconds * 1000)))


@implementer(ICameraLeases)
class RedisLeases:
    """Camera leases and takeover requests, on a :class:`RedisStore`'s connection and thread."""

    def __init__(self, store: "RedisStore", request_ttl: float = 3600.0) -> None:
        self.store = store
        self.request_ttl = request_ttl
        client = store.client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._pop_all = client.register_script(_POP_ALL)

    def _lease(self, imei: str) -> str:
        return self.store.key("lease", imei)

    def acquire(self, imei: str, instance: str, ttl: float) -> "Deferred[bool]":
        """Take the camera's lease for ``ttl`` seconds: False while another instance holds it."""
        ms = _ms(ttl)
        d = self.store._run(lambda: self._acquire(keys=[self._lease(imei)], args=[instance, ms]))
        return d.addCallback(bool)

    def renew(self, imei: str, instance: str, ttl: float) -> "Deferred[bool]":
        """Extend the lease to ``ttl`` seconds from now, if ``instance`` holds it still."""
        ms = _ms(ttl)
        d = self.store._run(lambda: self._renew(keys=[self._lease(imei)], args=[instance, ms]))
        return d.addCallback(bool)

    def release(self, imei: str, instance: str) -> "Deferred[None]":
        """Give the lease up, if ``instance`` holds it (otherwise nothing happens)."""
        d = self.store._run(lambda: self._release(keys=[self._lease(imei)], args=[instance]))
        return d.addCallback(lambda _: None)

    def holder(self, imei: str) -> "Deferred[Optional[str]]":
        """The instance holding the camera's lease, or None."""
        return self.store._run(lambda: cast(Optional[str], self.store.client.get(self._lease(imei))))

    def request_takeover(self, imei: str, holder: str) -> "Deferred[None]":
        """Ask ``holder`` to let the camera go (it sees the request once, in :meth:`takeovers`)."""
        def ask() -> Any:
            key = self.store.key("takeover", holder)
            pipe = self.store.client.pipeline(transaction=True)
            pipe.sadd(key, imei)
            pipe.pexpire(key, int(self.request_ttl * 1000))
            return pipe.execute()

        return self.store._run(ask).addCallback(lambda _: None)

    def takeovers(self, instance: str) -> "Deferred[list[str]]":
        """The IMEIs other instances asked ``instance`` to let go since the last call (atomically popped)."""
        d = self.store._run(lambda: self._pop_all(keys=[self.store.key("takeover", instance)]))
        return d.addCallback(sorted)
