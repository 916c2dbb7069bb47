"""``/metrics`` read by the Prometheus client's own parser while the emulator sends files and faults."""

from __future__ import annotations

import datetime
import hashlib
import random
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from camgateway.web.metrics import Metrics
from camgateway.perf.reserve import SpoolReserve
from camgateway.sim import CameraSpec, ContentPool
from camgateway.delivery.sinks import PermanentFailure, ReceivedFile
from tests.ops_support import OpsTestCase, http_get, poll
from tests.support import make_services, run_now
from tests.test_integration import IMEI_BASE, camera
from tests.test_outbox import Recorder

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value) of a Prometheus exposition."""
    types, samples = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def received_file(services: Any, content: bytes) -> ReceivedFile:
    """A finished file in ``services``' spool, as the outbox gets it."""
    path = services.spool.path(services.spool.new_name())
    path.write_bytes(content)
    return ReceivedFile(path=path, imei="1", peer="p", protocol_id=5, camera="dualcam", flow="dualcam",
                        source="photof", identifier=b"%photof", media="photo", metadata={}, size=len(content),
                        sha256=hashlib.sha256(content).hexdigest(), start_total=1, start_crc=0, computed_crc=0,
                        received_at=datetime.datetime.now(datetime.timezone.utc), capture_time=None,
                        resumed_from=0, crc_errors=0)


class MetricsTests(OpsTestCase):
    """Counters move as files, CRC errors, resumes and protocol errors happen."""

    @defer.inlineCallbacks
    def scrape(self) -> Any:
        code, headers, body = yield http_get(self.url("metrics"))
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version="))
        return parse(body.decode())

    @defer.inlineCallbacks
    def test_counters_move(self) -> Any:
        yield self.start_ops()
        types, before = yield self.scrape()
        for name, kind in (("camgateway_connections", "counter"), ("camgateway_files_received", "counter"),
                           ("camgateway_bytes_received", "counter"), ("camgateway_crc_errors", "counter"),
                           ("camgateway_resumes", "counter"), ("camgateway_protocol_errors", "counter"),
                           ("camgateway_sink_deliveries", "counter"), ("camgateway_sink_failures", "counter"),
                           ("camgateway_sessions", "gauge"), ("camgateway_outbox_depth", "gauge"),
                           ("camgateway_spool_bytes", "gauge"), ("camgateway_build_info", "gauge")):
            self.assertEqual(types.get(name), kind, name)
        self.assertEqual(value(before, "camgateway_files_received_total"), 0)
        self.assertEqual(total(before, "camgateway_protocol_errors_total"), 0)
        self.assertEqual(value(before, "camgateway_protocol_errors_total", kind="length"), 0)
        self.assertEqual(value(before, "camgateway_sessions", camera="dsm"), 0)
        sink = self.gateway.services.sinks[0].name

        # one slow DSM camera: a session and a transfer show while it sends
        rng = random.Random(21)
        pool = ContentPool(rng, variants=2)
        slow = camera(0, "dsm", rng, pool, photos=0, videos=1, video_size=250_000, slow_bps=150_000)
        running = self.cameras([slow])

        def sending() -> Any:
            d = self.scrape()
            return d.addCallback(lambda r: r[1] if value(r[1], "camgateway_transfers_active") == 1
                                 and value(r[1], "camgateway_spool_bytes") > 0 else None)

        during = yield poll(sending, what="a transfer in /metrics")
        self.assertEqual(value(during, "camgateway_sessions", camera="dsm"), 1)
        self.assertEqual(value(during, "camgateway_connections_open"), 1)
        self.assertGreaterEqual(value(during, "camgateway_spool_files"), 1)
        yield running

        # then good files, bad CRCs, a drop and resume, and garbage
        specs = [camera(n, kind, rng, pool, bad_crc_frames=frozenset({2, 9}) if n == 1 else frozenset(),
                        drop_after_frames=15 if n == 2 else None)
                 for n, kind in ((1, "dualcam"), (2, "adas"), (3, "dashcam"))]
        specs.append(CameraSpec(imei=IMEI_BASE + 9, garbage=True))
        results = yield self.cameras(specs)
        self.assertTrue(all(r.ok for r in results))
        files = 1 + sum(len(s.files) for s in specs)
        size = slow.files[0].content.__len__() + sum(len(f.content) for s in specs for f in s.files)
        yield self.settled(files)

        def delivered() -> Any:
            d = self.scrape()
            return d.addCallback(lambda r: r[1] if value(r[1], "camgateway_sink_deliveries_total", sink=sink) == files
                                 and value(r[1], "camgateway_outbox_depth") == 0 else None)

        after = yield poll(delivered, what="every delivery in /metrics")
        self.assertEqual(value(after, "camgateway_files_received_total"), files)
        self.assertEqual(value(after, "camgateway_sink_failures_total", sink=sink), 0)
        self.assertGreaterEqual(value(after, "camgateway_bytes_received_total"), size)
        self.assertGreater(value(after, "camgateway_crc_errors_total"), 0)
        self.assertGreater(value(after, "camgateway_resumes_total"), 0)
        self.assertGreaterEqual(total(after, "camgateway_protocol_errors_total"), 1)
        self.assertGreaterEqual(value(after, "camgateway_connections_total"), 1 + len(specs) + 1)
        self.assertEqual(value(after, "camgateway_sessions", camera="dsm"), 0)
        self.assertEqual(value(after, "camgateway_transfers_active"), 0)
        self.assertEqual(value(after, "camgateway_spool_bytes"), 0)
        # the empty files made ahead for new transfers are not counted
        self.assertTrue(self.gateway.services.reserve.names())
        self.assertEqual(value(after, "camgateway_spool_files"), 0)
        self.assertGreater(value(after, "camgateway_spool_free_bytes"), 0)
        self.assertEqual(value(after, "camgateway_transfer_duration_seconds_count"), files)
        self.assertGreater(value(after, "camgateway_transfer_duration_seconds_sum"), 0)
        self.assertLess(abs(value(after, "camgateway_last_file_received_timestamp_seconds")
                            - self.gateway.services.clock.seconds()), 60)
        self.assertEqual(value(after, "camgateway_outbox_oldest_age_seconds"), 0)
        self.assertEqual(value(after, "camgateway_delivery_failures_total"), 0)
        stats = self.gateway.services.stats
        for kind, n in stats.protocol_errors_by_kind.items():
            self.assertEqual(value(after, "camgateway_protocol_errors_total", kind=kind), n)
        self.assertIn("process_cpu_seconds_total", {name for name, _ in after})


