"""``workers: N``: one listening process hands each camera to its worker process.

Unit tests of the pieces (the IMEI's worker, the hand-over frame, the
dispatcher on StringTransport and Clock, the merged metrics and health),
then the real ``twistd -n camgateway`` with two workers: cameras of both, a
resume inside a worker, a worker killed and restarted, the gateway killed
(its workers follow), a worker folder left from a larger count drained to a
real HTTP endpoint, and the status site answering for every worker (its
counters per worker across a restart, a worker's failing sink in /healthz).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from hypothesis import HealthCheck, example, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from camgateway.wire import codec
from camgateway.runtime.config import ConfigError, parse_config
from camgateway.wire.codec import INIT_SIZE
from camgateway.runtime.workers import (DispatchFactory, Shard, handoff_frame, parse_handoff, shard_of,
                                worker_folders, worker_spool)
from camgateway.web.merge import merge_health, merge_metrics
from tests.support import make_services
from tests.test_scaleout import free_port, wait
from tests.test_status_api import healthz
from tests.test_twistd import Camera, Gateway


def imei_of(worker: int, count: int = 2, start: int = 356307042441013) -> int:
    """An IMEI whose camera goes to ``worker`` of ``count``."""
    imei = start
    while shard_of(str(imei), count) != worker:
        imei += 1
    return imei


class ShardTests(TestCase):
    def test_an_imei_always_has_the_same_worker(self) -> None:
        self.assertEqual(shard_of("863719061653375", 4), shard_of("863719061653375", 4))
        self.assertEqual(shard_of("863719061653375", 1), 0)
        # Fixed values: the same in every process and release (not Python's per-process hash()),
        # or a restart would send cameras to workers that do not hold their partials.
        self.assertEqual([shard_of("863719061653375", n) for n in (2, 3, 4, 1000)], [0, 0, 2, 838])

    def test_a_fleet_of_consecutive_imeis_spreads_evenly(self) -> None:
        for count in (2, 3, 4):
            counts = [0] * count
            for imei in range(863719061600000, 863719061602000):
                counts[shard_of(str(imei), count)] += 1
            for n in counts:
                self.assertGreater(n, 2000 / count * 0.85, (count, counts))

    def test_shard_owns_only_its_cameras_and_a_drain_none(self) -> None:
        root = Path("/spool")
        zero, one = Shard(0, 2, root), Shard(1, 2, root)
        for imei in (str(imei_of(0)), str(imei_of(1))):
            self.assertNotEqual(zero.owns(imei), one.owns(imei))
        self.assertFalse(Shard(2, 2, root, drain=True).owns(str(imei_of(0))))
        self.assertEqual(one.dead, root / "dead")

    def test_worker_folders(self) -> None:
        spool = Path(self.mktemp())
        self.assertEqual(worker_folders(spool), [])
        for name in ("worker-1", "worker-3", "worker-0", "worker-x", "partials", "dead"):
            (spool / name).mkdir(parents=True)
        (spool / "worker-7").write_text("not a folder")
        self.assertEqual(worker_folders(spool), [1, 3])
        self.assertEqual(worker_spool(spool, 0), spool)
        self.assertEqual(worker_spool(spool, 3), spool / "worker-3")


class HandoffFrameTests(TestCase):
    def test_round_trip_in_any_pieces(self) -> None:
        frames = [handoff_frame(2, "10.1.2.3:4567", codec.init_packet(5, 863719061653375, 0x44000400)),
                  handoff_frame(10, "[::1]:80", b""), handoff_frame(2, "", b"x" * 70000)]
        wire = b"".join(frames)
        for step in (1, 7, len(wire)):
            buf, out = bytearray(), []
            for i in range(0, len(wire), step):
                buf += wire[i:i + step]
                while (frame := parse_handoff(buf)) is not None:
                    out.append(frame)
            self.assertEqual(out, [(2, "10.1.2.3:4567", codec.init_packet(5, 863719061653375, 0x44000400)),
                                   (10, "[::1]:80", b""), (2, "", b"x" * 70000)])
            self.assertEqual(buf, b"")


class _Local:
    """Worker 0's camera factory, recording what it is given."""

    def __init__(self) -> None:
        from camgateway.runtime.config import Config
        from camgateway.runtime.context import Stats

        self.built: list[Any] = []
        self.services = type("S", (), {"accepting": True, "config": Config(max_connections=2),
                                       "stats": Stats()})()

    def buildProtocol(self, addr: Any) -> Any:
        local = self

        class Recorder:
            transport: Any = None
            _peer: Any = None
            data = b""

            def makeConnection(self, transport: Any) -> None:
                self.transport = transport

            def dataReceived(self, data: bytes) -> None:
                self.data += data

        camera = Recorder()
        local.built.append(camera)
        return camera


