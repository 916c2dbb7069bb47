"""DATA frames of a file, precomputed once and shared by every camera sending it.

A file is cut at multiples of 1024 bytes (:data:`~camgateway.wire.codec.PACKET`);
frame ``i`` holds bytes ``i*1024 .. i*1024+1023``. The frame bodies (header
and payload) are built once per content. The CRC of a frame depends on where the stream started
(the chain restarts at 0 after every SYNC, PROTOCOL.md section 5.5), so the
chain is computed per start position, at C speed over a bit-reversed copy of
the file, and cached: almost every stream starts at 0.

A stream that starts at a byte offset that is not a multiple of 1024 (a
gateway resuming a partial it received from something else) begins with one
short frame up to the next boundary, then continues on the shared frames.

A stream from 0 with no fault to apply (the load of a benchmark) is sent as
slices of one precomputed block holding every frame and its CRC
(:meth:`FramePlan.wire`), so the emulator costs next to nothing per frame.
"""

from __future__ import annotations

import struct
from binascii import crc_hqx
from typing import Callable, Optional

from camgateway.wire.codec import CRC_SIZE, DATA_FRAME, ENHANCED_OVERHEAD, HEADER_SIZE, PACKET, Cmd
from camgateway.wire.crc import REVERSE_BITS, crc16, reverse16

__all__ = ["FramePlan", "PlanCache", "FileStream"]

_u16 = struct.Struct(">H")
_DATA = _u16.pack(Cmd.DATA)
_ENHANCED = _u16.pack(Cmd.ENHANCED_DATA)
_u32 = struct.Struct(">I")
_CHAINS_KEPT = 8


