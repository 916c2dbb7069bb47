"""Stored files for the browser: the bytes with Range, a poster of each video, and a video it can play.

Chromium plays H.264 and AAC in MP4, not H.265 (HEVC), and no browser opens
a DualCam's PTMF container. For ``/files/<id>/play`` the status site serves,
in this order:

* the H.264 copy the mp4 sink made (``h264: true``);
* the mp4 sink's MP4, or the camera's own MP4, when its picture is H.264
  already (a DSM or ADAS camera's, a DualCam's H.264 video);
* else an MP4 made here with ffmpeg on the first request, kept in the
  spool's cache folder (``<spool>/cache/``) for the next ones: a PTMF
  container or a bare stream is taken apart and muxed as the mp4 sink does
  (:mod:`camgateway.delivery.sinks.mp4`), and an H.265 picture re-encoded
  to H.264, its sound AAC.

``/files/<id>/poster`` is the mp4 sink's poster when it made one, else a JPEG
of the first picture made the same way (a photo is its own poster).

ffmpeg runs as child processes, never on the reactor thread: one job per
file and kind at a time (a second request for it waits for the first one's
result), at most :data:`TRANSCODES` re-encodings and :data:`POSTERS` posters
at once over the whole gateway. The cache is bounded: past
:data:`CACHE_BYTES`, the files used longest ago are removed. Every file is
served by :class:`twisted.web.static.File`, which answers ``Range``
requests (206) so that a ``<video>`` can seek.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import static
from twisted.web.server import NOT_DONE_YET, Request

from camgateway.base.ids import new_id
from camgateway.base.reasons import reason
from camgateway.delivery.sinks.mp4 import (Unconvertible, h264_args, plan_video, poster_args, remove_present,
                                           run_ffmpeg)
from camgateway.wire import media

__all__ = ["MediaFile", "MediaError", "BrowserMedia", "serve_file", "mp4_sample_entries", "CACHE_BYTES",
           "TRANSCODES", "POSTERS", "FFMPEG_TIMEOUT"]

log = Logger(namespace="camgateway.web.media")

#: Bytes the cache folder may hold; past that the files used longest ago are removed.
CACHE_BYTES = 1 << 30
#: Re-encodings to H.264 at once (each takes a core for seconds).
TRANSCODES = 1
#: Posters made at once (a gallery asks for many; each takes a fraction of a second).
POSTERS = 2
#: An ffmpeg run taking longer is killed.
FFMPEG_TIMEOUT = 600.0
#: The failures remembered (a broken video is not converted again on every request).
_FAILURES_KEPT = 1000

#: MP4 sample entries a browser plays.
_H264_ENTRIES = frozenset({b"avc1", b"avc3"})
_BROWSER_AUDIO = frozenset({b"mp4a"})
_VIDEO_ENTRIES = frozenset({b"avc1", b"avc3", b"hvc1", b"hev1", b"mp4v", b"av01", b"vp09"})


@dataclasses.dataclass(frozen=True)
class MediaFile:
    """A stored file as the media routes need it (see ``find_file`` in camgateway.web.status)."""

    #: The file's id in the status API (only letters, digits, ``-`` and ``_``: it names cache files).
    id: str
    #: The stored file, on this machine.
    path: Path
    #: ``photo``, ``video`` or ``unknown``, as the camera said.
    media: str
    #: The decoded metadata (its ``framerate`` and ``length_s`` time a bare stream).
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: What sinks made of it, stored on this machine: ``mp4``, ``poster``, ``h264`` -> path.
    derived: Mapping[str, Path] = dataclasses.field(default_factory=dict)


class MediaError(Exception):
    """A poster or a playable video cannot be had: the HTTP code to answer and why, in words."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _boxes(data: bytes, start: int, end: int) -> Any:
    """The ``(type, body start, body end)`` of the MP4 boxes in ``data[start:end]``."""
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, at)
        head = 8
        if size == 1 and at + 16 <= end:
            size, head = struct.unpack_from(">Q", data, at + 8)[0], 16
        elif size == 0:
            size = end - at
        if size < head or at + size > end:
            return
        yield kind, at + head, at + size
        at += size


