"""Plain TCP connections: one ``send(2)`` when nothing is queued, and a read mark.

``transport.write`` on an idle Twisted TCP connection queues the bytes,
registers the socket for writing (an ``epoll_ctl``), sends in a later
reactor turn and unregisters it (another ``epoll_ctl``). For a protocol
whose writes are small and far apart, the gateway's replies and an emulated
camera's frames, that machinery costs more than the ``send`` itself: under
photo load (four replies a file) it was a tenth of the gateway's reactor
thread, and most of the emulator's CPU for 10,000 slow cameras.

:func:`set_read_mark` sets the socket's receive low-water mark, so that a
slow camera's connection is read a few frames at a time
(:mod:`camgateway.slow_reads`).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.tcp import Client, Server

__all__ = ["write_now", "set_read_mark"]

_PLAIN_TCP = (Server, Client)
_SO_RCVLOWAT: Any = getattr(socket, "SO_RCVLOWAT", None)


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, in order after anything written before.

    On a plain TCP connection (Twisted's own ``tcp.Server`` or ``tcp.Client``)
    with nothing queued, the bytes go out with one ``send`` here. Anything
    the socket does not take at once, or any error, goes to
    ``transport.write``, which queues it behind nothing and handles it as
    always (flow control, producers, a broken connection); TLS and other
    transports always take that way.
    """
    # (Twisted's write buffers are looked up with defaults that mean
    # "something is queued", so a Twisted without them only loses the
    # shortcut.)
    if (type(transport) in _PLAIN_TCP and transport.connected and not transport.disconnecting
            and getattr(transport, "dataBuffer", True) == b""
            and getattr(transport, "_tempDataBuffer", True) == []):
        try:
            sent = transport.socket.send(data)
        except OSError:  # full, or broken: Twisted's own write deals with it
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


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
        transport.socket.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, nbytes)
    except OSError:
        return False
    return True
