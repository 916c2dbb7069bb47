"""Several gateway processes behind one listening port, each camera always in the same one.

One CPython process runs Python on one core at a time (the GIL), so a
gateway with ``workers: N`` runs N processes: this one, which listens, and
N - 1 children (:mod:`camgateway.runtime.worker`). A new connection is read here
only up to the camera's 16-byte init packet, whose IMEI picks the worker
(:func:`shard_of`); the connection is then handed over whole:

* to worker 0, this process, by giving the transport to a
  :class:`~camgateway.session.protocol.CameraProtocol` of its own;
* to another worker, by sending the socket's descriptor and the bytes read
  so far over a UNIX socket pair (``SCM_RIGHTS``); the child adopts the
  socket and this process closes its copy once the child says it has it.

A camera's IMEI always maps to the same worker, so each worker owns its
cameras' partials and files alone: worker 0 keeps the spool it always had,
worker ``i`` the folder ``<spool>/worker-<i>`` (:func:`worker_spool`), each
with its own store, reserve and outbox, exactly as a single-process gateway.
With a different ``workers`` count after a restart, a partial can be in the
wrong worker: it is dropped by that worker's start-up reconcile (the camera
still holds the file and sends it again); a worker folder beyond the count
is still run until its outbox is delivered (``drain``), then removed.

The children are restarted when they die (1 s, doubling up to 30 s), stop
with this process (SIGTERM, then SIGKILL after a grace), and stop by
themselves when this process goes away (their end of the socket pair
closes). Connections for a worker that is starting wait for it, up to
:data:`HANDOFF_WAIT` seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Deque, Optional

from twisted.internet import defer, error
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.tcp import Server
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, globalLogPublisher
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from camgateway.base.internals import release_without_shutdown
from camgateway.wire.codec import INIT_SIZE, init_imei


__all__ = ["Shard", "shard_of", "worker_spool", "worker_folders", "children_needed", "handoff_frame",
           "parse_handoff", "Dispatcher", "DispatchFactory", "WorkerProcess", "Workers", "HANDOFF_WAIT"]

log = Logger(namespace="camgateway.runtime.workers")

#: Seconds a connection waits for its worker to be up (starting, restarting).
HANDOFF_WAIT = 30.0
#: Connections at most waiting for one worker; beyond, new ones are closed.
WAITING_MAX = 10000
#: Seconds a child has to stop after SIGTERM before it is killed.
STOP_GRACE = 15.0
RESTART_FIRST, RESTART_MAX = 1.0, 30.0

#: The child -> parent bytes on the socket pair.
READY, TAKEN = b"R", b"A"

_handoff_header = struct.Struct(">BHI")  # address family, peer length, data length
_WORKER_DIR = re.compile(r"worker-([0-9]+)")


def shard_of(imei: str, count: int) -> int:
    """The worker (0 .. count-1) of the camera with this IMEI (decimal text), stable across runs."""
    return zlib.crc32(imei.encode()) % count if count > 1 else 0


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which worker a gateway process is, of how many, and the configured spool they share."""

    index: int
    count: int
    root: Path
    #: A folder left from a larger count: deliver its outbox, take no cameras.
    drain: bool = False

    def owns(self, imei: str) -> bool:
        """Whether the camera with this IMEI is this worker's."""
        return not self.drain and shard_of(imei, self.count) == self.index

    @property
    def dead(self) -> Path:
        """Where every worker puts its dead letters: the configured spool's, one list for operators."""
        return Path(self.root) / "dead"


def worker_spool(spool: Path, index: int) -> Path:
    """Worker ``index``'s spool: the configured one for worker 0, a folder inside it for the others."""
    return spool if index == 0 else spool / f"worker-{index}"


def worker_folders(spool: Path) -> list[int]:
    """The worker indexes (> 0) that have a folder in ``spool``."""
    try:
        names = os.listdir(spool)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _WORKER_DIR.fullmatch(name)
        if match and (spool / name).is_dir() and int(match.group(1)) > 0:
            found.append(int(match.group(1)))
    return sorted(found)


