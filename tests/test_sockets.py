"""A reactor turn's replies, sent together at its end (camgateway.perf.sockets.TurnWriter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from camgateway.perf import sockets
from camgateway.session.protocol import CameraProtocol
from camgateway.perf.sockets import TurnWriter
from camgateway.perf.settings import Performance
from tests.support import RunningClock, loopback_pair, make_services, poll

#: The speed-ups these tests are about, on whatever CAMGATEWAY_PERFORMANCE says.
ON = Performance.every(True)


class Received(Protocol):
    """The camera's end: keeps what arrives, and when the gateway's end closed."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.data)


class TurnWriterTests(TestCase):
    """Real loopback connections; the writer's turns are a test clock's."""

    timeout = 30

    def pair(self) -> defer.Deferred:
        """``(server transport, client protocol)`` of a new loopback connection."""
        return loopback_pair(self, Received())

    @defer.inlineCallbacks
    def arrived(self, client: Received, expected: bytes) -> Any:
        yield poll(lambda: len(client.data) >= len(expected), timeout=2.0, interval=0.01, what="the replies")
        self.assertEqual(client.data, expected)

    @defer.inlineCallbacks
    def test_a_turns_writes_leave_at_its_end_in_order(self) -> Any:
        (a, camera_a), (b, camera_b) = (yield self.pair()), (yield self.pair())
        clock = RunningClock()
        writer = TurnWriter(clock)
        writer.write(a, b"first ")
        writer.write(b, b"other")
        writer.write(a, b"second")
        self.assertEqual(writer.kept, 3)
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((camera_a.data, camera_b.data), (b"", b""))  # nothing sent during the turn
        clock.advance(0)  # the turn ends
        self.assertEqual(writer.kept, 0)
        yield self.arrived(camera_a, b"first second")
        yield self.arrived(camera_b, b"other")

    def test_other_transports_are_written_at_once(self) -> None:
        clock = RunningClock()
        transport = StringTransport()
        TurnWriter(clock).write(transport, b"now")
        self.assertEqual(transport.value(), b"now")
        self.assertEqual(clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_once_the_reactor_has_stopped_writes_go_out_at_once_after_those_kept(self) -> Any:
        a, camera = yield self.pair()
        clock = RunningClock()
        writer = TurnWriter(clock)
        writer.write(a, b"kept ")
        clock.running = False
        writer.write(a, b"then this")
        self.assertEqual(writer.kept, 0)
        yield self.arrived(camera, b"kept then this")

    @defer.inlineCallbacks
    def test_a_write_that_fails_is_logged_and_the_others_still_go_out(self) -> Any:
        (a, camera_a), (b, camera_b) = (yield self.pair()), (yield self.pair())
        real = sockets.write_now

        def failing(transport: Any, data: bytes) -> None:
            if transport is a:
                raise RuntimeError("broken")
            real(transport, data)

        clock = RunningClock()
        writer = TurnWriter(clock, failing)  # (how each reply goes out: write_now by default)
        writer.write(a, b"lost")
        writer.write(b, b"still sent")
        clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        yield self.arrived(camera_b, b"still sent")
        self.assertEqual(camera_a.data, b"")


class ProtocolTests(TestCase):
    """The camera protocol's replies go through the services' writer."""

    timeout = 30

    @defer.inlineCallbacks
    def connection(self, clock: Clock) -> Any:
        # (their writer keeps replies for that clock's turn)
        services = make_services(Path(self.mktemp()), clock, performance=ON)
        transport, camera = yield loopback_pair(self, Received())
        protocol = CameraProtocol(services)
        protocol.transport = transport  # the loopback connection's, written by the protocol's methods
        return protocol, camera

    @defer.inlineCallbacks
    def test_a_closed_connections_last_reply_goes_before_its_end(self) -> Any:
        protocol, camera = yield self.connection(RunningClock())  # a turn that never ends by itself
        protocol.send(b"\x00\x09")
        protocol.close()
        received = yield camera.closed
        self.assertEqual(received, b"\x00\x09")

    @defer.inlineCallbacks
    def test_a_dropped_connections_replies_go_first(self) -> Any:
        protocol, camera = yield self.connection(RunningClock())
        protocol.send(b"\x00\x09")
        protocol.abort()
        received = yield camera.closed
        self.assertEqual(received, b"\x00\x09")


class Sizes:
    """A decoder that keeps only the size of each read it is fed."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def feed(self, data: bytes) -> None:
        self.sizes.append(len(data))


class ReadSizeTests(TestCase):
    """A camera whose reads come back full is read in wider pieces (camgateway.perf.sockets.widen_reads)."""

    timeout = 30

    @defer.inlineCallbacks
    def camera(self, read: int = 0) -> Any:
        """A CameraProtocol on the accepting end of a loopback connection, its decoder replaced by :class:`Sizes`.

        ``read``: the connection's read size before the protocol sees it (0: Twisted's).
        """
        transport, client = yield loopback_pair(self)
        if read:
            transport.bufferSize = read
        protocol = CameraProtocol(make_services(Path(self.mktemp()), performance=ON))
        transport.protocol = protocol  # the connection's reads now go to the camera protocol
        protocol.makeConnection(transport)
        protocol.decoder = Sizes()  # type: ignore[assignment]
        return protocol, transport, client

    @defer.inlineCallbacks
    def received(self, sizes: Sizes, total: int) -> Any:
        yield poll(lambda: sum(sizes.sizes) >= total, timeout=3.0, interval=0.01, what=f"{total} bytes")
        self.assertEqual(sum(sizes.sizes), total)

    @defer.inlineCallbacks
    def test_a_camera_that_fills_a_read_is_read_wider(self) -> Any:
        # Reads of 4 KiB to begin with, so that the first is surely full: a new
        # socket's receive window (tcp_rmem's default, 128 KiB) may hold less
        # than two of Twisted's 64 KiB reads.
        protocol, transport, client = yield self.camera(read=4096)
        transport.pauseProducing()  # everything waits in the socket, as for a camera faster than the reads
        client.transport.write(b"\x55" * (2 << 20))
        yield deferLater(reactor, 0.2, lambda: None)
        transport.resumeProducing()
        yield self.received(protocol.decoder, 2 << 20)
        sizes = protocol.decoder.sizes
        self.assertEqual(sizes[0], 4096)  # full: more was waiting
        self.assertEqual(transport.bufferSize, sockets.WIDE_READ)
        self.assertGreater(max(sizes[1:]), 4096)
        self.assertLessEqual(max(sizes), sockets.WIDE_READ)

    @defer.inlineCallbacks
    def test_a_camera_whose_reads_are_not_full_keeps_the_default(self) -> Any:
        protocol, transport, client = yield self.camera()
        default = transport.bufferSize
        self.assertLess(default, sockets.WIDE_READ)
        for _ in range(20):  # a frame at a time: each read brings what one write sent
            client.transport.write(b"\x55" * 1030)
            yield deferLater(reactor, 0.01, lambda: None)
        yield self.received(protocol.decoder, 20 * 1030)
        self.assertEqual(transport.bufferSize, default)

    @defer.inlineCallbacks
    def test_only_plain_tcp_connections_that_are_not_yet_wide(self) -> Any:
        self.assertEqual(sockets.read_size(StringTransport()), 0)
        transport, _ = yield loopback_pair(self)
        self.assertEqual(sockets.read_size(transport), transport.bufferSize)
        transport.bufferSize = 4 * sockets.WIDE_READ  # (never narrowed)
        self.assertEqual(sockets.read_size(transport), 0)
        protocol, string = CameraProtocol(make_services(Path(self.mktemp()), performance=ON)), StringTransport()
        protocol.makeConnection(string)
        protocol.decoder = Sizes()  # type: ignore[assignment]
        protocol.dataReceived(b"\x55" * 65536)
        self.assertFalse(hasattr(string, "bufferSize"))
