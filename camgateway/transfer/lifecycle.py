"""The life of one file: offered, opened (new or resumed), checkpointed, finished.

These are the session's slow steps, each a Deferred: store look-ups, spool
file opening, writes, ``fdatasync`` and digests run off the reactor thread,
and everything touching one spool file is serialised on ``Transfer.busy``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from camgateway.base.deferreds import after
from camgateway.base.health import SPOOL, STORE
from camgateway.base.ids import new_id
from camgateway.wire.metadata import capture_time
from camgateway.storage.records import OutboxEntry, Partial, ReceivedFile
from camgateway.base.reasons import reason
from camgateway.transfer.spool import reconcile_partial
from camgateway.transfer.receiver import INLINE_WRITE_MAX, Transfer, digest_file

if TYPE_CHECKING:
    from camgateway.runtime.context import Services

__all__ = ["Connection", "FileOffer", "Refused", "open_transfer", "record_partial", "write_pending", "checkpoint",
           "release_transfer", "drop_transfer", "finish_transfer"]

log = Logger(namespace="camgateway.transfer.lifecycle")


class Connection(Protocol):
    """What a file's life needs to know of the connection that brings it."""

    imei: str
    protocol_id: int
    #: When the file's transfer started (the clock's seconds), if it has.
    file_started_at: Optional[float]
    #: The connection's link; its ``peer`` is the camera's address (``ip:port``).
    link: Any


class Refused(Exception):
    """The gateway will not take a new file now (the reason is the message)."""


def _path_kind(lower: str) -> tuple[str, str]:
    """(camera, source) read from a device path (PROTOCOL.md section 4)."""
    for marker, camera in (("dualcam_front", "dualcam"), ("dualcam_rear", "dualcam"),
                           ("dashcam", "dashcam"), ("mdas9", "adas"), ("adas", "adas"), ("dsm", "dsm")):
        if marker in lower:
            return camera, marker
    return "unknown", "file"


@dataclasses.dataclass
class FileOffer:
    """A file the camera offers: how to ask for it and what it is."""

    imei: str
    protocol_id: int
    flow: str  # "dualcam" | "path"
    identifier: bytes  # what FILE REQUEST carries
    source: str
    camera: str
    media: str
    metadata_id: bytes  # what METADATA REQUEST carries
    metadata_layout: str  # the camera argument of decode_metadata
    printable: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    total: int = 0
    start_crc: int = 0

    @property
    def key(self) -> tuple[str, str, bytes]:
        """The file's identity in the resume store."""
        return (self.imei, self.flow, self.identifier)

    @classmethod
    def dualcam(cls, session: "Connection", source: str) -> "FileOffer":
        """A DualCam source (``photof``...), asked for by its 7-byte id."""
        ident = ("%" + source).encode()
        return cls(session.imei, session.protocol_id, "dualcam", ident, source, "dualcam",
                   "photo" if source.startswith("photo") else "video", ident, "dualcam", "%" + source)

    @classmethod
    def path(cls, session: "Connection", payload: bytes) -> "FileOffer":
        """A file named by the device's path (never used as a filesystem path)."""
        text = payload.rstrip(b"\0").decode("utf-8", "backslashreplace")
        lower = text.lower()
        camera, source = _path_kind(lower)
        if "picture" in lower or lower.endswith((".jpg", ".jpeg")):
            media = "photo"
        elif lower.endswith((".mp4", ".h265", ".h264", ".avi")) or "video" in lower:
            media = "video"
        else:
            media = "unknown"
        if session.protocol_id >= 6:
            layout = "json"
        else:
            layout = {"dsm": "dsm", "adas": "adas", "dualcam": "dualcam", "dashcam": "dualcam"}.get(camera, "unknown")
        printable = text if len(text) <= 200 else text[:200] + "..."
        return cls(session.imei, session.protocol_id, "path", bytes(payload), source, camera, media,
                   b"", layout, repr(printable)[1:-1])