class _Workers:
    def __init__(self) -> None:
        self.handed: list[Any] = []

    def hand(self, index: int, raw: Any, peer: str, head: bytes) -> None:
        self.handed.append((index, raw, peer, head))


class DispatcherTests(TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.local, self.workers = _Local(), _Workers()
        self.factory = DispatchFactory(self.local, self.workers, 2, self.clock, 30.0)

    def connect(self) -> tuple[Any, StringTransport]:
        dispatcher = self.factory.buildProtocol(None)
        transport = StringTransport()
        transport.protocol = dispatcher
        dispatcher.makeConnection(transport)
        return dispatcher, transport

    def test_worker_zero_gets_the_transport_and_every_byte(self) -> None:
        dispatcher, transport = self.connect()
        init = codec.init_packet(5, imei_of(0), 0x44000400)
        for i in range(0, INIT_SIZE - 1):
            dispatcher.dataReceived(init[i:i + 1])
        self.assertEqual(self.local.built, [])
        dispatcher.dataReceived(init[-1:] + b"\x00\x0b")  # the init and the start of the next frame
        [camera] = self.local.built
        self.assertIs(camera.transport, transport)
        self.assertIs(transport.protocol, camera)  # later reads go straight to the camera's protocol
        self.assertEqual(camera.data, init + b"\x00\x0b")
        self.assertEqual(camera._peer, "192.168.1.1:54321")  # StringTransport's peer
        self.assertEqual(self.workers.handed, [])

    def test_not_an_init_goes_to_worker_zero_which_reports_it(self) -> None:
        dispatcher, transport = self.connect()
        dispatcher.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        [camera] = self.local.built
        self.assertTrue(camera.data.startswith(b"GET / HTTP"))

    def test_another_worker_needs_a_real_socket(self) -> None:
        dispatcher, transport = self.connect()
        dispatcher.dataReceived(codec.init_packet(5, imei_of(1), 0x44000400))
        self.assertEqual(self.local.built, [])
        self.assertEqual(self.workers.handed, [])  # a StringTransport cannot be sent to a process
        self.assertTrue(transport.disconnecting)

    def test_silent_connection_is_closed_after_the_idle_timeout(self) -> None:
        dispatcher, transport = self.connect()
        dispatcher.dataReceived(b"\x00\x00\x00")
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_connections_awaiting_their_init_are_limited(self) -> None:
        first, _ = self.connect()
        second, transport = self.connect()
        self.assertIsNone(self.factory.buildProtocol(None))  # limits.max_connections: 2
        self.assertEqual(self.local.services.stats.connections_refused, 1)
        second.dataReceived(codec.init_packet(5, imei_of(0), 0x44000400))  # handed on: no longer counted
        third, _ = self.connect()
        first.connectionLost(None)
        third.connectionLost(None)
        self.assertEqual(self.factory.reading, 0)

    def test_nothing_is_accepted_while_stopping(self) -> None:
        self.local.services.accepting = False
        self.assertIsNone(self.factory.buildProtocol(None))


class DispatcherPropertyTests(TestCase):
    """Whatever arrives, in whatever pieces: every byte reaches the camera's worker, in order."""

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=80), st.lists(st.integers(1, 20), max_size=10), st.integers(1, 4))
    @example(b"\0" * 17, [16], 1)  # the init alone, then a byte more (to the camera's protocol by then)
    def test_bytes_and_worker(self, data: bytes, cuts: list[int], count: int) -> None:
        local, workers = _Local(), _Workers()
        factory = DispatchFactory(local, workers, count, task.Clock(), 30.0)
        dispatcher = factory.buildProtocol(None)
        transport = StringTransport()
        transport.protocol = dispatcher
        dispatcher.makeConnection(transport)
        pos = 0
        for n in cuts + [len(data)]:
            transport.protocol.dataReceived(data[pos:pos + n])  # as the reactor would: to its protocol now
            pos += n
        if len(data) < INIT_SIZE:
            self.assertEqual((local.built, workers.handed, transport.disconnecting), ([], [], False))
            return
        worker = shard_of(str(int.from_bytes(data[4:12], "big")), count) if data[:2] == b"\0\0" else 0
        if worker == 0:
            [camera] = local.built
            self.assertEqual(camera.data, data)
        else:  # (a StringTransport cannot go to another process: closed, nothing handed)
            self.assertEqual((local.built, workers.handed, transport.disconnecting), ([], [], True))
        self.assertEqual(factory.reading, 0)