def mp4_sample_entries(path: Path, limit: int = 64 << 20) -> list[bytes]:
    """The sample entry type of every track of an MP4 (``avc1``, ``hvc1``, ``mp4a``…) (blocking).

    Only the ``moov`` box is read (at most ``limit`` bytes of it); an empty
    list when there is none or it does not parse.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        at = 0
        while at + 8 <= size:
            f.seek(at)
            header = f.read(16)
            if len(header) < 8:
                return []
            box, kind = struct.unpack_from(">I4s", header)
            head = 8
            if box == 1 and len(header) == 16:
                box, head = struct.unpack_from(">Q", header, 8)[0], 16
            elif box == 0:
                box = size - at
            if box < head:
                return []
            if kind == b"moov":
                if box > limit:
                    return []
                f.seek(at + head)
                moov = f.read(box - head)
                break
            at += box
        else:
            return []
    entries = []
    for kind, start, end in _boxes(moov, 0, len(moov)):
        if kind != b"trak":
            continue
        stsd = _find(moov, start, end, (b"mdia", b"minf", b"stbl", b"stsd"))
        if stsd is not None and stsd[1] - stsd[0] >= 16:
            entries.append(moov[stsd[0] + 12:stsd[0] + 16])  # version, flags, count, then the first entry's box
    return entries


def _find(data: bytes, start: int, end: int, path: tuple[bytes, ...]) -> Optional[tuple[int, int]]:
    for kind, body, stop in _boxes(data, start, end):
        if kind == path[0]:
            return (body, stop) if len(path) == 1 else _find(data, body, stop, path[1:])
    return None


def _plays_in_browser(path: Path) -> bool:
    """An MP4 whose picture is H.264 and whose sound, if any, AAC (blocking)."""
    entries = mp4_sample_entries(path)
    video = [e for e in entries if e in _VIDEO_ENTRIES]
    return bool(video) and all(e in _H264_ENTRIES for e in video) and all(
        e in _BROWSER_AUDIO for e in entries if e not in _VIDEO_ENTRIES)


def _kind(path: Path) -> Optional[str]:
    """What the stored file is (camgateway.wire.media) (blocking); a 404 when it is gone."""
    try:
        return media.kind_of_file(str(path))
    except FileNotFoundError:
        raise MediaError(404, "the stored file is gone") from None


def _usable(path: Optional[Path]) -> bool:
    return path is not None and path.is_file()


def _touch(path: Path) -> bool:
    """Whether a cached file is there; marks it as used now (blocking)."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def _prune(folder: Path, limit: int, keep: Path) -> list[str]:
    """Remove the files used longest ago until the folder holds at most ``limit`` bytes (blocking).

    Work files of ffmpeg runs (hidden) older than a day are removed too.
    """
    files = []
    stale = time.time() - 86400
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            if not entry.name.startswith("."):
                files.append((st.st_mtime, st.st_size, entry.path))
            elif st.st_mtime < stale:  # left by a gateway stopped while ffmpeg ran
                remove_present(Path(entry.path))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, path in sorted(files):
        if total <= limit:
            break
        if path == str(keep):
            continue
        remove_present(Path(path))
        total -= size
        removed.append(os.path.basename(path))
    return removed