def open_transfer(s: "Services", offer: FileOffer) -> defer.Deferred:
    """A :class:`Transfer` for ``offer``: its stored partial if it matches, else a new one."""
    d = after(s.finishing.get(offer.key))  # a finish of the same file in flight: wait for it
    d.addCallback(lambda _: s.store.find(*offer.key))
    d.addCallback(_open_or_create, s, offer)
    return d


def _meta_timestamp(offer: FileOffer) -> Optional[str]:
    value = offer.metadata.get("timestamp")
    return value if isinstance(value, str) else None


@defer.inlineCallbacks
def _open_or_create(partial: Optional[Partial], s: "Services", offer: FileOffer) -> Any:
    stamp = _meta_timestamp(offer)
    if partial is not None and s.journal is not None and s.journal.holds(partial.spool_name):
        # A complete file waiting for the store to record it, whose partial
        # record the store could not forget yet: never resumed into, never removed.
        yield s.store.remove(partial.id)
        partial = None
    if partial is not None and not partial.matches(offer.total, offer.start_crc, stamp):
        log.info("camera {imei}: {id} changed (START {total}/{crc:#06x}, was {old_total}/{old_crc:#06x});"
                 " discarding the old partial of {held} bytes", imei=offer.imei, id=offer.printable,
                 total=offer.total, crc=offer.start_crc, old_total=partial.total, old_crc=partial.start_crc,
                 held=partial.held)
        yield s.store.remove(partial.id)
        yield s.run_in_thread(s.spool.unlink, partial.spool_name)
        partial = None
    if partial is None:
        made = s.reserve.take() if s.reserve is not None else None  # no thread hop before the RESUME
        if made is None:
            name = s.spool.new_name()
            fd = yield s.run_in_thread(_create, s.spool, name, s.config.min_free_bytes)
        else:
            name, fd = made
        now = s.clock.seconds()
        partial = Partial(new_id(), offer.imei, offer.flow, offer.identifier, offer.total,
                          offer.start_crc, stamp, 0, s.boot_id, name, now, now)
        transfer = Transfer(partial, fd)
        if s.own_store:
            # The record waits for the file's first write before its end, or its
            # first checkpoint (record_partial): a photo received in one go
            # goes to the outbox without one, two statements less. Until then a
            # crash leaves an orphan spool file, which the start-up reconcile
            # removes (the camera, never told the file is stored, sends it
            # again). A shared store has no such reconcile: there it comes first.
            transfer.recorded = False
            return transfer
        try:
            yield s.store.add(partial)
        except BaseException:
            os.close(fd)
            s.spool.unlink(partial.spool_name)  # an unrecorded file would be nobody's
            raise
        return transfer
    else:
        # What the spool file really holds (another instance or process may have written it).
        held = yield s.run_in_thread(reconcile_partial, s.spool, partial, s.boot_id)
        if held is None:
            log.warn("camera {imei}: the spool file of {id}'s partial is gone; starting afresh",
                     imei=offer.imei, id=offer.printable)
            yield s.store.remove(partial.id)
            return (yield _open_or_create(None, s, offer))
        partial.held = held
    fd = yield s.run_in_thread(s.spool.open, partial.spool_name, partial.held)
    return Transfer(partial, fd)


def _record(s: "Services", transfer: Transfer) -> Optional[defer.Deferred]:
    """Ask the store to record the transfer's partial, once; None if it was asked before."""
    if transfer.recorded:
        return None
    transfer.recorded = True
    return s.store.add(transfer.partial)


def record_partial(s: "Services", transfer: Transfer) -> None:
    """Put the transfer's partial in the store if it is not there yet, before its next steps.

    Its later checkpoints, and the outbox entry that forgets it, are
    statements queued after this one on the store's thread. If the record
    fails, so do the steps queued on ``busy`` after it.
    """
    added = _record(s, transfer)
    if added is not None:
        transfer.busy.addCallback(lambda _: added)


