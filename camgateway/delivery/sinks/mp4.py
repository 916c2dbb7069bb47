"""The MP4 sink: camera videos as MP4s with their sound and a poster, the originals kept.

Configuration::

    - type: mp4
      ffmpeg: ffmpeg          # the program (default: from PATH)
      poster: true            # also a JPEG of the first frame
      h264: false             # also an H.264 copy of HEVC videos, for browsers without HEVC (re-encodes: slow)
      keep_original: true     # pass the camera's own file on too
      max_processes: 2        # ffmpeg processes at once
      timeout: 600            # an ffmpeg run taking longer is killed (the camera's file goes on)

What a video is comes from its bytes (:mod:`camgateway.wire.media`), never from
its name:

* a DualCam PTMF container is taken apart (:mod:`camgateway.wire.ptmf`): its
  H.265 is remuxed without re-encoding (``-c:v copy``, tagged ``hvc1`` so
  Apple players take it) at the frame rate of the metadata, else of the frame
  timestamps; its G.711 A-law sound, aligned on the timestamps and as long as
  the picture, is encoded to AAC;
* a bare Annex-B H.265 or H.264 stream is remuxed the same way (the frame
  rate from the metadata, else its pictures over the metadata's length, else
  25);
* an MP4 goes on as it is, with a poster.

The sinks after this one get, *instead of* the camera's file, the MP4
(``derived: mp4``), its poster (``poster``), the H.264 copy (``h264``) and,
with ``keep_original``, the camera's own file (``original``). A video ffmpeg
cannot convert goes on as the camera's file (``original``, whatever
``keep_original`` says) with the reason in the log and in its metadata
(``conversion_error``): never lost, never a dead letter for being
unconvertible. Photos, and files that are no video, pass through untouched.

ffmpeg runs as child processes, never blocking the reactor, at most
``max_processes`` at once; it reads the demuxed streams from spool files.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from camgateway.wire import media
from camgateway.base.units import ConfigError, parse_duration
from camgateway.base.reasons import DeliveryFailed, program_ended
from camgateway.wire.ptmf import AUDIO_RATE, demux_file
from camgateway.delivery.sinks import IFileSink, ReceivedFile, SinkContext, Transformed
from camgateway.delivery.sinks.command import run_program
from camgateway.delivery.sinks.registry import check_keys
from camgateway.transfer.receiver import FileDigest, digest_file

__all__ = ["MP4Sink", "Unconvertible", "remove_present", "validate", "make", "default_sinks", "stores", "passes_on", "plan_video",
           "poster_args", "h264_args", "run_ffmpeg"]

log = Logger(namespace="camgateway.delivery.sinks.mp4")

#: The sinks after this one get its MP4s and posters (and the cameras' own
#: files); it keeps nothing itself, so a chain must not end with it
#: (camgateway.delivery.sinks.registry.check_chain).
stores = False
passes_on = "the MP4s and posters it makes, and the cameras' own videos,"

#: The frame rate of a bare stream whose metadata says nothing of it.
DEFAULT_RATE = 25.0


def validate(config: Mapping[str, Any], key: str, base: Path) -> Mapping[str, Any]:
    """``{type: mp4, ffmpeg, poster, h264, keep_original, max_processes, timeout}``."""
    check_keys(config, key, {"ffmpeg", "poster", "h264", "keep_original", "max_processes", "timeout"})
    program = config.get("ffmpeg", "ffmpeg")
    found = shutil.which(program) if isinstance(program, str) else None
    if found is None:
        raise ConfigError(f"{key}.ffmpeg", f"ffmpeg program {program!r} not found (install ffmpeg)")
    out: dict[str, Any] = {"type": "mp4", "ffmpeg": found}
    for flag, default in (("poster", True), ("h264", False), ("keep_original", True)):
        value = config.get(flag, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}.{flag}", f"must be true or false, got {value!r}")
        out[flag] = value
    n = config.get("max_processes", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{key}.max_processes", f"must be a positive integer, got {n!r}")
    out["max_processes"] = n
    out["timeout"] = parse_duration(config.get("timeout", 600), f"{key}.timeout")
    return out


def make(config: Mapping[str, Any], context: SinkContext) -> "MP4Sink":
    """An MP4Sink from a validated entry."""
    return MP4Sink(context, config["ffmpeg"], config["poster"], config["h264"], config["max_processes"],
                   keep_original=config.get("keep_original", True), timeout=config.get("timeout", 600.0))


_told_no_ffmpeg = False


def default_sinks(files_root: str, which: Callable[[str], Optional[str]] = shutil.which) -> list[dict[str, Any]]:
    """The chain of the built-in defaults (no ``sinks:``): mp4, then disk under ``files_root``.

    Without ffmpeg it is the disk sink alone, and the log says so (once):
    videos then stay in the cameras' containers.
    """
    disk = {"type": "disk", "root": files_root}
    if which("ffmpeg") is not None:
        return [{"type": "mp4"}, disk]
    global _told_no_ffmpeg
    if not _told_no_ffmpeg:
        _told_no_ffmpeg = True
        log.warn("ffmpeg not found: videos are stored as the cameras send them (a DualCam's as .ptmf, which"
                 " players do not open), without MP4, sound or poster; install ffmpeg (apt install ffmpeg) and"
                 " restart for playable MP4s with sound beside the originals", event="no_ffmpeg")
    return [disk]


def _describe(path: Path) -> FileDigest:
    """Size, SHA-256 and CRC-16 of a file made here (thread)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_file(fd, None)
    finally:
        os.close(fd)


