"""The one path by which a camera's bytes reach its transport.

Control frames (START, SYNC…) are written at once and in order. File data is
streamed by :class:`Sender`, an :class:`IPushProducer` registered on the
transport for the whole connection: each reactor turn it writes one bounded
batch of frames and yields, so a RESUME arriving mid-stream is read before the
next batch; the transport pauses it while its buffer is full. (A push producer
rather than a pull one: TLS wraps pull producers in a loop that spins while
they are idle.)

Two faults live here because they are about how bytes leave: ``slow_bps``
(a rate limit on DATA, paced by the reactor's one :class:`~camgateway.sim.pacer.Pacer`)
and ``segment_sizes`` (every byte written in tiny pieces, one per transport
write, a small delay apart). Other writes go out with one ``send`` when
nothing is queued (:func:`camgateway.perf.sockets.write_now`), as the gateway's
replies do.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Protocol

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITransport
from zope.interface import implementer

from camgateway.sim.pacer import PacedCall, Pacer, pacer_for
from camgateway.perf.sockets import write_now

__all__ = ["FrameSource", "Sender"]


class FrameSource(Protocol):
    """What :class:`Sender` streams (see :class:`camgateway.sim.frames.FileStream`)."""

    finished: bool
    drop_requested: bool

    def take(self, max_frames: int) -> bytes: ...


@implementer(IPushProducer)
class Sender:
    """Writes one connection's bytes, streaming DATA with flow control."""

    def __init__(
        self,
        transport: ITransport,
        clock: IReactorTime,
        *,
        batch_frames: int = 32,
        slow_bps: Optional[int] = None,
        segment_sizes: Optional[tuple[int, int]] = None,
        segment_delay: float = 0.0005,
        rng: Optional[random.Random] = None,
        on_write: Optional[Callable[[int], None]] = None,
    ) -> None:
        self._transport = transport
        self._clock = clock
        self._batch = batch_frames
        self._slow_bps = slow_bps
        self._segments = segment_sizes
        self._segment_delay = segment_delay
        self._rng = rng or random.Random()
        self._on_write = on_write
        self._source: Optional[FrameSource] = None
        self._paused = False
        self._stopped = False
        self._closing = False
        self._tick: Optional[IDelayedCall | PacedCall] = None
        self._not_before = 0.0
        self._queue = bytearray()
        self._pump_call: Optional[IDelayedCall] = None
        self._pacer: Optional[Pacer] = None  # (the reactor's, looked up once: see _schedule)

    # -- IPushProducer (called by the transport)

    def pauseProducing(self) -> None:
        """The transport's buffer is full: stop streaming until resumed."""
        self._paused = True

    def resumeProducing(self) -> None:
        """The transport's buffer drained."""
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        """The connection is gone."""
        self.shutdown()

    # -- used by the camera protocol

    @property
    def closing(self) -> bool:
        """Whether this side decided to disconnect (a CLOSE, a drop fault)."""
        return self._closing

    @property
    def streaming(self) -> bool:
        """Whether a file stream is in progress."""
        return self._source is not None

    def write(self, data: bytes) -> None:
        """Send ``data`` after everything written before it."""
        if self._stopped or self._closing or not data:
            return
        if self._on_write is not None:
            self._on_write(len(data))
        if self._segments is None:
            write_now(self._transport, data)
            return
        self._queue += data
        if self._pump_call is None:
            self._pump_call = self._clock.callLater(0, self._pump)

    def stream(self, source: FrameSource) -> None:
        """Stream ``source``'s frames, replacing any stream in progress."""
        self.stop_stream()
        self._source = source
        self._schedule()

    def stop_stream(self) -> None:
        """Stop streaming; frames already written still go out."""
        self._source = None
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None

    def close(self) -> None:
        """Disconnect (FIN, not reset) once everything written has gone out."""
        if self._stopped or self._closing:
            return
        self._closing = True
        self.stop_stream()
        if not self._queue:
            self._disconnect()

    def abort(self) -> None:
        """Drop the connection now, discarding whatever is unsent."""
        self.shutdown()
        self._transport.abortConnection()  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        """Cancel every pending write; nothing more is sent."""
        self._stopped = True
        self._source = None
        self._queue.clear()
        for call in (self._tick, self._pump_call):
            if call is not None and call.active():
                call.cancel()
        self._tick = self._pump_call = None

    # -- internals

    def _disconnect(self) -> None:
        self.shutdown()
        # A transport does not close while a producer is registered.
        self._transport.unregisterProducer()  # type: ignore[attr-defined]
        self._transport.loseConnection()

    def _schedule(self, now: Optional[float] = None) -> None:
        """Have :meth:`_produce` run: at once, or (a rate-limited camera) at ``_not_before``.

        ``now``: the clock as the caller just read it (one reading a frame:
        10,000 slow cameras are 10,000 frames a second, and the benchmark's
        slow generator shares the machine with the gateway it measures).
        """
        if self._tick is not None or self._source is None or self._paused or self._stopped:
            return
        if self._queue:
            return  # the pump reschedules once the pieces are out
        if self._not_before - (self._clock.seconds() if now is None else now) > 0:
            # A rate-limited camera's next frame: the reactor's one timer for them all.
            if self._pacer is None:
                self._pacer = pacer_for(self._clock)
            self._tick = self._pacer.call_at(self._not_before, self._produce)
        else:
            self._tick = self._clock.callLater(0, self._produce)

    def _produce(self) -> None:
        self._tick = None
        source = self._source
        if source is None or self._paused or self._stopped:
            return
        paced = self._slow_bps is not None or self._segments is not None
        data = source.take(1 if paced else self._batch)
        self.write(data)
        now = None
        if self._slow_bps is not None:
            now = self._clock.seconds()
            self._not_before = now + len(data) / self._slow_bps
        if source.drop_requested:
            self.close()
        elif source.finished:
            self._source = None
        else:
            self._schedule(now)

    def _pump(self) -> None:
        self._pump_call = None
        if self._stopped or not self._queue:
            return
        assert self._segments is not None
        n = self._rng.randint(*self._segments)
        piece = bytes(self._queue[:n])
        del self._queue[:n]
        self._transport.write(piece)
        if self._queue:
            self._pump_call = self._clock.callLater(self._segment_delay, self._pump)
        elif self._closing:
            self._disconnect()
        else:
            self._schedule()