def write_pending(s: "Services", transfer: Transfer, then: Optional[Callable[[Transfer], None]] = None) -> None:
    """Hand the transfer's pending bytes to a pool thread, after its earlier steps.

    Writes of one file run one at a time and in order on ``transfer.busy``.
    Once a write failed, none after it is made (a hole would look like data
    after a crash), and ``then(transfer)`` finds :attr:`Transfer.write_error`.
    """
    record_partial(s, transfer)
    buf, offset, truncate = transfer.take_pending()
    s.stats.bytes_received += len(buf)

    def run(_: object) -> Optional[defer.Deferred]:
        if transfer.write_error is not None:
            return None
        return s.run_in_thread(transfer.write_chunk, buf, offset, truncate)

    n = len(buf)

    def done(result: object) -> None:
        transfer.written(buf)
        if isinstance(result, Failure):
            if transfer.write_error is None:
                transfer.write_error = result.value
            if result.check(OSError):  # the disk's answer, not a bug: no traceback
                log.error("writing {n} bytes of spool file {name} at offset {offset} failed: {error}", n=n,
                          name=transfer.partial.spool_name, offset=offset, error=result.getErrorMessage())
            else:
                log.failure("writing {n} bytes of spool file {name} at offset {offset} failed", result, n=n,
                            name=transfer.partial.spool_name, offset=offset)
        if then is not None:
            then(transfer)

    transfer.busy.addCallback(run)
    transfer.busy.addBoth(done)


def _create(spool: Any, name: str, min_free: int) -> int:
    """Check the spool's free space, then create spool file ``name`` (one thread hop)."""
    free = spool.free_bytes()
    if free < min_free:
        raise Refused(f"spool has {free} bytes free, under limits.min_free_bytes"
                      f" ({min_free}): not accepting new files")
    return spool.open(name, 0)


def checkpoint(s: "Services", transfer: Transfer, *, hold: bool = False) -> defer.Deferred:
    """Make the bytes written so far durable, then record them in the store.

    It starts once the writes before it are done. Unless ``hold``, later
    writes go on while its ``fdatasync`` runs (they are not part of it), so a
    fast camera is not stalled every ``checkpoint_bytes``; with ``hold``, the
    file's next steps (closing it) wait for it. Checkpoints of one file run one
    after another. Nothing is recorded after a failed write. The returned
    Deferred fires when this checkpoint is over (it never fails).
    """
    record_partial(s, transfer)
    held = transfer.flushed
    transfer.checkpointed = held
    partial_id, fd = transfer.partial.id, transfer.fd
    previous = transfer.syncing
    over: defer.Deferred = defer.Deferred()
    transfer.syncing = over

    def record(_: object) -> Optional[defer.Deferred]:
        if transfer.write_error is not None:
            return None
        d = s.run_in_thread(os.fdatasync, fd)
        d.addCallback(lambda _: s.store.checkpoint(partial_id, held, s.boot_id, s.clock.seconds()))
        return d

    def finished(result: object) -> None:
        if isinstance(result, Failure):
            log.failure("checkpoint of {id} failed", result, id=partial_id)
        if transfer.syncing is over:
            transfer.syncing = None
        over.callback(None)

    def start(_: object) -> Optional[defer.Deferred]:
        d = after(previous)
        d.addCallback(record)
        d.addBoth(finished)
        return d if hold else None

    transfer.busy.addCallback(start)
    return over


def _has_unwritten(transfer: Transfer) -> bool:
    return bool(transfer.pending) or transfer.needs_truncate


def release_transfer(s: "Services", transfer: Transfer) -> defer.Deferred:
    """The connection ended mid-file: persist what is held and close the spool file.

    Until that is done, a new offer of the same file waits for it, as for a
    file being finished (``s.finishing``, :func:`open_transfer`): a camera
    that reconnects at once resumes from what this release persists, not
    from the record as it was before (its first checkpoint waits for a
    ``fdatasync``), and never gets a second writer on the same spool file.
    """
    if _has_unwritten(transfer):
        write_pending(s, transfer)
    checkpoint(s, transfer, hold=True)
    transfer.busy.addBoth(lambda _: transfer.close())
    if transfer.partial.key not in s.finishing:
        _finishing(s, transfer.partial.key, after(transfer.busy))
    return transfer.busy


