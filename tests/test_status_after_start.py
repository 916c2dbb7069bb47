"""A DualCam that gives a file up right after START, against the real ``twistd -n camgateway``.

A real DualCam answered a FILE REQUEST for its rear video with START and, in
the same TCP write, STATUS 6 ("invalid response to resume"), then sent its
front photo when asked; the gateway held a partial of that video, so the
video's transfer was still being opened when the photo's START came, and the
photo went into the video's transfer. The gateway runs as a subprocess (a
black box: its config, its port, its log and the files its disk sink
stores); the emulator (:mod:`camgateway.sim`, with the ``status_after_start``
fault) plays a few hundred such cameras against it in this process. Every
photo must be stored with exactly the bytes the camera sent, no video may be
stored, and the log must show no protocol error.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from camgateway.sim import CameraResult, CameraSpec, SimFile, random_jpeg, random_video, run_cameras
from camgateway.wire.codec import PACKET as FRAME_SIZE
from tests.test_twistd import Gateway

CAMERAS = 200
IMEI_BASE = 863719061700000
STATUS_CODE = 6
#: The first connection drops after this DATA frame (0-based) of the video.
DROPPED_AFTER = 3

#: Log lines that mean the gateway mishandled a camera (the first two are what the
#: bug this test guards against logged: the given-up video's transfer applied to the photo).
BAD_LINES = re.compile(r"protocol error|may be shorter|internal error|Traceback|Unhandled|#critical\]")


def _size(rng: random.Random, low: int, high: int) -> int:
    """A size in ``low..high`` that is not a whole number of packets (the last packet is short)."""
    size = rng.randint(low, high)
    return size + 1 if size % FRAME_SIZE == 0 else size


def camera_specs(count: int, seed: int = 20241030) -> tuple[list[CameraSpec], list[CameraSpec]]:
    """``count`` DualCams, as two lists of specs: the first connection, the second.

    First two cameras in three start their rear video and drop the
    connection after ``DROPPED_AFTER`` + 1 packets, so the gateway keeps a
    partial of it (as a real DualCam that later gave its video up had one:
    opening the video's transfer then takes the gateway a few reactor turns).
    Then every camera offers the video with its front photo, answers the
    video's FILE REQUEST with START and STATUS in one write, and sends the
    photo. (The third camera's video is new to the gateway, whose answer to
    the START may be a RESUME sent before it reads the STATUS.)

    Every camera's photo has its own random bytes. Half the videos are
    announced with fewer packets than the photo, half with more, so a gateway
    that receives the photo into the video's transfer stores a wrong or
    truncated photo, or sees a short packet where a full one was due.
    """
    rng = random.Random(seed)
    first, second = [], []
    for n in range(count):
        photo = SimFile("photof", random_jpeg(_size(rng, 12_000, 40_000), rng))
        video_size = _size(rng, 6_000, 10_000) if n % 2 else _size(rng, 45_000, 90_000)
        video = SimFile("videor", random_video(video_size, rng))
        if n % 3:
            first.append(CameraSpec(IMEI_BASE + n, "dualcam", (video,), protocol_id=5,
                                    drop_after_frames=DROPPED_AFTER))
        second.append(CameraSpec(IMEI_BASE + n, "dualcam", (video, photo), protocol_id=5,
                                 status_after_start=frozenset({"videor"}), status_after_start_code=STATUS_CODE))
    return first, second


class StatusAfterStartTests(TestCase):
    """Hundreds of DualCams give their video up after START; every photo arrives whole."""

    timeout = 90

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        config = self.work / "camgateway.yaml"
        config.write_text(json.dumps({
            "listen": ["tcp:0:interface=127.0.0.1"],  # the port is read from the gateway's log
            "storage": {"spool": "spool"},
            "sinks": [{"type": "disk", "root": "files"}],
            "timeouts": {"idle": 20, "step": 10},
            "download": {"metadata": False},
        }))
        self.gateway = Gateway(self.work, "--config", str(config))
        self.addCleanup(self.gateway.stop, signal.SIGKILL)

    def stored(self) -> list[tuple[Path, dict[str, Any], bytes]]:
        """Every media file the disk sink stored: (path, its sidecar, its bytes)."""
        out = []
        for media in sorted((self.work / "files").rglob("*")):
            if not media.is_file() or media.suffix == ".json" or media.name.startswith("."):
                continue
            sidecar = media.with_name(media.name + ".json")
            out.append((media, json.loads(sidecar.read_text()), media.read_bytes()))
        return out

    @defer.inlineCallbacks
    def logged(self, pattern: str, count: int, timeout: float = 20.0) -> Any:
        """Wait until the gateway logged ``pattern`` ``count`` times, then half a second more
        (the partial is recorded after the line)."""
        deadline = reactor.seconds() + timeout
        while len(re.findall(pattern, self.gateway.log.read_text())) < count:
            if reactor.seconds() > deadline:
                raise AssertionError(f"the gateway did not log {pattern!r} {count} times in {timeout} s")
            yield deferLater(reactor, 0.1, lambda: None)
        yield deferLater(reactor, 0.5, lambda: None)

    @defer.inlineCallbacks
    def settled(self, at_least: int, timeout: float = 30.0) -> Any:
        """Wait until ``at_least`` files are stored and no more arrive for a second
        (or ``timeout`` passes: the assertions then say what is missing)."""
        deadline = reactor.seconds() + timeout
        seen, quiet_since = -1, reactor.seconds()
        while reactor.seconds() < deadline:
            count = len(self.stored())
            if count != seen:
                seen, quiet_since = count, reactor.seconds()
            elif count >= at_least and reactor.seconds() - quiet_since >= 1.0:
                return
            yield deferLater(reactor, 0.2, lambda: None)

    @defer.inlineCallbacks
    def test_photos_arrive_whole_after_a_video_given_up(self) -> Any:
        first, specs = camera_specs(CAMERAS)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port)
        dropped: list[CameraResult] = yield run_cameras(reactor, lambda spec: endpoint, first, reconnect=False,
                                                        idle_timeout=15.0)
        self.assertEqual({(r.drops, tuple(r.pending)) for r in dropped}, {(1, ("videor",))})
        yield self.logged(rf"connection lost during %videor at {(DROPPED_AFTER + 1) * FRAME_SIZE} of", len(first))
        results: list[CameraResult] = yield run_cameras(reactor, lambda spec: endpoint, specs, idle_timeout=15.0)
        yield self.settled(CAMERAS)
        stored = self.stored()
        log = self.gateway.log.read_text()
        bad_lines = [line for line in log.splitlines() if BAD_LINES.search(line)]

        photos = {str(spec.imei): spec.files[1].content for spec in specs}
        videos_sent = {str(spec.imei): spec.files[0].content for spec in specs}
        videos = [(media.name, sidecar["source"]) for media, sidecar, _ in stored
                  if sidecar["source"] != "photof" or media.suffix != ".jpg"]
        wrong, per_camera = [], dict.fromkeys(photos, 0)
        for media, sidecar, data in stored:
            expected = photos.get(sidecar["imei"], b"")
            per_camera[sidecar["imei"]] = per_camera.get(sidecar["imei"], 0) + 1
            self.assertEqual((hashlib.sha256(data).hexdigest(), len(data)), (sidecar["sha256"], sidecar["size"]))
            if data != expected:
                video = videos_sent.get(sidecar["imei"], b"")
                how = ("truncated" if expected.startswith(data) else
                       "starts with the given-up video's bytes" if data[:FRAME_SIZE] == video[:FRAME_SIZE] else
                       "different")
                wrong.append(f"{media.relative_to(self.work)}: {len(data)} of {len(expected)} bytes, {how}")
        missing = sorted(imei for imei, n in per_camera.items() if n == 0)
        repeated = sorted(imei for imei, n in per_camera.items() if n > 1)
        reconnected = sorted(r.imei for r in results if r.connections != 1)
        not_ok = [(r.imei, r.errors[:2], r.pending) for r in results if not r.ok]
        statuses = len(re.findall(rf"status {STATUS_CODE} \(invalid response to resume\) for %videor", log))

        report = "\n".join([
            f"{len(stored)} files stored for {CAMERAS} cameras",
            f"wrong content ({len(wrong)}): " + "; ".join(wrong[:5]),
            f"stored files that are not a photof JPEG ({len(videos)}): {videos[:5]}",
            f"cameras without their photo ({len(missing)}): {missing[:5]}",
            f"cameras with more than one file ({len(repeated)}): {repeated[:5]}",
            f"cameras that had to reconnect ({len(reconnected)}): {reconnected[:5]}",
            f"cameras not ok ({len(not_ok)}): {not_ok[:3]}",
            f"the gateway logged the STATUS of {statuses} videos",
            f"bad log lines ({len(bad_lines)}):", *bad_lines[:8],
        ])
        if wrong or videos or missing or repeated or bad_lines or reconnected or not_ok:
            self.fail(report)
        for result in results:
            self.assertEqual((result.given_up, [name for name, _ in result.delivered], result.pending),
                             (["videor"], ["photof"], []))
        self.assertEqual(statuses, CAMERAS, report)
        self.assertTrue(self.gateway.stopped_cleanly())
