"""A device's state that outlives its TCP connections.

A real camera keeps a file until it is fully uploaded and offers it again on
the next connection (PROTOCOL.md section 9); faults fire once per file, so a
fault that made a connection fail does not fire again after the reconnect.
"""

from __future__ import annotations

from typing import Optional

from camgateway.sim.model import CameraSpec, SimFile
from camgateway.wire.codec import ALWAYS_SET_BITS, DUALCAM_SOURCE_BITS, PATH_FILE_BIT
from camgateway.sim.result import CameraResult

__all__ = ["Camera"]


class Camera:
    """The pending files, fault memory and record of one emulated device."""

    def __init__(self, spec: CameraSpec) -> None:
        self.spec = spec
        #: Indexes into ``spec.files`` of the files not yet uploaded, in offer order.
        self.pending: list[int] = [] if spec.garbage else list(range(len(spec.files)))
        self.result = CameraResult(
            imei=spec.imei,
            kind=spec.kind,
            files_total=0 if spec.garbage else len(spec.files),
            garbage=spec.garbage,
        )
        self._bad_crcs: set[tuple[int, int]] = {
            (i, frame) for i in self.pending for frame in spec.bad_crc_frames
        }
        self._drops: set[int] = set(self.pending) if spec.drop_after_frames is not None else set()

    # -- what to offer

    @property
    def done(self) -> bool:
        """Nothing left to upload."""
        return not self.pending

    def settings(self) -> int:
        """The init packet's settings for what is still pending (section 4)."""
        bits = ALWAYS_SET_BITS
        for i in self.pending:
            f = self.spec.files[i]
            bits |= DUALCAM_SOURCE_BITS[f.identifier] if f.is_dualcam else PATH_FILE_BIT
        return bits

    def file(self, index: int) -> SimFile:
        """The file at ``index`` of the spec."""
        return self.spec.files[index]

    def next_path(self) -> Optional[int]:
        """The first pending path-flow file, the one 0x000C is answered with."""
        for i in self.pending:
            if not self.spec.files[i].is_dualcam:
                return i
        return None

    def find(self, identifier: str) -> Optional[int]:
        """The first pending file with this DualCam source or path."""
        for i in self.pending:
            if self.spec.files[i].identifier == identifier:
                return i
        return None

    # -- outcomes

    def delivered(self, index: int) -> None:
        """The file went out completely: stop offering it."""
        if index in self.pending:
            self.pending.remove(index)
            f = self.spec.files[index]
            self.result.delivered.append((f.identifier, f.size))

    def refused(self, index: int) -> None:
        """The camera answered STATUS for this file: it is dropped, as on a real device."""
        if index in self.pending:
            self.pending.remove(index)
            self.result.refused.append(self.spec.files[index].identifier)

    def gave_up(self, index: int) -> None:
        """The camera sent START then STATUS for this file: it is dropped, as on a real device."""
        if index in self.pending:
            self.pending.remove(index)
            self.result.given_up.append(self.spec.files[index].identifier)

    def finish(self, now: float) -> CameraResult:
        """Close the record: list what is still pending."""
        self.result.pending = [self.spec.files[i].identifier for i in self.pending]
        self.result.finished = now
        return self.result

    # -- faults, each fires once

    def status_fault(self, index: int) -> bool:
        """Whether to answer STATUS 0x11 instead of START for this file."""
        return self.spec.files[index].identifier in self.spec.status_instead_of_start

    def status_after_start_fault(self, index: int) -> bool:
        """Whether to follow START with STATUS for this file (the file is then given up)."""
        return self.spec.files[index].identifier in self.spec.status_after_start

    def take_bad_crc(self, index: int, frame: int) -> bool:
        """Whether frame ``frame`` of file ``index`` gets a wrong CRC now."""
        key = (index, frame)
        if key in self._bad_crcs:
            self._bad_crcs.discard(key)
            self.result.bad_crcs_sent += 1
            return True
        return False

    def take_drop(self, index: int, frame: int) -> bool:
        """Whether to drop the connection after frame ``frame`` of file ``index``."""
        if frame == self.spec.drop_after_frames and index in self._drops:
            self._drops.discard(index)
            self.result.drops += 1
            return True
        return False
