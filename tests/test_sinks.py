"""The shipped sinks with real components: an HTTP server, a program, ffmpeg; and plugins."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.protocols import policies
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web import resource, server
from twisted.web.client import _HTTP11ClientFactory

from camgateway.runtime.config import ConfigError
from camgateway.runtime.logs import event_record
from camgateway.delivery.outbox import Outbox
from camgateway.wire.ptmf import demux
from camgateway.base.reasons import DeliveryFailed
from camgateway.delivery.sinks import (GatewayInternals, PermanentFailure, ReceivedFile, SinkContext, SpoolView,
                                       Transformed)
from camgateway.delivery.sinks import command as command_sink
from camgateway.delivery.sinks import mp4 as mp4_sink
from camgateway.delivery.sinks.registry import check_chain, known_types, make, make_chain, sink_names, stores, validate
from camgateway.runtime.service import sink_context
from camgateway.transfer.spool import Spool
from tests.support import NO_VECTORS, VECTORS, capture_stream, connect, make_services, poll, stored_files

NOW = datetime.datetime(2024, 10, 29, 12, 43, 42, tzinfo=datetime.timezone.utc)


def received_file(path: Path, **fields: Any) -> ReceivedFile:
    values: dict[str, Any] = dict(
        path=path, imei="863719061653375", peer="10.0.0.1:1", protocol_id=5, camera="dualcam", flow="dualcam",
        source="photof", identifier=b"%photof", media="photo", metadata={"layout": "dualcam-v3", "framerate": 20},
        size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), start_total=1,
        start_crc=0, computed_crc=0, received_at=NOW, capture_time=NOW, resumed_from=0, crc_errors=0)
    values.update(fields)
    return ReceivedFile(**values)


def bare_context(root: Path) -> SinkContext:
    """A sink's context on the real reactor and thread pool, its spool under ``root``."""
    return SinkContext(reactor=reactor, clock=reactor, run_in_thread=deferToThread,
                       spool=SpoolView(Spool(root / "spool")))


class Endpoint(resource.Resource):
    """An HTTP endpoint that answers from a script: codes, or "hang"."""

    isLeaf = True

    def __init__(self, script: list[Any]) -> None:
        super().__init__()
        self.script = script
        self.requests: list[dict[str, Any]] = []

    def render(self, request: Any) -> Any:
        body = request.content.read()
        self.requests.append({"method": request.method, "path": request.path, "headers": request.requestHeaders,
                              "args": dict(request.args), "body": body})
        action = self.script.pop(0) if self.script else 200
        if action == "hang":
            return server.NOT_DONE_YET
        request.setResponseCode(action)
        return b"ok" if action < 300 else b"nope"

    def delivered(self) -> list[dict[str, Any]]:
        return [r for i, r in enumerate(self.requests) if True]


class JPEGFileCase(TestCase):
    """A test with a work folder holding a small JPEG, ``self.file``."""

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.file = self.work / "x.part"
        self.file.write_bytes(b"\xff\xd8" + os.urandom(3000) + b"\xff\xd9")


