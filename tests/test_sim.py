"""Tests of the camera emulator (camgateway.sim).

Unit tests drive :class:`CameraProtocol` on a ``StringTransport`` with a
``Clock``; integration tests run cameras over loopback against
:class:`FakeGateway`, a small server written here from PROTOCOL.md alone, so
these tests do not depend on the real gateway.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from camgateway.wire import codec
from camgateway.wire.crc import crc16
from camgateway.sim import (
    Camera,
    CameraProtocol,
    CameraSpec,
    SimFile,
    adas_metadata,
    dsm_metadata,
    dualcam_metadata,
    files_from_dir,
    json_metadata,
    make_files,
    parse_size,
    random_jpeg,
    run_cameras,
)
from camgateway.sim.frames import FileStream, FramePlan
from camgateway.sim.pacer import PacedCall, Pacer, pacer_for
from camgateway.sim.sender import Sender

IMEI = 863719061653375
BASE_BITS = 0x40000400
_hh = struct.Struct(">HH")
_u32 = struct.Struct(">I")


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic non-repeating test content."""
    import random

    return random.Random(seed).randbytes(size)


# ---------------------------------------------------------------------------
# Helpers for StringTransport tests


class SegmentRecordingTransport(StringTransport):
    """A StringTransport that keeps every write separately and, like a TCP
    transport, pauses its streaming producer while holding more than
    ``pause_over`` unsent bytes."""

    def __init__(self, pause_over: Optional[int] = None) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.pause_over = pause_over

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        super().write(data)
        if self.pause_over is not None and len(self.value()) > self.pause_over and self.producer:
            self.producer.pauseProducing()



