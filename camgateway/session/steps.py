"""The transfer half of the session state machine: from START to the stored file.

:class:`TransferSteps` holds the handlers the transition table in
:mod:`camgateway.session.machine` names for one file's life (opening the transfer,
RESUME/SYNC, CRC errors, completion and storing); :class:`~camgateway.session.machine.Session`
inherits them. The table itself, and every other step, stays in session.py.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from camgateway.wire import codec
from camgateway.transfer.lifecycle import FileOffer, Refused, drop_transfer, finish_transfer, open_transfer, release_transfer
from camgateway.base.health import SPOOL, STORE
from camgateway.session.states import S, State
from camgateway.wire.status_codes import status_meaning
from camgateway.transfer.receiver import Transfer

__all__ = ["TransferSteps"]

log = Logger(namespace="camgateway.session.machine")


class TransferSteps:
    """Handlers for START through storing; mixed into Session (see its table)."""

    # Provided by Session:
    s: Any
    config: Any
    link: Any
    decoder: Any
    imei: str
    offer: Optional[FileOffer]
    transfer: Optional[Transfer]
    state: State
    _reading_start: bool
    _opened_in_read: Optional[tuple[Transfer, FileOffer]]

    # -- START, opening the transfer

    def _on_start(self, total: int, crc: int) -> State:
        self._disarm()
        offer = self.offer
        assert offer is not None
        if total == 0:
            log.info("camera {imei}: {id} has nothing to send (START total 0)", imei=self.imei, id=offer.printable)
            return self._file_ended(offer)
        size = total * 1024 if offer.flow == "dualcam" else total
        if size > self.config.max_file_bytes:
            log.error("camera {imei}: {id} is {size} bytes, over limits.max_file_bytes ({limit}); not fetched",
                      imei=self.imei, id=offer.printable, size=size, limit=self.config.max_file_bytes)
            return self._file_ended(offer)
        offer.total, offer.start_crc = total, crc

        def open_it() -> None:
            # Opens run one after another on one chain (a file offered again
            # waits for the open before it), each result bound to its offer.
            d = self._predecessor.addBoth(lambda _: open_transfer(self.s, self, offer))
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
                            else max(0, (transfer.held - 1) // 1024 * 1024))
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
        if self._owns(offer, S.STORING):
            if self.connected:
                self._input("stored", received)
            else:  # held in full, but the camera is gone before it was told: it may offer the file again
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
        if self._owns(offer, S.STORING):
            if self.connected:
                self._input("store_failed", failure)
            else:
                self.state = S.CLOSED

    def _on_store_failed(self, failure: Failure) -> State:
        return self._drop()

    def _drop(self) -> State:
        """End the connection with no CLOSE and no REPEAT INIT: either would tell the camera the file was taken."""
        self._disarm()
        self.connected = False
        if self.decoder is not None:
            self.decoder.stop()
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

