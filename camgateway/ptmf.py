"""The DualCam video container ("PTMF"): frames of H.265 and audio.

Each frame is a 36-byte header and its payload (observed on real captures;
see the project's shared vectors README)::

    0   4  magic "PTMF"
    5   1  kind: I (0x49) / P (0x50) video, A (0x41) audio
    8   4  width, height (u16 little-endian each)
    24  4  payload length (u32 little-endian)
    28  4  timestamp (u32 little-endian, milliseconds)

The I/P payloads are Annex-B H.265 (they start with ``00 00 00 01``);
concatenated, they are a stream ffmpeg remuxes without re-encoding. Audio
payloads start with a 4-byte header ``00 01 a0 00`` (0xa0 = 160 16-bit words
= the 320 bytes that follow, one frame per 40 ms), the framing of HiSilicon
media SDKs; the codec inside is not identified yet (G.711 A-law and µ-law both
decode to noise), so audio is kept apart and not muxed.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Optional

__all__ = ["MAGIC", "Demuxed", "demux", "is_ptmf"]

MAGIC = b"PTMF"
_HEADER = 36
_u16x2 = struct.Struct("<HH")
_u32 = struct.Struct("<I")


@dataclasses.dataclass
class Demuxed:
    """A PTMF file taken apart."""

    video: bytearray  # Annex-B H.265
    audio: list[bytes]  # audio payloads, headers included
    width: int
    height: int
    video_frames: int
    video_timestamps: list[int]  # milliseconds

    def frame_rate(self) -> Optional[float]:
        """Frames per second from the timestamps (None with fewer than two frames)."""
        stamps = self.video_timestamps
        if len(stamps) < 2 or stamps[-1] <= stamps[0]:
            return None
        return round((len(stamps) - 1) * 1000.0 / (stamps[-1] - stamps[0]), 3)


def is_ptmf(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a PTMF container."""
    return head[:4] == MAGIC


def demux(data: bytes) -> Demuxed:
    """Split a PTMF file; ValueError if its structure is broken."""
    out = Demuxed(bytearray(), [], 0, 0, 0, [])
    view = memoryview(data)
    i = 0
    while i < len(data):
        if len(data) - i < _HEADER or data[i : i + 4] != MAGIC:
            raise ValueError(f"no PTMF frame header at byte {i}")
        kind = data[i + 5]
        (length,) = _u32.unpack_from(data, i + 24)
        end = i + _HEADER + length
        if end > len(data):
            raise ValueError(f"PTMF frame at byte {i} runs past the end ({length} bytes)")
        payload = view[i + _HEADER : end]
        if kind in (0x49, 0x50):
            if not out.width:
                out.width, out.height = _u16x2.unpack_from(data, i + 8)
            out.video += payload
            out.video_frames += 1
            out.video_timestamps.append(_u32.unpack_from(data, i + 28)[0])
        elif kind == 0x41:
            out.audio.append(bytes(payload))
        i = end
    if not out.video_frames:
        raise ValueError("PTMF file without video frames")
    return out
