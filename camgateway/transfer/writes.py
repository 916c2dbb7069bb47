"""The write policy of one camera connection: when received bytes go to the spool.

DATA payloads pile up in the transfer's pending buffer
(:mod:`camgateway.transfer.receiver`); :class:`WritePolicy` decides what
happens to them, at a few named points its session calls:

* **Batching** (:meth:`WritePolicy.read_over`, once per read): once
  :data:`WRITE_MIN` bytes are pending they are handed to a pool thread in one
  write (:func:`~camgateway.transfer.lifecycle.write_pending`). One write per
  file is in flight at a time.
* **Pausing**: behind a write in flight at most :data:`PENDING_MAX` bytes
  wait; then the camera's socket is paused (backpressure) until the write is
  over, and read again once what waited went to its own write.
* **Stale bytes** (:meth:`WritePolicy.visit`, the half-second scan): a slow
  camera's few pending bytes are written once they are :data:`FLUSH_AGE`
  seconds old, or :data:`TRICKLE_AGE` while they are fewer than
  :data:`TRICKLE_BYTES`; up to
  :data:`~camgateway.transfer.receiver.INLINE_WRITE_MAX` of them inline, on
  the reactor thread.
* **Read marks**: while the session receives, a slow camera is read a few
  frames at a time (:class:`~camgateway.perf.slow_reads.SlowReads`); the mark
  is dropped when the session leaves ``RECEIVING``
  (:meth:`WritePolicy.receiving_over`) or by the scan once it is stale.
* **Checkpoints**: every ``storage.checkpoint_bytes`` handed to the kernel,
  one at a time.

The policy files its session in ``Services.due`` for the moment something of
its own comes due with time alone (:mod:`camgateway.perf.due`); the scan then
calls the session's ``write_stale``, which calls :meth:`WritePolicy.visit`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

from camgateway.perf.slow_reads import ReadMarkLink, SlowReads
from camgateway.transfer.lifecycle import checkpoint, write_pending
from camgateway.transfer.receiver import INLINE_WRITE_MAX, Transfer

if TYPE_CHECKING:
    from camgateway.runtime.context import Services

__all__ = ["WritePolicy", "WriteOwner", "WriteLink", "WRITE_MIN", "PENDING_MAX", "FLUSH_AGE", "TRICKLE_BYTES",
           "TRICKLE_AGE"]

#: Pending bytes that make a write (to a pool thread).
WRITE_MIN = 256 * 1024
#: Pending bytes behind a write in flight at which the camera is paused.
PENDING_MAX = 1024 * 1024
#: Seconds after which fewer than WRITE_MIN pending bytes are written anyway...
FLUSH_AGE = 1.0
#: ... unless they are fewer than TRICKLE_BYTES: those (a camera sending under
#: 8 KiB/s) wait up to TRICKLE_AGE seconds, so that 10,000 cameras on slow
#: links cost a fifth of the writes. A connection holds at most about
#: max(8 KiB, a second of its rate) pending either way; a crash loses only
#: what the camera sends again on resume.
TRICKLE_BYTES = 8 * 1024
TRICKLE_AGE = 5.0


class WriteLink(ReadMarkLink, Protocol):
    """What the policy needs of the camera's connection: backpressure and read marks."""

    def pause(self) -> None:
        """Stop reading from the camera."""

    def resume(self) -> None:
        """Read from the camera again."""


class WriteOwner(Protocol):
    """What the policy needs of the session it writes for."""

    #: The file being received (None between files and once the connection is gone).
    transfer: Optional[Transfer]
    #: False once the connection is closing or gone: the camera is never read again.
    connected: bool

    def write_failed(self, transfer: Transfer, error: BaseException) -> None:
        """A write of the current file failed: the session gives the connection up."""

    def write_stale(self, now: float) -> None:
        """The scan's visit, when the moment the policy filed the session for has come."""

    def __hash__(self) -> int:
        """(Filed in ``Services.due``, the owner is a dict key.)"""


