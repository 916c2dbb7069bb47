"""One file being received: position, CRC chain and spool writes.

This is the DATA hot path. :meth:`Transfer.append` runs once per frame and
does a bounds check, one C CRC over a view of the decoder's buffer and one
copy of the payload into a pending :class:`bytearray`; the session calls
:meth:`Transfer.flush` once per read to hand that to the kernel with one
``pwrite``. Nothing is logged and no Deferred is made per frame.

Positions: DualCam counts 1-based packets of 1024 bytes, the path flow counts
bytes from 0 (PROTOCOL.md section 4). Internally everything is bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Optional

from twisted.internet import defer

from camgateway.codec import ProtocolError
from camgateway.crc import crc16, crc16_combine
from camgateway.resume_store import Partial
from camgateway.spool import DUALCAM_PACKET

__all__ = ["Transfer", "FileDigest", "digest_file", "PACKET", "RUN_MORE", "RUN_BAD_CRC", "RUN_COMPLETE",
           "RUN_SLOW"]

PACKET = DUALCAM_PACKET
RUN_MORE, RUN_BAD_CRC, RUN_COMPLETE, RUN_SLOW = 0, 1, 2, 3
_HEADER = struct.Struct(">HH").unpack_from


class Transfer:
    """The receiving state of one file, bound to an open spool file."""

    __slots__ = (
        "partial", "fd", "dualcam", "held", "flushed", "checkpointed", "pending",
        "limit", "done_at", "_unit", "_crc", "_before_sync", "_first_after_sync",
        "_file_crc", "_seg_start", "_seg_init", "resumed_from", "crc_errors", "rewinds",
        "busy",
    )

    def __init__(self, partial: Partial, fd: int) -> None:
        self.partial = partial
        self.fd = fd
        self.dualcam = partial.flow == "dualcam"
        #: Bytes accepted (flushed or pending).
        self.held = partial.held
        #: Bytes handed to the kernel.
        self.flushed = partial.held
        #: Bytes recorded durable in the store (or scheduled to be).
        self.checkpointed = partial.held
        self.pending = bytearray()
        total = partial.total
        if self.dualcam:
            self.limit = total * PACKET
            self.done_at = (total - 1) * PACKET + 1
            self._unit = PACKET
        else:
            self.limit = self.done_at = total
            self._unit = 0
        self._crc = 0
        self._before_sync: Optional[int] = None
        self._first_after_sync = True
        # Whole-file CRC (from 0, unreflected domain) of bytes [0, _seg_start), or
        # None when unknown (resumed or rewound: then computed from the file).
        self._file_crc: Optional[int] = 0 if partial.held == 0 else None
        self._seg_start = partial.held
        self._seg_init = 0
        self.resumed_from = partial.held
        self.crc_errors = 0
        self.rewinds = 0
        #: Serialises checkpoints, finalisation and closing of the spool file.
        self.busy: defer.Deferred = defer.succeed(None)

    # -- positions

    @property
    def complete(self) -> bool:
        """Every byte of the file is held."""
        return self.held >= self.done_at

    def position(self) -> int:
        """Where to RESUME from, in the flow's unit."""
        return self.held // PACKET + 1 if self.dualcam else self.held

    def offset_of(self, position: int) -> int:
        """The byte offset of a SYNC/RESUME position (a DualCam 0 means 1)."""
        return (max(position, 1) - 1) * PACKET if self.dualcam else position

    # -- the hot path

    def append(self, payload: memoryview, crc: int) -> bool:
        """Accept one DATA frame; False when its CRC is wrong (nothing is kept)."""
        n = len(payload)
        held = self.held
        if held + n > self.limit or (n < self._unit and held + n < self.done_at):
            self._size_error(n)
        if crc16(payload, self._crc) != crc:
            # The first frame after a SYNC may chain from the frame before it.
            if not (self._first_after_sync and self._before_sync is not None
                    and crc16(payload, self._before_sync) == crc):
                self.crc_errors += 1
                return False
            self._seg_init = self._before_sync
        self._first_after_sync = False
        self._crc = crc
        self.pending += payload
        self.held = held + n
        return True

    def take_run(self, buf: bytearray, view: memoryview, pos: int, end: int) -> tuple[int, int]:
        """Accept the DATA frames that follow one another in ``buf`` from ``pos``.

        The fast form of :meth:`append` for a run of frames, called by the
        decoder: one C CRC and one copy per frame, no other call. Returns the
        position after what it took and why it stopped: :data:`RUN_MORE`
        (anything but a complete DATA frame is next), :data:`RUN_BAD_CRC` (the
        frame it consumed failed its CRC), :data:`RUN_COMPLETE` (the file is
        whole) or :data:`RUN_SLOW` (the next frame is the first after a SYNC:
        :meth:`append` takes it, with its chaining rule).
        """
        if self._first_after_sync:
            return pos, RUN_SLOW
        pending = self.pending
        limit, done_at, unit = self.limit, self.done_at, self._unit
        held = self.held
        crc = self._crc
        status = RUN_MORE
        while end - pos >= 4:
            cmd, length = _HEADER(buf, pos)
            if cmd != 0x0004:
                break
            if not 3 <= length <= 1026:
                raise ProtocolError(f"DATA length {length} out of range", buf[pos : pos + 8])
            stop = pos + 4 + length
            if stop > end:
                break
            n = length - 2
            if held + n > limit or (n < unit and held + n < done_at):
                self.held, self._crc = held, crc
                self._size_error(n)
            payload = view[pos + 4 : stop - 2]
            frame_crc = (buf[stop - 2] << 8) | buf[stop - 1]
            pos = stop
            if crc16(payload, crc) != frame_crc:
                self.crc_errors += 1
                status = RUN_BAD_CRC
                break
            crc = frame_crc
            pending += payload
            held += n
            if held >= done_at:
                status = RUN_COMPLETE
                break
        self.held, self._crc = held, crc
        return pos, status

    def _size_error(self, n: int) -> None:
        if self.held + n > self.limit:
            raise ProtocolError(
                f"DATA of {n} bytes at offset {self.held} goes beyond the file's {self.limit} bytes", kind="size")
        raise ProtocolError(
            f"DualCam packet {self.held // PACKET + 1} has {n} bytes; only the last of"
            f" {self.partial.total} packets may be shorter than {PACKET}", kind="size")

    def flush(self) -> int:
        """Write pending bytes to the spool file; return how many."""
        pending = self.pending
        n = len(pending)
        if n:
            done = os.pwrite(self.fd, pending, self.flushed)
            while done < n:  # short writes happen only near a full disk
                with memoryview(pending) as view:
                    done += os.pwrite(self.fd, view[done:], self.flushed + done)
            self.flushed += n
            pending.clear()
        return n

    # -- SYNC

    def sync(self, offset: int) -> None:
        """Continue from ``offset`` (at or before :attr:`held`); the CRC chain restarts."""
        if offset == self.held:
            if self._file_crc is not None:
                length = offset - self._seg_start
                self._file_crc = crc16_combine(self._file_crc ^ self._seg_init, self._crc, length)
        else:
            self.rewind(offset)
        self._seg_start = offset
        self._seg_init = 0
        self._before_sync = self._crc if offset == self.held else None
        self._crc = 0
        self._first_after_sync = True

    def rewind(self, offset: int) -> None:
        """Drop everything from ``offset`` on (the device went back)."""
        self.rewinds += 1
        if offset >= self.flushed:
            del self.pending[offset - self.flushed:]
        else:
            self.pending.clear()
            os.ftruncate(self.fd, offset)
            self.flushed = offset
        self.held = offset
        self.checkpointed = min(self.checkpointed, offset)
        self._file_crc = None

    def file_crc(self) -> Optional[int]:
        """The whole file's CRC-16 from 0, if it could be followed frame by frame."""
        if self._file_crc is None:
            return None
        return crc16_combine(self._file_crc ^ self._seg_init, self._crc, self.held - self._seg_start)


class FileDigest:
    """What :func:`digest_file` found: size, SHA-256 and CRC-16 of a spool file."""

    __slots__ = ("size", "sha256", "crc")

    def __init__(self, size: int, sha256: str, crc: int) -> None:
        self.size = size
        self.sha256 = sha256
        self.crc = crc


def digest_file(fd: int, known_crc: Optional[int]) -> FileDigest:
    """Make a finished spool file durable and digest it (runs in a thread).

    ``fdatasync`` first, then one read pass for SHA-256 (and for the CRC too
    when the frame chain could not give it, after a resume or a rewind).
    """
    os.fdatasync(fd)
    sha = hashlib.sha256()
    crc = 0
    size = 0
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            break
        sha.update(chunk)
        if known_crc is None:
            crc = crc16(chunk, crc)
        offset += len(chunk)
    size = offset
    return FileDigest(size, sha.hexdigest(), crc if known_crc is None else known_crc)
