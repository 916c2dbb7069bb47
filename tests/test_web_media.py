"""Stored files for the browser: ``/files/<id>`` with Range, ``/files/<id>/poster`` and ``/files/<id>/play``.

With the real ffmpeg and ffprobe (skipped, saying so, without them) and the
emulator's real media (``--content real``): a DualCam's PTMF video of H.265
with A-law sound, a DSM camera's MP4 of H.264 and AAC, and a PTMF container
of H.264 pictures made of the DSM camera's video.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from camgateway.web import status as status_module
from camgateway.web.media import BrowserMedia, MediaFile, mp4_sample_entries
from camgateway.web.status import StatusRoot, StatusSite
from camgateway.wire import media
from camgateway.wire.ptmf import demux, mux
from tests.ops_support import http_get, tiny_jpeg
from tests.support import make_services
from tests.test_video import HAVE_FFMPEG, NO_FFMPEG, emulator_media, probe, received_file


def h264_ptmf(mp4: bytes, hevc_ptmf: bytes, folder: Path) -> bytes:
    """A PTMF container of the pictures of ``mp4`` in H.264, with the sound and stamps of ``hevc_ptmf``."""
    source, stream = folder / "h264-source.mp4", folder / "h264-source.h264"
    source.write_bytes(mp4)
    # (without B-frames, as a camera's encoder writes them)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), "-map", "0:v:0", "-c:v", "libx264", "-preset",
                    "veryfast", "-bf", "0", "-g", "20", "-bsf:v", "h264_metadata=aud=insert", "-f", "h264",
                    str(stream)], check=True)
    data = stream.read_bytes()
    starts = [i for i in range(len(data) - 4)
              if data[i:i + 4] == b"\0\0\0\1" and data[i + 4] & 0x1F == 9]  # access unit delimiters
    pictures = []
    for begin, end in zip(starts, starts[1:] + [len(data)]):
        picture = data[begin:end]
        key = any(picture[i:i + 3] == b"\0\0\1" and picture[i + 3] & 0x1F == 5 for i in range(len(picture) - 3))
        pictures.append((picture, key))
    hevc = demux(hevc_ptmf)
    assert len(pictures) == hevc.video_frames == 60, len(pictures)
    return mux(pictures, hevc.video_timestamps, hevc.audio, hevc.audio_timestamps, 1280, 720)


class MediaRouteCase(TestCase):
    """A status site on loopback whose file lookup (camgateway.web.status.find_file) knows the files stored here."""

    timeout = 300

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        if not HAVE_FFMPEG:
            raise SkipTest(NO_FFMPEG)
        self.media = yield emulator_media()
        self.root = Path(self.mktemp()).resolve()
        (self.root / "files").mkdir(parents=True)
        self.s = make_services(self.root)
        self.s.run_in_thread = deferToThread
        gateway = SimpleNamespace(services=self.s, ports=[], reactor=reactor, factory=None, workers=None)
        self.status = StatusRoot(gateway, None, None)
        port = reactor.listenTCP(0, StatusSite(self.status), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}/"
        self.spawned: list[str] = []  # the programs of every child process started
        spawn = reactor.spawnProcess

        def counted(protocol: Any, program: str, *args: Any, **kwargs: Any) -> Any:
            self.spawned.append(os.path.basename(program))
            return spawn(protocol, program, *args, **kwargs)

        self.patch(reactor, "spawnProcess", counted)
        self.files: dict[str, MediaFile] = {}
        self.patch(status_module, "find_file", lambda services, wanted: defer.succeed(self.files.get(wanted)))

    def stored(self, content: bytes, name: str, **fields: Any) -> str:
        """A file the disk sink stored: its id."""
        path = self.root / "files" / name
        path.write_bytes(content)
        received = received_file(path, **fields)
        fid = hashlib.blake2b(received.sha256.encode(), digest_size=10).hexdigest()
        self.files[fid] = MediaFile(fid, path, received.media, dict(received.metadata))
        return fid

    def get(self, path: str, headers: Optional[dict[str, str]] = None) -> defer.Deferred:
        return http_get(self.base + path, headers)

    def check_playable(self, body: bytes, name: str) -> dict[str, Any]:
        """An MP4 of H.264 and AAC, 3 s long, 60 pictures at 20 fps."""
        path = self.root / name
        path.write_bytes(body)
        info = probe(path)
        self.assertEqual((info["video"]["codec_name"], info["video"]["width"], info["video"]["height"]),
                         ("h264", 1280, 720))
        self.assertEqual((info["video"]["nb_read_frames"], info["video"]["r_frame_rate"]), ("60", "20/1"))
        self.assertEqual(info["audio"]["codec_name"], "aac")
        self.assertAlmostEqual(float(info["format"]["duration"]), 3.0, delta=0.05)
        self.assertAlmostEqual(float(info["audio"]["duration"]), 3.0, delta=0.05)
        return info


class PlayTests(MediaRouteCase):
    """``/files/<id>/play``: H.264 and AAC whatever the camera sent, made once, served with Range."""

    @defer.inlineCallbacks
    def test_an_hevc_ptmf_video_is_transcoded_once_for_concurrent_requests_then_cached(self) -> Any:
        fid = self.stored(self.media.video("dualcam"), "video.ptmf")
        first, second = yield defer.gatherResults([self.get(f"files/{fid}/play"), self.get(f"files/{fid}/play")])
        self.assertEqual((first[0], second[0]), (200, 200))
        self.assertEqual(first[2], second[2])
        self.assertEqual(first[1].getRawHeaders(b"content-type"), [b"video/mp4"])
        self.check_playable(first[2], "played.mp4")
        self.assertEqual(self.spawned, ["ffmpeg", "ffmpeg"])  # one job: the PTMF muxed, then re-encoded
        self.assertEqual(mp4_sample_entries(self.root / "played.mp4"), [b"avc1", b"mp4a"])
        cached = self.s.spool.root / "cache" / f"{fid}.play.mp4"
        self.assertEqual(cached.read_bytes(), first[2])
        code, headers, body = yield self.get(f"files/{fid}/play")
        self.assertEqual((code, body), (200, first[2]))
        self.assertEqual(len(self.spawned), 2)  # from the cache: no ffmpeg
        # a <video> seeking: a byte range of it
        code, headers, part = yield self.get(f"files/{fid}/play", {"Range": "bytes=1000-4999"})
        self.assertEqual((code, part), (206, first[2][1000:5000]))
        self.assertEqual(headers.getRawHeaders(b"content-range"), [f"bytes 1000-4999/{len(first[2])}".encode()])
        self.assertEqual(headers.getRawHeaders(b"accept-ranges"), [b"bytes"])
        self.assertEqual(list((self.s.spool.root / "cache").iterdir()), [cached])  # no work file left

    @defer.inlineCallbacks
    def test_an_h264_ptmf_video_is_muxed_without_re_encoding(self) -> Any:
        content = h264_ptmf(self.media.video("dsm"), self.media.video("dualcam"), self.root)
        self.assertEqual(media.kind_of(demux(content).video_head), media.H264)
        fid = self.stored(content, "h264.ptmf")
        code, _, body = yield self.get(f"files/{fid}/play")
        self.assertEqual(code, 200)
        self.check_playable(body, "played.mp4")
        self.assertEqual(self.spawned, ["ffmpeg"])  # muxed only: the pictures are H.264 already

    @defer.inlineCallbacks
    def test_an_h264_mp4_is_served_as_it_is_even_without_ffmpeg(self) -> Any:
        os.environ["PATH"], old = str(self.root), os.environ["PATH"]
        self.addCleanup(os.environ.__setitem__, "PATH", old)
        mp4 = self.media.video("dsm")
        fid = self.stored(mp4, "video.mp4", camera="dsm", flow="path", source="dsm",
                          identifier=b"/sdcard/dsm/video_1.mp4\0")
        code, _, body = yield self.get(f"files/{fid}/play")
        self.assertEqual((code, body), (200, mp4))
        os.environ["PATH"] = old
        self.check_playable(body, "played.mp4")
        self.assertEqual(self.spawned, [])

    @defer.inlineCallbacks
    def test_without_ffmpeg_a_video_to_convert_is_503_with_the_reason(self) -> Any:
        os.environ["PATH"], old = str(self.root), os.environ["PATH"]
        self.addCleanup(os.environ.__setitem__, "PATH", old)
        self.assertIsNone(shutil.which("ffmpeg"))
        fid = self.stored(self.media.video("dualcam"), "video.ptmf")
        for what in ("play", "poster"):
            code, _, body = yield self.get(f"files/{fid}/{what}")
            self.assertEqual(code, 503, what)
            self.assertIn("ffmpeg is not installed", json.loads(body)["error"])
        self.assertEqual(self.spawned, [])
        os.environ["PATH"] = old  # installed since: no restart needed
        code, _, _ = yield self.get(f"files/{fid}/poster")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_the_mp4_sinks_files_are_served_when_it_made_them(self) -> Any:
        video = self.root / "files" / "video.ptmf"
        video.write_bytes(self.media.video("dualcam"))
        h264, poster = self.root / "files" / "video_h264.mp4", self.root / "files" / "video_poster.jpg"
        h264.write_bytes(self.media.video("dsm"))
        poster.write_bytes(tiny_jpeg())
        found = MediaFile("0123456789abcdef0123", video, "video", {}, {"h264": h264, "poster": poster})
        self.files[found.id] = found
        code, headers, body = yield self.get(f"files/{found.id}/play")
        self.assertEqual((code, body), (200, h264.read_bytes()))
        code, headers, body = yield self.get(f"files/{found.id}/poster")
        self.assertEqual((code, body, headers.getRawHeaders(b"content-type")), (200, tiny_jpeg(), [b"image/jpeg"]))
        self.assertEqual(self.spawned, [])
        code, _, _ = yield self.get("files/fedcba9876543210fedc/play")
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_a_broken_video_is_refused_once(self) -> Any:
        fid = self.stored(b"PTMF" + bytes(range(256)) * 40, "broken.ptmf")
        for _ in range(2):
            code, _, body = yield self.get(f"files/{fid}/play")
            self.assertEqual(code, 422)
            self.assertIn("cannot convert the video", json.loads(body)["error"])
        self.assertEqual(len(self.status.media._failed), 1)

    @defer.inlineCallbacks
    def test_unknown_files_and_photos(self) -> Any:
        photo = tiny_jpeg()
        fid = self.stored(photo, "photo.jpg", media="photo", source="photof", identifier=b"%photof")
        code, headers, body = yield self.get(f"files/{fid}/poster")  # a photo is its own poster
        self.assertEqual((code, body, headers.getRawHeaders(b"content-type")), (200, photo, [b"image/jpeg"]))
        code, _, body = yield self.get(f"files/{fid}/play")
        self.assertEqual((code, json.loads(body)["error"]), (404, "not a video: nothing to play"))
        for path in ("files/0123456789abcdef0123/play", "files/0123456789abcdef0123/poster", f"files/{fid}/x",
                     f"files/{fid}/play/x", "files/../../etc/passwd/play"):
            code, _, body = yield self.get(path)
            self.assertEqual(code, 404, path)
        self.assertEqual(self.spawned, [])


class PosterTests(MediaRouteCase):
    """``/files/<id>/poster``: a JPEG of the first picture, made once; the cache stays within its size."""

    @defer.inlineCallbacks
    def test_a_poster_of_each_video_and_the_oldest_removed_past_the_cache_size(self) -> Any:
        self.status.browser_media(self.s).max_bytes = 1  # room for the newest alone
        posters = {}
        for kind, name in (("dualcam", "a.ptmf"), ("dsm", "b.mp4")):
            fid = self.stored(self.media.video(kind), name)
            code, headers, body = yield self.get(f"files/{fid}/poster")
            self.assertEqual((code, headers.getRawHeaders(b"content-type")), (200, [b"image/jpeg"]))
            self.assertEqual((body[:2], body[-2:]), (b"\xff\xd8", b"\xff\xd9"))
            path = self.root / f"{kind}.jpg"
            path.write_bytes(body)
            video = probe(path)["video"]
            self.assertEqual((video["codec_name"], video["width"], video["height"]), ("mjpeg", 1280, 720))
            posters[kind] = fid
        self.assertEqual(self.spawned, ["ffmpeg", "ffmpeg", "ffmpeg"])  # the PTMF muxed, then two posters
        cache = self.s.spool.root / "cache"
        self.assertEqual([p.name for p in cache.iterdir()], [f"{posters['dsm']}.poster.jpg"])
        code, _, _ = yield self.get(f"files/{posters['dsm']}/poster")
        self.assertEqual((code, len(self.spawned)), (200, 3))  # cached
        code, _, _ = yield self.get(f"files/{posters['dualcam']}/poster")
        self.assertEqual((code, len(self.spawned)), (200, 5))  # removed from the cache: made again


class StoredFileTests(MediaRouteCase):
    """``/files/<id>``: the stored bytes, with Range and HEAD."""

    @defer.inlineCallbacks
    def test_ranges(self) -> Any:
        content = self.media.video("dualcam")
        fid = self.stored(content, "video.ptmf")
        code, headers, body = yield self.get(f"files/{fid}")
        self.assertEqual((code, hashlib.sha256(body).digest()), (200, hashlib.sha256(content).digest()))
        self.assertEqual(headers.getRawHeaders(b"content-disposition"), [b'inline; filename="video.ptmf"'])
        self.assertEqual(headers.getRawHeaders(b"content-security-policy"), [b"default-src 'none'; sandbox"])
        for spec, part in (("bytes=0-99", content[:100]), ("bytes=5000-", content[5000:]),
                           ("bytes=-10", content[-10:])):
            code, headers, body = yield self.get(f"files/{fid}", {"Range": spec})
            self.assertEqual((code, body), (206, part), spec)
        code, headers, _ = yield self.get(f"files/{fid}", {"Range": f"bytes={len(content) + 10}-"})
        self.assertEqual(code, 416)
        response = yield self.request_head(f"files/{fid}")
        self.assertEqual((response.code, response.headers.getRawHeaders(b"content-length")),
                         (200, [str(len(content)).encode()]))

    def request_head(self, path: str) -> defer.Deferred:
        from twisted.web.client import Agent

        return Agent(reactor).request(b"HEAD", (self.base + path).encode())


class CacheUnitTests(TestCase):
    """The cache's bookkeeping without ffmpeg."""

    def test_sample_entries_of_what_is_not_an_mp4(self) -> None:
        path = Path(self.mktemp())
        for content in (b"", b"\0\0\0\x08free", b"\0\0\0\x01moov", b"\xff" * 100):
            path.write_bytes(content)
            self.assertEqual(mp4_sample_entries(path), [], content)

    def test_requests_for_a_file_wait_for_one_job(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        (root / "photo.jpg").write_bytes(tiny_jpeg())
        calls: list[defer.Deferred] = []

        def later(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
            d: defer.Deferred = defer.Deferred()
            calls.append(d)
            return d.addCallback(lambda _: f(*args, **kwargs))

        made = BrowserMedia(root / "cache", later, reactor, None)
        photo = MediaFile("abc", root / "photo.jpg", "photo")
        results: list[Any] = []
        for _ in range(3):
            made.poster(photo).addBoth(results.append)
        self.assertEqual((len(calls), results), (1, []))  # one job
        calls[0].callback(None)
        self.assertEqual(results, [root / "photo.jpg"] * 3)
        gone = MediaFile("def", root / "gone.ptmf", "video")
        made.play(gone).addBoth(results.append)
        made.play(gone).addBoth(results.append)
        fired = 1
        while fired < len(calls):  # (each step of the one job)
            calls[fired].callback(None)
            fired += 1
        self.assertEqual([(r.value.code, str(r.value)) for r in results[3:]], [(404, "the stored file is gone")] * 2)
        self.assertEqual(made._making, {})
