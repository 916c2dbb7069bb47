"""Logs: the JSON record, rotation-proof log files, the choice of output, progress events, and real twistd runs."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, task
from twisted.logger import FileLogObserver, LogLevel, Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from camgateway.runtime.logs import JSONLineObserver, TurnBuffer, WatchedFile, event_record, observer_for
from camgateway.sim import ContentPool
from tests.support import RunningClock
from tests.test_integration import GatewayTestCase, camera
from tests.test_twistd import IMEI, Camera, twistd

#: The documented fields of the per-transfer record (docs/operations.md, Logs).
FILE_RECEIVED_FIELDS = {"time", "level", "namespace", "message", "event", "imei", "id", "size", "sha256", "seconds",
                        "peer", "camera", "source", "media", "resumed_from", "crc_errors", "computed_crc",
                        "start_total", "start_crc"}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class RecordTests(TestCase):
    def capture(self, emit: Any) -> dict[str, Any]:
        out = io.StringIO()
        log = Logger(namespace="camgateway.test", observer=JSONLineObserver(out))
        emit(log)
        [line] = out.getvalue().splitlines()
        return json.loads(line)

    def test_fields_message_and_time(self) -> None:
        record = self.capture(lambda log: log.info("camera {imei} sent {size} bytes", imei="352093080000001",
                                                   size=1024, path=Path("/x/y"), raw=b"\xff\x01", ratio=float("nan"),
                                                   nested={"a": [1, 2.5, None]}, time="a field called time"))
        self.assertEqual(record["message"], "camera 352093080000001 sent 1024 bytes")
        self.assertEqual((record["level"], record["namespace"]), ("info", "camgateway.test"))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual((record["imei"], record["size"], record["path"]), ("352093080000001", 1024, "/x/y"))
        self.assertEqual((record["raw"], record["ratio"], record["nested"]), ("\\xff\x01", "nan", {"a": [1, 2.5, None]}))
        self.assertEqual(record["field_time"], "a field called time")
        self.assertFalse([key for key in record if key.startswith("log_")])

    def test_failure(self) -> None:
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = self.capture(lambda log: log.failure("checkpoint of {id} failed", failure, id="p1",
                                                      level=LogLevel.error))
        self.assertEqual(record["level"], "error")
        self.assertEqual(record["error"], "ZeroDivisionError: division by zero")
        self.assertIn("Traceback", record["traceback"])
        self.assertEqual(record["message"], "checkpoint of p1 failed")

    def test_message_is_what_twisted_formats(self) -> None:
        class Thing:
            name = "front"

            def __repr__(self) -> str:
                return "<thing>"

        fields = {"imei": "352093080000001", "seconds": 1.25, "thing": Thing(), "d": {"a": 7}, "call": lambda: "called"}
        formats = ["camera {imei} in {seconds:.1f} s", "{thing.name} {thing!r} {d[a]}", "{call()} and {imei}",
                   "{{literal}} {imei:>20}", "{missing} field", "{imei", "no fields", None, 42]
        for fmt in formats:
            event = dict(fields, log_format=fmt, log_time=1.0, log_namespace="t")
            with self.subTest(fmt=fmt):
                self.assertEqual(event_record(event)["message"], formatEvent(event))
        legacy = {"message": ("a", "legacy", "line"), "isError": 0, "log_time": 1.0, "system": "-"}
        self.assertEqual(event_record(legacy)["message"], formatEvent(legacy))

    def test_time_is_what_datetime_gives(self) -> None:
        import datetime

        def expected(t: float) -> str:
            when = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
            return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")

        rng = random.Random(6)
        times = [0.0, 1.0, 59.9995, 59.9999996, 1763798400.0, 1763798399.9994, 1763798399.99999951]
        times += [rng.uniform(0, 2e9) for _ in range(2000)]
        times += [1763798400 + rng.choice([-1, 1]) * rng.random() / 10 ** rng.randint(0, 7) for _ in range(2000)]
        for t in times:
            self.assertEqual(event_record({"log_time": t, "log_format": ""})["time"], expected(t), t)

    def test_an_unserialisable_event_still_logs_a_line(self) -> None:
        out = io.StringIO()
        JSONLineObserver(out)({"log_format": "{x", "log_time": "not a time"})
        self.assertEqual(json.loads(out.getvalue())["level"], "error")


class WatchedFileTests(TestCase):
    def test_reopens_after_rotation(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / "camgateway.log"
        out = WatchedFile(path)
        out.write("one\n")
        out.flush()
        path.rename(folder / "camgateway.log.1")  # logrotate's default "create" mode
        out.write("two\n")
        out.flush()
        path.unlink()
        out.write("three\n")
        out.flush()
        out.close()
        self.assertEqual((folder / "camgateway.log.1").read_text(), "one\n")
        self.assertEqual(path.read_text(), "three\n")


class ChoiceTests(TestCase):
    """``log.format``: auto is text on a terminal and in twistd's --logfile, JSON anywhere else."""

    def test_choice(self) -> None:
        pipe, tty = io.StringIO(), Tty()
        self.assertIsNone(observer_for("text", None, None, pipe))
        self.assertIsNone(observer_for("auto", None, None, tty))
        self.assertIsNone(observer_for("auto", None, "twistd.log", pipe))
        self.assertIsInstance(observer_for("auto", None, None, pipe), JSONLineObserver)
        self.assertIsInstance(observer_for("auto", None, "-", pipe), JSONLineObserver)
        self.assertIsInstance(observer_for("json", None, None, tty), JSONLineObserver)
        folder = Path(self.mktemp())
        folder.mkdir()
        to_file = observer_for("json", None, str(folder / "twistd.log"), pipe)
        self.assertIsInstance(to_file, JSONLineObserver)
        self.assertIsInstance(to_file.out, TurnBuffer)  # type: ignore[union-attr]
        self.assertIsInstance(to_file.out.out, WatchedFile)  # type: ignore[union-attr]
        self.assertIsInstance(observer_for("auto", folder / "gw.log", None, tty), JSONLineObserver)
        self.assertIsInstance(observer_for("text", folder / "gw.log", None, pipe), FileLogObserver)


