"""The private names of Twisted that camgateway relies on, in one place.

Each is used because Twisted offers no public way to do the same job, and
each has a fallback that works (slower, or noisier) when a Twisted release
renames or removes it. ``tests/test_internals.py`` checks every one of them
on real Twisted objects (a TCP connection over loopback, an
``HTTPConnectionPool``) and fails loudly when one is gone, so that an
upgrade never silently falls back; setup.cfg pins the Twisted releases
tested.

=====================================  ==========================================  ===============================
private name                           what for                                    fallback
=====================================  ==========================================  ===============================
``FileDescriptor.dataBuffer``,         :func:`nothing_queued`: a reply may skip    "something is queued":
``FileDescriptor._tempDataBuffer``     Twisted's write buffer (one ``send``)       ``transport.write``
``_SocketCloser._shouldShutdown``      :func:`release_without_shutdown`: a         the descriptor closed by hand
                                       socket handed to a worker is closed here    (``getHandle().detach()``)
                                       without ending the connection there
``HTTPConnectionPool._factory``,       :func:`quiet_pool`: no "Starting factory"   a plain pool (two log lines
``web.client._HTTP11ClientFactory``    lines per HTTP request                      per request)
=====================================  ==========================================  ===============================

The socket of a TCP connection is taken with the public ``getHandle()``,
and a failed HTTP request's causes from the public exceptions of
``twisted.web.client`` (:func:`http_wrappers`), not from private names.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["quiet_pool", "nothing_queued", "release_without_shutdown", "http_wrappers", "PRIVATE_NAMES"]

#: What this module uses of Twisted's private names: (where, name). tests/test_internals.py checks each.
PRIVATE_NAMES = (
    ("twisted.internet.abstract.FileDescriptor", "dataBuffer"),
    ("twisted.internet.abstract.FileDescriptor", "_tempDataBuffer"),
    ("twisted.internet.tcp._SocketCloser", "_shouldShutdown"),
    ("twisted.web.client.HTTPConnectionPool", "_factory"),
    ("twisted.web.client", "_HTTP11ClientFactory"),
)

_QuietFactory: Any = None


def quiet_pool(reactor: Any, persistent: bool = True) -> Any:
    """An ``HTTPConnectionPool`` whose connections do not log "Starting factory"/"Stopping factory".

    Twisted's HTTP client makes a factory per connection, and a factory logs
    its start and stop unless it is quiet: two lines per request otherwise.
    A Twisted without the pool's factory class gives a plain pool (those two
    lines come back; nothing else changes).
    """
    global _QuietFactory
    from twisted.web import client

    pool = client.HTTPConnectionPool(reactor, persistent=persistent)
    factory = getattr(client, "_HTTP11ClientFactory", None)
    if factory is None or not hasattr(pool, "_factory"):
        return pool
    if _QuietFactory is None:
        _QuietFactory = type("_QuietHTTP11ClientFactory", (factory,), {"noisy": False})
    pool._factory = _QuietFactory
    return pool


def nothing_queued(transport: Any) -> bool:
    """Whether Twisted's write buffers of ``transport`` (a ``FileDescriptor``) are empty.

    Then bytes sent straight to its socket keep their order. Twisted has no
    public way to ask; a Twisted without these buffers' names answers False
    ("something is queued"), so a caller writes through ``transport.write``.
    """
    return (getattr(transport, "dataBuffer", True) == b""
            and getattr(transport, "_tempDataBuffer", True) == [])


def release_without_shutdown(transport: Any) -> None:
    """Make ``transport`` (a ``tcp.Server``) close its socket without ``shutdown(2)`` when it is lost.

    For a socket handed to another process: ``shutdown`` would end the
    connection for that process too, ``close`` only drops this process's
    descriptor. Without Twisted's flag, the descriptor is detached and
    closed here; Twisted's own close then fails quietly on the closed
    socket object.
    """
    if hasattr(type(transport), "_shouldShutdown"):
        transport._shouldShutdown = False
        return
    os.close(transport.getHandle().detach())


def http_wrappers() -> tuple[type, ...]:
    """The public exceptions Twisted's HTTP client wraps a request's causes in (their ``reasons``).

    (``ResponseNeverReceived`` is a ``ResponseFailed``.) Imported when asked:
    ``twisted.web`` is loaded only by a gateway that uses it.
    """
    from twisted.web.client import RequestGenerationFailed, RequestTransmissionFailed, ResponseFailed

    return (RequestGenerationFailed, RequestTransmissionFailed, ResponseFailed)
