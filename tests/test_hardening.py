"""Hostile or broken peers on a real gateway, each beside a good camera that must not notice."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import formatEvent, globalLogPublisher

from camgateway.wire import codec
from camgateway.wire.codec import ServerFrameDecoder
from camgateway.wire.crc import crc16
from camgateway.sim import ContentPool
from tests.support import poll
from tests.test_integration import GatewayTestCase, camera

BAD_IMEI = 111111111111111


class Scripted(Protocol):
    """A raw device: sends chunks, records the gateway's frames, reports the close."""

    def __init__(self, chunks: list[bytes], close_after: bool = False) -> None:
        self.chunks, self.close_after = chunks, close_after
        self.decoder = ServerFrameDecoder()
        self.received: list[tuple[int, bytes]] = []
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        for chunk in self.chunks:
            self.transport.write(chunk)
        if self.close_after:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received.extend(self.decoder.feed(data))

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.received)


def frames_of(content: bytes, start: int = 0) -> bytes:
    crc, out = 0, []
    for i in range(start, len(content), 1024):
        crc = crc16(content[i : i + 1024], crc)
        out.append(codec.data(content[i : i + 1024], crc))
    return b"".join(out)


def got(protocol: "Scripted", cmd: int) -> Any:
    return lambda: any(c == cmd for c, _ in protocol.received)