def children_needed(config: Any) -> bool:
    """Whether a gateway with ``config`` runs child workers: several, or a folder left to drain."""
    return config.workers > 1 or bool(worker_folders(Path(config.spool)))


def handoff_frame(family: int, peer: str, data: bytes) -> bytes:
    """What goes with a connection's descriptor to a child: its family, peer address and first bytes."""
    encoded = peer.encode()
    return _handoff_header.pack(family, len(encoded), len(data)) + encoded + data


def parse_handoff(buf: bytearray) -> Optional[tuple[int, str, bytes]]:
    """The first whole frame of ``buf`` (consumed), or None if it is not all there yet."""
    if len(buf) < _handoff_header.size:
        return None
    family, peer_len, data_len = _handoff_header.unpack_from(buf)
    end = _handoff_header.size + peer_len + data_len
    if len(buf) < end:
        return None
    peer = bytes(buf[_handoff_header.size:_handoff_header.size + peer_len]).decode()
    data = bytes(buf[_handoff_header.size + peer_len:end])
    del buf[:end]
    return family, peer, data


def _peer_text(address: Any) -> str:
    return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"


def _release_copy(transport: Server) -> None:
    """Close this process's descriptor of a handed-over socket, without shutting the connection down."""
    release_without_shutdown(transport)  # shutdown() would end it for the child too
    transport.connectionLost(Failure(error.ConnectionDone("handed over to a worker")))


