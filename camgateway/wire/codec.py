"""The wire format of the Teltonika camera file-transfer protocol.

PROTOCOL.md sections 1-4. Every size, limit and settings bit of the
protocol is defined here, once; the gateway and the emulator import them.
Two halves:

* encoders for every frame either side sends (the gateway uses the server
  half, the emulator in :mod:`camgateway.sim` the device half);
* :class:`FrameDecoder`, an incremental parser of the device's byte stream
  that copes with any TCP segmentation, enforces every length limit before it
  buffers a frame, and hands each frame to a receiver without copying DATA
  payloads (they are passed as :class:`memoryview` slices of its buffer).

A DATA frame's CRC is then one C call over that slice (:mod:`camgateway.wire.crc`).
"""

from __future__ import annotations

import enum
import struct
from typing import Optional, Protocol


__all__ = [
    "Cmd",
    "ProtocolError",
    "FrameReceiver",
    "FrameDecoder",
    "ServerFrameDecoder",
    "HEADER_SIZE",
    "CRC_SIZE",
    "INIT_SIZE",
    "init_imei",
    "DATA_MAX",
    "PACKET",
    "DATA_LENGTH_MIN",
    "DATA_LENGTH_MAX",
    "DATA_FRAME",
    "ENHANCED_OVERHEAD",
    "PATH_MAX",
    "METADATA_MAX",
    "SYNC_MARK",
    "PATH_FILE_BIT",
    "DUALCAM_SOURCES",
    "DUALCAM_SOURCE_BITS",
    "ANY_DUALCAM_BITS",
    "ALWAYS_SET_BITS",
    "uses_path_flow",
]


class Cmd(enum.IntEnum):
    """Command ids. Device and server reuse some numbers for different things."""

    INIT = 0x0000  # device: init packet; server: CLOSE
    START = 0x0001
    RESUME = 0x0002
    SYNC = 0x0003
    DATA = 0x0004
    STATUS = 0x0005  # device: error status; server: COMPLETE
    FILE_REQUEST = 0x0008
    REPEAT_INIT = 0x0009
    METADATA_REQUEST = 0x000A
    METADATA = 0x000B
    PATH_REQUEST = 0x000C
    PATH = 0x000D
    ENHANCED_DATA = 0x000E


_u16 = struct.Struct(">H")
_header = struct.Struct(">HH")
_u32 = struct.Struct(">I")
_init = struct.Struct(">HHQI")
_frame_u32 = struct.Struct(">HHI")

# ---------------------------------------------------------------------------
# Sizes and limits (PROTOCOL.md sections 1-2)

#: Every frame but the init packet and REPEAT INIT starts with command u16, length u16.
HEADER_SIZE = _header.size
#: The CRC-16 that ends a DATA or ENHANCED DATA frame.
CRC_SIZE = 2
#: The init packet: ``0x0000 | protocol_id u16 | imei u64 | settings u32``, no length field.
INIT_SIZE = _init.size
#: The most data one DATA frame carries.
DATA_MAX = 1024
#: A DualCam file's packet: every DATA frame but the last carries exactly this many bytes.
PACKET = DATA_MAX
#: A DATA frame's length field: at least one byte of data, at most DATA_MAX, and the CRC.
DATA_LENGTH_MIN = 1 + CRC_SIZE
DATA_LENGTH_MAX = DATA_MAX + CRC_SIZE
#: A whole DualCam DATA frame: command, length, a packet, CRC.
DATA_FRAME = HEADER_SIZE + PACKET + CRC_SIZE
#: What an ENHANCED DATA payload holds besides its data: the u32 byte offset and the CRC.
ENHANCED_OVERHEAD = 4 + CRC_SIZE
PATH_MAX = 512
METADATA_MAX = 1024
#: A SYNC frame's header: what the decoder scans for while discarding.
SYNC_MARK = b"\x00\x03\x00\x04"

# (minimum, maximum) payload length of every frame a device may send.
_LENGTHS: dict[int, tuple[int, int]] = {
    Cmd.START: (6, 6),
    Cmd.SYNC: (4, 4),
    Cmd.DATA: (DATA_LENGTH_MIN, DATA_LENGTH_MAX),
    Cmd.STATUS: (4, 4),
    Cmd.METADATA: (0, METADATA_MAX),
    Cmd.PATH: (1, PATH_MAX),
    Cmd.ENHANCED_DATA: (1 + ENHANCED_OVERHEAD, DATA_MAX + ENHANCED_OVERHEAD),
}

# ---------------------------------------------------------------------------
# The init packet's settings bits (PROTOCOL.md section 4)