def drop_transfer(s: "Services", transfer: Transfer) -> defer.Deferred:
    """A transfer opened for a file that is over before it was used: give it up.

    A transfer that holds nothing is removed, record and spool file;
    anything else (a resumed partial) is released as a lost connection's
    would be (:func:`release_transfer`), so what it held stays resumable.
    """
    if transfer.held or _has_unwritten(transfer):
        return release_transfer(s, transfer)
    transfer.close()
    partial = transfer.partial
    d = s.store.remove(partial.id) if transfer.recorded else defer.succeed(None)
    d.addCallback(lambda _: s.run_in_thread(s.spool.unlink, partial.spool_name))
    if partial.key not in s.finishing:  # a new offer of the same file waits for the removal
        _finishing(s, partial.key, after(d))
    return d


def _finishing(s: "Services", key: tuple[str, str, bytes], d: defer.Deferred) -> None:
    """Until ``d`` fires, a new offer of the file ``key`` waits for it (:func:`open_transfer`)."""
    s.finishing[key] = d

    def done(result: object) -> object:
        if s.finishing.get(key) is d:
            del s.finishing[key]
        return result

    d.addBoth(done)


def finish_transfer(s: "Services", session: "Connection", offer: FileOffer, transfer: Transfer) -> defer.Deferred:
    """Make a complete file durable and put it in the outbox (forgetting its partial).

    The last bytes are written, the file is flushed with others finishing at
    the same time (:meth:`Services.durable`), and its digest comes from the
    writes (read again only after a rewind). Fires with the
    :class:`ReceivedFile` once the file is safe: the sinks get it from the
    outbox. On failure the spool file and its partial record stay, marked
    complete, so the camera's next offer finds it.
    """
    last: Optional[Callable[[], None]] = None
    if _has_unwritten(transfer):
        if not transfer.writing and len(transfer.pending) <= INLINE_WRITE_MAX:
            # A photo's few KiB: written (and hashed) by the flush's thread just
            # before its flush, not by a thread hop of their own.
            buf, offset, truncate = transfer.take_pending()
            s.stats.bytes_received += len(buf)
            last = functools.partial(transfer.write_chunk, buf, offset, truncate)
        else:
            write_pending(s, transfer)

    def durable(_: object) -> defer.Deferred:
        if transfer.write_error is not None:
            raise transfer.write_error
        d = s.durable(transfer.fd, last, transfer.close_if_digested)
        if last is not None:
            def written(result: object) -> object:
                transfer.written(buf)
                return result

            d.addBoth(written)
        return d

    def digest(_: object) -> Any:
        known = transfer.digest()
        if known is not None:
            return known
        return s.run_in_thread(digest_file, transfer.fd, transfer.file_crc())

    d = transfer.busy
    d.addCallback(lambda _: after(transfer.syncing))  # the checkpoint in flight, if any
    d.addCallback(durable)
    d.addCallback(digest)
    d.addErrback(_keep, s, transfer)
    d.addCallback(_to_outbox, s, session, offer, transfer)
    _finishing(s, offer.key, d)
    result: defer.Deferred = defer.Deferred()
    d.chainDeferred(result)
    return result


@defer.inlineCallbacks
def _keep(failure: Failure, s: "Services", transfer: Transfer) -> Any:
    """The file could not be made durable: close it and keep it, recorded, for the camera's next offer."""
    transfer.close()
    if failure.check(OSError):
        s.health.failing(SPOOL, f"cannot write to the spool: {failure.getErrorMessage()}")
    try:
        yield _record(s, transfer)
    except Exception:
        log.failure("could not record the partial {id} of a file that failed to store", id=transfer.partial.id)
    return failure