class Unconvertible(Exception):
    """ffmpeg cannot make an MP4 of this file (a broken container, an ffmpeg refusal): why, in words."""


@dataclasses.dataclass
class _Plan:
    """How ffmpeg muxes one video: its picture stream, codec and rate, and its sound."""

    video: Path
    codec: str  # media.HEVC or media.H264
    rate: float
    audio: Optional[Path] = None  # A-law, 8 kHz, mono, as long as the picture

    def mux_args(self, target: Path) -> list[str]:
        """ffmpeg's arguments that make the MP4 ``target``."""
        fps = Fraction(self.rate).limit_denominator(1001)
        args = ["-f", self.codec, "-r", f"{fps.numerator}/{fps.denominator}", "-i", str(self.video)]
        if self.audio is not None:
            args += ["-f", "alaw", "-ar", str(AUDIO_RATE), "-ac", "1", "-i", str(self.audio)]
        args += ["-map", "0:v:0", "-c:v", "copy"]
        if self.codec == media.HEVC:
            args += ["-tag:v", "hvc1"]
        if self.audio is not None:
            args += ["-map", "1:a:0", "-c:a", "aac", "-b:a", "32k"]
        return args + ["-movflags", "+faststart", "-f", "mp4", str(target)]


def _metadata_rate(metadata: Mapping[str, Any]) -> Optional[float]:
    rate = metadata.get("framerate")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 < rate <= 240:
        return float(rate)
    return None


def _split_ptmf(received: ReceivedFile, video: Path, audio: Path) -> _Plan:
    """Demux a PTMF video into a picture stream and aligned A-law sound (thread)."""
    try:
        with open(video, "wb") as out:
            demuxed = demux_file(str(received.path), out)
    except ValueError as e:
        raise Unconvertible(f"not a usable PTMF container: {e}") from None
    codec = media.kind_of(demuxed.video_head)
    if codec not in (media.HEVC, media.H264):
        raise Unconvertible("the PTMF container's video frames are neither H.265 nor H.264")
    rate = _metadata_rate(received.metadata) or demuxed.frame_rate() or DEFAULT_RATE
    plan = _Plan(video, codec, rate)
    if demuxed.audio:
        with open(audio, "wb") as out:
            out.write(demuxed.audio_track(demuxed.video_frames / rate))
        plan.audio = audio
    return plan


