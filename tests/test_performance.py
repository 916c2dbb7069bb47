"""The ``performance:`` switches: parsed like any section, each off selecting its plain path,
the process-wide tuning applied by the process (the tap, a worker), never by the service.

See docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import sys
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer, reactor
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from camgateway.delivery.sinks.disk import DiskSink
from camgateway.perf import process
from camgateway.perf.due import DueSessions, NoDueSessions
from camgateway.perf.settings import ENVIRONMENT, SWITCHES, Performance
from camgateway.perf.sockets import PlainWriter, TurnWriter, plain_write, write_now
from camgateway.perf.threads import TwistedPool, WorkerPool
from camgateway.runtime import tap
from camgateway.runtime.config import Config, ConfigError, effective, parse_config
from camgateway.runtime.service import GatewayService, flush_stale, make_gateway
from camgateway.session.protocol import CameraProtocol
from tests.support import loopback_pair, make_services

ALL_ON = Performance.every(True)
ALL_OFF = Performance.every(False)


def parse(text: str) -> Config:
    return parse_config(yaml.safe_load(text), "test.yaml", Path("/srv/gateway"))


class EnvironmentMixin:
    """Sets CAMGATEWAY_PERFORMANCE for one test (restored after)."""

    def set_environment(self, value: str | None) -> None:
        old = os.environ.get(ENVIRONMENT)
        if value is None:
            os.environ.pop(ENVIRONMENT, None)
        else:
            os.environ[ENVIRONMENT] = value

        def restore() -> None:
            if old is None:
                os.environ.pop(ENVIRONMENT, None)
            else:
                os.environ[ENVIRONMENT] = old

        self.addCleanup(restore)  # type: ignore[attr-defined]


class SectionTests(EnvironmentMixin, TestCase):
    """``performance:`` in the YAML file."""

    def test_every_switch_is_on_by_default(self) -> None:
        self.set_environment(None)
        self.assertEqual(parse("{}").performance, ALL_ON)
        self.assertEqual(Config().performance, ALL_ON)

    def test_one_switch_off(self) -> None:
        self.set_environment(None)
        self.assertEqual(parse("performance: {due_heap: false}").performance,
                         dataclasses.replace(ALL_ON, due_heap=False))

    def test_unknown_keys_and_wrong_types_are_errors_reported_with_the_others(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse("performance: {due_heap: 'no', turbo: true}\ntimeouts: {idle: -3}")
        keys = sorted(error.key for error in caught.exception.errors)
        self.assertEqual(keys, ["performance.due_heap", "performance.turbo", "timeouts.idle"])
        text = str(caught.exception)
        self.assertIn("performance.due_heap: must be true or false, got 'no'", text)
        self.assertIn("performance.turbo: unknown key", text)

    def test_not_a_mapping(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse("performance: [due_heap]")
        self.assertEqual([error.key for error in caught.exception.errors], ["performance"])

    def test_effective_shows_every_switch_and_reads_back(self) -> None:
        self.set_environment(None)
        config = parse("performance: {group_sync: false, gc: false}")
        shown = effective(config)["performance"]
        self.assertEqual(list(shown), list(SWITCHES))
        self.assertEqual([name for name, on in shown.items() if not on], ["group_sync", "gc"])
        again = parse_config(yaml.safe_load(yaml.safe_dump(effective(config))), "again.yaml", Path("/srv/gateway"))
        self.assertEqual(again.performance, config.performance)

    def test_the_environment_turns_every_default_off(self) -> None:
        self.set_environment("off")
        self.assertEqual(parse("{}").performance, ALL_OFF)
        self.assertEqual(Config().performance, ALL_OFF)

    def test_a_setting_in_the_file_wins_over_the_environment(self) -> None:
        self.set_environment("OFF")
        performance = parse("performance: {wide_reads: true}").performance
        self.assertEqual(performance, dataclasses.replace(ALL_OFF, wide_reads=True))

    def test_on_and_unset_leave_the_defaults_on(self) -> None:
        for value in ("on", ""):
            self.set_environment(value)
            self.assertEqual(parse("{}").performance, ALL_ON)

    def test_another_value_of_the_environment_is_an_error(self) -> None:
        self.set_environment("fast")
        with self.assertRaises(ConfigError) as caught:
            parse("{}")
        self.assertEqual([error.key for error in caught.exception.errors], [ENVIRONMENT])
        self.assertIn("must be on or off, got 'fast'", str(caught.exception))


class PlainPathTests(TestCase):
    """Each switch off: the plain path, chosen when the part is made."""

    timeout = 30

    def services(self, **switches: bool) -> Any:
        return make_services(Path(self.mktemp()), performance=dataclasses.replace(ALL_ON, **switches))

    def test_replies(self) -> None:
        self.assertIsInstance(self.services().writer, TurnWriter)
        self.assertIs(self.services().writer._send, write_now)
        self.assertIs(self.services(direct_send=False).writer._send, plain_write)
        writer = self.services(reply_batching=False).writer
        self.assertIsInstance(writer, PlainWriter)
        self.assertIs(writer._send, write_now)
        self.assertIs(self.services(reply_batching=False, direct_send=False).writer._send, plain_write)

    @defer.inlineCallbacks
    def test_without_direct_send_a_reply_goes_through_twisteds_buffer(self) -> Any:
        transport, _ = yield loopback_pair(self)
        PlainWriter(plain_write).write(transport, b"reply")
        self.assertIn(b"reply", transport.dataBuffer + b"".join(transport._tempDataBuffer))
        PlainWriter(write_now).write(transport, b"more")  # (queued behind: never sent before "reply")
        self.assertTrue((transport.dataBuffer + b"".join(transport._tempDataBuffer)).endswith(b"replymore"))

    def test_without_the_due_heap_the_scan_visits_every_session(self) -> None:
        self.assertIsInstance(self.services().due, DueSessions)
        s = self.services(due_heap=False)
        self.assertIsInstance(s.due, NoDueSessions)

        class Session:
            def __init__(self) -> None:
                self.visits: list[float] = []

            def write_stale(self, now: float) -> None:
                self.visits.append(now)

        s.sessions.update({"1": Session(), "2": Session()})  # (the sessions the scan was made with)
        s.due.at(s.sessions["1"], 0.0)  # (filed nowhere)
        s.clock.advance(5)
        flush_stale(s)
        self.assertEqual([session.visits for session in s.sessions.values()], [[5.0], [5.0]])

    def test_with_the_due_heap_only_sessions_due_are_visited(self) -> None:
        s = self.services()

        class Session:
            visits = 0

            def write_stale(self, now: float) -> None:
                self.visits += 1

        s.sessions = {"1": Session(), "2": Session()}
        s.due.at(s.sessions["1"], 0.0)
        flush_stale(s)
        self.assertEqual([session.visits for session in s.sessions.values()], [1, 0])

    @defer.inlineCallbacks
    def test_reads_and_read_marks_on_a_real_connection(self) -> Any:
        for switches, wide, marks in (({}, True, True), ({"wide_reads": False, "read_marks": False}, False, False)):
            transport, _ = yield loopback_pair(self)
            protocol = CameraProtocol(self.services(**switches))
            protocol.makeConnection(transport)
            self.assertEqual(protocol._full_read != 0, wide)
            self.assertEqual(protocol.set_read_mark(4096), marks)
            mark = transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
            self.assertEqual(mark, 4096 if marks else 1)
            protocol.setTimeout(None)

    def test_a_test_transport_is_never_marked(self) -> None:
        protocol = CameraProtocol(self.services())
        protocol.makeConnection(StringTransport())
        self.assertFalse(protocol.set_read_mark(4096))
        protocol.setTimeout(None)


class GatewayTests(TestCase):
    """A real gateway started in this process with every switch on, then off."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self, performance: Performance) -> Any:
        root = Path(self.mktemp()).resolve()
        config = Config(listen=("tcp:0:interface=127.0.0.1",), spool=root / "spool", min_free_bytes=0,
                        sinks=({"type": "disk", "root": str(root / "files")},), performance=performance)
        top = make_gateway(config, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        yield top.gateway.ready
        return top

    @defer.inlineCallbacks
    def test_every_speed_up_is_made_when_on(self) -> Any:
        top = yield self.start(ALL_ON)
        s = top.gateway.services
        self.assertIsInstance(top.gateway.pool, WorkerPool)
        self.assertIsNotNone(s.batch_thread)
        self.assertIs(s.store._thread._runner, s.batch_thread)
        self.assertIsNotNone(s.spool_sync)
        self.assertIsNotNone(s.reserve)
        [sink] = s.sinks
        self.assertIsNotNone(sink._batches)

    @defer.inlineCallbacks
    def test_every_plain_path_when_off(self) -> Any:
        top = yield self.start(ALL_OFF)
        s = top.gateway.services
        self.assertIsInstance(top.gateway.pool, TwistedPool)
        self.assertIsNone(s.batch_thread)
        self.assertFalse(s.store._thread._runner.batching)  # a commit per statement
        self.assertIsNone(s.spool_sync)  # an fdatasync per file
        self.assertIsNone(s.reserve)
        [sink] = s.sinks
        self.assertIsInstance(sink, DiskSink)
        self.assertIsNone(sink._batches)
        self.assertIsNone(sink.group)  # the sidecar and folders fsynced one by one
        self.assertIsInstance(s.writer, PlainWriter)
        self.assertIsInstance(s.due, NoDueSessions)
        yield s.store.all()
        yield s.store.pending()
        self.assertEqual(s.store._thread.batches, s.store._thread.served)


class Interpreter:
    """The interpreter's process-wide settings, to compare and to restore."""

    def __init__(self) -> None:
        self.switch = sys.getswitchinterval()
        self.threshold = gc.get_threshold()
        self.frozen = gc.get_freeze_count()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Interpreter) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Interpreter({vars(self)})"

    def restore(self) -> None:
        sys.setswitchinterval(self.switch)
        gc.set_threshold(*self.threshold)
        if not self.frozen:
            gc.unfreeze()


