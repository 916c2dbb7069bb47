"""Video as people watch it: every camera's video an MP4 with its sound, and an emulator that sends real media.

With Debian's ffmpeg and ffprobe (the tests that need them skip, saying so,
without them) and the real DualCam capture in ../shared/vectors (skipped
where absent). The emulator's media are made once per test run, in a
temporary cache folder.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SkipTest, TestCase

from camgateway.wire import media
from camgateway.runtime.config import parse_config
from camgateway.wire.ptmf import ALAW_SILENCE, Demuxed, demux, mux
from camgateway.sim.cli import Options
from camgateway.sim.content import make_files
from camgateway.sim.media import PHOTO_VARIANTS, RESOLUTIONS, Media, load_media
from camgateway.sim.model import KINDS
from camgateway.delivery.sinks import ReceivedFile, Transformed
from camgateway.delivery.sinks import mp4 as mp4_sink
from camgateway.delivery.sinks.disk import build_stem, extension_for
from camgateway.delivery.sinks.registry import make, validate
from camgateway.runtime.service import sink_context
from tests.support import NO_VECTORS, VECTORS, capture_stream, connect, make_services, poll, stored_files
from tests.test_replay import ptmf_frames
from tests.test_twistd import twistd

NOW = datetime.datetime(2024, 10, 29, 12, 43, 42, tzinfo=datetime.timezone.utc)
NO_FFMPEG = "ffmpeg/ffprobe not installed (.ci/run installs Debian's ffmpeg)"
HAVE_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


# -- helpers


def received_file(path: Path, **fields: Any) -> ReceivedFile:
    """A DualCam front video as the gateway hands it to its sinks."""
    values: dict[str, Any] = dict(
        path=path, imei="863719061653375", peer="10.0.0.1:1", protocol_id=5, camera="dualcam", flow="dualcam",
        source="videof", identifier=b"%videof", media="video",
        metadata={"layout": "dualcam-v3", "framerate": 20, "length_s": 3},
        size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), start_total=1,
        start_crc=0, computed_crc=0, received_at=NOW, capture_time=NOW, resumed_from=0, crc_errors=0)
    values.update(fields)
    return ReceivedFile(**values)


def probe(path: Path) -> dict[str, Any]:
    """ffprobe's streams (by type) and format of a file, frames counted."""
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_type,codec_name,codec_tag_string,width,height,r_frame_rate,nb_read_frames,"
                          "duration,sample_rate:format=duration,format_name", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    streams = {s["codec_type"]: s for s in info["streams"]}
    return {"video": streams.get("video"), "audio": streams.get("audio"), "format": info["format"]}


def decode_errors(path: Path) -> str:
    """What ffmpeg says when it decodes every stream of ``path`` (nothing, for a sound file)."""
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"],
                          capture_output=True, text=True).stderr


def first_sound(path: Path) -> int:
    """The first audio sample (8 kHz) of an MP4 louder than near-silence."""
    pcm = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "s16le", "-ac", "1",
                          "-ar", "8000", "-"], capture_output=True, check=True).stdout
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm)
    return next(i for i, x in enumerate(samples) if abs(x) > 200)


def capture_ptmf(folder: Path) -> bytes:
    """The real DualCam video capture, reassembled by the gateway from its device stream."""
    if not VECTORS.is_dir():
        raise SkipTest(NO_VECTORS)
    services = make_services(folder)
    protocol, _ = connect(services)
    protocol.dataReceived(capture_stream("dualcam-video-front-resume.json"))
    [ptmf] = stored_files(folder)
    return ptmf.read_bytes()


_cache_root: Optional[Path] = None


def cache_root() -> Path:
    """An ``XDG_CACHE_HOME`` for this test run: the emulator's media are made once, there."""
    global _cache_root
    if _cache_root is None:
        _cache_root = Path(tempfile.mkdtemp(prefix="camgateway-test-cache-"))
        atexit.register(shutil.rmtree, _cache_root, True)
    return _cache_root


_media: Optional[Media] = None


