"""Prometheus metrics: the gateway's counters, read at scrape time.

Nothing here runs per frame: :class:`GatewayCollector` reads
:class:`~camgateway.runtime.context.Stats`, the live sessions and the spool when
Prometheus scrapes ``/metrics``. The metric names are listed in docs/operations.md
(Operations, Metrics). With ``workers: N`` the gateway's site merges every
worker's answer (:func:`camgateway.web.merge.merge_metrics`).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)
from prometheus_client.utils import floatToGoString
from twisted.internet import defer

from camgateway import __version__
from camgateway.base.health import SHARED_SPOOL, SPOOL, STORE
from camgateway.web.progress import DURATION_BOUNDS, camera_kind

__all__ = ["GatewayCollector", "Metrics", "outbox_state", "spool_usage", "dead_letter_count",
           "CAMERA_KINDS", "PROTOCOL_ERROR_KINDS"]

CAMERA_KINDS = ("dualcam", "dashcam", "dsm", "adas", "unknown")
#: ProtocolError kinds (camgateway.wire.codec), always exported so rates start at 0.
PROTOCOL_ERROR_KINDS = ("length", "unknown_command", "unexpected", "size", "identity")


def spool_usage(spool: Any) -> tuple[int, int]:
    """(files, bytes) of the partial transfers and files awaiting delivery: one ``scandir``, no reads.

    Empty files are not counted: they are the files made ahead for new
    transfers (camgateway.perf.reserve), or a transfer's before its first bytes.
    """
    files = size = 0
    try:
        with os.scandir(spool.partials) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        held = entry.stat(follow_symlinks=False).st_size
                        if held:
                            files += 1
                            size += held
                except OSError:
                    continue
    except OSError:
        pass
    return files, size


def dead_letter_count(spool: Any) -> int:
    """The dead letters (one folder each, see camgateway.delivery.outbox) in the spool's dead-letter folder."""
    count = 0
    try:
        with os.scandir(spool.dead) as entries:
            for entry in entries:
                try:
                    count += entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
    except OSError:
        pass
    return count


def outbox_state(services: Any) -> defer.Deferred:
    """``(files waiting for a sink, when the oldest was recorded or None)``, from the store's
    ``pending()`` entries; ``(0, None)`` without an outbox."""
    if services.outbox is None:
        return defer.succeed((0, None))
    return defer.maybeDeferred(services.store.pending).addCallback(
        lambda entries: (len(entries), min((entry.created for entry in entries), default=None)))


