"""Spool writes off the reactor: batching, backpressure, digests, failures, group sync.

A :class:`Jobs` run_in_thread holds every blocking call until the test runs
it, so what is written when, and what waits behind it, is observable.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import random
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from camgateway.wire import codec

from camgateway.transfer import receiver as transfer
from camgateway.perf import durability as durability_module
from camgateway.transfer import lifecycle as files_module
from camgateway.perf.durability import HAVE_SYNCFS, GroupSync, syncfs
from camgateway.transfer.lifecycle import record_partial
from camgateway.session.protocol import CameraFactory
from camgateway.storage.records import Partial
from camgateway.runtime.service import flush_stale
from camgateway.session.machine import State
from camgateway.delivery.sinks import ReceivedFile
from camgateway.delivery.sinks import disk as disk_module
from camgateway.delivery.sinks.disk import DiskSink
from camgateway.transfer.receiver import RUN_BAD_CRC, RUN_COMPLETE, Transfer
from camgateway.transfer.writes import FLUSH_AGE, PENDING_MAX, TRICKLE_AGE, TRICKLE_BYTES, WRITE_MIN
from tests.support import connect, make_services, run_now, stored_files
from tests.test_session import IMEI, VIDEOF, data_frames


class Jobs:
    """A run_in_thread whose calls wait in a list until run."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple, defer.Deferred]] = []
        self.kwargs: dict[int, dict[str, Any]] = {}
        self.held = True

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.kwargs[id(d)] = kwargs
        self.calls.append((f, args, d))
        if not self.held:
            self.run_all()
        return d

    def names(self) -> list[str]:
        return [getattr(f, "__name__", repr(f)) for f, _, _ in self.calls]

    def run_one(self) -> None:
        f, args, d = self.calls.pop(0)
        running = getattr(self, "running", [])
        running.append(f)  # (what runs from here to the result is "in the step"; its callbacks are not)
        try:
            result = f(*args, **self.kwargs.pop(id(d)))
        except BaseException:
            failure = Failure()
            running.remove(f)
            d.errback(failure)
        else:
            running.remove(f)
            d.callback(result)

    def run_all(self) -> None:
        while self.calls:
            self.run_one()


def partial(total: int, held: int = 0) -> Partial:
    return Partial("p1", str(IMEI), "dualcam", b"%videof", total, 0, None, held, "boot-1", "p1.part", 0.0, 0.0)


