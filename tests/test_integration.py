"""The gateway service over loopback, with the package's camera emulator as load."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import random
import socket
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from camgateway.runtime.config import Config
from camgateway.perf.durability import WRITEBACK_BYTES
from camgateway.perf.settings import Performance
from camgateway.runtime.service import make_gateway
from camgateway.sim import CameraSpec, ContentPool, make_files, run_cameras

IMEI_BASE = 352093080000000


class GatewayTestCase(TestCase):
    """A real gateway (SQLite store, disk sink) on 127.0.0.1, port 0."""

    timeout = 120

    @defer.inlineCallbacks
    def start_gateway(self, root: Path | None = None, **config: Any) -> Any:
        """Start a gateway under a new directory, or ``root`` (a restart)."""
        self.root = root or Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        values = dict(listen=("tcp:0:interface=127.0.0.1",), spool=self.root / "spool",
                      sinks=({"type": "disk", "root": str(self.root / "files")},), min_free_bytes=0)
        values.update(config)
        self.top = make_gateway(Config(**values), reactor)
        self.top.startService()
        self.gateway = self.top.gateway
        yield self.gateway.ready
        self.port = self.gateway.ports[0].getHost().port
        self.addCleanup(self.top.stopService)

    def endpoint(self, spec: CameraSpec) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)

    def spool_leftovers(self, root: Path | None = None) -> list[str]:
        """Spool files other than the empty ones the running gateway made ahead for new files."""
        reserve = self.gateway.services.reserve  # (None with performance.spool_reserve off)
        ahead = reserve.names() if reserve is not None else set()
        left = []
        for path in ((root or self.root) / "spool" / "partials").iterdir():
            try:
                if path.name not in ahead or path.stat().st_size:
                    left.append(path.name)
            except FileNotFoundError:  # removed meanwhile: not left over
                pass
        return left

    def stored(self) -> dict[str, Counter]:
        """IMEI -> Counter of (sha256, size) of every stored file, checked against its sidecar."""
        out: dict[str, Counter] = {}
        for sidecar in (self.root / "files").rglob("*.json"):
            record = json.loads(sidecar.read_text())
            media = sidecar.with_name(sidecar.name[: -len(".json")])
            data = media.read_bytes()
            self.assertEqual(hashlib.sha256(data).hexdigest(), record["sha256"])
            self.assertEqual(len(data), record["size"])
            out.setdefault(record["imei"], Counter())[(record["sha256"], record["size"])] += 1
        return out

    def expected(self, specs: list[CameraSpec], refused: set[str] = frozenset()) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for spec in specs:
            files = Counter((hashlib.sha256(f.content).hexdigest(), len(f.content))
                            for f in spec.files if f.content and f.identifier not in refused)
            if files:
                out[str(spec.imei)] = files
        return out

    @defer.inlineCallbacks
    def cameras(self, specs: list[CameraSpec], **kw: Any) -> Any:
        """Run the cameras, then wait until the outbox has delivered what they sent."""
        results = yield run_cameras(reactor, self.endpoint, specs, **kw)
        yield self.drained()
        return results

    def drained(self) -> defer.Deferred:
        """Fires when the outbox has nothing in flight and nothing due."""
        return self.gateway.services.outbox.idle()


def camera(n: int, kind: str, rng: random.Random, pool: ContentPool, **kw: Any) -> CameraSpec:
    photos, videos = kw.pop("photos", 2), kw.pop("videos", 1)
    protocol_id = kw.pop("protocol_id", 5)
    files = make_files(kind, protocol_id=protocol_id, photos=photos, videos=videos, photo_size=kw.pop("photo_size", 30_000),
                       video_size=kw.pop("video_size", 300_000), rng=rng, pool=pool, key=n,
                       metadata=kw.pop("metadata", True))
    return CameraSpec(imei=IMEI_BASE + n, kind=kind, files=tuple(files), protocol_id=protocol_id, **kw)


class ManyCamerasTests(GatewayTestCase):
    """50 cameras at once, both flows, every file byte-identical."""

    @defer.inlineCallbacks
    def test_fifty_cameras_both_flows(self) -> Any:
        yield self.start_gateway()
        rng = random.Random(1)
        pool = ContentPool(rng, variants=6)
        kinds = ["dualcam", "dsm", "adas", "dashcam"]
        specs = [camera(n, kinds[n % 4], rng, pool, protocol_id=6 if n % 10 == 9 and kinds[n % 4] != "dualcam" else 5)
                 for n in range(50)]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        self.assertEqual(self.stored(), self.expected(specs))
        self.assertEqual(self.gateway.services.stats.protocol_errors, 0)
        self.assertEqual(self.spool_leftovers(), [])


class FaultTests(GatewayTestCase):
    """The faults a real link and real firmware produce."""

    @defer.inlineCallbacks
    def test_flushes_commits_and_disk_stores_share_one_thread(self) -> Any:
        yield self.start_gateway(performance=Performance.every(True))  # (the speed-ups this is about)
        s = self.gateway.services
        rng = random.Random(4)
        pool = ContentPool(rng, variants=2)
        specs = [camera(n, "dualcam", rng, pool) for n in range(3)]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        yield s.outbox.idle()
        [sink] = s.sinks
        lanes = [s.store._thread, s.spool_sync._thread, sink._batches]
        self.assertEqual({id(lane._runner) for lane in lanes}, {id(s.batch_thread)})
        self.assertTrue(all(lane.served for lane in lanes))  # each did its part of every file
        self.assertEqual(s.batch_thread._thread.name, "camgateway-disk")
        self.assertEqual(s.spool_sync.writeback_bytes, WRITEBACK_BYTES)  # slow cameras' bytes are flushed too

    @defer.inlineCallbacks
    def test_bad_crc_frames(self) -> Any:
        yield self.start_gateway()
        rng = random.Random(2)
        pool = ContentPool(rng, variants=2)
        specs = [camera(n, kind, rng, pool, bad_crc_frames=frozenset({1, 7, 40}))
                 for n, kind in enumerate(["dualcam", "dsm", "dualcam", "adas"])]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        self.assertEqual(self.stored(), self.expected(specs))
        self.assertGreater(self.gateway.services.stats.crc_errors, 0)
        self.assertGreater(sum(r.bad_crcs_sent for r in results), 0)

    @defer.inlineCallbacks
    def test_tiny_segments(self) -> Any:
        yield self.start_gateway()
        rng = random.Random(3)
        pool = ContentPool(rng, variants=2)
        specs = [camera(n, kind, rng, pool, photos=1, videos=1, photo_size=6000, video_size=12_000,
                        segment_sizes=(1, 7))
                 for n, kind in enumerate(["dualcam", "dsm"])]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        self.assertEqual(self.stored(), self.expected(specs))

    @defer.inlineCallbacks
    def test_firmware_that_never_answers_metadata(self) -> Any:
        yield self.start_gateway(metadata_timeout=0.3)
        rng = random.Random(4)
        pool = ContentPool(rng, variants=2)
        specs = [camera(n, kind, rng, pool, metadata_behaviour="never") for n, kind in enumerate(["dualcam", "dsm"])]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        self.assertEqual(self.stored(), self.expected(specs))
        for sidecar in (self.root / "files").rglob("*.json"):
            self.assertEqual(json.loads(sidecar.read_text())["metadata"], {})

    @defer.inlineCallbacks
    def test_status_instead_of_start(self) -> Any:
        yield self.start_gateway()
        rng = random.Random(5)
        pool = ContentPool(rng, variants=2)
        spec = camera(0, "dualcam", rng, pool, photos=2, videos=1, status_instead_of_start=frozenset({"videor"}))
        spec = dataclasses.replace(spec, files=tuple(
            dataclasses.replace(f, identifier=i) for f, i in zip(spec.files, ["photof", "photor", "videor"])))
        results = yield self.cameras([spec])
        self.assertEqual(results[0].refused, ["videor"])
        self.assertEqual(self.stored(), self.expected([spec], refused={"videor"}))

    @defer.inlineCallbacks
    def test_drop_and_resume(self) -> Any:
        yield self.start_gateway()
        rng = random.Random(6)
        pool = ContentPool(rng, variants=2)
        specs = [camera(n, kind, rng, pool, photos=0, videos=1, video_size=200_000, drop_after_frames=50)
                 for n, kind in enumerate(["dualcam", "dsm"])]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        self.assertEqual(self.stored(), self.expected(specs))
        dualcam, dsm = results
        # frames 0..50 arrived before the drop: 51 packets held
        self.assertEqual(dualcam.resumes, [1, 52])  # packets
        self.assertEqual(dsm.resumes, [0, 51 * 1024])  # bytes
        for sidecar in (self.root / "files").rglob("*.json"):
            self.assertEqual(json.loads(sidecar.read_text())["resumed_from"], 51 * 1024)


class _Garbage(Protocol):
    def __init__(self, payload: bytes, done: defer.Deferred) -> None:
        self.payload, self.done = payload, done

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


class HostileInputTests(GatewayTestCase):
    """Garbage, oversized frames and stuck sockets beside a good camera."""

    @defer.inlineCallbacks
    def test_garbage_beside_a_good_camera(self) -> Any:
        yield self.start_gateway(idle_timeout=1.0)
        rng = random.Random(7)
        pool = ContentPool(rng, variants=2)
        good = camera(0, "dualcam", rng, pool, photos=2, videos=1)
        payloads = [b"GET / HTTP/1.1\r\n\r\n", b"\x00\x04\xff\xff" + b"x" * 100, b"\x00\x0d\x02\x01",
                    bytes(rng.randrange(256) for _ in range(5000)), b"\x00\x00"]
        closed = []
        for payload in payloads:
            done: defer.Deferred = defer.Deferred()
            from twisted.internet.endpoints import connectProtocol

            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), _Garbage(payload, done))
            closed.append(done)
        results = yield self.cameras([good])
        yield defer.gatherResults(closed)  # each one closed by the gateway (the last by the idle timeout)
        self.assertTrue(results[0].ok)
        self.assertEqual(self.stored(), self.expected([good]))
        self.assertGreaterEqual(self.gateway.services.stats.protocol_errors, 3)

    @defer.inlineCallbacks
    def test_max_connections(self) -> Any:
        yield self.start_gateway(max_connections=2, idle_timeout=5.0)
        held = [socket.create_connection(("127.0.0.1", self.port)) for _ in range(2)]
        self.addCleanup(lambda: [s.close() for s in held])
        yield defer.succeed(None)
        extra = socket.create_connection(("127.0.0.1", self.port))
        extra.settimeout(5)
        d = defer.Deferred()
        reactor.callLater(0.3, d.callback, None)
        yield d
        self.assertEqual(extra.recv(10), b"")  # refused: closed at once
        extra.close()
        self.assertEqual(self.gateway.services.stats.connections_refused, 1)


class ReplyTests(GatewayTestCase):
    """Replies go out with one send when nothing is queued, and in order when the socket takes less."""

    def start_gateway(self, root: Path | None = None, **config: Any) -> Any:
        """With the speed-ups on, whatever CAMGATEWAY_PERFORMANCE says: the direct send is what is tested."""
        config.setdefault("performance", Performance.every(True))
        return super().start_gateway(root, **config)

    def spy_writes(self) -> list[bytes]:
        from twisted.internet import tcp

        writes: list[bytes] = []
        real = tcp.Server.write

        def write(transport: Any, data: bytes) -> None:
            writes.append(data)
            real(transport, data)

        self.patch(tcp.Server, "write", write)
        return writes

    @defer.inlineCallbacks
    def test_replies_skip_the_transport_buffer(self) -> Any:
        yield self.start_gateway()
        writes = self.spy_writes()
        rng = random.Random(4)
        specs = [camera(n, kind, rng, ContentPool(rng, variants=2), videos=1) for n, kind in enumerate(("dualcam", "dsm"))]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        self.assertEqual(self.stored(), self.expected(specs))
        self.assertEqual(writes, [])  # every reply was sent at once

    @defer.inlineCallbacks
    def test_what_the_socket_does_not_take_follows_through_the_transport(self) -> Any:
        yield self.start_gateway()
        writes = self.spy_writes()
        short: list[int] = []

        class ShortSocket:
            """Takes one byte of every other reply, refuses every third."""

            def __init__(self, real: socket.socket) -> None:
                self._real = real
                self._n = 0

            def send(self, data: bytes) -> int:
                self._n += 1
                if self._n % 3 == 0:
                    short.append(0)
                    raise BlockingIOError(errno.EAGAIN, "would block")
                if self._n % 2 == 0:
                    short.append(1)
                    return self._real.send(data[:1])
                return self._real.send(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._real, name)

        factory = self.gateway.factory
        real_build = factory.buildProtocol

        def build(addr: Any) -> Any:
            protocol = real_build(addr)
            real_made = protocol.connectionMade

            def made() -> None:
                protocol.transport.socket = ShortSocket(protocol.transport.socket)
                real_made()

            protocol.connectionMade = made
            return protocol

        self.patch(factory, "buildProtocol", build)
        rng = random.Random(5)
        specs = [camera(n, kind, rng, ContentPool(rng, variants=2)) for n, kind in enumerate(("dualcam", "dsm", "adas"))]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        self.assertEqual(self.stored(), self.expected(specs))
        self.assertTrue(short and writes)  # the rest of those replies went through the transport
