"""The files an emulated camera offers: real media, random blobs, or files read from disk.

Each file gets the identifier and metadata its camera kind would give it
(PROTOCOL.md sections 4 and 6): DualCam with protocol id <= 5 uses the four
DualCam sources; every other camera offers device paths whose directory
names the kind (``/sdcard/dsm/…``, ``/sdcard/mdas9/…``, ``/sdcard/dashcam/…``,
``/sdcard/dualcam_front/…``).

Contents are real photos and videos (:mod:`camgateway.sim.media`: JPEG, a
DualCam's PTMF, the others' MP4) when :func:`make_files` is given a
:class:`~camgateway.sim.media.Media`, else random bytes of the sizes asked
for, which cost nothing to make (load tests, the benchmark): a JPEG's first
and last bytes around random ones, and a video's first bytes as its camera
kind's container (``PTMF`` for a DualCam, an MP4 ``ftyp`` box for the
others) before random ones.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Optional, Sequence

from camgateway.sim.media import FRAMERATE, VIDEO_SECONDS, Media
from camgateway.sim.metadata import adas_metadata, dsm_metadata, dualcam_metadata, json_metadata
from camgateway.sim.model import SimFile
from camgateway.wire.ptmf import MAGIC

__all__ = [
    "parse_size",
    "random_jpeg",
    "random_video",
    "container_of",
    "ContentPool",
    "make_files",
    "files_from_dir",
    "PHOTO_SUFFIXES",
    "DEFAULT_TIMESTAMP",
]

#: Suffixes read as photos by :func:`files_from_dir`; anything else is a video.
PHOTO_SUFFIXES = (".jpg", ".jpeg")

#: The timestamp of the real DualCam capture in ``vectors/`` (seconds).
DEFAULT_TIMESTAMP = 1730288144

_LATITUDE = 24.9225
_LONGITUDE = 67.1388
_PATH_DIRS = {"dsm": "dsm", "adas": "mdas9", "dashcam": "dashcam"}


def parse_size(text: str) -> int:
    """``"30K"`` → 30720, ``"2M"`` → 2097152, ``"1.5M"``, ``"100"`` bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 100, 30K, 2M)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _randbytes(n: int, rng: random.Random) -> bytes:
    """``rng.randbytes(n)``, in pieces past 256 MiB (one call takes at most 2**31 - 1 bits)."""
    if n < 1 << 28:
        return rng.randbytes(n)
    piece = 1 << 27
    return b"".join(rng.randbytes(min(piece, n - i)) for i in range(0, n, piece))


def random_jpeg(size: int, rng: random.Random) -> bytes:
    """A JPEG-looking blob of ``size`` bytes: ``ffd8 ffe0`` … ``ffd9``."""
    if size < 6:
        return b"\xff\xd8\xff\xd9"[:size]
    return b"\xff\xd8\xff\xe0" + _randbytes(size - 6, rng) + b"\xff\xd9"


