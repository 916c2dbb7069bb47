"""The write policy on its own: batching, pausing, stale bytes, read marks (camgateway.transfer.writes).

A real transfer on a real spool file in a temp dir, a :class:`Jobs` pool that
holds each blocking step until the test runs it, a ``task.Clock`` and a link
over a ``StringTransport`` (its ``producerState`` says whether the camera is
paused). No session: the test calls the policy's named points as the session
does.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
from pathlib import Path
from typing import Any, Optional

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from camgateway.perf.settings import Performance
from camgateway.storage.records import Partial
from camgateway.transfer.receiver import Transfer
from camgateway.transfer.writes import (FLUSH_AGE, PENDING_MAX, TRICKLE_AGE, TRICKLE_BYTES, WRITE_MIN,
                                        WritePolicy)
from camgateway.wire.codec import DATA_FRAME, PACKET
from camgateway.wire.crc import crc16
from tests.support import make_services
from tests.test_writes import Jobs

#: The read mark's wait in these tests (seconds of a camera's rate).
WAIT = 4.0


class Link:
    """The camera's connection: pause/resume on a StringTransport, read marks recorded."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.marks: list[int] = []

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def set_read_mark(self, nbytes: int) -> bool:
        self.marks.append(nbytes)
        return True


class Owner:
    """The session the policy writes for, as far as the policy sees it."""

    def __init__(self) -> None:
        self.transfer: Optional[Transfer] = None
        self.connected = True
        self.failures: list[BaseException] = []
        self.policy: Optional[WritePolicy] = None

    def write_failed(self, transfer: Transfer, error: BaseException) -> None:
        self.failures.append(error)

    def write_stale(self, now: float) -> None:
        if self.connected:
            self.policy.visit(now, self.transfer)  # type: ignore[union-attr]