class BrowserMedia:
    """Posters and browser-playable MP4s of stored videos, made with ffmpeg once and cached.

    ``ffmpeg`` is the program to run; None looks for ``ffmpeg`` on ``PATH``
    at each use (installing it needs no restart).
    """

    def __init__(self, cache: Path, run_in_thread: Callable[..., defer.Deferred], reactor: Any,
                 ffmpeg: Optional[str] = None) -> None:
        self.cache = Path(cache)
        self.run_in_thread = run_in_thread
        self.reactor = reactor
        self.ffmpeg = ffmpeg
        #: Bytes the cache may hold (:data:`CACHE_BYTES`).
        self.max_bytes = CACHE_BYTES
        self._limits = {"play": defer.DeferredSemaphore(TRANSCODES), "poster": defer.DeferredSemaphore(POSTERS)}
        #: The jobs running, by (file id, kind): each waiting request's Deferred.
        self._making: dict[tuple[str, str], list[defer.Deferred]] = {}
        #: Why a file could not be converted, by (file id, kind) (the latest :data:`_FAILURES_KEPT`).
        self._failed: collections.OrderedDict[tuple[str, str], MediaError] = collections.OrderedDict()

    # -- what the routes ask

    def poster(self, f: MediaFile) -> defer.Deferred:
        """The path of a JPEG poster of ``f`` (a photo is its own); fails with :class:`MediaError`."""
        return self._get(f, "poster", "jpg")

    def play(self, f: MediaFile) -> defer.Deferred:
        """The path of an H.264/AAC MP4 of the video ``f``; fails with :class:`MediaError`."""
        return self._get(f, "play", "mp4")

    def _get(self, f: MediaFile, what: str, extension: str) -> defer.Deferred:
        key = (f.id, what)
        failed = self._failed.get(key)
        if failed is not None:
            return defer.fail(failed)
        mine: defer.Deferred = defer.Deferred()
        waiting = self._making.get(key)
        if waiting is not None:  # made already for another request: wait for it
            waiting.append(mine)
            return mine
        self._making[key] = [mine]
        target = self.cache / f"{f.id}.{what}.{extension}"
        job = self._poster(f, target) if what == "poster" else self._play(f, target)
        job.addBoth(self._settle, key)
        return mine

    def _settle(self, result: Any, key: tuple[str, str]) -> None:
        if isinstance(result, Failure):
            error = result.value
            if not isinstance(error, MediaError):
                log.failure("status: making the {what} of file {id} failed", result, what=key[1], id=key[0])
                error = MediaError(500, f"cannot make the {key[1]}: {reason(result)}")
                result = Failure(error)
            elif error.code == 422:
                self._failed[key] = error
                while len(self._failed) > _FAILURES_KEPT:
                    self._failed.popitem(last=False)
        for waiting in self._making.pop(key, []):
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)

    # -- making them

    @defer.inlineCallbacks
    def _poster(self, f: MediaFile, target: Path) -> Any:
        kind = yield self.run_in_thread(_kind, f.path)
        if kind == media.JPEG:
            return f.path
        if kind not in media.VIDEOS:
            raise MediaError(404, "not a video: it has no poster")
        made = f.derived.get("poster")
        if (yield self.run_in_thread(_usable, made)):
            return made
        return (yield self._cached_or_made("poster", f, kind, target, poster=True))

    @defer.inlineCallbacks
    def _play(self, f: MediaFile, target: Path) -> Any:
        made = f.derived.get("h264")
        if (yield self.run_in_thread(_usable, made)):
            return made
        kind = yield self.run_in_thread(_kind, f.path)
        if kind not in media.VIDEOS:
            raise MediaError(404, "not a video: nothing to play")
        mp4 = f.derived.get("mp4")
        if not (yield self.run_in_thread(_usable, mp4)):
            mp4 = f.path if kind == media.MP4 else None
        if mp4 is not None and (yield self.run_in_thread(_plays_in_browser, mp4)):
            return mp4
        return (yield self._cached_or_made("play", f, kind, target, source=mp4))

    @defer.inlineCallbacks
    def _cached_or_made(self, what: str, f: MediaFile, kind: str, target: Path, **how: Any) -> Any:
        """``target`` from the cache, else made by :meth:`_convert` (within the limit of ``what``)."""
        if (yield self.run_in_thread(_touch, target)):
            return target
        ffmpeg = self._program()
        return (yield self._limits[what].run(self._convert, f, kind, target, ffmpeg, **how))

    def _program(self) -> str:
        program = self.ffmpeg if self.ffmpeg and os.access(self.ffmpeg, os.X_OK) else shutil.which("ffmpeg")
        if program is None:
            raise MediaError(503, "ffmpeg is not installed (apt install ffmpeg): videos cannot be converted for"
                                  " the browser")
        return program

    @defer.inlineCallbacks
    def _convert(self, f: MediaFile, kind: str, target: Path, ffmpeg: str, *, poster: bool = False,
                 source: Optional[Path] = None) -> Any:
        """Make ``target``: a poster, or an H.264/AAC MP4, of ``f`` (of ``source``, an MP4 of it, if given)."""
        yield self.run_in_thread(self.cache.mkdir, mode=0o750, parents=True, exist_ok=True)
        stem = self.cache / f".{new_id()}"  # (hidden: never pruned, never served)
        temps = [Path(f"{stem}.video"), Path(f"{stem}.audio"), Path(f"{stem}.mp4"), Path(f"{stem}.out")]
        video, audio, muxed, out = temps
        started = self.reactor.seconds()
        try:
            if source is None and kind != media.MP4:  # a PTMF container or a bare stream: muxed first
                try:
                    plan = yield self.run_in_thread(plan_video, f, kind, video, audio)
                except Unconvertible as e:
                    raise MediaError(422, f"cannot convert the video: {e}") from None
                yield self._ffmpeg(ffmpeg, plan.mux_args(muxed))
                source = muxed
                done = not poster and plan.codec == media.H264  # H.264 with AAC: playable as it is
            else:
                source, done = source or f.path, False
            if poster:
                yield self._ffmpeg(ffmpeg, ["-i", str(source), *poster_args(out)])
            elif done:
                out = muxed
            else:
                yield self._ffmpeg(ffmpeg, ["-i", str(source), *h264_args(out)])
            yield self.run_in_thread(os.replace, out, target)
        finally:
            yield self.run_in_thread(remove_present, *temps)
        log.info("status: {what} of file {id} made in {seconds:.1f} s", what="poster" if poster else "H.264 video",
                 id=f.id, seconds=self.reactor.seconds() - started, event="browser_media_made")
        removed = yield self.run_in_thread(_prune, self.cache, self.max_bytes, target)
        if removed:
            log.info("status: {count} cached poster(s)/video(s) removed (cache over {limit} bytes)",
                     count=len(removed), limit=self.max_bytes, event="browser_media_pruned")
        return target

    @defer.inlineCallbacks
    def _ffmpeg(self, ffmpeg: str, args: list[str]) -> Any:
        try:
            yield run_ffmpeg(self.reactor, ffmpeg, args, FFMPEG_TIMEOUT)
        except Unconvertible as e:
            raise MediaError(422, f"cannot convert the video: {e}") from None
        except Exception as e:
            raise MediaError(503, f"ffmpeg failed: {reason(e)}") from None


class _Served(static.File):
    """A stored file, or one made for the browser, with the status site's headers (Range answered)."""

    def __init__(self, path: Path, name: str) -> None:
        super().__init__(str(path), defaultType="application/octet-stream")
        self.served_name = name

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"cache-control", b"private, max-age=86400")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"content-security-policy", b"default-src 'none'; sandbox")
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.served_name)
        request.setHeader(b"content-disposition", f'inline; filename="{safe}"'.encode())
        return super().render_GET(request)

    render_HEAD = render_GET


def serve_file(request: Request, path: Path, name: Optional[str] = None) -> None:
    """Answer ``request`` with the file at ``path`` (GET or HEAD, ``Range`` honoured), then finish it."""
    body = _Served(path, name or path.name).render(request)
    if body is not NOT_DONE_YET:
        request.write(body)
        request.finish()
