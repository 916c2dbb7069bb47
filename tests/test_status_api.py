"""The status web service's routes against a running gateway receiving files from the emulator."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from camgateway.runtime.config import ConfigError, parse_config
from camgateway.runtime.context import Stats
from camgateway.sim import CameraSpec, ContentPool
from camgateway.delivery.sinks import PermanentFailure
from camgateway.web.status import StatusRoot
from tests.ops_support import OpsTestCase, basic, get_json, http_get, jpeg_camera, poll, tiny_jpeg
from tests.support import make_services
from tests.test_integration import IMEI_BASE, camera
from tests.test_metrics import received_file
from tests.test_outbox import Recorder

TOKEN = "s3cret-token-for-the-tests"


class ApiTests(OpsTestCase):
    """Every JSON route, the stored files and the page, while cameras send."""

    @defer.inlineCallbacks
    def test_routes_while_cameras_send(self) -> Any:
        yield self.start_ops()
        health = yield get_json(self.url("healthz"))
        self.assertEqual(health["status"], "ok")
        self.assertEqual(len(health["listening"]), 1)
        self.assertEqual((yield get_json(self.url("api/files"))), [])
        self.assertEqual((yield get_json(self.url("api/sessions"))), [])

        rng = random.Random(11)
        pool = ContentPool(rng, variants=2)
        jpeg = tiny_jpeg()
        slow = camera(2, "dsm", rng, pool, photos=0, videos=1, video_size=300_000, slow_bps=150_000)
        specs = [jpeg_camera(0, jpeg, b"PTMF" + rng.randbytes(20_000)), camera(1, "adas", rng, pool), slow]
        running = self.cameras(specs)

        # a transfer in progress: progress fields, and its session
        def slow_transfer() -> Any:
            d = get_json(self.url("api/transfers"))
            return d.addCallback(lambda ts: next((t for t in ts if t["imei"] == str(slow.imei)
                                                  and 0 < t["held"] < t["total"]), None))

        transfer = yield poll(slow_transfer, what="the slow camera's transfer in /api/transfers")
        self.assertEqual(transfer["camera"], "dsm")
        self.assertEqual(transfer["media"], "video")
        self.assertEqual(transfer["total"], 300_000)
        self.assertTrue(0 < transfer["percent"] < 100)
        self.assertGreaterEqual(transfer["rate_bps"], 0)
        self.assertIn("/sdcard/dsm/", transfer["file"])
        sessions = yield get_json(self.url("api/sessions"))
        [session] = [s for s in sessions if s["imei"] == str(slow.imei)]
        self.assertEqual((session["camera"], session["state"], session["transferring"]), ("dsm", "receiving", True))
        self.assertTrue(session["peer"].startswith("127.0.0.1:"))

        results = yield running
        self.assertEqual([r.imei for r in results if not r.ok], [])
        expected = sum(len(s.files) for s in specs)
        files = yield self.settled(expected)
        self.assertEqual(len(files), expected)
        self.assertEqual((yield get_json(self.url("api/transfers"))), [])

        # the photo, with its metadata, and its bytes by id
        [photo] = [f for f in files if f["imei"] == str(IMEI_BASE) and f["media"] == "photo"]
        self.assertEqual((photo["camera"], photo["source"], photo["size"]), ("dualcam", "photof", len(jpeg)))
        self.assertEqual(photo["sha256"], hashlib.sha256(jpeg).hexdigest())
        self.assertAlmostEqual(photo["latitude"], 24.9225)
        self.assertAlmostEqual(photo["longitude"], 67.1388)
        self.assertTrue(photo["capture_time"].endswith("Z"))
        self.assertIn("trigger_name", photo)
        self.assertTrue(photo["name"].endswith(".jpg"))
        code, headers, body = yield http_get(self.url(photo["url"]))
        self.assertEqual((code, body), (200, jpeg))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"image/jpeg"])
        # newest first, filters, limit
        self.assertEqual([f["received_at"] for f in files], sorted((f["received_at"] for f in files), reverse=True))
        only = yield get_json(self.url(f"api/files?imei={IMEI_BASE}&media=photo"))
        self.assertEqual([f["id"] for f in only], [photo["id"]])
        self.assertEqual(len((yield get_json(self.url("api/files?limit=1")))), 1)
        # every stored file is served byte-identical
        for f in files:
            code, _, body = yield http_get(self.url(f["url"]))
            self.assertEqual((code, hashlib.sha256(body).hexdigest()), (200, f["sha256"]))

        summary = yield get_json(self.url("api/summary"))
        self.assertEqual(summary["stats"]["files_received"], expected)
        self.assertEqual(summary["stats"]["protocol_errors"], 0)
        self.assertEqual(summary["outbox_depth"], 0)
        self.assertEqual((yield get_json(self.url("api/outbox"))), [])
        self.assertEqual((yield get_json(self.url("api/partials"))), [])
        self.assertEqual((yield get_json(self.url("api/sessions"))), [])

    @defer.inlineCallbacks
    def test_partials_and_failures(self) -> Any:
        yield self.start_ops()
        rng = random.Random(12)
        pool = ContentPool(rng, variants=2)
        dropped = camera(0, "dualcam", rng, pool, photos=0, videos=1, video_size=100_000, drop_after_frames=20)
        garbage = CameraSpec(imei=IMEI_BASE + 1, garbage=True)
        yield self.cameras([dropped, garbage], reconnect=False)

        def partial() -> Any:
            return get_json(self.url("api/partials")).addCallback(lambda ps: ps if ps and ps[0]["held"] and not
                                                                  ps[0]["receiving"] else None)

        [kept] = yield poll(partial, what="the partial in /api/partials")
        self.assertEqual((kept["imei"], kept["flow"], kept["file"]), (str(dropped.imei), "dualcam", "%videof"))
        self.assertEqual(kept["held"], 21 * 1024)
        self.assertEqual(kept["total"], 98 * 1024)
        self.assertTrue(kept["last_seen"].endswith("Z"))

        failures = yield poll(lambda: get_json(self.url("api/failures")), what="a failure")
        self.assertEqual(failures[0]["what"], "protocol error")
        self.assertTrue(failures[0]["why"])
        self.assertTrue(failures[0]["peer"].startswith("127.0.0.1:"))
        self.assertTrue(failures[0]["time"].endswith("Z"))

    @defer.inlineCallbacks
    def test_only_stored_files_are_served(self) -> Any:
        yield self.start_ops()
        yield self.cameras([jpeg_camera(0, tiny_jpeg())])
        [photo] = yield self.settled(1)
        for path in ("files/0123456789abcdef0123", "files/..%2F..%2Fetc%2Fpasswd", "files/../../etc/passwd",
                     f"files/{photo['id']}/x", "files/", "files", f"files/{photo['sha256']}", "api/nothing",
                     "nothing"):
            code, _, body = yield http_get(self.url(path))
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"root:", body)
        code, _, body = yield http_get(self.url(photo["url"]))
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_page_and_its_assets(self) -> Any:
        yield self.start_ops()
        code, headers, page = yield http_get(self.url(""))
        self.assertEqual(code, 200)
        self.assertIn(b'<div id="gallery"', page)
        csp = headers.getRawHeaders(b"content-security-policy")[0]
        self.assertIn(b"default-src 'none'", csp)
        self.assertNotIn(b"http", csp)  # nothing from elsewhere
        for asset, kind in (("page.js", b"text/javascript"), ("page.css", b"text/css")):
            code, headers, body = yield http_get(self.url(asset))
            self.assertEqual(code, 200)
            self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(kind))
            self.assertNotIn(b"//cdn", body)
            self.assertNotIn(b"https://", body)
        code, _, _ = yield http_get(self.url("metrics"))
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_methods_other_than_get_are_refused(self) -> Any:
        from twisted.web.client import Agent

        yield self.start_ops()
        response = yield Agent(reactor).request(b"POST", self.url("api/files").encode())
        self.assertEqual(response.code, 405)


class TokenTests(OpsTestCase):
    """``http.token``: Bearer or basic auth (user camgateway) everywhere but /healthz."""

    @defer.inlineCallbacks
    def test_token(self) -> Any:
        yield self.start_ops(http_token=TOKEN)
        for path in ("", "api/files", "api/summary", "metrics", "files/abc", "page.js"):
            code, headers, body = yield http_get(self.url(path))
            self.assertEqual(code, 401, path)
            self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Basic realm="camgateway", charset="UTF-8"'])
            self.assertIn("error", json.loads(body))
        for header in (f"Bearer {TOKEN}x", "Bearer ", basic("admin", TOKEN), basic("camgateway", "wrong"),
                       f"Token {TOKEN}"):
            code, _, _ = yield http_get(self.url("api/files"), {"Authorization": header})
            self.assertEqual(code, 401, header)
        for header in (f"Bearer {TOKEN}", basic("camgateway", TOKEN)):
            for path in ("", "api/files", "metrics"):
                code, _, _ = yield http_get(self.url(path), {"Authorization": header})
                self.assertEqual(code, 200, (header, path))
        code, _, body = yield http_get(self.url("healthz"))
        self.assertEqual((code, json.loads(body)["status"]), (200, "ok"))


class _Port:
    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 5000)


def healthz(services: Any, ports: list[Any] | None = None) -> tuple[int, dict[str, Any]]:
    """``/healthz`` of a status site over ``services`` (listening on one port unless ``ports`` says)."""
    class Gateway:
        pass

    gateway = Gateway()
    gateway.services, gateway.ports = services, [_Port()] if ports is None else ports  # type: ignore[attr-defined]
    request = DummyRequest([b"healthz"])
    body = StatusRoot(gateway, None, None).getChildWithDefault(b"healthz", request).render(request)
    return request.responseCode, json.loads(body)


class SinkHealthTests(TestCase):
    """``/healthz`` says degraded once every delivery attempt to a sink has failed for ``outbox.degraded_after``."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.s = make_services(self.root, outbox_degraded_after=60.0)
        self.sink = Recorder("http:upstream", [RuntimeError("Connection refused")] * 1000)
        self.s.sinks = [self.sink]

    def test_a_sink_failing_for_long_fails_the_check_until_it_delivers(self) -> None:
        self.s.outbox.add(received_file(self.s, b"photo"), None)
        self.assertEqual(len(self.sink.ids), 1)  # tried at once, and failed
        while self.s.clock.seconds() < 60:
            code, body = healthz(self.s)
            self.assertEqual((code, body["status"]), (200, "ok"), self.s.clock.seconds())
            self.s.clock.advance(1)
        for _ in range(600):  # until an attempt fails 60 s or more after the first
            code, body = healthz(self.s)
            if code == 503:
                break
            self.s.clock.advance(1)
        self.assertEqual((code, body["status"]), (503, "degraded"))
        self.assertGreaterEqual(self.s.clock.seconds(), 60)
        why = body["problems"]["sink http:upstream"]
        self.assertIn("every delivery attempt has failed since 1970-01-01T00:00:00", why)
        self.assertIn("the latest: Connection refused", why)
        self.sink.failures = []  # the sink works again: the next attempt delivers
        for _ in range(600):
            self.s.clock.advance(1)
            if self.sink.got:
                break
        self.assertEqual(self.sink.got, [b"photo"])
        code, body = healthz(self.s)
        self.assertEqual((code, body["status"]), (200, "ok"))
        self.assertNotIn("problems", body)

    def test_one_refused_file_is_not_a_failing_sink(self) -> None:
        self.sink.failures = [PermanentFailure("HTTP 400: not a photo")]
        self.s.outbox.add(received_file(self.s, b"bad"), None)
        self.s.clock.advance(3600)
        code, body = healthz(self.s)
        self.assertEqual((code, body["status"]), (200, "ok"))

    def test_a_delivery_ends_the_failing_time(self) -> None:
        stats = Stats()
        self.assertIsNone(stats.sink_failing("a"))
        stats.sink_failed("a", "refused", 10.0)
        stats.sink_failed("a", "timeout", 15.0)
        failing = stats.sink_failing("a")
        assert failing is not None
        self.assertEqual((failing.since, failing.last, failing.reason), (10.0, 15.0, "timeout"))
        stats.sink_deliveries["a"] += 1
        self.assertIsNone(stats.sink_failing("a"))
        stats.sink_failed("a", "refused", 20.0)
        self.assertEqual(stats.sink_failing("a").since, 20.0)  # type: ignore[union-attr]
        self.assertIsNone(stats.sink_failing("b"))

    def test_degraded_after_is_configured(self) -> None:
        self.assertEqual(parse_config({}).outbox_degraded_after, 600.0)
        self.assertEqual(parse_config({"outbox": {"degraded_after": "2m"}}).outbox_degraded_after, 120.0)
        with self.assertRaises(ConfigError) as caught:
            parse_config({"outbox": {"degraded_after": 0}})
        self.assertIn("outbox.degraded_after", str(caught.exception))