@defer.inlineCallbacks
def emulator_media() -> Any:
    """The emulator's media of every camera kind (made on first use)."""
    global _media
    if _media is None:
        _media = yield load_media(reactor, KINDS, folder=cache_root() / "camgateway" / "sim-media")
    return _media


HEVC_VPS = b"\x00\x00\x00\x01\x40\x01\x0c\x01\xff\xff\x01\x60\x00\x00\x03\x00"
H264_SPS = b"\x00\x00\x00\x01\x67\x42\xc0\x1e\xda\x02\x80\xbf\xe5\x84\x00\x00"
MP4_HEAD = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isom"


class DetectionTests(TestCase):
    """What a file is comes from its bytes, and names follow it."""

    def test_kinds_by_bytes(self) -> None:
        self.assertEqual(media.kind_of(b"\xff\xd8\xff\xe0\x00\x10JFIF"), media.JPEG)
        self.assertEqual(media.kind_of(b"PTMF\x03I\x00\x14"), media.PTMF)
        self.assertEqual(media.kind_of(MP4_HEAD), media.MP4)
        self.assertEqual(media.kind_of(HEVC_VPS), media.HEVC)
        self.assertEqual(media.kind_of(b"\x00\x00\x01\x42\x01\x01\x01\x60"), media.HEVC)  # SPS, 3-byte start code
        self.assertEqual(media.kind_of(b"\x00\x00\x00\x01\x26\x01\xaf"), media.HEVC)  # IDR_W_RADL
        self.assertEqual(media.kind_of(H264_SPS), media.H264)
        self.assertEqual(media.kind_of(b"\x00\x00\x00\x01\x09\x10\x00\x00"), media.H264)  # access unit delimiter
        self.assertEqual(media.kind_of(b"\x00\x00\x01\x65\x88\x84"), media.H264)  # IDR slice
        for unknown in (b"", b"\x00\x00\x00\x01", b"\x00\x00\x00\x01\xc0\x01", b"\x00\x00\x00\x01\x40\x07",
                        b"\x00\x00\x00\x01\x07\x42", b"\x00\x00\x00\x01\x69\x00", b"RIFF\x00\x00WAVE",
                        bytes(16), b"\x01\x02\x03\x04 not a known format"):
            self.assertIsNone(media.kind_of(unknown), unknown)

    def test_pictures_of_an_annex_b_stream(self) -> None:
        def nal(header: bytes, first: bool = True, four: bool = True) -> bytes:
            return (b"\0\0\0\1" if four else b"\0\0\1") + header + (b"\x80" if first else b"\x00") + b"\xaa" * 5

        vps, sps, pps = nal(b"\x40\x01"), nal(b"\x42\x01"), nal(b"\x44\x01")
        idr, trail = nal(b"\x26\x01"), nal(b"\x02\x01", four=False)
        second_slice = nal(b"\x02\x01", first=False)
        stream = vps + sps + pps + idr + trail + second_slice + trail
        self.assertEqual(media.hevc_pictures(stream), [(vps + sps + pps + idr, True), (trail + second_slice, False),
                                                       (trail, False)])
        self.assertEqual(b"".join(start for start, _ in media.hevc_pictures(stream)), stream)
        self.assertEqual(media.count_pictures(stream, media.HEVC), 3)
        h264 = H264_SPS + b"\0\0\0\1\x68\xce" + b"\0\0\0\1\x65\x88" + b"\0\0\1\x41\x9a" + b"\0\0\1\x41\x1a"
        self.assertEqual(media.count_pictures(h264, media.H264), 2)  # the third slice continues the second picture

    def test_names_follow_the_bytes_not_the_device(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        cases = [(b"PTMF" + bytes(40), "ptmf"), (MP4_HEAD, "mp4"), (HEVC_VPS, "h265"), (H264_SPS, "h264"),
                 (b"\xff\xd8\xff\xdb", "jpg")]
        for n, (content, ext) in enumerate(cases):
            path = folder / f"{n}.part"
            path.write_bytes(content)
            dsm = received_file(path, flow="path", camera="dsm", source="dsm", metadata={},
                                identifier=b"/sdcard/dsm/video_1730288144_0.mp4\x00")
            self.assertEqual(extension_for(dsm, content[:16]), ext)
        path = folder / "unknown.part"
        path.write_bytes(b"junk")
        self.assertEqual(extension_for(received_file(path, flow="path", identifier=b"/sdcard/dsm/v.mp4\x00"),
                                       b"junk"), "mp4")  # unknown bytes: the device's extension

    def test_derived_names(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "v.part").write_bytes(b"PTMF")
        video = received_file(folder / "v.part")
        stems = [build_stem(dataclasses.replace(video, derived=derived))[1]
                 for derived in (None, "original", "mp4", "poster", "h264")]
        self.assertEqual(stems, ["20241029T124342Z_videof"] * 3 + ["20241029T124342Z_videof_poster",
                                                                   "20241029T124342Z_videof_h264"])


class PTMFTests(TestCase):
    """The container taken apart and built: microsecond timestamps, frame rate, the sound in step."""

    def test_mux_and_demux(self) -> None:
        pictures = [(HEVC_VPS + b"key", True)] + [(b"\0\0\0\1\x02\x01\x80p%d" % i, False) for i in range(1, 60)]
        grid = 1_000_000 / 30  # a 30 Hz sensor clock, 20 pictures a second: 67 and 33 ms apart in turn
        stamps = [7_000_000 + round(-(-i * 3 // 2) * grid) for i in range(60)]
        sound = [bytes([n]) * 320 for n in range(75)]
        sound_stamps = [7_056_500 + 40_000 * k for k in range(75)]
        data = mux(pictures, stamps, sound, sound_stamps, 1280, 720)
        self.assertEqual(data[36 : 36 + 4], HEVC_VPS[:4])
        self.assertEqual((data[:4], data[5], data[7]), (b"PTMF", ord("I"), 20))
        demuxed = demux(data)
        self.assertEqual((demuxed.width, demuxed.height, demuxed.video_frames), (1280, 720, 60))
        self.assertEqual(bytes(demuxed.video), b"".join(p for p, _ in pictures))
        self.assertEqual((demuxed.video_timestamps, demuxed.audio_timestamps), (stamps, sound_stamps))
        self.assertEqual(demuxed.audio, sound)  # without their 00 01 a0 00 headers
        self.assertEqual(data.count(b"\x00\x01\xa0\x00"), 75)
        self.assertEqual(demuxed.frame_rate(), 20.0)
        self.assertEqual(media.kind_of(demuxed.video_head), media.HEVC)

    def test_frame_rate_from_microseconds(self) -> None:
        def rate(stamps: list[int]) -> Optional[float]:
            return Demuxed(bytearray(), [], 0, 0, len(stamps), stamps).frame_rate()

        self.assertEqual(rate([1000 + 50_000 * i for i in range(60)]), 20.0)
        self.assertEqual(rate([round(i * 1_001_000 / 30) for i in range(90)]), 30000 / 1001)
        plan = mp4_sink._Plan(Path("v"), media.HEVC, 30000 / 1001)
        self.assertEqual(plan.mux_args(Path("out"))[:4], ["-f", "hevc", "-r", "30000/1001"])
        self.assertEqual(rate([round(i * 1e6 / 17.3) for i in range(40)]), 17.3)  # no common rate near
        self.assertEqual(rate([5, 40_005]), 25.0)
        self.assertIsNone(rate([5]))
        self.assertIsNone(rate([50_000, 50_000, 50_000]))

    def test_sound_in_step_with_the_picture(self) -> None:
        frames = [bytes([1 + k]) * 320 for k in range(5)]
        # The sound starts 56.5 ms after the first picture; two frames are lost after the third (80 ms).
        stamps = [56_500, 96_400, 136_600, 256_500]
        demuxed = Demuxed(bytearray(), frames[:3] + frames[4:], 0, 0, 2, [0, 50_000], stamps)
        track = demuxed.audio_track(0.4)
        self.assertEqual(len(track), 3200)
        self.assertEqual(track[:452], bytes([ALAW_SILENCE]) * 452)
        self.assertEqual(track[452 : 452 + 960], frames[0] + frames[1] + frames[2])  # contiguous despite jitter
        self.assertEqual(track[1412:2052], bytes([ALAW_SILENCE]) * 640)  # the lost frames
        self.assertEqual(track[2052:2372], frames[4])
        self.assertEqual(track[2372:], bytes([ALAW_SILENCE]) * 828)  # the picture goes on: silence
        early = Demuxed(bytearray(), [frames[0]], 0, 0, 1, [10_000], [0]).audio_track(0.02)
        self.assertEqual(early, frames[0][80:240])  # sound before the picture is cut, and after its end

    def test_the_real_capture(self) -> None:
        demuxed = demux(capture_ptmf(Path(self.mktemp())))
        self.assertEqual((demuxed.video_frames, len(demuxed.audio), {len(a) for a in demuxed.audio}), (60, 75, {320}))
        self.assertEqual(demuxed.frame_rate(), 20.0)  # its timestamps are microseconds: 19.994 fps
        track = demuxed.audio_track(3.0)
        self.assertEqual(len(track), 24000)
        self.assertEqual(track[:452], bytes([ALAW_SILENCE]) * 452)  # the sound starts 56.46 ms in
        self.assertEqual(track[452 : 452 + 320], demuxed.audio[0])


class FFmpegTestCase(TestCase):
    """Tests with the real ffmpeg and an mp4 sink on real threads."""

    timeout = 120

    def setUp(self) -> None:
        if not HAVE_FFMPEG:
            raise SkipTest(NO_FFMPEG)
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        self.s = make_services(self.root)
        self.s.run_in_thread = deferToThread
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def sink(self, **config: Any) -> Any:
        return make(validate({"type": "mp4", **config}, "sinks[0]", self.root), sink_context(self.s, reactor))

    def spooled(self, content: bytes) -> Path:
        path = self.s.spool.path(self.s.spool.new_name())
        path.write_bytes(content)
        return path

    def check_mp4(self, path: Path, codec: str, size: tuple[int, int], audio: Optional[str] = "aac",
                  tag: Optional[str] = None) -> dict[str, Any]:
        """A playable MP4: 60 frames, 3.0 s at 20 fps, its sound as long, decoding without a word from ffmpeg."""
        info = probe(path)
        video = info["video"]
        self.assertEqual((video["codec_name"], video["width"], video["height"]), (codec, *size))
        if tag is not None:
            self.assertEqual(video["codec_tag_string"], tag)
        self.assertEqual((video["nb_read_frames"], video["r_frame_rate"], float(video["duration"])),
                         ("60", "20/1", 3.0))
        self.assertEqual(float(info["format"]["duration"]), 3.0)
        if audio is None:
            self.assertIsNone(info["audio"])
        else:
            self.assertEqual((info["audio"]["codec_name"], float(info["audio"]["duration"])), (audio, 3.0))
        self.assertEqual(decode_errors(path), "")
        return info

    def check_poster(self, poster: ReceivedFile, size: tuple[int, int]) -> None:
        self.assertEqual((poster.media, poster.derived), ("photo", "poster"))
        data = poster.path.read_bytes()
        self.assertEqual((data[:2], data[-2:]), (b"\xff\xd8", b"\xff\xd9"))
        self.assertEqual(media.kind_of(data[:16]), media.JPEG)
        video = probe(poster.path)["video"]
        self.assertEqual((video["codec_name"], video["width"], video["height"]), ("mjpeg", *size))


class RealCaptureTests(FFmpegTestCase):
    """The real DualCam capture: MP4 with its sound, with and without the camera's metadata."""

    @defer.inlineCallbacks
    def test_with_and_without_metadata(self) -> Any:
        content = capture_ptmf(self.root / "replay")
        # Old firmware never answers the metadata request: then the frame rate comes from the timestamps.
        for metadata in ({"layout": "dualcam-v3", "framerate": 20, "length_s": 3}, {}):
            video = self.spooled(content)
            received = received_file(video, metadata=metadata)
            result = yield self.sink().deliver(received)
            self.assertIsInstance(result, Transformed)
            mp4, poster, original = result.files
            self.assertEqual([f.derived for f in result.files], ["mp4", "poster", "original"])
            self.check_mp4(mp4.path, "hevc", (1280, 720), tag="hvc1")
            self.assertEqual(probe(mp4.path)["audio"]["sample_rate"], "8000")
            self.assertIn(first_sound(mp4.path), range(445, 460))  # 56.5 ms in, as the timestamps say
            self.check_poster(poster, (1280, 720))
            self.assertEqual((mp4.size, mp4.sha256), (len(mp4.path.read_bytes()),
                                                      hashlib.sha256(mp4.path.read_bytes()).hexdigest()))
            self.assertEqual((original.path, original.sha256, original.metadata), (video, received.sha256, metadata))
            self.assertEqual(mp4.metadata, metadata)
            self.assertTrue(self.s.spool.names().issuperset({mp4.path.name, poster.path.name, video.name}))
        self.assertEqual(len(self.s.spool.names()), 6)  # nothing left behind: no H.265 or sound files
        self.assertEqual([e["kind"] for e in self.events if e.get("event") == "video_converted"], ["ptmf", "ptmf"])

    @defer.inlineCallbacks
    def test_h264_copy_has_the_sound(self) -> Any:
        video = self.spooled(capture_ptmf(self.root / "replay"))
        result = yield self.sink(h264=True, poster=False, keep_original=False).deliver(received_file(video))
        mp4, h264 = result.files
        self.assertEqual((mp4.derived, h264.derived, h264.media), ("mp4", "h264", "video"))
        self.check_mp4(h264.path, "h264", (1280, 720))
        self.assertIn(first_sound(h264.path), range(445, 460))


class EmulatorMediaTests(FFmpegTestCase):
    """What the emulator sends is real: JPEGs of each camera's resolution, videos that convert or pass and play."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        self.media = yield emulator_media()

    def test_photos_are_jpegs_of_the_camera_resolution(self) -> None:
        for kind in KINDS:
            photos = self.media.photos[kind]
            self.assertEqual(len(set(photos)), PHOTO_VARIANTS)
            for photo in photos:
                path = self.root / f"{kind}.jpg"
                path.write_bytes(photo)
                video = probe(path)["video"]
                self.assertEqual((video["codec_name"], video["width"], video["height"]),
                                 ("mjpeg", *RESOLUTIONS[kind][0]), kind)
                self.assertEqual(decode_errors(path), "")

    def test_the_dualcam_video_is_a_real_ptmf_container(self) -> None:
        data = self.media.video("dualcam")
        demuxed = demux(data)
        self.assertEqual((demuxed.width, demuxed.height, demuxed.video_frames, len(demuxed.audio)),
                         (1280, 720, 60, 75))
        self.assertEqual(ptmf_frames(data), {"I": 3, "P": 57, "A": 75})  # each header where the last frame ends
        self.assertEqual(data.count(b"\x00\x01\xa0\x00"), 75)
        steps = {b - a for a, b in zip(demuxed.video_timestamps, demuxed.video_timestamps[1:])}
        self.assertEqual(steps, {33_333, 66_667})  # a 30 Hz sensor clock, as the real one
        self.assertEqual(demuxed.audio_timestamps[0] - demuxed.video_timestamps[0], 56_460)
        self.assertEqual(demuxed.frame_rate(), 20.0)

    @defer.inlineCallbacks
    def test_videos_of_every_kind_convert_or_pass_and_play(self) -> Any:
        for kind in KINDS:
            files = make_files(kind, photos=0, videos=1, media=self.media, metadata=False)
            [sim] = files
            video = self.spooled(sim.content)
            flow = "dualcam" if kind == "dualcam" else "path"
            received = received_file(video, camera=kind, flow=flow, source=kind if flow == "path" else "videof",
                                     identifier=sim.identifier.encode() + (b"\0" if flow == "path" else b""),
                                     metadata={})
            if kind != "dualcam":
                self.assertTrue(sim.identifier.endswith(".mp4"))
                self.assertEqual(extension_for(received, sim.content[:16]), "mp4")
            result = yield self.sink().deliver(received)
            size = RESOLUTIONS[kind][1]
            if kind == "dualcam":
                mp4, poster, original = result.files
                self.check_mp4(mp4.path, "hevc", size, tag="hvc1")
                self.assertEqual(extension_for(original, sim.content[:16]), "ptmf")
            else:  # the camera's MP4 goes on as it is, with a poster
                poster, original = result.files
                self.check_mp4(original.path, "h264", size)
            self.check_poster(poster, size)
            self.assertEqual((original.derived, original.path), ("original", video))

    def test_the_emulator_offers_them(self) -> None:
        dsm = make_files("dsm", photos=2, videos=1, media=self.media, key=1)
        self.assertEqual([f.content for f in dsm], [*self.media.photos["dsm"][1:3], self.media.video("dsm")])
        self.assertEqual([f.identifier.rsplit(".", 1)[1] for f in dsm], ["jpg", "jpg", "mp4"])
        dualcam = make_files("dualcam", photos=1, videos=1, media=self.media)
        self.assertEqual([(f.identifier, f.content[:4]) for f in dualcam],
                         [("photof", self.media.photos["dualcam"][0][:4]), ("videof", b"PTMF")])


class RandomContentTests(TestCase):
    """``--content random``: bytes of the sizes asked for, starting as each camera kind's files do."""

    def test_random_contents(self) -> None:
        rng = random.Random(1)
        dsm = make_files("dsm", photos=1, videos=1, photo_size=3000, video_size=5000, rng=rng)
        dualcam = make_files("dualcam", photos=1, videos=1, photo_size=3000, video_size=5000, rng=rng)
        self.assertEqual([f.size for f in dsm + dualcam], [3000, 5000] * 2)
        self.assertEqual(media.kind_of(dsm[1].content[:16]), media.MP4)
        self.assertEqual(media.kind_of(dualcam[1].content[:16]), media.PTMF)
        self.assertEqual(media.kind_of(dsm[0].content[:16]), media.JPEG)

    def test_options(self) -> None:
        def content(*args: str) -> str:
            options = Options()
            options.parseOptions(list(args))
            return str(options["content"])

        self.assertEqual(content(), "real")
        self.assertEqual(content("--video-size", "10K"), "random")  # a size is for random content
        self.assertEqual(content("--content", "random"), "random")
        self.assertEqual(content("--content", "random", "--photo-size", "1K"), "random")
        for bad in (["--content", "real", "--photo-size", "1K"], ["--content", "noise"]):
            self.assertRaises(usage.UsageError, Options().parseOptions, bad)

    def test_without_ffmpeg_one_warning_then_random_content(self) -> None:
        empty = Path(self.mktemp()).resolve()
        empty.mkdir(parents=True)
        run = subprocess.run([sys.executable, "-m", "camgateway.sim", "--connect", "tcp:host=127.0.0.1:port=1",
                              "--max-connections", "1", "--no-reconnect", "--idle-timeout", "2"],
                             env={**os.environ, "PATH": str(empty), "XDG_CACHE_HOME": str(empty)},
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(run.returncode, 1, run.stdout + run.stderr)  # nothing to connect to
        said = [line for line in run.stderr.splitlines() if "ffmpeg" in line]
        self.assertEqual(said, ["camgateway-sim: ffmpeg not found: sending random bytes instead of real photos and"
                                " videos (install ffmpeg for real ones, or pass --content random)"])


class UnconvertibleTests(FFmpegTestCase):
    """A video ffmpeg cannot convert goes on as the camera's file with the reason: never lost, never a dead letter."""

    @defer.inlineCallbacks
    def test_a_corrupted_container_is_stored_as_the_original_with_its_reason(self) -> Any:
        media_ = yield emulator_media()
        corrupted = media_.video("dualcam")[:300_000]  # cut inside a frame
        self.s.sinks = [self.sink(), self.s.sinks[0]]
        self.s.clock = reactor
        path = self.spooled(corrupted)
        yield self.s.outbox.add(received_file(path), None)
        yield poll(lambda: len(stored_files(self.root)) == 1 and not self.s.outbox.in_flight, what="the delivery")
        [stored] = stored_files(self.root)
        self.assertEqual((stored.name, stored.read_bytes()), ("20241029T124342Z_videof.ptmf", corrupted))
        sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(sidecar["derived"], "original")
        self.assertRegex(sidecar["metadata"]["conversion_error"],
                         r"^not a usable PTMF container: PTMF frame at byte \d+ runs past the end \(\d+ bytes\)$")
        self.assertEqual(sidecar["metadata"]["framerate"], 20)
        self.assertFalse(self.s.spool.dead.exists() and any(self.s.spool.dead.iterdir()), "a dead letter")
        [warning] = [e for e in self.events if e.get("event") == "video_not_converted"]
        self.assertEqual(warning["why"], sidecar["metadata"]["conversion_error"])
        yield self.s.outbox.stop()

    @defer.inlineCallbacks
    def test_an_ffmpeg_that_takes_too_long_is_killed_and_the_original_goes_on(self) -> Any:
        video = self.spooled(capture_ptmf(self.root / "replay") if VECTORS.is_dir()
                             else (yield emulator_media()).video("dualcam"))
        result = yield self.sink(timeout=0.001).deliver(received_file(video))
        [original] = result.files
        self.assertEqual(original.metadata["conversion_error"], "ffmpeg did not finish within 0.001 s (killed)")
        self.assertEqual(self.s.spool.names(), {video.name})  # the demuxed streams are removed

    @defer.inlineCallbacks
    def test_a_bare_h265_stream_becomes_an_mp4(self) -> Any:
        media_ = yield emulator_media()
        stream = bytes(demux(media_.video("dualcam")).video)
        received = received_file(self.spooled(stream), flow="path", camera="dsm", source="dsm",
                                 identifier=b"/sdcard/dsm/video_1.h265\x00", metadata={"length_s": 3})
        mp4, poster, original = (yield self.sink().deliver(received)).files
        self.check_mp4(mp4.path, "hevc", (1280, 720), audio=None, tag="hvc1")  # 60 pictures over 3 s: 20 fps
        self.assertEqual((extension_for(original, stream[:16]), original.derived), ("h265", "original"))


class DefaultChainTests(TestCase):
    """No ``sinks:``: MP4s with sound beside the originals when ffmpeg is installed, else the camera's files."""

    def test_the_chain_follows_ffmpeg(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.patch(mp4_sink, "_told_no_ffmpeg", False)
        self.assertEqual(mp4_sink.default_sinks("files", which=lambda _: "/usr/bin/ffmpeg"),
                         [{"type": "mp4"}, {"type": "disk", "root": "files"}])
        self.assertEqual(events, [])
        for _ in range(2):
            self.assertEqual(mp4_sink.default_sinks("files", which=lambda _: None), [{"type": "disk", "root": "files"}])
        [told] = [e for e in events if e.get("event") == "no_ffmpeg"]  # once
        self.assertIn("ffmpeg not found", told["log_format"])

    def test_parsed_defaults(self) -> None:
        if shutil.which("ffmpeg") is None:
            raise SkipTest(NO_FFMPEG)
        config = parse_config({}, "built-in defaults", Path("/base"))
        self.assertEqual([(s["type"], s.get("root"), s.get("keep_original")) for s in config.sinks],
                         [("mp4", None, True), ("disk", "/base/camgateway-data/files", None)])


class GatewayRunTests(TestCase):
    """``twistd -n camgateway`` with no configuration file, fed by the emulator."""

    timeout = 180

    def start(self, work: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path, int]:
        log = work / "twistd.log"
        process = subprocess.Popen([twistd(), "-n", "--pidfile=", "--logfile", str(log), "camgateway", "--listen",
                                    "tcp:0:interface=127.0.0.1"], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.addCleanup(self.stop, process)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = re.search(r"listening for cameras on .*port=(\d+)\)", log.read_text() if log.exists() else "")
            if match:
                return process, log, int(match.group(1))
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"twistd did not start:\n{log.read_text() if log.exists() else ''}")

    @staticmethod
    def stop(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def emulate(self, port: int, env: dict[str, str], *options: str) -> str:
        run = subprocess.run([sys.executable, "-m", "camgateway.sim", "--connect", f"tcp:host=127.0.0.1:port={port}",
                              "--idle-timeout", "20", "--no-reconnect", *options],
                             env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        return run.stderr

    def stored(self, files: Path, count: int) -> list[Path]:
        deadline = time.monotonic() + 60
        while True:
            found = sorted(p for p in files.rglob("*") if p.is_file() and p.suffix != ".json"
                           and not p.name.startswith("."))
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def test_with_ffmpeg_every_camera_video_becomes_an_mp4_with_sound_beside_the_original(self) -> None:
        if not HAVE_FFMPEG:
            raise SkipTest(NO_FFMPEG)
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        env = {**os.environ, "XDG_CACHE_HOME": str(cache_root())}
        process, log, port = self.start(work, env)
        said = self.emulate(port, env, "--kind", "mixed", "--cameras", "4", "--photos", "1", "--videos", "1")
        self.assertNotIn("random bytes", said)  # real media
        # A photo per camera; a DualCam's PTMF, its MP4 and poster; the others' MP4 and poster.
        found = self.stored(work / "camgateway-data" / "files", 4 + 3 + 3 * 2)
        names = sorted(re.sub(r"^\d+T\d+Z_", "", p.name) for p in found)
        self.assertEqual(len(found), 13, names)
        by_name = {p.name: p for p in found}
        videos = {p.name: p for p in found if p.suffix in (".mp4", ".ptmf")}
        self.assertEqual(sorted(p.suffix for p in videos.values()), [".mp4"] * 4 + [".ptmf"])
        for name, path in videos.items():
            sidecar = json.loads(path.with_name(name + ".json").read_text())
            if path.suffix == ".mp4":
                info = probe(path)
                self.assertEqual((info["video"]["nb_read_frames"], float(info["format"]["duration"])), ("60", 3.0))
                self.assertEqual((info["audio"]["codec_name"], float(info["audio"]["duration"])), ("aac", 3.0))
                self.assertEqual(decode_errors(path), "")
            self.assertIn(sidecar["derived"], ("mp4", "original"))
            self.assertIn(path.stem + "_poster.jpg", by_name)
        photos = [p for p in found if p.suffix == ".jpg" and not p.name.endswith("_poster.jpg")]
        self.assertEqual(len(photos), 4)
        for photo in photos:
            kind = json.loads(photo.with_name(photo.name + ".json").read_text())["camera"]
            video = probe(photo)["video"]
            self.assertEqual((video["width"], video["height"]), RESOLUTIONS[kind][0])
        self.stop(process)
        self.assertIn("camgateway stopped", log.read_text())

    def test_without_ffmpeg_the_gateway_says_so_once_and_keeps_the_camera_files(self) -> None:
        work = Path(self.mktemp()).resolve()
        (work / "bin").mkdir(parents=True)
        env = {**os.environ, "PATH": str(work / "bin"), "XDG_CACHE_HOME": str(work / "cache")}
        process, log, port = self.start(work, env)
        self.emulate(port, env, "--kind", "dualcam", "--photos", "0", "--videos", "1", "-q")
        [stored] = self.stored(work / "camgateway-data" / "files", 1)
        self.assertEqual(stored.suffix, ".ptmf")
        self.stop(process)
        text = log.read_text()
        self.assertEqual(text.count("ffmpeg not found"), 1, text)
        self.assertIn("videos are stored as the cameras send them", text)