class WorkersConfigTests(TestCase):
    def test_count_auto_and_errors_name_the_key(self) -> None:
        self.assertEqual(parse_config({}).workers, 1)
        self.assertEqual(parse_config({"workers": 3}).workers, 3)
        self.assertEqual(parse_config({"workers": "auto"}).workers, len(os.sched_getaffinity(0)))
        for bad in (0, -1, 65, "two", True, 1.5):
            with self.assertRaises(ConfigError) as caught:
                parse_config({"workers": bad})
            self.assertEqual(caught.exception.key, "workers")

    def test_several_workers_need_plain_tcp_and_sqlite(self) -> None:
        for listen in (["tcp:5000"], ["tcp6:5000"], ["haproxy:tcp:5000"], ["systemd:domain=INET:index=0"]):
            self.assertEqual(parse_config({"workers": 2, "listen": listen}).workers, 2)
        with self.assertRaises(ConfigError) as caught:
            parse_config({"workers": 2, "listen": ["tcp:5000", "ssl:5001:privateKey=k.pem"]})
        self.assertEqual(caught.exception.key, "listen[1]")
        self.assertIn("TLS", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            parse_config({"workers": 2, "storage": {"resume": "redis://localhost/0"}})
        self.assertEqual(caught.exception.key, "workers")
        parse_config({"workers": 1, "listen": ["ssl:5001:privateKey=k.pem"]})  # one process: anything

    def test_listen_override_is_checked_too(self) -> None:
        from twisted.python import usage

        from camgateway.runtime.tap import Options

        config = Path(self.mktemp())
        config.write_text("workers: 2\n")
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--config", str(config), "--listen", "ssl:5001:privateKey=k.pem"])
        self.assertIn("listen[0]", str(caught.exception))


def _worker_metrics(received: int, delivered: int, active: int, free: int, fast: int, files: int,
                    seconds: float, open_fds: int, max_fds: int) -> str:
    """A worker's /metrics text: the figures the merge tests vary, the rest alike."""
    return f"""# TYPE camgateway_files_received_total counter
camgateway_files_received_total {received}.0
# TYPE camgateway_sink_deliveries_total counter
camgateway_sink_deliveries_total{{sink="disk:/files"}} {delivered}.0
# TYPE camgateway_transfers_active gauge
camgateway_transfers_active {active}.0
# TYPE camgateway_spool_free_bytes gauge
camgateway_spool_free_bytes {free}.0
# TYPE camgateway_dead_letters gauge
camgateway_dead_letters 2.0
# TYPE camgateway_transfer_duration_seconds histogram
camgateway_transfer_duration_seconds_bucket{{le="1.0"}} {fast}.0
camgateway_transfer_duration_seconds_bucket{{le="+Inf"}} {files}.0
camgateway_transfer_duration_seconds_count {files}.0
camgateway_transfer_duration_seconds_sum {seconds}
# TYPE process_open_fds gauge
process_open_fds {open_fds}.0
# TYPE process_max_fds gauge
process_max_fds {max_fds}.0
# TYPE camgateway_build_info gauge
camgateway_build_info{{version="1.0"}} 1.0
"""


_WORKER_0 = ("# HELP camgateway_files_received_total Files\n"
             + _worker_metrics(5, 5, 1, 9000, 4, 5, 6.5, 40, 1024)
             + "# TYPE camgateway_worker_restarts_total counter\n"
             + 'camgateway_worker_restarts_total{worker="1"} 3.0\n')
_WORKER_1 = _worker_metrics(7, 6, 2, 8000, 7, 7, 2.0, 30, 2048)


def series(text: str) -> dict[tuple[str, frozenset], tuple[str, float]]:
    """Every sample of a Prometheus text: (name, labels) -> (its family's type, value)."""
    return {(sample.name, frozenset(sample.labels.items())): (family.type, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples}


class MergeTests(TestCase):
    """The status site's answers of several workers as one."""

    def test_counters_and_process_figures_are_one_series_per_worker(self) -> None:
        merged = {key: v for key, (_, v) in series(merge_metrics({1: _WORKER_1, 0: _WORKER_0}).decode()).items()}

        def at(name: str, **labels: str) -> float:
            return merged[(name, frozenset(labels.items()))]

        self.assertEqual((at("camgateway_files_received_total", worker="0"),
                          at("camgateway_files_received_total", worker="1")), (5, 7))
        self.assertNotIn(("camgateway_files_received_total", frozenset()), merged)
        self.assertEqual(at("camgateway_sink_deliveries_total", sink="disk:/files", worker="1"), 6)
        self.assertEqual((at("camgateway_transfer_duration_seconds_bucket", le="1.0", worker="0"),
                          at("camgateway_transfer_duration_seconds_count", worker="1"),
                          at("camgateway_transfer_duration_seconds_sum", worker="0")), (4, 7, 6.5))
        # each process's descriptors against its own limit
        self.assertEqual((at("process_open_fds", worker="0"), at("process_max_fds", worker="0"),
                          at("process_open_fds", worker="1"), at("process_max_fds", worker="1")),
                         (40, 1024, 30, 2048))
        self.assertEqual(at("camgateway_worker_restarts_total", worker="1"), 3)  # the gateway's count of worker 1
        # gauges: added up, or as each one means
        self.assertEqual(at("camgateway_transfers_active"), 3)
        self.assertEqual(at("camgateway_spool_free_bytes"), 8000)
        self.assertEqual(at("camgateway_dead_letters"), 2)  # one folder, seen by both
        self.assertEqual(at("camgateway_build_info", version="1.0"), 1)

    def test_health_names_each_workers_problems(self) -> None:
        local = {"status": "ok", "version": "1.0", "listening": ["127.0.0.1:5000"], "sessions": 1}
        states = [{"index": 1, "pid": 11, "ready": True, "drain": False},
                  {"index": 2, "pid": 12, "ready": True, "drain": False},
                  {"index": 3, "pid": None, "ready": False, "drain": False}]
        answers: dict[int, Optional[dict[str, Any]]] = {
            1: {"status": "degraded", "sessions": 2, "problems": {"store": "cannot record files: disk I/O error"}},
            2: None, 3: None}
        body, code = merge_health(local, states, answers)
        self.assertEqual((code, body["status"], body["sessions"]), (503, "degraded", 3))
        self.assertEqual(body["problems"], {"worker 1 store": "cannot record files: disk I/O error",
                                            "worker 2": "its status site did not answer within 5 s"})
        self.assertEqual([(w["index"], w["status"], w["problems"]) for w in body["workers"]],
                         [(0, "ok", {}), (1, "degraded", {"store": "cannot record files: disk I/O error"}),
                          (2, None, {}), (3, None, {})])
        # the gateway's own problems are worker 0's
        body, code = merge_health(dict(local, status="degraded", problems={"spool": "full"}), [], {})
        self.assertEqual((code, body["problems"]), (503, {"worker 0 spool": "full"}))

    def test_a_worker_restarting_is_degraded_but_not_a_failed_check(self) -> None:
        local = {"status": "ok", "sessions": 0}
        body, code = merge_health(local, [{"index": 1, "pid": None, "ready": False, "drain": False}], {1: None})
        self.assertEqual((code, body["status"]), (200, "degraded"))
        self.assertNotIn("problems", body)
        body, code = merge_health(local, [{"index": 1, "pid": 9, "ready": True, "drain": False}],
                                  {1: {"status": "ok", "sessions": 4}})
        self.assertEqual((code, body["status"], body["sessions"]), (200, "ok", 4))

    def test_a_child_worker_without_a_port_of_its_own_is_healthy(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        services = make_services(root)
        services.shard = Shard(1, 2, root)  # the gateway hands it its cameras: it listens on nothing
        self.assertEqual(healthz(services, ports=[])[:1], (200,))
        self.assertEqual(healthz(services, ports=[])[1]["status"], "ok")
        services.shard = None  # the gateway itself without a port is starting
        self.assertEqual(healthz(services, ports=[])[1]["status"], "starting")


class Collector(http.server.BaseHTTPRequestHandler):
    """An HTTP endpoint that accepts every POST."""

    posts: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802
        Collector.posts.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class TwistdWorkersTests(TestCase):
    """The real ``twistd -n camgateway`` with ``workers: 2``."""

    timeout = 120

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)

    def start(self, workers: int = 2, sinks: list[dict[str, Any]] | None = None, **more: Any) -> Gateway:
        config = self.work / "camgateway.yaml"
        config.write_text(json.dumps({
            "listen": more.pop("listen", ["tcp:0:interface=127.0.0.1"]),
            "workers": workers,
            "storage": {"spool": "spool"},
            "sinks": sinks or [{"type": "disk", "root": "files"}],
            "timeouts": {"idle": 30, "metadata": 5},
            **more,
        }))
        log = self.work / more["log"]["file"] if "log" in more else None
        gateway = Gateway(self.work, "--config", str(config), log=log)
        self.addCleanup(gateway.stop, signal.SIGKILL)
        return gateway

    def stored(self, imei: int, count: int = 1) -> list[Path]:
        folder = self.work / "files" / str(imei)

        def found() -> list[Path]:
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json"
                           and not p.name.startswith("."))
            return files if len(files) >= count else []

        return wait(found, what=f"{count} stored files of camera {imei}")

    def child_pids(self, gateway: Gateway) -> list[int]:
        return [int(pid) for pid in re.findall(r"worker 1 started \(pid (\d+)\)", gateway.log.read_text())]

    def test_cameras_of_both_workers_and_a_resume_inside_one(self) -> None:
        gateway = self.start()
        [child] = self.child_pids(gateway)
        self.addCleanup(lambda: alive(child) and os.kill(child, signal.SIGKILL))
        contents = {}
        for worker in (0, 1):
            imei = imei_of(worker)
            contents[imei] = os.urandom(30 * 1024 + 77)
            camera = Camera(gateway.port, imei)
            camera.send_photo(contents[imei], drop_after=12)  # the connection drops mid-file
            Camera(gateway.port, imei).send_photo(contents[imei], resume_from=13)  # the same worker has it
            [stored] = self.stored(imei)
            self.assertEqual(stored.read_bytes(), contents[imei])
            sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
            self.assertEqual(sidecar["resumed_from"], 12 * 1024)
        text = gateway.log.read_text()
        self.assertRegex(text, rf"\[worker-1 camgateway.session.machine#info\] camera {imei_of(1)} connected from"
                               rf" 127\.0\.0\.1:\d+")
        self.assertNotRegex(text, rf"\[worker-1 [^]]*\] camera {imei_of(0)} connected")
        self.assertRegex(text, rf"\[camgateway.session.machine#info\] camera {imei_of(0)} connected from 127\.0\.0\.1:\d+")
        self.assertRegex(text, rf"\[worker-1 camgateway.session.machine#info\] camera {imei_of(1)} connected from .*"
                               r" settings 0x44000400\n")  # formatted by the worker: its format specs kept
        self.assertTrue((self.work / "spool" / "worker-1" / "resume.sqlite").exists())
        self.assertTrue(gateway.stopped_cleanly())
        wait(lambda: not alive(child), 10, "worker 1 to end with the gateway")
        self.assertIn("[worker-1 camgateway.runtime.service#info] camgateway stopped", gateway.log.read_text())

    def test_behind_a_proxy_each_worker_logs_the_cameras_own_address(self) -> None:
        gateway = self.start(listen=["haproxy:tcp:0:interface=127.0.0.1"])
        [child] = self.child_pids(gateway)
        self.addCleanup(lambda: alive(child) and os.kill(child, signal.SIGKILL))
        for worker, address in ((0, "198.51.100.7 50000"), (1, "198.51.100.8 50001")):
            imei = imei_of(worker)
            content = os.urandom(4096)
            camera = Camera(gateway.port, imei)
            host, port = address.split()
            camera.sock.sendall(f"PROXY TCP4 {host} 192.0.2.1 {port} 5000\r\n".encode())  # as HAProxy sends
            camera.send_photo(content)
            [stored] = self.stored(imei)
            self.assertEqual(stored.read_bytes(), content)
            system = r"worker-1 camgateway.session.machine#info" if worker else r"camgateway.session.machine#info"
            self.assertRegex(gateway.log.read_text(), rf"\[{system}\] camera {imei} connected from {host}:{port}:")
        self.assertTrue(gateway.stopped_cleanly())

    def test_a_killed_worker_is_restarted_and_its_camera_resumes(self) -> None:
        gateway = self.start()
        [child] = self.child_pids(gateway)
        imei = imei_of(1)
        content = os.urandom(30 * 1024 + 5)
        camera = Camera(gateway.port, imei)
        camera.send_photo(content, drop_after=12, hang=True)
        spool = self.work / "spool" / "worker-1" / "partials"
        wait(lambda: any(p.stat().st_size >= 12 * 1024 for p in spool.glob("*.part")), what="12 packets written")
        os.kill(child, signal.SIGKILL)
        wait(lambda: "worker 1 ended (signal 9); restarting it in 1 s" in gateway.log.read_text(),
             what="the gateway to see worker 1 end")
        camera.sock.close()
        # Connecting while worker 1 is down: the connection waits for it, then goes to it.
        Camera(gateway.port, imei).send_photo(content, resume_from=13)
        text = gateway.log.read_text()
        self.assertEqual(len(self.child_pids(gateway)), 2)
        self.assertLess(text.index("worker 1 ended"), text.rindex("worker 1 is ready"))
        new = self.child_pids(gateway)[1]
        self.addCleanup(lambda: alive(new) and os.kill(new, signal.SIGKILL))
        [stored] = self.stored(imei)
        self.assertEqual(stored.read_bytes(), content)
        self.assertTrue(gateway.stopped_cleanly())
        wait(lambda: not alive(new), 10, "worker 1 to end with the gateway")

    def test_workers_stop_when_the_gateway_is_killed(self) -> None:
        # Logging to a file of its own (not twistd's), each worker writes there itself, and so
        # can still say why it stops once the gateway is gone.
        gateway = self.start(log={"format": "json", "file": "gateway.jsonl"})
        self.assertIn("listening for cameras", (self.work / "gateway.jsonl").read_text())
        [child] = [json.loads(line)["pid"] for line in (self.work / "gateway.jsonl").read_text().splitlines()
                   if "worker 1 started" in line]
        self.addCleanup(lambda: alive(child) and os.kill(child, signal.SIGKILL))
        imei = imei_of(1)
        Camera(gateway.port, imei).send_photo(b"\xff\xd8" + os.urandom(5000) + b"\xff\xd9")
        self.stored(imei)
        gateway.stop(signal.SIGKILL)
        wait(lambda: not alive(child), 15, "the orphaned worker to stop by itself")
        records = [json.loads(line) for line in (self.work / "gateway.jsonl").read_text().splitlines()]
        said = [r["message"] for r in records if r.get("worker") == 1]
        self.assertIn("the gateway's socket pair closed: stopping", said)
        self.assertEqual(said[-2:], ["camgateway stopped", "Main loop terminated."])
        received = [r for r in records if r.get("event") == "file_received"]
        self.assertEqual([(r["imei"], r["worker"]) for r in received], [(str(imei), 1)])

    def test_folder_of_a_former_worker_is_delivered_then_removed(self) -> None:
        port = free_port()
        sinks = [{"type": "http", "url": f"http://127.0.0.1:{port}/upload", "timeout": 5}]
        gateway = self.start(2, sinks)
        imei = imei_of(1)
        content = os.urandom(20 * 1024)
        Camera(gateway.port, imei).send_photo(content)  # acknowledged: durable in worker 1's outbox
        wait(lambda: "delivery of" in gateway.log.read_text() or "failed" in gateway.log.read_text(),
             what="a failed delivery attempt (nothing listens yet)")
        self.assertTrue(gateway.stopped_cleanly())
        command = [sys.executable, "-c", "import sys; from camgateway.runtime.cli import main; sys.exit(main(sys.argv[1:]))"]
        listed = subprocess.run(command + ["--config", str(self.work / "camgateway.yaml"), "outbox"], cwd=self.work,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout, rf"sink http:127\.0\.0\.1:{port} .* camera {imei} photof: .*\(worker 1\)\n1 file\(s\) in the outbox")
        Collector.posts = []
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Collector)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        gateway = self.start(1, sinks)  # one worker now: worker 1's folder is drained
        wait(lambda: "worker 1 delivered what its spool held, and ended" in gateway.log.read_text(), 60,
             "worker 1 to deliver and end")
        self.assertFalse((self.work / "spool" / "worker-1").exists())
        self.assertEqual(len(Collector.posts), 1)
        self.assertIn(content, Collector.posts[0])
        text = gateway.log.read_text()
        self.assertIn("worker 1 started", text)
        self.assertIn("worker 1 delivered what its spool held, and ended", text)
        self.assertTrue(gateway.stopped_cleanly())
        time.sleep(0.1)
        gateway = self.start(1, sinks)  # nothing left: no worker 1 at all
        self.assertNotIn("worker 1", gateway.log.read_text())
        self.assertTrue(gateway.stopped_cleanly())


