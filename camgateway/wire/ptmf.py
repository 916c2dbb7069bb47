"""The DualCam video container ("PTMF"): frames of H.265 and G.711 A-law audio.

Each frame is a 36-byte header and its payload (observed on real captures;
see the project's shared vectors README)::

    0   4  magic "PTMF"
    5   1  kind: I (0x49) / P (0x50) video, A (0x41) audio
    7   1  0x14 (20) on the real capture: the frame rate, not confirmed
    8   4  width, height (u16 little-endian each)
    12  2  a frame counter per stream (u16 little-endian)
    24  4  payload length (u32 little-endian)
    28  4  timestamp (u32 little-endian, microseconds)

The I/P payloads are Annex-B H.265 (they start with ``00 00 00 01``);
concatenated, they are a stream ffmpeg remuxes without re-encoding. Each
audio payload is a 4-byte header ``00 01 a0 00`` (0xa0 = 160 16-bit words:
the 320 bytes that follow) and G.711 A-law at 8 kHz, mono: 40 ms a frame.

:func:`demux` and :func:`demux_file` take a container apart;
:meth:`Demuxed.frame_rate` and :meth:`Demuxed.audio_track` give what a muxer
needs to put picture and sound back together in time; :func:`mux` builds a
container (the emulator sends real ones).
"""

from __future__ import annotations

import dataclasses
import io
import struct
from typing import BinaryIO, Optional, Sequence

__all__ = ["MAGIC", "HEADER", "AUDIO_RATE", "ALAW_SILENCE", "Demuxed", "demux", "demux_file", "is_ptmf", "mux"]

MAGIC = b"PTMF"
HEADER = 36
#: Samples (bytes) of A-law per second.
AUDIO_RATE = 8000
#: The A-law byte of silence (a zero sample).
ALAW_SILENCE = 0xD5
_VIDEO = (0x49, 0x50)
_AUDIO = 0x41
_u16x2 = struct.Struct("<HH")
_u32 = struct.Struct("<I")
#: Frame rates cameras record at: one within 2 % of the timestamps' is taken as it.
_COMMON_RATES = (5.0, 6.0, 7.5, 8.0, 10.0, 12.0, 12.5, 15.0, 20.0, 24.0, 25.0, 30.0, 50.0, 60.0,
                 24000 / 1001, 30000 / 1001, 60000 / 1001)


@dataclasses.dataclass
class Demuxed:
    """A PTMF file taken apart."""

    #: The Annex-B video stream (empty when :func:`demux_file` wrote it to a file).
    video: bytearray
    #: Audio frames, A-law samples without their 4-byte headers.
    audio: list[bytes]
    width: int
    height: int
    video_frames: int
    video_timestamps: list[int]  # microseconds
    audio_timestamps: list[int] = dataclasses.field(default_factory=list)  # microseconds
    #: The first bytes of the video stream (its codec: camgateway.wire.media.kind_of).
    video_head: bytes = b""

    def frame_rate(self) -> Optional[float]:
        """Frames per second from the timestamps (None with fewer than two frames).

        The slope of a least-squares line through the timestamps: cameras
        stamp frames on a sensor clock (the real capture's alternate 33 and
        67 ms apart for 20 fps), and the line sees through that jitter where
        first-to-last would be off by half a step. A common rate within 2 %
        is taken as it (the capture's 19.994 is 20).
        """
        stamps = self.video_timestamps
        n = len(stamps)
        if n < 2:
            return None
        mean_x = (n - 1) / 2
        mean_y = sum(stamps) / n
        spread = sum((i - mean_x) ** 2 for i in range(n))
        slope = sum((i - mean_x) * (t - mean_y) for i, t in enumerate(stamps)) / spread
        if slope <= 0:
            return None
        rate = 1e6 / slope
        nearest = min(_COMMON_RATES, key=lambda common: abs(common - rate))
        if abs(nearest - rate) <= 0.02 * nearest:
            return nearest
        return round(rate, 3)

    def audio_track(self, seconds: float) -> bytes:
        """The A-law sound as long as the picture (``seconds``), in step with it.

        Sample 0 is the first video frame's time. Audio frames follow one
        another; one that comes a whole frame or more after the last one ended
        (frames lost) starts at its own timestamp, with silence before it.
        Sound before the picture's start or after its end is cut, and the
        picture's time without sound is silence.
        """
        total = max(0, round(seconds * AUDIO_RATE))
        out = bytearray([ALAW_SILENCE]) * total
        if not self.audio or not self.video_timestamps:
            return bytes(out)
        first = self.video_timestamps[0]
        cursor: Optional[int] = None
        for stamp, frame in zip(self.audio_timestamps, self.audio):
            at = round((stamp - first) * AUDIO_RATE / 1e6)
            if cursor is None or at - cursor >= len(frame):
                cursor = at
            begin, end = max(cursor, 0), min(cursor + len(frame), total)
            if begin < end:
                out[begin:end] = frame[begin - cursor : end - cursor]
            cursor += len(frame)
        return bytes(out)


