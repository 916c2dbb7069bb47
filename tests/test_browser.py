"""The operator's status page in real headless Chromium, driven by Playwright, against a real gateway.

Playwright's sync API runs on a thread of its own (:class:`Browser`; its
objects must stay on the thread that made them) while the gateway and the
camera emulator run on the reactor. The Chromium is the system's
(``apt-get install chromium``): Playwright never downloads a browser here.

With ``CAMGATEWAY_SCREENSHOTS=docs/screenshots`` the tests save a screenshot
of each view there (the README shows them); otherwise into a temporary folder.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest
from twisted.web import resource, server

from camgateway.delivery.sinks.registry import validate
from camgateway.sim import CameraSpec, ContentPool, make_files
from camgateway.sim.media import Media
from camgateway.wire.ptmf import demux
from tests.ops_support import OpsTestCase, get_json, jpeg_camera, poll, tiny_jpeg
from tests.test_integration import IMEI_BASE, camera
from tests.test_video import HAVE_FFMPEG, NO_FFMPEG, emulator_media

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None

CHROMIUM = shutil.which("chromium")
#: Resolved now: the tests run in a temporary working directory (tests/conftest.py).
SHOTS = Path(os.environ["CAMGATEWAY_SCREENSHOTS"]).resolve() if os.environ.get("CAMGATEWAY_SCREENSHOTS") else None
TOKEN = "s3cret-token-0123456789"
DESKTOP = (1280, 900)
PHONE = (400, 800)
WAIT_MS = 30_000

# JavaScript the tests evaluate in the page.
LOADED_IMAGES = ("sel => [...document.querySelectorAll(sel)]"
                 ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.getAttribute('src'))")
NO_SIDEWAYS_SCROLL = "() => document.documentElement.scrollWidth"
HEADER_FITS = """() => {
  const header = document.querySelector('header');
  const parts = [...header.querySelectorAll('.brand, nav a, #health')];
  return {overflow: header.scrollWidth - header.clientWidth,
          outside: parts.filter(p => p.getBoundingClientRect().right > window.innerWidth + 0.5).map(p => p.textContent),
          height: header.getBoundingClientRect().height};
}"""
#: IMEIs shown on one line each (not broken every few digits).
IMEI_LINES = ("() => [...document.querySelectorAll('section:not([hidden]) .imei')]"
              ".filter(e => e.offsetParent !== null).map(e => e.getClientRects().length)")


class Browser:
    """Headless Chromium under Playwright, on a thread of its own; :meth:`call` runs a function there."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.console: list[str] = []
        self.thread = threading.Thread(target=self._run, name="playwright", daemon=True)
        self.thread.start()
        self.playwright: Any = None
        self.chromium: Any = None

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, args, d = job
            try:
                result = fn(*args)
            except BaseException:
                failure = Failure()
                reactor.callFromThread(d.errback, failure)
            else:
                reactor.callFromThread(d.callback, result)

    def call(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(*args)`` on the browser's thread; fires with its result."""
        d: defer.Deferred = defer.Deferred()
        self.jobs.put((fn, args, d))
        return d

    def launch(self) -> None:
        self.playwright = sync_playwright().start()
        self.chromium = self.playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])

    def page(self, size: tuple[int, int] = DESKTOP) -> Any:
        """A new page in a new context (no shared cookies or credentials) of ``size``; on the browser's thread."""
        context = self.chromium.new_context(viewport={"width": size[0], "height": size[1]})
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console.append(f"page error: {e}"))
        page.on("response", lambda r: self.console.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        return page

    def close(self) -> defer.Deferred:
        """Close Chromium and Playwright, and end the thread."""
        def stop() -> None:
            try:
                if self.chromium is not None:
                    self.chromium.close()
            finally:
                if self.playwright is not None:
                    self.playwright.stop()

        d = self.call(stop)
        self.jobs.put(None)
        return d


def shots_folder(case: Any) -> Path:
    """Where screenshots go: ``$CAMGATEWAY_SCREENSHOTS``, else a temporary folder of the test."""
    folder = SHOTS or Path(case.mktemp()).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(page: Any, folder: Path, name: str) -> None:
    """The whole page, once its images are loaded and decoded (on the browser's thread)."""
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    page.evaluate("() => Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


class Endpoint(resource.Resource):
    """An HTTP sink's receiver: answers the scripted codes in turn, then 200."""

    isLeaf = True

    def __init__(self, codes: list[int]) -> None:
        super().__init__()
        self.codes = codes
        self.received: list[bytes] = []

    def render_POST(self, request: server.Request) -> bytes:
        code = self.codes.pop(0) if self.codes else 200
        request.setResponseCode(code)
        if code == 200:
            self.received.append(request.args[b"file"][0])
            return b"stored"
        return b"not now"


class PageTests(OpsTestCase):
    """Every view of the page, on a real gateway fed by the emulator."""

    timeout = 300
    if sync_playwright is None:
        skip = "playwright is not installed (pip install -e '.[test]')"
    elif CHROMIUM is None:
        skip = "chromium is not installed (.ci/run installs it with apt-get install chromium)"

    @defer.inlineCallbacks
    def open_browser(self) -> Any:
        self.browser = Browser()
        self.addCleanup(self.browser.close)
        yield self.browser.call(self.browser.launch)

    def in_browser(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """``fn(*args)`` on the browser's thread."""
        return self.browser.call(fn, *args)

    def assertQuietConsole(self) -> None:
        """The page logged no error (a failed fetch, an exception)."""
        self.assertEqual(self.browser.console, [])

    # -- the tests

    @defer.inlineCallbacks
    def test_history_after_a_restart(self) -> Any:
        """Files sent before the gateway restarted are listed after it, photos shown, on the same SQLite store."""
        yield self.start_ops()
        yield self.open_browser()
        blue = tiny_jpeg(160, 112, lambda bx, by: (30 + bx * 9, 90 + by * 12, 200 - bx * 5))
        warm = tiny_jpeg(160, 112, lambda bx, by: (230 - by * 10, 120 + bx * 6, 40 + by * 8))
        specs = [jpeg_camera(0, blue), jpeg_camera(1, warm)]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        before = yield self.settled(2)
        yield self.top.stopService()

        yield self.start_ops(root=self.root)
        after = yield get_json(self.url("api/files"))
        self.assertEqual(sorted(f["id"] for f in after), sorted(f["id"] for f in before))
        urls = sorted(f["url"] for f in after)
        imeis = [str(IMEI_BASE), str(IMEI_BASE + 1)]

        def files_view() -> dict[str, Any]:
            page = self.browser.page()
            page.goto(self.url("#/files"))
            page.wait_for_function(f"() => ({LOADED_IMAGES})('#files-gallery img').length >= 2")
            shown = sorted(page.evaluate(LOADED_IMAGES, "#files-gallery img"))
            widths = page.evaluate("[...document.querySelectorAll('#files-gallery img')].map(i => i.naturalWidth)")
            text = page.inner_text("#files-gallery")
            # filters: one camera's files, then its videos (it sent none)
            page.fill("#files-filter input[name=imei]", str(IMEI_BASE + 1))
            page.wait_for_function("() => document.querySelectorAll('#files-gallery a.thumb').length === 1")
            filtered = dict(hash=page.evaluate("location.hash"), pager=page.inner_text("#files-pager"))
            page.select_option("#files-filter select[name=kind]", "video")
            page.wait_for_function("() => document.querySelector('#files-gallery').innerText.includes('No file matches')")
            filtered["videos"] = page.evaluate("location.hash")
            page.goto(self.url("#/cameras"))
            page.wait_for_function("() => document.querySelectorAll('#cameras tbody tr').length >= 2")
            cameras = page.inner_text("#cameras")
            offline = page.evaluate("document.querySelectorAll('#cameras .dot.off').length")
            # a photo's page: the photo itself, at full size
            page.goto(self.url(f"#/files/{after[0]['id']}"))
            page.wait_for_function("() => { const i = document.querySelector('#file-media img.full');"
                                   " return i && i.complete && i.naturalWidth > 0; }")
            full = page.evaluate("document.querySelector('#file-media img.full').naturalWidth")
            facts = page.inner_text("#file-facts")
            page.context.close()
            return dict(shown=shown, widths=widths, text=text, cameras=cameras, offline=offline, full=full, facts=facts,
                        filtered=filtered)

        seen = yield self.in_browser(files_view)
        self.assertEqual([u.rsplit("/", 1)[1] for u in seen["shown"]], [u.rsplit("/", 1)[1] for u in urls])
        self.assertEqual(seen["widths"], [160, 160])
        for imei in imeis:
            self.assertIn(imei, seen["text"])
            self.assertIn(imei, seen["cameras"])
        self.assertEqual(seen["filtered"]["hash"], f"#/files?imei={IMEI_BASE + 1}")
        self.assertEqual(seen["filtered"]["pager"].split(), ["←", "newer", "1–1", "of", "1", "older", "→"])
        self.assertEqual(seen["filtered"]["videos"], f"#/files?imei={IMEI_BASE + 1}&kind=video")
        self.assertEqual(seen["offline"], 2)  # seen before the restart, not connected now
        self.assertEqual(seen["full"], 160)
        self.assertIn(after[0]["sha256"], seen["facts"])
        self.assertIn("24.92250, 67.13880", seen["facts"])  # the position from the metadata
        self.assertQuietConsole()

    @defer.inlineCallbacks
    def test_credentials_in_the_url(self) -> Any:
        """``http://camgateway:TOKEN@host/``: the page loads its data (fetch refuses URLs with credentials)."""
        yield self.start_ops(http_token=TOKEN)
        yield self.open_browser()
        results = yield self.cameras([jpeg_camera(0, tiny_jpeg(96, 64))])
        self.assertTrue(results[0].ok)
        address = self.base.replace("http://", f"http://camgateway:{TOKEN}@")

        def visit() -> dict[str, Any]:
            page = self.browser.page()
            page.goto(address)
            page.wait_for_function(f"() => ({LOADED_IMAGES})('#gallery img').length >= 1")
            overview = dict(health=page.inner_text("#health"), offline=page.is_hidden("#offline"),
                            sessions=page.inner_text("#sessions"),
                            tile=page.inner_text("[data-tile='files received'] .value"))
            page.click("nav a[data-nav='cameras']")
            page.wait_for_function(f"() => document.querySelector('#cameras').innerText.includes('{IMEI_BASE}')")
            page.context.close()
            return overview

        overview = yield self.in_browser(visit)
        self.assertTrue(overview["offline"])  # no "cannot reach the gateway" banner
        self.assertNotIn("unauthorized", overview["health"])
        self.assertEqual(overview["tile"], "1")
        self.assertIn("No camera connected", overview["sessions"])
        self.assertQuietConsole()

    @defer.inlineCallbacks
    def test_every_view_with_photos_and_videos(self) -> Any:
        """Photos load, a camera's video plays with its sound, and no view scrolls sideways on a phone."""
        if not HAVE_FFMPEG:
            raise SkipTest(NO_FFMPEG)
        media: Media = yield emulator_media()
        work = Path(self.mktemp()).resolve()
        mp4 = validate({"type": "mp4"}, "sinks[0]", work)
        disk = validate({"type": "disk", "root": str(work / "files")}, "sinks[1]", work)
        yield self.start_ops(sinks=(mp4, disk))
        yield self.open_browser()
        kinds = ["dualcam", "dsm", "adas", "dashcam"]
        specs = [CameraSpec(imei=IMEI_BASE + n, kind=kind,
                            files=tuple(make_files(kind, photos=2, videos=1, media=media, key=n)))
                 for n, kind in enumerate(kinds)]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        ptmf = next(f.content for f in specs[0].files if f.content[:4] == b"PTMF")
        demuxed = demux(ptmf)
        length = demuxed.video_frames / demuxed.frame_rate()
        listed = yield get_json(self.url("api/files?imei=%d&kind=video" % IMEI_BASE))
        playable = [f for f in listed if f.get("play")]
        # the camera's own file (a PTMF, which no browser opens) when it is listed, else the MP4 made of it
        video = next((f for f in playable if (f["name"] or "").endswith(".ptmf")), playable[0])
        # a slow camera still sending: a live session with its progress bar
        rng = random.Random(7)
        slow = camera(9, "dsm", rng, ContentPool(rng, 1), photos=0, videos=1, video_size=900_000, slow_bps=50_000)
        sending = self.cameras([slow])
        self.addCleanup(lambda: sending)
        folder = shots_folder(self)

        def desktop() -> dict[str, Any]:
            page = self.browser.page(DESKTOP)
            page.goto(self.url(""))
            page.wait_for_function("() => document.querySelectorAll('#sessions progress').length > 0")
            page.wait_for_function(f"() => ({LOADED_IMAGES})('#gallery img').length >= 8")
            screenshot(page, folder, "overview")
            page.goto(self.url("#/cameras"))
            page.wait_for_function("() => document.querySelectorAll('#cameras tbody tr').length >= 5")
            screenshot(page, folder, "cameras")
            page.goto(self.url(f"#/cameras/{IMEI_BASE}"))
            page.wait_for_function(f"() => ({LOADED_IMAGES})('#camera-gallery img').length >= 3")
            screenshot(page, folder, "camera")
            page.goto(self.url("#/files"))
            page.wait_for_function(f"() => ({LOADED_IMAGES})('#files-gallery img').length >= 12")
            screenshot(page, folder, "files")
            # the DualCam's video: click its thumbnail, it plays, with its sound
            page.click(f"#files-gallery a.thumb[data-id='{video['id']}']")
            page.wait_for_function("() => { const v = document.querySelector('#file-media video');"
                                   " return v && v.readyState >= 2; }")
            state = page.evaluate("""async () => {
              const v = document.querySelector('#file-media video');
              const duration = v.duration;
              v.muted = true;
              await v.play();
              await new Promise(r => setTimeout(r, 1200));
              v.pause();
              v.muted = false;
              v.currentTime = 0;
              await new Promise(r => v.addEventListener('seeked', r, {once: true}));
              return {duration, played: v.played.length ? v.played.end(0) : 0, audio: v.webkitAudioDecodedByteCount,
                      src: v.currentSrc, poster: v.getAttribute('poster'), error: v.error && v.error.message};
            }""")
            state["facts"] = page.inner_text("#file-facts")
            state["hash"] = page.evaluate("location.hash")
            screenshot(page, folder, "file")
            page.context.close()
            return state

        state = yield self.in_browser(desktop)
        self.assertEqual(state["hash"], f"#/files/{video['id']}")
        self.assertIsNone(state["error"])
        self.assertTrue(state["src"].endswith(video["play"]), state["src"])
        self.assertAlmostEqual(state["duration"], length, delta=0.5)
        self.assertGreater(state["played"], 0.5)  # it played
        self.assertGreater(state["audio"], 0)  # with its sound
        self.assertTrue(state["poster"])
        self.assertIn(video["sha256"], state["facts"])
        self.assertIn(video["device_path"] or video["source"], state["facts"])

        def phone() -> dict[str, Any]:
            page = self.browser.page(PHONE)
            widths: dict[str, Any] = {}
            for name, address, ready in [
                    ("overview", "", f"({LOADED_IMAGES})('#gallery img').length >= 8"),
                    ("cameras", "#/cameras", "document.querySelectorAll('#cameras tbody tr').length >= 5"),
                    ("camera", f"#/cameras/{IMEI_BASE + 1}", f"({LOADED_IMAGES})('#camera-gallery img').length >= 3"),
                    ("files", "#/files", f"({LOADED_IMAGES})('#files-gallery img').length >= 12"),
                    ("file", f"#/files/{video['id']}", "document.querySelector('#file-media video')?.readyState >= 1"
                     " && document.querySelector('#file-facts').innerText.length > 0"),
                    ("failures", "#/failures", "document.querySelector('#failures').innerText.length > 0")]:
                page.goto(self.url(address))
                page.wait_for_function(f"() => {ready}")
                widths[name] = dict(width=page.evaluate(NO_SIDEWAYS_SCROLL), header=page.evaluate(HEADER_FITS),
                                    imeis=page.evaluate(IMEI_LINES))
                if name == "overview":
                    screenshot(page, folder, "phone-overview")
            page.context.close()
            return widths

        widths = yield self.in_browser(phone)
        for name, seen in widths.items():
            self.assertLessEqual(seen["width"], PHONE[0], name)
            self.assertEqual((seen["header"]["overflow"], seen["header"]["outside"]), (0, []), name)
            self.assertLess(seen["header"]["height"], 120, name)
            self.assertTrue(all(lines == 1 for lines in seen["imeis"]), (name, seen["imeis"]))
        self.assertTrue(widths["cameras"]["imeis"])
        for name in ("overview", "cameras", "camera", "files", "file", "phone-overview"):
            self.assertGreater((folder / f"{name}.png").stat().st_size, 10_000, name)
        yield sending
        self.assertQuietConsole()

    @defer.inlineCallbacks
    def test_retry_a_dead_letter(self) -> Any:
        """A file an HTTP sink refused is a dead letter on the Failures view; Retry delivers it."""
        endpoint = Endpoint([400])
        port = reactor.listenTCP(0, server.Site(endpoint), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        work = Path(self.mktemp()).resolve()
        http = validate({"type": "http", "url": f"http://127.0.0.1:{port.getHost().port}/up/{{name}}"}, "sinks[0]",
                        work)
        disk = validate({"type": "disk", "root": str(work / "files")}, "sinks[1]", work)
        yield self.start_ops(sinks=(http, disk), allow=frozenset({str(IMEI_BASE)}))
        yield self.open_browser()
        photo = tiny_jpeg(96, 64)
        refused = IMEI_BASE + 5
        yield self.cameras([jpeg_camera(0, photo), jpeg_camera(5, tiny_jpeg(64, 64))], reconnect=False)
        [letter] = yield poll(lambda: get_json(self.url("api/dead-letters")), what="the dead letter")
        self.assertEqual(letter["imei"], str(IMEI_BASE))
        folder = shots_folder(self)

        def retry() -> dict[str, Any]:
            page = self.browser.page(DESKTOP)
            page.goto(self.url("#/failures"))
            button = page.locator(f"#dead-letters button.retry[data-id='{letter['id']}']")
            button.wait_for()
            page.wait_for_function(f"() => document.querySelector('#refused').innerText.includes('{refused}')")
            seen = dict(dead=page.inner_text("#dead-letters"), refused=page.inner_text("#refused"),
                        tile=page.inner_text("nav #nav-failures"))
            screenshot(page, folder, "failures")
            button.click()
            page.wait_for_function("() => !document.querySelector('#dead-letters button.retry')")
            seen["after"] = page.inner_text("#dead-letters")
            page.context.close()
            return seen

        seen = yield self.in_browser(retry)
        self.assertIn(letter["reason"], seen["dead"])
        self.assertIn("400", seen["dead"])
        self.assertEqual(seen["tile"], "1")
        self.assertIn("No dead letter", seen["after"])
        yield poll(lambda: endpoint.received, what="the retried file delivered")
        self.assertEqual(endpoint.received, [photo])
        remaining = yield get_json(self.url("api/dead-letters"))
        self.assertEqual(remaining, [])
        self.assertQuietConsole()