class Dispatcher(Protocol, TimeoutMixin):
    """A new camera connection, read only up to its init packet, then handed to its worker."""

    handed = False

    def __init__(self, factory: "DispatchFactory") -> None:
        self.owner = factory
        self.buffer = bytearray()
        self.callLater = factory.clock.callLater  # type: ignore[method-assign]  # TimeoutMixin's clock

    def connectionMade(self) -> None:
        self.setTimeout(self.owner.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.handed:
            return
        self.buffer += data
        if len(self.buffer) < INIT_SIZE:
            return
        self.setTimeout(None)
        self.handed = True
        self.owner.reading -= 1
        head = bytes(self.buffer)
        self.buffer = bytearray()
        imei = init_imei(head)  # not an init: worker 0's session says what is wrong, and closes
        self.owner.hand(0 if imei is None else shard_of(str(imei), self.owner.count), self, head)

    def timeoutConnection(self) -> None:
        log.warn("connection from {peer}: no init packet within {t:.0f} s; closing",
                 peer=_peer_text(self.transport.getPeer()), t=self.owner.idle_timeout)  # type: ignore[union-attr]
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        if not self.handed:
            self.handed = True
            self.owner.reading -= 1


class DispatchFactory(Factory):
    """Listens for every worker: builds a :class:`Dispatcher` per connection."""

    noisy = False

    def __init__(self, local: Any, workers: "Workers", count: int, clock: Any, idle_timeout: float) -> None:
        self.local = local  # worker 0's CameraFactory
        self.workers = workers
        self.count = count
        self.clock = clock
        self.idle_timeout = idle_timeout
        #: Connections whose init is still awaited here.
        self.reading = 0

    def buildProtocol(self, addr: Any) -> Optional[Dispatcher]:
        services = self.local.services
        if not services.accepting:
            return None
        if self.reading >= services.config.max_connections:  # (each worker counts its own cameras)
            services.stats.connections_refused += 1
            log.warn("refusing connection from {peer}: limits.max_connections ({n}) connections have sent"
                     " no init yet", peer=getattr(addr, "host", addr), n=services.config.max_connections)
            return None
        self.reading += 1
        return Dispatcher(self)

    def hand(self, index: int, dispatcher: Dispatcher, head: bytes) -> None:
        """Give the connection to worker ``index`` with the bytes read so far."""
        transport = dispatcher.transport
        peer = _peer_text(transport.getPeer())  # type: ignore[union-attr]  # behind HAProxy: the camera's
        if index == 0:
            self._take_here(dispatcher, transport, peer, head)
            return
        raw = getattr(transport, "transport", transport)  # under a PROXY protocol wrapper
        if type(raw) is not Server:
            log.error("connection from {peer} cannot be handed to worker {i} (not a plain TCP socket); closing",
                      peer=peer, i=index)
            transport.abortConnection()  # type: ignore[union-attr]
            return
        raw.stopReading()  # from now on only the worker reads it
        self.workers.hand(index, raw, peer, head)

    def _take_here(self, dispatcher: Dispatcher, transport: Any, peer: str, head: bytes) -> None:
        camera = self.local.buildProtocol(transport.getPeer())
        if camera is None:
            transport.loseConnection()
            return
        if getattr(transport, "wrappedProtocol", None) is dispatcher:  # a PROXY protocol wrapper
            transport.wrappedProtocol = camera
        else:
            transport.protocol = camera
        camera._peer = peer
        camera.makeConnection(transport)
        camera.dataReceived(head)


class _Channel(Protocol):
    """This process's end of a child's socket pair: the child's READY and TAKEN bytes."""

    def __init__(self, worker: "WorkerProcess") -> None:
        self.worker = worker

    def dataReceived(self, data: bytes) -> None:
        for byte in data:
            if byte == READY[0]:
                self.worker.child_ready()
            elif byte == TAKEN[0]:
                self.worker.child_took()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.worker.channel_lost(self)


class _ChannelFactory(Factory):
    noisy = False

    def __init__(self, worker: "WorkerProcess") -> None:
        self.worker = worker

    def buildProtocol(self, addr: Any) -> _Channel:
        return _Channel(self.worker)


class WorkerProcess(ProcessProtocol):
    """One child worker: spawned, restarted when it dies, stopped with the gateway."""

    def __init__(self, index: int, count: int, config: Any, reactor: Any, twistd_logfile: Optional[str],
                 drain: bool = False, argv: Optional[list[str]] = None, forward_logs: bool = False) -> None:
        self.index, self.count, self.config, self.reactor = index, count, config, reactor
        self.twistd_logfile = twistd_logfile
        #: The child's log events come here as JSON lines on its stdout, to go to this
        #: process's observers (twistd's own log file or syslog, which only one process may write).
        self.forward_logs = forward_logs
        self._log_buffer = b""
        self.drain = drain
        self.argv = argv or [sys.executable, "-m", "camgateway.runtime.worker"]
        self.channel: Optional[Any] = None
        self.ready = False
        self.stopping = False
        self.done: defer.Deferred = defer.Deferred()  # fires when it has ended for good
        self.first_ready: defer.Deferred = defer.Deferred()  # fires when it is ready the first time
        self.restart_delay = RESTART_FIRST
        #: Times the child died and was restarted (metrics: camgateway_worker_restarts_total).
        self.restarts = 0
        self.started_at = 0.0
        self.pid: Optional[int] = None
        self._waiting: Deque[tuple[float, Server, str, bytes]] = collections.deque()
        self._unacked: Deque[Server] = collections.deque()
        self._timer: Optional[Any] = None
        self._kill: Optional[Any] = None
        self._expiry: Optional[Any] = None  # closes connections that waited HANDOFF_WAIT
        #: Where the child serves its status site (set by Workers when http.listen is on).
        self.status_socket: Optional[str] = None

    # -- the process

    def start(self) -> None:
        """Spawn the child, its socket pair and its configuration."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.ready = False
            self.started_at = self.reactor.seconds()
            process = self.reactor.spawnProcess(
                self, self.argv[0], self.argv, env=os.environ.copy(),
                childFDs={0: "w", 1: "r" if self.forward_logs else 1, 2: 2, 3: theirs.fileno()})
            self.pid = process.pid
        finally:
            theirs.close()
        ours.setblocking(False)
        self.channel = self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _ChannelFactory(self))
        ours.close()
        settings = pickle.dumps({"config": self.config, "index": self.index, "count": self.count,
                                 "twistd_logfile": self.twistd_logfile, "drain": self.drain,
                                 "forward_logs": self.forward_logs, "status_socket": self.status_socket})
        self.channel.write(struct.pack(">I", len(settings)) + settings)
        log.info("worker {i} started (pid {pid}){drain}", i=self.index, pid=self.pid,
                 drain=", to deliver what its spool holds" if self.drain else "")

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        signalled = getattr(reason.value, "signal", None)
        self.pid = None
        self.ready = False
        if self.channel is not None:
            self.channel.loseConnection()
        self._drop_unacked()
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        drained = self.drain and code == 0
        if drained and not self.stopping:
            log.info("worker {i} delivered what its spool held, and ended", i=self.index)
        if self.stopping or drained:
            self._close_waiting()
            if not self.done.called:
                self.done.callback(None)
            return
        how = f"signal {signalled}" if signalled else f"exit status {code}"
        if self.reactor.seconds() - self.started_at > 60:
            self.restart_delay = RESTART_FIRST
        log.error("worker {i} ended ({how}); restarting it in {t:.0f} s, its cameras' connections wait",
                  i=self.index, how=how, t=self.restart_delay)
        self.restarts += 1
        self._timer = self.reactor.callLater(self.restart_delay, self._restart)
        self.restart_delay = min(RESTART_MAX, self.restart_delay * 2)

    def _restart(self) -> None:
        self._timer = None
        if not self.stopping:
            try:
                self.start()
            except Exception:
                log.failure("worker {i} could not be started; trying again", i=self.index)
                self._timer = self.reactor.callLater(self.restart_delay, self._restart)

    def stop(self) -> defer.Deferred:
        """SIGTERM (the child persists its partials and stops), SIGKILL after :data:`STOP_GRACE`."""
        self.stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._close_waiting()
        if self.pid is None:
            if not self.done.called:
                self.done.callback(None)
            return self.done
        self._signal(signal.SIGTERM)
        self._kill = self.reactor.callLater(STOP_GRACE, self._signal, signal.SIGKILL)
        return self.done

    def _signal(self, sig: int) -> None:
        if self.transport is not None and self.pid is not None:
            try:
                self.transport.signalProcess(sig)
            except error.ProcessExitedAlready:
                pass

    # -- the socket pair

    def child_ready(self) -> None:
        self.ready = True
        log.info("worker {i} is ready", i=self.index)
        if not self.first_ready.called:
            self.first_ready.callback(None)
        while self._waiting:
            _, raw, peer, head = self._waiting.popleft()
            if raw.connected and not raw.disconnecting:
                self._send(raw, peer, head)

    def child_took(self) -> None:
        if self._unacked:
            _release_copy(self._unacked.popleft())

    def channel_lost(self, channel: Any) -> None:
        if channel is self.channel:
            self.channel = None
            self.ready = False

    def hand(self, raw: Server, peer: str, head: bytes) -> None:
        """Send a connection to the child, or keep it until the child is ready."""
        if self.ready and self.channel is not None:
            self._send(raw, peer, head)
            return
        if self.stopping or len(self._waiting) >= WAITING_MAX:
            log.warn("camera connection from {peer}: worker {i} is not taking connections; closing",
                     peer=peer, i=self.index)
            raw.abortConnection()
            return
        self._waiting.append((self.reactor.seconds(), raw, peer, head))
        if self._expiry is None:
            self._expiry = self.reactor.callLater(HANDOFF_WAIT, self._expire)

    def _send(self, raw: Server, peer: str, head: bytes) -> None:
        channel = self.channel
        assert channel is not None
        channel.sendFileDescriptor(raw.fileno())
        channel.write(handoff_frame(raw.getHandle().family, peer, head))
        self._unacked.append(raw)

    def _expire(self) -> None:
        self._expiry = None
        now = self.reactor.seconds()
        while self._waiting and now - self._waiting[0][0] >= HANDOFF_WAIT - 0.001:
            _, raw, peer, _ = self._waiting.popleft()
            log.warn("camera connection from {peer}: worker {i} was not ready within {t:.0f} s; closing",
                     peer=peer, i=self.index, t=HANDOFF_WAIT)
            raw.abortConnection()
        if self._waiting:
            self._expiry = self.reactor.callLater(HANDOFF_WAIT - (now - self._waiting[0][0]), self._expire)

    def _close_waiting(self) -> None:
        while self._waiting:
            self._waiting.popleft()[1].abortConnection()

    def _drop_unacked(self) -> None:
        # The child is gone: a socket it had not confirmed is closed (the
        # camera reconnects); one it had adopted died with it.
        while self._unacked:
            raw = self._unacked.popleft()
            raw.abortConnection()

    # -- the child's log events, when they are forwarded (else its output is our stdout/stderr)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._log_buffer + data).split(b"\n")
        self._log_buffer = lines.pop()
        for line in lines:
            if line:
                globalLogPublisher(self._event(line))

    def _event(self, line: bytes) -> dict[str, Any]:
        """A log event of this process for a line :func:`camgateway.runtime.worker.forwarded_line` made."""
        text = line.decode("utf-8", "replace")
        try:
            record = json.loads(text)
            level = LogLevel.levelWithName(record["level"])
            event = {"log_text": str(record["text"]), "log_level": level, "log_namespace": str(record["namespace"]),
                     "log_system": str(record["system"]), "log_time": float(record["time"])}
        except (ValueError, KeyError, TypeError, InvalidLogLevelError):
            event = {"log_text": text, "log_level": LogLevel.info, "log_namespace": "camgateway.runtime.worker",
                     "log_system": f"worker-{self.index}", "log_time": self.reactor.seconds()}
        event["log_format"] = "{log_text}"
        return event


class Workers:
    """The child workers of a gateway with ``workers: N`` (and the ones left to drain).

    With a status web service (``http.listen``), each child serves its status
    site on a UNIX socket in a private folder made here (:attr:`status_sockets`),
    which the gateway's site asks (camgateway.web.merge).
    """

    def __init__(self, config: Any, count: int, reactor: Any, twistd_logfile: Optional[str] = None,
                 argv: Optional[list[str]] = None, forward_logs: bool = False) -> None:
        self.count = count
        self.reactor = reactor
        self.config = config
        drains = [i for i in worker_folders(Path(config.spool)) if i >= count]
        self.processes: dict[int, WorkerProcess] = {}
        self.status_dir: Optional[str] = None
        #: Each child's status socket (none without http.listen).
        self.status_sockets: dict[int, str] = {}
        for index in list(range(1, count)) + drains:
            self.processes[index] = WorkerProcess(index, count, config, reactor, twistd_logfile,
                                                  drain=index >= count, argv=argv, forward_logs=forward_logs)

    def start(self) -> None:
        if self.config.http_listen and self.processes:
            # Short paths (a UNIX socket's is at most 107 bytes), readable by this user only.
            self.status_dir = tempfile.mkdtemp(prefix="camgateway-")
            for index, process in self.processes.items():
                process.status_socket = self.status_sockets[index] = os.path.join(self.status_dir, f"w{index}.sock")
        for process in self.processes.values():
            process.start()

    def state(self) -> list[dict[str, Any]]:
        """Each child: its index, pid, whether it takes cameras now, whether it is draining, its restarts."""
        return [{"index": i, "pid": p.pid, "ready": p.ready, "drain": p.drain, "restarts": p.restarts}
                for i, p in sorted(self.processes.items())]

    def wait_ready(self, timeout: float = HANDOFF_WAIT) -> defer.Deferred:
        """Fires once every worker that takes cameras was ready (or after ``timeout``: its cameras wait)."""
        waits = [p.first_ready for p in self.processes.values() if not p.drain]
        done: defer.Deferred = defer.Deferred()
        def give_up_waiting() -> None:
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(timeout, give_up_waiting)

        def all_ready(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        defer.DeferredList(waits).addCallback(all_ready)
        return done

    def hand(self, index: int, raw: Server, peer: str, head: bytes) -> None:
        self.processes[index].hand(raw, peer, head)

    def stop(self) -> defer.Deferred:
        d = defer.DeferredList([p.stop() for p in self.processes.values()], consumeErrors=True)

        def clean(result: object) -> object:
            if self.status_dir is not None:
                shutil.rmtree(self.status_dir, ignore_errors=True)
            return result

        return d.addBoth(clean)

