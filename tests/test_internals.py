"""Twisted's private names camgateway uses (camgateway.base.internals) exist on real Twisted objects.

Each test fails loudly, naming the attribute, when an installed Twisted has
renamed or removed one: the gateway would still run on its fallback, but
slower or noisier, and that must be a decision, not a surprise. setup.cfg
pins the Twisted releases these tests pass with.
"""

from __future__ import annotations

import importlib
import os
import socket
from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Client, Server
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from camgateway.base import internals
from tests.support import loopback_pair, poll


def _lookup(dotted: str) -> Any:
    """The module, class or attribute at a dotted path."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


class PrivateNamesTests(TestCase):
    """Every private name the module lists is where it says (the list is the module's own).

    A name of a TCP transport's class (some are set per instance) is looked
    for on a real connection over loopback.
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_every_listed_name_exists(self) -> Any:
        transport, _ = yield loopback_pair(self)
        missing = []
        for where, name in internals.PRIVATE_NAMES:
            owner = _lookup(where)
            if isinstance(owner, type) and isinstance(transport, owner):
                owner = transport
            if not hasattr(owner, name):
                missing.append(f"{where}.{name}")
        self.assertEqual(missing, [], "this Twisted lacks private names camgateway relies on: see"
                                      " camgateway/base/internals.py (each has a fallback) and setup.cfg's pin")


class TCPTransportTests(TestCase):
    """A real TCP connection over loopback: the write buffers and the shutdown flag."""

    timeout = 30

    @defer.inlineCallbacks
    def test_an_idle_connections_write_buffers_are_empty_under_their_names(self) -> Any:
        transport, client = yield loopback_pair(self)
        self.assertIsInstance(transport, Server)
        self.assertIsInstance(client.transport, Client)
        for each in (transport, client.transport):
            self.assertEqual(each.dataBuffer, b"", "twisted.internet.abstract.FileDescriptor.dataBuffer")
            self.assertEqual(each._tempDataBuffer, [], "FileDescriptor._tempDataBuffer")
            self.assertTrue(internals.nothing_queued(each))

    @defer.inlineCallbacks
    def test_bytes_written_are_queued_under_those_names(self) -> Any:
        transport, _ = yield loopback_pair(self)
        transport.write(b"queued")  # (sent in a later reactor turn)
        self.assertIn(b"queued", transport.dataBuffer + b"".join(transport._tempDataBuffer))
        self.assertFalse(internals.nothing_queued(transport))

    def test_a_transport_without_the_buffers_counts_as_busy(self) -> None:
        class Bare:
            pass

        self.assertFalse(internals.nothing_queued(Bare()))

    @defer.inlineCallbacks
    def test_a_released_socket_closes_here_without_ending_the_connection(self) -> Any:
        class Keep(Protocol):
            data = b""

            def dataReceived(self, data: bytes) -> None:
                self.data += data

        transport, client = yield loopback_pair(self, Keep())
        self.assertTrue(hasattr(type(transport), "_shouldShutdown"), "twisted.internet.tcp._SocketCloser"
                                                                      "._shouldShutdown")
        other = socket.socket(fileno=os.dup(transport.fileno()))  # the copy another process would hold
        self.addCleanup(other.close)
        transport.stopReading()
        transport.stopWriting()
        internals.release_without_shutdown(transport)
        self.assertFalse(transport._shouldShutdown)
        transport.connectionLost(Failure(error.ConnectionDone("handed over")))
        other.sendall(b"still open")
        yield poll(lambda: client.data == b"still open", timeout=5.0, what="bytes through the copy")


class HTTPPoolTests(TestCase):
    """A real HTTPConnectionPool: its factory class can be replaced by a quiet one."""

    def test_the_pools_factory_is_twisteds_client_factory(self) -> None:
        from twisted.web import client

        pool = client.HTTPConnectionPool(reactor)
        self.assertIs(pool._factory, client._HTTP11ClientFactory, "HTTPConnectionPool._factory")

    def test_quiet_pools_connections_log_nothing_of_their_factory(self) -> None:
        from twisted.web import client

        pool = internals.quiet_pool(reactor)
        self.assertTrue(issubclass(pool._factory, client._HTTP11ClientFactory))
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory = pool._factory(lambda p: None, "test")
        factory.doStart()
        factory.doStop()
        self.assertEqual([e for e in events if "factory" in str(e.get("log_format", "")).lower()], [])

    def test_the_public_http_errors_carry_their_reasons(self) -> None:
        for kind in internals.http_wrappers():
            self.assertEqual(kind([ValueError("x")]).reasons[0].args, ("x",))
