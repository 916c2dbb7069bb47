"""Spool files made ahead: a new file's RESUME waits for no thread, and nothing is left behind."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from twisted.internet import task
from twisted.trial.unittest import TestCase

from camgateway.wire import codec
from camgateway.perf.reserve import SpoolReserve
from camgateway.runtime.service import reconcile
from camgateway.transfer.spool import Spool
from tests.support import connect, make_services
from tests.test_session import IMEI, VIDEOF
from tests.test_writes import Jobs


class ReserveTests(TestCase):
    def setUp(self) -> None:
        self.spool = Spool(Path(self.mktemp()))
        self.spool.ensure()
        self.jobs = Jobs()
        self.clock = task.Clock()
        self.min_free = 0
        self.reserve = SpoolReserve(self.spool, self.jobs, self.clock, lambda: self.min_free, size=4, low=2)

    def on_disk(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.spool.partials.iterdir()}

    def test_nothing_before_start_then_batches_of_files_made_ahead(self) -> None:
        self.assertIsNone(self.reserve.take())
        self.assertEqual(self.jobs.calls, [])  # not started: the start-up reconcile may still run
        self.reserve.start()
        self.assertEqual(self.jobs.names(), ["_make"])
        self.jobs.run_all()
        self.assertEqual(sorted(self.on_disk().values()), [0, 0, 0, 0])
        name, fd = self.reserve.take()  # type: ignore[misc]
        self.addCleanup(os.close, fd)
        os.write(fd, b"abc")  # an open, writable file of the spool
        self.assertEqual(self.on_disk()[name], 3)
        self.assertNotIn(name, self.reserve.names())
        self.assertEqual(self.jobs.calls, [])  # 3 left: above the low mark
        for _ in range(2):
            os.close(self.reserve.take()[1])  # type: ignore[index]
        self.assertEqual(self.jobs.names(), ["_make"])  # under the low mark: one more batch
        self.jobs.run_all()
        self.assertEqual(len(self.reserve.names()), 4)
        self.assertEqual((self.reserve.taken, self.reserve.missed), (3, 1))

    def test_a_stale_free_space_check_gives_nothing_and_checks_again(self) -> None:
        self.reserve.start()
        self.jobs.run_all()
        self.clock.advance(self.reserve.max_age + 0.1)
        self.assertIsNone(self.reserve.take())  # the caller creates (and checks) itself
        self.assertEqual(self.jobs.names(), ["_make"])
        self.jobs.run_all()
        self.assertIsNotNone(self.reserve.take())

    def test_low_space_gives_nothing_and_makes_nothing(self) -> None:
        self.min_free = 10**18
        self.reserve.start()
        self.jobs.run_all()
        self.assertEqual(self.on_disk(), {})
        self.assertIsNone(self.reserve.take())
        self.jobs.run_all()
        self.min_free = 0  # asked at every take: room again after the next check
        self.assertIsNone(self.reserve.take())
        self.jobs.run_all()
        self.assertIsNotNone(self.reserve.take())

    def test_made_files_are_no_use_once_the_limit_is_raised(self) -> None:
        self.reserve.start()
        self.jobs.run_all()
        self.min_free = 10**18  # "the disk is full" since the last check
        self.assertIsNone(self.reserve.take())

    def test_close_removes_what_was_not_taken_even_a_batch_in_flight(self) -> None:
        self.reserve.start()
        self.jobs.run_all()
        name, fd = self.reserve.take()  # type: ignore[misc]
        os.close(fd)
        self.reserve.take()
        os.close(self.reserve.take()[1])  # type: ignore[index]
        self.assertEqual(self.jobs.names(), ["_make"])  # a batch on its way
        closed = self.reserve.close()
        self.assertNoResult(closed)
        self.jobs.run_all()
        self.successResultOf(closed)
        left = set(self.on_disk())
        self.assertIn(name, left)  # taken files are their transfers'
        self.assertEqual(len(left), 3)
        self.assertIsNone(self.reserve.take())


class SessionTests(TestCase):
    def test_a_new_file_is_asked_for_with_no_thread_step(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        services = make_services(root, metadata=False)
        jobs = Jobs()
        services.run_in_thread = jobs
        services.reserve = SpoolReserve(services.spool, jobs, services.clock, lambda: 0)
        services.reserve.start()
        jobs.run_all()
        protocol, transport = connect(services)
        protocol.dataReceived(codec.init_packet(5, IMEI, VIDEOF) + codec.start(3, 0))
        self.assertTrue(transport.value().endswith(codec.resume(1)))  # no job ran for it
        self.assertEqual(jobs.calls, [])
        partial = protocol.session.transfer.partial
        self.assertEqual(services.store.partials, {})  # recorded with its first write or checkpoint
        self.assertNotIn(partial.spool_name, services.reserve.names())
        self.assertTrue(services.spool.path(partial.spool_name).exists())

    def test_files_made_ahead_by_a_killed_gateway_are_reconciled_away(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        services = make_services(root, metadata=False)
        reserve = SpoolReserve(services.spool, services.run_in_thread, services.clock, lambda: 0)
        reserve.start()  # run_now: made at once
        made = reserve.names()
        self.assertEqual(len(made), reserve.size)
        # the process dies here; the next start reconciles before making its own
        fresh = dataclasses.replace(services)
        self.successResultOf(reconcile(fresh))
        self.assertEqual(list(services.spool.partials.iterdir()), [])
