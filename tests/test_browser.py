"""The status page in real headless Chromium: the gallery shows a photo the emulator just sent.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages ending in NUL, commands on its fd 3, answers on its fd 4), so
the test needs no WebSocket library and no network.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

from camgateway.sim import CameraSpec, ContentPool
from tests.ops_support import OpsTestCase, get_json, jpeg_camera, poll, tiny_jpeg
from tests.test_integration import IMEI_BASE, camera

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe", "--window-size=1280,1000"]
WIDTH = 1280


class DevTools(ProcessProtocol):
    """A Chromium process and its DevTools pipe."""

    def __init__(self) -> None:
        self.buffer = b""
        self.next_id = 0
        self.waiting: dict[int, defer.Deferred] = {}
        self.output = bytearray()
        self.ended: defer.Deferred = defer.Deferred()

    def send(self, method: str, params: Optional[dict[str, Any]] = None, session: Optional[str] = None) -> defer.Deferred:
        """Run a DevTools command; fires with its result."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        d: defer.Deferred = defer.Deferred()
        self.waiting[self.next_id] = d
        self.transport.writeToChild(3, json.dumps(message).encode() + b"\0")
        return d.addTimeout(30, reactor)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != 4:
            self.output += data[: max(0, 20_000 - len(self.output))]
            return
        self.buffer += data
        while b"\0" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\0", 1)
            message = json.loads(raw)
            d = self.waiting.pop(message.get("id"), None)
            if d is None:
                continue  # an event
            if "error" in message:
                d.errback(RuntimeError(f"DevTools: {message['error']}"))
            else:
                d.callback(message.get("result", {}))

    def processEnded(self, reason: Any) -> None:
        for d in self.waiting.values():
            d.errback(RuntimeError(f"chromium ended: {reason.value}\n{self.output.decode(errors='replace')}"))
        self.waiting.clear()
        self.ended.callback(reason.value)

    def kill(self) -> defer.Deferred:
        """Stop the browser if it still runs; fires when it has ended."""
        if not self.ended.called:
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        return self.ended


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


class BrowserTests(OpsTestCase):
    """Loads the page, sends files, waits for the gallery, saves a screenshot."""

    if not os.access(CHROMIUM, os.X_OK):
        skip = f"chromium is not installed ({CHROMIUM}); .ci/run installs it with apt-get install chromium"

    @defer.inlineCallbacks
    def start_browser(self) -> Any:
        profile = Path(self.mktemp()).resolve()
        profile.mkdir(parents=True)
        self.browser = DevTools()
        reactor.spawnProcess(self.browser, CHROMIUM, [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                             env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"})
        self.addCleanup(self.browser.kill)
        targets = yield self.browser.send("Target.getTargets")
        page = next(t["targetId"] for t in targets["targetInfos"] if t["type"] == "page")
        attached = yield self.browser.send("Target.attachToTarget", {"targetId": page, "flatten": True})
        self.page = attached["sessionId"]
        yield self.browser.send("Page.enable", session=self.page)

    @defer.inlineCallbacks
    def evaluate(self, expression: str) -> Any:
        result = yield self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                               "awaitPromise": True}, self.page)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    @defer.inlineCallbacks
    def test_gallery_shows_a_received_photo(self) -> Any:
        yield self.start_ops()
        yield self.start_browser()
        yield self.browser.send("Page.navigate", {"url": self.url("")}, self.page)
        yield poll(lambda: self.evaluate("document.getElementById('health')?.className === 'badge ok'"),
                   what="the page to reach the API")

        rng = random.Random(41)
        pool = ContentPool(rng, variants=2)
        blue = tiny_jpeg(160, 112, lambda bx, by: (30 + bx * 9, 90 + by * 12, 200 - bx * 5))
        warm = tiny_jpeg(160, 112, lambda bx, by: (230 - by * 10, 120 + bx * 6, 40 + by * 8))
        slow = camera(3, "dsm", rng, pool, photos=0, videos=1, video_size=600_000, slow_bps=60_000)
        specs = [jpeg_camera(0, blue, b"PTMF" + rng.randbytes(30_000)), jpeg_camera(1, warm),
                 camera(2, "adas", rng, pool, photos=1, videos=1, video_size=50_000),
                 slow, CameraSpec(imei=IMEI_BASE + 9, garbage=True)]
        running = self.cameras(specs)
        self.addCleanup(lambda: running)

        photos = yield poll(lambda: get_json(self.url("api/files?media=photo")).addCallback(
            lambda files: [f for f in files if f["imei"] in (str(IMEI_BASE), str(IMEI_BASE + 1)) and f["url"]]
            or None).addCallback(lambda mine: mine if mine and len(mine) == 2 else None), what="the two JPEGs stored")
        wanted = sorted(f["url"] for f in photos[:2])
        loaded_js = ("[...document.querySelectorAll('#gallery img.photo')]"
                     ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.getAttribute('src')).sort()")

        def shown() -> Any:
            return self.evaluate(loaded_js).addCallback(lambda srcs: srcs if set(wanted) <= set(srcs or []) else None)

        yield poll(shown, timeout=30, what="the gallery to show the received photos")
        widths = yield self.evaluate("[...document.querySelectorAll('#gallery img.photo')]"
                                     ".filter(i => i.naturalWidth > 0).map(i => i.naturalWidth)")
        self.assertIn(160, widths)
        gallery = yield self.evaluate("document.getElementById('gallery').innerText")
        self.assertIn(str(IMEI_BASE), gallery)
        self.assertIn("24.92250, 67.13880", gallery)  # position from the metadata
        self.assertIn("photof", gallery)
        self.assertIn("2024-10-30", gallery)  # capture time
        # the slow camera's transfer: a progress bar in the sessions table
        yield poll(lambda: self.evaluate("document.querySelectorAll('#sessions progress').length > 0"),
                   what="a progress bar")
        yield poll(lambda: self.evaluate("document.querySelectorAll('#failures tbody tr').length > 0"),
                   what="the garbage camera's failure")

        # the whole page, at its full height
        layout = yield self.browser.send("Page.getLayoutMetrics", session=self.page)
        height = int(layout["cssContentSize"]["height"])
        shot = yield self.browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1}}, self.page)
        data = base64.b64decode(shot["data"])
        path = Path(self.mktemp()).resolve()
        path.mkdir(parents=True)
        path = path / "status-page.png"
        path.write_bytes(data)
        print(f"screenshot: {path}")
        width, shot_height = png_size(data)
        self.assertEqual(width, WIDTH)
        self.assertGreater(shot_height, 800)
        self.assertGreater(len(data), 20_000)  # a page with photos, not a blank one

        results = yield running
        self.assertEqual([r.imei for r in results if not r.ok], [])
        yield self.browser.send("Browser.close")
        reason = yield self.browser.ended
        self.assertIsInstance(reason, ProcessDone)
