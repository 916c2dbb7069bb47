"""The camera session: the protocol's state machine, one per connection.

Every transition is listed in :data:`TRANSITIONS`, read as a table: in this
state, on this input, run this handler, which returns one of these states.
Anything else is a protocol error. The DATA frame skips the table lookup (it
is the hot path) but follows the rows written for it.

The session never blocks: opening a transfer (store look-up), checkpoints and
finishing a file (fsync, digest, sinks) are Deferreds whose results come back
as inputs of the table (``prepared``, ``stored``...).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from camgateway.wire import codec
from camgateway.wire.codec import ProtocolError
from camgateway.base.deferreds import after
from camgateway.transfer.lifecycle import FileOffer, checkpoint, release_transfer, write_pending
from camgateway.base.health import SPOOL
from camgateway.session.leasing import instance_of
from camgateway.wire.metadata import decode_metadata
from camgateway.session.steps import TransferSteps
from camgateway.perf.slow_reads import READ_WAIT, SlowReads
from camgateway.session.states import S, State
from camgateway.wire.status_codes import status_meaning
from camgateway.transfer.receiver import (FLUSH_AGE, INLINE_WRITE_MAX, PENDING_MAX, TRICKLE_AGE, TRICKLE_BYTES, WRITE_MIN,
                                 Transfer)

if TYPE_CHECKING:
    from camgateway.runtime.context import Services

__all__ = ["State", "Session", "TRANSITIONS", "Link"]

log = Logger(namespace="camgateway.session.machine")

PATH_BIT = 0x02000000
DUALCAM_BITS = {"photof": 0x04000000, "photor": 0x08000000, "videof": 0x10000000, "videor": 0x20000000}
ANY_DUALCAM = 0x3C000000

_FILE_STATES = {S.AWAIT_METADATA, S.AWAIT_START, S.PREPARING, S.AWAIT_SYNC, S.RECEIVING, S.DISCARDING}

#: (state, input) -> (handler, states the handler may return)
TRANSITIONS: dict[tuple[State, str], tuple[str, frozenset[State]]] = {}


def _row(states: set[State] | State, inp: str, handler: str, *targets: State) -> None:
    for state in states if isinstance(states, set) else {states}:
        TRANSITIONS[(state, inp)] = (handler, frozenset(targets))


_NEXT_FILE = (S.AWAIT_PATH, S.AWAIT_METADATA, S.AWAIT_START, S.AWAIT_INIT, S.CLOSED)
_row(S.AWAIT_INIT, "init", "_on_init", S.LEASING, *_NEXT_FILE)
_row(S.LEASING, "leased", "_on_leased", *_NEXT_FILE)
_row(S.LEASING, "lease_refused", "_on_lease_refused", S.CLOSED)
_row(S.AWAIT_PATH, "path", "_on_path", S.AWAIT_METADATA, S.AWAIT_START, S.AWAIT_INIT, S.CLOSED)
_row(S.AWAIT_METADATA, "metadata", "_on_metadata", S.AWAIT_START)
_row(S.AWAIT_METADATA, "metadata_timeout", "_on_metadata_timeout", S.AWAIT_START)
_row(S.AWAIT_START, "metadata", "_on_late_metadata", S.AWAIT_START)
_row(S.AWAIT_START, "start", "_on_start", S.PREPARING, *_NEXT_FILE)
_row(S.PREPARING, "prepared", "_on_prepared", S.AWAIT_SYNC)
_row(S.PREPARING, "prepare_failed", "_on_prepare_failed", *_NEXT_FILE)
_row({S.AWAIT_SYNC, S.RECEIVING, S.DISCARDING}, "sync", "_on_sync", S.RECEIVING, S.DISCARDING, S.CLOSED)
_row(S.RECEIVING, "data", "(hot path in data())", S.RECEIVING, S.DISCARDING, S.STORING)
_row(S.RECEIVING, "enhanced", "_on_enhanced", S.RECEIVING, S.DISCARDING, S.STORING, S.CLOSED)
_row(S.RECEIVING, "bad_crc", "_on_bad_crc", S.DISCARDING, S.CLOSED)
_row(S.RECEIVING, "complete", "_on_complete", S.STORING)
_row({S.AWAIT_SYNC, S.DISCARDING}, "resume_timer", "_on_resume_timer", S.AWAIT_SYNC, S.DISCARDING, S.CLOSED)
_row(_FILE_STATES, "status", "_on_file_status", *_NEXT_FILE)
_row({S.AWAIT_INIT, S.AWAIT_PATH}, "status", "_on_idle_status", S.CLOSED)
_row(S.STORING, "stored", "_on_stored", S.AWAIT_INIT)
_row(S.STORING, "store_failed", "_on_store_failed", S.CLOSED)
_row({S.AWAIT_INIT, S.AWAIT_PATH, S.AWAIT_START, S.AWAIT_SYNC}, "step_timeout", "_on_step_timeout", S.CLOSED)


class Link:
    """What a session needs of its connection (the Protocol provides it)."""

    peer: str = "?"

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause(self) -> None:
        """Stop reading from the camera (backpressure)."""

    def resume(self) -> None:
        """Read from the camera again."""

    def set_read_mark(self, nbytes: int) -> bool:
        """Be read only once ``nbytes`` wait (:mod:`camgateway.perf.slow_reads`); False if the link cannot."""
        return False


class Session(TransferSteps):
    """The protocol state machine of one camera connection.

    Its frame methods (``init``, ``start``, ``data``...) are called by the
    :class:`~camgateway.wire.codec.FrameDecoder`; ``connection_lost``,
    ``idle_timeout`` and ``replaced`` by the Protocol and the factory.
    """

    def __init__(self, services: Services, link: Link) -> None:
        self.s = services
        self.config = services.config
        self.link = link
        self.decoder: Optional[codec.FrameDecoder] = None
        #: False once the connection is closing or gone: nothing more is sent.
        self.connected = True
        self.state = S.AWAIT_INIT
        self.imei = ""
        self.protocol_id = 0
        self.settings = 0
        self.inits = 0
        self.files_done = 0
        #: When the connection was made, and when the current file's transfer began.
        self.connected_at = services.clock.seconds()
        self.file_started_at: Optional[float] = None
        self.transfer: Optional[Transfer] = None
        self.offer: Optional[FileOffer] = None
        self._wanted: list[str] = []  # DualCam sources still to ask for in this init
        self._skip: set[bytes] = set()  # identifiers that were empty or failed
        self._metadata_answers = self.config.metadata
        self._timer: Any = None  # step, metadata or resume timer (one at a time)
        self._timer_input = "step_timeout"  # what the timer feeds the table when it fires
        self._resume_tries = 0
        self._predecessor: defer.Deferred = defer.succeed(None)
        #: The camera's lease, when instances share a store: "instance|session".
        self.lease_token: Optional[str] = None
        self.leased = False
        self._opening: defer.Deferred = defer.succeed(None)
        #: Within the read that brought START, and an open that completed in it (see batch_end).
        self._reading_start = False
        self._opened_in_read: Optional[tuple[Transfer, FileOffer]] = None
        self._after: Optional[Callable[[], None]] = None
        #: The camera's socket is paused until a write is over.
        self._paused = False
        #: Slow cameras are read a few frames at a time while receiving (the idle timeout stays far).
        self._reads = SlowReads(link, min(READ_WAIT, self.config.idle_timeout / 4))
        #: Fires when the connection is gone and every byte held is persisted.
        self.finished: defer.Deferred = defer.Deferred()
        self._arm(self.config.step_timeout, "step_timeout")

    # -- the table

    def _input(self, name: str, *args: Any) -> None:
        if self._opened_in_read is not None and name != "status":
            self._end_start_read()  # the open comes first; only a STATUS in the same read gives the file up
        old = self.state
        row = TRANSITIONS.get((old, name))
        if row is None:
            raise ProtocolError(f"unexpected {name} while {old.value}", kind="unexpected")
        handler, targets = row
        new = getattr(self, handler)(*args)
        if new not in targets:  # a bug, not the device's fault
            raise AssertionError(f"{handler} went {self.state} -> {new}")
        self.state = new
        if old is S.RECEIVING and new is not S.RECEIVING:  # the stretch of reads is over, held or not
            self._reads.drop()
        after, self._after = self._after, None
        if after is not None:
            after()

    def _then(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current transition is done (it may re-enter the table)."""
        self._after = fn

    def _arm(self, seconds: float, inp: str) -> None:
        # One timer per session, moved rather than cancelled and made anew:
        # moving it later (the usual case, a step after a step) costs the
        # reactor no heap operation.
        if not self.connected:
            self._disarm()
            return
        self._timer_input = inp
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self.s.clock.callLater(seconds, self._fire)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._guard(self._input, self._timer_input)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        """Run an input that did not come from the decoder, handling its errors."""
        try:
            fn(*args)
        except ProtocolError as e:
            self.protocol_error(e)
        except Exception:
            self.internal_error(Failure())

    # -- frames from the decoder

    def init(self, protocol_id: int, imei: int, settings: int) -> None:
        self._input("init", protocol_id, imei, settings)

    def path(self, payload: bytes) -> None:
        self._input("path", payload)

    def metadata(self, payload: bytes) -> None:
        self._input("metadata", payload)

    def start(self, total: int, crc: int) -> None:
        self._reading_start = True  # (until batch_end: see TransferSteps._prepared)
        self._input("start", total, crc)

    def sync(self, position: int) -> None:
        self._input("sync", position)

    def status(self, code: int) -> None:
        self._input("status", code)

    def enhanced(self, offset: int, payload: memoryview, crc: int) -> None:
        self._input("enhanced", offset, payload, crc)

    def data(self, payload: memoryview, crc: int) -> None:
        """DATA: the hot path (rows ``(RECEIVING, data)`` of the table)."""
        if self.state is not S.RECEIVING:
            raise ProtocolError(f"unexpected data while {self.state.value}", kind="unexpected")
        transfer = self.transfer
        if not transfer.append(payload, crc):  # type: ignore[union-attr]
            self._input("bad_crc")
        elif transfer.held >= transfer.done_at:  # type: ignore[union-attr]
            self._input("complete")

    def runner(self) -> Optional[Callable[..., tuple[int, int]]]:
        """The decoder's fast path for runs of DATA frames, while receiving."""
        return self.transfer.take_run if self.state is S.RECEIVING else None  # type: ignore[union-attr]

    def run_ended(self, status: int) -> None:
        """A run of DATA frames ended on a bad CRC (1) or the file's last byte (2)."""
        self._input("bad_crc" if status == 1 else "complete")

    def batch_end(self) -> None:
        """Once per read: hand what was received to a writer, checkpoint now and then, pace slow reads."""
        if self._reading_start:
            self._end_start_read()
        transfer = self.transfer
        if transfer is not None:
            if transfer.pending:
                self._write(transfer)
            if self.state is S.RECEIVING:
                held = transfer.held
                reads = self._reads
                reads.read(self.s.clock.seconds(), held,
                           transfer.done_at - held - self.decoder.buffered)  # type: ignore[union-attr]
                if reads.mark != 1:  # held (the one comparison a fast camera's read pays)
                    self._file_mark()

    def _end_start_read(self) -> None:
        """The read that brought START is over: apply an open that completed within it."""
        self._reading_start = False
        opened, self._opened_in_read = self._opened_in_read, None
        if opened is not None:
            self._prepared(*opened)

    def _write(self, transfer: Transfer) -> None:
        """The write policy (see :mod:`camgateway.transfer.receiver`): batch, bound, pause."""
        n = len(transfer.pending)
        if transfer.writing:  # one write at a time: the bytes wait, up to a bound
            if n >= PENDING_MAX and not self._paused:
                self._paused = True
                self.link.pause()
            return
        if n >= WRITE_MIN:
            write_pending(self.s, transfer, self._written)
        else:  # a slow camera: write_stale() writes these later
            if transfer.pending_since is None:
                transfer.pending_since = self.s.clock.seconds()
            self._file_pending(transfer)
        self._checkpoint_due(transfer)

    def _file_mark(self) -> None:
        """Have the scan visit once the held read mark may be stale."""
        at = self._reads.stale_at()
        if at is not None:
            self.s.due.at(self, at)

    def _file_pending(self, transfer: Transfer) -> None:
        """Have the scan visit once the pending bytes are old enough to write (sooner as they grow)."""
        wait = FLUSH_AGE if len(transfer.pending) >= TRICKLE_BYTES else TRICKLE_AGE
        self.s.due.at(self, transfer.pending_since + wait)  # type: ignore[operator]

    def write_stale(self, now: float) -> None:
        """Write pending bytes that have waited :data:`FLUSH_AGE` seconds (the scan's visit).

        Fewer than :data:`TRICKLE_BYTES` wait :data:`TRICKLE_AGE` seconds.
        A camera held by its read mark and not read for long is read at once.
        The scan calls this when the moment the session filed itself for has
        come (:mod:`camgateway.perf.due`); what is not due yet files it again.
        """
        if not self.connected:
            return
        self._reads.stale(now)
        self._file_mark()  # (read since it was filed: not stale yet)
        transfer = self.transfer
        if transfer is None or transfer.writing or not transfer.pending or transfer.pending_since is None:
            return  # (bytes behind a write in flight: _written() files them)
        age = now - transfer.pending_since
        stale = len(transfer.pending)
        if age < FLUSH_AGE or (age < TRICKLE_AGE and stale < TRICKLE_BYTES):
            self._file_pending(transfer)
            return
        if stale > INLINE_WRITE_MAX or not transfer.recorded:
            # (A file's first write waits for its partial's record, so that
            # bytes in the spool are always bytes a restart resumes from.)
            write_pending(self.s, transfer, self._written)
        else:
            try:
                self.s.stats.bytes_received += transfer.flush()
            except OSError as e:
                self._write_failed(transfer, e)
                return
        self.s.trickled(stale)  # (no flush of its own until the file ends)
        self._checkpoint_due(transfer)

    def _checkpoint_due(self, transfer: Transfer) -> None:
        """Checkpoint every ``checkpoint_bytes`` written, one checkpoint at a time."""
        if transfer.flushed - transfer.checkpointed >= self.config.checkpoint_bytes and transfer.syncing is None:
            checkpoint(self.s, transfer)

    def _written(self, transfer: Transfer) -> None:
        """A write is over: go on with what waited behind it, let the camera send again."""
        if transfer.write_error is not None:
            if self.transfer is transfer:
                self._write_failed(transfer, transfer.write_error)
            return
        if self.transfer is transfer and transfer.pending:
            self._write(transfer)
        if self._paused and len(transfer.pending) < PENDING_MAX:
            self._paused = False
            if self.connected:
                self.link.resume()

    def _write_failed(self, transfer: Transfer, error: BaseException) -> None:
        self.s.failed(self.imei, self.link.peer, "spool write", str(error))
        self.s.health.failing(SPOOL, f"cannot write to the spool: {error}")
        log.error("camera {imei}: writing {id} to the spool failed ({error}); closing, partial kept"
                  " up to its last checkpoint", imei=self.imei,
                  id=self.offer.printable if self.offer else "?", error=error)
        self._abandon()

    # -- init and choosing the next file

    def _on_init(self, protocol_id: int, imei: int, settings: int) -> State:
        self._disarm()
        imei_text = str(imei)
        if self.inits and imei_text != self.imei:
            raise ProtocolError(f"repeated init from IMEI {imei_text}, session is {self.imei}", kind="identity")
        self.inits += 1
        self.protocol_id, self.settings = protocol_id, settings
        if self.inits == 1:
            self.imei = imei_text
            if not self.config.allowed(imei_text):
                log.warn("IMEI {imei} from {peer} is not in devices.allow: closing, nothing stored",
                         imei=imei_text, peer=self.link.peer)
                return self._close()
            previous = self.s.sessions.get(imei_text)
            if previous is not None and previous is not self:
                self._predecessor = previous.replaced(self.link.peer)
            self.s.sessions[imei_text] = self
            log.info("camera {imei} connected from {peer}: protocol {protocol_id}, settings 0x{settings:08x}",
                     imei=imei_text, peer=self.link.peer, protocol_id=protocol_id, settings=settings)
            if self.s.leases is not None:
                self.lease_token = f"{self.s.instance}|{uuid.uuid4().hex[:12]}"
                # (_lease_loop handles the store's errors itself: what escapes it is a bug.)
                self._then(lambda: self._lease_loop().addErrback(self.internal_error))
                return S.LEASING
        return self._next_file(new_init=True)

    @defer.inlineCallbacks
    def _lease_loop(self) -> Any:
        """Take the camera's lease, asking another instance to let go if it holds it.

        While the lease is held elsewhere, says so at once: which instance
        holds it, and that this session waits up to ``storage.lease_ttl`` for
        it (a holder that is down never lets go; its lease expires). A store
        error closes the connection, logged as such (not as the camera's
        protocol error). A result that comes once the session is over is
        dropped, and a lease taken meanwhile is given back.
        """
        leases, clock, ttl = self.s.leases, self.s.clock, self.config.lease_ttl
        yield self._predecessor  # a local older session releases its lease as it ends
        began = clock.seconds()
        deadline = began + ttl + 5.0
        asked, told = None, None  # the instance asked to let go; the holder the log named
        while self.state is S.LEASING:
            try:
                taken = yield leases.acquire(self.imei, self.lease_token, ttl)
                holder = None
                if not taken and self.state is S.LEASING:
                    holder = yield leases.holder(self.imei)
                owner = instance_of(holder)
                if holder and owner != asked and owner != self.s.instance and self.state is S.LEASING:
                    yield leases.request_takeover(self.imei, owner)
                    asked = owner
            except Exception as e:
                why = f"the store answered {type(e).__name__}: {e}"
                if self.state is S.LEASING:
                    self._guard(self._input, "lease_refused", why)
                else:
                    log.info("camera {imei}: the lease store answered after the connection closed ({why});"
                             " dropped", imei=self.imei, why=why)
                return
            if taken:
                if self.state is not S.LEASING:  # the connection went away meanwhile
                    try:
                        yield leases.release(self.imei, self.lease_token)
                    except Exception as e:
                        log.warn("releasing the lease of camera {imei} failed: {e}", imei=self.imei, e=e)
                    return
                self.leased = True
                if told is not None:
                    log.info("camera {imei}: lease taken after {t:.1f} s", imei=self.imei, t=clock.seconds() - began)
                self._guard(self._input, "leased")
                return
            if self.state is not S.LEASING:
                return
            if holder and holder != told:
                told = holder
                if owner == self.s.instance:  # (not asked: that would stop this very session)
                    log.warn("camera {imei} is held by an earlier session of this instance ({holder}: from before"
                             " a restart, or its release failed): waiting up to {ttl:g} s (storage.lease_ttl)"
                             " for its lease to expire", imei=self.imei, holder=holder, ttl=ttl)
                else:
                    log.info("camera {imei} is held by instance {owner}: asking it to let go; if it is down,"
                             " waiting up to {ttl:g} s (storage.lease_ttl) for its lease to expire",
                             imei=self.imei, owner=owner, ttl=ttl)
            if clock.seconds() > deadline:
                self._guard(self._input, "lease_refused",
                            f"instance {owner or '?'} still holds it after {clock.seconds() - began:.0f} s"
                            " (it keeps renewing its lease and did not let go)")
                return
            yield task.deferLater(clock, 0.2, lambda: None)

    def _on_leased(self) -> State:
        return self._next_file(new_init=True)

    def _on_lease_refused(self, why: str) -> State:
        self.s.failed(self.imei, self.link.peer, "lease", why)
        log.warn("could not take the lease of camera {imei} ({peer}): {why}; closing (the camera will retry)",
                 imei=self.imei, peer=self.link.peer, why=why)
        return self._close()

    def _next_file(self, new_init: bool = False) -> State:
        """Ask for the next file the current init offers, or end the cycle."""
        settings, mode = self.settings, self.config.mode
        if new_init:
            self._wanted = []
            path_flow = bool(settings & PATH_BIT) or (self.protocol_id >= 6 and settings & ANY_DUALCAM)
            if mode == "dualcam":
                path_flow = False
            if path_flow:
                self.send(codec.path_request())
                return self._await(S.AWAIT_PATH)
            if mode in ("auto", "dualcam"):
                self._wanted = [src for src in self.config.dualcam_sources
                                if settings & DUALCAM_BITS[src] and ("%" + src).encode() not in self._skip]
        if self._wanted:
            source = self._wanted.pop(0)
            offer = FileOffer.dualcam(self, source)
            return self._request(offer)
        if new_init:
            log.info("camera {imei}: nothing (more) to fetch (settings 0x{settings:08x}); closing",
                     imei=self.imei, settings=settings)
            return self._close()
        self.send(codec.repeat_init())
        return self._await(S.AWAIT_INIT)

    def _request(self, offer: FileOffer) -> State:
        self.offer = offer
        if self._metadata_answers:
            self.send(codec.metadata_request(offer.metadata_id))
            self._arm(self.config.metadata_timeout, "metadata_timeout")
            return S.AWAIT_METADATA
        self.send(codec.file_request(offer.identifier))
        return self._await(S.AWAIT_START)

    def _await(self, state: State) -> State:
        self._arm(self.config.step_timeout, "step_timeout")
        return state

    def _on_path(self, payload: bytes) -> State:
        self._disarm()
        if not payload.rstrip(b"\0"):
            log.info("camera {imei}: no file to send (empty path); closing", imei=self.imei)
            return self._close()
        offer = FileOffer.path(self, payload)
        if payload in self._skip:
            log.warn("camera {imei} offers {path} again, which it could not send; closing",
                     imei=self.imei, path=offer.printable)
            return self._close()
        if self.config.mode in ("dsm", "adas") and offer.camera not in (self.config.mode, "unknown"):
            log.info("camera {imei}: {path} is a {camera} file, download.mode is {mode}; closing",
                     imei=self.imei, path=offer.printable, camera=offer.camera, mode=self.config.mode)
            return self._close()
        return self._request(offer)

    # -- metadata

    def _on_metadata(self, payload: bytes) -> State:
        self._disarm()
        self._attach_metadata(payload)
        self.send(codec.file_request(self.offer.identifier))  # type: ignore[union-attr]
        return self._await(S.AWAIT_START)

    def _on_late_metadata(self, payload: bytes) -> State:
        self._attach_metadata(payload)
        return S.AWAIT_START

    def _attach_metadata(self, payload: bytes) -> None:
        offer = self.offer
        assert offer is not None
        offer.metadata = decode_metadata(payload, offer.metadata_layout)
        if offer.metadata.get("layout") == "raw":
            log.warn("camera {imei}: metadata for {id} not understood, kept raw: {error}",
                     imei=self.imei, id=offer.printable, error=offer.metadata.get("error"))

    def _on_metadata_timeout(self) -> State:
        log.warn("camera {imei}: no metadata answer in {t:g} s (firmware before 03.27.04?);"
                 " going on without, and not asking again this session",
                 imei=self.imei, t=self.config.metadata_timeout)
        self._metadata_answers = False
        self.send(codec.file_request(self.offer.identifier))  # type: ignore[union-attr]
        return self._await(S.AWAIT_START)

    def _on_idle_status(self, code: int) -> State:
        log.warn("camera {imei}: status {code} ({meaning}); closing",
                 imei=self.imei or "?", code=code, meaning=status_meaning(code))
        return self._close()

    def _on_step_timeout(self) -> State:
        log.warn("camera {imei} ({peer}): no answer in {t:g} s while {state}; closing",
                 imei=self.imei or "?", peer=self.link.peer, t=self.config.step_timeout, state=self.state.value)
        return self._close()

    # -- closing

    def send(self, data: bytes) -> None:
        """Write a frame to the camera."""
        self.link.send(data)

    def _close(self) -> State:
        self._disarm()
        self.send(codec.close())
        self.connected = False
        self.link.close()
        return S.CLOSED

    def protocol_error(self, error: ProtocolError) -> None:
        """The camera broke the protocol: log what it sent, close, keep what is held."""
        self.s.stats.protocol_errors += 1
        self.s.stats.protocol_errors_by_kind[error.kind] += 1
        self.s.failed(self.imei, self.link.peer, "protocol error", str(error))
        log.error("protocol error from camera {imei} ({peer}) while {state}: {error}",
                  imei=self.imei or "?", peer=self.link.peer, state=self.state.value, error=error)
        self._abandon()

    def internal_error(self, failure: Failure) -> None:
        """A bug: log it with the session's context and drop the connection."""
        log.failure("internal error in session of camera {imei} ({peer}) while {state}",
                    failure, imei=self.imei or "?", peer=self.link.peer, state=self.state.value)
        self._abandon()

    def _abandon(self) -> None:
        self.connected = False
        if self.decoder is not None:
            self.decoder.stop()
        if self.state is not S.STORING:
            self.state = S.CLOSED
        self._disarm()
        self.link.close()

    def idle_timeout(self) -> None:
        """No byte for ``timeouts.idle`` seconds."""
        log.warn("camera {imei} ({peer}): idle for {t:g} s while {state}; closing",
                 imei=self.imei or "?", peer=self.link.peer, t=self.config.idle_timeout, state=self.state.value)
        self._abandon()
        self.link.abort()

    def replaced(self, peer: str) -> defer.Deferred:
        """The same camera connected again: stop this older session cleanly."""
        return self.stop(f"the camera reconnected from {peer}")

    def stop(self, why: str) -> defer.Deferred:
        """Drop the connection now, persist what is held; fires when done."""
        log.info("camera {imei}: closing its connection from {peer}: {why}",
                 imei=self.imei or "?", peer=self.link.peer, why=why)
        self.connected = False
        if self.decoder is not None:
            self.decoder.stop()
        self._disarm()
        self.link.abort()
        return self._chain_finished()

    def _chain_finished(self) -> defer.Deferred:
        return after(self.finished)

    def connection_lost(self) -> defer.Deferred:
        """The connection is gone: persist any transfer; fire :attr:`finished` when done."""
        self.connected = False
        self._disarm()
        self.s.due.discard(self)
        if self.decoder is not None:
            self.decoder.stop()
        if self.s.sessions.get(self.imei) is self:
            del self.s.sessions[self.imei]
        d = self._opening  # an open in flight releases its transfer itself
        if self._opened_in_read is not None:  # (the read ended in an error: no batch_end)
            self._end_start_read()
        transfer, self.transfer = self.transfer, None
        if transfer is not None:
            log.info("camera {imei}: connection lost during {id} at {held} of {total} bytes; partial kept",
                     imei=self.imei, id=self.offer.printable if self.offer else "?",
                     held=transfer.held, total=transfer.limit)
            d.addBoth(lambda _: release_transfer(self.s, transfer))
        if self.state is not S.STORING:
            self.state = S.CLOSED
        if self.leased:
            self.leased = False
            d.addBoth(lambda _: self.s.leases.release(self.imei, self.lease_token))
            d.addErrback(lambda f: log.warn("releasing the lease of camera {imei} failed: {e}",
                                            imei=self.imei, e=f.getErrorMessage()))
        d.addBoth(lambda _: self.finished.callback(None))
        if not self.finished.called:  # a shutdown waits for the partial to be persisted
            self.s.track(self._chain_finished())
        return self._chain_finished()
