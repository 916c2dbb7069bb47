"""The half-second scan visits only the sessions with something due (camgateway.perf.due)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from camgateway.wire import codec
from camgateway.perf.due import DueSessions
from camgateway.runtime.service import flush_stale
from camgateway.session.machine import Session, State
from camgateway.perf.slow_reads import READ_WAIT
from camgateway.transfer.writes import FLUSH_AGE, TRICKLE_AGE
from camgateway.perf.settings import Performance
from tests.support import connect, make_services
from tests.test_session import IMEI, VIDEOF, data_frames

KIB = 1024


class DueSessionsTests(TestCase):
    """The heap alone."""

    def test_each_item_comes_once_at_its_earliest_time(self) -> None:
        due = DueSessions()
        due.at("a", 5.0)
        due.at("b", 2.0)
        due.at("a", 7.0)  # later than it is filed for: nothing changes
        due.at("c", 3.0)
        due.at("c", 1.0)  # sooner: supersedes
        self.assertEqual(len(due), 3)
        self.assertEqual(due.take(0.5), [])
        self.assertEqual(due.take(2.0), ["c", "b"])
        self.assertEqual(due.take(4.0), [])  # c's superseded entry at 3.0 is not a second visit
        self.assertNotIn("c", due)
        self.assertIn("a", due)
        self.assertEqual(due.take(100.0), ["a"])
        self.assertEqual(len(due), 0)

    def test_an_item_taken_may_be_filed_again(self) -> None:
        due = DueSessions()
        due.at("a", 1.0)
        self.assertEqual(due.take(1.0), ["a"])
        due.at("a", 3.0)
        self.assertEqual(due.take(2.0), [])
        self.assertEqual(due.take(3.0), ["a"])

    def test_a_discarded_item_is_not_visited(self) -> None:
        due = DueSessions()
        due.at("a", 1.0)
        due.at("b", 1.0)
        due.discard("a")
        due.discard("x")  # never filed: nothing happens
        self.assertEqual(due.take(2.0), ["b"])


class ScanTests(TestCase):
    """Which sessions the scan visits (StringTransport, Clock)."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.services = make_services(self.root, metadata=False, performance=Performance.every(True))
        self.clock = self.services.clock
        self.visits: list[Any] = []
        real = Session.write_stale

        def counted(session: Session, now: float) -> None:
            self.visits.append(session)
            real(session, now)

        self.patch(Session, "write_stale", counted)

    def receiving(self, n: int, held: bool = False) -> tuple[Any, list[bytes]]:
        """A camera mid-file (IMEI + n), its link able to hold a read mark if ``held``; its frames."""
        protocol, _ = connect(self.services, peer=f"10.0.0.{n + 1}")
        if held:
            protocol.set_read_mark = lambda nbytes: True  # type: ignore[method-assign]
        frames = data_frames(random.Random(n).randbytes(256 * KIB))
        protocol.dataReceived(codec.init_packet(5, IMEI + n, VIDEOF))
        protocol.dataReceived(codec.start(len(frames), 0))
        protocol.dataReceived(codec.sync(1))
        self.assertEqual(protocol.session.state, State.RECEIVING)
        return protocol, frames

    def scan_for(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.5)):
            self.clock.advance(0.5)
            flush_stale(self.services)

    def test_sessions_with_nothing_due_are_not_visited(self) -> None:
        for n in range(20):  # mid-file, nothing pending, read as they come
            self.receiving(n)
        idle, _ = connect(self.services, peer="10.0.1.1")  # and one that sent nothing yet
        self.scan_for(30.0)
        self.assertEqual(self.visits, [])

    def test_pending_bytes_are_visited_once_when_due(self) -> None:
        protocol, frames = self.receiving(0)
        protocol.dataReceived(b"".join(frames[:3]))  # 3 KiB: a trickle, written TRICKLE_AGE later
        self.assertTrue(protocol.session.transfer.pending)
        self.scan_for(TRICKLE_AGE - 0.5)
        self.assertEqual(self.visits, [])
        self.scan_for(0.5)
        self.assertEqual(self.visits, [protocol.session])
        self.assertFalse(protocol.session.transfer.pending)  # written
        self.scan_for(30.0)
        self.assertEqual(self.visits, [protocol.session])  # nothing more to do: not visited again

    def test_a_trickle_that_grows_is_written_after_flush_age(self) -> None:
        protocol, frames = self.receiving(0)
        protocol.dataReceived(b"".join(frames[:3]))
        self.scan_for(0.5)
        protocol.dataReceived(b"".join(frames[3:10]))  # 10 KiB now: over TRICKLE_BYTES
        self.scan_for(FLUSH_AGE - 0.5)
        self.assertEqual(self.visits, [protocol.session])
        self.assertFalse(protocol.session.transfer.pending)

    def test_a_held_camera_is_visited_when_it_may_be_stale_not_at_every_scan(self) -> None:
        protocol, frames = self.receiving(0, held=True)
        session = protocol.session
        sent = 0
        for _ in range(4):  # a frame a second: held
            self.clock.advance(1.0)
            protocol.dataReceived(frames[sent])
            sent += 1
        self.assertNotEqual(session.writes.reads.mark, 1)
        self.visits.clear()
        # Read every READ_WAIT seconds for 120 s, as the kernel would wake it: never stale.
        for _ in range(int(120 / READ_WAIT)):
            for _ in range(int(READ_WAIT / 0.5)):
                self.clock.advance(0.5)
                flush_stale(self.services)
            protocol.dataReceived(b"".join(frames[sent:sent + int(READ_WAIT)]))
            sent += int(READ_WAIT)
        self.assertNotEqual(session.writes.reads.mark, 1)
        scans = int(120 / 0.5)
        self.assertLess(len(self.visits), scans / 4, f"{len(self.visits)} visits in {scans} scans")