def is_ptmf(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a PTMF container."""
    return head[:4] == MAGIC


def _samples(payload: bytes) -> bytes:
    """An audio payload's A-law bytes: without its ``00 01 <words u16> `` header when it has one."""
    if len(payload) >= 4 and payload[:2] == b"\0\1":
        words = payload[2] | payload[3] << 8
        if 4 + 2 * words == len(payload):
            return payload[4:]
    return payload


def _read(source: BinaryIO, video: Optional[BinaryIO]) -> Demuxed:
    out = Demuxed(bytearray(), [], 0, 0, 0, [])
    offset = 0
    while True:
        header = source.read(HEADER)
        if not header:
            break
        if len(header) < HEADER or header[:4] != MAGIC:
            raise ValueError(f"no PTMF frame header at byte {offset}")
        kind = header[5]
        (length,) = _u32.unpack_from(header, 24)
        payload = source.read(length)
        if len(payload) < length:
            raise ValueError(f"PTMF frame at byte {offset} runs past the end ({length} bytes)")
        (stamp,) = _u32.unpack_from(header, 28)
        if kind in _VIDEO:
            if not out.video_frames:
                out.width, out.height = _u16x2.unpack_from(header, 8)
            if len(out.video_head) < 16:
                out.video_head = (out.video_head + payload[:16])[:16]
            if video is None:
                out.video += payload
            else:
                video.write(payload)
            out.video_frames += 1
            out.video_timestamps.append(stamp)
        elif kind == _AUDIO:
            out.audio.append(_samples(payload))
            out.audio_timestamps.append(stamp)
        offset += HEADER + length
    if not out.video_frames:
        raise ValueError("PTMF file without video frames")
    return out


def demux(data: bytes) -> Demuxed:
    """Split a PTMF file held in memory; ValueError if its structure is broken."""
    return _read(io.BytesIO(data), None)


def demux_file(path: str, video: BinaryIO) -> Demuxed:
    """Split the PTMF file at ``path``, writing its video stream to ``video`` (blocking).

    Only the audio and the timestamps are kept in memory. ValueError if the
    structure is broken.
    """
    with open(path, "rb", buffering=1 << 20) as source:
        return _read(source, video)


def _header(kind: int, rate: int, width: int, height: int, counter: int, length: int, stamp: int) -> bytes:
    header = bytearray(HEADER)
    header[0:4] = MAGIC
    header[5] = kind
    header[7] = rate & 0xFF
    _u16x2.pack_into(header, 8, width, height)
    struct.pack_into("<H", header, 12, counter & 0xFFFF)
    _u32.pack_into(header, 24, length)
    _u32.pack_into(header, 28, stamp & 0xFFFFFFFF)
    return bytes(header)


def mux(pictures: Sequence[tuple[bytes, bool]], picture_stamps: Sequence[int], audio: Sequence[bytes],
        audio_stamps: Sequence[int], width: int, height: int, rate: int = 20) -> bytes:
    """A PTMF container as a DualCam writes it.

    ``pictures`` are Annex-B pictures ``(bytes, is a key frame)`` (key frames
    become I frames, the others P), ``audio`` frames of A-law samples (each
    gets its ``00 01 <words> 00`` header); the stamps are microseconds. Frames
    are interleaved by time, a picture before the sound of the same instant.
    """
    frames = []
    for n, ((payload, key), stamp) in enumerate(zip(pictures, picture_stamps)):
        frames.append((stamp, 0, n, 0x49 if key else 0x50, payload))
    for n, (samples, stamp) in enumerate(zip(audio, audio_stamps)):
        words = len(samples) // 2
        frames.append((stamp, 1, n, _AUDIO, b"\0\1" + struct.pack("<H", words) + samples))
    frames.sort(key=lambda f: (f[0], f[1], f[2]))
    out = bytearray()
    for stamp, _, n, kind, payload in frames:
        out += _header(kind, rate, width, height, n, len(payload), stamp)
        out += payload
    return bytes(out)
