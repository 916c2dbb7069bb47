"""Real photos and videos for the emulator, made once with ffmpeg and cached.

Each camera kind sends what the real one does: JPEG photos at its
resolution; a DualCam's videos as PTMF containers (H.265 pictures and G.711
A-law sound under 36-byte frame headers, built as a real DualCam builds them:
:func:`camgateway.wire.ptmf.mux`); the path-flow cameras' (DSM, ADAS, DashCam) as
MP4 (H.264 and AAC). Every video lasts 3 s at 20 fps, as the emulator's
metadata says. ffmpeg draws its test pattern (a running clock) and a tone
that beeps every second, so a player shows whether picture and sound are in
step.

ffmpeg runs as child processes (:func:`load_media` returns a Deferred), once
per machine: the files are kept under the user's cache folder
(``$XDG_CACHE_HOME/camgateway/sim-media``, by default
``~/.cache/camgateway/sim-media``; a temporary folder when that cannot be
written) and read from there afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue

from camgateway.wire.media import hevc_pictures
from camgateway.wire.ptmf import AUDIO_RATE, mux

__all__ = ["Media", "MediaUnavailable", "RESOLUTIONS", "PHOTO_VARIANTS", "cache_dir", "load_media"]

#: ``(photo, video)`` resolution of each camera kind.
RESOLUTIONS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "dualcam": ((640, 480), (1280, 720)),
    "dsm": ((1280, 720), (1280, 720)),
    "adas": ((1280, 720), (1280, 720)),
    "dashcam": ((1920, 1080), (1920, 1080)),
}
#: Distinct photos per resolution (a camera's photos take them in turn).
PHOTO_VARIANTS = 4
VIDEO_SECONDS = 3
FRAMERATE = 20
#: Part of every cached file's name: raise it when the files made change.
_VERSION = 1
#: Where the first DualCam frame is stamped (µs), and how long after it the sound starts (as on the real capture).
_FIRST_STAMP = 389_494_008
_AUDIO_DELAY = 56_460
_AUDIO_FRAME = 320  # A-law bytes: 40 ms


class MediaUnavailable(Exception):
    """ffmpeg is missing, or could not make the media: why, in words."""


@dataclasses.dataclass(frozen=True)
class Media:
    """The photos and the video of each camera kind made ready."""

    photos: dict[str, tuple[bytes, ...]]
    videos: dict[str, bytes]

    def photo(self, kind: str, key: int) -> bytes:
        """A photo of a camera of ``kind``; ``key`` picks one of the variants."""
        variants = self.photos[kind]
        return variants[key % len(variants)]

    def video(self, kind: str) -> bytes:
        """The video of a camera of ``kind`` (PTMF for a DualCam, MP4 for the others)."""
        return self.videos[kind]


def cache_dir() -> Path:
    """Where the media are kept: ``$XDG_CACHE_HOME/camgateway/sim-media``, else under the temporary folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "camgateway" / "sim-media"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = Path(tempfile.gettempdir()) / f"camgateway-sim-media-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _size(resolution: tuple[int, int]) -> str:
    return f"{resolution[0]}x{resolution[1]}"


def _pattern(resolution: tuple[int, int], rate: float, seconds: Optional[float] = None) -> list[str]:
    spec = f"testsrc2=size={_size(resolution)}:rate={rate:g}" + (f":duration={seconds:g}" if seconds else "")
    return ["-f", "lavfi", "-i", spec]


def _tone(sample_rate: int) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=frequency=440:beep_factor=4:sample_rate={sample_rate}"
                                 f":duration={VIDEO_SECONDS}"]


def _stamps() -> tuple[list[int], list[int]]:
    """DualCam timestamps (µs): pictures on a 30 Hz sensor clock, 20 a second (33 and 67 ms apart in turn,
    as on the real capture); sound every 40 ms, from a little after the first picture."""
    grid = 1_000_000 / 30
    pictures = [_FIRST_STAMP + round(math.ceil(i * 30 / FRAMERATE) * grid) for i in range(VIDEO_SECONDS * FRAMERATE)]
    frames = VIDEO_SECONDS * AUDIO_RATE // _AUDIO_FRAME
    sound = [_FIRST_STAMP + _AUDIO_DELAY + 40_000 * k for k in range(frames)]
    return pictures, sound


def build_ptmf(h265: bytes, alaw: bytes, resolution: tuple[int, int]) -> bytes:
    """A DualCam PTMF container of an Annex-B H.265 stream and A-law sound (8 kHz)."""
    pictures = hevc_pictures(h265)
    picture_stamps, sound_stamps = _stamps()
    frames = [alaw[i : i + _AUDIO_FRAME] for i in range(0, len(alaw) - _AUDIO_FRAME + 1, _AUDIO_FRAME)]
    return mux(pictures, picture_stamps[: len(pictures)], frames, sound_stamps[: len(frames)], *resolution,
               rate=FRAMERATE)


