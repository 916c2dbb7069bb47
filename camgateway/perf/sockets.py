"""Plain TCP connections: one ``send(2)`` when nothing is queued, a turn's replies together, read sizes.

``transport.write`` on an idle Twisted TCP connection queues the bytes,
registers the socket for writing (an ``epoll_ctl``), sends in a later
reactor turn and unregisters it (another ``epoll_ctl``). For a protocol
whose writes are small and far apart, the gateway's replies and an emulated
camera's frames, that machinery costs more than the ``send`` itself: under
photo load (four replies a file) it was a tenth of the gateway's reactor
thread, and most of the emulator's CPU for 10,000 slow cameras.

:func:`set_read_mark` sets the socket's receive low-water mark, so that a
slow camera's connection is read a few frames at a time
(:mod:`camgateway.perf.slow_reads`); :func:`widen_reads` lets a fast camera's be
read in bigger pieces than Twisted's 64 KiB.

:class:`TurnWriter` keeps the replies of a reactor turn and sends them one
after another at its end. A ``send`` that wakes a peer asleep on another
CPU pays for the wake-up (on this virtual machine about 40 µs of the
sender's CPU for a few bytes, against 17 µs when the sends of a turn
follow one another); the gateway's replies to many cameras, spread over
a turn's work, paid it nearly every time.

Each is a switch of the ``performance:`` section (``direct_send``,
``reply_batching``, ``wide_reads``, ``read_marks``: docs/performance.md):
off, :func:`plain_write` and :class:`PlainWriter` are the plain paths.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from twisted.internet.tcp import Client, Server
from twisted.logger import Logger

from camgateway.base.internals import nothing_queued

__all__ = ["write_now", "plain_write", "set_read_mark", "TurnWriter", "PlainWriter", "WIDE_READ", "read_size",
           "widen_reads"]

log = Logger(namespace="camgateway.perf.sockets")

_PLAIN_TCP = (Server, Client)
_SO_RCVLOWAT: Any = getattr(socket, "SO_RCVLOWAT", None)
#: The most a read takes from a connection whose reads came back full at
#: Twisted's size (64 KiB): a camera streaming faster than the gateway reads.
#: A quarter as many reads, each with its turn through the protocol, the
#: decoder and the session.
WIDE_READ = 256 * 1024


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, in order after anything written before.

    On a plain TCP connection (Twisted's own ``tcp.Server`` or ``tcp.Client``)
    with nothing queued, the bytes go out with one ``send`` here. Anything
    the socket does not take at once, or any error, goes to
    ``transport.write``, which queues it behind nothing and handles it as
    always (flow control, producers, a broken connection); TLS and other
    transports always take that way.
    """
    # (A Twisted whose write buffers cannot be looked at only loses the
    # shortcut: camgateway.base.internals.nothing_queued.)
    if (type(transport) in _PLAIN_TCP and transport.connected and not transport.disconnecting
            and nothing_queued(transport)):
        try:
            sent = transport.getHandle().send(data)
        except OSError:  # full, or broken: Twisted's own write deals with it
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def plain_write(transport: Any, data: bytes) -> None:
    """``transport.write(data)``: the plain path of :func:`write_now` (``performance.direct_send: false``)."""
    transport.write(data)


#: How a writer sends one reply: :func:`write_now` or :func:`plain_write`.
Send = Callable[[Any, bytes], None]


class PlainWriter:
    """Writes every reply at once (``performance.reply_batching: false``); the plain path of :class:`TurnWriter`."""

    __slots__ = ("_send",)

    def __init__(self, send: Send = plain_write) -> None:
        self._send = send

    def write(self, transport: Any, data: bytes) -> None:
        """Send ``data`` to ``transport`` now."""
        self._send(transport, data)

    def flush(self) -> None:
        """Nothing is ever kept."""


class TurnWriter:
    """Writes to plain TCP connections kept until the end of the reactor turn, then sent in order.

    :meth:`write` of bytes for a plain TCP connection (Twisted's ``tcp.Server``
    or ``tcp.Client``) keeps them; the first of a turn schedules
    :meth:`flush` (``callLater(0)``: it runs once the turn's ready
    connections and thread results have been handled), which sends every
    one with :func:`write_now`, in the order written. Any other transport
    (TLS, a test's) is written at once, and so is everything once the
    reactor has stopped (``clock.running`` false), after what is kept: the
    bytes of one connection never change order. A connection about to be
    closed or dropped calls :meth:`flush` first, so its last reply goes
    before the FIN or the reset. ``send`` is how each goes out
    (:func:`plain_write` with ``performance.direct_send: false``).
    """

    __slots__ = ("_clock", "_kept", "_send")

    def __init__(self, clock: Any, send: Send = write_now) -> None:
        self._clock = clock
        self._kept: list[tuple[Any, bytes]] = []
        self._send = send

    @property
    def kept(self) -> int:
        """Writes waiting for the end of the turn."""
        return len(self._kept)

    def write(self, transport: Any, data: bytes) -> None:
        """Send ``data`` to ``transport`` at the end of this turn (or at once, see above)."""
        if type(transport) in _PLAIN_TCP and getattr(self._clock, "running", True):
            kept = self._kept
            if not kept:
                self._clock.callLater(0, self.flush)
            kept.append((transport, data))
            return
        if self._kept:
            self.flush()
        self._send(transport, data)

    def flush(self) -> None:
        """Send everything kept, in order (an error on one connection is logged; the others go out)."""
        kept, self._kept = self._kept, []
        send = self._send
        for transport, data in kept:
            try:
                send(transport, data)
            except Exception:
                address = transport.getPeer()  # (a plain TCP connection's: host and port)
                log.failure("a reply to {peer} could not be written", peer=f"{address.host}:{address.port}")


def read_size(transport: Any) -> int:
    """What a read of ``transport`` asks for, if :func:`widen_reads` can widen it; else 0.

    Only Twisted's own plain TCP connections read with ``bufferSize``; TLS
    and other transports, and a connection already wide, give 0.
    """
    if type(transport) not in _PLAIN_TCP:
        return 0
    size = transport.bufferSize
    return size if size < WIDE_READ else 0


def widen_reads(transport: Any) -> None:
    """Let each read of a plain TCP connection take up to :data:`WIDE_READ` bytes.

    For a connection whose read came back full (:func:`read_size` bytes):
    more was waiting. Memory stays bounded: a read's bytes are parsed and
    let go in the same turn, and the session pauses the connection when its
    writes fall behind.
    """
    transport.bufferSize = WIDE_READ


def set_read_mark(transport: Any, nbytes: int) -> bool:
    """Set the receive low-water mark (``SO_RCVLOWAT``) of a plain TCP connection.

    The socket is then reported readable once ``nbytes`` are waiting, or at
    its end or an error, whatever the mark (1 is every byte, the default).
    False for any other transport (TLS, a test's), a connection that is gone,
    or a system without the option: nothing was changed.
    """
    if type(transport) not in _PLAIN_TCP or not transport.connected or _SO_RCVLOWAT is None:
        return False
    try:
        transport.getHandle().setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, nbytes)
    except OSError:
        return False
    return True
