"""A child worker of a gateway with ``workers: N`` (see :mod:`camgateway.runtime.workers`).

Started by the gateway as ``python -m camgateway.runtime.worker`` with descriptor 3
one end of a UNIX socket pair. It reads its settings from there (the
gateway's parsed configuration, its index and the count), runs a whole
gateway on its own spool folder without listening, and then takes camera
connections from the socket pair: each a socket descriptor (``SCM_RIGHTS``)
with a frame saying the camera's address and the bytes the gateway read
before it knew the worker. It answers ``R`` once it is ready and ``A`` for
each connection it has taken. When the socket pair closes (the gateway is
gone) or on SIGTERM it stops as the gateway does: partials persisted,
files in flight stored.

A ``drain`` worker (a folder left from a larger ``workers`` count) takes no
connections: it delivers its outbox, then removes its folder and exits 0.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Deque, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger, formatEvent, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.internet.interfaces import IFileDescriptorReceiver

from camgateway.runtime.workers import READY, TAKEN, parse_handoff, worker_spool

__all__ = ["Receiver", "forwarded_line", "main", "read_settings", "tagged"]

log = Logger(namespace="camgateway.runtime.worker")

CHANNEL_FD = 3
#: Seconds between a drain worker's looks at its outbox.
DRAIN_POLL = 2.0


def read_settings(fd: int = CHANNEL_FD) -> dict[str, Any]:
    """The settings frame the gateway writes first (a length, then a pickle), read blocking."""
    channel = socket.socket(fileno=os.dup(fd))
    try:
        channel.setblocking(True)
        (size,) = struct.unpack(">I", _read_exactly(channel, 4))
        return pickle.loads(_read_exactly(channel, size))
    finally:
        channel.close()


def _read_exactly(channel: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = channel.recv(n - len(data))
        if not chunk:
            raise SystemExit("camgateway worker: the gateway closed the socket pair before the settings")
        data += chunk
    return bytes(data)


def tagged(observer: Any, index: int) -> Any:
    """``observer``, with this worker's index on every event (``worker`` field, ``[worker-N ...]`` in text)."""
    name = f"worker-{index}"

    def observe(event: dict[str, Any]) -> None:
        event.setdefault("worker", index)
        if "log_system" not in event:  # text: "[worker-1 camgateway.session.machine#info]"
            level = event.get("log_level")
            event["log_system"] = f"{name} {event.get('log_namespace', '-')}#{getattr(level, 'name', 'info')}"
        observer(event)

    return observe


@implementer(IFileDescriptorReceiver)
class Receiver(Protocol):
    """The worker's end of the socket pair: adopts the camera connections sent to it."""

    def __init__(self, reactor: Any, cameras: Any, on_lost: Any) -> None:
        self.reactor = reactor
        self.cameras = cameras  # the CameraFactory
        self.on_lost = on_lost
        self.fds: Deque[int] = collections.deque()
        self.buffer = bytearray()

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            frame = parse_handoff(self.buffer)
            if frame is None:
                return
            if not self.fds:  # cannot happen: a descriptor travels with its frame's first byte
                log.error("a connection came without its socket; the gateway and this worker disagree")
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self._adopt(self.fds.popleft(), *frame)

    def _adopt(self, fd: int, family: int, peer: str, head: bytes) -> None:
        try:
            transport = self.reactor.adoptStreamConnection(fd, family, self.cameras)
        except Exception:
            log.failure("could not take the connection of {peer}", peer=peer)
            transport = None
        finally:
            os.close(fd)  # adopting made a copy
            self.transport.write(TAKEN)  # type: ignore[union-attr]  # the gateway may close its copy
        if transport is None:  # refused (limits, shutting down): closed with our copy
            return
        camera = transport.protocol
        camera._peer = peer
        if head:
            camera.dataReceived(head)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        while self.fds:
            os.close(self.fds.popleft())
        self.on_lost()


class _ReceiverFactory(Factory):
    noisy = False

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def buildProtocol(self, addr: Any) -> Receiver:
        return self.receiver