class EventAndPriorityTests(TestCase):
    """Every record has ``event`` (a stable snake_case name) and journald's ``priority``."""

    def records(self, emit: Any) -> list[dict[str, Any]]:
        out = io.StringIO()
        emit(Logger(namespace="camgateway.test", observer=JSONLineObserver(out)))
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_an_event_name_is_kept_else_made_from_the_format(self) -> None:
        def emit(log: Logger) -> None:
            log.info("file received: camera {imei}", imei="1", event="file_received")
            for peer in ("10.0.0.1:5", "10.0.0.2:7"):
                log.info("camera {imei} connected from {peer}: protocol {n}", imei="1", peer=peer, n=5)
            log.warn("{what}", what="only a field")
            log.error("{sink} refused", sink="s", event=None)

        records = self.records(emit)
        self.assertEqual([r["event"] for r in records],
                         ["file_received", "camera_connected_from_protocol", "camera_connected_from_protocol",
                          "camgateway_test", "refused"])
        self.assertEqual([(r["level"], r["priority"]) for r in records],
                         [("info", 6), ("info", 6), ("info", 6), ("warn", 4), ("error", 3)])
        self.assertEqual(list(records[1])[:6], ["time", "level", "priority", "namespace", "message", "event"])

    def test_levels_and_twisted_python_log_lines(self) -> None:
        from twisted.python import log as legacy

        records = self.records(lambda log: (log.debug("d"), log.critical("c"), log.info("x", priority="high")))
        self.assertEqual([(r["level"], r["priority"]) for r in records], [("debug", 7), ("critical", 2), ("info", 6)])
        self.assertEqual(records[2]["field_priority"], "high")
        out = io.StringIO()
        observer = JSONLineObserver(out)
        globalLogPublisher.addObserver(observer)
        try:
            legacy.msg("cache of 42 files dropped")
            legacy.err(ZeroDivisionError("division by zero"), "Unhandled Error")
        finally:
            globalLogPublisher.removeObserver(observer)
        self.flushLoggedErrors(ZeroDivisionError)
        said, error = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual((said["namespace"], said["event"], said["priority"]), ("twisted", "cache_of_files_dropped", 6))
        self.assertEqual((error["namespace"], error["event"], error["priority"]), ("twisted", "unhandled_error", 2))
        for record in (said, error):
            self.assertFalse({"isError", "why", "system", "failure", "format", "log_legacy"} & set(record))


