"""The outbox: a chain of sinks, retries with backoff, dead letters, restarts."""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from camgateway.delivery import outbox as outbox_module
from camgateway.runtime.cli import dead_letters, retry_dead_letter
from camgateway.delivery.outbox import Outbox, OutboxEntry, backoff, derived_id
from camgateway.delivery.sinks import PermanentFailure, ReceivedFile, Transformed
from tests.support import make_services, stored_files


class Recorder:
    """A sink that records what it gets and fails as told."""

    def __init__(self, name: str, failures: list[Exception] | None = None) -> None:
        self.name = name
        self.failures = list(failures or [])
        self.got: list[bytes] = []
        self.ids: list[str] = []  # of every attempt, failed or not

    def deliver(self, received: ReceivedFile) -> Any:
        self.ids.append(received.id)
        if self.failures:
            raise self.failures.pop(0)
        self.got.append(received.path.read_bytes())
        return f"{self.name}:ok"


class Doubler:
    """A transforming sink: the following sinks get two files made from one."""

    name = "doubler"

    def __init__(self, services: Any) -> None:
        self.s = services
        self.ids: list[str] = []

    def deliver(self, received: ReceivedFile) -> Any:
        self.ids.append(received.id)
        made = []
        for tag in (b"a", b"b"):
            path = self.s.spool.path(self.s.spool.new_name())
            content = received.path.read_bytes() + tag
            path.write_bytes(content)
            made.append(ReceivedFile(**{**received.__dict__, "path": path, "derived": tag.decode(),
                                        "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}))
        return Transformed(made)


class _PathSink:
    """A sink that only looks at the path it is given."""

    name = "path"

    def deliver(self, received: ReceivedFile) -> Any:
        return str(received.path)


class OutboxCase(TestCase):
    """An outbox on a Clock with the in-memory store, for the test classes below (it has no tests itself)."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.s = make_services(self.root)
        self.s.outbox.stop()
        self.s.outbox = Outbox(self.s, poll=5.0, give_up_after=3600.0, rng=random.Random(1))

    def received(self, content: bytes = b"photo") -> ReceivedFile:
        path = self.s.spool.path(self.s.spool.new_name())
        path.write_bytes(content)
        now = datetime.datetime(2024, 10, 30, tzinfo=datetime.timezone.utc)
        return ReceivedFile(path=path, imei="1", peer="p", protocol_id=5, camera="dualcam", flow="dualcam",
                            source="photof", identifier=b"%photof", media="photo", metadata={}, size=len(content),
                            sha256=hashlib.sha256(content).hexdigest(), start_total=1, start_crc=0, computed_crc=0, received_at=now,
                            capture_time=None, resumed_from=0, crc_errors=0)

    def given_up(self) -> Recorder:
        """A file delivered to a single sink that always fails, until the outbox gave up (100 minutes)."""
        down = Recorder("down", [RuntimeError("refused")] * 1000)
        self.s.sinks = [down]
        self.s.outbox.start()
        self.s.outbox.add(self.received(), None)
        for _ in range(100):
            self.s.clock.advance(60)
        return down


class OutboxTests(OutboxCase):
    """Deliveries on a Clock with the in-memory store."""

    def test_chain_in_order_then_spool_file_removed(self) -> None:
        a, b = Recorder("a"), Recorder("b")
        self.s.sinks = [a, b]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"one"), None)
        self.assertEqual((a.got, b.got), ([b"one"], [b"one"]))
        self.assertEqual(self.s.spool.names(), set())
        self.assertEqual(self.s.store.outbox, {})

    def test_a_spool_file_that_cannot_be_removed_is_logged(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.s.sinks = [_PathSink()]
        self.s.outbox.start()
        received = self.received(b"one")
        received.path.unlink()
        received.path.mkdir()  # what unlink(2) refuses
        self.s.outbox.add(received, None)
        self.assertEqual(self.s.store.outbox, {})  # delivered: the entry is gone all the same
        [warning] = [e for e in events if "could not remove delivered spool file" in e.get("log_format", "")]
        self.assertEqual(warning["path"], str(received.path))

    def test_transformed_files_replace_the_original_downstream(self) -> None:
        before, after = Recorder("before"), Recorder("after")
        self.s.sinks = [before, Doubler(self.s), after]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"v"), None)
        self.assertEqual(before.got, [b"v"])
        self.assertEqual(sorted(after.got), [b"va", b"vb"])
        self.assertEqual(self.s.spool.names(), set())

    def test_transient_failures_back_off_then_deliver(self) -> None:
        flaky = Recorder("flaky", [RuntimeError("503"), RuntimeError("503"), RuntimeError("timeout")])
        self.s.sinks = [flaky]
        self.s.outbox.start()
        self.s.outbox.add(self.received(), None)
        [entry] = self.s.store.outbox.values()
        self.assertEqual((entry.attempts, entry.last_error), (1, "503"))
        for _ in range(200):
            self.s.clock.advance(1)
        self.assertEqual(flaky.got, [b"photo"])
        self.assertEqual(self.s.store.outbox, {})
        self.assertEqual(self.s.stats.delivery_failures, 3)

    def test_backoff_grows_capped_with_jitter(self) -> None:
        rng = random.Random(3)
        delays = [backoff(n, rng) for n in range(1, 15)]
        self.assertTrue(0.5 <= delays[0] <= 1.5)
        self.assertTrue(4.0 <= delays[3] <= 12.0)
        self.assertTrue(all(d <= 450 for d in delays))
        self.assertGreater(delays[12], 100)

    def test_permanent_failure_goes_to_dead_letters_and_on(self) -> None:
        refusing, next_one = Recorder("refusing", [PermanentFailure("HTTP 400: bad")]), Recorder("next")
        self.s.sinks = [refusing, next_one]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"data"), None)
        self.assertEqual(next_one.got, [b"data"])
        [letter] = dead_letters(self.s.spool)
        self.assertEqual((letter["sink"], letter["sink_name"], letter["reason"]), (0, "refusing", "HTTP 400: bad"))
        self.assertEqual((self.s.spool.dead / letter["id"] / "file").read_bytes(), b"data")
        retry_dead_letter(self.s.spool, self.s.store, letter["id"], self.s.clock.seconds())
        self.s.clock.advance(5)
        self.assertEqual(refusing.got, [b"data"])  # the retry reached the sink that refused it
        self.assertEqual(next_one.got, [b"data"])  # and no other: this one had the file already
        self.assertEqual(refusing.ids, next_one.ids * 2)  # under the file's id
        self.assertEqual(dead_letters(self.s.spool), [])
        self.assertEqual((self.s.store.outbox, self.s.spool.names()), ({}, set()))

    def test_gives_up_after_the_configured_time(self) -> None:
        self.given_up()
        [letter] = dead_letters(self.s.spool)
        self.assertIn("still failing after 3600 s: refused", letter["reason"])
        self.assertEqual(self.s.store.outbox, {})

    def test_a_new_outbox_resumes_where_the_old_stopped(self) -> None:
        a, b = Recorder("a"), Recorder("b", [RuntimeError("down")])
        self.s.sinks = [a, b]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"x"), None)
        self.s.outbox.stop()  # "the gateway restarts"
        [entry] = self.s.store.outbox.values()
        self.assertEqual(entry.sink, 1)
        self.s.outbox = Outbox(self.s, poll=5.0)
        self.s.clock.advance(10)
        self.s.outbox.start()
        self.assertEqual((a.got, b.got), ([b"x"], [b"x"]))  # a is not given the file twice

    def test_record_round_trip(self) -> None:
        received = self.received()
        again = ReceivedFile.from_record(json.loads(json.dumps(received.to_record())), received.path)
        self.assertEqual(again, received)
        with_id = dataclasses.replace(received, id="e1")
        self.assertEqual(ReceivedFile.from_record(json.loads(json.dumps(with_id.to_record())), received.path),
                         with_id)
        old = received.to_record()
        del old["id"]  # a record from before files had ids
        self.assertEqual(ReceivedFile.from_record(old, received.path).id, "")

    @defer.inlineCallbacks
    def test_idle_fires_when_drained(self) -> Any:
        self.s.sinks = [Recorder("a")]
        self.s.outbox.start()
        self.s.outbox.add(self.received(), None)
        yield self.s.outbox.idle()
        self.assertEqual(self.s.store.outbox, {})


class Gate:
    """A sink whose deliveries wait until the test lets them finish."""

    name = "gate"

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred] = []

    def deliver(self, received: ReceivedFile) -> Any:
        d: defer.Deferred = defer.Deferred()
        d.content = received.path.read_bytes()  # type: ignore[attr-defined]
        self.waiting.append(d)
        return d


class DirectDeliveryTests(OutboxCase):
    """A new file goes to its sink at once; scans only when something may be left."""

    def count_scans(self) -> list[int]:
        scans: list[int] = []
        real = self.s.store.due

        def due(*args: Any) -> Any:
            scans.append(1)
            return real(*args)

        self.s.store.due = due
        return scans

    def gated(self, concurrency: int = 2) -> Gate:
        gate = Gate()
        self.s.sinks = [gate]
        self.s.outbox = Outbox(self.s, concurrency=concurrency, poll=5.0, rng=random.Random(1))
        self.s.outbox.start()
        return gate

    @staticmethod
    def release(gate: Gate) -> bytes:
        """Let the oldest delivery finish; what it delivered."""
        d = gate.waiting.pop(0)
        d.callback("ok")
        return d.content  # type: ignore[attr-defined, no-any-return]

    def test_new_files_need_no_scan_even_when_the_slots_are_full(self) -> None:
        gate = self.gated()
        scans = self.count_scans()
        for content in (b"1", b"2", b"3", b"4"):
            self.s.outbox.add(self.received(content), None)
        self.assertEqual(len(gate.waiting), 2)  # two delivering, two kept for the next free slots
        self.assertEqual(len(self.s.store.outbox), 4)  # every one recorded all the same
        self.s.clock.advance(5)  # the poll: no free slot, no query, nothing delivered twice
        self.assertEqual(len(gate.waiting), 2)
        delivered = [self.release(gate) for _ in range(4)]
        self.assertEqual(delivered, [b"1", b"2", b"3", b"4"])  # oldest first
        self.assertEqual((scans, self.s.store.outbox), ([], {}))
        self.s.outbox.add(self.received(b"5"), None)
        self.release(gate)
        self.assertEqual(scans, [])

    def test_beyond_the_files_kept_a_scan_takes_them(self) -> None:
        self.patch(outbox_module, "READY_MAX", 1)
        gate = self.gated()
        scans = self.count_scans()
        for content in (b"1", b"2", b"3", b"4"):
            self.s.outbox.add(self.received(content), None)
        self.assertEqual(len(gate.waiting), 2)
        self.assertEqual(scans, [])  # (no free slot: no query)
        delivered = [self.release(gate) for _ in range(4)]
        self.assertEqual(sorted(delivered), [b"1", b"2", b"3", b"4"])
        # The fourth came back from the store; that scan filled every free slot,
        # so the next finished delivery looked once more (and found nothing).
        self.assertEqual(len(scans), 2)
        self.assertEqual(self.s.store.outbox, {})

    def test_a_stopped_outbox_starts_no_delivery_and_the_next_one_finds_them(self) -> None:
        gate = self.gated(concurrency=1)
        self.s.outbox.add(self.received(b"1"), None)
        self.s.outbox.add(self.received(b"2"), None)  # kept for the slot
        stopped = self.s.outbox.stop()
        self.s.outbox.add(self.received(b"3"), None)  # finished while stopping: recorded only
        self.assertEqual(self.release(gate), b"1")
        self.assertEqual(gate.waiting, [])  # nothing started after stop
        self.successResultOf(stopped)
        self.assertEqual(len(self.s.store.outbox), 2)
        self.s.outbox = Outbox(self.s, concurrency=4, poll=5.0)
        self.s.outbox.start()
        self.assertEqual(sorted(self.release(gate) for _ in range(2)), [b"2", b"3"])
        self.assertEqual(self.s.store.outbox, {})

    def test_next_sink_of_a_chain_is_not_left_for_the_poll(self) -> None:
        a, b = Recorder("a"), Recorder("b")
        self.s.sinks = [a, b]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"x"), None)
        self.assertEqual(b.got, [b"x"])  # without waiting for the 5 s poll


class IdTests(OutboxCase):
    """Every file carries its outbox entry's id, the same on every attempt and all along the chain."""

    def test_ids_are_assigned_and_kept_along_a_chain_with_a_transforming_step(self) -> None:
        first, doubler = Recorder("first", [RuntimeError("down")]), Doubler(self.s)
        last = Recorder("last", [RuntimeError("down"), RuntimeError("down")])
        self.s.sinks = [first, doubler, last]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"v"), None)
        [entry] = self.s.store.outbox.values()
        self.assertEqual(len(entry.id), 32)
        self.assertEqual(entry.record["id"], entry.id)  # recorded with the file
        self.assertEqual(first.ids, [entry.id])
        self.s.clock.advance(5)
        self.assertEqual(first.ids, [entry.id, entry.id])  # the retry: the same id
        self.assertEqual(doubler.ids, [entry.id])  # and the next sink of the chain too
        made = {derived_id(entry.id, 0), derived_id(entry.id, 1)}
        self.assertEqual(len(made), 2)
        self.assertEqual(set(self.s.store.outbox), made)  # each made file's entry, both failed at "last"
        for made_entry in self.s.store.outbox.values():
            self.assertEqual(made_entry.record["id"], made_entry.id)
        self.assertEqual(set(last.ids), made)
        for _ in range(20):
            self.s.clock.advance(5)
        self.assertEqual(sorted(last.got), [b"va", b"vb"])
        self.assertEqual(set(last.ids), made)  # retried under the same ids
        self.assertEqual(len(last.ids), 4)
        self.assertEqual(self.s.store.outbox, {})

    def test_a_file_with_an_id_keeps_it(self) -> None:
        sink = Recorder("a", [RuntimeError("down")])
        self.s.sinks = [sink]
        self.s.outbox.start()
        self.s.outbox.add(dataclasses.replace(self.received(), id="given"), None)
        self.assertEqual(list(self.s.store.outbox), ["given"])
        self.assertEqual(sink.ids, ["given"])

    def test_an_entry_recorded_without_an_id_delivers_its_entry_id(self) -> None:
        received = self.received()
        record = received.to_record()
        del record["id"]  # recorded by a gateway from before files had ids
        self.s.store.enqueue(OutboxEntry("old-entry", received.path.name, 0, 0, 0.0, None, record, 0.0), None)
        sink = Recorder("a")
        self.s.sinks = [sink]
        self.s.outbox.start()
        self.assertEqual((sink.ids, sink.got), (["old-entry"], [b"photo"]))


class FailingReplace:
    """Wraps a store: its ``replace`` fails (a full spool filesystem) or never answers (a kill -9)."""

    def __init__(self, store: Any, failures: int = 0, hang: bool = False) -> None:
        self.store = store
        self.failures = failures
        self.hang = hang

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def replace(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        if self.hang:
            return defer.Deferred()  # the gateway is killed before the delivery is recorded
        if self.failures:
            self.failures -= 1
            return defer.fail(OSError(errno.ENOSPC, "No space left on device"))
        return self.store.replace(*args, **kwargs)


class ExactlyOnceOnDiskTests(OutboxCase):
    """The disk sink stores a file once even when its delivery is repeated (the bugs found in the field)."""

    def assertOneCopy(self, *contents: bytes) -> None:
        stored = stored_files(self.root)
        self.assertEqual(sorted(p.read_bytes() for p in stored), sorted(contents))
        sidecars = sorted((self.root / "files").rglob("*.json"))
        self.assertEqual(sidecars, sorted(p.with_name(p.name + ".json") for p in stored))
        self.assertFalse([p for p in stored if "-2" in p.name], stored)

    def test_a_store_that_cannot_record_the_delivery(self) -> None:
        """A full spool filesystem: the record fails after the disk sink stored the file; the retry stores none."""
        disk = self.s.sinks[0]
        delivered: list[str] = []
        real = disk.deliver
        self.patch(disk, "deliver", lambda received: real(received).addCallback(
            lambda path: (delivered.append(path), path)[1]))
        self.s.store = FailingReplace(self.s.store, failures=3)
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"\xff\xd8 photo"), None)
        for _ in range(4):
            self.s.clock.advance(5)  # the outbox's poll finds the entry again
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 3)
        self.assertEqual(len(delivered), 4)
        self.assertEqual(len(set(delivered)), 1)  # the same path every time
        self.assertOneCopy(b"\xff\xd8 photo")
        self.assertEqual(self.s.store.outbox, {})
        self.assertEqual(self.s.spool.names(), set())

    def test_a_kill_between_the_delivery_and_its_record(self) -> None:
        """kill -9 after the disk sink stored the file, before the outbox recorded it: the restart stores none."""
        store = self.s.store
        self.s.store = FailingReplace(store, hang=True)
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"\xff\xd8 photo"), None)
        self.assertOneCopy(b"\xff\xd8 photo")
        self.assertEqual(len(store.outbox), 1)  # never recorded as delivered
        self.s.outbox.stop()
        self.s.store = store  # the restart: a new outbox over what the store kept
        self.s.outbox = Outbox(self.s, poll=5.0)
        self.s.outbox.start()
        self.assertEqual(store.outbox, {})
        self.assertOneCopy(b"\xff\xd8 photo")
        self.assertEqual(self.s.spool.names(), set())

    def test_a_dead_letter_retried_before_a_transforming_step(self) -> None:
        """A dead letter retried before a transforming sink goes to the refusing sink only: nothing is made again."""
        refusing, doubler = Recorder("refusing", [PermanentFailure("HTTP 400: bad")]), Doubler(self.s)
        self.s.sinks = [refusing, doubler, self.s.sinks[0]]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"v"), None)
        self.assertOneCopy(b"va", b"vb")
        [letter] = dead_letters(self.s.spool)
        retry_dead_letter(self.s.spool, self.s.store, letter["id"], self.s.clock.seconds())
        self.s.clock.advance(5)
        self.assertEqual(refusing.got, [b"v"])
        self.assertEqual(len(doubler.ids), 1)
        self.assertEqual(self.s.store.outbox, {})
        self.assertOneCopy(b"va", b"vb")


