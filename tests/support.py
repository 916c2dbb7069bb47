"""Shared pieces of the test suite: services on a Clock, captures, a link."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport

from camgateway.runtime.config import Config
from camgateway.delivery.outbox import Outbox
from camgateway.session.protocol import CameraProtocol
from camgateway.storage.memory import MemoryStore
from camgateway.runtime.context import Services
from camgateway.delivery.sinks.disk import DiskSink
from camgateway.transfer.spool import Spool

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"
NO_VECTORS = "../shared/vectors not present (real device captures are not shipped in the repo)"


@defer.inlineCallbacks
def loopback_pair(case: Any, client: Any = None) -> Any:
    """A real TCP connection on 127.0.0.1: ``(the accepting side's transport, the connecting protocol)``.

    The accepting side's transport is Twisted's own ``tcp.Server``; ``client``
    (a plain Protocol if None) is the connecting side's protocol. The port and
    both ends are closed by ``case``'s cleanups.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
    from twisted.internet.protocol import Factory, Protocol

    made: defer.Deferred = defer.Deferred()

    class Accepting(Protocol):
        def connectionMade(self) -> None:
            made.callback(self.transport)

    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Accepting))
    case.addCleanup(port.stopListening)
    client = client if client is not None else Protocol()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
    transport = yield made
    case.addCleanup(client.transport.loseConnection)
    case.addCleanup(transport.loseConnection)
    return transport, client


class RunningClock(task.Clock):
    """A Clock that says the reactor runs, and records callFromThread."""

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
        self.from_threads.append((f, args))


def run_now(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
    """A run_in_thread that runs at once (for StringTransport tests)."""
    return defer.maybeDeferred(f, *args, **kwargs)


def make_services(root: Path, clock: Optional[task.Clock] = None, store: Any = None, **config: Any) -> Services:
    """Services with a spool and a disk sink under ``root``, running synchronously."""
    cfg = dataclasses.replace(Config(), spool=root / "spool", min_free_bytes=0, **config)
    spool = Spool(cfg.spool)
    spool.ensure()
    services = Services(cfg, store or MemoryStore(), spool, [], clock or task.Clock(), run_now, "boot-1")
    services.sinks = [DiskSink(root / "files", run_now, heads=services.heads)]
    services.outbox = Outbox(services, poll=5.0)
    services.outbox.start()
    return services


def connect(services: Services, peer: str = "10.0.0.1") -> tuple[CameraProtocol, StringTransport]:
    """A CameraProtocol on a StringTransport."""
    from twisted.internet.address import IPv4Address

    protocol = CameraProtocol(services)
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def capture_stream(name: str) -> bytes:
    """The device -> server byte stream of a capture in ../shared/vectors."""
    doc = json.loads((VECTORS / name).read_text())
    return b"".join(bytes(int(x, 16) for x in p["data"].split(",")) for p in doc["packets"])


def segments(data: bytes, rng: random.Random, low: int = 1, high: int = 7) -> Iterator[bytes]:
    """``data`` cut in random pieces of ``low``..``high`` bytes."""
    i = 0
    while i < len(data):
        n = rng.randint(low, high)
        yield data[i : i + n]
        i += n


def stored_files(root: Path) -> list[Path]:
    """Every media file the disk sink stored under ``root/files``."""
    return sorted(p for p in (root / "files").rglob("*") if p.is_file() and p.suffix != ".json")


@defer.inlineCallbacks
def poll(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
         what: str = "condition") -> Any:
    """Call ``condition`` (which may return a Deferred) until it is truthy; return that value."""
    deadline = reactor.seconds() + timeout
    while True:
        value = yield defer.maybeDeferred(condition)
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        yield task.deferLater(reactor, interval, lambda: None)
