"""One TCP connection of an emulated camera: the device side of PROTOCOL.md.

The device speaks first (the init packet) and then only answers the
gateway. Every server frame and what the device does with it:

==================  ==========================================================
server frame        device
==================  ==========================================================
PATH REQUEST 0x0C   finish the current file; PATH 0x0D: next pending path+NUL
                    (``\\0`` alone when none)
METADATA REQ 0x0A   METADATA 0x0B of the named DualCam source or of the path
                    last offered; nothing if the firmware never answers
FILE REQUEST 0x08   finish the current file; START (DualCam: packet count,
                    crc 0; path: size, crc16 of the file); STATUS 0x11 if
                    the file is unknown or a fault says so; START and STATUS
                    in one write if a fault says so (the file is given up)
RESUME 0x02         SYNC to the position (DualCam 0 → 1; beyond the file →
                    the start) and stream DATA from it, CRC chain from 0;
                    ignored right after a file was given up
REPEAT INIT 00 09   finish the current file; a fresh init with what is left
CLOSE / COMPLETE    finish the current file; disconnect
==================  ==========================================================

"Finish the current file": it counts as delivered if its last stream reached
the end of the file.
"""

from __future__ import annotations

import random
import struct
from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from camgateway.wire import codec
from camgateway.wire.codec import DUALCAM_SOURCE_BITS, PACKET, Cmd, ProtocolError, ServerFrameDecoder
from camgateway.wire.status_codes import FILE_NOT_AVAILABLE
from camgateway.sim.camera import Camera
from camgateway.sim.frames import FileStream, FramePlan, PlanCache
from camgateway.sim.sender import Sender

__all__ = ["CameraProtocol"]

_u32 = struct.Struct(">I")
log = Logger()


class _Transfer:
    """The file named by the last FILE REQUEST."""

    __slots__ = ("index", "plan", "dualcam", "stream", "tainted")

    def __init__(self, index: int, plan: FramePlan, dualcam: bool) -> None:
        self.index = index
        self.plan = plan
        self.dualcam = dualcam
        self.stream: Optional[FileStream] = None
        self.tainted: set[int] = set()

    @property
    def reached_end(self) -> bool:
        """Every byte went out since the last SYNC (or there is none to send)."""
        if self.plan.size == 0:
            return True
        return self.stream is not None and self.stream.finished