class PortLinesTests(TestCase):
    """A listening port's own "starting on" and "Port Closed" lines are left out (the gateway says what it
    listens on)."""

    @defer.inlineCallbacks
    def test_a_port_that_starts_and_stops_logs_nothing(self) -> Any:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        out = io.StringIO()
        observer = JSONLineObserver(out)
        globalLogPublisher.addObserver(observer)
        try:
            factory = Factory()
            factory.noisy = False
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            yield port.stopListening()
            unix = reactor.listenUNIX(self.mktemp(), factory)
            yield unix.stopListening()
        finally:
            globalLogPublisher.removeObserver(observer)
        self.assertEqual(out.getvalue(), "")


class JournalTests(TestCase):
    """``<N>`` before each JSON line when standard output is the journal's stream (``JOURNAL_STREAM``), only then."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.stream = open(self.folder / "stdout", "w")
        self.addCleanup(self.stream.close)
        st = os.fstat(self.stream.fileno())
        self.journal = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}

    def test_the_stream_is_compared(self) -> None:
        from camgateway.runtime.logs import to_journal

        other = os.fstat(0)
        self.assertTrue(to_journal(self.stream, self.journal))
        self.assertFalse(to_journal(self.stream, {}))
        self.assertFalse(to_journal(self.stream, {"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino + 1}"}))
        self.assertFalse(to_journal(self.stream, {"JOURNAL_STREAM": "nonsense"}))
        self.assertFalse(to_journal(io.StringIO(), self.journal))  # no descriptor

    def test_prefix_only_on_the_journals_standard_output(self) -> None:
        self.patch(os, "environ", dict(os.environ, **self.journal))
        observer = observer_for("auto", None, None, self.stream)
        self.assertTrue(observer.journal)  # type: ignore[union-attr]
        to_file = observer_for("json", self.folder / "gw.log", None, self.stream)
        to_twistds = observer_for("json", None, str(self.folder / "twistd.log"), self.stream)
        self.assertEqual((to_file.journal, to_twistds.journal), (False, False))  # type: ignore[union-attr]
        self.assertIsNone(observer_for("text", None, None, self.stream))
        out = io.StringIO()
        log = Logger(namespace="camgateway.test", observer=JSONLineObserver(out, journal=True))
        log.warn("disk {n} full", n=1)
        log.info("fine")
        lines = out.getvalue().splitlines()
        self.assertEqual([line[:3] for line in lines], ["<4>", "<6>"])
        self.assertEqual(json.loads(lines[0][3:])["priority"], 4)


class QuietClientTests(TestCase):
    """The status site asks its workers with no "Starting factory"/"Stopping factory" line per request."""

    @defer.inlineCallbacks
    def test_asking_the_workers(self) -> Any:
        from twisted.internet import reactor
        from twisted.web import resource, server

        from camgateway.web.merge import WorkerPeers

        class Answer(resource.Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b'{"sessions": 1}'

        path = self.mktemp() + ".sock"
        site = server.Site(Answer())
        site.noisy = False
        port = reactor.listenUNIX(path, site)
        self.addCleanup(port.stopListening)

        class Workers:
            status_sockets = {1: path}

        class Request:
            def getHeader(self, name: bytes) -> None:
                return None

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        peers = WorkerPeers(reactor, Workers())
        for _ in range(3):
            answers = yield peers.ask_all(b"/api/summary", Request())
            self.assertEqual(answers, {1: {"sessions": 1}})
        self.assertEqual([e.get("log_format") for e in events if "factory" in str(e.get("log_format", "")).lower()], [])


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


class TurnBufferTests(TestCase):
    """Log lines reach the file once per reactor turn, in order, and none is left behind."""

    def test_one_write_per_turn(self) -> None:
        clock, out = RunningClock(), CountingStream()
        buffered = TurnBuffer(out, clock)
        observer = JSONLineObserver(buffered)  # type: ignore[arg-type]
        for n in range(3):
            observer({"log_time": 0.0, "log_format": "line {n}", "n": n, "log_namespace": "t"})
        self.assertEqual((out.writes, out.getvalue()), (0, ""))  # kept until the turn ends
        clock.advance(0)
        self.assertEqual((out.writes, out.flushes), (1, 1))
        self.assertEqual([json.loads(line)["message"] for line in out.getvalue().splitlines()],
                         ["line 0", "line 1", "line 2"])
        clock.advance(0)
        self.assertEqual(out.writes, 1)  # nothing new, nothing written

    def test_at_once_when_the_reactor_is_not_running_after_what_waits(self) -> None:
        clock, out = RunningClock(), CountingStream()
        buffered = TurnBuffer(out, clock)
        buffered.write("a\n")
        clock.running = False  # shutdown: the turn will not end
        buffered.write("b\n")
        self.assertEqual(out.getvalue(), "a\nb\n")

    def test_from_another_thread_the_reactor_is_asked_to_write(self) -> None:
        clock, out = RunningClock(), CountingStream()
        buffered = TurnBuffer(out, clock)
        import threading

        t = threading.Thread(target=buffered.write, args=("from a thread\n",))
        t.start()
        t.join()
        self.assertEqual(clock.calls, [])
        [(f, args)] = clock.from_threads
        f(*args)
        self.assertEqual(out.getvalue(), "from a thread\n")

    def flush_with_a_signal(self, running: bool, then_flush: bool = False) -> Any:
        """A flush during which "a signal handler" logs (its first flush of the stream logs a line,
        and with ``then_flush`` asks for a flush too).

        Run on a thread of its own, so that a deadlock fails the test instead of hanging the suite.
        """
        import threading

        clock = RunningClock()
        clock.running = running

        class Interrupted(CountingStream):
            inside = reentered = False

            def write(self, text: str) -> int:
                self.reentered = self.reentered or self.inside
                return super().write(text)

            def flush(self) -> None:
                super().flush()
                if self.flushes == 1:
                    self.inside = True
                    buffered.write("Received SIGTERM\n")  # what Twisted's sigTerm logs
                    if then_flush:
                        buffered.flush_now()
                    self.inside = False

        out = Interrupted()
        buffered = TurnBuffer(out, clock)
        buffered._lines.append("kept\n")  # kept during the turn the signal interrupts
        t = threading.Thread(target=buffered.flush_now, daemon=True)
        t.start()
        t.join(10)
        self.assertFalse(t.is_alive(), "a line logged during a flush deadlocked the flush")
        self.assertEqual((clock.calls, clock.from_threads), ([], []))  # nothing left for a later turn
        self.assertFalse(out.reentered, "the stream was written from inside its own flush")
        return out

    def test_a_signal_handlers_line_during_a_flush_is_written_after_the_kept_ones(self) -> None:
        out = self.flush_with_a_signal(running=True)
        self.assertEqual((out.getvalue(), out.writes), ("kept\nReceived SIGTERM\n", 2))

    def test_the_same_once_the_reactor_has_stopped(self) -> None:
        out = self.flush_with_a_signal(running=False)
        self.assertEqual((out.getvalue(), out.writes), ("kept\nReceived SIGTERM\n", 2))

    def test_a_flush_asked_for_during_a_flush_leaves_it_to_that_flush(self) -> None:
        out = self.flush_with_a_signal(running=True, then_flush=True)
        self.assertEqual((out.getvalue(), out.writes), ("kept\nReceived SIGTERM\n", 2))

    def test_lines_waiting_at_exit_are_written(self) -> None:
        clock, out = RunningClock(), CountingStream()
        buffered = TurnBuffer(out, clock)
        buffered.write("last words\n")
        buffered.flush_now()  # (registered with atexit)
        self.assertEqual(out.getvalue(), "last words\n")


class ProgressTests(GatewayTestCase):
    """One ``transfer_progress`` event per active transfer per interval, never per frame."""

    @defer.inlineCallbacks
    def test_progress_events(self) -> Any:
        events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("event") == "transfer_progress":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        yield self.start_gateway(progress_interval=0.25)
        rng = random.Random(51)
        pool = ContentPool(rng, variants=1)
        slow = camera(0, "dsm", rng, pool, photos=0, videos=1, video_size=240_000, slow_bps=120_000)
        started = time.monotonic()
        [result] = yield self.cameras([slow])
        elapsed = time.monotonic() - started
        self.assertTrue(result.ok)
        self.assertGreaterEqual(len(events), 2)
        self.assertLessEqual(len(events), elapsed / 0.25 + 2)  # one per tick, not one per frame (235 frames)
        first, last = events[0], events[-1]
        self.assertEqual({e["imei"] for e in events}, {str(slow.imei)})
        self.assertIn("/sdcard/dsm/", first["file"])
        self.assertEqual(first["total"], 240_000)
        self.assertLess(first["held"], last["held"])
        self.assertLessEqual(last["held"], 240_000)
        self.assertGreater(last["rate"], 0)
        self.assertIn("transfer progress: camera", first["log_format"])


class ProgressBatchTests(TestCase):
    """Thousands of transfers' progress events are logged a batch per reactor turn, not all in one."""

    def setUp(self) -> None:
        import camgateway.web.progress as progress

        self.events: list[dict[str, Any]] = []
        self.patch(progress, "log", Logger(namespace="camgateway.web.progress", observer=self.events.append))
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.services = Fake(sessions={}, clock=self.clock)
        for i in range(600):
            transfer = Fake(held=5000, resumed_from=0, limit=10_000)
            offer = Fake(printable=f"file{i}", camera="dualcam")
            self.services.sessions[str(i)] = Fake(imei=i, transfer=transfer, offer=offer, connected=True,
                                                  file_started_at=990.0, link=Fake(peer="127.0.0.1:1"))
        self.reporter = progress.ProgressReporter(lambda: self.services, batch=256)

    def turn(self) -> None:
        """One reactor turn: the calls due now, not those they make (task.Clock.advance would run those too)."""
        due = [call for call in self.clock.getDelayedCalls() if call.getTime() <= self.clock.seconds()]
        for call in due:
            self.clock.calls.remove(call)
            call.func(*call.args, **call.kw)

    def test_one_batch_a_turn(self) -> None:
        self.reporter()
        self.assertEqual(len(self.events), 256)  # the rest wait for the next turns
        self.reporter()  # a tick while the last one's events are still being logged: nothing more
        self.assertEqual(len(self.events), 256)
        self.turn()
        self.assertEqual(len(self.events), 512)
        self.services.sessions["599"].connected = False  # gone before its turn came
        self.turn()
        self.assertEqual(len(self.events), 599)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len({e["imei"] for e in self.events}), 599)
        self.assertEqual(self.events[0]["rate"], 500)  # 5,000 bytes in the 10 s since the file began
        self.clock.advance(30)
        self.reporter()  # the next tick starts afresh
        self.assertEqual(len(self.events), 599 + 256)


