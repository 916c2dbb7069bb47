"""What an emulated camera is: its files, its firmware's habits and its faults.

PROTOCOL.md section 4 decides how a file is offered: a DualCam source
(``photof``, ``photor``, ``videof``, ``videor``) is announced by its own
settings bit and fetched in the DualCam flow; anything else is a device path,
announced by bit 25 and fetched in the path flow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from camgateway.wire.codec import DUALCAM_SOURCE_BITS, METADATA_MAX, PATH_MAX
from camgateway.wire.status_codes import INVALID_RESUME

__all__ = [
    "KINDS",
    "SimFile",
    "CameraSpec",
]

#: The camera kinds the emulator plays.
KINDS: tuple[str, ...] = ("dualcam", "dsm", "adas", "dashcam")

Kind = Literal["dualcam", "dsm", "adas", "dashcam"]
MetadataBehaviour = Literal["answer", "never"]


@dataclass(frozen=True)
class SimFile:
    """One file a camera holds until the gateway has taken all of it.

    ``identifier`` is a DualCam source (``"photof"``…) or a device path such
    as ``"/sdcard/dsm/video_1730288144_0.mp4"`` (sent with a trailing NUL).
    ``metadata`` is the 0x000B payload; ``None`` means the camera never
    answers a metadata request for this file.
    """

    identifier: str
    content: bytes = field(repr=False)
    metadata: Optional[bytes] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.identifier:
            raise ValueError("a SimFile needs an identifier")
        if not self.is_dualcam and len(self.wire_path) > PATH_MAX:
            raise ValueError(f"path longer than {PATH_MAX} bytes: {self.identifier[:40]}...")
        if self.metadata is not None and len(self.metadata) > METADATA_MAX:
            raise ValueError(f"metadata of {self.identifier} longer than {METADATA_MAX} bytes")

    @property
    def is_dualcam(self) -> bool:
        """Whether this file travels in the DualCam flow (1-based packets)."""
        return self.identifier in DUALCAM_SOURCE_BITS

    @property
    def wire_path(self) -> bytes:
        """The 0x000D payload for a path-flow file: the path and its NUL."""
        return self.identifier.encode("utf-8") + b"\0"

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return len(self.content)


@dataclass(frozen=True)
class CameraSpec:
    """One emulated device: identity, files, firmware habits and faults.

    Faults (section 4 of the emulator's brief; all off by default):

    * ``bad_crc_frames``: DATA frame indexes (counted per file from 0, frame
      ``i`` holding bytes ``i*1024`` onwards) whose CRC is sent wrong, once
      per file; after the gateway's RESUME they are resent correctly.
    * ``drop_after_frames``: close the TCP connection right after frame
      ``k`` of each file has been written, once per file; the camera
      reconnects and offers the file again.
    * ``slow_bps``: write DATA at no more than this many bytes per second.
    * ``segment_sizes``: ``(lo, hi)``, split every write into pieces of
      ``lo..hi`` bytes sent ``segment_delay`` seconds apart (TCP_NODELAY on).
    * ``status_instead_of_start``: identifiers (DualCam source or path)
      answered with STATUS 0x11 instead of START; the file is then dropped.
    * ``status_after_start``: identifiers answered with START and, in the
      same TCP write, STATUS ``status_after_start_code`` (default 6,
      "invalid response to resume"), as a real DualCam did; the camera
      gives the file up (it is not offered again, and not expected to be
      stored) and goes on with the next FILE REQUEST. A RESUME that reaches
      the camera before that request (a gateway that answered the START
      before reading the STATUS) is ignored.
    * ``garbage``: send random bytes instead of an init and wait for the
      gateway to close the connection.

    ``enhanced_data`` sends ENHANCED DATA (0x000E) in the path flow; it needs
    ``protocol_id >= 6``.
    """

    imei: int
    kind: Kind = "dualcam"
    files: tuple[SimFile, ...] = ()
    protocol_id: int = 5
    metadata_behaviour: MetadataBehaviour = "answer"
    enhanced_data: bool = False
    bad_crc_frames: frozenset[int] = frozenset()
    drop_after_frames: Optional[int] = None
    slow_bps: Optional[int] = None
    segment_sizes: Optional[tuple[int, int]] = None
    segment_delay: float = 0.0005
    status_instead_of_start: frozenset[str] = frozenset()
    status_after_start: frozenset[str] = frozenset()
    status_after_start_code: int = INVALID_RESUME
    garbage: bool = False

    def __post_init__(self) -> None:
        # Accept lists and sets from callers; store immutable copies.
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "bad_crc_frames", frozenset(self.bad_crc_frames))
        object.__setattr__(self, "status_instead_of_start", frozenset(self.status_instead_of_start))
        object.__setattr__(self, "status_after_start", frozenset(self.status_after_start))
        if not 0 <= self.imei < 1 << 64:
            raise ValueError(f"IMEI {self.imei} does not fit in 64 bits")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not 0 <= self.protocol_id <= 0xFFFF:
            raise ValueError(f"protocol_id {self.protocol_id} does not fit in 16 bits")
        if self.metadata_behaviour not in ("answer", "never"):
            raise ValueError(f"metadata_behaviour must be 'answer' or 'never', not {self.metadata_behaviour!r}")
        if self.enhanced_data and self.protocol_id < 6:
            raise ValueError("enhanced_data (0x000E) needs protocol_id >= 6")
        for f in self.files:
            if f.is_dualcam and (self.kind != "dualcam" or self.protocol_id >= 6):
                raise ValueError(
                    f"{f.identifier!r} is a DualCam source, but a {self.kind} camera with "
                    f"protocol id {self.protocol_id} offers files by path"
                )
        if self.drop_after_frames is not None and self.drop_after_frames < 0:
            raise ValueError("drop_after_frames must be >= 0")
        if self.slow_bps is not None and self.slow_bps <= 0:
            raise ValueError("slow_bps must be positive")
        if self.segment_sizes is not None:
            lo, hi = self.segment_sizes
            if not 1 <= lo <= hi:
                raise ValueError(f"segment_sizes must be (lo, hi) with 1 <= lo <= hi, not {self.segment_sizes}")
        if any(i < 0 for i in self.bad_crc_frames):
            raise ValueError("bad_crc_frames must be frame indexes >= 0")
        both = self.status_instead_of_start & self.status_after_start
        if both:
            raise ValueError(f"{', '.join(sorted(both))}: in both status_instead_of_start and status_after_start")
        if not 0 < self.status_after_start_code <= 0xFFFFFFFF:
            # STATUS 0 is "success": it would not end the file (PROTOCOL.md section 7).
            raise ValueError(f"status_after_start_code must be 1..0xFFFFFFFF, not {self.status_after_start_code}")
