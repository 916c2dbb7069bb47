"""Prometheus metrics: the gateway's counters, read at scrape time.

Nothing here runs per frame: :class:`GatewayCollector` reads
:class:`~camgateway.services.Stats`, the live sessions and the spool when
Prometheus scrapes ``/metrics``. The metric names are listed in README.md
(Operations, Metrics).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from twisted.internet import defer

from camgateway import __version__
from camgateway.progress import camera_kind

__all__ = ["GatewayCollector", "Metrics", "outbox_depth", "spool_usage", "CAMERA_KINDS", "PROTOCOL_ERROR_KINDS"]

CAMERA_KINDS = ("dualcam", "dashcam", "dsm", "adas", "unknown")
#: ProtocolError kinds (camgateway.codec), always exported so rates start at 0.
PROTOCOL_ERROR_KINDS = ("length", "unknown_command", "unexpected", "size", "identity")


def spool_usage(spool: Any) -> tuple[int, int]:
    """(files, bytes) in the spool's partials folder: one ``scandir``, no reads."""
    files = size = 0
    try:
        with os.scandir(spool.partials) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        files += 1
                        size += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        pass
    return files, size


def outbox_depth(services: Any) -> defer.Deferred:
    """Files waiting for a sink: 0 without an outbox.

    Uses the outbox's ``depth`` (a number, or a callable returning one or a
    Deferred) when it has one, else counts the store's ``pending()`` entries.
    """
    outbox = getattr(services, "outbox", None)
    if outbox is None:
        return defer.succeed(0)
    depth = getattr(outbox, "depth", None)
    if depth is not None:
        return defer.maybeDeferred(depth) if callable(depth) else defer.succeed(int(depth))
    pending = getattr(services.store, "pending", None)
    if callable(pending):
        return defer.maybeDeferred(pending).addCallback(len)
    return defer.succeed(0)


class GatewayCollector:
    """A custom collector over a running gateway (anything with ``services`` and ``factory``)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        #: Set by :meth:`Metrics.scrape` just before collecting (it needs a Deferred).
        self.outbox_depth = 0

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
        yield gauge("outbox_depth", "Files waiting in the outbox for a sink", self.outbox_depth)
        health = getattr(services, "health", None)
        problems = health.problems() if health is not None else {}
        degraded = GaugeMetricFamily("camgateway_degraded", "1 while a part of the gateway cannot record files"
                                     " (the reason is in /healthz)", labels=["part"])
        for part in ("store", "spool"):
            degraded.add_metric([part], 1 if part in problems else 0)
        yield degraded
        journal = getattr(services, "journal", None)
        yield gauge("files_awaiting_store", "Complete files kept in the spool until the store can record them",
                    len(journal.notes) if journal is not None else 0)
        files, size = spool_usage(services.spool)
        yield gauge("spool_files", "Files in the spool (partial transfers and files awaiting delivery)", files)
        yield gauge("spool_bytes", "Bytes in the spool (partial transfers and files awaiting delivery)", size)


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
        d = outbox_depth(services) if services is not None else defer.succeed(0)

        def generate(depth: int) -> bytes:
            self.collector.outbox_depth = depth
            return generate_latest(self.registry)

        return d.addCallback(generate)
