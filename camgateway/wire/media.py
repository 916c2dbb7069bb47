"""What a camera's file really is, from its bytes: JPEG, PTMF, MP4, bare H.265/H.264.

Cameras name their files as they like: a DSM camera's ``video_….mp4`` is an
MP4, a DualCam's video is a PTMF frame container (:mod:`camgateway.wire.ptmf`)
whatever it is called, and a camera may send a bare Annex-B stream. The
gateway names and converts files by what their first bytes say
(:func:`kind_of`, 16 bytes are enough), never by the device's name.

Also the little of Annex-B H.265/H.264 the gateway and the emulator need:
walking NAL units, grouping them into pictures, counting pictures.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

from camgateway.wire.ptmf import is_ptmf

__all__ = [
    "JPEG", "PTMF", "MP4", "HEVC", "H264", "VIDEOS", "EXTENSIONS", "HEAD",
    "kind_of", "head_of", "kind_of_file", "nal_units", "hevc_pictures", "count_pictures",
]

JPEG = "jpeg"
PTMF = "ptmf"
MP4 = "mp4"
HEVC = "hevc"
H264 = "h264"
#: The kinds that are videos.
VIDEOS = frozenset({PTMF, MP4, HEVC, H264})
#: The file extension of each kind.
EXTENSIONS = {JPEG: "jpg", PTMF: "ptmf", MP4: "mp4", HEVC: "h265", H264: "h264"}
#: Bytes :func:`kind_of` looks at.
HEAD = 16

# H.265 NAL types a stream starts with: VPS, SPS, PPS, AUD, prefix SEI, IRAP pictures.
_HEVC_FIRST = frozenset({32, 33, 34, 35, 39, 16, 17, 18, 19, 20, 21})
# H.264 NAL types a stream starts with, and whether nal_ref_idc must be non-zero:
# SPS, PPS, IDR (must), SEI, AUD (must not).
_H264_FIRST = {7: True, 8: True, 5: True, 6: False, 9: False}


def kind_of(head: bytes) -> Optional[str]:
    """The kind of a file that starts with ``head`` (:data:`HEAD` bytes), None if unknown."""
    if head[:2] == b"\xff\xd8":
        return JPEG
    if is_ptmf(head):
        return PTMF
    if head[4:8] == b"ftyp":
        return MP4
    if head[:4] == b"\0\0\0\1":
        nal = head[4:6]
    elif head[:3] == b"\0\0\1":
        nal = head[3:5]
    else:
        return None
    if len(nal) < 2 or nal[0] & 0x80:  # forbidden_zero_bit
        return None
    # H.265: a 2-byte header, layer 0 and temporal id 1 (second byte 0x01) at the start of a stream.
    if (nal[0] >> 1) & 0x3F in _HEVC_FIRST and nal[1] == 0x01:
        return HEVC
    must_ref = _H264_FIRST.get(nal[0] & 0x1F)
    if must_ref is not None and bool(nal[0] & 0x60) == must_ref:
        return H264
    return None


def head_of(path: str) -> bytes:
    """The first :data:`HEAD` bytes of the file at ``path`` (blocking: run it in a thread)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, HEAD, 0)
    finally:
        os.close(fd)


def kind_of_file(path: str) -> Optional[str]:
    """:func:`kind_of` the file at ``path`` (blocking: run it in a thread)."""
    return kind_of(head_of(path))


def nal_units(data: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of every NAL unit of an Annex-B stream, start codes included.

    A unit runs from its start code (``00 00 01``, or ``00 00 00 01``) to the
    next one, so the pieces put back together are ``data`` again (bytes
    before the first start code are skipped).
    """
    find = data.find
    i = find(b"\0\0\1")
    if i < 0:
        return
    start = i - 1 if i > 0 and data[i - 1] == 0 else i
    while True:
        j = find(b"\0\0\1", i + 3)
        if j < 0:
            yield start, len(data)
            return
        end = j - 1 if data[j - 1] == 0 else j
        yield start, end
        start, i = end, j


def _header_at(data: bytes, start: int) -> int:
    """The offset of the NAL header of the unit at ``start`` (after its start code)."""
    return start + (4 if data[start + 2] == 0 else 3)


def hevc_pictures(data: bytes) -> list[tuple[bytes, bool]]:
    """An Annex-B H.265 stream cut into pictures: ``(bytes, is a key frame)`` each.

    A picture carries the parameter sets and SEI before it; it starts at a
    slice with ``first_slice_segment_in_pic_flag`` or at a non-slice unit
    following a slice. Key frames are IRAP pictures (IDR, CRA, BLA).
    """
    pictures: list[tuple[bytes, bool]] = []
    begin: Optional[int] = None
    has_slice = key = False
    for start, end in nal_units(data):
        h = _header_at(data, start)
        if h + 2 >= end:
            continue
        kind = (data[h] >> 1) & 0x3F
        is_slice = kind < 32
        first = is_slice and bool(data[h + 2] & 0x80)
        if begin is not None and has_slice and (first or not is_slice):
            pictures.append((data[begin:start], key))
            begin, has_slice, key = None, False, False
        if begin is None:
            begin = start
        if is_slice:
            has_slice = True
            key = key or 16 <= kind <= 23
    if begin is not None and has_slice:
        pictures.append((data[begin:], key))
    return pictures


def count_pictures(data: bytes, kind: str) -> int:
    """How many pictures an Annex-B stream of ``kind`` (:data:`HEVC` or :data:`H264`) holds."""
    count = 0
    for start, end in nal_units(data):
        h = _header_at(data, start)
        if kind == HEVC:
            if h + 2 < end and (data[h] >> 1) & 0x3F < 32 and data[h + 2] & 0x80:
                count += 1
        elif h + 1 < end and data[h] & 0x1F in (1, 5) and data[h + 1] & 0x80:  # first_mb_in_slice == 0
            count += 1
    return count
