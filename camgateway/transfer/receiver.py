"""One file being received: position, CRC chain and spool writes.

This is the DATA hot path. :meth:`Transfer.take_run` (a run of frames) and
:meth:`Transfer.append` (one frame) do a bounds check, one C CRC over a view
of the decoder's buffer and one copy of the payload into a pending
:class:`bytearray`. Nothing is logged and no Deferred is made per frame.

Writing leaves the reactor thread: the connection's write policy
(:mod:`camgateway.transfer.writes`) swaps the buffer out (:meth:`take_pending`)
and a pool thread writes it with one ``pwrite`` and feeds it to the file's
SHA-256 (:meth:`write_chunk`; both release the GIL), so a finished file's
digest needs no second read. A few pending bytes may be written inline
(:meth:`flush`, at most :data:`INLINE_WRITE_MAX`).

Positions: DualCam counts 1-based packets of :data:`~camgateway.wire.codec.PACKET` bytes, the path flow counts
bytes from 0 (PROTOCOL.md section 4). Internally everything is bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any, Optional

from twisted.internet import defer

from camgateway.wire.codec import (CRC_SIZE, DATA_FRAME, DATA_LENGTH_MAX, DATA_LENGTH_MIN, HEADER_SIZE, PACKET,
                                   ProtocolError)
from camgateway.wire.crc import crc16, crc16_combine
from camgateway.wire.media import HEAD  # (how much of a file's start Transfer.head keeps: what names its type)
from camgateway.storage.records import Partial

__all__ = ["Transfer", "FileDigest", "digest_file", "RUN_MORE", "RUN_BAD_CRC", "RUN_COMPLETE",
           "RUN_SLOW", "INLINE_WRITE_MAX"]

#: At most this many pending bytes are written without a write step of their
#: own: a slow camera's on the reactor thread, and the last of a file (when no
#: write is in flight) by the thread that flushes it, just before the flush.
INLINE_WRITE_MAX = 64 * 1024
RUN_MORE, RUN_BAD_CRC, RUN_COMPLETE, RUN_SLOW = 0, 1, 2, 3
_FRAME = DATA_FRAME
_BLOCK_MIN = 4  # frames worth taking as one block
_BLOCK_MAX = 128
#: Where each payload lies in a block of whole frames.
_PAYLOADS = tuple(slice(j * _FRAME + HEADER_SIZE, j * _FRAME + HEADER_SIZE + PACKET) for j in range(_BLOCK_MAX))
_CRC_FIELDS: dict[int, Any] = {}


def _crc_fields(k: int) -> Any:
    """``unpack_from(buf, pos)`` of the CRC fields of k whole frames at ``pos``."""
    unpack = _CRC_FIELDS.get(k)
    if unpack is None:
        unpack = _CRC_FIELDS[k] = struct.Struct(">" + f"{_FRAME - CRC_SIZE}xH" * k).unpack_from
    return unpack


_HEADER = struct.Struct(">HH").unpack_from


class Transfer:
    """The receiving state of one file, bound to an open spool file."""

    __slots__ = (
        "partial", "fd", "dualcam", "held", "flushed", "checkpointed", "pending",
        "limit", "done_at", "_unit", "_crc", "_before_sync", "_first_after_sync",
        "_file_crc", "_seg_start", "_seg_init", "resumed_from", "crc_errors", "rewinds",
        "busy", "writing", "write_error", "pending_since", "syncing", "_truncate", "_sha",
        "_hashed", "fd_closed", "recorded", "head",
    )

    def __init__(self, partial: Partial, fd: int) -> None:
        self.partial = partial
        self.fd = fd
        #: The spool file is closed (set once; never close :attr:`fd` again: its
        #: number may be another file's by then). See :meth:`close`.
        self.fd_closed = False
        #: The partial is in the store (or its record is on its way there). A
        #: new file's is made with its first write before the end, or its
        #: first checkpoint (camgateway.transfer.lifecycle): a photo received in one go
        #: never needs one.
        self.recorded = True
        #: The spool file's first HEAD bytes, once a write put them there
        #: (None until then, or after a truncation into them): the disk sink
        #: picks the extension from them without reading the file again.
        self.head: Optional[bytes] = None
        self.dualcam = partial.flow == "dualcam"
        #: Bytes accepted (flushed or pending).
        self.held = partial.held
        #: Bytes handed to the kernel, or to a write in flight.
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
        #: Serialises writes, checkpoints, finalisation and closing of the spool file.
        self.busy: defer.Deferred = defer.succeed(None)
        #: A write is in flight (in a pool thread).
        self.writing = False
        #: Why a write failed: nothing written after it counts, the file is not finished.
        self.write_error: Optional[BaseException] = None
        #: When bytes started waiting in :attr:`pending` (None: none, or not noted yet).
        self.pending_since: Optional[float] = None
        #: The checkpoint in flight (its fdatasync runs beside later writes).
        self.syncing: Optional[defer.Deferred] = None
        self._truncate: Optional[int] = None
        # SHA-256 of bytes [0, _hashed), fed by the writes; None for a resumed
        # file, or once a rewind went behind what it covers: then the file is
        # read again at the end (as its CRC is, see file_crc).
        self._sha: Optional[Any] = hashlib.sha256() if partial.held == 0 else None
        self._hashed = 0

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
        length_min, length_max = DATA_LENGTH_MIN, DATA_LENGTH_MAX
        status = RUN_MORE
        # Blocks of whole DATA frames of a packet each (header ``00 04 04 02``)
        # that do not end the file: a few C calls per block, none per frame in
        # Python. The headers are checked by strided slices, the k CRC fields read by one struct, and each
        # frame's CRC (chained from the field before it) computed by ``map``;
        # the block is taken only if all of them match. Any doubt, and the
        # frame-by-frame loop below decides, with the same result.
        while True:
            k = min((end - pos) // _FRAME, (done_at - 1 - held) // PACKET, _BLOCK_MAX)
            if k < _BLOCK_MIN:
                break
            stop = pos + k * _FRAME
            if not (buf[pos + 3 : stop : _FRAME].count(2) == k and buf[pos + 1 : stop : _FRAME].count(4) == k
                    and buf[pos + 2 : stop : _FRAME].count(4) == k and buf[pos : stop : _FRAME].count(0) == k):
                break
            fields = _crc_fields(k)(buf, pos)
            block = view[pos:stop]
            payloads = list(map(block.__getitem__, _PAYLOADS[:k]))
            if tuple(map(crc16, payloads, (crc,) + fields[:-1])) != fields:
                break
            pending += b"".join(payloads)
            held += k * PACKET
            crc = fields[-1]
            pos = stop
        while end - pos >= 4:
            cmd, length = _HEADER(buf, pos)
            if cmd != 0x0004:
                break
            if not length_min <= length <= length_max:
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

    # -- writing (see the module docstring)

    def take_pending(self) -> tuple[bytearray, int, Optional[int]]:
        """Swap the pending bytes out for a write: ``(buffer, offset, truncate_to)``.

        The caller runs :meth:`write_chunk` with them (in a thread, one at a
        time per file, in order) and then :meth:`written`.
        """
        buf = self.pending
        self.pending = bytearray()
        offset, truncate = self.flushed, self._truncate
        self._truncate = None
        self.flushed = offset + len(buf)
        self.pending_since = None
        self.writing = True
        return buf, offset, truncate

    def write_chunk(self, buf: bytearray, offset: int, truncate: Optional[int]) -> None:
        """Truncate if asked, write ``buf`` at ``offset`` and hash it (blocking).

        An OSError is kept in :attr:`write_error` (and raised): later steps
        of this file see it and neither checkpoint nor finish it.
        """
        try:
            fd = self.fd
            if truncate is not None:
                if truncate < HEAD:
                    self.head = None
                os.ftruncate(fd, truncate)
            n = len(buf)
            if n:
                done = os.pwrite(fd, buf, offset)
                while done < n:  # short writes happen only near a full disk
                    with memoryview(buf) as view:
                        done += os.pwrite(fd, view[done:], offset + done)
                if offset == 0 and n >= HEAD:
                    self.head = bytes(buf[:HEAD])
            sha = self._sha
            if sha is not None:
                if offset != self._hashed:  # rewound behind the hash: digest by reading
                    self._sha = None
                    return
                if n:
                    sha.update(buf)
                self._hashed = offset + n
        except OSError as e:
            if self.write_error is None:
                self.write_error = e
            raise

    def close(self) -> None:
        """Close the spool file, once (on any thread; the file's steps are over)."""
        if not self.fd_closed:
            self.fd_closed = True
            os.close(self.fd)

    def close_if_digested(self) -> None:
        """Close the spool file now if its digest came from the writes (no reading it again).

        Run on the flush's thread once a finished file is durable, so that the
        close, a system call that hands the GIL over and back, is not the
        reactor's.
        """
        if self.digest() is not None:
            self.close()

    def written(self, buf: bytearray) -> None:
        """The write of ``buf`` is over (either way): let its memory go."""
        buf.clear()
        self.writing = False

    def flush(self) -> int:
        """Write pending bytes now, on this thread; return how many.

        For a few KiB (:data:`INLINE_WRITE_MAX`: a slow camera's); never
        while a write is in flight.
        """
        if self.writing:
            raise AssertionError("flush() while a write is in flight")
        buf, offset, truncate = self.take_pending()
        n = len(buf)
        try:
            self.write_chunk(buf, offset, truncate)
        finally:
            self.written(buf)
        return n

    @property
    def needs_truncate(self) -> bool:
        """A rewind went behind what was written: the next write truncates first."""
        return self._truncate is not None

    def digest(self) -> Optional["FileDigest"]:
        """The finished file's digest from the writes, if they could follow it."""
        crc = self.file_crc()
        if self._sha is None or crc is None or self._hashed != self.held or self.flushed != self.held:
            return None
        return FileDigest(self.held, self._sha.hexdigest(), crc)

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
        else:  # the file is truncated by the next write, after any in flight
            self.pending.clear()
            self._truncate = offset if self._truncate is None else min(self._truncate, offset)
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
    """Digest a finished spool file by reading it (runs in a thread).

    The fallback of :meth:`Transfer.digest`, when the writes could not follow
    the file (a rewind behind them): one read pass for SHA-256, and for the
    CRC too when the frame chain could not give it.
    """
    sha = hashlib.sha256()
    crc = 0
    size = 0
    while True:
        chunk = os.pread(fd, 1 << 20, size)
        if not chunk:
            break
        sha.update(chunk)
        if known_crc is None:
            crc = crc16(chunk, crc)
        size += len(chunk)
    return FileDigest(size, sha.hexdigest(), crc if known_crc is None else known_crc)