@defer.inlineCallbacks
def _record_again(s: "Services", transfer: Transfer) -> Any:
    """After a finish that recorded nothing: the partial's record, with every byte held (best effort)."""
    try:
        yield _record(s, transfer)
        yield s.store.checkpoint(transfer.partial.id, transfer.held, s.boot_id, s.clock.seconds())
    except Exception as e:
        s.health.failing(STORE, f"cannot record files: {reason(e)}")
        log.warn("the partial {id} of a complete file could not be recorded either ({error})",
                 id=transfer.partial.id, error=reason(e))


@defer.inlineCallbacks
def _to_outbox(digest: Any, s: "Services", session: "Connection", offer: FileOffer, transfer: Transfer) -> Any:
    partial = transfer.partial
    partial_id = partial.id if transfer.recorded else None
    transfer.close()  # (closed already by the flush's thread when the writes gave the digest)
    now = datetime.datetime.fromtimestamp(s.clock.seconds(), datetime.timezone.utc)
    received = ReceivedFile(
        path=s.spool.path(partial.spool_name), imei=offer.imei, peer=session.link.peer,
        protocol_id=offer.protocol_id, camera=offer.camera, flow=offer.flow, source=offer.source,
        identifier=offer.identifier, media=offer.media, metadata=offer.metadata, size=digest.size,
        sha256=digest.sha256, start_total=offer.total, start_crc=offer.start_crc,
        computed_crc=digest.crc, received_at=now, capture_time=capture_time(offer.metadata),
        resumed_from=transfer.resumed_from, crc_errors=transfer.crc_errors, id=new_id())
    if transfer.head is not None:
        s.heads.put(str(received.path), transfer.head)
    try:
        # Durable from here: the partial (if it was ever recorded) is gone.
        yield s.outbox.add(received, partial_id)
    except Exception as e:
        if s.journal is None:
            yield _record_again(s, transfer)
            raise
        why = reason(e)
        # The file is complete and flushed: keep it with a durable note, for the store later.
        entry = OutboxEntry(received.id, partial.spool_name, 0, 0, s.clock.seconds(), None, received.to_record(),
                            s.clock.seconds())
        try:
            yield s.journal.write(entry, partial_id, why)
        except Exception as note_error:
            log.error("camera {imei}: {id} is complete in spool file {name}, but neither the store ({error}) nor"
                      " the spool ({note_error}) can record it", imei=offer.imei, id=offer.printable,
                      name=partial.spool_name, error=why, note_error=reason(note_error))
            yield _record_again(s, transfer)
            raise
        log.warn("camera {imei}: {id} is complete ({size} bytes sha256 {sha256}) but the store cannot record it"
                 " ({error}): kept in spool file {name} with a durable note; it goes to the outbox once the"
                 " store answers", imei=offer.imei, id=offer.printable, size=digest.size, sha256=digest.sha256,
                 error=why, name=partial.spool_name, event="file_held_for_store")
    else:
        s.health.working(STORE)
    if offer.flow == "path" and offer.start_crc != digest.crc:
        log.warn("camera {imei}: {id} CRC {crc:#06x} differs from START's {start:#06x} (file kept)",
                 imei=offer.imei, id=offer.printable, crc=digest.crc, start=offer.start_crc)
    elapsed = s.clock.seconds() - (session.file_started_at or s.clock.seconds())
    s.stats.file_stored(elapsed, s.clock.seconds())
    log.info("file received: camera {imei} {id} {size} bytes sha256 {sha256} in {seconds:.1f} s",
             imei=offer.imei, id=offer.printable, size=digest.size, sha256=digest.sha256, seconds=elapsed,
             peer=session.link.peer, camera=offer.camera, source=offer.source, media=offer.media,
             resumed_from=transfer.resumed_from, crc_errors=transfer.crc_errors, computed_crc=digest.crc,
             start_total=offer.total, start_crc=offer.start_crc, event="file_received")
    return received