#: Bit 25: a file is ready; ask for its path with FILE PATH REQUEST (0x000C).
PATH_FILE_BIT = 0x02000000
#: The settings bit announcing a pending file of each DualCam source (bits 26-29).
DUALCAM_SOURCE_BITS: dict[str, int] = {"photof": 0x04000000, "photor": 0x08000000,
                                       "videof": 0x10000000, "videor": 0x20000000}
#: The DualCam sources, in the order of their settings bits.
DUALCAM_SOURCES: tuple[str, ...] = tuple(DUALCAM_SOURCE_BITS)
#: Any DualCam source pending (bits 26-29).
ANY_DUALCAM_BITS = sum(DUALCAM_SOURCE_BITS.values())
#: Bits 30 and 10, which real devices always set (and the gateway ignores).
ALWAYS_SET_BITS = 0x40000400


def uses_path_flow(protocol_id: int, settings: int) -> bool:
    """Whether files are offered by path (0x000C/0x000D), not as DualCam sources (mode ``auto``).

    Bit 25 says so, and so does any DualCam bit from firmware with protocol
    id 6 or more (which offers every file by path).
    """
    return bool(settings & PATH_FILE_BIT) or (protocol_id >= 6 and bool(settings & ANY_DUALCAM_BITS))


class ProtocolError(Exception):
    """The peer broke the protocol. ``offending`` holds the bytes at fault.

    ``kind`` is a short label for metrics: ``length``, ``unknown_command``,
    ``unexpected`` (a frame the state does not allow), ``size`` (data beyond
    the announced file) or ``identity`` (a changed IMEI).
    """

    def __init__(self, message: str, offending: bytes | bytearray | memoryview = b"", kind: str = "length") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.offending = bytes(offending[:48])

    def __str__(self) -> str:
        if self.offending:
            return f"{self.message} (bytes: {self.offending.hex(' ')})"
        return self.message


# ---------------------------------------------------------------------------
# Encoders: server -> device


def close() -> bytes:
    """CLOSE ``0000 0000``: the session is over."""
    return b"\x00\x00\x00\x00"


def complete() -> bytes:
    """COMPLETE ``0005 0004 00000000``, for sessions that never sent REPEAT INIT."""
    return _frame_u32.pack(Cmd.STATUS, 4, 0)


def resume(position: int) -> bytes:
    """RESUME from ``position`` (a 1-based packet for DualCam, a byte offset otherwise)."""
    return _frame_u32.pack(Cmd.RESUME, 4, position)


def repeat_init() -> bytes:
    """REPEAT INIT: the bare two bytes ``00 09`` (PROTOCOL.md section 1)."""
    return b"\x00\x09"


def file_request(identifier: bytes) -> bytes:
    """FILE REQUEST for a DualCam source (``b"%photof"``) or a device path."""
    return _u16.pack(Cmd.FILE_REQUEST) + _u16.pack(len(identifier)) + identifier


def metadata_request(identifier: bytes = b"") -> bytes:
    """METADATA REQUEST: DualCam names the source, path-flow cameras send none."""
    return _u16.pack(Cmd.METADATA_REQUEST) + _u16.pack(len(identifier)) + identifier


def path_request() -> bytes:
    """FILE PATH REQUEST ``000C 0002 0000``."""
    return b"\x00\x0c\x00\x02\x00\x00"


# ---------------------------------------------------------------------------
# Encoders: device -> server (used by the emulator and the tests)


def init_imei(data: bytes) -> Optional[int]:
    """The IMEI of the init packet ``data`` starts with (at least :data:`INIT_SIZE` bytes), or None
    if it starts with something else (which the decoder will call an error)."""
    cmd, _, imei, _ = _init.unpack_from(data)
    return imei if cmd == 0x0000 else None


def init_packet(protocol_id: int, imei: int, settings: int) -> bytes:
    """The 16-byte init packet."""
    return _init.pack(0, protocol_id, imei, settings)


def start(total: int, crc: int = 0) -> bytes:
    """START: file size in bytes (path flow) or packet count (DualCam), and CRC."""
    return _u16.pack(Cmd.START) + b"\x00\x06" + _u32.pack(total) + _u16.pack(crc)


def sync(position: int) -> bytes:
    """SYNC: the position the next DATA starts at."""
    return _frame_u32.pack(Cmd.SYNC, 4, position)


def data(payload: bytes, crc: int) -> bytes:
    """DATA: up to 1024 bytes and their chained CRC."""
    return _u16.pack(Cmd.DATA) + _u16.pack(len(payload) + CRC_SIZE) + payload + _u16.pack(crc)