def _plan_stream(received: ReceivedFile, codec: str) -> _Plan:
    """A bare Annex-B stream: its frame rate from the metadata, else its pictures over its length (thread)."""
    rate = _metadata_rate(received.metadata)
    length = received.metadata.get("length_s")
    if rate is None and isinstance(length, (int, float)) and not isinstance(length, bool) and length > 0:
        with open(received.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            frames = media.count_pictures(data, codec)  # type: ignore[arg-type]
        if 0 < frames / length <= 240:
            rate = round(frames / length, 3)
    return _Plan(received.path, codec, rate or DEFAULT_RATE)


def remove_present(*paths: Path) -> None:
    """Remove those of the files that are there (blocking: on a thread)."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def plan_video(received: Any, kind: str, video: Path, audio: Path) -> _Plan:
    """How ffmpeg muxes a PTMF or bare-stream video of ``kind`` (thread).

    ``received`` needs ``path`` and ``metadata``; a PTMF container's picture
    stream and sound are written to ``video`` and ``audio`` (which stay unused
    for a bare stream). :class:`Unconvertible` when it cannot be taken apart.
    """
    if kind == media.PTMF:
        return _split_ptmf(received, video, audio)
    return _plan_stream(received, kind)


def poster_args(target: Path) -> list[str]:
    """ffmpeg's output arguments of a JPEG of the first picture of input 0."""
    return ["-map", "0:v:0", "-frames:v", "1", "-q:v", "3", "-f", "mjpeg", str(target)]


def h264_args(target: Path) -> list[str]:
    """ffmpeg's output arguments of an H.264 MP4 of input 0's picture, its sound (AAC already) copied."""
    return ["-map", "0:v:0", "-map", "0:a:0?", "-c:v", "libx264", "-preset", "veryfast", "-crf", "23",
            "-pix_fmt", "yuv420p", "-c:a", "copy", "-movflags", "+faststart", "-f", "mp4", str(target)]


@defer.inlineCallbacks
def run_ffmpeg(reactor: Any, ffmpeg: str, args: list[str], timeout: float) -> Any:
    """Run ffmpeg as a child process; :class:`Unconvertible` if it refuses the input or outlives ``timeout``.

    An ffmpeg killed by someone else, one that found the disk full, or
    one that is gone from the machine fails as
    :class:`~camgateway.base.reasons.DeliveryFailed` (a delivery retries it).
    """
    if not os.access(ffmpeg, os.X_OK):
        raise DeliveryFailed(f"ffmpeg {ffmpeg} is not there any more (install ffmpeg)")
    code, signal_number, stderr, timed_out = yield run_program(
        reactor, [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, timeout)
    if code == 0:
        return
    if timed_out:
        raise Unconvertible(f"ffmpeg did not finish within {timeout:g} s (killed)")
    message = program_ended("ffmpeg", code, signal_number, stderr)
    if code is None or b"No space left on device" in stderr:
        raise DeliveryFailed(message)
    raise Unconvertible(message)


@implementer(IFileSink)
class MP4Sink:
    """Turns camera videos into MP4s with sound (and posters) for the sinks that follow."""

    def __init__(self, context: SinkContext, ffmpeg: str, poster: bool, h264: bool, max_processes: int,
                 *, keep_original: bool = True, timeout: float = 600.0) -> None:
        self.context = context
        self.reactor = context.reactor
        self.log = context.log
        self.ffmpeg = ffmpeg
        self.poster = poster
        self.h264 = h264
        self.keep_original = keep_original
        self.timeout = timeout
        self.limit = defer.DeferredSemaphore(max_processes)
        self.name = "mp4"

    @defer.inlineCallbacks
    def deliver(self, received: ReceivedFile) -> Any:
        """Convert a video (see the module's doc); pass photos and other files on unchanged (None)."""
        if received.media == "photo":
            return None
        kind = yield self.context.run_in_thread(media.kind_of_file, str(received.path))
        if kind not in media.VIDEOS:
            return None
        started = self.reactor.seconds()
        temps: list[Path] = []  # the intermediate files, and the outputs not handed on
        try:
            made = yield self._convert(received, kind, temps)
        except Unconvertible as e:
            why = str(e)
            self.log.warn("video of camera {imei} {source} ({kind}) not converted, the camera's file goes on: {why}",
                     kind=kind, imei=received.imei, source=received.source, why=why,
                     event="video_not_converted")
            return Transformed([dataclasses.replace(received, derived="original",
                                                    metadata={**received.metadata, "conversion_error": why})])
        finally:
            if temps:
                yield self.context.run_in_thread(remove_present, *temps)
        self.log.info("video of camera {imei} {source} ({kind}) handed on as {made} in {seconds:.1f} s",
                 kind=kind, imei=received.imei, source=received.source,
                 made=", ".join(f.derived or "" for f in made), seconds=self.reactor.seconds() - started,
                 event="video_converted")
        return Transformed(made)

    @defer.inlineCallbacks
    def _convert(self, received: ReceivedFile, kind: str, temps: list[Path]) -> Any:
        """The files made of ``received``, a video of ``kind``, the camera's own last (when it goes on)."""
        def new() -> Path:
            path = self.context.spool.new_path()
            temps.append(path)
            return path

        outputs: list[tuple[Path, str, str]] = []  # (file, media, derived)
        codec: Optional[str] = None
        if kind == media.MP4:
            source = received.path
        else:
            source = new()
            plan = yield self.context.run_in_thread(plan_video, received, kind, new(), new())
            yield self.limit.run(self._run, plan.mux_args(source))
            outputs.append((source, "video", "mp4"))
            codec = plan.codec
        more: list[str] = []
        if self.poster:
            poster = new()
            more += poster_args(poster)
            outputs.append((poster, "photo", "poster"))
        if self.h264 and codec == media.HEVC:
            h264 = new()
            more += h264_args(h264)
            outputs.append((h264, "video", "h264"))
        if more:  # from the MP4: a second process, since decoding beside a stream copy shifts its timestamps
            yield self.limit.run(self._run, ["-i", str(source), *more])
        made = []
        for path, what, derived in outputs:
            digest = yield self.context.run_in_thread(_describe, path)
            if not digest.size:
                raise Unconvertible(f"ffmpeg made an empty {derived}")
            made.append(dataclasses.replace(received, path=path, size=digest.size, sha256=digest.sha256,
                                            computed_crc=digest.crc, media=what, derived=derived))
        for f in made:
            temps.remove(f.path)
        if self.keep_original or kind == media.MP4:
            made.append(dataclasses.replace(received, derived="original"))
        return made

    def _run(self, args: list[str]) -> defer.Deferred:
        """Run ffmpeg with ``args`` (see :func:`run_ffmpeg`)."""
        return run_ffmpeg(self.reactor, self.ffmpeg, args, self.timeout)
