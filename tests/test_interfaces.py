"""Every implementation of each of camgateway's interfaces (zope) provides all of it.

One test per interface, over every implementation shipped: a method missing,
renamed or given other arguments fails here, not in production.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import Interface
from zope.interface.verify import verifyObject

from camgateway.delivery.sinks import IFileSink, SinkContext, SpoolView
from camgateway.delivery.sinks.command import CommandSink
from camgateway.delivery.sinks.disk import DiskSink
from camgateway.delivery.sinks.http import HTTPSink
from camgateway.delivery.sinks.mp4 import MP4Sink
from camgateway.delivery.sinks.registry import make_chain, validate
from camgateway.storage.leases import ICameraLeases
from camgateway.storage.memory import MemoryStore
from camgateway.storage.records import IHistoryStore, IOutboxStore, IResumeStore
from camgateway.storage.sqlite import SQLiteStore
from camgateway.transfer.spool import Spool

try:
    import redis
except ImportError:  # the redis extra is optional for those who run one instance
    redis = None  # type: ignore[assignment]


def unused_port() -> int:
    """A loopback port nothing listens on (the Redis store is built, never asked anything)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InterfaceTestCase(TestCase):
    """Builds each implementation, closes it afterwards, and checks it with verifyObject."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        self.spool = Spool(self.root / "spool")
        self.spool.ensure()
        self.context = SinkContext(reactor=reactor, clock=reactor, run_in_thread=deferToThread,
                                   spool=SpoolView(self.spool))
        # A store built against a Redis that is not there says so in the log: keep it out of the test's output.
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def closing(self, thing: Any) -> Any:
        """``thing``, closed at the end of the test (a Deferred that close returns is waited for)."""
        self.addCleanup(lambda: defer.maybeDeferred(thing.close))
        return thing

    def stores(self) -> dict[str, Callable[[], Any]]:
        """Every store, by name, built on demand."""
        made: dict[str, Callable[[], Any]] = {
            "memory": MemoryStore,
            "sqlite (file)": lambda: self.closing(SQLiteStore(self.spool.store_path, reactor)),
            "sqlite (memory)": lambda: self.closing(SQLiteStore(":memory:", reactor)),
        }
        if redis is not None:
            made["redis"] = self.redis_store
        return made

    def redis_store(self) -> Any:
        from camgateway.storage.redis import RedisStore

        return self.closing(RedisStore(f"redis://127.0.0.1:{unused_port()}/0", reactor, instance="interfaces"))

    def assertProvides(self, interface: type[Interface], implementations: dict[str, Callable[[], Any]]) -> None:
        """verifyObject on each implementation; the failures name them."""
        self.assertTrue(implementations, "no implementation to check")
        for name, build in implementations.items():
            obj = build()
            self.assertTrue(interface.providedBy(obj), f"{name}: no @implementer({interface.__name__})")
            try:
                verifyObject(interface, obj)
            except Exception as e:
                self.fail(f"{name} does not provide {interface.__name__}: {e}")


class InterfaceTests(InterfaceTestCase):
    """One test per interface, over every implementation."""

    def test_file_sinks(self) -> None:
        files = str(self.root / "files")
        command = str(self.root / "ingest")
        Path(command).write_text("#!/bin/sh\n")
        Path(command).chmod(0o755)
        ffmpeg = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"  # the sink runs it only when it delivers
        built = {
            "disk": lambda: DiskSink(self.root / "files", deferToThread),
            "http": lambda: self.closing(HTTPSink(None, "http://127.0.0.1:1/{name}", "POST", {}, 10.0, reactor)),
            "command": lambda: CommandSink([command], 10.0, reactor),
            "mp4": lambda: MP4Sink(self.context, ffmpeg, True, False, 1),
        }
        self.assertProvides(IFileSink, built)
        # and as the configuration builds them, the context and its spool view included
        entries = [validate({"type": "disk", "root": files}, "sinks[0]", self.root),
                   validate({"type": "http", "url": "http://127.0.0.1:1/{name}"}, "sinks[1]", self.root),
                   validate({"type": "command", "command": command}, "sinks[2]", self.root)]
        for sink in make_chain(entries, self.context):
            if hasattr(sink, "close"):
                self.closing(sink)
            verifyObject(IFileSink, sink)

    def test_resume_stores(self) -> None:
        self.assertProvides(IResumeStore, self.stores())

    def test_outbox_stores(self) -> None:
        self.assertProvides(IOutboxStore, self.stores())

    def test_history_stores(self) -> None:
        self.assertProvides(IHistoryStore, self.stores())

    def test_camera_leases(self) -> None:
        if redis is None:
            self.skipTest("the redis package is not installed (pip install 'redis>=5')")
        from camgateway.storage.redis_leases import RedisLeases

        self.assertProvides(ICameraLeases, {"redis": lambda: RedisLeases(self.redis_store())})