def forwarded_line(event: dict[str, Any]) -> str:
    """An event as the gateway's text log needs it: time, level, namespace, system and the formatted text."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    level = event.get("log_level")
    return json.dumps({"time": event.get("log_time"), "level": getattr(level, "name", "info"),
                       "namespace": event.get("log_namespace", "-"), "system": event.get("log_system", "-"),
                       "text": text}) + "\n"


def _observer(config: Any, twistd_logfile: Optional[str], forward: bool) -> Any:
    """Where this worker logs: where the gateway does, or as JSON events to the gateway (``forward``)."""
    from camgateway.runtime.logs import AtomicLines, TurnBuffer, observer_for

    stdout = AtomicLines(1)
    if forward:  # the gateway's log is twistd's own (a file or syslog): only it writes there
        out = TurnBuffer(stdout)  # type: ignore[arg-type]

        def send(event: dict[str, Any]) -> None:
            try:
                out.write(forwarded_line(event))
            except Exception:  # a log line must never take the worker down
                pass

        return send
    observer = observer_for(config.log_format, config.log_file, twistd_logfile, stdout)  # type: ignore[arg-type]
    return observer if observer is not None else textFileLogObserver(stdout)  # type: ignore[arg-type]


@defer.inlineCallbacks
def _drain_when_done(gateway: Any, reactor: Any, outcome: dict[str, Any]) -> Any:
    """A drain worker: once nothing is left to deliver, stop; :func:`main` then removes the folder."""
    yield gateway.ready
    services = gateway.services
    while True:
        pending = yield services.store.pending()
        partials = yield services.store.all()
        if not pending and not partials and not services.pending:
            break
        yield deferLater(reactor, DRAIN_POLL)
    outcome["drained"] = True
    reactor.stop()


def _remove_folder(spool: Path) -> None:
    """Remove a drained worker's folder: its store and empty folders, nothing else."""
    for name in ("resume.sqlite", "resume.sqlite-wal", "resume.sqlite-shm"):
        try:
            os.unlink(spool / name)
        except FileNotFoundError:
            pass
    for folder in (spool / "partials", spool):
        try:
            os.rmdir(folder)
        except OSError as e:
            log.warn("drained worker folder {path} not removed: {error}", path=folder, error=e.strerror)
            return


def main() -> int:
    """Run one worker until the gateway stops it."""
    settings = read_settings()
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    from camgateway.perf.process import tune_process
    from camgateway.runtime.service import make_gateway
    from camgateway.runtime.workers import Shard

    index, count, drain = settings["index"], settings["count"], settings["drain"]
    root = Path(settings["config"].spool)
    status = settings.get("status_socket")  # the gateway's status site asks this worker's here
    config = dataclasses.replace(settings["config"], spool=worker_spool(root, index), listen=(),
                                 http_listen=(f"unix:{status}:mode=600",) if status else ())
    observer = _observer(config, settings["twistd_logfile"], settings.get("forward_logs", False))
    globalLogBeginner.beginLoggingTo([tagged(observer, index)], redirectStandardIO=False)
    top = make_gateway(config, reactor, shard=Shard(index, count, root, drain))
    tune_process(config.performance, workers=max(count, 2))  # (a child is always one of several processes)
    gateway = top.gateway  # type: ignore[attr-defined]  # set by make_gateway
    outcome: dict[str, Any] = {}

    def lost() -> None:
        if reactor.running and not outcome.get("drained"):
            log.info("the gateway's socket pair closed: stopping")
            reactor.stop()

    receiver = Receiver(reactor, None, lost)

    def ready(_: object) -> None:
        receiver.cameras = gateway.factory
        receiver.transport.write(READY)  # type: ignore[union-attr]
        if drain:
            _drain_when_done(gateway, reactor, outcome).addErrback(
                lambda f: log.failure("draining worker {i} failed", f, i=index))

    def failed(failure: Failure) -> None:
        outcome["failed"] = True

    def start() -> None:
        os.set_blocking(CHANNEL_FD, False)
        reactor.adoptStreamConnection(  # type: ignore[attr-defined]  # the epoll reactor installed above
            CHANNEL_FD, socket.AF_UNIX, _ReceiverFactory(receiver))
        os.close(CHANNEL_FD)  # adopting made a copy
        top.startService()
        gateway.ready.addCallbacks(ready, failed)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    if outcome.get("drained"):
        _remove_folder(config.spool)
        return 0
    return 1 if outcome.get("failed") else 0


if __name__ == "__main__":  # pragma: no cover - run by the gateway as a process
    sys.exit(main())
