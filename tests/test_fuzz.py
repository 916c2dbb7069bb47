"""Property tests: any bytes, any segmentation, any command order.

No exception escapes the codec or a session (a logged failure fails a trial
test, so internal errors are caught too), nothing is written outside the spool
and the files root, every stored file holds bytes the camera sent (exactly the
file's content when its transfer was not tampered with), and a good camera's
transfer survives garbage on other connections.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import TestCase

from camgateway.wire import codec
from camgateway.wire.codec import FrameDecoder, ProtocolError
from camgateway.wire.crc import crc16
from tests.support import connect, make_services, stored_files

IMEI = 863719061653375
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u32 = st.integers(0, 0xFFFFFFFF)
small = st.integers(0, 40)
paths = st.one_of(
    st.binary(max_size=600),
    st.sampled_from([b"\0", b"../../etc/passwd\0", b"/sdcard/dsm/video_1.mp4\0", b"C:\\x\\..\\..\\y.jpg\0",
                     b"/" + b"a" * 511, b"./.\0", b"\0/etc/shadow", b"/sdcard/mdas9/picture_2.jpg\0"]),
)
frames = st.one_of(
    st.builds(codec.init_packet, st.integers(0, 10), st.sampled_from([IMEI, 1, 2**64 - 1]), u32),
    st.builds(codec.init_packet, st.just(5), st.just(IMEI),
              st.sampled_from([0x44000400, 0x3C000000, 0x02000000, 0x40000400, 0])),
    st.builds(codec.start, small, st.integers(0, 0xFFFF)),
    st.builds(codec.sync, st.one_of(small, u32)),
    st.builds(lambda d: codec.data(d, crc16(d)), st.binary(min_size=1, max_size=1024)),
    st.builds(lambda d, c: codec.data(d, c), st.binary(min_size=1, max_size=64), st.integers(0, 0xFFFF)),
    st.builds(lambda o, d: codec.enhanced_data(o, d, crc16(d)), small, st.binary(min_size=1, max_size=64)),
    st.builds(codec.status, st.sampled_from([0, 1, 4, 17, 26, 0xFFFFFFFF])),
    st.builds(codec.metadata, st.binary(max_size=64)),
    st.builds(lambda p: codec.path(p[:512] or b"\0"), paths),
    st.binary(max_size=40),  # garbage
)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return [p for p in pieces if p]


class _Sink:
    """A FrameReceiver that accepts anything (copies views, as receivers must)."""

    def __getattr__(self, name: str):  # init, start, sync, data...
        if name == "runner":  # the optional fast path: this receiver takes frames one by one
            raise AttributeError(name)
        return lambda *args: [bytes(a) if isinstance(a, memoryview) else a for a in args]


class CodecFuzzTests(TestCase):
    """The decoder raises nothing but ProtocolError, whatever it is fed."""

    @FUZZ
    @given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=30), st.booleans())
    def test_any_bytes(self, data: bytes, cuts: list[int], discard: bool) -> None:
        decoder = FrameDecoder(_Sink())  # type: ignore[arg-type]
        if discard:
            decoder.discard_until_sync()
        try:
            for piece in cut(data, cuts):
                decoder.feed(piece)
        except ProtocolError:
            self.assertTrue(decoder.stopped)
            decoder.feed(b"\x00\x04\x00\x05abc\x00\x00")  # ignored once stopped
            self.assertEqual(decoder.buffered, 0)

    @FUZZ
    @given(st.lists(frames, max_size=20), st.lists(st.integers(0, 5000), max_size=20))
    def test_segmentation_does_not_matter(self, sequence: list[bytes], cuts: list[int]) -> None:
        class Recorder:
            def __init__(self) -> None:
                self.seen: list[tuple] = []

            def __getattr__(self, name: str):
                if name == "runner":
                    raise AttributeError(name)
                if name == "batch_end":
                    return lambda: None
                return lambda *a: self.seen.append(
                    (name,) + tuple(bytes(x) if isinstance(x, memoryview) else x for x in a))

        def run(pieces: list[bytes]) -> tuple[list[tuple], str]:
            recorder = Recorder()
            decoder = FrameDecoder(recorder)  # type: ignore[arg-type]
            error = ""
            try:
                for piece in pieces:
                    decoder.feed(piece)
            except ProtocolError as e:
                error = e.message
            return recorder.seen, error

        stream = b"".join(sequence)
        self.assertEqual(run([stream]), run(cut(stream, cuts)))


inits = st.builds(codec.init_packet, st.integers(0, 10), st.just(IMEI),
                  st.integers(0, 0xFF).map(lambda b: (b << 24) | 0x400))


def valid_script(flow: str, content: bytes, path: bytes) -> list[bytes]:
    """What a well-behaved camera sends for one file (metadata answered).

    ``given_up``: a DualCam that first answers the FILE REQUEST of its rear
    video with START and STATUS 6 in one write (it gives the video up), then
    sends ``content`` as its front photo.
    """
    packets = (len(content) + 1023) // 1024
    if flow == "dualcam":
        head = [codec.init_packet(5, IMEI, 0x44000400), codec.metadata(b"\x03" + bytes(31)),
                codec.start(packets, 0), codec.sync(1)]
    elif flow == "given_up":
        head = [codec.init_packet(5, IMEI, 0x64000400), codec.metadata(b"\x03" + bytes(31)),
                codec.start(packets + 2, 0) + codec.status(6), codec.metadata(b"\x03" + bytes(31)),
                codec.start(packets, 0), codec.sync(1)]
    else:
        head = [codec.init_packet(5, IMEI, 0x42000400), codec.path(path), codec.metadata(bytes(26)),
                codec.start(len(content), crc16(content)), codec.sync(0)]
    crc = 0
    for i in range(0, len(content), 1024):
        crc = crc16(content[i : i + 1024], crc)
        head.append(codec.data(content[i : i + 1024], crc))
    return head + [codec.init_packet(5, IMEI, 0x40000400)]


def payloads_in(stream: bytes) -> list[bytes]:
    """Every run of ``stream`` a decoder could take for a DATA or ENHANCED DATA payload,
    however it framed the stream (after garbage, a bit flip, a discard): the
    bytes behind each ``00 04`` or ``00 0E`` that a length field covers."""
    out = []
    for cmd, skip in ((b"\x00\x04", 0), (b"\x00\x0e", 4)):
        i = stream.find(cmd)
        while i >= 0:
            length = int.from_bytes(stream[i + 2 : i + 4], "big")
            if length > skip + 2 and i + 4 + length <= len(stream):
                out.append(stream[i + 4 + skip : i + 4 + length - 2])
            i = stream.find(cmd, i + 1)
    return out


def _common_prefix(a: bytes, b: bytes) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def made_of(data: bytes, flow: str, payloads: list[bytes]) -> bool:
    """Whether a stored file can be built from ``payloads`` as the gateway builds files.

    DualCam: whole packets of 1024 bytes (the last may be shorter), each one
    payload, since a SYNC rewinds to a packet boundary. Path flow: a SYNC
    rewinds to any byte, so the file is a run of payload prefixes.
    """
    if flow == "dualcam":
        whole = set(payloads)
        return all(data[i : i + 1024] in whole for i in range(0, len(data), 1024))
    starting: dict[int, list[bytes]] = defaultdict(list)
    for payload in payloads:
        starting[payload[0]].append(payload)
    reach = 0  # every byte before this is covered
    for i in range(len(data)):
        if i > reach:
            return False
        for payload in starting.get(data[i], ()):
            reach = max(reach, i + _common_prefix(payload, data[i : i + len(payload)]))
    return reach >= len(data)


mutation = st.tuples(st.integers(0, 100), st.sampled_from(["drop", "dup", "insert", "flip", "swap"]),
                     frames, st.integers(0, 2000))


def mutate(script: list[bytes], mutations: list[tuple[int, str, bytes, int]]) -> list[bytes]:
    script = list(script)
    for where, kind, frame, at in mutations:
        i = where % len(script)
        if kind == "drop":
            del script[i]
        elif kind == "dup":
            script.insert(i, script[i])
        elif kind == "insert":
            script.insert(i, frame)
        elif kind == "flip" and script[i]:
            b = bytearray(script[i])
            b[at % len(b)] ^= 1 << (at % 8)
            script[i] = bytes(b)
        elif kind == "swap" and i + 1 < len(script):
            script[i], script[i + 1] = script[i + 1], script[i]
        if not script:
            script = [b""]
    return script


class SessionFuzzTests(TestCase):
    """Sessions take any frames in any order, on any segmentation, with time passing."""

    def play(self, mode: str, script: list[tuple[bytes, int, float]], content: Optional[bytes] = None) -> None:
        """Feed ``script`` (frame, pieces, seconds after) to one session; check the filesystem.

        Every stored file must be made of payloads the script sent, and, when
        ``content`` is given (a transfer nobody tampered with), be exactly it.
        """
        root = Path(tempfile.mkdtemp())
        try:
            services = make_services(root, mode=mode, metadata_timeout=5.0, step_timeout=30.0)
            protocol, transport = connect(services)
            for frame, pieces, advance in script:
                for piece in cut(frame, list(range(1, len(frame), max(1, len(frame) // (pieces + 1))))):
                    protocol.dataReceived(piece)
                services.clock.advance(advance)
            protocol.connectionLost(None)
            services.clock.advance(1000)
            for path in root.rglob("*"):
                rel = path.relative_to(root)
                self.assertIn(rel.parts[0], ("files", "spool"), path)
            payloads = payloads_in(b"".join(frame for frame, _, _ in script))
            for stored in stored_files(root):
                self.assertTrue(stored.resolve().is_relative_to((root / "files").resolve()))
                data = stored.read_bytes()
                sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
                self.assertEqual((sidecar["size"], sidecar["sha256"]), (len(data), hashlib.sha256(data).hexdigest()))
                self.assertTrue(made_of(data, sidecar["flow"], payloads),
                                f"{stored.name}: {len(data)} bytes that the camera never sent")
                if content is not None:
                    self.assertEqual(data, content, stored.name)
        finally:
            shutil.rmtree(root)

    @FUZZ
    @given(inits, st.lists(st.tuples(frames, st.integers(0, 3), st.floats(0, 70)), max_size=25),
           st.sampled_from(["auto", "dualcam", "dsm", "adas"]))
    def test_any_command_order(self, init: bytes, script: list[tuple[bytes, int, float]], mode: str) -> None:
        self.play(mode, [(init, 0, 0.0)] + script)

    @FUZZ
    @given(st.sampled_from(["dualcam", "path", "given_up"]), st.binary(min_size=1, max_size=4000), paths,
           st.lists(mutation, max_size=6), st.lists(st.integers(0, 3), min_size=1),
           st.lists(st.sampled_from([0.0, 0.0, 0.0, 3.0, 6.0, 40.0]), min_size=1),
           st.sampled_from(["auto", "dualcam", "dsm", "adas"]))
    def test_mutated_transfers(self, flow: str, content: bytes, path: bytes, mutations: list, pieces: list[int],
                               advances: list[float], mode: str) -> None:
        valid = valid_script(flow, content, path[:512] or b"\0")
        script = mutate(valid, mutations)
        self.play(mode, [(frame, pieces[i % len(pieces)], advances[i % len(advances)])
                         for i, frame in enumerate(script)], content if script == valid else None)

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 2), st.binary(min_size=1, max_size=200)), max_size=30),
           st.integers(1, 9))
    def test_good_camera_beside_garbage(self, garbage: list[tuple[int, bytes]], step: int) -> None:
        root = Path(tempfile.mkdtemp())
        try:
            services = make_services(root, metadata=False)
            good, good_transport = connect(services, "10.0.0.9")
            others = [connect(services, f"10.0.1.{i}")[0] for i in range(3)]
            content = os.urandom(5000)
            crc = 0
            script = [codec.init_packet(5, IMEI, 0x04000000), codec.start(5, 0), codec.sync(1)]
            for i in range(0, len(content), 1024):
                crc = crc16(content[i : i + 1024], crc)
                script.append(codec.data(content[i : i + 1024], crc))
            stream = b"".join(script)
            g = iter(garbage)
            for i in range(0, len(stream), step):
                good.dataReceived(stream[i : i + step])
                which, junk = next(g, (0, b""))
                others[which].dataReceived(junk)
            self.assertTrue(good_transport.value().endswith(codec.repeat_init()))
            [stored] = stored_files(root)
            self.assertEqual(stored.read_bytes(), content)
        finally:
            shutil.rmtree(root)