class Refusing:
    """Wraps a sink: refuses its first ``times`` deliveries for good (an HTTP 400), then delivers."""

    def __init__(self, sink: Any, times: int = 1) -> None:
        self.sink = sink
        self.name = sink.name
        self.times = times

    def deliver(self, received: ReceivedFile) -> Any:
        if self.times:
            self.times -= 1
            raise PermanentFailure("HTTP 400: bad")
        return self.sink.deliver(received)


ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


class DeadLetterTests(OutboxCase):
    """A dead letter is retried at the sink that refused it, and only there."""

    def retry_all(self, names: Any = None) -> None:
        for letter in dead_letters(self.s.spool):
            retry_dead_letter(self.s.spool, self.s.store, letter["id"], self.s.clock.seconds(), names)
        self.s.clock.advance(5)  # the outbox's poll

    def assertDrained(self) -> None:
        self.assertEqual((self.s.store.outbox, self.s.spool.names(), dead_letters(self.s.spool)), ({}, set(), []))

    def test_a_retry_at_the_last_sink_ends_there(self) -> None:
        first, last = Recorder("first"), Refusing(Recorder("last"))
        self.s.sinks = [first, last]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"x"), None)
        self.retry_all()
        self.assertEqual((first.got, last.sink.got), ([b"x"], [b"x"]))
        self.assertDrained()

    def test_a_transforming_sink_retried_hands_what_it_makes_to_the_sinks_after_it(self) -> None:
        """They had the camera's file when it was refused, never what it makes: they get those now."""
        after = Recorder("after")
        self.s.sinks = [Refusing(Doubler(self.s)), after]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"v"), None)
        self.assertEqual(after.got, [b"v"])
        self.retry_all()
        self.assertEqual(after.got, [b"v", b"va", b"vb"])
        self.assertEqual(len(set(after.ids)), 3)
        self.assertDrained()

    def test_a_retry_refused_again_goes_nowhere_else(self) -> None:
        refusing, after = Refusing(Recorder("refusing"), times=2), Recorder("after")
        self.s.sinks = [refusing, after]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"x"), None)
        self.retry_all()
        [letter] = dead_letters(self.s.spool)  # refused again: a dead letter again
        self.assertEqual((letter["sink"], letter["sink_name"]), (0, "refusing"))
        self.assertEqual((after.got, self.s.store.outbox), ([b"x"], {}))
        self.retry_all()
        self.assertEqual((refusing.sink.got, after.got), ([b"x"], [b"x"]))
        self.assertDrained()

    def test_a_file_two_sinks_refused_is_two_dead_letters(self) -> None:
        one, two, three = Refusing(Recorder("one")), Refusing(Recorder("two")), Recorder("three")
        self.s.sinks = [one, two, three]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"x"), None)
        letters = dead_letters(self.s.spool)
        self.assertEqual(sorted((letter["sink"], letter["sink_name"]) for letter in letters),
                         [(0, "one"), (1, "two")])
        self.retry_all()
        self.assertEqual((one.sink.got, two.sink.got, three.got), ([b"x"], [b"x"], [b"x"]))
        self.assertDrained()

    def test_a_retry_beside_the_entry_still_on_its_way(self) -> None:
        """The file waits at a later sink when its dead letter is retried: each goes its own way, once."""
        refusing, later = Refusing(Recorder("refusing")), Recorder("later", [RuntimeError("503")])
        self.s.sinks = [refusing, later]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"x"), None)
        [waiting] = self.s.store.outbox.values()
        self.assertEqual(waiting.sink, 1)
        [letter] = dead_letters(self.s.spool)
        retry_dead_letter(self.s.spool, self.s.store, letter["id"], self.s.clock.seconds())
        self.assertEqual(len(self.s.store.outbox), 2)
        for _ in range(10):
            self.s.clock.advance(5)
        self.assertEqual((refusing.sink.got, later.got), ([b"x"], [b"x"]))
        self.assertDrained()

    def test_the_refusing_sink_is_found_by_its_name(self) -> None:
        from camgateway.runtime.cli import DeadLetterError

        a, b = Refusing(Recorder("a")), Recorder("b")
        self.s.sinks = [a, b]
        self.s.outbox.start()
        self.s.outbox.add(self.received(b"x"), None)
        [letter] = dead_letters(self.s.spool)
        with self.assertRaises(DeadLetterError) as caught:  # the configuration has no sink "a" now
            retry_dead_letter(self.s.spool, self.s.store, letter["id"], self.s.clock.seconds(), ["b", "c"])
        self.assertIn("'a'", str(caught.exception))
        self.assertEqual([kept["id"] for kept in dead_letters(self.s.spool)], [letter["id"]])
        self.s.sinks = [b, a]  # the chain was reordered since
        self.retry_all(["b", "a"])
        self.assertEqual((a.sink.got, b.got), ([b"x"], [b"x"]))
        self.assertDrained()

    def test_a_dead_letter_without_its_file_is_kept(self) -> None:
        from camgateway.runtime.cli import DeadLetterError
        from camgateway.delivery.outbox import write_dead_letter

        received = self.received()
        received.path.unlink()  # no instance has the file: only its record is kept
        entry = OutboxEntry("lost", received.path.name, 0, 0, 0.0, None, received.to_record(), 0.0)
        write_dead_letter(str(self.s.spool.dead), entry, None, "a", "no instance has the file", 1.0)
        [letter] = dead_letters(self.s.spool)
        with self.assertRaises(DeadLetterError) as caught:
            retry_dead_letter(self.s.spool, self.s.store, letter["id"], self.s.clock.seconds(), ["a"])
        self.assertIn("only its record is kept", str(caught.exception))
        self.assertEqual([kept["id"] for kept in dead_letters(self.s.spool)], [letter["id"]])
        self.assertEqual(self.s.store.outbox, {})

    def test_dead_letter_json_times_and_attempts(self) -> None:
        down = self.given_up()
        [letter] = dead_letters(self.s.spool)
        raw = json.loads((self.s.spool.dead / letter["id"] / "dead-letter.json").read_text())
        self.assertEqual(raw["attempts"], len(down.ids))  # every attempt, the last one included
        self.assertGreater(raw["attempts"], 5)
        for value in (raw["time"], raw["entry"]["created"], raw["entry"]["next_attempt"]):
            self.assertRegex(value, ISO)
        self.assertEqual((raw["sink"], raw["sink_name"]), (0, "down"))

    def test_a_dead_letter_written_before_sinks_had_names(self) -> None:
        """Listed with ISO times and attempts, and retried at its sink's index."""
        a, b = Recorder("a"), Recorder("b")
        self.s.sinks = [a, b]
        received = self.received(b"old")
        received.path.unlink()  # (only its record is wanted)
        record = received.to_record()
        del record["id"]
        folder = self.s.spool.dead / "old-entry"
        folder.mkdir(parents=True)
        (folder / "file").write_bytes(b"old")
        entry = OutboxEntry("old-entry", "gone", 1, 2, 1.5e9, "boom", record, 1.5e9)
        (folder / "dead-letter.json").write_text(json.dumps({
            "entry": dataclasses.asdict(entry), "sink": 1, "sink_name": "http:http://x/up", "reason": "HTTP 400",
            "time": 1.5e9}))
        [letter] = dead_letters(self.s.spool)
        self.assertEqual((letter["id"], letter["time"], letter["attempts"]),
                         ("old-entry", "2017-07-14T02:40:00.000Z", 3))
        self.s.outbox.start()
        self.retry_all(["a", "b"])
        self.assertEqual((a.got, b.got, b.ids), ([], [b"old"], ["old-entry"]))
        self.assertDrained()