class HTTPSinkTests(JPEGFileCase):
    """The http sink against a real twisted.web server."""

    def serve(self, script: list[Any]) -> Endpoint:
        endpoint = Endpoint(script)
        site = server.Site(endpoint)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        return endpoint

    def sink(self, **config: Any) -> Any:
        entry = {"type": "http", "url": f"http://127.0.0.1:{self.port}/up/{{imei}}/{{name}}", **config}
        sink = make(validate(entry, "sinks[0]", self.work), bare_context(self.work))
        self.addCleanup(sink.close)
        return sink

    @defer.inlineCallbacks
    def test_post_multipart_with_metadata_and_secret_header(self) -> Any:
        endpoint = self.serve([200])
        os.environ["CAMGW_TEST_TOKEN"] = "s3cret"
        self.addCleanup(os.environ.pop, "CAMGW_TEST_TOKEN")
        sink = self.sink(headers={"Authorization": {"env": "CAMGW_TEST_TOKEN", "prefix": "Bearer "}})
        url = yield sink.deliver(received_file(self.file))
        [request] = endpoint.requests
        self.assertEqual(request["path"], b"/up/863719061653375/20241029T124342Z_photof.jpg")
        self.assertTrue(url.endswith("/up/863719061653375/20241029T124342Z_photof.jpg"))
        self.assertEqual(request["headers"].getRawHeaders("authorization"), ["Bearer s3cret"])
        self.assertEqual(request["args"][b"file"], [self.file.read_bytes()])
        metadata = json.loads(request["args"][b"metadata"][0])
        self.assertEqual(metadata["imei"], "863719061653375")
        self.assertNotIn("s3cret", sink.name + repr(sink.url))

    @defer.inlineCallbacks
    def test_put_raw_body(self) -> Any:
        endpoint = self.serve([201])
        sink = self.sink(method="PUT")
        yield sink.deliver(received_file(self.file))
        [request] = endpoint.requests
        self.assertEqual((request["method"], request["body"]), (b"PUT", self.file.read_bytes()))
        self.assertEqual(json.loads(request["headers"].getRawHeaders("x-camgateway-metadata")[0])["size"], 3004)

    @defer.inlineCallbacks
    def test_idempotency_key_on_post_and_put(self) -> Any:
        """The file's id goes with every request: as Idempotency-Key, in the metadata and as {id}."""
        endpoint = self.serve([503, 200, 200])
        post = self.sink()
        received = received_file(self.file, id="0123456789abcdef0123456789abcdef")
        yield self.assertFailure(post.deliver(received), RuntimeError)
        yield post.deliver(received)  # the outbox's retry
        put = self.sink(method="PUT", url=f"http://127.0.0.1:{self.port}/files/{{id}}")
        url = yield put.deliver(received)
        self.assertTrue(url.endswith("/files/0123456789abcdef0123456789abcdef"))
        self.assertEqual([r["method"] for r in endpoint.requests], [b"POST", b"POST", b"PUT"])
        for request in endpoint.requests:
            self.assertEqual(request["headers"].getRawHeaders("idempotency-key"), [received.id])
        for request in endpoint.requests[:2]:
            self.assertEqual(json.loads(request["args"][b"metadata"][0])["id"], received.id)
        put_metadata = endpoint.requests[2]["headers"].getRawHeaders("x-camgateway-metadata")[0]
        self.assertEqual(json.loads(put_metadata)["id"], received.id)

    @defer.inlineCallbacks
    def test_no_idempotency_key_without_an_id(self) -> Any:
        endpoint = self.serve([200])
        yield self.sink().deliver(received_file(self.file))
        [request] = endpoint.requests
        self.assertIsNone(request["headers"].getRawHeaders("idempotency-key"))

    @defer.inlineCallbacks
    def test_status_classes(self) -> Any:
        self.serve([503, 429, 408, 400, 404])
        sink = self.sink()
        for _ in range(3):
            error = yield self.assertFailure(sink.deliver(received_file(self.file)), RuntimeError)
            self.assertNotIsInstance(error, PermanentFailure)
        for code in (400, 404):
            error = yield self.assertFailure(sink.deliver(received_file(self.file)), PermanentFailure)
            self.assertIn(f"HTTP {code}", str(error))

    @defer.inlineCallbacks
    def test_timeout_is_transient(self) -> Any:
        self.serve(["hang"])
        sink = self.sink(timeout=0.3)
        yield self.assertFailure(sink.deliver(received_file(self.file)), Exception)

    def test_config_errors_name_the_key(self) -> None:
        base = self.work
        for entry, key in [({"type": "http"}, "sinks[0].url"), ({"type": "http", "url": "ftp://x"}, "sinks[0].url"),
                           ({"type": "http", "url": "http://x/{nope}"}, "sinks[0].url"),
                           ({"type": "http", "url": "http://x", "method": "GET"}, "sinks[0].method"),
                           ({"type": "http", "url": "http://x", "headers": {"A": {"env": "CAMGW_UNSET_VAR"}}},
                            "sinks[0].headers.A"),
                           ({"type": "http", "url": "http://x", "bogus": 1}, "sinks[0].bogus"),
                           ({"type": "nosuch"}, "sinks[0].type")]:
            with self.assertRaises(ConfigError) as caught:
                validate(entry, "sinks[0]", base)
            self.assertEqual(caught.exception.key, key, entry)