class HardeningTests(GatewayTestCase):
    """PROTOCOL.md section 8 and the limits, with a good camera alongside each time."""

    def setUp(self) -> None:
        self.rng = random.Random(11)
        self.pool = ContentPool(self.rng, variants=2)
        self.good = camera(0, "dualcam", self.rng, self.pool, photos=2, videos=1)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, text: str) -> list[str]:
        return [formatEvent(e) for e in self.events if text in formatEvent(e)]

    def held(self, imei: int) -> int:
        """Bytes the live session of ``imei`` holds of its file (0 if none)."""
        session = self.gateway.services.sessions.get(str(imei))
        transfer = session.transfer if session is not None else None
        return transfer.held if transfer is not None else 0

    @defer.inlineCallbacks
    def hostile(self, *chunks: bytes, close_after: bool = False) -> Any:
        protocol = Scripted(list(chunks), close_after)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), protocol)
        return protocol

    @defer.inlineCallbacks
    def good_camera_delivers(self) -> Any:
        results = yield self.cameras([self.good])
        self.assertTrue(results[0].ok, results[0].errors)
        self.assertEqual(self.stored().get(str(self.good.imei)), self.expected([self.good])[str(self.good.imei)])

    @defer.inlineCallbacks
    def test_allow_list(self) -> Any:
        yield self.start_gateway(allow=frozenset({str(self.good.imei)}))
        bad = yield self.hostile(codec.init_packet(5, BAD_IMEI, 0x44000400))
        yield self.good_camera_delivers()
        self.assertEqual((yield bad.closed), [(0, b"")])  # CLOSE, then the connection ends
        self.assertNotIn(str(BAD_IMEI), self.stored())
        self.assertTrue(self.logged("not in devices.allow"))

    @defer.inlineCallbacks
    def test_idle_and_step_timeouts(self) -> Any:
        yield self.start_gateway(idle_timeout=1.0, step_timeout=0.5, metadata=False)
        silent = yield self.hostile()
        stuck = yield self.hostile(codec.init_packet(5, BAD_IMEI, 0x44000400))  # never answers FILE REQUEST
        stalled = yield self.hostile(codec.init_packet(5, BAD_IMEI + 1, 0x10000400) + codec.start(10, 0))
        yield poll(got(stalled, codec.Cmd.RESUME))
        stalled.transport.write(codec.sync(1) + frames_of(bytes(4096)))  # then the link goes quiet
        yield self.good_camera_delivers()
        yield silent.closed
        self.assertEqual((yield stuck.closed), [(codec.Cmd.FILE_REQUEST, b"%photof"), (0, b"")])
        yield stalled.closed
        self.assertTrue(self.logged("no answer in 0.5 s while awaiting init"))
        self.assertTrue(self.logged("no answer in 0.5 s while awaiting START"))
        self.assertTrue(self.logged(f"camera {BAD_IMEI + 1} (127.0.0.1:"))
        self.assertTrue(self.logged("idle for 1 s while receiving"))
        self.assertTrue(self.logged("connection lost during %videof at 4096 of 10240 bytes; partial kept"))

    @defer.inlineCallbacks
    def test_reconnect_closes_the_older_session_and_resumes(self) -> Any:
        yield self.start_gateway(metadata=False)
        content = bytes(self.rng.randrange(256) for _ in range(10 * 1024))
        head = codec.init_packet(5, BAD_IMEI, 0x10000400) + codec.start(10, 0)
        old = yield self.hostile(head)
        yield poll(got(old, codec.Cmd.RESUME))
        old.transport.write(codec.sync(1) + frames_of(content)[: 4 * 1030])  # 4 packets, then silence
        yield poll(lambda: self.held(BAD_IMEI) >= 4096)
        new = yield self.hostile(head)  # the camera is back on a new connection
        yield old.closed
        yield poll(got(new, codec.Cmd.RESUME))
        self.assertEqual(new.received, [(codec.Cmd.FILE_REQUEST, b"%videof"), (codec.Cmd.RESUME, (5).to_bytes(4, "big"))])
        new.transport.write(codec.sync(5) + frames_of(content, 4 * 1024))
        yield self.good_camera_delivers()
        self.assertEqual(new.received[-1], (codec.Cmd.REPEAT_INIT, b""))
        new.transport.write(codec.init_packet(5, BAD_IMEI, 0x40000400))
        yield new.closed
        yield self.drained()
        [(sha, size)] = self.stored()[str(BAD_IMEI)]
        import hashlib

        self.assertEqual((sha, size), (hashlib.sha256(content).hexdigest(), len(content)))
        self.assertTrue(self.logged("the camera reconnected from"))

    @defer.inlineCallbacks
    def test_max_file_bytes(self) -> Any:
        yield self.start_gateway(max_file_bytes=1_000_000, metadata=False)
        big = yield self.hostile(codec.init_packet(5, BAD_IMEI, 0x10000400), codec.start(5000, 0))
        yield self.good_camera_delivers()
        yield poll(got(big, codec.Cmd.REPEAT_INIT))
        self.assertNotIn(str(BAD_IMEI), self.stored())
        self.assertTrue(self.logged("over limits.max_file_bytes"))

    @defer.inlineCallbacks
    def test_min_free_bytes_refuses_new_files_keeps_resumes(self) -> Any:
        yield self.start_gateway(metadata=False)
        content = bytes(self.rng.randrange(256) for _ in range(6 * 1024))
        head = codec.init_packet(5, BAD_IMEI, 0x10000400) + codec.start(6, 0)
        first = yield self.hostile(head)
        yield poll(got(first, codec.Cmd.RESUME))
        first.transport.write(codec.sync(1) + frames_of(content)[: 2 * 1030])
        yield poll(lambda: self.held(BAD_IMEI) >= 2048)
        first.transport.loseConnection()
        yield first.closed
        yield poll(lambda: not self.gateway.services.sessions)
        import dataclasses

        services = self.gateway.services
        services.config = dataclasses.replace(services.config, min_free_bytes=10**18)  # "the disk is full"
        # a new file is refused ...
        results = yield self.cameras([self.good])
        self.assertFalse(results[0].delivered)
        self.assertTrue(self.logged("under limits.min_free_bytes"))
        # ... while the partial resumes to the end
        again = yield self.hostile(head)
        yield poll(got(again, codec.Cmd.RESUME))
        self.assertEqual(again.received[-1], (codec.Cmd.RESUME, (3).to_bytes(4, "big")))
        again.transport.write(codec.sync(3) + frames_of(content, 2 * 1024))
        yield poll(got(again, codec.Cmd.REPEAT_INIT))
        again.transport.write(codec.init_packet(5, BAD_IMEI, 0))
        yield again.closed
        yield self.drained()
        self.assertIn(str(BAD_IMEI), self.stored())

    @defer.inlineCallbacks
    def test_traversal_paths_and_protocol_errors_are_logged(self) -> Any:
        yield self.start_gateway(metadata=False)
        content = b"evil"
        path = b"../../../../../tmp/evil\0"
        evil = yield self.hostile(codec.init_packet(5, BAD_IMEI, 0x02000400))
        yield poll(got(evil, codec.Cmd.PATH_REQUEST))
        evil.transport.write(codec.path(path))
        yield poll(got(evil, codec.Cmd.FILE_REQUEST))
        evil.transport.write(codec.start(4, crc16(content)))
        yield poll(got(evil, codec.Cmd.RESUME))
        evil.transport.write(codec.sync(0) + codec.data(content, crc16(content)))
        oversized = yield self.hostile(codec.init_packet(5, BAD_IMEI + 1, 0x02000400), b"\x00\x0d\x02\x01" + b"a" * 513)
        yield self.good_camera_delivers()
        yield oversized.closed
        yield poll(got(evil, codec.Cmd.REPEAT_INIT))
        yield self.drained()
        stored = sorted(p for p in (self.root / "files" / str(BAD_IMEI)).rglob("*") if p.is_file())
        self.assertEqual(len(stored), 2)
        self.assertTrue(stored[0].name.endswith("_file_evil.bin"), stored[0].name)
        self.assertEqual(stored[0].read_bytes(), content)
        for p in stored:
            self.assertTrue(p.resolve().is_relative_to((self.root / "files").resolve()))
        [line] = self.logged("PATH length 513")
        self.assertIn(str(BAD_IMEI + 1), line)
        self.assertIn("127.0.0.1", line)
        self.assertIn("00 0d 02 01", line)
