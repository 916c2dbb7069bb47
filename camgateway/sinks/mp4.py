"""The MP4 sink: DualCam PTMF video to MP4, without re-encoding.

Configuration::

    - type: mp4
      ffmpeg: ffmpeg          # the program (default: from PATH)
      poster: true            # also a JPEG of the first frame
      h264: false             # also an H.264 MP4 for browsers without HEVC (re-encodes: slow)
      max_processes: 2        # ffmpeg processes at once

A PTMF video is taken apart (:mod:`camgateway.ptmf`), its H.265 frames are
remuxed by ffmpeg (``-c:v copy``, the frame rate from the metadata, else from
the frame timestamps; ``hvc1`` tag so Apple players accept it), and the sinks
after this one get the MP4 (and the poster, and the H.264 copy) *instead of*
the camera's file. Anything that is not PTMF passes through untouched. Audio
is not muxed yet: its codec is not identified (see camgateway/ptmf.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from twisted.internet import defer, protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from camgateway.config import ConfigError
from camgateway.crc import crc16
from camgateway.ptmf import demux, is_ptmf
from camgateway.sinks import IFileSink, PermanentFailure, ReceivedFile, Transformed
from camgateway.sinks.registry import check_keys

__all__ = ["MP4Sink", "validate", "make"]


def validate(config: Mapping[str, Any], key: str, base: Path) -> Mapping[str, Any]:
    """``{type: mp4, ffmpeg, poster, h264, max_processes}``."""
    check_keys(config, key, {"ffmpeg", "poster", "h264", "max_processes"})
    program = config.get("ffmpeg", "ffmpeg")
    found = shutil.which(program) if isinstance(program, str) else None
    if found is None:
        raise ConfigError(f"{key}.ffmpeg", f"ffmpeg program {program!r} not found (install ffmpeg)")
    out: dict[str, Any] = {"type": "mp4", "ffmpeg": found}
    for flag, default in (("poster", True), ("h264", False)):
        value = config.get(flag, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}.{flag}", f"must be true or false, got {value!r}")
        out[flag] = value
    n = config.get("max_processes", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{key}.max_processes", f"must be a positive integer, got {n!r}")
    out["max_processes"] = n
    return out


def make(config: Mapping[str, Any], services: Any) -> "MP4Sink":
    """An MP4Sink from a validated entry."""
    from twisted.internet import reactor

    return MP4Sink(services, reactor, config["ffmpeg"], config["poster"], config["h264"], config["max_processes"])


class _FFmpeg(protocol.ProcessProtocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.stderr = bytearray()

    def errReceived(self, data: bytes) -> None:
        if len(self.stderr) < 4096:
            self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self.done.callback((getattr(reason.value, "exitCode", None), bytes(self.stderr)))


def _describe(path: Path) -> tuple[int, str, int]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest(), crc16(data)


@implementer(IFileSink)
class MP4Sink:
    """Turns PTMF videos into MP4 (and posters) for the sinks that follow."""

    def __init__(self, services: Any, reactor: Any, ffmpeg: str, poster: bool, h264: bool, max_processes: int):
        self.s = services
        self.reactor = reactor
        self.ffmpeg = ffmpeg
        self.poster = poster
        self.h264 = h264
        self.limit = defer.DeferredSemaphore(max_processes)
        self.name = "mp4"

    @defer.inlineCallbacks
    def deliver(self, received: ReceivedFile) -> Any:
        """Convert a PTMF video; pass anything else on unchanged (None)."""
        with open(received.path, "rb") as f:
            head = f.read(4)
        if not is_ptmf(head):
            return None
        spool = self.s.spool
        names: list[str] = []
        try:
            h265 = spool.path(spool.new_name())
            names.append(h265.name)
            rate = yield self.s.run_in_thread(self._split, received, h265)
            outputs = [("mp4", ["-c:v", "copy", "-tag:v", "hvc1", "-movflags", "+faststart", "-f", "mp4"], "video")]
            if self.poster:
                outputs.append(("poster", ["-frames:v", "1", "-q:v", "3", "-f", "mjpeg"], "photo"))
            if self.h264:
                outputs.append(("h264", ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt",
                                         "yuv420p", "-movflags", "+faststart", "-f", "mp4"], "video"))
            made = []
            for derived, args, media in outputs:
                target = spool.path(spool.new_name())
                names.append(target.name)
                yield self.limit.run(self._ffmpeg, ["-f", "hevc", "-r", f"{rate:g}", "-i", str(h265), *args,
                                                    str(target)])
                size, sha, crc = yield self.s.run_in_thread(_describe, target)
                made.append(dataclasses.replace(received, path=target, size=size, sha256=sha, computed_crc=crc,
                                                media=media, derived=derived))
                names.remove(target.name)
        finally:
            for name in names:  # the H.265 stream, and outputs of a failed run
                yield self.s.run_in_thread(spool.unlink, name)
        return Transformed(made)

    def _split(self, received: ReceivedFile, h265: Path) -> float:
        """Write the H.265 stream; return the frame rate (thread)."""
        try:
            demuxed = demux(received.path.read_bytes())
        except ValueError as e:
            raise PermanentFailure(f"not a usable PTMF video: {e}") from None
        with open(h265, "wb") as f:
            f.write(demuxed.video)
        rate: Optional[float] = None
        meta = received.metadata
        if isinstance(meta.get("framerate"), (int, float)) and 0 < meta["framerate"] <= 240:
            rate = float(meta["framerate"])
        return rate or demuxed.frame_rate() or 25.0

    @defer.inlineCallbacks
    def _ffmpeg(self, args: list[str]) -> Any:
        done: defer.Deferred = defer.Deferred()
        self.reactor.spawnProcess(_FFmpeg(done), self.ffmpeg,
                                  [self.ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                                  env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        code, stderr = yield done
        if code != 0:
            raise RuntimeError(f"ffmpeg exit {code}: {stderr.decode('utf-8', 'replace').strip()[:500]}")