class CollectorTests(TestCase):
    """The figures read from Stats, the spool and the outbox, on a Clock."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.s = make_services(self.root)

        class Gateway:
            services = self.s
            factory = None

        self.metrics = Metrics(Gateway())

    def scrape(self) -> tuple[dict[str, str], Samples]:
        return parse(self.successResultOf(self.metrics.scrape()).decode())

    def test_a_store_that_does_not_answer_leaves_only_the_outbox_figures_out(self) -> None:
        """During a store outage /metrics still answers, saying so (camgateway_degraded)."""
        self.s.store.pending = lambda: defer.fail(ConnectionError("Error 111 connecting to 127.0.0.1:6379"))
        self.s.health.failing("store", "cannot record finished files")
        _, samples = self.scrape()
        names = {name for name, _ in samples}
        self.assertNotIn("camgateway_outbox_depth", names)
        self.assertEqual(value(samples, "camgateway_degraded", part="store"), 1)
        self.assertIn("camgateway_files_received_total", names)

    def test_transfer_durations_are_a_histogram_and_the_last_file_a_time(self) -> None:
        types, before = self.scrape()
        self.assertEqual(types["camgateway_transfer_duration_seconds"], "histogram")
        self.assertEqual(value(before, "camgateway_transfer_duration_seconds_count"), 0)
        self.assertEqual(value(before, "camgateway_transfer_duration_seconds_bucket", le="+Inf"), 0)
        self.assertNotIn("camgateway_last_file_received_timestamp_seconds", {name for name, _ in before})
        for seconds, at in ((0.2, 100.0), (1.0, 110.0), (3.0, 120.0), (5000.0, 250.0)):
            self.s.stats.file_stored(seconds, at)
        _, after = self.scrape()
        buckets = {le: value(after, "camgateway_transfer_duration_seconds_bucket", le=le)
                   for le in ("0.5", "1.0", "2.5", "5.0", "3600.0", "+Inf")}
        self.assertEqual(buckets, {"0.5": 1, "1.0": 2, "2.5": 2, "5.0": 3, "3600.0": 3, "+Inf": 4})
        self.assertEqual(value(after, "camgateway_transfer_duration_seconds_count"), 4)
        self.assertAlmostEqual(value(after, "camgateway_transfer_duration_seconds_sum"), 5004.2)
        self.assertEqual(value(after, "camgateway_last_file_received_timestamp_seconds"), 250.0)

    def test_spool_files_are_those_holding_bytes_not_the_ones_made_ahead(self) -> None:
        reserve = SpoolReserve(self.s.spool, run_now, self.s.clock, lambda: 0, size=16, low=4)
        reserve.start()
        self.assertEqual(len(reserve.names()), 16)
        self.s.spool.path(self.s.spool.new_name()).write_bytes(b"x" * 100)  # a partial transfer
        self.s.spool.free_bytes = lambda: 5 * 1024**3  # type: ignore[method-assign]  # (statvfs of the spool)
        _, samples = self.scrape()
        self.assertEqual((value(samples, "camgateway_spool_files"), value(samples, "camgateway_spool_bytes")),
                         (1, 100))
        self.assertEqual(value(samples, "camgateway_spool_free_bytes"), 5 * 1024**3)

    def test_dead_letters_and_the_oldest_file_waiting(self) -> None:
        sink = Recorder("refusing", [PermanentFailure("HTTP 400: bad")] + [RuntimeError("down")] * 100)
        self.s.sinks = [sink]
        _, idle = self.scrape()
        self.assertEqual((value(idle, "camgateway_outbox_oldest_age_seconds"), value(idle, "camgateway_dead_letters"),
                          value(idle, "camgateway_dead_lettered_total")), (0, 0, 0))
        self.s.outbox.add(received_file(self.s, b"refused"), None)
        self.s.clock.advance(10)
        self.s.outbox.add(received_file(self.s, b"kept"), None)
        self.s.clock.advance(30)
        _, samples = self.scrape()
        self.assertEqual(value(samples, "camgateway_dead_letters"), 1)
        self.assertEqual(value(samples, "camgateway_dead_lettered_total"), 1)
        self.assertEqual(value(samples, "camgateway_outbox_depth"), 1)
        self.assertEqual(value(samples, "camgateway_outbox_oldest_age_seconds"), 30)
