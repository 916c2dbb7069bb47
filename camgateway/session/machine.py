"""The camera session: the protocol's state machine, one per connection.

Every transition is listed in :data:`TRANSITIONS`, read as a table: in this
state, on this input, run this handler, which returns one of these states.
Anything else is a protocol error. The DATA frame, the hot path, takes the
handler its state's row names, bound once when the state is entered
(see :class:`Session`).

When received bytes are written, and when the camera waits for the disk, is
the connection's :class:`~camgateway.transfer.writes.WritePolicy`, which the
session calls at a few named points (each read's end, leaving ``RECEIVING``,
the scan's visit).

The session never blocks: opening a transfer (store look-up), checkpoints and
finishing a file (fsync, digest, sinks) are Deferreds whose results come back
as inputs of the table (``prepared``, ``stored``...).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from camgateway.wire import codec
from camgateway.wire.codec import ProtocolError
from camgateway.base.deferreds import after
from camgateway.transfer.lifecycle import (FileOffer, Refused, drop_transfer, finish_transfer, open_transfer,
                                           release_transfer)
from camgateway.base.health import SPOOL, STORE
from camgateway.session.leasing import instance_of
from camgateway.wire.codec import DUALCAM_SOURCE_BITS, PACKET, uses_path_flow
from camgateway.wire.metadata import decode_metadata
from camgateway.perf.slow_reads import READ_WAIT
from camgateway.session.states import S, State
from camgateway.wire.status_codes import status_meaning
from camgateway.transfer.receiver import Transfer
from camgateway.transfer.writes import WriteLink, WritePolicy

if TYPE_CHECKING:
    from camgateway.runtime.context import Services

__all__ = ["State", "Session", "TRANSITIONS", "Link"]

log = Logger(namespace="camgateway.session.machine")

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
_row(S.RECEIVING, "data", "_on_data", S.RECEIVING, S.DISCARDING, S.STORING)
_row(S.RECEIVING, "enhanced", "_on_enhanced", S.RECEIVING, S.DISCARDING, S.STORING, S.CLOSED)
_row(S.RECEIVING, "bad_crc", "_on_bad_crc", S.DISCARDING, S.CLOSED)
_row(S.RECEIVING, "complete", "_on_complete", S.STORING)
_row({S.AWAIT_SYNC, S.DISCARDING}, "resume_timer", "_on_resume_timer", S.AWAIT_SYNC, S.DISCARDING, S.CLOSED)
_row(_FILE_STATES, "status", "_on_file_status", *_NEXT_FILE)
_row({S.AWAIT_INIT, S.AWAIT_PATH}, "status", "_on_idle_status", S.CLOSED)
_row(S.STORING, "stored", "_on_stored", S.AWAIT_INIT)
_row(S.STORING, "store_failed", "_on_store_failed", S.CLOSED)
_row({S.AWAIT_INIT, S.AWAIT_PATH, S.AWAIT_START, S.AWAIT_SYNC}, "step_timeout", "_on_step_timeout", S.CLOSED)


class Link(WriteLink, Protocol):
    """What a session needs of its connection (the Protocol provides it), its write policy's part included."""

    @property
    def peer(self) -> str:
        """The camera's address, ``ip:port``."""

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class Session:
    """The protocol state machine of one camera connection.

    Its frame methods (``init``, ``start``, ``data``...) are called by the
    :class:`~camgateway.wire.codec.FrameDecoder`; ``connection_lost``,
    ``idle_timeout`` and ``replaced`` by the Protocol and the factory. Every
    input goes through :meth:`_input`: the table's row for the state and the
    input, its handler, a check that the handler went where the row allows.

    DATA, the fast path. A file arrives as thousands of DATA frames, so DATA
    does not go through :meth:`_input`. Entering a state binds the handler
    the table names for ``(state, "data")`` (:meth:`_bind_data`): :meth:`data`
    calls it with no look-up. For ``_on_data``, :meth:`runner` offers the
    decoder the transfer's :meth:`~camgateway.transfer.receiver.Transfer.take_run`,
    the same handler for a run of frames (one C CRC and one copy each,
    nothing allocated per frame). In a state with no DATA row, the bound handler
    raises the protocol error :meth:`_input` would. What the fast path skips,
    and why that is safe:

    * the row look-up per frame: the row is the one of the state the session
      is in, bound when it entered it, and every state change rebinds it;
    * the check of the state the handler went to: the DATA handler never
      changes the state itself; a bad CRC and the file's last byte are the
      inputs ``bad_crc`` and ``complete``, which take the whole way;
    * an open that completed in the read that brought START
      (:meth:`_end_start_read`): it is applied before the SYNC that leads to
      ``RECEIVING``, so none is waiting there;
    * the step run after a transition (:meth:`_then`): the DATA handler
      schedules none.
    """

    def __init__(self, services: Services, link: Link) -> None:
        self.s = services
        self.config = services.config
        self.link = link
        self.decoder: Optional[codec.FrameDecoder] = None
        #: False once the connection is closing or gone: nothing more is sent.
        self.connected = True
        self.transfer: Optional[Transfer] = None
        self._state = S.AWAIT_INIT
        self._bind_data(S.AWAIT_INIT)
        self.imei = ""
        self.protocol_id = 0
        self.settings = 0
        self.inits = 0
        self.files_done = 0
        #: When the connection was made, and when the current file's transfer began.
        self.connected_at = services.clock.seconds()
        self.file_started_at: Optional[float] = None
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
        self._after: Optional[Callable[[], object]] = None
        #: When received bytes are written; slow cameras are read a few frames at a time while
        #: receiving (the idle timeout stays far).
        self.writes = WritePolicy(services, self, link, min(READ_WAIT, self.config.idle_timeout / 4))
        #: Fires when the connection is gone and every byte held is persisted.
        self.finished: defer.Deferred = defer.Deferred()
        self._arm(self.config.step_timeout, "step_timeout")

    # -- the table

    @property
    def state(self) -> State:
        """Where the session is in the protocol (setting it binds the DATA handler of the new state)."""
        return self._state

    @state.setter
    def state(self, new: State) -> None:
        if new is not self._state:
            self._state = new
            self._bind_data(new)

    def _bind_data(self, state: State) -> None:
        """Bind the DATA input to the handler the table names for ``state`` (see the class docstring)."""
        row = TRANSITIONS.get((state, "data"))
        if row is None:
            self._data: Callable[[memoryview, int], None] = self._unexpected_data
            self._run: Optional[Callable[..., tuple[int, int]]] = None
        else:
            self._data = getattr(self, row[0])
            transfer = self.transfer
            # Transfer.take_run is _on_data for a run of frames, frame for frame; another handler takes each.
            self._run = transfer.take_run if row[0] == "_on_data" and transfer is not None else None

    def _input(self, name: str, *args: Any) -> None:
        if self._opened_in_read is not None and name != "status":
            self._end_start_read()  # the open comes first; only a STATUS in the same read gives the file up
        old = self._state
        row = TRANSITIONS.get((old, name))
        if row is None:
            raise ProtocolError(f"unexpected {name} while {old.value}", kind="unexpected")
        handler, targets = row
        new = getattr(self, handler)(*args)
        if new not in targets:  # a bug, not the device's fault
            raise AssertionError(f"{handler} went {self.state} -> {new}")
        self.state = new
        if old is S.RECEIVING and new is not S.RECEIVING:  # the stretch of reads is over, held or not
            self.writes.receiving_over()
        after, self._after = self._after, None
        if after is not None:
            after()

    def _then(self, fn: Callable[[], object]) -> None:
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
        self._reading_start = True  # (until batch_end: see _prepared)
        self._input("start", total, crc)

    def sync(self, position: int) -> None:
        self._input("sync", position)

    def status(self, code: int) -> None:
        self._input("status", code)

    def enhanced(self, offset: int, payload: memoryview, crc: int) -> None:
        self._input("enhanced", offset, payload, crc)

    def data(self, payload: memoryview, crc: int) -> None:
        """DATA: the handler of the state's ``data`` row, bound when the state was entered."""
        self._data(payload, crc)

    def runner(self) -> Optional[Callable[..., tuple[int, int]]]:
        """The decoder's fast path for runs of DATA frames: the DATA row's, while there is one."""
        return self._run

    def run_ended(self, status: int) -> None:
        """A run of DATA frames ended on a bad CRC (1) or the file's last byte (2)."""
        self._input("bad_crc" if status == 1 else "complete")

    def batch_end(self) -> None:
        """Once per read: the write policy writes what is due and paces the next reads."""
        if self._reading_start:
            self._end_start_read()
        transfer = self.transfer
        if transfer is not None:
            if self._state is S.RECEIVING:
                self.writes.read_over(transfer, self.decoder.buffered)  # type: ignore[union-attr]
            elif transfer.pending:
                self.writes.write(transfer)

    def _end_start_read(self) -> None:
        """The read that brought START is over: apply an open that completed within it."""
        self._reading_start = False
        opened, self._opened_in_read = self._opened_in_read, None
        if opened is not None:
            self._prepared(*opened)

    def write_stale(self, now: float) -> None:
        """The scan's visit, once a moment the write policy filed this session for has come.

        The policy writes pending bytes that waited long enough and drops a
        stale read mark (:meth:`camgateway.transfer.writes.WritePolicy.visit`).
        """
        if self.connected:
            self.writes.visit(now, self.transfer)

    def write_failed(self, transfer: Transfer, error: BaseException) -> None:
        """Writing the current file to the spool failed: close, keep the partial up to its last checkpoint."""
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
                self.s.refused.refused(imei_text, self.link.peer, self.s.clock.seconds())
                return self._close()
            previous = self.s.sessions.get(imei_text)
            if previous is not None and previous is not self:
                self._predecessor = previous.replaced(self.link.peer)
            self.s.sessions[imei_text] = self
            self.s.camera_connected(imei_text, self.link.peer)
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
            path_flow = uses_path_flow(self.protocol_id, settings)
            if mode == "dualcam":
                path_flow = False
            if path_flow:
                self.send(codec.path_request())
                return self._await(S.AWAIT_PATH)
            if mode in ("auto", "dualcam"):
                self._wanted = [src for src in self.config.dualcam_sources
                                if settings & DUALCAM_SOURCE_BITS[src] and ("%" + src).encode() not in self._skip]
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

    # -- START, opening the transfer

    def _on_start(self, total: int, crc: int) -> State:
        self._disarm()
        offer = self.offer
        assert offer is not None
        if total == 0:
            log.info("camera {imei}: {id} has nothing to send (START total 0)", imei=self.imei, id=offer.printable)
            return self._file_ended(offer)
        size = total * PACKET if offer.flow == "dualcam" else total
        if size > self.config.max_file_bytes:
            log.error("camera {imei}: {id} is {size} bytes, over limits.max_file_bytes ({limit}); not fetched",
                      imei=self.imei, id=offer.printable, size=size, limit=self.config.max_file_bytes)
            return self._file_ended(offer)
        offer.total, offer.start_crc = total, crc

        def open_it() -> None:
            # Opens run one after another on one chain (a file offered again
            # waits for the open before it), each result bound to its offer.
            d = self._predecessor.addBoth(lambda _: open_transfer(self.s, offer))
            d.addCallbacks(self._prepared, self._prepare_failed, callbackArgs=(offer,), errbackArgs=(offer,))
            self._opening = d

        self._then(open_it)
        return S.PREPARING

    def _owns(self, offer: FileOffer, state: State) -> bool:
        """Whether an asynchronous result started for ``offer`` may be applied now.

        Only while the session is still in ``state`` for that very offer:
        a result for an offer that is over (the camera gave the file up, the
        connection went away, another file is being opened) is never applied.
        """
        return self.state is state and self.offer is offer

    def _prepared(self, transfer: Transfer, offer: FileOffer) -> Optional[defer.Deferred]:
        if self._reading_start:
            # Opened within the read that brought START: the RESUME waits for
            # the end of that read, where a STATUS in the same read gives the
            # file up first (batch_end applies this).
            self._opened_in_read = (transfer, offer)
            return None
        if not self._owns(offer, S.PREPARING):  # the file was given up, or the connection went away
            log.info("camera {imei}: {id} was opened after it was given up; its transfer is released",
                     imei=self.imei, id=offer.printable)
            d = drop_transfer(self.s, transfer)
            d.addErrback(lambda f: log.failure("camera {imei}: releasing the transfer of {id} failed", f,
                                               imei=self.imei, id=offer.printable))
            return d
        self._guard(self._input, "prepared", transfer)
        return None

    def _prepare_failed(self, failure: Failure, offer: FileOffer) -> None:
        if self._owns(offer, S.PREPARING):
            self._guard(self._input, "prepare_failed", failure)
        elif not failure.check(Refused):
            log.failure("camera {imei}: opening {id} failed after it was given up", failure,
                        imei=self.imei, id=offer.printable)

    def _on_prepared(self, transfer: Transfer) -> State:
        self.transfer = transfer
        self.s.health.working(SPOOL)
        self.file_started_at = self.s.clock.seconds()
        if transfer.complete:  # held everything before: fetch the last unit again
            transfer.rewind(transfer.offset_of(transfer.position() - 1) if transfer.dualcam
                            else max(0, (transfer.held - 1) // PACKET * PACKET))
        if transfer.held:
            self.s.stats.resumes += 1
            log.info("camera {imei}: resuming {id} at {pos} ({held} of {total} bytes held)",
                     imei=self.imei, id=self.offer.printable, pos=transfer.position(),  # type: ignore[union-attr]
                     held=transfer.held, total=transfer.limit)
        return self._send_resume(S.AWAIT_SYNC)

    def _on_prepare_failed(self, failure: Failure) -> State:
        # The connection is dropped with no CLOSE: CLOSE after START would end the file for the camera.
        if failure.check(Refused):  # a refusal with a reason (disk low...)
            self.s.health.failing(SPOOL, str(failure.value))
            log.warn("camera {imei}: {why}; dropping the connection without CLOSE (the camera keeps {id})",
                     imei=self.imei, why=failure.value, id=self.offer.printable)  # type: ignore[union-attr]
            return self._drop()
        if failure.check(OSError):
            self.s.health.failing(SPOOL, f"cannot open spool files: {failure.getErrorMessage()}")
        else:
            self.s.health.failing(STORE, f"cannot look up partial transfers: {failure.getErrorMessage()}")
        log.failure("camera {imei}: cannot open a transfer for {id}; dropping the connection without CLOSE"
                    " (the camera keeps the file)", failure, imei=self.imei,
                    id=self.offer.printable)  # type: ignore[union-attr]
        return self._drop()

    # -- SYNC, DATA, errors

    def _send_resume(self, state: State) -> State:
        self.send(codec.resume(self.transfer.position()))  # type: ignore[union-attr]
        self._arm(2.0 if self._resume_tries < 10 else 4.0, "resume_timer")
        return state

    def _on_sync(self, position: int) -> State:
        transfer = self.transfer
        assert transfer is not None
        offset = transfer.offset_of(position)
        if offset > transfer.held:
            log.warn("camera {imei}: SYNC {pos} is beyond the {held} bytes held; asking again",
                     imei=self.imei, pos=position, held=transfer.held)
            self.decoder.discard_until_sync(transfer.position())  # type: ignore[union-attr]
            return self._retry_resume(S.DISCARDING)
        self._disarm()
        self._resume_tries = 0
        transfer.sync(offset)
        return S.RECEIVING

    def _on_data(self, payload: memoryview, crc: int) -> None:
        """One DATA frame while receiving (the fast path: see the class docstring)."""
        transfer = self.transfer
        if not transfer.append(payload, crc):  # type: ignore[union-attr]
            self._input("bad_crc")
        elif transfer.held >= transfer.done_at:  # type: ignore[union-attr]
            self._input("complete")

    def _unexpected_data(self, payload: memoryview, crc: int) -> None:
        """DATA in a state whose table has no DATA row."""
        raise ProtocolError(f"unexpected data while {self._state.value}", kind="unexpected")

    def _on_enhanced(self, offset: int, payload: memoryview, crc: int) -> State:
        transfer = self.transfer
        assert transfer is not None
        if offset != transfer.held:
            log.warn("camera {imei}: ENHANCED DATA at offset {offset}, expected {held}",
                     imei=self.imei, offset=offset, held=transfer.held)
            return self._on_bad_crc()
        if not transfer.append(payload, crc):
            return self._on_bad_crc()
        return self._on_complete() if transfer.complete else S.RECEIVING

    def _on_bad_crc(self) -> State:
        self.s.stats.crc_errors += 1
        log.warn("camera {imei}: bad CRC in {id} after {held} bytes; RESUME and discard until SYNC",
                 imei=self.imei, id=self.offer.printable, held=self.transfer.held)  # type: ignore[union-attr]
        self.decoder.discard_until_sync(self.transfer.position())  # type: ignore[union-attr]
        return self._retry_resume(S.DISCARDING)

    def _retry_resume(self, state: State) -> State:
        self._resume_tries += 1
        if self._resume_tries > self.config.resume_retries:
            log.error("camera {imei}: no usable SYNC after {n} RESUMEs; closing, partial kept",
                      imei=self.imei, n=self.config.resume_retries)
            return self._close()
        return self._send_resume(state)

    def _on_resume_timer(self) -> State:
        return self._retry_resume(self.state)

    # -- the end of a file

    def _on_complete(self) -> State:
        transfer, offer = self.transfer, self.offer
        assert transfer is not None and offer is not None
        self.transfer = None

        def finish() -> None:
            d = self.s.track(finish_transfer(self.s, self, offer, transfer))
            d.addCallbacks(lambda received: self._guard(self._stored, received, offer),
                           lambda f: self._guard(self._store_failed, f, offer))

        self._then(finish)
        return S.STORING

    def _stored(self, received: Any, offer: FileOffer) -> None:
        self.files_done += 1
        self.s.stats.files_received += 1
        self._storing_over(offer, "stored", received)

    def _storing_over(self, offer: FileOffer, inp: str, result: Any) -> None:
        """Feed the finish's ``result`` to the table, if the session still waits for it."""
        if self._owns(offer, S.STORING):
            if self.connected:
                self._input(inp, result)
            else:  # the camera is gone before it was told: it may offer the file again
                self.state = S.CLOSED

    def _on_stored(self, received: Any) -> State:
        self.offer = None
        self.send(codec.repeat_init())
        return self._await(S.AWAIT_INIT)

    def _store_failed(self, failure: Failure, offer: FileOffer) -> None:
        """The file could not be made safe: the camera is not told it is done (it keeps the file)."""
        self.s.stats.delivery_failures += 1
        self.s.failed(self.imei, self.link.peer, "store " + offer.printable, failure.getErrorMessage())
        if failure.check(OSError):  # the disk's answer (full, I/O error), not a bug: no traceback
            log.error("camera {imei}: could not make {id} safe ({error}); the connection is dropped without"
                      " telling the camera the file is done: the camera still holds it",
                      imei=self.imei, id=offer.printable, error=failure.getErrorMessage())
        else:
            log.failure("camera {imei}: could not make {id} safe; the connection is dropped without telling the"
                        " camera the file is done: the camera still holds it", failure,
                        imei=self.imei, id=offer.printable)
        self._storing_over(offer, "store_failed", failure)

    def _on_store_failed(self, failure: Failure) -> State:
        return self._drop()

    def _drop(self) -> State:
        """End the connection with no CLOSE and no REPEAT INIT: either would tell the camera the file was taken."""
        self._hang_up()
        self.link.abort()
        return S.CLOSED

    def _file_ended(self, offer: FileOffer) -> State:
        """The file was empty or the camera could not send it: go on with the next."""
        self._skip.add(offer.identifier)
        self.offer = None
        if offer.flow == "dualcam":
            return self._next_file()
        self.send(codec.repeat_init())
        return self._await(S.AWAIT_INIT)

    def _on_file_status(self, code: int) -> State:
        offer = self.offer
        log.warn("camera {imei}: status {code} ({meaning}) for {id}",
                 imei=self.imei, code=code, meaning=status_meaning(code), id=offer.printable if offer else "?")
        self._disarm()
        if self.transfer is not None:
            release_transfer(self.s, self.transfer)
            self.transfer = None
        if self.decoder is not None:
            self.decoder.discarding = False
        return self._file_ended(offer) if offer else self._close()

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

    def _hang_up(self) -> None:
        """The connection is closing or gone: nothing more is sent, read or timed."""
        self.connected = False
        self._disarm()
        if self.decoder is not None:
            self.decoder.stop()

    def _abandon(self) -> None:
        self._hang_up()
        if self.state is not S.STORING:
            self.state = S.CLOSED
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
        self._hang_up()
        self.link.abort()
        return after(self.finished)

    def connection_lost(self) -> defer.Deferred:
        """The connection is gone: persist any transfer; fire :attr:`finished` when done."""
        self._hang_up()
        self.s.due.discard(self)
        if self.s.sessions.get(self.imei) is self:
            del self.s.sessions[self.imei]
            self.s.camera_gone(self.imei)
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
            self.s.track(after(self.finished))
        return after(self.finished)