class CameraProtocol(Protocol):
    """Plays one connection of ``camera``; ``closed`` fires when it ends."""

    def __init__(
        self,
        camera: Camera,
        clock: IReactorTime,
        *,
        plans: Optional[PlanCache] = None,
        idle_timeout: Optional[float] = 30.0,
        batch_frames: int = 32,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.camera = camera
        self.clock = clock
        self.plans = plans or PlanCache()
        self.idle_timeout = idle_timeout
        self.batch_frames = batch_frames
        self.rng = rng or random.Random(camera.spec.imei)
        #: Fires (with None) when the connection is gone.
        self.closed: Deferred[None] = Deferred()
        self.sender: Optional[Sender] = None
        self._decoder = ServerFrameDecoder()
        self._transfer: Optional[_Transfer] = None
        self._offered: Optional[int] = None
        #: The file just given up (START then STATUS), until the next request.
        self._given_up: Optional[int] = None
        self._ending = False
        self._idle: Optional[IDelayedCall] = None
        self._handlers: dict[int, Callable[[bytes], None]] = {
            Cmd.PATH_REQUEST: self._on_path_request,
            Cmd.METADATA_REQUEST: self._on_metadata_request,
            Cmd.FILE_REQUEST: self._on_file_request,
            Cmd.RESUME: self._on_resume,
            Cmd.REPEAT_INIT: self._on_repeat_init,
            0x0000: self._on_close,  # CLOSE
            0x0005: self._on_complete,  # COMPLETE
        }

    # -- connection events

    def connectionMade(self) -> None:
        spec = self.camera.spec
        result = self.camera.result
        result.connections += 1
        try:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        except Exception:
            pass  # not a TCP transport (tests)
        self.sender = Sender(
            self.transport,  # type: ignore[arg-type]
            self.clock,
            batch_frames=self.batch_frames,
            slow_bps=spec.slow_bps,
            segment_sizes=spec.segment_sizes,
            segment_delay=spec.segment_delay,
            rng=self.rng,
            on_write=self._wrote,
        )
        self.transport.registerProducer(self.sender, True)  # type: ignore[union-attr]
        self._touch()
        if spec.garbage:
            self._send(self._garbage())
        else:
            self._send_init()

    def dataReceived(self, data: bytes) -> None:
        if self._ending or (self.sender is not None and self.sender.closing):
            return
        self._touch()
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as e:
            if self.camera.spec.garbage:
                return  # whatever the gateway answers garbage with, wait for its close
            self._fail(f"undecodable server bytes: {e}", abort=True)
            return
        if self.camera.spec.garbage:
            if any(cmd == 0x0000 for cmd, _ in frames):
                self._on_close(b"")
            return
        for cmd, payload in frames:
            if self._ending:
                return
            handler = self._handlers.get(cmd)
            if handler is None:
                self._error(f"unknown server command 0x{cmd:04x} ({payload[:16].hex()})")
                continue
            handler(payload)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        dropped = self.sender is not None and self.sender.closing
        if self.sender is not None:
            self.sender.shutdown()
        if not (self._ending or dropped):
            self.camera.result.closed_by_peer += 1
        self._ending = True
        if self._transfer is not None:
            self._account(self._transfer)
        self._transfer = None
        self.closed.callback(None)

    # -- server frames

    def _on_path_request(self, payload: bytes) -> None:
        self._finish_current()
        self._given_up = None
        index = self.camera.next_path()
        self._offered = index
        self._send(codec.path(b"\0" if index is None else self.camera.file(index).wire_path))

    def _on_metadata_request(self, payload: bytes) -> None:
        result = self.camera.result
        result.metadata_requests += 1
        if payload:
            source = payload.decode("latin-1").lstrip("%")
            if source not in DUALCAM_SOURCE_BITS:
                self._error(f"metadata request for unknown source {payload!r}")
                return
            index = self.camera.find(source)
        elif self._transfer is not None and not self._transfer.dualcam:
            index = self._transfer.index
        else:
            index = self._offered
        if index is None or index not in self.camera.pending:
            self._error(f"metadata request for a file not offered ({payload!r})")
            return
        meta = self.camera.file(index).metadata
        if self.camera.spec.metadata_behaviour == "never" or meta is None:
            return
        result.metadata_sent += 1
        self._send(codec.metadata(meta))

    def _on_file_request(self, payload: bytes) -> None:
        self._finish_current()
        self._given_up = None
        name = payload.decode("utf-8", "replace")
        dualcam = len(name) == 7 and name.startswith("%") and name[1:] in DUALCAM_SOURCE_BITS
        identifier = name[1:] if dualcam else name[:-1] if name.endswith("\0") else name
        index = self.camera.find(identifier)
        if index is None or self.camera.file(index).is_dualcam != dualcam:
            self._error(f"file request for {payload!r}, which the camera does not offer")
            self._send(codec.status(FILE_NOT_AVAILABLE))
            return
        if self.camera.status_fault(index):
            self.camera.refused(index)
            self._send(codec.status(FILE_NOT_AVAILABLE))
            return
        plan = self.plans.get(self.camera.file(index).content)
        self.camera.result.starts += 1
        start = codec.start(plan.count, 0) if dualcam else codec.start(plan.size, plan.file_crc)
        if self.camera.status_after_start_fault(index):
            # As a real DualCam did: START, then in the same write a STATUS that gives the file up.
            self.camera.gave_up(index)
            self._given_up = index
            self._send(start + codec.status(self.camera.spec.status_after_start_code))
            return
        self._transfer = _Transfer(index, plan, dualcam)
        self._send(start)

    def _on_resume(self, payload: bytes) -> None:
        position = _u32.unpack(payload)[0] if len(payload) == 4 else -1
        self.camera.result.resumes.append(position)
        transfer = self._transfer
        if transfer is None and self._given_up is not None and position >= 0:
            return  # the gateway answered the START before it read the STATUS
        if transfer is None or position < 0:
            self._error(f"RESUME {payload.hex()} with no file requested" if transfer is None
                        else f"RESUME with a {len(payload)}-byte payload")
            return
        plan = transfer.plan
        if transfer.dualcam:
            packet = max(position, 1)
            if packet > plan.count + 1:
                self._error(f"RESUME {position} beyond the {plan.count} packets; SYNC 1")
                packet = 1
            offset, synced = (packet - 1) * PACKET, packet
        else:
            offset = position
            if offset > plan.size:
                self._error(f"RESUME {position} beyond the {plan.size} bytes; SYNC 0")
                offset = 0
            synced = offset
        assert self.sender is not None
        self.sender.stop_stream()
        self._account(transfer)
        self.camera.result.syncs.append(synced)
        self._send(codec.sync(synced))
        index = transfer.index
        spec = self.camera.spec
        # Without faults to apply, FileStream sends precomputed blocks (FramePlan.wire).
        corrupt = (lambda frame: self.camera.take_bad_crc(index, frame)) if spec.bad_crc_frames else None
        drop = (lambda frame: self.camera.take_drop(index, frame)) if spec.drop_after_frames is not None else None
        transfer.stream = FileStream(
            plan,
            offset,
            enhanced=self.camera.spec.enhanced_data and not transfer.dualcam,
            corrupt=corrupt,
            drop=drop,
            tainted=transfer.tainted,
        )
        self.sender.stream(transfer.stream)

    def _on_repeat_init(self, payload: bytes) -> None:
        self.camera.result.repeat_inits += 1
        self._finish_current()
        self._send_init()

    def _on_close(self, payload: bytes) -> None:
        self.camera.result.closes += 1
        self._finish_current()
        self._hang_up()

    def _on_complete(self, payload: bytes) -> None:
        if payload != b"\0\0\0\0":
            self._error(f"COMPLETE with payload {payload.hex()}")
        self.camera.result.completes += 1
        self._finish_current()
        self._hang_up()

    # -- helpers

    def _finish_current(self) -> None:
        transfer, self._transfer = self._transfer, None
        if transfer is None:
            return
        assert self.sender is not None
        self.sender.stop_stream()
        self._account(transfer)
        if not transfer.reached_end:
            return
        if transfer.tainted:
            frames = ", ".join(str(i) for i in sorted(transfer.tainted))
            self._error(f"{self.camera.file(transfer.index).identifier}: frame(s) {frames} sent "
                        f"with a bad CRC were never asked for again")
        self.camera.delivered(transfer.index)

    def _account(self, transfer: _Transfer) -> None:
        if transfer.stream is not None:
            self.camera.result.data_bytes_sent += transfer.stream.data_bytes
            transfer.stream.data_bytes = 0

    def _send_init(self) -> None:
        spec = self.camera.spec
        self._offered = None
        self._given_up = None
        self._send(codec.init_packet(spec.protocol_id, spec.imei, self.camera.settings()))

    def _garbage(self) -> bytes:
        # Never starts with 00 00, so it cannot pass for an init packet.
        return bytes([self.rng.randint(1, 255)]) + self.rng.randbytes(self.rng.randint(15, 63))

    def _send(self, data: bytes) -> None:
        assert self.sender is not None
        self.sender.write(data)

    def _wrote(self, n: int) -> None:
        self.camera.result.bytes_sent += n
        self._touch()

    def _touch(self) -> None:
        if self.idle_timeout is None or self._ending:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        else:
            self._idle = self.clock.callLater(self.idle_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._idle = None
        if self.camera.spec.garbage:
            self._fail(f"gateway kept the connection open {self.idle_timeout}s after garbage", abort=True)
        else:
            self._fail(f"gateway silent for {self.idle_timeout}s", abort=True)

    def _error(self, message: str) -> None:
        self.camera.result.errors.append(message)
        log.warn("camera {imei}: {message}", imei=self.camera.spec.imei, message=message)

    def _fail(self, message: str, abort: bool) -> None:
        self._error(message)
        self._finish_current()
        self._ending = True
        assert self.sender is not None
        if abort:
            self.sender.abort()
        else:
            self.sender.close()

    def _hang_up(self) -> None:
        self._ending = True
        assert self.sender is not None
        self.sender.close()