def enhanced_data(offset: int, payload: bytes, crc: int) -> bytes:
    """ENHANCED DATA (0x000E): byte offset, data, chained CRC."""
    return (
        _u16.pack(Cmd.ENHANCED_DATA)
        + _u16.pack(len(payload) + ENHANCED_OVERHEAD)
        + _u32.pack(offset)
        + payload
        + _u16.pack(crc)
    )


def status(code: int) -> bytes:
    """Device STATUS (an error code, PROTOCOL.md section 7)."""
    return _frame_u32.pack(Cmd.STATUS, 4, code)


def metadata(payload: bytes) -> bytes:
    """METADATA response."""
    return _u16.pack(Cmd.METADATA) + _u16.pack(len(payload)) + payload


def path(payload: bytes) -> bytes:
    """FILE PATH response (``b"\\0"`` alone means no file)."""
    return _u16.pack(Cmd.PATH) + _u16.pack(len(payload)) + payload


# ---------------------------------------------------------------------------
# Decoding the device's stream


class FrameReceiver(Protocol):
    """What :class:`FrameDecoder` calls, once per frame, in stream order.

    ``payload`` is a view into the decoder's buffer,
    valid only during the call: a receiver copies what it keeps.
    Any method may raise :class:`ProtocolError`.
    """

    def init(self, protocol_id: int, imei: int, settings: int) -> None: ...

    def start(self, total: int, crc: int) -> None: ...

    def sync(self, position: int) -> None: ...

    def data(self, payload: memoryview, crc: int) -> None: ...

    def enhanced(self, offset: int, payload: memoryview, crc: int) -> None: ...

    def status(self, code: int) -> None: ...

    def metadata(self, payload: bytes) -> None: ...

    def path(self, payload: bytes) -> None: ...

    def batch_end(self) -> None:
        """Every complete frame of one read has been delivered."""

    # Optional: ``runner()`` returns a callable ``(buf, view, pos, end) ->
    # (pos, status)`` taking a run of DATA frames at once (or None), and
    # ``run_ended(status)`` hears why a run stopped (1 bad CRC, 2 complete).


def _plausible_header(buf: bytearray, i: int) -> bool:
    """Whether the 4 bytes at ``i`` could start a frame that follows a SYNC."""
    cmd = (buf[i] << 8) | buf[i + 1]
    limits = _LENGTHS.get(cmd)
    if limits is None or cmd in (Cmd.METADATA, Cmd.PATH, Cmd.START):
        return False
    length = (buf[i + 2] << 8) | buf[i + 3]
    return limits[0] <= length <= limits[1]