def split_device_stream(data: bytes) -> list[tuple[Any, bytes]]:
    """Device bytes as ``("init", 16 bytes)`` and ``(cmd, payload)`` items."""
    out: list[tuple[Any, bytes]] = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 2] == b"\0\0":
            out.append(("init", data[pos : pos + 16]))
            pos += 16
            continue
        cmd, length = _hh.unpack_from(data, pos)
        out.append((cmd, data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    return out


def settings_of(init: bytes) -> int:
    return struct.unpack(">HHQI", init)[3]


def check_data_run(frames: list[tuple[Any, bytes]], content: bytes, start: int) -> int:
    """Check DATA frames (chain from 0) rebuild ``content[start:]``; return frame count."""
    data = [p for c, p in frames if c == codec.Cmd.DATA]
    prev = 0
    got = b""
    for payload in data:
        body, crc = payload[:-2], _hh.unpack(b"\0\0" + payload[-2:])[1]
        expected = crc16(body, prev)
        assert crc == expected, f"CRC {crc:04x} != {expected:04x} at frame {len(got) // 1024}"
        prev = crc
        got += body
    assert got == content[start:], (len(got), len(content) - start)
    return len(data)


class Harness:
    """One camera, one StringTransport connection at a time, one Clock."""

    def __init__(
        self,
        spec: CameraSpec,
        batch_frames: int = 32,
        idle_timeout: Optional[float] = None,
        pause_over: Optional[int] = None,
    ) -> None:
        self.pause_over = pause_over
        self.camera = Camera(spec)
        self.clock = Clock()
        self.batch_frames = batch_frames
        self.idle_timeout = idle_timeout
        self.connect()

    def connect(self) -> None:
        self.transport = SegmentRecordingTransport(self.pause_over)
        self.protocol = CameraProtocol(
            self.camera, self.clock, batch_frames=self.batch_frames, idle_timeout=self.idle_timeout
        )
        self.protocol.makeConnection(self.transport)

    def take(self) -> list[tuple[Any, bytes]]:
        """Everything written since the last take, as frames."""
        data = self.transport.value()
        self.transport.clear()
        return split_device_stream(data)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def pump(self, horizon: float = 60.0) -> None:
        """Run every delayed call due within ``horizon`` seconds."""
        end = self.clock.seconds() + horizon
        for _ in range(1_000_000):
            calls = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not calls:
                return
            self.clock.advance(max(0.0, min(calls) - self.clock.seconds()))
        raise AssertionError("pump did not settle")

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def photo(name: str = "photof", size: int = 2500, seed: int = 1) -> SimFile:
    if name.startswith("/"):
        meta = dsm_metadata(timestamp=1730288144, file_type=1)
    else:
        meta = dualcam_metadata(name, timestamp_ms=1730288144000)
    return SimFile(name, blob(size, seed), meta)


# ---------------------------------------------------------------------------
# A fake gateway, from PROTOCOL.md's server side


class FakeGateway(Protocol):
    """Server side of PROTOCOL.md for DualCam and path flow, strict about CRCs."""

    def __init__(self, factory: "FakeGatewayFactory") -> None:
        self.f = factory
        self.buf = bytearray()
        self.state = "init"
        self.discarding = False
        self.queue: list[str] = []
        self.imei = 0
        self.protocol_id = 0
        self.used_repeat = False
        self.meta_timer: Any = None

    # byte stream -> frames
    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.state == "closed":
                return
            if self.discarding:
                i = self.buf.find(codec.SYNC_MARK)
                if i < 0 or len(self.buf) - i < 8:
                    if i < 0:
                        del self.buf[: max(0, len(self.buf) - 3)]
                    return
                del self.buf[:i]
                self.discarding = False
            if self.state == "init":
                if len(self.buf) < 16:
                    return
                head = bytes(self.buf[:16])
                del self.buf[:16]
                self.on_init(head)
                continue
            if len(self.buf) < 4:
                return
            cmd, length = _hh.unpack_from(self.buf, 0)
            if len(self.buf) < 4 + length:
                return
            payload = bytes(self.buf[4 : 4 + length])
            del self.buf[: 4 + length]
            self.on_frame(cmd, payload)

    def on_init(self, head: bytes) -> None:
        zero, self.protocol_id, self.imei, settings = struct.unpack(">HHQI", head)
        if zero != 0:
            self.f.garbage_seen += 1
            self.state = "closed"
            self.transport.loseConnection()
            return
        self.f.inits.append((self.imei, settings))
        if settings & 0x02000000 or self.protocol_id >= 6:
            self.queue = ["path"] if settings & 0x02000000 else []
        else:
            bits = {"videor": 0x20000000, "videof": 0x10000000, "photor": 0x08000000, "photof": 0x04000000}
            self.queue = [s for s, b in bits.items() if settings & b]
        self.next_file()

    def next_file(self) -> None:
        if not self.queue:
            self.write(codec.close())
            self.state = "closing"
            return
        item = self.queue.pop(0)
        if item == "path":
            self.write(codec.path_request())
            self.state = "path"
        else:
            self.begin(("%" + item).encode(), item, dualcam=True)

    def begin(self, request: bytes, name: str, dualcam: bool) -> None:
        self.request, self.name, self.dualcam = request, name, dualcam
        if self.f.metadata:
            self.write(codec.metadata_request(request if dualcam else b""))
            self.state = "meta"
            self.meta_timer = reactor.callLater(self.f.metadata_timeout, self.request_file)
        else:
            self.request_file()

    def request_file(self) -> None:
        self.meta_timer = None
        self.write(codec.file_request(self.request))
        self.state = "start"

    def on_frame(self, cmd: int, payload: bytes) -> None:
        handler = {
            0x000D: self.on_path, 0x000B: self.on_metadata, 0x0001: self.on_start,
            0x0005: self.on_status, 0x0003: self.on_sync, 0x0004: self.on_data, 0x000E: self.on_enhanced,
        }.get(cmd)
        if handler is None:
            self.fail(f"unexpected command 0x{cmd:04x}")
        else:
            handler(payload)

    def on_path(self, payload: bytes) -> None:
        if payload == b"\0":
            self.write(codec.close())
            self.state = "closing"
            return
        self.begin(payload, payload.rstrip(b"\0").decode(), dualcam=False)

    def on_metadata(self, payload: bytes) -> None:
        if self.state != "meta":
            return  # late, after the timeout: ignored (PROTOCOL.md 5.1)
        self.meta_timer.cancel()
        self.f.metadata_seen.append((self.imei, self.name, payload))
        self.request_file()

    def on_start(self, payload: bytes) -> None:
        self.total, self.start_crc = struct.unpack(">IH", payload)
        self.f.starts.append((self.imei, self.name, self.total, self.start_crc))
        if self.total == 0:
            self.store(b"")
            return
        self.key = (self.imei, self.name, self.total)
        self.held = self.f.partials.pop(self.key, bytearray())
        self.size = None if self.dualcam else self.total
        self.resume(len(self.held) // 1024 + 1 if self.dualcam else len(self.held))

    def resume(self, position: int) -> None:
        self.f.resumes.append((self.imei, self.name, position))
        self.write(codec.resume(position))
        self.state = "sync"

    def on_status(self, payload: bytes) -> None:
        self.f.statuses.append((self.imei, self.name, _u32.unpack(payload)[0]))
        self.finish()

    def on_sync(self, payload: bytes) -> None:
        position = _u32.unpack(payload)[0]
        at = (max(position, 1) - 1) * 1024 if self.dualcam else position
        if at > len(self.held):
            return self.resume(len(self.held) // 1024 + 1 if self.dualcam else len(self.held))
        del self.held[at:]
        self.prev_crc = 0
        self.state = "data"

    def on_data(self, payload: bytes, offset: Optional[int] = None) -> None:
        if self.state != "data":
            return self.fail(f"DATA in state {self.state}")
        body, crc = payload[:-2], _hh.unpack(b"\0\0" + payload[-2:])[1]
        if crc != crc16(body, self.prev_crc) or (offset is not None and offset != len(self.held)):
            self.f.bad_crcs += 1
            self.resume(len(self.held) // 1024 + 1 if self.dualcam else len(self.held))
            self.discarding = True
            return
        self.prev_crc = crc
        self.held += body
        done = len(self.held) >= self.size if self.size is not None else -(-len(self.held) // 1024) >= self.total
        if done:
            if self.size is not None and self.start_crc != crc16(bytes(self.held)):
                self.f.errors.append(f"whole-file CRC mismatch for {self.name}")
            self.store(bytes(self.held))

    def on_enhanced(self, payload: bytes) -> None:
        self.f.enhanced += 1
        self.on_data(payload[4:], offset=_u32.unpack(payload[:4])[0])

    def store(self, content: bytes) -> None:
        self.f.stored.append((self.imei, self.name, content))
        self.finish()

    def finish(self) -> None:
        if self.f.finish_with == "complete" and not self.used_repeat:
            self.write(codec.complete())
            self.state = "closing"
            return
        self.used_repeat = True
        self.f.repeats += 1
        self.write(codec.repeat_init())
        self.state = "init"

    def fail(self, message: str) -> None:
        self.f.errors.append(f"{self.imei}: {message}")
        self.state = "closed"
        self.transport.loseConnection()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        if self.meta_timer is not None and self.meta_timer.active():
            self.meta_timer.cancel()
        if self.state in ("sync", "data") and self.held:
            keep = len(self.held) // 1024 * 1024 if self.dualcam else len(self.held)
            self.f.partials[self.key] = self.held[:keep]
        self.f.lost[self].callback(None)


class FakeGatewayFactory(Factory):
    def __init__(self, metadata: bool = True, metadata_timeout: float = 0.5, finish_with: str = "repeat") -> None:
        self.metadata = metadata
        self.metadata_timeout = metadata_timeout
        self.finish_with = finish_with
        self.stored: list[tuple[int, str, bytes]] = []
        self.partials: dict[tuple[int, str, int], bytearray] = {}
        self.metadata_seen: list[tuple[int, str, bytes]] = []
        self.starts: list[tuple[int, str, int, int]] = []
        self.resumes: list[tuple[int, str, int]] = []
        self.statuses: list[tuple[int, str, int]] = []
        self.inits: list[tuple[int, int]] = []
        self.errors: list[str] = []
        self.bad_crcs = 0
        self.enhanced = 0
        self.repeats = 0
        self.garbage_seen = 0
        self.lost: dict[FakeGateway, Deferred[None]] = {}

    def buildProtocol(self, addr: Any) -> FakeGateway:
        p = FakeGateway(self)
        self.lost[p] = Deferred()
        return p

    def stored_by_name(self, imei: int) -> dict[str, bytes]:
        return {name: content for i, name, content in self.stored if i == imei}


class LoopbackMixin:
    """Starts a FakeGateway on 127.0.0.1:0; cleanup waits for every connection to end."""

    timeout = 20

    def start_gateway(self, **kw: Any) -> FakeGatewayFactory:
        factory = FakeGatewayFactory(**kw)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(lambda: gatherResults(list(factory.lost.values())))  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)  # type: ignore[attr-defined]
        return factory

    def endpoint(self, spec: CameraSpec) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)

    def run_sim(self, specs: list[CameraSpec], **kw: Any) -> Deferred[list[Any]]:
        kw.setdefault("idle_timeout", 5.0)
        return run_cameras(reactor, self.endpoint, specs, **kw)


# ---------------------------------------------------------------------------
# Unit tests


class MetadataTests(unittest.TestCase):
    def test_dualcam_v3_matches_real_capture(self) -> None:
        """The metadata of vectors/dualcam-video-front-resume.json, rebuilt."""
        captured = bytes.fromhex(
            "0310000001 92d84dac30 00 0003 14 012c 4038ebc68bf95651 4050c8a2f05a708f".replace(" ", "")
        )
        lat, lon = struct.unpack(">dd", captured[16:])
        built = dualcam_metadata(
            "videof", timestamp_ms=0x192D84DAC30, length_s=3, framerate=20, timezone_min=300,
            latitude=lat, longitude=lon,
        )
        self.assertEqual(built, captured)

    def test_dualcam_versions_and_types(self) -> None:
        sizes = {v: len(dualcam_metadata("photor", timestamp_ms=1, version=v)) for v in (1, 2, 3, 4)}
        self.assertEqual(sizes, {1: 13, 2: 14, 3: 32, 4: 40})
        for source, kind in {"photof": 4, "photor": 8, "videof": 16, "videor": 32}.items():
            self.assertEqual(dualcam_metadata(source, timestamp_ms=0)[1], kind)

    def test_dsm_layout(self) -> None:
        meta = dsm_metadata(timestamp=1730288144, file_type=1, trigger=13, latitude=-33.5,
                            longitude=151.25, events=0b101, driver_name="JONAS")
        self.assertEqual(len(meta), 26)
        ts, ftype, trig, lat, lon, events, name = struct.unpack(">IBBiiH10s", meta)
        self.assertEqual((ts, ftype, trig, lat, lon, events), (1730288144, 1, 13, -33500000, 151250000, 5))
        self.assertEqual(name, b"SANOJ\0\0\0\0\0")
        self.assertEqual(dsm_metadata(timestamp=0, file_type=0, driver_name="ABCDEFGHIJKL")[16:], b"JIHGFEDCBA")

    def test_adas_and_json(self) -> None:
        meta = adas_metadata(timestamp=5, file_type=0, trigger=3, latitude=1.5, longitude=-2.25, length_s=10)
        self.assertEqual(meta, struct.pack(">IBBiiB", 5, 0, 3, 1500000, -2250000, 10))
        doc = json.loads(json_metadata(file_type="video", timestamp_ms=7, duration=3, driver_name="X"))
        self.assertEqual(doc["file"]["duration"], 3)
        self.assertEqual(doc["driver_name"], "X")
        self.assertIn("location", doc)


class ContentTests(unittest.TestCase):
    def test_parse_size(self) -> None:
        self.assertEqual([parse_size(s) for s in ("100", "30K", "2M", "1.5k")], [100, 30720, 2097152, 1536])
        self.assertRaises(ValueError, parse_size, "lots")

    def test_random_jpeg(self) -> None:
        import random

        jpeg = random_jpeg(5000, random.Random(1))
        self.assertEqual((len(jpeg), jpeg[:2], jpeg[-2:]), (5000, b"\xff\xd8", b"\xff\xd9"))

    def test_make_files_identifiers(self) -> None:
        dual = make_files("dualcam", photos=2, videos=2, photo_size=10, video_size=10)
        self.assertEqual([f.identifier for f in dual], ["photof", "photor", "videof", "videor"])
        self.assertEqual([len(f.metadata or b"") for f in dual], [32] * 4)
        dsm = make_files("dsm", photos=1, videos=1, photo_size=10, video_size=10)
        self.assertTrue(dsm[1].identifier.startswith("/sdcard/dsm/video_"))
        self.assertEqual(len(dsm[0].metadata or b""), 26)
        adas = make_files("adas", photos=1, photo_size=10)
        self.assertIn("/mdas9/", adas[0].identifier)
        self.assertEqual(len(adas[0].metadata or b""), 15)
        v6 = make_files("dualcam", protocol_id=6, photos=1, photo_size=10)
        self.assertIn("/dualcam_front/", v6[0].identifier)
        json.loads(v6[0].metadata or b"")

    def test_files_from_dir(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        for name, data in (("a.jpg", b"\xff\xd8x\xff\xd9"), ("b.h265", b"video")):
            with open(os.path.join(d, name), "wb") as fh:
                fh.write(data)
        files = files_from_dir(d, "dsm")
        self.assertEqual([(f.identifier, f.content) for f in files],
                         [("/sdcard/dsm/a.jpg", b"\xff\xd8x\xff\xd9"), ("/sdcard/dsm/b.h265", b"video")])
        self.assertEqual([f.identifier for f in files_from_dir(d, "dualcam")], ["photof", "videof"])

    def test_spec_validation(self) -> None:
        self.assertRaises(ValueError, CameraSpec, IMEI, "dsm", (photo("photof"),))
        self.assertRaises(ValueError, CameraSpec, IMEI, "dualcam", (photo("photof"),), protocol_id=6)
        self.assertRaises(ValueError, CameraSpec, IMEI, "dsm", (), enhanced_data=True)
        self.assertRaises(ValueError, CameraSpec, IMEI, status_instead_of_start={"videor"},
                          status_after_start={"videor"})
        self.assertRaises(ValueError, CameraSpec, IMEI, status_after_start={"videor"}, status_after_start_code=0)
        self.assertEqual(CameraSpec(IMEI, status_after_start=["videor"]).status_after_start, frozenset({"videor"}))


class FramePlanTests(unittest.TestCase):
    def test_chains(self) -> None:
        content = blob(5000)
        plan = FramePlan(content)
        self.assertEqual((plan.count, plan.size, plan.file_crc), (5, 5000, crc16(content)))
        chain = plan.chain(0)
        self.assertEqual(len(chain), 5)
        self.assertEqual(chain[-1], struct.pack(">H", crc16(content)))
        self.assertEqual(plan.chain(2048)[0], struct.pack(">H", crc16(content[2048:3072])))
        self.assertEqual(plan.chain(1000)[0], struct.pack(">H", crc16(content[1000:1024])))

    def test_stream_frames_and_faults(self) -> None:
        content = blob(3000)
        tainted: set[int] = set()
        stream = FileStream(FramePlan(content), 0, corrupt=lambda i: i == 1, tainted=tainted)
        frames = split_device_stream(stream.take(10))
        self.assertTrue(stream.finished)
        self.assertEqual(tainted, {1})
        self.assertRaises(AssertionError, check_data_run, frames, content, 0)
        enhanced = split_device_stream(FileStream(FramePlan(content), 1024, enhanced=True).take(10))
        self.assertEqual([(c, _u32.unpack(p[:4])[0]) for c, p in enhanced], [(0x000E, 1024), (0x000E, 2048)])


class InitTests(unittest.TestCase):
    def test_dualcam_bits(self) -> None:
        spec = CameraSpec(IMEI, "dualcam", (photo("photof"), photo("videor")))
        [(tag, init)] = Harness(spec).take()
        self.assertEqual(tag, "init")
        self.assertEqual(init, codec.init_packet(5, IMEI, BASE_BITS | 0x04000000 | 0x20000000))
        self.assertEqual(init[:12].hex(), "00000005" + "0003118c43db077f")

    def test_path_flow_bits(self) -> None:
        for kind in ("dsm", "adas", "dashcam"):
            spec = CameraSpec(IMEI, kind, (photo("/sdcard/x/a.jpg"),))
            self.assertEqual(settings_of(Harness(spec).take()[0][1]), BASE_BITS | 0x02000000)
        spec = CameraSpec(IMEI, "dualcam", (photo("/sdcard/dualcam_front/a.jpg"),), protocol_id=6)
        [(_, init)] = Harness(spec).take()
        self.assertEqual((init[3], settings_of(init)), (6, BASE_BITS | 0x02000000))

    def test_nothing_pending(self) -> None:
        self.assertEqual(settings_of(Harness(CameraSpec(IMEI)).take()[0][1]), BASE_BITS)


class DeviceSideTests(unittest.TestCase):
    def test_dualcam_start_is_packet_count(self) -> None:
        h = Harness(CameraSpec(IMEI, files=(photo("photof", 2500),)))
        h.take()
        h.send(codec.file_request(b"%photof"))
        self.assertEqual(h.take(), [(codec.Cmd.START, struct.pack(">IH", 3, 0))])

    def test_path_start_is_size_and_crc(self) -> None:
        f = photo("/sdcard/dsm/video_1730288144_0.mp4", 2500)
        h = Harness(CameraSpec(IMEI, "dsm", (f,)))
        h.take()
        h.send(codec.path_request())
        self.assertEqual(h.take(), [(codec.Cmd.PATH, b"/sdcard/dsm/video_1730288144_0.mp4\0")])
        h.send(codec.file_request(f.wire_path))
        self.assertEqual(h.take(), [(codec.Cmd.START, struct.pack(">IH", 2500, crc16(f.content)))])

    def test_empty_file_start_zero_and_delivered(self) -> None:
        h = Harness(CameraSpec(IMEI, files=(SimFile("photor", b""),)))
        h.take()
        h.send(codec.file_request(b"%photor"))
        self.assertEqual(h.take(), [(codec.Cmd.START, b"\0" * 6)])
        h.send(codec.repeat_init())
        self.assertEqual(settings_of(h.take()[0][1]), BASE_BITS)
        self.assertEqual(h.camera.result.delivered, [("photor", 0)])

    def test_path_request_without_files(self) -> None:
        h = Harness(CameraSpec(IMEI, "dsm"))
        h.take()
        h.send(codec.path_request())
        self.assertEqual(h.take(), [(codec.Cmd.PATH, b"\0")])

    def test_metadata_answer_and_never(self) -> None:
        f = SimFile("/sdcard/dsm/a.jpg", b"x", dsm_metadata(timestamp=1, file_type=1))
        h = Harness(CameraSpec(IMEI, "dsm", (f,)))
        h.take()
        h.send(codec.path_request() + codec.metadata_request())
        self.assertEqual(h.take()[1], (codec.Cmd.METADATA, f.metadata))
        d = Harness(CameraSpec(IMEI, files=(photo("videof"),)))
        d.take()
        d.send(codec.metadata_request(b"%videof"))
        self.assertEqual(d.take(), [(codec.Cmd.METADATA, photo("videof").metadata)])
        old = Harness(CameraSpec(IMEI, files=(photo("videof"),), metadata_behaviour="never"))
        old.take()
        old.send(codec.metadata_request(b"%videof"))
        self.assertEqual(old.take(), [])
        self.assertEqual(old.camera.result.metadata_requests, 1)

    def test_whole_transfer_then_repeat_init_and_close(self) -> None:
        f = photo("photof", 5000)
        h = Harness(CameraSpec(IMEI, files=(f,)))
        h.take()
        h.send(codec.file_request(b"%photof") + codec.resume(1))
        h.pump()
        frames = h.take()
        self.assertEqual(frames[:2], [(codec.Cmd.START, struct.pack(">IH", 5, 0)), (codec.Cmd.SYNC, _u32.pack(1))])
        self.assertEqual(check_data_run(frames[2:], f.content, 0), 5)
        h.send(codec.repeat_init())
        self.assertEqual(settings_of(h.take()[0][1]), BASE_BITS)
        h.send(codec.close())
        self.assertTrue(h.transport.disconnecting)
        self.assertIsNone(h.transport.producer)
        r = h.camera.result
        self.assertEqual((r.delivered, r.resumes, r.syncs, r.closes, r.errors), ([("photof", 5000)], [1], [1], 1, []))

    def test_resume_mid_file(self) -> None:
        f = photo("/sdcard/dsm/v.mp4", 5000)
        h = Harness(CameraSpec(IMEI, "dsm", (f,)))
        h.send(codec.path_request() + codec.file_request(f.wire_path) + codec.resume(2048))
        h.pump()
        frames = h.take()[3:]
        self.assertEqual(frames[0], (codec.Cmd.SYNC, _u32.pack(2048)))
        self.assertEqual(check_data_run(frames[1:], f.content, 2048), 3)

    def test_dualcam_resume_positions(self) -> None:
        f = photo("photof", 5000)
        h = Harness(CameraSpec(IMEI, files=(f,)))
        h.send(codec.file_request(b"%photof") + codec.resume(0))
        h.pump()
        frames = h.take()[2:]
        self.assertEqual(frames[0], (codec.Cmd.SYNC, _u32.pack(1)))
        check_data_run(frames[1:], f.content, 0)
        h.send(codec.resume(3))
        h.pump()
        frames = h.take()
        self.assertEqual(frames[0], (codec.Cmd.SYNC, _u32.pack(3)))
        check_data_run(frames[1:], f.content, 2048)

    def test_unaligned_and_beyond_end_resumes(self) -> None:
        f = photo("/sdcard/dsm/v.mp4", 5000)
        h = Harness(CameraSpec(IMEI, "dsm", (f,)))
        h.send(codec.path_request() + codec.file_request(f.wire_path) + codec.resume(1000))
        h.pump()
        frames = h.take()[3:]
        self.assertEqual(frames[0], (codec.Cmd.SYNC, _u32.pack(1000)))
        self.assertEqual(len(frames[1][1]), 24 + 2)
        check_data_run(frames[1:], f.content, 1000)
        h.send(codec.resume(9999))
        h.pump()
        frames = h.take()
        self.assertEqual(frames[0], (codec.Cmd.SYNC, _u32.pack(0)))
        check_data_run(frames[1:], f.content, 0)
        self.assertEqual(len(h.camera.result.errors), 1)

    def test_resume_arriving_mid_stream(self) -> None:
        f = photo("/sdcard/dsm/v.mp4", 10 * 1024)
        h = Harness(CameraSpec(IMEI, "dsm", (f,)), batch_frames=2, pause_over=1500)
        h.send(codec.path_request() + codec.file_request(f.wire_path) + codec.resume(0))
        h.pump()  # one batch, then the full transport pauses the stream
        first = h.take()[3:]
        self.assertEqual([c for c, _ in first], [codec.Cmd.SYNC, codec.Cmd.DATA, codec.Cmd.DATA])
        h.send(codec.resume(1024))  # as after a bad CRC in frame 1
        h.transport.pause_over = None
        h.transport.producer.resumeProducing()  # the buffer drained
        h.pump()
        frames = h.take()
        self.assertEqual(frames[0], (codec.Cmd.SYNC, _u32.pack(1024)))
        self.assertEqual(check_data_run(frames[1:], f.content, 1024), 9)
        self.assertEqual(h.camera.result.syncs, [0, 1024])

    def test_enhanced_data(self) -> None:
        f = photo("/sdcard/dsm/v.mp4", 3000)
        h = Harness(CameraSpec(IMEI, "dsm", (f,), protocol_id=6, enhanced_data=True))
        h.send(codec.path_request() + codec.file_request(f.wire_path) + codec.resume(0))
        h.pump()
        frames = h.take()[4:]
        self.assertEqual([(c, _u32.unpack(p[:4])[0]) for c, p in frames], [(0x000E, 0), (0x000E, 1024), (0x000E, 2048)])
        check_data_run([(codec.Cmd.DATA, p[4:]) for _, p in frames], f.content, 0)

    def test_incomplete_file_stays_pending(self) -> None:
        f = photo("photof", 5000)
        h = Harness(CameraSpec(IMEI, files=(f,)), batch_frames=1, pause_over=100)
        h.send(codec.file_request(b"%photof") + codec.resume(1))
        h.pump()
        h.send(codec.repeat_init())
        self.assertEqual(settings_of(h.take()[-1][1]), BASE_BITS | 0x04000000)
        self.assertEqual(h.camera.pending, [0])

    def test_complete_and_unknown_file(self) -> None:
        h = Harness(CameraSpec(IMEI, files=(photo("photof"),)))
        h.take()
        h.send(codec.file_request(b"%videor"))
        self.assertEqual(h.take(), [(codec.Cmd.STATUS, _u32.pack(0x11))])
        h.send(codec.complete())
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual((h.camera.result.completes, len(h.camera.result.errors)), (1, 1))

    def test_idle_timeout(self) -> None:
        h = Harness(CameraSpec(IMEI, files=(photo("photof"),)), idle_timeout=5)
        h.clock.advance(5)
        self.assertTrue(h.transport.disconnected)
        self.assertIn("silent", h.camera.result.errors[0])


class FaultTests(unittest.TestCase):
    def test_bad_crc_once_then_resent(self) -> None:
        f = photo("photof", 5000)
        h = Harness(CameraSpec(IMEI, files=(f,), bad_crc_frames=frozenset({2})))
        h.send(codec.file_request(b"%photof") + codec.resume(1))
        h.pump()
        frames = h.take()[3:]
        self.assertRaises(AssertionError, check_data_run, frames, f.content, 0)
        check_data_run(frames[:2], f.content[:2048], 0)
        h.send(codec.resume(3))  # the gateway asks again from packet 3
        h.pump()
        frames = h.take()
        self.assertEqual(frames[0], (codec.Cmd.SYNC, _u32.pack(3)))
        check_data_run(frames[1:], f.content, 2048)
        h.send(codec.repeat_init())
        r = h.camera.result
        self.assertEqual((r.delivered, r.bad_crcs_sent, r.errors), ([("photof", 5000)], 1, []))

    def test_bad_crc_never_resumed_is_an_error(self) -> None:
        h = Harness(CameraSpec(IMEI, files=(photo("photof", 3000),), bad_crc_frames=frozenset({0})))
        h.send(codec.file_request(b"%photof") + codec.resume(1))
        h.pump()
        h.send(codec.repeat_init())
        self.assertIn("bad CRC", h.camera.result.errors[0])

    def test_drop_then_resume_on_next_connection(self) -> None:
        f = photo("/sdcard/dsm/v.mp4", 5000)
        h = Harness(CameraSpec(IMEI, "dsm", (f,), drop_after_frames=1))
        h.send(codec.path_request() + codec.file_request(f.wire_path) + codec.resume(0))
        h.pump()
        frames = h.take()[4:]
        self.assertEqual(check_data_run(frames, f.content[:2048], 0), 2)
        self.assertTrue(h.transport.disconnecting)
        self.assertIsNone(h.transport.producer)
        h.lose()
        self.assertEqual((h.camera.pending, h.camera.result.closed_by_peer), ([0], 0))
        h.connect()
        self.assertEqual(settings_of(h.take()[0][1]), BASE_BITS | 0x02000000)
        h.send(codec.path_request() + codec.file_request(f.wire_path) + codec.resume(2048))
        h.pump()
        frames = h.take()[2:]
        self.assertEqual(frames[0], (codec.Cmd.SYNC, _u32.pack(2048)))
        check_data_run(frames[1:], f.content, 2048)
        self.assertFalse(h.transport.disconnecting)  # the drop fires once
        h.send(codec.repeat_init())
        r = h.camera.result
        self.assertEqual((r.delivered, r.drops, r.connections, r.resumes), ([(f.identifier, 5000)], 1, 2, [0, 2048]))

    def test_status_instead_of_start(self) -> None:
        h = Harness(CameraSpec(IMEI, files=(photo("photof"), photo("videof")),
                               status_instead_of_start=frozenset({"photof"})))
        h.take()
        h.send(codec.file_request(b"%photof"))
        self.assertEqual(h.take(), [(codec.Cmd.STATUS, _u32.pack(0x11))])
        h.send(codec.repeat_init())
        self.assertEqual(settings_of(h.take()[0][1]), BASE_BITS | 0x10000000)
        self.assertEqual((h.camera.result.refused, h.camera.result.errors), (["photof"], []))

    def test_status_after_start(self) -> None:
        video, still = photo("videor", 3000, 2), photo("photof", 2500, 3)
        h = Harness(CameraSpec(IMEI, files=(video, still), status_after_start=frozenset({"videor"})))
        h.take()
        h.transport.writes.clear()
        h.send(codec.file_request(b"%videor"))
        # START and STATUS 6 leave in one write, as the real DualCam sent them.
        self.assertEqual(h.transport.writes, [codec.start(3, 0) + codec.status(6)])
        self.assertEqual(h.take(), [(codec.Cmd.START, struct.pack(">IH", 3, 0)), (codec.Cmd.STATUS, _u32.pack(6))])
        h.send(codec.resume(1))  # a gateway that answered the START before it read the STATUS
        h.pump()
        self.assertEqual(h.take(), [])
        h.send(codec.file_request(b"%photof") + codec.resume(1))  # the camera goes on with the next file
        h.pump()
        frames = h.take()
        self.assertEqual(frames[:2], [(codec.Cmd.START, struct.pack(">IH", 3, 0)), (codec.Cmd.SYNC, _u32.pack(1))])
        check_data_run(frames[2:], still.content, 0)
        h.send(codec.repeat_init())
        self.assertEqual(settings_of(h.take()[0][1]), BASE_BITS)  # the video is not offered again
        r = h.camera.result
        self.assertEqual((r.given_up, r.delivered, r.refused, r.starts, r.errors),
                         (["videor"], [("photof", 2500)], [], 2, []))
        h.send(codec.close())
        self.assertTrue(r.ok)

    def test_status_after_start_path_flow_and_code(self) -> None:
        f = photo("/sdcard/dsm/video_1730288144_0.mp4", 2500)
        h = Harness(CameraSpec(IMEI, "dsm", (f,), status_after_start=frozenset({f.identifier}),
                               status_after_start_code=13))
        h.take()
        h.send(codec.path_request())
        h.take()
        h.transport.writes.clear()
        h.send(codec.file_request(f.wire_path))
        self.assertEqual(h.transport.writes, [codec.start(2500, crc16(f.content)) + codec.status(13)])
        h.take()
        h.send(codec.repeat_init())
        self.assertEqual(settings_of(h.take()[0][1]), BASE_BITS)
        h.lose()
        h.connect()  # the next connection: the given-up file is not offered again
        self.assertEqual(settings_of(h.take()[0][1]), BASE_BITS)
        self.assertEqual((h.camera.result.given_up, h.camera.result.pending, h.camera.result.errors),
                         ([f.identifier], [], []))

    def test_a_resume_after_the_next_request_is_for_the_next_file(self) -> None:
        h = Harness(CameraSpec(IMEI, files=(photo("videor"), photo("photof")),
                               status_after_start=frozenset({"videor"})))
        h.send(codec.file_request(b"%videor") + codec.repeat_init())
        h.take()
        h.send(codec.resume(1))  # the file was given up and a new init sent: nothing to resume
        self.assertEqual(len(h.camera.result.errors), 1)

    def test_tiny_segments(self) -> None:
        f = photo("photof", 2100)
        spec = CameraSpec(IMEI, files=(f,), segment_sizes=(1, 7))
        h = Harness(spec)
        h.send(codec.file_request(b"%photof") + codec.resume(1))
        h.pump()
        self.assertTrue(all(1 <= len(w) <= 7 for w in h.transport.writes))
        self.assertGreater(len(h.transport.writes), 2100 // 7)
        plain = Harness(CameraSpec(IMEI, files=(f,)))
        plain.send(codec.file_request(b"%photof") + codec.resume(1))
        plain.pump()
        self.assertEqual(h.transport.value(), plain.transport.value())
        h.send(codec.repeat_init() + codec.close())
        self.assertFalse(h.transport.disconnecting)  # the init's pieces go out first
        h.pump()
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.transport.value()[-16:], codec.init_packet(5, IMEI, BASE_BITS))

    def test_slow_bps(self) -> None:
        f = photo("photof", 4096)
        h = Harness(CameraSpec(IMEI, files=(f,), slow_bps=10_300))
        h.send(codec.file_request(b"%photof") + codec.resume(1))
        h.clock.advance(0)
        self.assertEqual(sum(1 for c, _ in h.take() if c == codec.Cmd.DATA), 1)
        h.pump()
        self.assertAlmostEqual(h.clock.seconds(), 0.3, places=2)
        self.assertEqual(sum(1 for c, _ in h.take() if c == codec.Cmd.DATA), 3)

    def test_garbage(self) -> None:
        h = Harness(CameraSpec(IMEI, garbage=True))
        sent = h.transport.value()
        self.assertGreaterEqual(len(sent), 16)
        self.assertNotEqual(sent[:2], b"\0\0")
        h.send(b"\x12\x34")  # whatever the gateway says, the camera waits for its close
        h.lose()
        self.assertTrue(h.camera.result.ok)


# ---------------------------------------------------------------------------
# Loopback integration against FakeGateway


class PacerTests(unittest.TestCase):
    """One reactor timer paces every slow camera; calls due within a tick run together."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pacer = Pacer(self.clock, tick=0.01)
        self.made: list[tuple[str, float]] = []

    def call(self, delay: float, name: str) -> PacedCall:
        return self.pacer.call_later(delay, lambda: self.made.append((name, self.clock.seconds())))

    def test_calls_are_made_in_time_order_at_their_times(self) -> None:
        self.call(0.3, "c")
        self.call(0.1, "a")
        self.call(0.2, "b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.pump([0.1, 0.1, 0.1])
        self.assertEqual([n for n, _ in self.made], ["a", "b", "c"])
        for (_, at), want in zip(self.made, (0.1, 0.2, 0.3)):
            self.assertAlmostEqual(at, want)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_calls_within_a_tick_of_the_earliest_run_with_it(self) -> None:
        for i in range(100):
            self.call(1.0 + i * 0.0001, f"n{i}")  # 100 cameras due within 10 ms
        self.call(1.02, "later")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.made), 100)  # all at once, up to one tick early
        self.assertEqual({at for _, at in self.made}, {1.0})
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.02)
        self.assertEqual(self.made[-1][0], "later")

    def test_an_earlier_call_rearms_the_timer(self) -> None:
        self.call(5.0, "late")
        self.call(1.0, "early")
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [1.0])
        self.clock.advance(1.0)
        self.assertEqual([n for n, _ in self.made], ["early"])
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [5.0])

    def test_a_call_made_by_a_call_does_not_hold_back_earlier_ones(self) -> None:
        # A slow camera's frame schedules its next one a second later: the
        # cameras due in between must still go at their own times, not with it.
        self.pacer.call_later(1.0, lambda: self.call(1.0, "next of a"))
        self.call(1.5, "b")
        self.clock.advance(1.0)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [1.5])
        self.clock.advance(0.5)
        self.assertEqual(self.made, [("b", 1.5)])
        self.clock.advance(0.5)
        self.assertEqual([n for n, _ in self.made], ["b", "next of a"])

    def test_many_cameras_stay_spread_over_the_second(self) -> None:
        fired: list[float] = []

        def frame(i: int) -> None:
            fired.append(self.clock.seconds())
            self.pacer.call_later(1.0, lambda: frame(i))

        for i in range(40):  # set off 25 ms apart, more than a tick
            self.pacer.call_later(i * 0.025, lambda i=i: frame(i))
        self.clock.pump([0.005] * 800)
        for second in (1, 2, 3):
            times = [t for t in fired if second <= t < second + 1]
            self.assertEqual(len(times), 40)  # every camera once a second
            self.assertEqual(len(set(times)), 40)  # each at its own time: no burst

    def test_a_cancelled_call_is_not_made(self) -> None:
        gone = self.call(1.0, "gone")
        kept = self.call(2.0, "kept")
        self.assertTrue(gone.active())
        gone.cancel()
        self.assertFalse(gone.active())
        self.clock.advance(1.0)
        self.assertEqual(self.made, [])
        self.clock.advance(1.0)
        self.assertEqual([n for n, _ in self.made], ["kept"])
        self.assertFalse(kept.active())
        kept.cancel()  # cancelling a call made is harmless
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_pacer_per_clock(self) -> None:
        self.assertIs(pacer_for(self.clock), pacer_for(self.clock))
        self.assertIsNot(pacer_for(self.clock), pacer_for(Clock()))

    def test_call_at_a_time_on_the_clock(self) -> None:
        self.clock.advance(10.0)
        self.pacer.call_at(10.5, lambda: self.made.append(("at", self.clock.seconds())))
        self.pacer.call_at(9.0, lambda: self.made.append(("past", self.clock.seconds())))  # due: the next run
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [10.0])
        self.clock.advance(0)
        self.assertEqual(self.made, [("past", 10.0)])
        self.clock.advance(0.5)
        self.assertEqual(self.made, [("past", 10.0), ("at", 10.5)])


class _Chunks:
    """A FrameSource of given chunks, one a take."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.finished = not self.chunks
        self.drop_requested = False

    def take(self, max_frames: int) -> bytes:
        chunk = self.chunks.pop(0)
        self.finished = not self.chunks
        return chunk


class PacedSenderTests(unittest.TestCase):
    """A rate-limited camera's frames: one at a time, each after the last one's bytes at its rate."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = SegmentRecordingTransport()
        self.written: list[int] = []
        self.sender = Sender(self.transport, self.clock, slow_bps=1000, on_write=self.written.append)

    def sent(self) -> list[bytes]:
        return [bytes(w) for w in self.transport.writes]

    def test_frames_paced_by_their_size(self) -> None:
        self.sender.stream(_Chunks(b"a" * 500, b"b" * 1000, b"c" * 10))
        self.clock.advance(0)
        self.assertEqual(self.sent(), [b"a" * 500])
        self.clock.advance(0.49)
        self.assertEqual(len(self.sent()), 1)  # 500 bytes at 1,000 B/s: half a second
        self.clock.advance(0.01)
        self.assertEqual(self.sent()[-1], b"b" * 1000)
        self.clock.advance(0.99)
        self.assertEqual(len(self.sent()), 2)
        self.clock.advance(0.01)
        self.assertEqual(self.sent()[-1], b"c" * 10)
        self.assertEqual(self.written, [500, 1000, 10])
        self.assertFalse(self.sender.streaming)  # the source is done
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_rate_holds_into_the_next_stream(self) -> None:
        self.sender.stream(_Chunks(b"a" * 1000))
        self.clock.advance(0)
        self.sender.stream(_Chunks(b"b" * 100))  # the next file, at once
        self.clock.advance(0.5)
        self.assertEqual(self.sent(), [b"a" * 1000])  # not before the first one's second is over
        self.clock.advance(0.5)
        self.assertEqual(self.sent(), [b"a" * 1000, b"b" * 100])

    def test_paused_then_resumed(self) -> None:
        self.sender.stream(_Chunks(b"a" * 100, b"b" * 100))
        self.clock.advance(0)
        self.sender.pauseProducing()
        self.clock.advance(1.0)
        self.assertEqual(self.sent(), [b"a" * 100])
        self.sender.resumeProducing()
        self.clock.advance(0)
        self.assertEqual(self.sent(), [b"a" * 100, b"b" * 100])

    def test_a_stopped_stream_sends_nothing_more(self) -> None:
        self.sender.stream(_Chunks(b"a" * 100, b"b" * 100))
        self.clock.advance(0)
        self.sender.stop_stream()
        self.clock.advance(1.0)
        self.assertEqual(self.sent(), [b"a" * 100])


class LoopbackTests(LoopbackMixin, unittest.TestCase):
    def assert_all_stored(self, gateway: FakeGatewayFactory, specs: list[CameraSpec], results: list[Any]) -> None:
        self.assertEqual(gateway.errors, [])
        for spec, result in zip(specs, results):
            self.assertTrue(result.ok, (result.errors, result.pending))
            stored = gateway.stored_by_name(spec.imei)
            for f in spec.files:
                self.assertEqual(stored[f.identifier], f.content, f.identifier)

    @defer.inlineCallbacks
    def test_dualcam_all_sources(self) -> Any:
        gateway = self.start_gateway()
        files = (photo("photof", 3000, 1), photo("photor", 1024, 2), photo("videof", 40_000, 3), photo("videor", 0, 4))
        spec = CameraSpec(IMEI, "dualcam", files)
        [result] = yield self.run_sim([spec])
        self.assert_all_stored(gateway, [spec], [result])
        self.assertEqual([n for _, n, _ in gateway.stored], ["videor", "videof", "photor", "photof"])
        self.assertEqual(len(gateway.metadata_seen), 4)
        self.assertEqual((result.connections, result.repeat_inits, result.closes), (1, 4, 1))
        self.assertEqual(gateway.starts[1][2:], (40, 0))  # packets, blank CRC
        self.assertEqual(result.resumes, [1, 1, 1])

    @defer.inlineCallbacks
    def test_many_path_flow_cameras(self) -> Any:
        gateway = self.start_gateway()
        specs = []
        for n, kind in enumerate(["dsm", "adas", "dashcam", "dualcam"] * 3):
            protocol_id = 6 if n % 2 else 5
            if kind == "dualcam":
                protocol_id = 6
            files = make_files(kind, protocol_id=protocol_id, photos=1, videos=1, photo_size=2000 + n,
                               video_size=9000 + n, timestamp=1730000000 + n)
            specs.append(CameraSpec(IMEI + n, kind, tuple(files), protocol_id=protocol_id,  # type: ignore[arg-type]
                                    enhanced_data=protocol_id >= 6 and n % 3 == 0))
        results = yield self.run_sim(specs, concurrency=5)
        self.assert_all_stored(gateway, specs, results)
        self.assertGreater(gateway.enhanced, 0)
        self.assertEqual(len(gateway.stored), 24)
        for _, name, total, crc in gateway.starts:
            content = next(f.content for s in specs for f in s.files if f.identifier == name)
            self.assertEqual((total, crc), (len(content), crc16(content)))

    @defer.inlineCallbacks
    def test_drop_and_reconnect_resumes_from_stored_partial(self) -> Any:
        gateway = self.start_gateway()
        files = (photo("/sdcard/dsm/video_1730288144_0.mp4", 20_000), photo("/sdcard/dsm/picture_1730288144_1.jpg", 5000))
        dual = (photo("videof", 20_000, 5),)
        specs = [CameraSpec(IMEI, "dsm", files, drop_after_frames=3), CameraSpec(IMEI + 1, "dualcam", dual, drop_after_frames=3)]
        results = yield self.run_sim(specs)
        self.assert_all_stored(gateway, specs, results)
        self.assertEqual([(r.connections, r.drops) for r in results], [(3, 2), (2, 1)])
        self.assertEqual(results[0].resumes, [0, 4096, 0, 4096])
        self.assertEqual(results[1].resumes, [1, 5])

    @defer.inlineCallbacks
    def test_bad_crc_is_resumed_and_resent(self) -> Any:
        gateway = self.start_gateway()
        specs = [
            CameraSpec(IMEI, "dsm", (photo("/sdcard/dsm/v.mp4", 30_000),), bad_crc_frames=frozenset({2, 20})),
            CameraSpec(IMEI + 1, "dualcam", (photo("videor", 30_000),), bad_crc_frames=frozenset({5})),
        ]
        results = yield self.run_sim(specs)
        self.assert_all_stored(gateway, specs, results)
        self.assertEqual([r.bad_crcs_sent for r in results], [2, 1])
        # Frame 20's bad CRC may go out before the gateway's RESUME for frame 2
        # reaches the camera, and then falls in the bytes the gateway discards.
        self.assertIn(results[0].resumes, ([0, 2048], [0, 2048, 20480]))
        self.assertEqual(gateway.bad_crcs, (len(results[0].resumes) - 1) + 1)  # one RESUME per bad CRC seen
        self.assertEqual(results[1].resumes, [1, 6])

    @defer.inlineCallbacks
    def test_frames_skip_the_transport_buffer(self) -> Any:
        from twisted.internet import tcp

        queued: list[int] = []
        real = tcp.Client.write

        def write(transport: Any, data: bytes) -> None:
            queued.append(len(data))
            real(transport, data)

        self.patch(tcp.Client, "write", write)
        gateway = self.start_gateway()
        specs = [CameraSpec(IMEI, "dualcam", (photo("photor", 3000),), slow_bps=100_000),
                 CameraSpec(IMEI + 1, "dsm", (photo("/sdcard/dsm/picture_1.jpg", 5000),))]
        results = yield self.run_sim(specs)
        self.assert_all_stored(gateway, specs, results)
        self.assertEqual(queued, [])  # every write went out with one send, none through Twisted's buffer

    @defer.inlineCallbacks
    def test_tiny_segments_and_slow(self) -> Any:
        gateway = self.start_gateway()
        specs = [
            CameraSpec(IMEI, "adas", (photo("/sdcard/mdas9/a.jpg", 1500),), segment_sizes=(1, 7), segment_delay=0),
            CameraSpec(IMEI + 1, "dualcam", (photo("photor", 3000),), slow_bps=100_000),
        ]
        results = yield self.run_sim(specs)
        self.assert_all_stored(gateway, specs, results)

    @defer.inlineCallbacks
    def test_metadata_never_answered(self) -> Any:
        gateway = self.start_gateway(metadata_timeout=0.1)
        spec = CameraSpec(IMEI, "dualcam", (photo("photof"),), metadata_behaviour="never")
        [result] = yield self.run_sim([spec])
        self.assert_all_stored(gateway, [spec], [result])
        self.assertEqual((result.metadata_requests, result.metadata_sent, gateway.metadata_seen), (1, 0, []))

    @defer.inlineCallbacks
    def test_status_fault_and_garbage(self) -> Any:
        gateway = self.start_gateway()
        specs = [
            CameraSpec(IMEI, "dualcam", (photo("photof"), photo("videof")), status_instead_of_start=frozenset({"videof"})),
            CameraSpec(IMEI + 1, garbage=True),
        ]
        results = yield self.run_sim(specs)
        self.assertTrue(all(r.ok for r in results), [r.errors for r in results])
        self.assertEqual(gateway.statuses, [(IMEI, "videof", 0x11)])
        self.assertEqual((results[0].refused, results[0].delivered), (["videof"], [("photof", 2500)]))
        self.assertEqual((gateway.garbage_seen, results[1].closed_by_peer), (1, 1))

    @defer.inlineCallbacks
    def test_status_after_start(self) -> Any:
        gateway = self.start_gateway(metadata=False)
        files = (photo("videor", 9000, 1), photo("photof", 3000, 2))
        specs = [CameraSpec(IMEI + n, "dualcam", files, status_after_start=frozenset({"videor"}),
                            status_after_start_code=6) for n in range(3)]
        results = yield self.run_sim(specs)
        self.assertTrue(all(r.ok for r in results), [r.errors for r in results])
        self.assertEqual(gateway.errors, [])
        self.assertEqual(sorted(gateway.statuses), [(IMEI + n, "videor", 6) for n in range(3)])
        for spec, result in zip(specs, results):
            self.assertEqual(gateway.stored_by_name(spec.imei), {"photof": files[1].content})
            self.assertEqual((result.given_up, result.delivered, result.connections),
                             (["videor"], [("photof", 3000)], 1))
            self.assertEqual(result.resumes, [1, 1])  # the fake gateway's answer to the video's START, ignored

    @defer.inlineCallbacks
    def test_complete_ends_session_and_camera_reconnects(self) -> Any:
        gateway = self.start_gateway(finish_with="complete")
        files = tuple(photo(f"/sdcard/dashcam/{i}.mp4", 3000, i) for i in range(3))
        spec = CameraSpec(IMEI, "dashcam", files)
        [result] = yield self.run_sim([spec])
        self.assert_all_stored(gateway, [spec], [result])
        self.assertEqual((result.connections, result.completes), (3, 3))

    @defer.inlineCallbacks
    def test_gives_up_without_gateway(self) -> Any:
        self.start_gateway()
        yield self.port.stopListening()
        spec = CameraSpec(IMEI, files=(photo("photof"),))
        [result] = yield self.run_sim([spec], reconnect_delay=0.01, max_connections_per_camera=3)
        self.assertEqual((result.ok, result.gave_up, result.connect_failures, result.pending), (False, True, 3, ["photof"]))


def _self_signed(directory: str) -> tuple[Any, str]:
    """A localhost certificate (with subjectAltName) and the CA directory holding it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet import ssl

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    os.makedirs(directory)
    with open(os.path.join(directory, "ca.pem"), "wb") as fh:
        fh.write(cert_pem)
    return ssl.PrivateCertificate.loadPEM(key_pem + cert_pem), directory


class TLSTests(LoopbackMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_tls_endpoint_string(self) -> Any:
        cert, roots = _self_signed(self.mktemp())
        factory = FakeGatewayFactory()
        port = reactor.listenSSL(0, factory, cert.options(), interface="127.0.0.1")
        self.addCleanup(lambda: gatherResults(list(factory.lost.values())))
        self.addCleanup(port.stopListening)
        endpoint = clientFromString(reactor, f"tls:host=localhost:port={port.getHost().port}:trustRoots={roots}")
        specs = [CameraSpec(IMEI, files=(photo("videof", 60_000),), bad_crc_frames=frozenset({7})),
                 CameraSpec(IMEI + 1, "dsm", (photo("/sdcard/dsm/a.jpg", 30_000),))]
        results = yield run_cameras(reactor, lambda spec: endpoint, specs, idle_timeout=5.0)
        self.assertTrue(all(r.ok for r in results), [r.errors for r in results])
        self.assertEqual(factory.stored_by_name(IMEI)["videof"], specs[0].files[0].content)
        self.assertEqual(factory.errors, [])


class CommandLineTests(LoopbackMixin, unittest.TestCase):
    timeout = 60

    def sim(self, *args: str) -> Deferred[tuple[bytes, bytes, int]]:
        port = self.port.getHost().port
        argv = ["-m", "camgateway.sim", "--connect", f"tcp:host=127.0.0.1:port={port}", "--idle-timeout", "5", *args]
        return getProcessOutputAndValue(sys.executable, argv, env=dict(os.environ))

    @defer.inlineCallbacks
    def test_mixed_run_succeeds(self) -> Any:
        gateway = self.start_gateway(metadata_timeout=0.1)
        out, err, code = yield self.sim("--cameras", "4", "--kind", "mixed", "--photo-size", "3K",
                                        "--video-size", "10K", "--bad-crc", "1", "--faulty", "2",
                                        "--garbage", "1", "--seed", "7", "--json")
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"8/8 delivered", out)
        self.assertIn(b"4 bad CRCs", out)
        self.assertEqual((len(gateway.stored), gateway.garbage_seen, gateway.errors), (8, 1, []))
        self.assertEqual(len(json.loads(out[out.index(b"\n["):])), 5)

    @defer.inlineCallbacks
    def test_status_after_start(self) -> Any:
        gateway = self.start_gateway(metadata=False)
        out, err, code = yield self.sim("--cameras", "2", "--photos", "1", "--videos", "1", "--photo-size", "3K",
                                        "--video-size", "5K", "--status-after-start", "videof",
                                        "--status-after-start-code", "9", "--seed", "3", "-q")
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"files: 2/4 delivered, 0 refused, 2 given up, 0 pending", out)
        self.assertEqual(sorted((name, status) for _, name, status in gateway.statuses), [("videof", 9)] * 2)
        self.assertEqual(sorted(name for _, name, _ in gateway.stored), ["photof", "photof"])

    def test_status_after_start_options(self) -> None:
        from camgateway.sim.cli import Options, build_specs

        options = Options()
        options.parseOptions(["--cameras", "3", "--photos", "2", "--videos", "1", "--photo-size", "1K",
                              "--video-size", "2K", "--status-after-start", "videof,1", "--faulty", "2"])
        specs = build_specs(options)
        self.assertEqual([s.status_after_start for s in specs],
                         [frozenset({"videof", "photor"})] * 2 + [frozenset()])
        self.assertEqual({s.status_after_start_code for s in specs}, {6})
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--status-after-start", "videof", "--status-after-start-code", "0"])

    @defer.inlineCallbacks
    def test_failure_exits_non_zero(self) -> Any:
        self.start_gateway()
        out, err, code = yield self.sim("--kind", "dsm", "--photos", "1", "--videos", "0", "--drop-after", "0",
                                        "--no-reconnect", "-q")
        self.assertEqual(code, 1, out + err)
        self.assertIn(b"1 failed", out)

    def test_bad_option(self) -> None:
        import io

        from camgateway.sim.cli import main

        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as raised:
            main(["--kind", "toaster"])
        self.assertEqual(raised.exception.code, 2)
        self.assertIn("--kind", err.getvalue())
