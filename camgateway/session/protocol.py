"""The Protocol/Factory pair: one thin Protocol per camera connection.

The Protocol only moves bytes: it feeds the :class:`~camgateway.wire.codec.FrameDecoder`,
which calls the :class:`~camgateway.session.machine.Session`, and it carries the
session's replies back. It also owns the idle timeout and turns any error into
a logged, closed connection, never an exception out of the reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from camgateway.wire.codec import FrameDecoder, ProtocolError
from camgateway.session.machine import Session
from camgateway.perf.sockets import read_size, set_read_mark, widen_reads

if TYPE_CHECKING:
    from camgateway.runtime.context import Services

__all__ = ["CameraProtocol", "CameraFactory"]

log = Logger(namespace="camgateway.session.protocol")


class CameraProtocol(Protocol, TimeoutMixin):
    """One camera connection."""

    session: Optional[Session] = None
    decoder: Optional[FrameDecoder] = None
    _peer: Optional[str] = None
    #: A read of this many bytes means more was waiting: read more at a time (0: never).
    _full_read = 0
    #: Whether the socket's receive low-water mark may be set (``performance.read_marks``).
    _read_marks = False

    def __init__(self, services: Services, factory: Optional["CameraFactory"] = None) -> None:
        self.services = services
        self.owner = factory
        self.callLater = services.clock.callLater  # type: ignore[method-assign]  # TimeoutMixin's clock: the injected one

    def connectionMade(self) -> None:
        if self.owner is not None:
            self.owner.protocols.add(self)
        self.services.stats.connections += 1
        self.setTimeout(self.services.config.idle_timeout)
        self.session = Session(self.services, self)
        self.decoder = self.session.decoder = FrameDecoder(self.session)
        performance = self.services.config.performance  # (decided once per connection, never per read)
        self._full_read = read_size(self.transport) if performance.wide_reads else 0
        self._read_marks = performance.read_marks

    @property
    def peer(self) -> str:
        """The camera's address, "host:port" (behind HAProxy, the one its PROXY header gives)."""
        if self._peer is None and self.transport is not None:
            address = self.transport.getPeer()
            text = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
            if self.decoder is None or self.session is None or not self.session.inits:
                return text  # a PROXY header may still change it: do not keep it yet
            self._peer = text
        return self._peer or "?"

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if len(data) == self._full_read:  # the camera streams faster than the reads: wider ones
            widen_reads(self.transport)
            self._full_read = 0
        try:
            self.decoder.feed(data)  # type: ignore[union-attr]
        except ProtocolError as e:
            self.session.protocol_error(e)  # type: ignore[union-attr]
        except Exception:
            self.session.internal_error(Failure())  # type: ignore[union-attr]

    def timeoutConnection(self) -> None:
        self.session.idle_timeout()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        if self.owner is not None:
            self.owner.protocols.discard(self)
        if self.session is not None:
            self.session.connection_lost()

    # -- the Link the session talks to

    def send(self, data: bytes) -> None:
        """Write to the camera, at the end of this reactor turn with the others (:class:`camgateway.perf.sockets.TurnWriter`)."""
        self.services.writer.write(self.transport, data)

    def set_read_mark(self, nbytes: int) -> bool:
        """Be reported readable once ``nbytes`` wait (plain TCP only: :func:`camgateway.perf.sockets.set_read_mark`).

        False, and the session never asks again, with ``performance.read_marks`` off.
        """
        return self._read_marks and set_read_mark(self.transport, nbytes)

    def close(self) -> None:
        """Close after what was written is sent."""
        self.services.writer.flush()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        """Drop the connection now (what was written before goes first)."""
        self.services.writer.flush()
        self.transport.abortConnection()  # type: ignore[union-attr]

    def pause(self) -> None:
        """Stop reading (the spool writes are behind); the idle timeout waits too."""
        self.setTimeout(None)
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        """Read again."""
        self.setTimeout(self.services.config.idle_timeout)
        self.transport.resumeProducing()  # type: ignore[union-attr]


class CameraFactory(Factory):
    """Builds a :class:`CameraProtocol` per connection, sharing :class:`Services`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.protocols: set[CameraProtocol] = set()
        self.noisy = False

    def buildProtocol(self, addr: Any) -> Optional[CameraProtocol]:
        s = self.services
        if not s.accepting:
            return None
        if len(self.protocols) >= s.config.max_connections:
            s.stats.connections_refused += 1
            log.warn("refusing connection from {peer}: limits.max_connections ({n}) reached",
                     peer=getattr(addr, "host", addr), n=s.config.max_connections)
            return None
        return CameraProtocol(s, self)

    def shutdown(self) -> defer.Deferred:
        """Stop every session, persist every partial, wait for files being stored."""
        self.services.accepting = False
        waits = []
        for protocol in list(self.protocols):
            if protocol.session is not None:
                waits.append(protocol.session.stop("the gateway is shutting down"))
        waits.extend(self.services.pending)
        return defer.DeferredList(waits, consumeErrors=True)