class ProcessTuningTests(TestCase):
    """The allocator, the collector and the switch interval: the process's, not the service's."""

    timeout = 60

    def setUp(self) -> None:
        self.addCleanup(Interpreter().restore)
        self.mallopt: list[None] = []
        self.patch(process, "tune_malloc", lambda: self.mallopt.append(None) or True)

    @defer.inlineCallbacks
    def test_a_gateway_started_and_stopped_in_process_leaves_the_interpreter_alone(self) -> Any:
        gc.unfreeze()
        before = Interpreter()
        root = Path(self.mktemp()).resolve()
        service = GatewayService(Config(listen=("tcp:0:interface=127.0.0.1",), spool=root / "spool",
                                        sinks=({"type": "disk", "root": str(root / "files")},), min_free_bytes=0,
                                        performance=ALL_ON), reactor)
        service.startService()
        yield service.ready
        self.assertEqual(Interpreter(), before)
        yield service.stopService()
        self.assertEqual(Interpreter(), before)
        self.assertEqual(self.mallopt, [])

    def options(self, performance: str) -> tap.Options:
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        path = root / "camgateway.yaml"
        path.write_text(f"listen: ['tcp:0:interface=127.0.0.1']\nstorage: {{spool: {root / 'spool'}}}\n"
                        f"sinks: [{{type: disk, root: {root / 'files'}}}]\nperformance: {performance}\n")
        options = tap.Options()
        options.parseOptions(["--config", str(path)])
        return options

    def test_the_tap_applies_the_tuning_when_on(self) -> None:
        gc.unfreeze()
        sys.setswitchinterval(0.005)
        gc.set_threshold(700, *gc.get_threshold()[1:])
        tap.makeService(self.options("{malloc: true, gc: true, switch_interval: true}"))
        self.assertEqual(sys.getswitchinterval(), process.GIL_SWITCH_INTERVAL)
        self.assertEqual(gc.get_threshold()[0], process.GC_THRESHOLD)
        self.assertGreater(gc.get_freeze_count(), 1000)  # the objects loaded by then
        self.assertEqual(self.mallopt, [None])

    def test_the_tap_applies_none_of_it_when_off(self) -> None:
        gc.unfreeze()
        sys.setswitchinterval(0.005)
        gc.set_threshold(700, *gc.get_threshold()[1:])
        before = Interpreter()
        tap.makeService(self.options("{malloc: false, gc: false, switch_interval: false}"))
        self.assertEqual(Interpreter(), before)
        self.assertEqual(self.mallopt, [])

    def test_several_workers_keep_cpythons_switch_interval(self) -> None:
        sys.setswitchinterval(0.001)
        process.tune_process(dataclasses.replace(ALL_ON, gc=False), workers=2)
        self.assertEqual(sys.getswitchinterval(), process.GIL_SWITCH_INTERVAL_WORKERS)

    def test_each_switch_alone(self) -> None:
        gc.unfreeze()
        applied = process.tune_process(dataclasses.replace(ALL_OFF, gc=True))
        self.assertEqual(applied, ["gc"])
        self.assertEqual(self.mallopt, [])
        self.assertEqual(process.tune_process(dataclasses.replace(ALL_OFF, malloc=True)), ["malloc"])