class WritePolicyTests(TestCase):
    def setUp(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        # The policy as it runs by default: the due-heap schedules its visits, read marks on.
        self.services = make_services(root, metadata=False, checkpoint_bytes=1 << 40,
                                      performance=Performance.every(True))
        self.jobs = Jobs()
        self.services.run_in_thread = self.jobs
        self.clock = self.services.clock
        packets = 2 * PENDING_MAX // PACKET + 64
        self.content = random.Random(27).randbytes(packets * PACKET)
        partial = Partial("p1", "863719061653375", "dualcam", b"%videof", packets, 0, None, 0, "boot-1", "p1.part",
                          0.0, 0.0)
        self.services.store.add(partial)
        self.transfer = Transfer(partial, self.services.spool.open(partial.spool_name, 0))
        self.addCleanup(self.transfer.close)
        self.link = Link()
        self.owner = Owner()
        self.owner.transfer = self.transfer
        self.policy = self.owner.policy = WritePolicy(self.services, self.owner, self.link, WAIT)
        self.received = 0
        self._crc = 0

    def receive(self, kib: int, buffered: int = 0) -> None:
        """A read that brought ``kib`` DATA frames: the transfer takes them, then the read is over."""
        for _ in range(kib):
            chunk = self.content[self.received : self.received + PACKET]
            self._crc = crc16(chunk, self._crc)
            self.assertTrue(self.transfer.append(memoryview(chunk), self._crc))
            self.received += PACKET
        self.policy.read_over(self.transfer, buffered)

    def written(self) -> bytes:
        with open(self.services.spool.path(self.transfer.partial.spool_name), "rb") as f:
            return f.read()

    def scan(self) -> None:
        """The half-second scan: visit the owners whose moment has come."""
        now = self.clock.seconds()
        for owner in self.services.due.take(now):
            owner.write_stale(now)

    # -- batching and pausing

    def test_bytes_wait_until_a_batch_is_whole(self) -> None:
        self.receive(WRITE_MIN // PACKET - 1)
        self.assertEqual(self.jobs.calls, [])
        self.assertIn(self.owner, self.services.due)  # filed for the scan meanwhile
        self.receive(1)
        self.assertEqual(self.jobs.names(), ["write_chunk"])  # one write of the whole batch
        self.assertEqual(self.transfer.pending, b"")
        self.jobs.run_all()
        self.assertEqual(self.written(), self.content[:WRITE_MIN])
        self.assertFalse(self.transfer.writing)

    def test_pause_at_pending_max_and_resume_after_the_write(self) -> None:
        self.receive(WRITE_MIN // PACKET)
        self.receive(PENDING_MAX // PACKET - 1)
        self.assertEqual(self.jobs.names(), ["write_chunk"])  # one write in flight at a time
        self.assertEqual(self.link.transport.producerState, "producing")
        self.receive(1)  # PENDING_MAX behind the write: the camera waits
        self.assertEqual(self.link.transport.producerState, "paused")
        self.assertTrue(self.policy.paused)
        self.jobs.run_one()  # the write is over: what waited is the next write, the camera sends again
        self.assertEqual(self.link.transport.producerState, "producing")
        self.assertFalse(self.policy.paused)
        self.assertEqual(self.jobs.names(), ["write_chunk"])
        self.jobs.run_all()
        self.assertEqual(self.written(), self.content[: WRITE_MIN + PENDING_MAX])

    def test_a_camera_gone_is_not_resumed(self) -> None:
        self.receive(WRITE_MIN // PACKET)
        self.receive(PENDING_MAX // PACKET)
        self.assertEqual(self.link.transport.producerState, "paused")
        self.owner.connected = False
        self.owner.transfer = None  # (the session let the transfer go: the release writes the rest)
        self.jobs.run_one()
        self.assertEqual(self.link.transport.producerState, "paused")
        self.assertEqual(self.jobs.calls, [])  # nothing more written by the policy

    def test_a_failed_write_is_the_owner_s_while_the_file_is_current(self) -> None:
        def full(fd: int, data: Any, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "pwrite", full)
        self.receive(WRITE_MIN // PACKET)
        self.owner.transfer = None  # the file is over meanwhile: its finish or release reports the error
        self.jobs.run_all()
        self.assertEqual(self.owner.failures, [])
        self.owner.transfer = self.transfer
        self.receive(WRITE_MIN // PACKET)  # nothing is written after a failed write; the owner hears why
        self.assertEqual(self.jobs.calls, [])
        self.assertEqual([e.errno for e in self.owner.failures], [errno.ENOSPC])  # type: ignore[attr-defined]
        self.assertEqual(self.written(), b"")

    def test_a_checkpoint_every_checkpoint_bytes(self) -> None:
        self.services.config = dataclasses.replace(self.services.config, checkpoint_bytes=WRITE_MIN)
        self.receive(WRITE_MIN // PACKET)
        self.assertIsNotNone(self.transfer.syncing)  # asked, after the write
        self.jobs.run_one()
        self.assertEqual(self.jobs.names(), ["fdatasync"])
        self.jobs.run_all()
        self.assertEqual(self.services.store.partials["p1"].held, WRITE_MIN)

    # -- stale bytes

    def test_stale_bytes_are_written_after_flush_age(self) -> None:
        self.receive(TRICKLE_BYTES // PACKET)
        self.clock.advance(FLUSH_AGE - 0.01)
        self.scan()
        self.assertEqual(self.written(), b"")  # too recent
        self.clock.advance(0.01)
        self.scan()
        self.assertEqual(self.written(), self.content[:TRICKLE_BYTES])  # written inline: a few KiB
        self.assertEqual(self.jobs.calls, [])
        self.assertEqual(self.services.stats.bytes_received, TRICKLE_BYTES)

    def test_a_trickle_waits_trickle_age(self) -> None:
        self.receive(3)
        self.clock.advance(FLUSH_AGE)
        self.scan()
        self.assertEqual(self.written(), b"")  # under TRICKLE_BYTES: not yet
        self.clock.advance(TRICKLE_AGE - FLUSH_AGE - 0.01)
        self.scan()
        self.assertEqual(self.written(), b"")
        self.clock.advance(0.01)
        self.scan()
        self.assertEqual(self.written(), self.content[: 3 * PACKET])

    def test_a_trickle_that_grows_is_written_after_flush_age(self) -> None:
        self.receive(3)
        self.receive(TRICKLE_BYTES // PACKET)  # over TRICKLE_BYTES now: filed sooner
        self.clock.advance(FLUSH_AGE)
        self.scan()
        self.assertEqual(self.written(), self.content[: 3 * PACKET + TRICKLE_BYTES])

    def test_the_first_stale_write_of_an_unrecorded_file_is_a_step_after_its_record(self) -> None:
        self.transfer.recorded = False
        del self.services.store.partials["p1"]
        self.receive(3)
        self.clock.advance(TRICKLE_AGE)
        self.scan()
        self.assertEqual(self.jobs.names(), ["write_chunk"])  # not inline
        self.assertIn("p1", self.services.store.partials)  # recorded first
        self.jobs.run_all()
        self.assertEqual(self.written(), self.content[: 3 * PACKET])

    def test_bytes_behind_a_write_in_flight_wait_for_it(self) -> None:
        self.receive(WRITE_MIN // PACKET)
        self.receive(3)
        self.clock.advance(TRICKLE_AGE)
        self.policy.visit(self.clock.seconds(), self.transfer)
        self.assertEqual(self.jobs.names(), ["write_chunk"])  # the scan leaves them to _written
        self.jobs.run_one()  # over: the 3 KiB are a slow camera's now, filed again
        self.assertEqual(self.written(), self.content[:WRITE_MIN])
        self.clock.advance(TRICKLE_AGE)
        self.scan()
        self.assertEqual(self.written(), self.content[: WRITE_MIN + 3 * PACKET])

    # -- read marks

    def slow(self) -> None:
        """A camera sending a frame a second, read twice: its mark is set to WAIT seconds of it."""
        self.receive(1)
        self.clock.advance(1.0)
        self.receive(1)

    def test_a_slow_camera_s_read_mark_is_set_and_dropped_leaving_receiving(self) -> None:
        self.slow()
        self.assertEqual(self.link.marks, [int(WAIT) * DATA_FRAME])
        self.assertEqual(self.policy.reads.mark, int(WAIT) * DATA_FRAME)
        self.policy.receiving_over()
        self.assertEqual(self.link.marks, [int(WAIT) * DATA_FRAME, 1])
        self.assertEqual(self.policy.reads.mark, 1)

    def test_a_stale_read_mark_is_dropped_by_the_scan(self) -> None:
        self.slow()
        self.clock.advance(TRICKLE_AGE)
        self.scan()  # (its pending bytes are written; the mark is not stale yet)
        self.assertEqual(self.policy.reads.mark, int(WAIT) * DATA_FRAME)
        self.clock.advance(2 * WAIT - TRICKLE_AGE + 0.01)  # not read for twice its wait
        self.scan()
        self.assertEqual(self.link.marks, [int(WAIT) * DATA_FRAME, 1])

    def test_a_fast_camera_is_never_held(self) -> None:
        self.receive(64)
        self.clock.advance(0.01)
        self.receive(64)
        self.assertEqual(self.link.marks, [])

    def test_the_mark_never_holds_the_file_s_last_bytes(self) -> None:
        self.slow()
        left = self.transfer.done_at - self.transfer.held
        self.clock.advance(1.0)
        self.receive(1, buffered=left - PACKET - 2 * DATA_FRAME)  # the decoder holds most of what is left
        self.assertEqual(self.policy.reads.mark, 2 * DATA_FRAME)  # what is left on the wire, not WAIT's 4