class FrameDecoder:
    """Incremental parser of the device -> server stream.

    Data is appended to one :class:`bytearray` and consumed with ``del`` once
    per :meth:`feed`, so a frame arriving in many small reads is never
    re-concatenated. A header is validated (command known, length within
    limits) before its payload is waited for.

    After a bad CRC the session calls :meth:`discard_until_sync`: everything is
    dropped until the bytes ``00 03 00 04`` of a SYNC followed by a plausible
    frame header, and that SYNC is delivered (PROTOCOL.md section 5.6).
    """

    __slots__ = ("_receiver", "_buf", "discarding", "stopped", "discarded", "_sync_limit")

    def __init__(self, receiver: FrameReceiver) -> None:
        self._receiver = receiver
        self._buf = bytearray()
        #: True while dropping bytes until a SYNC.
        self.discarding = False
        #: Set by :meth:`stop`; later input is ignored.
        self.stopped = False
        #: Bytes dropped while discarding (for logs and metrics).
        self.discarded = 0
        self._sync_limit = 0xFFFFFFFF

    def discard_until_sync(self, limit: int = 0xFFFFFFFF) -> None:
        """Drop everything up to the next SYNC frame.

        A SYNC mark whose position is beyond ``limit`` (the position the
        gateway asked for: a device never SYNCs past it) is taken for data
        that happens to look like a SYNC and is skipped too.
        """
        self.discarding = True
        self._sync_limit = limit

    def stop(self) -> None:
        """Ignore the rest of this read and everything after it."""
        self.stopped = True
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> None:
        """Parse ``chunk`` and deliver every frame it completes."""
        if self.stopped:
            return
        buf = self._buf
        buf += chunk
        receiver = self._receiver
        on_data = receiver.data
        runner = getattr(receiver, "runner", None)
        header = _header.unpack_from
        length_min, length_max = DATA_LENGTH_MIN, DATA_LENGTH_MAX
        end = len(buf)
        pos = 0
        view = memoryview(buf)
        ok = False
        try:
            while not self.stopped:
                run = runner() if runner is not None and not self.discarding else None
                if run is not None:  # a run of DATA frames, taken in one call
                    pos, status = run(buf, view, pos, end)
                    if status == 1 or status == 2:  # bad CRC, file complete
                        receiver.run_ended(status)  # type: ignore[attr-defined]  # comes with runner()
                        continue
                if end - pos >= 4 and not self.discarding:
                    cmd, length = header(buf, pos)
                    if cmd == 0x0004:  # DATA: the hot path, checked first
                        if not length_min <= length <= length_max:
                            raise ProtocolError(f"DATA length {length} out of range", buf[pos : pos + 8])
                        stop = pos + 4 + length
                        if stop > end:
                            break
                        on_data(view[pos + 4 : stop - 2], (buf[stop - 2] << 8) | buf[stop - 1])
                        pos = stop
                        continue
                if self.discarding:
                    i = buf.find(SYNC_MARK, pos)
                    if i < 0:
                        keep = max(pos, end - 3)
                        self.discarded += keep - pos
                        pos = keep
                        break
                    if end - i < 12:
                        self.discarded += i - pos
                        pos = i
                        break
                    if (not _plausible_header(buf, i + 8)
                            or _u32.unpack_from(buf, i + 4)[0] > self._sync_limit):
                        self.discarded += i + 1 - pos
                        pos = i + 1
                        continue
                    self.discarded += i - pos
                    self.discarding = False
                    pos = i + 8
                    receiver.sync(_u32.unpack_from(buf, i + 4)[0])
                    continue
                if end - pos < 4:
                    break
                cmd = (buf[pos] << 8) | buf[pos + 1]
                if cmd == 0x0000:
                    if end - pos < INIT_SIZE:
                        break
                    _, protocol_id, imei, settings = _init.unpack_from(buf, pos)
                    pos += INIT_SIZE
                    receiver.init(protocol_id, imei, settings)
                    continue
                limits = _LENGTHS.get(cmd)
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                if limits is None:
                    raise ProtocolError(f"unknown command 0x{cmd:04x}", buf[pos : pos + 16], "unknown_command")
                if not limits[0] <= length <= limits[1]:
                    name = Cmd(cmd).name
                    raise ProtocolError(
                        f"{name} length {length} outside {limits[0]}..{limits[1]}",
                        buf[pos : pos + 16],
                    )
                stop = pos + 4 + length
                if stop > end:
                    break
                start = pos + 4
                pos = stop
                if cmd == 0x0003:
                    receiver.sync(_u32.unpack_from(buf, start)[0])
                elif cmd == 0x000E:
                    receiver.enhanced(
                        _u32.unpack_from(buf, start)[0],
                        view[start + 4 : stop - 2],
                        (buf[stop - 2] << 8) | buf[stop - 1],
                    )
                elif cmd == 0x0001:
                    receiver.start(_u32.unpack_from(buf, start)[0], _u16.unpack_from(buf, start + 4)[0])
                elif cmd == 0x0005:
                    receiver.status(_u32.unpack_from(buf, start)[0])
                elif cmd == 0x000B:
                    receiver.metadata(bytes(buf[start:stop]))
                else:  # PATH
                    receiver.path(bytes(buf[start:stop]))
            ok = True
        finally:
            view.release()
            if ok and not self.stopped:
                if pos:
                    del buf[:pos]
            else:
                # After an error the session is over; a view may still be
                # referenced by the traceback, so drop the buffers instead.
                self.stopped = True
                self._buf = bytearray()
        receiver.batch_end()


class ServerFrameDecoder:
    """Incremental parser of the server -> device stream (for the emulator).

    Yields ``(cmd, payload)`` tuples; REPEAT INIT is the bare ``00 09``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        """Add ``chunk`` and return the frames it completes."""
        buf = self._buf
        buf += chunk
        frames: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            cmd = (buf[pos] << 8) | buf[pos + 1]
            if cmd == Cmd.REPEAT_INIT:
                frames.append((cmd, b""))
                pos += 2
                continue
            if end - pos < 4:
                break
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            if length > PATH_MAX:
                raise ProtocolError(f"server frame 0x{cmd:04x} length {length} too long", buf[pos : pos + 16])
            if end - pos - 4 < length:
                break
            frames.append((cmd, bytes(buf[pos + 4 : pos + 4 + length])))
            pos += 4 + length
        del buf[:pos]
        return frames