class WritePolicy:
    """When one connection's received bytes are written, and when its camera waits (module docstring)."""

    __slots__ = ("_s", "_owner", "_link", "reads", "paused")

    def __init__(self, services: "Services", owner: WriteOwner, link: WriteLink, read_wait: float) -> None:
        self._s = services
        self._owner = owner
        self._link = link
        #: The connection's receive low-water mark (slow cameras read a few frames at a time).
        self.reads = SlowReads(link, read_wait)
        #: The camera's socket is paused until a write is over.
        self.paused = False

    # -- the points the session calls

    def read_over(self, transfer: Transfer, buffered: int) -> None:
        """A read while receiving is over: write what is due, pace the next reads.

        ``buffered`` is what the decoder holds of a frame not yet whole.
        """
        if transfer.pending:
            self.write(transfer)
        held = transfer.held
        reads = self.reads
        reads.read(self._s.clock.seconds(), held, transfer.done_at - held - buffered)
        if reads.mark != 1:  # held (the one comparison a fast camera's read pays)
            self._file_mark()

    def write(self, transfer: Transfer) -> None:
        """Pending bytes arrived: write a batch, or let them wait (bounded, else the camera is paused)."""
        n = len(transfer.pending)
        if transfer.writing:  # one write at a time: the bytes wait, up to a bound
            if n >= PENDING_MAX and not self.paused:
                self.paused = True
                self._link.pause()
            return
        if n >= WRITE_MIN:
            write_pending(self._s, transfer, self._written)
        else:  # a slow camera: visit() writes these later
            if transfer.pending_since is None:
                transfer.pending_since = self._s.clock.seconds()
            self._file_pending(transfer)
        self._checkpoint_due(transfer)

    def receiving_over(self) -> None:
        """The session left ``RECEIVING``: every byte is read as it comes again."""
        self.reads.drop()

    def visit(self, now: float, transfer: Optional[Transfer]) -> None:
        """The scan's visit: drop a stale read mark, write pending bytes that waited long enough.

        Pending bytes are written after :data:`FLUSH_AGE` seconds, or
        :data:`TRICKLE_AGE` while fewer than :data:`TRICKLE_BYTES`. What is
        not due yet files the session again.
        """
        self.reads.stale(now)
        self._file_mark()  # (read since it was filed: not stale yet)
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
            write_pending(self._s, transfer, self._written)
        else:
            try:
                self._s.stats.bytes_received += transfer.flush()
            except OSError as e:
                self._owner.write_failed(transfer, e)
                return
        self._s.trickled(stale)  # (no flush of its own until the file ends)
        self._checkpoint_due(transfer)

    # -- inside

    def _written(self, transfer: Transfer) -> None:
        """A write is over: go on with what waited behind it, let the camera send again."""
        owner = self._owner
        if transfer.write_error is not None:
            if owner.transfer is transfer:
                owner.write_failed(transfer, transfer.write_error)
            return
        if owner.transfer is transfer and transfer.pending:
            self.write(transfer)
        if self.paused and len(transfer.pending) < PENDING_MAX:
            self.paused = False
            if owner.connected:
                self._link.resume()

    def _checkpoint_due(self, transfer: Transfer) -> None:
        """Checkpoint every ``checkpoint_bytes`` written, one checkpoint at a time."""
        if transfer.flushed - transfer.checkpointed >= self._s.config.checkpoint_bytes and transfer.syncing is None:
            checkpoint(self._s, transfer)

    def _file_mark(self) -> None:
        """Have the scan visit once the held read mark may be stale."""
        at = self.reads.stale_at()
        if at is not None:
            self._s.due.at(self._owner, at)

    def _file_pending(self, transfer: Transfer) -> None:
        """Have the scan visit once the pending bytes are old enough to write (sooner as they grow)."""
        wait = FLUSH_AGE if len(transfer.pending) >= TRICKLE_BYTES else TRICKLE_AGE
        self._s.due.at(self._owner, transfer.pending_since + wait)  # type: ignore[operator]