class CommandSinkTests(TestCase):
    """The command sink runs a real program."""

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.script = self.work / "ingest"
        self.script.write_text(textwrap.dedent(f"""\
            #!{sys.executable}
            import sys, shutil, os
            out = {str(self.work)!r}
            shutil.copy(sys.argv[-1], os.path.join(out, "copied"))
            open(os.path.join(out, "stdin.json"), "w").write(sys.stdin.read())
            open(os.path.join(out, "args"), "w").write(" ".join(sys.argv[1:-1]))
            open(os.path.join(out, "file_id"), "w").write(os.environ.get("CAMGATEWAY_FILE_ID", "<unset>"))
            code = int(open(os.path.join(out, "code")).read()) if os.path.exists(os.path.join(out, "code")) else 0
            sys.stderr.write("ingest says hi")
            sys.exit(code)
            """))
        self.script.chmod(0o755)
        self.file = self.work / "f.part"
        self.file.write_bytes(os.urandom(1000))
        self.sink = make(validate({"type": "command", "command": [str(self.script), "--fleet", "north"],
                                   "timeout": 20}, "sinks[0]", self.work), bare_context(self.work))

    @defer.inlineCallbacks
    def test_exit_zero_delivers_with_path_and_metadata(self) -> Any:
        yield self.sink.deliver(received_file(self.file))
        self.assertEqual((self.work / "copied").read_bytes(), self.file.read_bytes())
        self.assertEqual(json.loads((self.work / "stdin.json").read_text())["imei"], "863719061653375")
        self.assertEqual((self.work / "args").read_text(), "--fleet north")

    @defer.inlineCallbacks
    def test_file_id_in_the_environment(self) -> Any:
        received = received_file(self.file, id="0123456789abcdef0123456789abcdef")
        yield self.sink.deliver(received)
        self.assertEqual((self.work / "file_id").read_text(), received.id)
        self.assertEqual(json.loads((self.work / "stdin.json").read_text())["id"], received.id)
        os.environ["CAMGATEWAY_FILE_ID"] = "the gateway's own"
        self.addCleanup(os.environ.pop, "CAMGATEWAY_FILE_ID")
        yield self.sink.deliver(received_file(self.file))  # no id: none, not one inherited
        self.assertEqual((self.work / "file_id").read_text(), "<unset>")

    @defer.inlineCallbacks
    def test_exit_codes(self) -> Any:
        (self.work / "code").write_text("1")
        error = yield self.assertFailure(self.sink.deliver(received_file(self.file)), RuntimeError)
        self.assertEqual(str(error), "program exited with status 1: ingest says hi")
        (self.work / "code").write_text(str(command_sink.PERMANENT_EXIT))
        yield self.assertFailure(self.sink.deliver(received_file(self.file)), PermanentFailure)

    def test_missing_program(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            validate({"type": "command", "command": ["/nonexistent/prog"]}, "sinks[2]", self.work)
        self.assertEqual(caught.exception.key, "sinks[2].command")


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=codec_name,codec_tag_string,width,height,r_frame_rate,nb_read_frames,duration",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["streams"][0]


def audio_codec(path: Path) -> str:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=codec_name",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def decode_errors(path: Path) -> str:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"],
                          capture_output=True, text=True).stderr