#: The first bytes of a random video, by container: a DualCam's PTMF, the others' MP4 (an ``ftyp`` box).
_VIDEO_STARTS = {"ptmf": MAGIC, "mp4": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"}


def random_video(size: int, rng: random.Random, container: str = "ptmf") -> bytes:
    """A blob of ``size`` bytes that starts like a ``container`` (``ptmf`` or ``mp4``) file."""
    start = _VIDEO_STARTS[container]
    return (start + _randbytes(max(0, size - len(start)), rng))[:size]


def container_of(kind: str) -> str:
    """The video container of a camera kind: ``ptmf`` for a DualCam, ``mp4`` for the others."""
    return "ptmf" if kind == "dualcam" else "mp4"


class ContentPool:
    """Shares random contents between cameras, so a thousand cameras do not
    need a thousand copies of a 2 MB video (frame plans are cached per
    content object, see :mod:`camgateway.sim.frames`)."""

    def __init__(self, rng: random.Random, variants: int = 4) -> None:
        self._rng = rng
        self._variants = max(1, variants)
        self._made: dict[tuple[bool, int, int, str], bytes] = {}

    def get(self, photo: bool, size: int, key: int, container: str = "ptmf") -> bytes:
        """Content for a photo/video (of ``container``) of ``size`` bytes; ``key`` picks a variant."""
        slot = (photo, size, key % self._variants, "" if photo else container)
        blob = self._made.get(slot)
        if blob is None:
            blob = random_jpeg(size, self._rng) if photo else random_video(size, self._rng, container)
            self._made[slot] = blob
        return blob


def _identifier(kind: str, protocol_id: int, photo: bool, number: int, timestamp: int, name: Optional[str]) -> str:
    if kind == "dualcam" and protocol_id < 6:
        return ("photo" if photo else "video") + ("f" if number % 2 == 0 else "r")
    if kind == "dualcam":
        directory = "dualcam_front" if number % 2 == 0 else "dualcam_rear"
    else:
        directory = _PATH_DIRS[kind]
    if name is None:
        name = f"picture_{timestamp}_{number}.jpg" if photo else f"video_{timestamp}_{number}.mp4"
    return f"/sdcard/{directory}/{name}"


def _metadata(kind: str, protocol_id: int, photo: bool, identifier: str, number: int, timestamp: int) -> bytes:
    seconds = 0 if photo else VIDEO_SECONDS
    if protocol_id >= 6:
        return json_metadata(
            file_type="photo" if photo else "video",
            timestamp_ms=timestamp * 1000,
            duration=seconds,
            framerate=0 if photo else FRAMERATE,
            latitude=_LATITUDE,
            longitude=_LONGITUDE,
            driver_name="EMULATOR" if kind == "dsm" else None,
        )
    if kind == "dsm":
        return dsm_metadata(
            timestamp=timestamp,
            file_type=1 if photo else 0,
            trigger=11,
            latitude=_LATITUDE,
            longitude=_LONGITUDE,
            events=1 << (number % 9),
            driver_name="EMULATOR",
        )
    if kind == "adas":
        return adas_metadata(
            timestamp=timestamp,
            file_type=1 if photo else 0,
            latitude=_LATITUDE,
            longitude=_LONGITUDE,
            length_s=seconds,
        )
    source = identifier if kind == "dualcam" else ("photof" if photo else "videof")
    return dualcam_metadata(
        source,
        timestamp_ms=timestamp * 1000,
        length_s=seconds,
        framerate=0 if photo else FRAMERATE,
        latitude=_LATITUDE,
        longitude=_LONGITUDE,
    )


def name_files(
    kind: str,
    protocol_id: int,
    items: Sequence[tuple[bool, bytes, Optional[str]]],
    *,
    timestamp: int = DEFAULT_TIMESTAMP,
    metadata: bool = True,
) -> list[SimFile]:
    """Turn ``(is_photo, content, name or None)`` items into a camera's files."""
    files = []
    photos = videos = 0
    for number, (photo, content, name) in enumerate(items):
        kind_number = photos if photo else videos
        if photo:
            photos += 1
        else:
            videos += 1
        stamp = timestamp + number
        identifier = _identifier(kind, protocol_id, photo, kind_number, stamp, name)
        meta = _metadata(kind, protocol_id, photo, identifier, number, stamp) if metadata else None
        files.append(SimFile(identifier, content, meta))
    return files


def make_files(
    kind: str,
    *,
    protocol_id: int = 5,
    photos: int = 1,
    videos: int = 0,
    photo_size: int = 30 * 1024,
    video_size: int = 2 * 1024 * 1024,
    rng: Optional[random.Random] = None,
    pool: Optional[ContentPool] = None,
    key: int = 0,
    timestamp: int = DEFAULT_TIMESTAMP,
    metadata: bool = True,
    media: Optional[Media] = None,
) -> list[SimFile]:
    """Photos then videos for one camera of ``kind``: real ones from ``media``, else random.

    Real photos take the media's variants in turn from ``key`` (e.g. the
    camera's number); every video of a kind is the same. Random contents
    have the sizes given; with a ``pool`` they are shared (``key`` picks the
    variant), otherwise each file gets fresh random bytes.
    """
    rng = rng or random.Random()
    container = container_of(kind)
    items: list[tuple[bool, bytes, Optional[str]]] = []
    for i in range(photos + videos):
        photo = i < photos
        size = photo_size if photo else video_size
        if media is not None:
            content = media.photo(kind, key + i) if photo else media.video(kind)
        elif pool is not None:
            content = pool.get(photo, size, key + i, container)
        else:
            content = random_jpeg(size, rng) if photo else random_video(size, rng, container)
        items.append((photo, content, None))
    return name_files(kind, protocol_id, items, timestamp=timestamp, metadata=metadata)


def files_from_dir(
    directory: str,
    kind: str,
    *,
    protocol_id: int = 5,
    timestamp: int = DEFAULT_TIMESTAMP,
    metadata: bool = True,
) -> list[SimFile]:
    """Every regular file of ``directory`` (sorted by name): ``*.jpg`` are
    photos, anything else videos. Path-flow identifiers keep the file's name."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--files: {directory} is not a directory")
    items: list[tuple[bool, bytes, Optional[str]]] = []
    for entry in sorted(root.iterdir()):
        if entry.is_file() and not entry.name.startswith("."):
            items.append((entry.suffix.lower() in PHOTO_SUFFIXES, entry.read_bytes(), entry.name))
    if not items:
        raise ValueError(f"--files: no files in {directory}")
    return name_files(kind, protocol_id, items, timestamp=timestamp, metadata=metadata)