class FramePlan:
    """The DATA frames of one content, and the CRC chains from any start."""

    __slots__ = ("content", "size", "count", "file_crc", "_reversed", "_bodies", "_enhanced", "_chains", "_wire")

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.size = len(content)
        #: Number of 1024-byte packets (the DualCam START total).
        self.count = -(-self.size // PACKET)
        #: CRC of the whole file from 0 (the path-flow START crc).
        self.file_crc = crc16(content, 0)
        self._reversed = content.translate(REVERSE_BITS)
        self._bodies = [
            _DATA + _u16.pack(len(chunk) + CRC_SIZE) + chunk
            for chunk in (content[i : i + PACKET] for i in range(0, self.size, PACKET))
        ]
        self._enhanced: Optional[list[bytes]] = None
        self._chains: dict[int, list[bytes]] = {}
        self._wire: Optional[bytes] = None

    def frame_end(self, offset: int) -> int:
        """Where the frame starting at byte ``offset`` ends."""
        return min((offset // PACKET + 1) * PACKET, self.size)

    def body(self, offset: int, enhanced: bool = False) -> bytes:
        """Header and payload of the frame starting at byte ``offset`` (CRC not included)."""
        index, head = divmod(offset, PACKET)
        if head:
            chunk = self.content[offset : self.frame_end(offset)]
            if enhanced:
                return _ENHANCED + _u16.pack(len(chunk) + ENHANCED_OVERHEAD) + _u32.pack(offset) + chunk
            return _DATA + _u16.pack(len(chunk) + CRC_SIZE) + chunk
        if not enhanced:
            return self._bodies[index]
        if self._enhanced is None:
            self._enhanced = [
                _ENHANCED + _u16.pack(len(b) - HEADER_SIZE + ENHANCED_OVERHEAD) + _u32.pack(i * PACKET)
                + b[HEADER_SIZE:]
                for i, b in enumerate(self._bodies)
            ]
        return self._enhanced[index]

    def chain(self, start: int) -> list[bytes]:
        """The packed CRC of every frame of a stream that starts (SYNC) at byte ``start``."""
        cached = self._chains.get(start)
        if cached is not None:
            return cached
        out = []
        view = memoryview(self._reversed)
        register = 0  # reverse16(0): the chain restarts at 0 after a SYNC
        offset = start
        size = self.size
        while offset < size:
            end = min((offset // PACKET + 1) * PACKET, size)
            register = crc_hqx(view[offset:end], register)
            out.append(_u16.pack(reverse16(register)))
            offset = end
        view.release()
        if len(self._chains) >= _CHAINS_KEPT:
            for key in [k for k in self._chains if k][:1]:
                del self._chains[key]
        self._chains[start] = out
        return out

    def wire(self) -> bytes:
        """Every DATA frame of a stream that starts (SYNC) at 0, CRCs included, as one
        block: frame ``i`` is at ``i * DATA_FRAME``. Built on first use and
        kept, so a fault-free stream is sent by slicing (one more copy of the file)."""
        if self._wire is None:
            chain = self.chain(0)
            self._wire = b"".join(part for pair in zip(self._bodies, chain) for part in pair)
        return self._wire


class PlanCache:
    """Frame plans by content object, shared by all the cameras of a run."""

    def __init__(self) -> None:
        self._plans: dict[int, tuple[bytes, FramePlan]] = {}

    def get(self, content: bytes) -> FramePlan:
        """The plan of ``content`` (built on first use)."""
        held = self._plans.get(id(content))
        if held is not None and held[0] is content:
            return held[1]
        plan = FramePlan(content)
        self._plans[id(content)] = (content, plan)
        return plan


class FileStream:
    """The DATA frames a camera sends after one SYNC, with its faults applied.

    ``corrupt(index)`` and ``drop(index)`` ask the camera whether a fault
    fires at that frame (each consumes the fault). ``tainted`` collects the
    indexes of frames last sent with a wrong CRC.
    """

    __slots__ = (
        "plan", "offset", "enhanced", "finished", "drop_requested",
        "data_bytes", "_chain", "_k", "_corrupt", "_drop", "_tainted",
    )

    def __init__(
        self,
        plan: FramePlan,
        start: int,
        *,
        enhanced: bool = False,
        corrupt: Optional[Callable[[int], bool]] = None,
        drop: Optional[Callable[[int], bool]] = None,
        tainted: Optional[set[int]] = None,
    ) -> None:
        self.plan = plan
        #: Byte offset of the next frame.
        self.offset = start
        self.enhanced = enhanced
        #: Every frame up to the end of the file has been taken.
        self.finished = start >= plan.size
        #: A drop fault fired: close the connection after the last frame taken.
        self.drop_requested = False
        #: File bytes taken so far.
        self.data_bytes = 0
        self._chain = plan.chain(start) if not self.finished else []
        self._k = 0
        self._corrupt = corrupt
        self._drop = drop
        self._tainted = tainted if tainted is not None else set()

    def take(self, max_frames: int) -> bytes:
        """The next ``max_frames`` frames (fewer at the end or at a drop), joined."""
        if (self._corrupt is None and self._drop is None and not self.enhanced
                and self.offset - self._k * PACKET == 0 and not self._tainted):
            return self._take_wire(max_frames)
        parts: list[bytes] = []
        plan = self.plan
        size = plan.size
        offset = self.offset
        k = self._k
        chain = self._chain
        corrupt = self._corrupt
        drop = self._drop
        for _ in range(max_frames):
            if offset >= size:
                break
            end = plan.frame_end(offset)
            index = offset // PACKET
            crc = chain[k]
            if corrupt is not None and corrupt(index):
                crc = bytes((crc[0] ^ 0xA5, crc[1] ^ 0x5A))
                self._tainted.add(index)
            elif self._tainted:
                self._tainted.discard(index)
            parts.append(plan.body(offset, self.enhanced))
            parts.append(crc)
            self.data_bytes += end - offset
            offset = end
            k += 1
            if drop is not None and drop(index):
                self.drop_requested = True
                break
        self.offset = offset
        self._k = k
        self.finished = offset >= size
        return b"".join(parts)

    def _take_wire(self, max_frames: int) -> bytes:
        """:meth:`take` for a fault-free stream from 0: a slice of :meth:`FramePlan.wire`."""
        plan = self.plan
        k = self._k
        end = min(plan.size, (k + max_frames) * PACKET)
        if end <= self.offset:
            return b""
        wire = plan.wire()
        frames = -(-(end - self.offset) // PACKET)
        data = wire[k * DATA_FRAME : min(len(wire), (k + frames) * DATA_FRAME)]
        self.data_bytes += end - self.offset
        self.offset = end
        self._k = k + frames
        self.finished = end >= plan.size
        return data