class MP4SinkTests(TestCase):
    """PTMF to MP4 with sound with the real ffmpeg (.ci/run installs it); more in tests/test_video.py."""

    timeout = 120

    def setUp(self) -> None:
        if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
            raise SkipTest("ffmpeg/ffprobe not installed (.ci/run installs Debian's ffmpeg)")
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        self.s = make_services(self.root)
        self.s.run_in_thread = deferToThread

    def sink(self, **config: Any) -> Any:
        return make(validate({"type": "mp4", **config}, "sinks[0]", self.root), sink_context(self.s, reactor))

    def capture_video(self) -> Path:
        if not VECTORS.is_dir():
            raise SkipTest(NO_VECTORS)
        services = make_services(self.root / "replay")
        protocol, _ = connect(services)
        protocol.dataReceived(capture_stream("dualcam-video-front-resume.json"))
        [ptmf] = stored_files(self.root / "replay")
        target = self.s.spool.path(self.s.spool.new_name())
        shutil.copy(ptmf, target)
        return target

    @defer.inlineCallbacks
    def test_real_capture_to_hevc_mp4_and_poster(self) -> Any:
        video = self.capture_video()
        received = received_file(video, media="video", source="videof", identifier=b"%videof")
        result = yield self.sink(h264=True).deliver(received)
        self.assertIsInstance(result, Transformed)
        mp4, poster, h264, original = result.files
        self.assertEqual((mp4.derived, poster.derived, h264.derived, original.derived),
                         ("mp4", "poster", "h264", "original"))
        info = ffprobe(mp4.path)
        self.assertEqual((info["codec_name"], info["codec_tag_string"], info["width"], info["height"]),
                         ("hevc", "hvc1", 1280, 720))
        self.assertEqual((info["r_frame_rate"], info["nb_read_frames"], float(info["duration"])), ("20/1", "60", 3.0))
        self.assertEqual(decode_errors(mp4.path), "")
        self.assertEqual(poster.path.read_bytes()[:2], b"\xff\xd8")
        self.assertEqual(poster.media, "photo")
        self.assertEqual(ffprobe(h264.path)["codec_name"], "h264")
        for made in (mp4, h264):  # both with the camera's sound
            self.assertEqual(audio_codec(made.path), "aac")
        self.assertEqual(mp4.sha256, hashlib.sha256(mp4.path.read_bytes()).hexdigest())
        self.assertEqual((original.path, original.sha256, original.media), (video, received.sha256, "video"))
        self.assertEqual(self.s.spool.names(), {video.name, mp4.path.name, poster.path.name, h264.path.name})

    @defer.inlineCallbacks
    def test_photos_and_files_that_are_no_video_pass_through(self) -> Any:
        photo = self.s.spool.path(self.s.spool.new_name())
        photo.write_bytes(b"\xff\xd8 a photo \xff\xd9")
        self.assertIsNone((yield self.sink().deliver(received_file(photo))))
        other = self.s.spool.path(self.s.spool.new_name())
        other.write_bytes(b"not a video at all")
        self.assertIsNone((yield self.sink().deliver(received_file(other, media="video"))))

    @defer.inlineCallbacks
    def test_broken_ptmf_goes_on_as_the_original_with_the_reason(self) -> Any:
        broken = self.s.spool.path(self.s.spool.new_name())
        broken.write_bytes(b"PTMF" + os.urandom(500))
        received = received_file(broken, media="video")
        result = yield self.sink().deliver(received)
        [original] = result.files
        self.assertEqual((original.path, original.sha256, original.derived), (broken, received.sha256, "original"))
        self.assertRegex(original.metadata["conversion_error"],
                         r"^not a usable PTMF container: (no PTMF frame header at byte \d+|PTMF frame at byte 0 runs"
                         r" past the end \(\d+ bytes\))$")
        self.assertEqual(original.metadata["framerate"], 20)  # the camera's metadata is kept
        self.assertEqual(self.s.spool.names(), {broken.name})

    def test_demux_frame_rate_from_timestamps(self) -> None:
        import struct

        def frame(kind: bytes, ts: int, payload: bytes) -> bytes:
            header = bytearray(36)
            header[0:4], header[5] = b"PTMF", kind[0]
            struct.pack_into("<HH", header, 8, 1280, 720)
            struct.pack_into("<II", header, 24, len(payload), ts)
            return bytes(header) + payload

        # Microseconds, as a DualCam stamps its frames: 50,000 apart is 20 fps.
        data = b"".join(frame(b"I" if i == 0 else b"P", 1000 + 50_000 * i, b"\0\0\0\1" + bytes([i]))
                        for i in range(21))
        data += frame(b"A", 1020, b"\x00\x01\xa0\x00" + bytes(320))
        demuxed = demux(data)
        self.assertEqual((demuxed.video_frames, demuxed.width, demuxed.height, len(demuxed.audio)), (21, 1280, 720, 1))
        self.assertEqual(demuxed.frame_rate(), 20.0)
        self.assertEqual(demuxed.audio, [bytes(320)])  # without its 4-byte header