class ProgressSpreadTests(TestCase):
    """With ``spread``, a tick's events come a slice at a time over that many seconds, not in one burst."""

    def setUp(self) -> None:
        import camgateway.web.progress as progress

        self.progress = progress
        self.events: list[dict[str, Any]] = []
        self.patch(progress, "log", Logger(namespace="camgateway.web.progress", observer=self.events.append))
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.services = Fake(sessions={}, clock=self.clock)

    def add(self, n: int, transferring: bool = True) -> None:
        for _ in range(n):
            i = len(self.services.sessions)
            transfer = Fake(held=5000, resumed_from=0, limit=10_000) if transferring else None
            offer = Fake(printable=f"file{i}", camera="dualcam")
            self.services.sessions[str(i)] = Fake(imei=i, transfer=transfer, offer=offer, connected=True,
                                                  file_started_at=990.0, link=Fake(peer="127.0.0.1:1"))

    def test_spread_over_the_time_given(self) -> None:
        self.add(600)
        self.add(50, transferring=False)  # between two files: no event, and no share of the spread
        reporter = self.progress.ProgressReporter(lambda: self.services, batch=256, spread=24.0)
        size, gap = reporter.slicing(600)
        self.assertEqual(size, self.progress.PROGRESS_SMALL)
        self.assertAlmostEqual(gap, 24.0 * size / 600)
        reporter()
        self.assertEqual(len(self.events), size)  # not 256: the rest are spread
        seen = [len(self.events)]
        for _ in range(60):
            self.clock.advance(gap)
            seen.append(len(self.events))
        self.assertEqual(len(self.events), 600)
        self.assertEqual(sorted(e["imei"] for e in self.events), list(range(600)))  # each once
        steps = [b - a for a, b in zip(seen, seen[1:]) if b != a]
        self.assertLessEqual(max(steps), size)
        last = seen.index(600) * gap
        self.assertLessEqual(last, 24.0)  # done within the spread, before the next tick
        self.assertGreater(last, 20.0)  # and not in a burst at its start
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(30 - last)
        reporter()  # the next tick starts afresh, each transfer's rate over its own 30 s
        self.assertEqual(len(self.events), 600 + size)
        self.assertEqual(self.events[-1]["rate"], 0)  # nothing more held since its last event

    def test_slices_grow_with_the_transfers_but_stay_bounded(self) -> None:
        reporter = self.progress.ProgressReporter(lambda: self.services, batch=32, spread=24.0)
        self.assertEqual(reporter.slicing(16), (32, 0.0))  # a few: all at once
        size, gap = reporter.slicing(5000)
        self.assertEqual(size, 21)  # 5,000 over 24 s, a slice about every 0.1 s
        self.assertAlmostEqual(gap, 24.0 * 21 / 5000)
        size, gap = reporter.slicing(100_000)
        self.assertEqual(size, 32)  # never more than the batch to a turn
        self.assertAlmostEqual(gap * 100_000 / 32, 24.0)

    def test_a_few_transfers_at_once(self) -> None:
        self.add(10)
        reporter = self.progress.ProgressReporter(lambda: self.services, spread=24.0)
        reporter()
        self.assertEqual(len(self.events), 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_gateway_spreads_over_most_of_the_interval(self) -> None:
        from camgateway.runtime.config import parse_config
        from camgateway.runtime.service import make_gateway

        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        config = parse_config({"listen": ["tcp:0:interface=127.0.0.1"], "log": {"progress_interval": "20s"}},
                              base=work)
        top = make_gateway(config, reactor=task.Clock())
        [reporter] = [s.call[0] for s in top if isinstance(getattr(s, "call", (None,))[0],
                                                             self.progress.ProgressReporter)]
        size, gap = reporter.slicing(100_000)  # many transfers: the slices fill the spread
        spread = gap * 100_000 / size
        self.assertAlmostEqual(spread, self.progress.PROGRESS_SPREAD * 20)
        self.assertLess(spread, 20)


class Fake:
    """An object with the given attributes, hashed by identity and weakly referable
    (the reporter keeps sessions as weak keys: ``types.SimpleNamespace`` is neither)."""

    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)