class GatewayCollector:
    """A custom collector over a running gateway (anything with ``services`` and ``factory``)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        #: Set by :meth:`Metrics.scrape` just before collecting (they need a Deferred):
        #: the files in the outbox, and when the oldest was recorded (None: no file).
        self.outbox_depth: Optional[int] = 0
        self.outbox_oldest: Optional[float] = None

    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on the running gateway."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every gateway metric, from the counters as they are now."""
        info = InfoMetricFamily("camgateway_build", "camgateway version")
        info.add_metric([], {"version": __version__})
        yield info
        services = getattr(self.gateway, "services", None)
        if services is None:
            return
        stats = services.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"camgateway_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"camgateway_{name}", doc, value=value)

        yield counter("connections", "Camera connections accepted", stats.connections)
        yield counter("connections_refused", "Connections closed at once (limits.max_connections)",
                      stats.connections_refused)
        factory = getattr(self.gateway, "factory", None)
        yield gauge("connections_open", "Camera connections open now",
                    len(factory.protocols) if factory is not None else 0)
        sessions = GaugeMetricFamily("camgateway_sessions", "Identified camera sessions by camera kind",
                                     labels=["camera"])
        by_kind = dict.fromkeys(CAMERA_KINDS, 0)
        transfers = 0
        for session in list(services.sessions.values()):
            kind = camera_kind(session)
            by_kind[kind] = by_kind.get(kind, 0) + 1
            transfers += session.transfer is not None
        for kind, n in by_kind.items():
            sessions.add_metric([kind], n)
        yield sessions
        yield gauge("transfers_active", "Files being received now", transfers)
        yield counter("files_received", "Files received complete and made durable", stats.files_received)
        yield counter("bytes_received", "File bytes received (written to the spool)", stats.bytes_received)
        yield counter("crc_errors", "DATA frames with a bad CRC (fetched again)", stats.crc_errors)
        yield counter("resumes", "Transfers resumed from bytes already held", stats.resumes)
        errors = CounterMetricFamily("camgateway_protocol_errors", "Connections closed for a protocol error, by kind",
                                     labels=["kind"])
        by_error = dict.fromkeys(PROTOCOL_ERROR_KINDS, 0)
        by_error.update(stats.protocol_errors_by_kind)
        for kind, n in sorted(by_error.items()):
            errors.add_metric([kind], n)
        yield errors
        deliveries = CounterMetricFamily("camgateway_sink_deliveries", "Files delivered, by sink", labels=["sink"])
        failures = CounterMetricFamily("camgateway_sink_failures", "Failed delivery attempts, by sink",
                                       labels=["sink"])
        done, failed = getattr(stats, "sink_deliveries", {}), getattr(stats, "sink_failures", {})
        names = dict.fromkeys([sink.name for sink in services.sinks] + sorted(set(done) | set(failed)))
        for name in names:
            deliveries.add_metric([name], done.get(name, 0))
            failures.add_metric([name], failed.get(name, 0))
        yield deliveries
        yield failures
        yield counter("delivery_failures", "Failed deliveries of files, all sinks", stats.delivery_failures)
        if self.outbox_depth is not None:  # (None: the store did not answer; the figures are left out)
            yield gauge("outbox_depth", "Files waiting in the outbox for a sink", self.outbox_depth)
            oldest = self.outbox_oldest
            yield gauge("outbox_oldest_age_seconds",
                        "Seconds the oldest file in the outbox has waited (0: none waits)",
                        max(0.0, services.clock.seconds() - oldest) if oldest is not None else 0)
        outbox = getattr(services, "outbox", None)
        yield counter("dead_lettered", "Files put in the dead-letter folder (refused for good, or failing too long)",
                      getattr(outbox, "dead_letters", 0))
        yield gauge("dead_letters", "Files in the dead-letter folder now (camgateway dead-letters)",
                    dead_letter_count(services.spool))
        health = getattr(services, "health", None)
        flagged = {**health.problems(), **health.warnings()} if health is not None else {}
        degraded = GaugeMetricFamily("camgateway_degraded", "1 while a part of the gateway cannot record files"
                                     " (the reason is in /healthz)", labels=["part"])
        for part in (STORE, SPOOL, SHARED_SPOOL):
            degraded.add_metric([part], 1 if part in flagged else 0)
        yield degraded
        journal = getattr(services, "journal", None)
        yield gauge("files_awaiting_store", "Complete files kept in the spool until the store can record them",
                    len(journal.notes) if journal is not None else 0)
        files, size = spool_usage(services.spool)
        yield gauge("spool_files", "Files in the spool (partial transfers and files awaiting delivery)", files)
        yield gauge("spool_bytes", "Bytes in the spool (partial transfers and files awaiting delivery)", size)
        try:
            free: float = services.spool.free_bytes()
        except OSError:
            free = 0
        yield gauge("spool_free_bytes", "Bytes free for the gateway on the spool's filesystem", free)
        last = GaugeMetricFamily("camgateway_last_file_received_timestamp_seconds",
                                 "When the latest file was received (unix time; none before the first)")
        if stats.last_file_at is not None:
            last.add_metric([], stats.last_file_at)
        yield last
        buckets, seen = [], 0
        for bound, n in zip(DURATION_BOUNDS, stats.durations):
            seen += n
            buckets.append((floatToGoString(bound), seen))
        buckets.append(("+Inf", seen + stats.durations[-1]))
        yield HistogramMetricFamily("camgateway_transfer_duration_seconds",
                                    "Seconds from a file's START to the file stored, once per file",
                                    buckets=buckets, sum_value=stats.durations_sum)
        workers = getattr(self.gateway, "workers", None)
        if workers is not None:
            restarts = CounterMetricFamily("camgateway_worker_restarts", "Times a worker process was restarted"
                                           " after it died", labels=["worker"])
            for state in workers.state():
                restarts.add_metric([str(state["index"])], state.get("restarts", 0))
            yield restarts


class Metrics:
    """The registry served at ``/metrics``: the gateway's and the process's metrics."""

    def __init__(self, gateway: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = GatewayCollector(gateway)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self.gateway = gateway

    def scrape(self) -> defer.Deferred:
        """The Prometheus text exposition (bytes), once the outbox depth is known."""
        services = getattr(self.gateway, "services", None)
        d = outbox_state(services) if services is not None else defer.succeed((0, None))

        def generate(outbox: tuple[Optional[int], Optional[float]]) -> bytes:
            self.collector.outbox_depth, self.collector.outbox_oldest = outbox
            return generate_latest(self.registry)

        # The store down (the moment /metrics matters most): every other figure, the outbox's left out.
        d.addErrback(lambda f: (None, None))
        return d.addCallback(generate)