class PipelineTests(TestCase):
    """mp4 then disk: the disk sink stores the MP4 and the poster beside the camera's PTMF."""

    timeout = 120

    @defer.inlineCallbacks
    def test_mp4_then_disk(self) -> Any:
        if shutil.which("ffmpeg") is None:
            raise SkipTest("ffmpeg not installed (.ci/run installs Debian's ffmpeg)")
        if not VECTORS.is_dir():
            raise SkipTest(NO_VECTORS)
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        services = make_services(root)  # synchronous steps: the capture is fed in one piece
        services.sinks = [make(validate({"type": "mp4"}, "s", root), sink_context(services, reactor)),
                          services.sinks[0]]
        protocol, transport = connect(services)
        protocol.dataReceived(capture_stream("dualcam-video-front-resume.json"))
        yield services.outbox.idle()
        while services.outbox.in_flight:
            yield task.deferLater(reactor, 0.05, lambda: None)
        names = sorted(p.name for p in stored_files(root))
        self.assertEqual(names, ["20241029T124342Z_videof.mp4", "20241029T124342Z_videof.ptmf",
                                 "20241029T124342Z_videof_poster.jpg"])
        derived = {p.suffix: json.loads(p.with_name(p.name + ".json").read_text())["derived"]
                   for p in stored_files(root)}
        self.assertEqual(derived, {".mp4": "mp4", ".ptmf": "original", ".jpg": "poster"})
        self.assertEqual(services.spool.names(), set())


