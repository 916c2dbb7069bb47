"""Where interrupted transfers are remembered: the resume-offset store.

A *partial* is a file a camera started to send and did not finish. Its bytes
live in a spool file (:mod:`camgateway.transfer.spool`); the store records what the
file is and how many of its bytes are known to be durable, so that when the
camera offers the same file again, on any later connection, the gateway asks
it to RESUME where it stopped (PROTOCOL.md section 9).

Write order, which makes the store and the spool agree after a crash:

1. the record is inserted (``held`` 0) before the spool file gets any byte;
2. bytes are appended to the spool file as frames pass their CRC;
3. a checkpoint ``fdatasync``\\ s the spool file, *then* records ``held``
   (and the kernel's boot id) in the store.

So ``held`` never exceeds what is on stable storage. On start the gateway
reconciles (:func:`camgateway.transfer.spool.reconcile`): when the machine has not
rebooted since the checkpoint (same boot id), the page cache survived a
``kill -9`` and every byte in the spool file is good; after a reboot only
``held`` bytes are trusted and the file is truncated to them. Spool files
with no record, and records with no spool file, are dropped.

The store is an interface (:class:`IResumeStore`) so that other backends
(for example a shared one for several instances) can replace the embedded
SQLite one (:class:`camgateway.storage.sqlite.SQLiteStore`), the default.
:class:`camgateway.storage.memory.MemoryStore` is for tests.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from twisted.internet.defer import Deferred
from zope.interface import Interface

__all__ = ["Partial", "IResumeStore"]


@dataclasses.dataclass
class Partial:
    """One interrupted transfer: what the file is, and how much of it is held."""

    id: str
    imei: str
    flow: str  # "dualcam" or "path"
    identifier: bytes  # b"%videof" or the device path as received
    total: int  # START's u32: packets (DualCam) or bytes (path flow)
    start_crc: int
    meta_timestamp: Optional[str]
    held: int  # bytes durable in the spool file
    boot_id: str
    spool_name: str
    first_seen: float
    last_seen: float

    @property
    def key(self) -> tuple[str, str, bytes]:
        """The file's identity (what :meth:`IResumeStore.find` looks up; ``FileOffer.key``)."""
        return (self.imei, self.flow, self.identifier)

    def matches(self, total: int, start_crc: int, meta_timestamp: Optional[str]) -> bool:
        """Whether a file offered now is the one this partial holds the start of."""
        if total != self.total or start_crc != self.start_crc:
            return False
        if meta_timestamp and self.meta_timestamp and meta_timestamp != self.meta_timestamp:
            return False
        return True


class IResumeStore(Interface):
    """Records partial transfers. Every method returns a Deferred."""

    def find(imei: str, flow: str, identifier: bytes) -> Deferred:
        """The :class:`Partial` for this file identity, or None."""

    def add(partial: Partial) -> Deferred:
        """Record a new partial, replacing any other with the same identity."""

    def checkpoint(partial_id: str, held: int, boot_id: str, now: float) -> Deferred:
        """Record that ``held`` bytes of the partial are durable."""

    def remove(partial_id: str) -> Deferred:
        """Forget a partial (finished, discarded or expired)."""

    def all() -> Deferred:
        """Every partial, oldest first."""

    def expired(before: float) -> Deferred:
        """Partials last seen before ``before`` (a POSIX time)."""

    def close() -> Deferred:
        """Release the store's resources."""