class DeliveryLogTests(TestCase):
    """Every delivery line names the file and the sink, and says why in words; "every sink" only when true."""

    setUp = OutboxTests.setUp
    received = OutboxTests.received

    def events(self) -> list[dict[str, Any]]:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def outbox_lines(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from camgateway.runtime.logs import event_record

        return [event_record(e) for e in events if e.get("log_namespace") == "camgateway.delivery.outbox"]

    def assertNamesTheFile(self, record: dict[str, Any], received: ReceivedFile) -> None:
        self.assertEqual((record["imei"], record["file"], record["source"], record["sha256"]),
                         (received.imei, "%photof", "photof", received.sha256))
        self.assertEqual(len(record["file_id"]), 32)
        self.assertIn(f"camera {received.imei} %photof (id {record['file_id']}, sha256 {received.sha256[:12]})",
                      record["message"])

    def test_a_retried_failure_is_a_warning_in_words(self) -> None:
        from camgateway.base.reasons import DeliveryFailed

        events = self.events()
        full = OSError(errno.ENOSPC, "No space left on device", "/srv/files/x.jpg")
        self.s.sinks = [Recorder("disk:archive", [full, DeliveryFailed("HTTP 503 Service Unavailable: busy")])]
        self.s.outbox.start()
        received = self.received()
        self.s.outbox.add(received, None)
        for _ in range(10):
            self.s.clock.advance(5)
        first, second, delivered = self.outbox_lines(events)
        for record in (first, second):
            self.assertEqual((record["level"], record["event"], record["sink"]), ("warn", "delivery_failed",
                                                                                   "disk:archive"))
            self.assertNamesTheFile(record, received)
            self.assertNotIn("traceback", record)
        self.assertEqual(first["reason"], "disk full (No space left on device): /srv/files/x.jpg")
        self.assertEqual(second["reason"], "HTTP 503 Service Unavailable: busy")
        self.assertTrue(first["message"].startswith("delivery to disk:archive failed (attempt 1), retrying in "
                                                    f"{first['retry_in']:.1f} s: {first['reason']}; camera 1"))
        self.assertEqual((delivered["level"], delivered["event"]), ("info", "file_delivered"))
        self.assertTrue(delivered["message"].startswith("file delivered to every sink: camera 1 %photof"))
        self.assertNamesTheFile(delivered, received)
        self.assertEqual(list(self.s.failures), [])  # retried, not refused

    def test_a_bug_in_a_sink_is_logged_with_its_traceback(self) -> None:
        events = self.events()
        self.s.sinks = [Recorder("buggy", [ZeroDivisionError("division by zero")])]
        self.s.outbox.start()
        self.s.outbox.add(self.received(), None)
        self.s.clock.advance(5)
        bug, delivered = self.outbox_lines(events)
        self.assertEqual((bug["level"], bug["event"]), ("error", "delivery_error"))
        self.assertEqual(bug["reason"], "internal error: ZeroDivisionError: division by zero")
        self.assertIn("Traceback", bug["traceback"])
        self.assertEqual(delivered["event"], "file_delivered")  # retried all the same
        self.flushLoggedErrors(ZeroDivisionError)

    def test_a_refused_file_is_not_delivered_to_every_sink(self) -> None:
        events = self.events()
        refusing, last = Recorder("http:fleet", [PermanentFailure("HTTP 400 Bad Request: no such camera")]), \
            Recorder("disk:archive")
        self.s.sinks = [refusing, last]
        self.s.outbox.start()
        received = self.received()
        self.s.outbox.add(received, None)
        refused, partly = self.outbox_lines(events)
        self.assertEqual((refused["level"], refused["event"], refused["sink"]),
                         ("error", "delivery_refused", "http:fleet"))
        self.assertEqual(refused["reason"], "HTTP 400 Bad Request: no such camera")
        self.assertNamesTheFile(refused, received)
        self.assertEqual((partly["level"], partly["event"], partly["refused"]),
                         ("warn", "file_partly_delivered", ["http:fleet"]))
        self.assertTrue(partly["message"].startswith("file delivered to 1 of 2 sinks; refused by http:fleet: camera 1"))
        self.assertNamesTheFile(partly, received)
        self.assertFalse([r for r in self.outbox_lines(events) if "every sink" in r["message"]])

    def test_a_refusal_at_the_last_sink_and_before_a_transforming_one_is_remembered(self) -> None:
        events = self.events()
        first, last = Recorder("first", [PermanentFailure("no")]), Recorder("last", [PermanentFailure("no")] * 2)
        self.s.sinks = [first, Doubler(self.s), last]
        self.s.outbox.start()
        self.s.outbox.add(self.received(), None)
        partly = [r for r in self.outbox_lines(events) if r["event"] == "file_partly_delivered"]
        self.assertEqual([(r["file"], r["refused"]) for r in partly],
                         [("%photof (a)", ["first", "last"]), ("%photof (b)", ["first", "last"])])
        self.assertTrue(all(r["message"].startswith("file delivered to 1 of 3 sinks; refused by first, last")
                            for r in partly))


class ReasonTests(TestCase):
    """A failure in words: never a Failure repr, a class name or a bytes repr for the ordinary ones."""

    def test_words(self) -> None:
        from OpenSSL import SSL
        from twisted.internet import error
        from twisted.python.failure import Failure
        from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived

        from camgateway.base.reasons import DeliveryFailed, is_bug, reason

        cases = [
            (error.ConnectionRefusedError("111: Connection refused"), "connection refused"),
            (ResponseNeverReceived([Failure(error.ConnectionLost())]),
             "connection reset by the receiver before answering"),
            (ResponseNeverReceived([Failure(error.ConnectionDone())]),
             "connection closed by the receiver before answering"),
            (RequestTransmissionFailed([Failure(error.ConnectionLost()), Failure(error.ConnectionDone())]),
             "connection reset by the receiver while the file was being sent"),
            (error.TimeoutError(), "connection timed out"),
            (error.DNSLookupError("fleet.invalid"), "host name not found (DNS lookup failed: fleet.invalid)"),
            (OSError(errno.ENOSPC, "No space left on device"), "disk full (No space left on device)"),
            (PermissionError(errno.EACCES, "Permission denied", "/srv/files"), "permission denied: /srv/files"),
            (DeliveryFailed("HTTP 503 Service Unavailable: busy"), "HTTP 503 Service Unavailable: busy"),
            (PermanentFailure(b"bytes \xff from a plugin"), "bytes \ufffd from a plugin"),
            (RuntimeError("upload\nrefused  by the bucket"), "upload refused by the bucket"),
            (defer.CancelledError(), "cancelled"),
            (error.ProcessTerminated(exitCode=3), "program exited with status 3"),
            (SSL.Error([("SSL routines", "", "certificate verify failed")]),
             "TLS handshake failed: certificate verify failed"),
            (ZeroDivisionError("division by zero"), "internal error: ZeroDivisionError: division by zero"),
        ]
        for exception, words in cases:
            self.assertEqual(reason(Failure(exception)), words, exception)
            self.assertEqual(reason(exception), words)
        bugs = [e for e, _ in cases if is_bug(e)]
        self.assertEqual([type(e) for e in bugs], [ZeroDivisionError])
        self.assertTrue(is_bug(RequestTransmissionFailed([Failure(ValueError("read of closed file"))])))

    def test_how_a_program_ended(self) -> None:
        from camgateway.base.reasons import program_ended

        self.assertEqual(program_ended("program", 3, None, b"starting\nno route to archive\n\n"),
                         "program exited with status 3: no route to archive")
        self.assertEqual(program_ended("ffmpeg", None, 9, b""), "ffmpeg killed by signal 9 (SIGKILL)")