class PluginTests(TestCase):
    """Third-party sinks register under the entry point group camgateway.sinks."""

    def test_entry_point_sink_is_found_and_built(self) -> None:
        site = Path(self.mktemp()).resolve()
        (site / "camgw_fake_sink-1.0.dist-info").mkdir(parents=True)
        (site / "camgw_fake_sink-1.0.dist-info" / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: camgw-fake-sink\nVersion: 1.0\n")
        (site / "camgw_fake_sink-1.0.dist-info" / "entry_points.txt").write_text(
            "[camgateway.sinks]\nfake = camgw_fake_sink\n")
        (site / "camgw_fake_sink.py").write_text(textwrap.dedent("""\
            def validate(config, key, base):
                return {"type": "fake", "bucket": config.get("bucket", "default")}
            class Sink:
                name = "fake"
                def __init__(self, bucket, *given):
                    self.bucket = bucket
                    self.given = given
                def deliver(self, received):
                    return None
            uses_internals = True  # asks for more than the plugin surface: not given to a third-party sink
            def make(config, *given):
                return Sink(config["bucket"], *given)
            """))
        sys.path.insert(0, str(site))
        self.addCleanup(sys.path.remove, str(site))
        self.assertIn("fake", known_types())
        entry = validate({"type": "fake", "bucket": "b1"}, "sinks[1]", site)
        context = bare_context(site)
        sink = make(entry, context, GatewayInternals(heads=object()))
        self.assertEqual(sink.bucket, "b1")
        [given] = sink.given  # the context alone: no internals, no gateway services
        self.assertIsInstance(given, SinkContext)
        self.assertEqual((given.reactor, given.clock, given.run_in_thread, given.spool),
                         (reactor, reactor, deferToThread, context.spool))
        self.assertEqual(given.log.namespace, "camgateway.delivery.sinks.fake")  # a logger of its own
        self.assertTrue(stores(entry))  # a sink that does not say otherwise stores what it is given
        self.assertEqual(check_chain([entry]), [])
        named = validate({"type": "fake", "name": "archive"}, "sinks[0]", site)  # "name" is not the type's
        self.assertEqual([sink.name for sink in make_chain([entry, named, entry], context)],
                         ["fake", "archive", "fake-2"])

    def test_the_spool_view_reads_and_names_new_files_only(self) -> None:
        root = Path(self.mktemp()).resolve()
        spool = Spool(root)
        view = SpoolView(spool)
        self.assertEqual(view.root, spool.root)
        self.assertEqual(view.path("a.part"), spool.path("a.part"))
        first, second = view.new_path(), view.new_path()
        self.assertNotEqual(first, second)
        self.assertEqual(first.parent, spool.path("a.part").parent)  # where the outbox finds the files handed on
        self.assertFalse(first.exists())
        for missing in ("unlink", "open", "ensure", "names", "dead", "partials", "store_path"):
            self.assertFalse(hasattr(view, missing), missing)  # nothing that changes or lists the gateway's files
        with self.assertRaises(dataclasses.FrozenInstanceError):
            view.root = root  # type: ignore[misc]


class RestartTests(TestCase):
    """A gateway restart between a failed and a successful attempt delivers exactly once."""

    timeout = 120

    @defer.inlineCallbacks
    def test_http_delivery_survives_restart_exactly_once(self) -> Any:
        import random

        from camgateway.sim import ContentPool
        from tests.test_integration import GatewayTestCase, camera

        endpoint = Endpoint([503] * 1000)
        port = reactor.listenTCP(0, server.Site(endpoint), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        gw = GatewayTestCase("cameras")
        gw.mktemp = self.mktemp  # type: ignore[method-assign]
        work = Path(self.mktemp()).resolve()
        sink = validate({"type": "http", "url": f"http://127.0.0.1:{port.getHost().port}/f/{{name}}"}, "s", work)
        yield gw.start_gateway(root=work, sinks=(sink,))
        rng = random.Random(5)
        spec = camera(0, "dualcam", rng, ContentPool(rng, 1), photos=1, videos=0)
        results = yield gw.cameras([spec])
        self.assertTrue(results[0].ok)
        while not endpoint.requests:
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield gw.top.stopService()
        failed = len(endpoint.requests)
        endpoint.script[:] = []  # the endpoint is back: 200 from now on
        yield gw.start_gateway(root=work, sinks=(sink,))
        self.addCleanup(gw.top.stopService)
        for _ in range(400):
            if len(endpoint.requests) > failed:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield gw.drained()
        yield task.deferLater(reactor, 0.3, lambda: None)  # nothing else arrives
        self.assertEqual(len(endpoint.requests), failed + 1)
        [content] = [f.content for f in spec.files]
        self.assertEqual(endpoint.requests[-1]["args"][b"file"], [content])
        keys = {tuple(r["headers"].getRawHeaders("idempotency-key") or ()) for r in endpoint.requests}
        self.assertEqual(len(keys), 1)  # every attempt, before and after the restart, under one key
        [[key]] = keys
        self.assertEqual(json.loads(endpoint.requests[-1]["args"][b"metadata"][0])["id"], key)
        self.assertEqual(gw.spool_leftovers(work), [])


class ChainTests(TestCase):
    """What ``sinks:`` as a whole must be: every sink named once, the output of every sink stored somewhere."""

    def setUp(self) -> None:
        if shutil.which("ffmpeg") is None:
            raise SkipTest("ffmpeg not installed (the mp4 sink needs it; .ci/run installs Debian's ffmpeg)")
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir()
        self.program = self.base / "upload.sh"
        self.program.write_text("#!/bin/sh\n")
        self.program.chmod(0o755)

    def sinks(self, *entries: dict[str, Any]) -> Any:
        from camgateway.runtime.config import parse_config

        return parse_config({"sinks": list(entries)}, base=self.base).sinks

    def refused(self, *entries: dict[str, Any]) -> ConfigError:
        from camgateway.runtime.config import parse_config

        with self.assertRaises(ConfigError) as caught:
            parse_config({"sinks": list(entries)}, base=self.base)
        return caught.exception

    def test_default_names_are_readable_and_unique(self) -> None:
        command = {"type": "command", "command": str(self.program)}
        sinks = self.sinks({"type": "mp4"}, {"type": "disk", "root": "a"}, {"type": "disk", "root": "b"},
                           command, command, {"type": "http", "url": "http://127.0.0.1:8080/up/{imei}/{name}"},
                           {"type": "http", "url": "http://127.0.0.1:8081/up/{imei}/{name}"},
                           {"type": "http", "url": "https://fleet.example.com/{imei}"})
        self.assertEqual(sink_names(sinks),
                         ["mp4", "disk", "disk-2", "command:upload.sh", "command:upload.sh-2", "http:127.0.0.1:8080",
                          "http:127.0.0.1:8081", "http:fleet.example.com"])

    def test_given_names_are_kept_and_defaults_step_aside(self) -> None:
        sinks = self.sinks({"type": "disk", "root": "a"}, {"type": "disk", "root": "b", "name": "disk"},
                           {"type": "disk", "root": "c", "name": "archive.v2:cold_1"})
        self.assertEqual(sink_names(sinks), ["disk-2", "disk", "archive.v2:cold_1"])

    def test_bad_and_duplicate_names_are_refused(self) -> None:
        for name in ("", "two words", "ünïcode", "a/b", 3, None, True):
            error = self.refused({"type": "disk", "root": "a"}, {"type": "disk", "root": "b", "name": name})
            self.assertEqual(error.key, "sinks[1].name", name)
        error = self.refused({"type": "disk", "root": "a", "name": "x"}, {"type": "disk", "root": "b", "name": "x"})
        self.assertEqual(error.key, "sinks[1].name")
        self.assertIn("'x' is already the name of sinks[0]", str(error))

    def test_a_chain_whose_output_no_sink_stores_is_refused(self) -> None:
        for entries, key, where in (
                (({"type": "mp4"},), "sinks[0]", "is the last sink"),
                (({"type": "disk", "root": "a"}, {"type": "mp4"}), "sinks[1]", "is the last sink"),
                (({"type": "disk", "root": "a"}, {"type": "mp4"}, {"type": "mp4", "name": "again"}), "sinks[1]",
                 "no sink after it does")):
            error = self.refused(*entries)
            self.assertEqual(error.key, key, entries)
            self.assertIn(where, str(error))
            self.assertIn(f"{mp4_sink.passes_on} go only to the sinks after it; put a disk, http or command sink"
                          " after it", str(error))
        self.assertFalse(stores({"type": "mp4"}))
        for after in ({"type": "disk", "root": "a"}, {"type": "command", "command": str(self.program)},
                      {"type": "http", "url": "http://127.0.0.1:8080/{name}"}):
            self.assertEqual([sink["type"] for sink in self.sinks({"type": "mp4"}, after)], ["mp4", after["type"]])
            self.assertTrue(stores(after))

    def test_built_sinks_carry_their_names(self) -> None:
        command = {"type": "command", "command": str(self.program)}
        configs = self.sinks(command, command, {"type": "http", "url": "http://127.0.0.1:8080/up/{imei}/{name}"},
                             {"type": "disk", "root": "a", "name": "archive"})
        made = make_chain(configs, sink_context(make_services(self.base), reactor))
        self.addCleanup(made[2].close)
        self.addCleanup(made[3].close)
        self.assertEqual([sink.name for sink in made],
                         ["command:upload.sh", "command:upload.sh-2", "http:127.0.0.1:8080", "archive"])


class _Reset(Protocol):
    """Resets the connection (RST, not FIN) as soon as the request begins."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abortConnection()


class _EarlyAnswer(Protocol):
    """Answers 503 as soon as the request begins (before its body is sent), then closes once the body came."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n"
                                 b"Connection: close\r\n\r\nbusy")
        self.received += data
        head, _, body = bytes(self.received).partition(b"\r\n\r\n")
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        if length and len(body) >= length[0]:
            self.transport.loseConnection()


class Faulty(Factory):
    """An HTTP receiver that misbehaves as scripted, one fault per connection, then answers 200.

    A fault is ``"reset"`` (the connection is reset once the request begins),
    ``"early 503"`` (a 503 before the body is sent), ``"hang"`` (no answer
    ever) or a status code.
    """

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.endpoint = Endpoint([])
        self.site = server.Site(self.endpoint)

    def buildProtocol(self, addr: Any) -> Any:
        fault = self.script.pop(0) if self.script else 200
        if fault == "reset":
            return _Reset()
        if fault == "early 503":
            return _EarlyAnswer()
        self.endpoint.script.append(fault)
        return self.site.buildProtocol(addr)


def listen_faulty(test: TestCase, script: list[Any]) -> tuple[Faulty, str]:
    """A :class:`Faulty` receiver on a free local port, gone after ``test`` with its connections; its URL."""
    faulty = Faulty(script)
    connections = policies.WrappingFactory(faulty)
    port = reactor.listenTCP(0, connections, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    test.addCleanup(poll, lambda: not connections.protocols, what="the receiver's connections closed")
    return faulty, f"http://127.0.0.1:{port.getHost().port}/up/{{name}}"


class HTTPFaultTests(TestCase):
    """A receiver's ordinary faults, through the outbox: a warning that says why in words, no error or
    critical line, and a retry that delivers."""

    timeout = 60

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def deliver_through(self, fault: Any, timeout: float = 10.0) -> Any:
        """Deliver a file to a receiver that first does ``fault``; the outbox's log lines."""
        faulty, url = listen_faulty(self, [fault])
        s = make_services(self.root, clock=reactor)  # type: ignore[arg-type]
        yield s.outbox.stop()
        sink = make(validate({"type": "http", "url": url, "timeout": timeout}, "sinks[0]", self.root),
                    sink_context(s, reactor))
        self.addCleanup(sink.close)
        s.sinks = [sink]
        s.outbox = Outbox(s, poll=0.2, rng=random.Random(1))
        s.outbox.start()
        self.addCleanup(s.outbox.stop)
        path = s.spool.path(s.spool.new_name())
        content = b"\xff\xd8" + os.urandom(4_000_000) + b"\xff\xd9"  # the faults come while it is being sent
        path.write_bytes(content)
        yield s.outbox.add(received_file(path), None)
        yield poll(lambda: any(e.get("event") == "file_delivered" for e in self.events), what="the retried delivery")
        records = [event_record(e) for e in self.events]
        self.assertEqual([r["message"] for r in records if r["level"] in ("error", "critical")], [])
        self.assertEqual([r["event"] for r in records if r["namespace"] == "camgateway.delivery.outbox"],
                         ["delivery_failed", "file_delivered"])
        self.assertEqual(faulty.endpoint.requests[-1]["args"][b"file"], [content])  # the retry delivered it
        [warning] = [r for r in records if r["event"] == "delivery_failed"]
        self.assertEqual((warning["level"], warning["sink"], warning["attempt"], warning["imei"]),
                         ("warn", sink.name, 1, "863719061653375"))
        self.assertTrue(warning["message"].startswith(f"delivery to {sink.name} failed (attempt 1), retrying in "
                                                      f"{warning['retry_in']:.1f} s: {warning['reason']}; camera "))
        return warning["reason"]

    @defer.inlineCallbacks
    def test_a_reset_connection(self) -> Any:
        reason = yield self.deliver_through("reset")
        self.assertIn(reason, ["connection reset by the receiver before answering",
                               "connection reset by the receiver while the file was being sent"])

    @defer.inlineCallbacks
    def test_a_503(self) -> Any:
        reason = yield self.deliver_through(503)
        self.assertEqual(reason, "HTTP 503 Service Unavailable: nope")

    @defer.inlineCallbacks
    def test_a_503_before_the_file_was_sent(self) -> Any:
        reason = yield self.deliver_through("early 503")
        self.assertEqual(reason, "HTTP 503 Service Unavailable: busy")

    @defer.inlineCallbacks
    def test_no_answer(self) -> Any:
        reason = yield self.deliver_through("hang", timeout=0.3)
        self.assertEqual(reason, "timeout after 0.3 s")


class SinkWordsTests(JPEGFileCase):
    """Each sink's failures say why in words, and its client connections log nothing."""

    @defer.inlineCallbacks
    def test_http_statuses_and_timeout(self) -> Any:
        _, url = listen_faulty(self, [503, 400, "hang"])
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for fault, kind, words in [(503, DeliveryFailed, "HTTP 503 Service Unavailable: nope"),
                                   (400, PermanentFailure, "HTTP 400 Bad Request: nope"),
                                   ("hang", DeliveryFailed, "timeout after 0.3 s")]:
            sink = make(validate({"type": "http", "url": url, "timeout": 0.3}, "sinks[0]", self.work),
                        bare_context(self.work))
            self.addCleanup(sink.close)
            error = yield self.assertFailure(sink.deliver(received_file(self.file)), kind)
            self.assertEqual(str(error), words)
        yield sink.deliver(received_file(self.file))
        self.assertEqual([e["log_format"] for e in events if isinstance(e.get("factory"), _HTTP11ClientFactory)], [])

    @defer.inlineCallbacks
    def test_a_program_that_fails(self) -> Any:
        program = self.work / "ingest"
        program.write_text(textwrap.dedent(f"""\
            #!{sys.executable}
            import sys, time
            sys.stdin.read()
            sys.stderr.write("reading the sidecar\\n" + "x" * 5000 + "\\nno route to archive\\n\\n")
            sys.stderr.flush()
            if sys.argv[1] == "sleep":
                time.sleep(30)
            sys.exit(3)
            """))
        program.chmod(0o755)
        for args, timeout, words in [(["exit"], 20, "program exited with status 3: no route to archive"),
                                     (["sleep"], 0.5, "timeout after 0.5 s (program killed): no route to archive")]:
            sink = make(validate({"type": "command", "command": [str(program), *args], "timeout": timeout},
                                 "sinks[0]", self.work), bare_context(self.work))
            error = yield self.assertFailure(sink.deliver(received_file(self.file)), DeliveryFailed)
            self.assertEqual(str(error), words)
