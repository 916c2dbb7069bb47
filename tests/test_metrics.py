"""``/metrics`` read by the Prometheus client's own parser while the emulator sends files and faults."""

from __future__ import annotations

import random
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer

from camgateway.sim import CameraSpec, ContentPool
from tests.ops_support import OpsTestCase, http_get, poll
from tests.test_integration import IMEI_BASE, camera

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
        self.assertEqual(value(after, "camgateway_delivery_failures_total"), 0)
        stats = self.gateway.services.stats
        for kind, n in stats.protocol_errors_by_kind.items():
            self.assertEqual(value(after, "camgateway_protocol_errors_total", kind=kind), n)
        self.assertIn("process_cpu_seconds_total", {name for name, _ in after})