class TwistdLogTests(TestCase):
    """``twistd camgateway`` with JSON logs: standard output, --logger, and a log.file that logrotate moves."""

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.processes: list[subprocess.Popen] = []

    def tearDown(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)

    def start(self, log: Optional[dict[str, Any]], *flags: str, journal: bool = False,
              **config: Any) -> tuple[subprocess.Popen, Path]:
        """Run the gateway (``config``: more of its configuration); ``journal``: its standard output is
        "the journal's stream" (``JOURNAL_STREAM`` names the file it writes to)."""
        path = self.work / "camgateway.yaml"
        doc: dict[str, Any] = {"listen": ["tcp:0:interface=127.0.0.1"], "storage": {"spool": "spool"},
                               "sinks": [{"type": "disk", "root": "files"}], **config}
        if log:
            doc["log"] = log
        path.write_text(json.dumps(doc))
        out = self.work / f"stdout-{len(self.processes)}.txt"
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        with open(out, "w") as f:  # not a terminal
            if journal:
                st = os.fstat(f.fileno())
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            process = subprocess.Popen([twistd(), "-n", "--pidfile=", *flags, "camgateway", "--config", str(path)],
                                       cwd=self.work, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.DEVNULL,
                                       env=env)
        self.processes.append(process)
        return process, out

    def records(self, path: Path, process: subprocess.Popen, wanted: Any, what: str,
                journal: bool = False) -> list[dict[str, Any]]:
        """Every line of ``path`` as JSON, once one satisfies ``wanted``; with ``journal``, each line
        starts with its record's priority as ``<N>``."""
        deadline = time.monotonic() + 30
        while True:
            text = path.read_text() if path.exists() else ""
            lines = [line for line in text.splitlines() if line.strip()]
            complete = lines if text.endswith("\n") else lines[:-1]
            records = [_journal_line(line) if journal else json.loads(line) for line in complete]  # all JSON
            if any(wanted(r) for r in records):
                return records
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {what} in {path} (exit {process.poll()}):\n{text[-3000:]}")
            time.sleep(0.05)

    def port(self, path: Path, process: subprocess.Popen, journal: bool = False) -> int:
        records = self.records(path, process, lambda r: "listening for cameras" in r["message"], "listening record",
                               journal)
        [message] = [r["message"] for r in records if "listening for cameras" in r["message"]]
        return int(re.search(r"port=(\d+)\)", message).group(1))  # type: ignore[union-attr]

    def send_photo(self, port: int) -> bytes:
        content = b"\xff\xd8" + os.urandom(5000) + b"\xff\xd9"
        Camera(port).send_photo(content)
        return content

    def stop(self, process: subprocess.Popen) -> None:
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(20), -signal.SIGTERM)

    def test_json_on_standard_output(self) -> None:
        process, out = self.start(None)  # log.format auto, stdout not a terminal: JSON
        content = self.send_photo(self.port(out, process))
        records = self.records(out, process, lambda r: r.get("event") == "file_received", "file_received record")
        [record] = [r for r in records if r.get("event") == "file_received"]
        self.assertLessEqual(FILE_RECEIVED_FIELDS, set(record))
        self.assertEqual((record["imei"], record["size"], record["camera"], record["source"], record["media"]),
                         (str(IMEI), len(content), "dualcam", "photof", "photo"))
        self.assertEqual((record["level"], record["namespace"], record["resumed_from"]), ("info", "camgateway.transfer.lifecycle", 0))
        self.assertTrue(record["peer"].startswith("127.0.0.1:"))
        self.assertTrue(record["message"].startswith("file received: camera"))
        self.assertTrue(any(r["message"].startswith("twistd ") for r in records))  # twistd's own lines too
        self.stop(process)
        self.assertIn("camgateway stopped", [r["message"] for r in self.records(
            out, process, lambda r: r["message"] == "camgateway stopped", "stop record")])

    def test_logger_flag(self) -> None:
        process, out = self.start({"format": "text"}, "--logger=camgateway.runtime.logs.json_observer")
        self.send_photo(self.port(out, process))
        self.records(out, process, lambda r: r.get("event") == "file_received", "file_received record")
        self.stop(process)

    def test_log_file_survives_logrotate(self) -> None:
        process, out = self.start({"file": "camgateway.log", "format": "json"})
        log_file = self.work / "camgateway.log"
        port = self.port(log_file, process)
        log_file.rename(self.work / "camgateway.log.1")  # what logrotate does, no signal needed
        self.send_photo(port)
        self.records(log_file, process, lambda r: r.get("event") == "file_received", "record in the new file")
        rotated = (self.work / "camgateway.log.1").read_text()
        self.assertIn("listening for cameras", rotated)
        self.assertNotIn("file_received", rotated)
        self.assertEqual(out.read_text(), "")
        self.stop(process)

    def test_under_systemd_with_workers_a_status_page_and_an_http_sink(self) -> None:
        """``<N>`` before every line (workers' too), an ``event`` in every record, no Twisted factory or
        port lines while the status page polls the workers, and a receiver's 503 is a warning in words."""
        receiver = Receiver([503])
        self.addCleanup(receiver.close)
        sinks = [{"type": "disk", "root": "files"}, {"type": "http", "url": f"{receiver.url}/up/{{name}}"}]
        process, out = self.start(None, journal=True, workers=2, sinks=sinks,
                                  http={"listen": ["tcp:port=0:interface=127.0.0.1"]})
        port = self.port(out, process, journal=True)
        [status] = [r for r in self.records(out, process, lambda r: "status web service on tcp" in r["message"],
                                            "status web service record", journal=True)
                    if "status web service on tcp" in r["message"]]
        status_port = re.search(r"port=(\d+)\)", status["message"]).group(1)  # type: ignore[union-attr]
        page = f"http://127.0.0.1:{status_port}/api/"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(3):  # the page's polls: seven requests, each asked of the worker too
            for route in ("summary", "sessions", "transfers", "files?limit=200", "partials", "outbox", "failures"):
                with opener.open(page + route, timeout=10) as answer:
                    body = json.loads(answer.read())
            summary = json.loads(opener.open(page + "summary", timeout=10).read())
            self.assertTrue([w for w in summary["workers"] if w["index"] == 1 and w["answered"]], summary)
        self.send_photo(port)
        self.records(out, process, lambda r: r["event"] == "file_delivered", "file_delivered record", journal=True)
        self.stop(process)
        records = self.records(out, process, lambda r: r["message"] == "Server Shut Down.", "the last record",
                               journal=True)
        self.assertTrue(body is not None and [r for r in records if r.get("worker") == 1])
        for record in records:
            self.assertRegex(record["event"], r"^[a-z][a-z0-9_]*$", record)
            self.assertNotIn("log_legacy", json.dumps(record))
            self.assertNotRegex(record["message"], r"(Starting|Stopping) factory| starting on |Port .* Closed")
            self.assertFalse([key for key in record if key.startswith("log_")], record)
        self.assertEqual([r["message"] for r in records if r["level"] in ("error", "critical")], [])
        [warning] = [r for r in records if r["event"] == "delivery_failed"]
        self.assertEqual((warning["level"], warning["sink"], warning["reason"], warning["imei"], warning["file"]),
                         ("warn", "http:127.0.0.1:%d" % receiver.port, "HTTP 503 Service Unavailable: busy",
                          str(IMEI), "%photof"))
        [delivered] = [r for r in records if r["event"] == "file_delivered"]
        self.assertEqual((delivered["file_id"], delivered["sha256"]), (warning["file_id"], warning["sha256"]))
        self.assertEqual([code for code, _ in receiver.requests], [503, 200])


def _journal_line(line: str) -> dict[str, Any]:
    """A journald line: ``<N>`` (the record's priority, by its level), then the JSON record."""
    match = re.fullmatch(r"<([0-7])>(\{.*\})", line)
    assert match is not None, f"not a <N>{{...}} line: {line[:200]!r}"
    record: dict[str, Any] = json.loads(match.group(2))
    levels = {"critical": 2, "error": 3, "warn": 4, "info": 6, "debug": 7}
    assert int(match.group(1)) == record["priority"] == levels[record["level"]], line[:200]
    return record


class Receiver:
    """An HTTP receiver of the test's own on a thread (the test blocks while twistd runs): it answers
    the codes of ``script`` in turn, then 200, and keeps ``(code, body)`` of every request."""

    def __init__(self, script: list[int]) -> None:
        import http.server
        import threading

        owner = self
        self.script = list(script)
        self.requests: list[tuple[int, bytes]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the handler's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = owner.script.pop(0) if owner.script else 200
                owner.requests.append((code, body))
                self.send_response(code)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"busy" if code >= 300 else b"done")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