def status_get(port: int, path: str, token: Optional[str] = None) -> tuple[int, bytes]:
    """GET ``path`` of the status site on ``port``: (status code, body)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class TwistdWorkersStatusTests(TestCase):
    """The status site of a gateway with two workers answers for both."""

    timeout = 120

    def start(self, token: Optional[str] = None, **more: Any) -> tuple[Gateway, int]:
        """``twistd -n camgateway`` with two workers and its status site: (the gateway, the site's port)."""
        work = self.work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        http_port = free_port()
        (work / "camgateway.yaml").write_text(json.dumps({
            "listen": ["tcp:0:interface=127.0.0.1"], "workers": 2,
            "http": {"listen": [f"tcp:{http_port}:interface=127.0.0.1"], **({"token": token} if token else {})},
            "storage": {"spool": "spool"}, "sinks": [{"type": "disk", "root": "files"}],
            "timeouts": {"idle": 30, "metadata": 5}, **more,
        }))
        gateway = Gateway(work, "--config", str(work / "camgateway.yaml"))
        self.addCleanup(gateway.stop, signal.SIGKILL)
        for pid in re.findall(r"worker 1 started \(pid (\d+)\)", gateway.log.read_text()):
            self.addCleanup(lambda pid=int(pid): alive(pid) and os.kill(pid, signal.SIGKILL))
        return gateway, http_port

    def test_api_metrics_and_files_cover_every_worker(self) -> None:
        token = "t0ken-for-the-status-site"
        gateway, http_port = self.start(token)

        def get(path: str, auth: bool = True) -> tuple[int, bytes]:
            return status_get(http_port, path, token if auth else None)

        contents = {}
        for worker in (0, 1):
            imei = imei_of(worker)
            contents[imei] = b"\xff\xd8" + os.urandom(9000) + b"\xff\xd9"
            Camera(gateway.port, imei).send_photo(contents[imei])
        hanging = {w: Camera(gateway.port, imei_of(w, start=356307042442000)) for w in (0, 1)}
        for camera in hanging.values():
            camera.send_photo(os.urandom(30 * 1024), drop_after=5, hang=True)  # mid-transfer sessions

        def files() -> list[dict[str, Any]]:
            code, body = get("/api/files")
            listed = json.loads(body) if code == 200 else []
            # A file is listed when it is received, with its url once the disk sink has stored it.
            return listed if len(listed) == 2 and all(f["url"] for f in listed) else []

        listed = wait(files, what="both workers' files listed and stored")
        self.assertEqual(sorted(int(f["imei"]) for f in listed), sorted(contents))
        for item in listed:
            code, body = get("/" + item["url"])
            self.assertEqual(code, 200)
            self.assertEqual(body, contents[int(item["imei"])])  # worker 1's streamed from it
        self.assertEqual(get("/files/no-such-id")[0], 404)
        self.assertEqual(get("/api/files", auth=False)[0], 401)

        sessions = wait(lambda: (lambda s: s if len(s) == 2 else [])(json.loads(get("/api/sessions")[1])),
                        what="both hanging sessions")
        self.assertEqual(sorted(int(s["imei"]) for s in sessions), sorted(c.imei for c in hanging.values()))
        transfers = json.loads(get("/api/transfers")[1])
        self.assertEqual(len(transfers), 2)
        summary = json.loads(get("/api/summary")[1])
        self.assertEqual(summary["stats"]["files_received"], 2)
        self.assertEqual(summary["sessions"], 2)
        self.assertEqual([(w["index"], w["ready"], w["answered"]) for w in summary["workers"]],
                         [(0, True, True), (1, True, True)])
        code, body = get("/healthz", auth=False)
        health = json.loads(body)
        self.assertEqual((code, health["status"], health["sessions"]), (200, "ok", 2))
        self.assertEqual([(w["index"], w["status"], w["problems"]) for w in health["workers"]],
                         [(0, "ok", {}), (1, "ok", {})])
        metrics = {key: v for key, (_, v) in series(get("/metrics")[1].decode()).items()}
        for worker in ("0", "1"):
            self.assertEqual(metrics[("camgateway_files_received_total", frozenset({("worker", worker)}))], 1)
            self.assertGreater(metrics[("process_resident_memory_bytes", frozenset({("worker", worker)}))], 20e6)
        self.assertEqual(metrics[("camgateway_transfers_active", frozenset())], 2)
        for camera in hanging.values():
            camera.sock.close()
        self.assertTrue(gateway.stopped_cleanly())

    def test_counters_are_one_series_per_worker_across_a_restart(self) -> None:
        gateway, http_port = self.start()
        [child] = re.findall(r"worker 1 started \(pid (\d+)\)", gateway.log.read_text())
        photo = b"\xff\xd8" + os.urandom(5000) + b"\xff\xd9"
        for worker, count in ((0, 1), (1, 2)):
            for _ in range(count):
                Camera(gateway.port, imei_of(worker)).send_photo(photo)
        scrapes: list[dict[tuple[str, frozenset], tuple[str, float]]] = []

        def scrape() -> dict[tuple[str, frozenset], float]:
            code, body = status_get(http_port, "/metrics")
            self.assertEqual(code, 200)
            scrapes.append(series(body.decode()))
            return {key: v for key, (_, v) in scrapes[-1].items()}

        def received(worker: str) -> Optional[float]:
            return scrape().get(("camgateway_files_received_total", frozenset({("worker", worker)})))

        wait(lambda: received("1") == 2 and received("0") == 1, what="the files of both workers counted")
        partials = self.work / "spool" / "worker-1" / "partials"
        wait(lambda: any(p.stat().st_size == 0 for p in partials.glob("*.part")),
             what="worker 1 to make spool files ahead")
        os.kill(int(child), signal.SIGKILL)

        def restarting() -> Optional[tuple[int, dict[str, Any]]]:
            scrape()
            code, body = status_get(http_port, "/healthz")
            health = json.loads(body)
            return (code, health) if not health["workers"][1]["ready"] else None

        code, health = wait(restarting, what="/healthz to show worker 1 restarting")
        self.assertEqual((code, health["status"]), (200, "degraded"))  # its cameras wait; the others are served
        wait(lambda: gateway.log.read_text().count("worker 1 is ready") == 2 and scrape(),
             what="worker 1 to be restarted")
        Camera(gateway.port, imei_of(1)).send_photo(photo)
        wait(lambda: received("1") == 1, what="the restarted worker's file counted")
        received("0")

        # Every counter is one series per worker; only the restarted worker's own series start again
        # from 0 (a new process: its start time says so), which Prometheus takes for a counter reset.
        start = ("process_start_time_seconds", frozenset({("worker", "1")}))
        seen: dict[tuple[str, frozenset], tuple[float, Optional[float]]] = {}  # last value, worker 1's start then
        resets = set()
        for scraped in scrapes:  # (worker 1's series are missing while it is down)
            started = scraped[start][1] if start in scraped else None
            for key, (kind, now) in scraped.items():
                if kind not in ("counter", "histogram"):
                    continue
                self.assertIn("worker", dict(key[1]), key)
                if key in seen and now < seen[key][0]:
                    self.assertEqual(dict(key[1])["worker"], "1", key)
                    self.assertNotEqual(seen[key][1], started, key)
                    resets.add(key[0])
                seen[key] = (now, started)
        self.assertIn("camgateway_files_received_total", resets)
        last = {key: v for key, (_, v) in scrapes[-1].items()}
        self.assertEqual(last[("camgateway_worker_restarts_total", frozenset({("worker", "1")}))], 1)
        self.assertEqual(last[("camgateway_files_received_total", frozenset({("worker", "0")}))], 1)
        text = gateway.log.read_text()
        reconciled = text[text.index("worker 1 ended"):]
        self.assertRegex(reconciled, r"\[worker-1 [^]]*\] spool reconciled: 0 partial transfers kept, 0 files in"
                                     r" the outbox, \d+ unused spool files removed \(made ahead for new transfers")
        self.assertNotIn("orphan", text)
        self.assertTrue(gateway.stopped_cleanly())

    def test_healthz_names_the_worker_whose_sink_fails(self) -> None:
        port = free_port()
        gateway, http_port = self.start(sinks=[{"type": "http", "url": f"http://127.0.0.1:{port}/upload",
                                                "timeout": 5}], outbox={"degraded_after": "1s"})
        content = b"\xff\xd8" + os.urandom(5000) + b"\xff\xd9"
        Camera(gateway.port, imei_of(1)).send_photo(content)  # worker 1's; nothing listens on the sink's port

        def health(wanted: int) -> Optional[dict[str, Any]]:
            code, body = status_get(http_port, "/healthz")
            return json.loads(body) if code == wanted else None

        degraded = wait(lambda: health(503), 60, "/healthz to fail for worker 1's sink")
        self.assertEqual(degraded["status"], "degraded")
        [(name, why)] = degraded["problems"].items()
        self.assertTrue(name.startswith("worker 1 sink http:"), name)
        self.assertIn("every delivery attempt has failed since", why)
        self.assertIn("refused", why.lower())
        self.assertEqual([(w["index"], list(w["problems"])) for w in degraded["workers"]],
                         [(0, []), (1, [name[len("worker 1 "):]])])
        Collector.posts = []
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Collector)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        healthy = wait(lambda: health(200), 60, "/healthz to pass once the sink takes the file")
        self.assertEqual((healthy["status"], [w["problems"] for w in healthy["workers"]]), ("ok", [{}, {}]))
        self.assertIn(content, Collector.posts[0])
        self.assertTrue(gateway.stopped_cleanly())
