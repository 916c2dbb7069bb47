"""Replays of real device captures (../shared/vectors), in random TCP segments.

The recorded device did not see our replies, so the stream is fed in order
and the test checks what the gateway makes of it (see vectors/README.md).
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from camgateway.wire import codec
from tests.support import NO_VECTORS, VECTORS, capture_stream, connect, make_services, segments, stored_files


def ptmf_frames(video: bytes) -> dict[str, int]:
    """Walk the PTMF container; every frame header must sit where the last one ends."""
    kinds: dict[str, int] = {}
    i = 0
    while i < len(video):
        assert video[i : i + 4] == b"PTMF", f"no PTMF header at {i}"
        kind = chr(video[i + 5])
        kinds[kind] = kinds.get(kind, 0) + 1
        i += 36 + struct.unpack_from("<I", video, i + 24)[0]
    assert i == len(video)
    return kinds


class ReplayTests(TestCase):
    """Each capture, cut at random, gives the file a correct gateway produces."""

    def setUp(self) -> None:
        if not VECTORS.is_dir():
            raise SkipTest(NO_VECTORS)

    def replay(self, name: str, seed: int, low: int, high: int) -> tuple[Path, bytes, object]:
        root = Path(self.mktemp())
        root.mkdir()
        services = make_services(root)
        protocol, transport = connect(services)
        for piece in segments(capture_stream(name), random.Random(seed), low, high):
            protocol.dataReceived(piece)
        [stored] = stored_files(root)
        return stored, transport.value(), services

    def check_photo(self, name: str, size: int) -> None:
        for seed, (low, high) in enumerate([(1, 7), (1, 1500), (500, 70000)]):
            stored, sent, services = self.replay(name, seed, low, high)
            data = stored.read_bytes()
            self.assertEqual(len(data), size)
            self.assertEqual(data[:2], b"\xff\xd8")
            self.assertEqual(data[-2:], b"\xff\xd9")
            sof = data.index(b"\xff\xc0")  # baseline frame header: height, width
            self.assertEqual(struct.unpack_from(">HH", data, sof + 5), (480, 640))
            self.assertEqual(sent, codec.metadata_request(b"%photof") + codec.file_request(b"%photof")
                             + codec.resume(1) + codec.repeat_init() + codec.close())
            self.assertEqual(services.stats.crc_errors, 0)
            sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
            self.assertEqual(sidecar["start"]["total"], (size + 1023) // 1024)
            self.assertEqual(sidecar["metadata"]["layout"], "dualcam-v3")

    def test_photo_a(self) -> None:
        self.check_photo("dualcam-photo-front-a.json", 29395)

    def test_photo_b(self) -> None:
        self.check_photo("dualcam-photo-front-b.json", 28826)

    def test_video_with_bad_crc_rewind_and_repeated_sync(self) -> None:
        for seed, (low, high) in enumerate([(1, 7), (1, 1500), (1000, 70000)]):
            stored, sent, services = self.replay("dualcam-video-front-resume.json", seed, low, high)
            video = stored.read_bytes()
            self.assertEqual(len(video), 597868)
            self.assertEqual(len(video), 583 * 1024 + 876)  # 584 packets
            self.assertEqual(ptmf_frames(video), {"I": 3, "P": 57, "A": 75})  # 60 video frames = 3 s at 20 fps
            self.assertEqual(services.stats.crc_errors, 1)
            # RESUME 1, then after the bad CRC at packet 339 a RESUME 339 (0x153)
            self.assertEqual(sent, codec.metadata_request(b"%videof") + codec.file_request(b"%videof")
                             + codec.resume(1) + codec.resume(339) + codec.repeat_init() + codec.close())
            sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
            self.assertEqual(sidecar["crc_errors"], 1)
            self.assertEqual(sidecar["metadata"]["framerate"], 20)
            self.assertEqual(sidecar["metadata"]["length_s"], 3)
            self.assertEqual(stored.suffix, ".ptmf")