class _Maker:
    """Makes the missing files, one ffmpeg at a time, into ``folder``."""

    def __init__(self, reactor: Any, ffmpeg: str, folder: Path,
                 notify: Optional[Callable[[Path], None]] = None) -> None:
        self.reactor = reactor
        self.ffmpeg = ffmpeg
        self.folder = folder
        self.notify = notify

    def path(self, name: str) -> Path:
        return self.folder / f"v{_VERSION}-{name}"

    @defer.inlineCallbacks
    def run(self, args: list[str]) -> Any:
        out, err, code = yield getProcessOutputAndValue(
            self.ffmpeg, ["-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
            env=dict(os.environ), reactor=self.reactor)
        if code != 0:
            said = " ".join(err.decode("utf-8", "replace").split())[-300:]
            raise MediaUnavailable(f"ffmpeg exited with status {code}" + (f": {said}" if said else ""))

    @defer.inlineCallbacks
    def made(self, name: str, make: Callable[[Path], Any]) -> Any:
        """The bytes of cached file ``name``, made by ``make(temporary folder)`` first if missing."""
        target = self.path(name)
        if not target.exists():
            if self.notify is not None:
                self.notify(self.folder)
                self.notify = None
            work = Path(tempfile.mkdtemp(prefix=".making-", dir=self.folder))
            try:
                data = yield make(work)
                temp = work / "result"
                temp.write_bytes(data)
                os.replace(temp, target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return target.read_bytes()

    @defer.inlineCallbacks
    def photos(self, resolution: tuple[int, int]) -> Any:
        variants = []
        for n in range(PHOTO_VARIANTS):
            @defer.inlineCallbacks
            def make(work: Path, n: int = n) -> Any:
                out = work / "photo.jpg"
                # One picture of the running clock, n seconds in: each variant shows another time.
                yield self.run([*_pattern(resolution, 1), "-vf", f"trim=start_frame={n}", "-frames:v", "1",
                                "-q:v", "4", "-f", "mjpeg", str(out)])
                return out.read_bytes()

            data = yield self.made(f"photo-{_size(resolution)}-{n}.jpg", make)
            variants.append(data)
        return tuple(variants)

    def ptmf(self, resolution: tuple[int, int]) -> Any:
        @defer.inlineCallbacks
        def make(work: Path) -> Any:
            h265, alaw = work / "video.h265", work / "sound.alaw"
            yield self.run([*_pattern(resolution, FRAMERATE, VIDEO_SECONDS), *_tone(AUDIO_RATE),
                            "-map", "0:v", "-c:v", "libx265", "-preset", "ultrafast", "-crf", "30",
                            "-x265-params", f"keyint={FRAMERATE}:min-keyint={FRAMERATE}:bframes=0:repeat-headers=1"
                                            ":log-level=error",
                            "-pix_fmt", "yuv420p", "-f", "hevc", str(h265),
                            "-map", "1:a", "-c:a", "pcm_alaw", "-ar", str(AUDIO_RATE), "-ac", "1", "-f", "alaw",
                            str(alaw)])
            return build_ptmf(h265.read_bytes(), alaw.read_bytes(), resolution)

        return self.made(f"dualcam-{_size(resolution)}.ptmf", make)

    def mp4(self, resolution: tuple[int, int]) -> Any:
        @defer.inlineCallbacks
        def make(work: Path) -> Any:
            out = work / "video.mp4"
            yield self.run([*_pattern(resolution, FRAMERATE, VIDEO_SECONDS), *_tone(16000),
                            "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "veryfast", "-crf", "28",
                            "-g", str(FRAMERATE), "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "32k",
                            "-movflags", "+faststart", "-f", "mp4", str(out)])
            return out.read_bytes()

        return self.made(f"mp4-{_size(resolution)}.mp4", make)


@defer.inlineCallbacks
def load_media(reactor: Any, kinds: Iterable[str], folder: Optional[Path] = None,
               ffmpeg: Optional[str] = None, notify: Optional[Callable[[Path], None]] = None) -> Any:
    """Fire with the :class:`Media` of the camera ``kinds``, made with ffmpeg the first time.

    Fails with :class:`MediaUnavailable` when ffmpeg is missing or fails.
    ``folder`` is the cache (default :func:`cache_dir`); ``notify(folder)``
    is called once before anything has to be made there.
    """
    program = ffmpeg or shutil.which("ffmpeg")
    if program is None:
        raise MediaUnavailable("ffmpeg not found")
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    maker = _Maker(reactor, program, folder or cache_dir(), notify)
    photos: dict[str, tuple[bytes, ...]] = {}
    videos: dict[str, bytes] = {}
    for kind in dict.fromkeys(kinds):
        photo_size, video_size = RESOLUTIONS[kind]
        photos[kind] = yield maker.photos(photo_size)
        videos[kind] = yield (maker.ptmf(video_size) if kind == "dualcam" else maker.mp4(video_size))
    return Media(photos, videos)