class HeadTests(TestCase):
    """Transfer.head: the spool file's first bytes, as its writes put them there."""

    def test_set_by_the_write_at_offset_0_and_dropped_by_a_truncation_into_them(self) -> None:
        fd = os.open(self.mktemp(), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        t = Transfer(partial(3), fd)
        t.write_chunk(bytearray(b"x" * 8), 0, None)
        self.assertIsNone(t.head)  # (fewer than HEAD_BYTES: the sink reads them)
        t.write_chunk(bytearray(b"\xff\xd8" + b"a" * 30), 0, 0)
        self.assertEqual(t.head, b"\xff\xd8" + b"a" * 14)
        t.write_chunk(bytearray(b"b" * 1024), 1024, None)
        self.assertEqual(t.head, b"\xff\xd8" + b"a" * 14)  # later writes leave it
        t.write_chunk(bytearray(b"c" * 100), 8, 8)
        self.assertIsNone(t.head)  # truncated into it: unknown again
        self.assertEqual(os.pread(fd, 16, 0), b"\xff\xd8" + b"a" * 6 + b"c" * 8)


class BlockTests(TestCase):
    """take_run's blocks of whole frames decide exactly as frame by frame."""

    def take(self, stream: bytes, total: int, block_min: int) -> tuple[int, int, int, bytes]:
        self.patch(transfer, "_BLOCK_MIN", block_min)
        t = Transfer(partial(total), -1)
        t._first_after_sync = False
        buf = bytearray(stream)
        with memoryview(buf) as view:
            pos, status = t.take_run(buf, view, 0, len(buf))
        return pos, status, t.held, bytes(t.pending)

    def test_same_result_as_frame_by_frame(self) -> None:
        rng = random.Random(5)
        content = rng.randbytes(40 * 1024 + 300)
        total = 41
        clean = data_frames(content)
        cases: list[tuple[str, list[bytes]]] = [("clean", clean)]
        for j in (0, 3, 17, 39):
            bad_crc = list(clean)
            bad_crc[j] = clean[j][:-1] + bytes([clean[j][-1] ^ 0x5A])  # only the CRC field is wrong
            bad_data = list(clean)
            bad_data[j] = clean[j][:100] + bytes([clean[j][100] ^ 1]) + clean[j][101:]
            cases += [(f"crc field {j}", bad_crc), (f"payload {j}", bad_data)]
        wrong_header = list(clean)
        wrong_header[5] = codec.sync(3)  # not a DATA frame
        cases.append(("sync inside", wrong_header))
        for name, frames in cases:
            stream = b"".join(frames)
            for cut in (len(stream), len(stream) - 700, 9 * 1030 + 3):
                block = self.take(stream[:cut], total, 4)
                frame = self.take(stream[:cut], total, 10**9)
                self.assertEqual(block, frame, f"{name}, {cut} bytes")
        pos, status, held, pending = self.take(b"".join(clean), total, 4)
        self.assertEqual((status, held, pending), (RUN_COMPLETE, len(content), content))
        pos, status, held, _ = self.take(b"".join(cases[1][1]), total, 4)  # CRC field of frame 0 wrong
        self.assertEqual((status, held), (RUN_BAD_CRC, 0))


class SessionWriteTests(TestCase):
    """Through a whole session: what it writes when, and the camera paused while writes are behind.

    The write policy's own tests are in test_write_policy.py.
    """

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.jobs = Jobs()
        self.services = make_services(self.root, metadata=False)
        self.services.run_in_thread = self.jobs
        self.jobs.held = False
        self.protocol, self.transport = connect(self.services)
        self.content = random.Random(3).randbytes(2 * PENDING_MAX + 5000)
        self.frames = data_frames(self.content)
        self.protocol.dataReceived(codec.init_packet(5, IMEI, VIDEOF))
        self.protocol.dataReceived(codec.start(len(self.frames), 0))
        self.assertEqual(self.transport.value()[-8:], codec.resume(1))
        self.transport.clear()
        self.jobs.held = True
        self.protocol.dataReceived(codec.sync(1))
        self.session = self.protocol.session
        self.transfer = self.session.transfer
        self.sent_frames = 0

    def send(self, frames: int) -> None:
        chunk = b"".join(self.frames[self.sent_frames : self.sent_frames + frames])
        self.sent_frames += frames
        self.protocol.dataReceived(chunk)

    def written(self) -> bytes:
        with open(self.services.spool.path(self.transfer.partial.spool_name), "rb") as f:
            return f.read()

    def test_batches_bound_and_pause(self) -> None:
        frames_min = WRITE_MIN // 1024
        self.send(frames_min - 1)
        self.assertEqual(self.jobs.calls, [])  # under WRITE_MIN: nothing written yet
        self.send(1)
        self.assertEqual(self.jobs.names(), ["write_chunk"])  # one write of the whole batch
        self.assertTrue(self.transfer.writing)
        self.send(PENDING_MAX // 1024 - 1)
        self.assertEqual(self.jobs.names(), ["write_chunk"])  # one write in flight at a time
        self.assertEqual(self.transport.producerState, "producing")
        self.send(1)  # PENDING_MAX waits behind the write: the camera is paused
        self.assertEqual(self.transport.producerState, "paused")
        self.jobs.run_one()  # the write is done: the waiting bytes go, the camera may send again
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.jobs.names(), ["write_chunk"])
        self.assertEqual(self.written(), self.content[: WRITE_MIN])
        self.jobs.run_all()
        self.assertEqual(self.written(), self.content[: WRITE_MIN + PENDING_MAX])
        self.assertFalse(self.transfer.writing)

    def recorded(self) -> None:
        """The setUp file's partial is in the store (as after its first write)."""
        record_partial(self.services, self.transfer)
        self.jobs.run_all()

    def test_slow_camera_bytes_are_written_by_the_timer(self) -> None:
        self.recorded()
        clock = self.services.clock
        frames = TRICKLE_BYTES // 1024
        self.send(frames)
        self.assertEqual(len(self.transfer.pending), TRICKLE_BYTES)
        flush_stale(self.services)
        self.assertEqual(self.written(), b"")  # too recent
        clock.advance(FLUSH_AGE)
        flush_stale(self.services)
        self.assertEqual(self.written(), self.content[: TRICKLE_BYTES])  # written inline: small
        self.assertEqual(self.jobs.calls, [])

    def test_a_trickle_waits_longer(self) -> None:
        self.recorded()
        clock = self.services.clock
        self.send(3)  # 3 KiB: under TRICKLE_BYTES
        clock.advance(FLUSH_AGE)
        flush_stale(self.services)
        self.assertEqual(self.written(), b"")  # a trickle: not yet
        clock.advance(TRICKLE_AGE - FLUSH_AGE - 0.01)
        flush_stale(self.services)
        self.assertEqual(self.written(), b"")
        clock.advance(0.01)
        flush_stale(self.services)
        self.assertEqual(self.written(), self.content[: 3 * 1024])
        self.assertEqual(self.jobs.calls, [])

    def test_stale_bytes_are_reported_to_the_spool_s_group_sync(self) -> None:
        reported: list[int] = []
        self.services.spool_sync = SimpleNamespace(written=reported.append)
        self.recorded()
        clock = self.services.clock
        self.send(3)
        clock.advance(TRICKLE_AGE)
        flush_stale(self.services)
        self.assertEqual(reported, [3 * 1024])  # written inline, flushed by no one until the file ends
        frames = WRITE_MIN // 1024 - 1
        self.send(frames)  # a batch under WRITE_MIN, gone stale: written by a step, reported too
        clock.advance(FLUSH_AGE)
        flush_stale(self.services)
        self.assertEqual(self.jobs.names(), ["write_chunk"])
        self.assertEqual(reported, [3 * 1024, frames * 1024])
        self.jobs.run_all()
        self.send(WRITE_MIN // 1024)  # a full batch: written at once, not stale, not reported
        self.assertEqual(self.jobs.names(), ["write_chunk"])
        self.assertEqual(reported, [3 * 1024, frames * 1024])

    def photo_session(self) -> tuple[bytes, Any]:
        """A fresh camera sending a whole 5 KiB file in one read (setUp's transfer is left alone)."""
        content = random.Random(9).randbytes(5 * 1024)
        protocol, transport = connect(self.services, peer="10.0.0.2")
        self.jobs.held = False
        protocol.dataReceived(codec.init_packet(5, IMEI + 1, VIDEOF) + codec.start(5, 0))
        self.photo_transfer = protocol.session.transfer
        self.jobs.held = True
        transport.clear()
        protocol.dataReceived(codec.sync(1) + b"".join(data_frames(content)))
        return content, (protocol, transport)

    def closes(self) -> list[str]:
        """Record the spool files' closes (Transfer's) from now on: "in a step" when a job runs them."""
        events: list[str] = []
        running = self.jobs.running = []  # type: ignore[attr-defined]

        class Os:
            def __getattr__(self, name: str) -> Any:
                return getattr(os, name)

            def close(self, fd: int) -> None:
                events.append("close in a step" if running else "close on the reactor")
                os.close(fd)

        self.patch(transfer, "os", Os())
        return events

    def test_a_photo_is_written_by_its_flush_step_not_on_the_reactor(self) -> None:
        content, (protocol, transport) = self.photo_session()
        self.assertEqual(self.jobs.names(), ["_write_then_sync"])  # one step: the bytes, then fdatasync
        partial = self.photo_transfer.partial
        self.assertEqual(self.services.spool.path(partial.spool_name).stat().st_size, 0)  # nothing written yet
        # Received in one go: no partial record is made, the outbox entry comes straight.
        self.assertEqual([p for p in self.services.store.partials.values() if p.imei == str(IMEI + 1)], [])
        self.assertEqual(transport.value(), b"")  # not acknowledged before it is durable
        events = self.closes()
        self.jobs.run_all()
        self.assertEqual(events, ["close in a step"])  # closed by its flush step once durable, and only there
        self.assertEqual(transport.value(), codec.repeat_init())
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), content)
        meta = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(meta["sha256"], hashlib.sha256(content).hexdigest())  # hashed by that step too

    def test_a_photo_received_in_one_go_is_never_recorded_as_a_partial(self) -> None:
        store = self.services.store
        added: list[str] = []
        enqueued: list[object] = []
        real_add, real_enqueue = store.add, store.enqueue
        self.patch(store, "add", lambda partial: (added.append(partial.imei), real_add(partial))[1])
        self.patch(store, "enqueue", lambda entry, partial_id: (enqueued.append(partial_id),
                                                                real_enqueue(entry, partial_id))[1])
        reads: list[str] = []
        self.patch(disk_module, "head_of", lambda path: (reads.append(path), b"")[1])
        content, (protocol, transport) = self.photo_session()
        self.jobs.run_all()
        self.assertEqual(transport.value(), codec.repeat_init())
        self.assertEqual((added, enqueued), ([], [None]))  # two statements fewer per photo
        self.assertEqual((reads, len(self.services.heads)), ([], 0))  # its first bytes came from the writes
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), content)

    def test_a_file_is_recorded_with_its_first_write(self) -> None:
        self.assertEqual(self.services.store.partials, {})  # asked for (RESUME, SYNC): no record yet
        self.send(TRICKLE_BYTES // 1024)
        self.services.clock.advance(FLUSH_AGE)
        flush_stale(self.services)  # the timer's first write of the file: a step, after the record
        self.assertEqual(self.jobs.names(), ["write_chunk"])
        self.assertEqual(self.written(), b"")
        [partial] = self.services.store.partials.values()  # recorded first: bytes in the spool are
        self.assertEqual(partial.id, self.transfer.partial.id)  # always bytes a restart resumes from
        self.jobs.run_all()
        self.assertEqual(self.written(), self.content[: TRICKLE_BYTES])
        self.send(3)
        self.services.clock.advance(TRICKLE_AGE)
        flush_stale(self.services)
        self.assertEqual(self.jobs.names(), [])  # later small ones: inline
        self.assertEqual(self.written(), self.content[: TRICKLE_BYTES + 3 * 1024])

    def test_a_photo_whose_last_write_fails_is_kept_and_the_camera_closed(self) -> None:
        content, (protocol, transport) = self.photo_session()

        def full(fd: int, data: Any, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "pwrite", full)
        self.jobs.run_all()
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(codec.repeat_init(), transport.value())
        self.assertEqual(stored_files(self.root), [])
        kept = [p for p in self.services.store.partials.values() if p.imei == str(IMEI + 1)]
        self.assertEqual([p.held for p in kept], [0])  # nothing claimed durable that was not written
        errors = [f["why"] for f in self.services.failures]
        self.assertTrue(any("No space left" in why for why in errors), errors)

    def test_shutdown_waits_for_the_partial_of_a_connection_already_lost(self) -> None:
        self.send(3)
        self.protocol.connectionLost(None)  # gone: its bytes and checkpoint wait for the disk
        done = CameraFactory(self.services).shutdown()
        self.assertNoResult(done)  # (firing here would close the store under the checkpoint)
        self.jobs.run_all()
        self.successResultOf(done)
        [kept] = self.services.store.partials.values()
        self.assertEqual(kept.held, 3 * 1024)

    def test_a_camera_that_reconnects_at_once_resumes_from_what_its_lost_connection_persists(self) -> None:
        self.send(3)
        self.protocol.connectionLost(None)  # gone: its bytes and checkpoint wait for the disk
        protocol, transport = connect(self.services, peer="10.0.0.2")
        protocol.dataReceived(codec.init_packet(5, IMEI, VIDEOF) + codec.start(len(self.frames), 0))
        print("VALUE", transport.value(), protocol.session.state, self.jobs.names(), self.services.store.partials)
        self.assertEqual(protocol.session.state, State.PREPARING)
        # The new offer waits for the release: it neither reads the record as it was before the
        # release's checkpoint (a SQLite store answers held 0 there) nor opens the spool file the
        # release is still writing (it did: reconcile_partial beside write_chunk).
        self.assertEqual(self.jobs.names(), ["write_chunk"])
        self.assertNotIn(codec.resume(1), transport.value())
        self.jobs.run_all()
        self.assertEqual(transport.value()[-8:], codec.resume(4))
        self.assertEqual(self.services.finishing, {})

    def test_whole_file_digest_comes_from_the_writes(self) -> None:
        self.jobs.held = False
        self.send(len(self.frames))
        self.assertEqual(self.session.state, State.AWAIT_INIT)  # stored and acknowledged
        self.assertNotIn("digest_file", self.jobs.names())
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), self.content)
        meta = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(meta["sha256"], hashlib.sha256(self.content).hexdigest())

    def test_rewind_behind_the_writes_reads_the_file_for_its_digest(self) -> None:
        self.jobs.held = False
        self.send(WRITE_MIN // 1024 + 10)
        self.assertGreaterEqual(len(self.written()), WRITE_MIN)
        bad = bytearray(self.frames[self.sent_frames])
        bad[-1] ^= 0xFF
        self.protocol.dataReceived(bytes(bad))
        self.transport.clear()
        self.protocol.dataReceived(codec.sync(3))  # the camera goes back before what was written
        self.sent_frames = 2
        self.frames = data_frames(self.content)
        self.frames[2:] = data_frames(self.content, 2 * 1024)
        spool_file = os.fstat(self.transfer.fd).st_ino
        digests: list[int] = []
        real_digest = files_module.digest_file
        self.patch(files_module, "digest_file", lambda fd, crc: (digests.append(os.fstat(fd).st_ino),
                                                                 real_digest(fd, crc))[1])
        events = self.closes()
        self.send(len(self.frames) - 2)
        self.assertEqual(self.session.state, State.AWAIT_INIT)
        self.assertEqual(digests, [spool_file])  # read again for its digest: open until then,
        self.assertEqual(events, ["close on the reactor"])  # then closed once, by the step after it
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), self.content)
        meta = json.loads(stored.with_name(stored.name + ".json").read_text())
        self.assertEqual(meta["sha256"], hashlib.sha256(self.content).hexdigest())

    def test_failed_write_closes_keeps_the_partial_and_writes_nothing_after(self) -> None:
        real = os.pwrite
        self.send(WRITE_MIN // 1024)

        def full(fd: int, data: Any, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "pwrite", full)
        self.send(PENDING_MAX // 1024)  # waits behind the failing write
        self.jobs.run_one()
        self.patch(os, "pwrite", real)
        self.assertTrue(self.transport.disconnecting)
        self.assertIsInstance(self.transfer.write_error, OSError)
        self.protocol.connectionLost(None)
        self.jobs.run_all()  # the release: no write after the failed one, no checkpoint past it
        self.assertEqual(self.written(), b"")
        [kept] = self.services.store.partials.values()
        self.assertEqual(kept.held, 0)
        errors = [f["why"] for f in self.services.failures]
        self.assertTrue(any("No space left" in why for why in errors), errors)


class HeldFlushes:
    """GroupSync's flushes, recorded and held on its thread until the test lets each go."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.errors: list[BaseException] = []
        self._entered = threading.Semaphore(0)
        self._release = threading.Semaphore(0)

    def _flush(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))
        self._entered.release()
        if not self._release.acquire(timeout=10):
            raise RuntimeError("the test never let this flush go")
        if self.errors:
            raise self.errors.pop(0)

    def fdatasync(self, fd: int) -> None:
        self._flush("fdatasync", fd)

    def syncfs(self, root: Path) -> None:
        self._flush("syncfs", root)

    def entered(self) -> None:
        """Wait until the thread is inside its next flush."""
        if not self._entered.acquire(timeout=10):
            raise AssertionError("no flush started")

    def let_go(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.errors.append(error)
        self._release.release()


def group_sync(test: TestCase, root: Path) -> tuple[GroupSync, HeldFlushes]:
    held = HeldFlushes()
    group = GroupSync(root, reactor, fdatasync=held.fdatasync, syncfs=held.syncfs)
    test.addCleanup(lambda: (held.let_go(), held.let_go(), group.close())[2])
    return group, held


def busy_group_sync(test: TestCase) -> tuple[GroupSync, HeldFlushes, defer.Deferred]:
    """A GroupSync whose thread is held in a first flush (its caller's Deferred is the third item):
    the calls made next wait together for the one flush after it."""
    group, held = group_sync(test, Path(test.mktemp()))
    blocker = group.sync(1)
    held.entered()
    return group, held, blocker


def steps(order: list[str], note: Callable[[], str], error: int) -> Callable[..., Callable[[], None]]:
    """A maker of GroupSync steps that append ``name + note()`` to ``order``, and raise ``error`` if asked."""
    def make(name: str, fail: bool = False) -> Callable[[], None]:
        def run() -> None:
            order.append(name + note())
            if fail:
                raise OSError(error, os.strerror(error))
        return run
    return make


class GroupSyncTests(TestCase):
    """The thread takes the next batch itself as soon as a flush is over."""

    @defer.inlineCallbacks
    def test_one_flush_for_everyone_waiting(self) -> Any:
        group, held = group_sync(self, Path(self.mktemp()))
        first = group.sync(7)
        held.entered()
        self.assertEqual(held.calls, [("fdatasync", 7)])  # alone: its own file only
        later = [group.sync(8), group.sync(), group.sync(9)]
        fired: list[int] = []
        for i, d in enumerate([first] + later):
            d.addCallback(lambda _, i=i: fired.append(i))
        held.let_go()
        held.entered()  # the three that waited, together, before the reactor heard of the first
        self.assertEqual(held.calls[1:], [("syncfs", group.root)])
        yield first
        self.assertEqual(fired, [0])
        held.let_go()
        yield defer.gatherResults(later)
        self.assertEqual(fired, [0, 1, 2, 3])
        self.assertEqual((group.flushes, group.served), (2, 4))

    @defer.inlineCallbacks
    def test_a_failed_flush_fails_its_callers_only(self) -> Any:
        group, held = group_sync(self, Path(self.mktemp()))
        a = group.sync()
        held.entered()
        b = group.sync()
        held.let_go(OSError(errno.EIO, "I/O error"))
        yield self.assertFailure(a, OSError)
        held.entered()
        held.let_go()
        yield b
        c = group.sync()
        held.entered()
        held.let_go()
        yield c

    @defer.inlineCallbacks
    def test_last_writes_run_on_the_flush_thread_before_the_flush(self) -> Any:
        group, held, blocker = busy_group_sync(self)  # the next three make one batch
        order: list[str] = []
        write = steps(order, lambda: f" on {threading.current_thread().name}", errno.ENOSPC)

        a = group.sync(2, write("a"))
        b = group.sync(3, write("b", fail=True))
        c = group.sync(4)
        held.let_go()
        held.entered()
        self.assertEqual(order, ["a on camgateway-group-sync", "b on camgateway-group-sync"])  # before it
        self.assertEqual(held.calls[1:], [("syncfs", group.root)])
        held.let_go()
        yield defer.gatherResults([blocker, a, c])
        yield self.assertFailure(b, OSError)  # its caller alone
        lone = group.sync(5, write("lone", fail=True))
        yield self.assertFailure(lone, OSError)
        self.assertEqual(len(held.calls), 2)  # every last write failed: nothing to flush

    @defer.inlineCallbacks
    def test_after_steps_run_once_the_flush_succeeded(self) -> Any:
        group, held, blocker = busy_group_sync(self)  # the next three make one batch
        order: list[str] = []
        step = steps(order, lambda: f": {len(held.calls)} flushes begun", errno.EIO)

        a = group.sync(2, None, step("a"))
        b = group.sync(3, step("b write", fail=True), step("b"))  # its write failed: no after
        c = group.sync(4, None, step("c", fail=True))
        held.let_go()
        held.entered()
        self.assertEqual(order, ["b write: 1 flushes begun"])  # last writes before the flush, no after yet
        held.let_go()
        yield defer.gatherResults([blocker, a])
        yield self.assertFailure(b, OSError)
        yield self.assertFailure(c, OSError)  # its own after failed: its caller alone
        self.assertEqual(order, ["b write: 1 flushes begun", "a: 2 flushes begun", "c: 2 flushes begun"])
        failed = group.sync(5, None, step("never"))
        held.entered()
        held.let_go(OSError(errno.EIO, "Input/output error"))  # the flush itself fails: no after
        yield self.assertFailure(failed, OSError)
        self.assertNotIn("never: 3 flushes begun", order)

    @defer.inlineCallbacks
    def test_close_flushes_what_was_asked_then_refuses(self) -> Any:
        group, held = group_sync(self, Path(self.mktemp()))
        a = group.sync(3)
        held.entered()
        b = group.sync(4)
        closed = group.close()
        held.let_go()
        held.entered()
        held.let_go()
        yield defer.gatherResults([a, b, closed])
        self.assertEqual(held.calls, [("fdatasync", 3), ("fdatasync", 4)])
        yield self.assertFailure(group.sync(5), RuntimeError)

    @defer.inlineCallbacks
    def test_bytes_no_caller_flushes_are_flushed_once_enough_piled_up(self) -> Any:
        held = HeldFlushes()
        group = GroupSync(Path(self.mktemp()), reactor, fdatasync=held.fdatasync, syncfs=held.syncfs,
                          writeback_bytes=100)
        self.addCleanup(lambda: (held.let_go(), group.close())[1])
        group.written(60)
        self.assertEqual((held.calls, group.writebacks), ([], 0))
        group.written(50)  # 110: the filesystem is flushed
        held.entered()
        self.assertEqual(held.calls, [("syncfs", group.root)])
        writeback = group._writeback
        group.written(500)  # while it runs: counted for the next, no second one queued
        self.assertEqual(group.writebacks, 1)
        held.let_go()
        yield writeback
        group.written(1)  # 501 since the first was asked: the next
        held.entered()
        writeback = group._writeback
        held.let_go()
        yield writeback
        self.assertEqual(held.calls, [("syncfs", group.root)] * 2)
        self.assertEqual(group.writebacks, 2)
        group.written(99)
        self.assertEqual(group.writebacks, 2)

    @defer.inlineCallbacks
    def test_a_failed_writeback_is_logged_and_fails_no_caller(self) -> Any:
        events: list[dict[str, Any]] = []
        self.patch(durability_module, "log", Logger(observer=events.append))
        group, held = group_sync(self, Path(self.mktemp()))
        group.writeback_bytes = 10
        group.written(10)
        held.entered()
        writeback = group._writeback
        later = group.sync(4)
        held.let_go(OSError(errno.EIO, "Input/output error"))
        yield writeback
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])
        self.assertIn("Input/output error", formatEvent(events[0]))
        held.entered()
        held.let_go()
        yield later  # the caller after it has its own flush
        self.assertIsNone(group._writeback)

    def test_without_writeback_bytes_nothing_is_flushed_for_bytes_written(self) -> None:
        group, held = group_sync(self, Path(self.mktemp()))
        group.written(10**12)
        self.assertEqual((held.calls, group.writebacks), ([], 0))

    def test_syncfs_really_runs(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        syncfs(folder)  # no error on a real filesystem
        if HAVE_SYNCFS:  # (the os.sync() fallback has no error to report)
            with self.assertRaises(OSError):
                syncfs(folder / "missing")


def photo(path: Path) -> ReceivedFile:
    """A received photo whose bytes are at ``path``."""
    return ReceivedFile(
        path=path, imei=str(IMEI), peer="10.0.0.1:1", protocol_id=5, camera="dualcam", flow="dualcam",
        source="photof", identifier=b"%photof", media="photo", metadata={}, size=path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        start_total=1, start_crc=0, computed_crc=0,
        received_at=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
        capture_time=None, resumed_from=0, crc_errors=0)


class DiskSinkGroupTests(TestCase):
    @defer.inlineCallbacks
    def test_deliveries_share_flushes(self) -> Any:
        root = Path(self.mktemp())
        root.mkdir()
        jobs = Jobs()
        group, held = group_sync(self, root / "files")
        sink = DiskSink(root / "files", jobs, group=group)
        results = []
        for n in range(3):
            spool_file = root / f"{n}.part"
            spool_file.write_bytes(b"\xff\xd8" + bytes([n]) * 100)
            results.append(sink.deliver(photo(spool_file)))
        done: list[str] = []
        for r in results:
            r.addCallback(lambda path: (done.append(path), path)[1])
        self.assertEqual([f.__name__ for f, _, _ in jobs.calls], ["store"] * 3)
        jobs.run_one()  # the first store: its flush starts alone
        held.entered()
        jobs.run_one()
        jobs.run_one()
        self.assertEqual(held.calls, [("syncfs", group.root)])  # (no fd: directories too)
        self.assertEqual(done, [])  # stored, not yet durable: not reported
        held.let_go()
        yield results[0]
        self.assertEqual(len(done), 1)
        held.entered()  # the two that came later, in one flush
        held.let_go()
        yield defer.gatherResults(results[1:])
        self.assertEqual(len(done), 3)
        paths = [Path(p) for p in done]
        self.assertEqual([p.read_bytes()[2] for p in paths], [0, 1, 2])
        self.assertTrue(all(p.with_name(p.name + ".json").exists() for p in paths))
        self.assertEqual(group.flushes, 2)
        self.assertEqual(held.calls, [("syncfs", group.root)] * 2)

    def test_store_not_durable_skips_the_fsyncs(self) -> None:
        calls: list[int] = []
        root = Path(self.mktemp())
        root.mkdir()
        self.patch(os, "fsync", lambda fd: calls.append(fd))
        sink = DiskSink(root / "files", run_now)
        spool_file = root / "a.part"
        spool_file.write_bytes(b"\xff\xd8abc")
        received = photo(spool_file)
        sink.store(received, durable=False)
        self.assertEqual(calls, [])
        sink.store(received)
        self.assertGreaterEqual(len(calls), 2)  # sidecar and folder


class DiskSinkBatchTests(TestCase):
    """On the spool's filesystem: deliveries stored in batches on the sink's thread, one syncfs each."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.held = HeldFlushes()
        self.patch(disk_module, "syncfs", self.held.syncfs)
        self.sink = DiskSink(self.root / "files", run_now, batched_on=reactor)
        self.addCleanup(lambda: (self.held.let_go(), self.held.let_go(), self.sink.close())[2])

    def photo(self, n: int) -> ReceivedFile:
        spool_file = self.root / f"{n}.part"
        spool_file.write_bytes(b"\xff\xd8" + bytes([n]) * 100)
        return photo(spool_file)

    @defer.inlineCallbacks
    def test_deliveries_asked_meanwhile_share_the_next_batch(self) -> Any:
        first = self.sink.deliver(self.photo(0))
        self.held.entered()  # stored, flushing
        self.assertEqual(len(stored_files(self.root)), 1)
        self.assertFalse(first.called)  # not durable yet: not reported
        later = [self.sink.deliver(self.photo(n)) for n in (1, 2, 3)]
        self.held.let_go()
        self.held.entered()
        self.held.let_go()
        paths = [Path(p) for p in (yield defer.gatherResults([first] + later))]
        self.assertEqual([p.read_bytes()[2] for p in paths], [0, 1, 2, 3])
        self.assertTrue(all(p.with_name(p.name + ".json").exists() for p in paths))
        self.assertEqual(self.held.calls, [("syncfs", self.root / "files")] * 2)
        self.assertEqual((self.sink._batches.batches, self.sink._batches.served), (2, 4))

    @defer.inlineCallbacks
    def test_a_failed_store_fails_its_delivery_alone(self) -> Any:
        before = self.sink.deliver(self.photo(9))
        self.held.entered()  # the three below wait for this flush: one batch
        missing = self.photo(1)
        missing.path.unlink()  # its spool file is gone: its store fails
        results = [self.sink.deliver(r) for r in (self.photo(0), missing, self.photo(2))]
        self.held.let_go()
        self.held.let_go()
        yield before
        outcomes = yield defer.DeferredList(results, consumeErrors=True)
        self.assertEqual([ok for ok, _ in outcomes], [True, False, True])
        outcomes[1][1].trap(FileNotFoundError)
        self.assertEqual(len(self.held.calls), 2)  # one flush for the batch of three
        self.assertEqual(self.sink._batches.batches, 2)

    @defer.inlineCallbacks
    def test_a_failed_flush_fails_every_delivery_of_its_batch(self) -> Any:
        first = self.sink.deliver(self.photo(0))
        self.held.entered()
        later = [self.sink.deliver(self.photo(n)) for n in (1, 2)]
        self.held.let_go(OSError(5, "Input/output error"))
        with self.assertRaises(OSError):
            yield first
        self.held.let_go()
        self.assertEqual(len((yield defer.gatherResults(later))), 2)

    def test_chosen_on_the_spool_s_filesystem_only(self) -> None:
        from types import SimpleNamespace

        from camgateway.delivery.sinks import GatewayInternals
        from camgateway.delivery.sinks.disk import _same_filesystem, make

        self.assertTrue(_same_filesystem(self.root / "not" / "yet", self.root))
        self.assertFalse(_same_filesystem(self.root, Path("/proc")))
        here = SimpleNamespace(spool=SimpleNamespace(root=self.root / "spool"), run_in_thread=run_now, clock=reactor)
        elsewhere = SimpleNamespace(spool=SimpleNamespace(root=Path("/proc")), run_in_thread=run_now, clock=reactor)
        batched = make({"root": str(self.root / "files")}, here, GatewayInternals())  # type: ignore[arg-type]
        pooled = make({"root": str(self.root / "f")}, elsewhere, GatewayInternals())  # type: ignore[arg-type]
        self.addCleanup(lambda: defer.gatherResults([d for d in (batched.close(), pooled.close()) if d]))
        if not HAVE_SYNCFS:
            raise SkipTest("no syncfs here: every delivery fsyncs its own files")
        self.assertIsNotNone(batched._batches)
        self.assertIsNone(pooled._batches)
        self.assertIsNotNone(pooled.group)


class RecordOrderTests(TestCase):
    """A new file's partial record: beside the RESUME with a store of our own, before it with a shared one."""

    def start(self, shared: bool) -> tuple[Any, Any, defer.Deferred]:
        root = Path(self.mktemp())
        root.mkdir()
        services = make_services(root, metadata=False)
        store = services.store
        added: defer.Deferred = defer.Deferred()
        real_add = store.add

        def add(partial: Partial) -> defer.Deferred:
            real_add(partial)
            return added

        self.patch(store, "add", add)
        self.patch(type(store), "shared", shared)
        protocol, transport = connect(services)
        protocol.dataReceived(codec.init_packet(5, IMEI, VIDEOF))
        protocol.dataReceived(codec.start(3, 0))
        return protocol, transport, added

    def test_own_store_asks_the_camera_before_the_record_is_committed(self) -> None:
        protocol, transport, added = self.start(shared=False)
        self.assertTrue(transport.value().endswith(codec.resume(1)))
        self.assertFalse(added.called)
        added.callback(None)

    def test_shared_store_records_first(self) -> None:
        protocol, transport, added = self.start(shared=True)
        self.assertFalse(transport.value().endswith(codec.resume(1)))
        added.callback(None)
        self.assertTrue(transport.value().endswith(codec.resume(1)))
