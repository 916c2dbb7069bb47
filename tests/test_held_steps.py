"""Every asynchronous step held, then released in random orders: the stored bytes are the bytes sent.

A session's slow steps (opening a transfer, writes, checkpoints, flushes,
digests, the store's statements) are Deferreds. Here each one waits until the
schedule releases it: thread-pool steps in any order (the pool has many
threads), the store's statements in the order they were asked (it has one),
and between them the camera's frames arrive whenever the schedule says —
STATUS giving a file up in the same write as its START, STATUS after a few
frames, connections dropped mid-file, reconnects, and a store that refuses to
record finished files. Thousands of seeded schedules; in every one:

- every file stored holds exactly the bytes of one file the camera sent;
- no file is stored twice, and none the camera gave up is stored;
- every file the camera was told is done is stored (after the steps drain);
- no RESUME reaches the camera for a file it gave up.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from camgateway.wire import codec
from camgateway.wire.codec import Cmd, ServerFrameDecoder
from camgateway.runtime.config import Config
from camgateway.wire.crc import crc16
from camgateway.transfer.journal import FinishJournal
from camgateway.storage.memory import MemoryStore
from camgateway.delivery.outbox import Outbox
from camgateway.runtime.context import Services
from camgateway.delivery.sinks.disk import DiskSink
from camgateway.transfer.spool import Spool
from tests.support import connect, run_now, stored_files

IMEI = 863719061653375
BITS = {"%videor": 0x20000000, "%photof": 0x04000000}
SCHEDULES = 1500


class Held:
    """A thread pool and a store whose every step waits for the schedule to release it."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.pool: list[tuple[Callable[..., Any], tuple, dict, defer.Deferred]] = []
        self.store: collections.deque = collections.deque()
        #: While True, the store refuses to record finished files (enqueue fails).
        self.refuse_enqueue = False

    def run_in_thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pool.append((f, args, kwargs, d))
        return d

    def release_pool(self, i: int) -> None:
        f, args, kwargs, d = self.pool.pop(i)
        try:
            result = f(*args, **kwargs)
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)

    def release_store(self) -> None:
        name, args, d = self.store.popleft()
        if name == "enqueue" and self.refuse_enqueue:
            d.errback(Failure(OSError(28, "database or disk is full")))
            return
        getattr(self.inner, name)(*args).chainDeferred(d)

    @property
    def waiting(self) -> int:
        return len(self.pool) + len(self.store)


class HeldStore:
    """The store's face of :class:`Held`: every statement queued, run when released."""

    shared = False
    unreadable = None  # (a store of this instance's own: every spool file is here)

    def __init__(self, held: Held) -> None:
        self._held = held

    def __getattr__(self, name: str) -> Callable[..., defer.Deferred]:
        if name.startswith("__"):  # (zope.interface asks for __provides__: this store declares no interface)
            raise AttributeError(name)

        def call(*args: Any) -> defer.Deferred:
            d: defer.Deferred = defer.Deferred()
            self._held.store.append((name, args, d))
            return d

        return call


def frames_of(content: bytes, start: int) -> list[bytes]:
    out, crc = [], 0
    for i in range(start, len(content), 1024):
        chunk = content[i : i + 1024]
        crc = crc16(chunk, crc)
        out.append(codec.data(chunk, crc))
    return out


@dataclasses.dataclass
class Camera:
    """A DualCam that answers the gateway's frames, with the faults a schedule drew."""

    files: dict[str, bytes]
    rng: random.Random
    #: file -> how it fails once: "status_with_start", "status_after_data", "drop_after_data"
    faults: dict[str, str]
    outgoing: collections.deque = dataclasses.field(default_factory=collections.deque)
    current: Optional[str] = None
    sending: Optional[str] = None  # the file whose DATA went out in full, awaiting the gateway's answer
    given_up: set = dataclasses.field(default_factory=set)
    told_done: list = dataclasses.field(default_factory=list)
    violations: list = dataclasses.field(default_factory=list)
    closed: bool = False
    drop: bool = False

    def init(self) -> bytes:
        bits = 0
        for name in self.files:
            bits |= BITS[name]
        return codec.init_packet(5, IMEI, bits)

    def connect(self) -> None:
        self.decoder = ServerFrameDecoder()
        self.current = self.sending = None
        self.closed = self.drop = False
        self.outgoing.clear()
        self.outgoing.append(self.init())

    def hear(self, data: bytes) -> None:
        for cmd, payload in self.decoder.feed(data):
            self._answer(cmd, payload)

    def _answer(self, cmd: int, payload: bytes) -> None:
        if cmd == Cmd.FILE_REQUEST:
            name = payload.decode()
            content = self.files.get(name)
            if content is None:
                self.outgoing.append(codec.start(0, 0))
                return
            packets = (len(content) + 1023) // 1024
            fault = self.faults.pop(name, None)
            if fault == "status_with_start":
                self.given_up.add(name)
                del self.files[name]
                self.outgoing.append(codec.start(packets, 0) + codec.status(6))
                return
            self.current = name
            self.pending_fault = fault
            self.outgoing.append(codec.start(packets, 0))
        elif cmd == Cmd.RESUME:
            position = int.from_bytes(payload, "big")
            name = self.current
            if name is None or name not in self.files:
                self.violations.append(f"RESUME {position} for no file (given up: {sorted(self.given_up)})")
                return
            content = self.files[name]
            start = max(position, 1) - 1
            frames = frames_of(content, start * 1024)
            fault = self.pending_fault
            self.pending_fault = None
            if fault in ("status_after_data", "drop_after_data") and len(frames) > 1:
                cut = self.rng.randrange(1, len(frames))
                if fault == "status_after_data":
                    self.given_up.add(name)
                    del self.files[name]
                    self.current = None
                    self.outgoing.append(codec.sync(max(position, 1)) + b"".join(frames[:cut]) + codec.status(4))
                else:
                    self.outgoing.append(codec.sync(max(position, 1)) + b"".join(frames[:cut]))
                    self.drop = True
                return
            self.outgoing.append(codec.sync(max(position, 1)))
            for frame in frames:
                self.outgoing.append(frame)
            self.sending = name
        elif cmd == Cmd.REPEAT_INIT:
            if self.sending is not None:
                self.told_done.append(self.sending)
                self.files.pop(self.sending, None)
            self.sending = self.current = None
            self.outgoing.append(self.init())
        elif cmd == Cmd.INIT:  # CLOSE
            self.closed = True
        elif cmd == Cmd.STATUS:  # COMPLETE
            self.closed = True


class HeldStepsTests(TestCase):
    """Seeded random schedules of held steps, frames, disconnects and store refusals."""

    def run_schedule(self, seed: int, refusing_store: bool = False) -> None:
        rng = random.Random(seed)
        root = Path(self.mktemp())
        root.mkdir()
        held = Held(MemoryStore())
        clock = task.Clock()
        cfg = dataclasses.replace(Config(), spool=root / "spool", min_free_bytes=0, metadata=False)
        spool = Spool(cfg.spool)
        spool.ensure()
        s = Services(cfg, HeldStore(held), spool, [], clock, held.run_in_thread, "boot-1")
        s.sinks = [DiskSink(root / "files", run_now, heads=s.heads)]
        s.outbox = Outbox(s, poll=5.0)
        s.journal = FinishJournal(s)
        video = bytes(rng.getrandbits(8) for _ in range(rng.choice([1024, 2500, 4096])))
        photo = b"\xff\xd8" + bytes(rng.getrandbits(8) for _ in range(rng.choice([700, 1500, 3000])))
        sent = {"%videor": video, "%photof": photo}
        faults = {}
        for name in sent:
            pick = rng.random()
            if pick < 0.45:
                faults[name] = rng.choice(["status_with_start", "status_after_data", "drop_after_data"])
        camera = Camera(dict(sent), rng, faults)
        held.refuse_enqueue = refusing_store and rng.random() < 0.7
        protocol, transport = connect(s)
        camera.connect()
        connections = 1

        lost: set[int] = set()

        def disconnect() -> None:
            if id(protocol) not in lost:
                lost.add(id(protocol))
                protocol.connectionLost(Failure(ConnectionError("gone")))

        for _ in range(5000):
            out = transport.value()
            if out:
                transport.clear()
                camera.hear(out)
            choices = []
            if camera.outgoing and not transport.disconnecting and not camera.closed:
                choices += ["frame"] * 3
            if held.pool:
                choices.append("pool")
            if held.store:
                choices.append("store")
            if not transport.disconnecting and camera.drop and not camera.outgoing:
                choices.append("drop")
            if not choices:
                if transport.disconnecting or camera.closed or camera.drop:
                    if not transport.disconnecting:
                        transport.loseConnection()
                    disconnect()
                    if camera.files and connections < 6:
                        connections += 1
                        protocol, transport = connect(s)
                        camera.connect()
                        continue
                    break
                break
            if held.refuse_enqueue and rng.random() < 0.02:
                held.refuse_enqueue = False  # the store comes back
            what = rng.choice(choices)
            if what == "frame":
                chunk = camera.outgoing.popleft()
                if len(chunk) > 8 and rng.random() < 0.3:  # split across reads
                    at = rng.randrange(1, len(chunk))
                    protocol.dataReceived(chunk[:at])
                    protocol.dataReceived(chunk[at:])
                else:
                    protocol.dataReceived(chunk)
            elif what == "pool":
                held.release_pool(rng.randrange(len(held.pool)))
            elif what == "store":
                held.release_store()
            elif what == "drop":
                transport.loseConnection()
                disconnect()
                camera.drop = False
                camera.closed = True
        # Drain: the store works again, every step runs, the notes are replayed, the outbox delivers.
        held.refuse_enqueue = False

        def drain() -> None:
            for _ in range(10_000):
                if not held.waiting:
                    return
                if held.pool:
                    held.release_pool(rng.randrange(len(held.pool)))
                if held.store:
                    held.release_store()
            self.fail(f"seed {seed}: the steps never drain")

        drain()
        s.journal.replay()
        drain()
        s.outbox.kick()
        drain()
        self.assertEqual(s.journal.notes, {}, f"seed {seed}: notes left")
        self.assertEqual(camera.violations, [], f"seed {seed}")
        stored = [p.read_bytes() for p in stored_files(root)]
        by_content = collections.Counter(stored)
        for content, n in by_content.items():
            self.assertIn(content, sent.values(), f"seed {seed}: stored bytes that were never sent")
            self.assertEqual(n, 1, f"seed {seed}: a file stored {n} times")
        for name in camera.given_up:
            self.assertNotIn(sent[name], by_content, f"seed {seed}: {name} was given up but stored")
        for name in camera.told_done:
            self.assertIn(sent[name], by_content, f"seed {seed}: {name} was acknowledged but not stored")

    def test_random_schedules(self) -> None:
        for seed in range(SCHEDULES):
            self.run_schedule(seed)

    def test_random_schedules_with_a_store_that_refuses_finished_files(self) -> None:
        for seed in range(SCHEDULES, SCHEDULES + SCHEDULES // 2):
            self.run_schedule(seed, refusing_store=True)

    def test_status_with_start_while_opening(self) -> None:
        """The field case: START and STATUS 6 in one write, the next file's START before the open ends."""
        failures = 0
        for seed in range(200):
            rng = random.Random(seed)
            root = Path(self.mktemp())
            root.mkdir()
            held = Held(MemoryStore())
            cfg = dataclasses.replace(Config(), spool=root / "spool", min_free_bytes=0, metadata=False)
            spool = Spool(cfg.spool)
            spool.ensure()
            s = Services(cfg, HeldStore(held), spool, [], task.Clock(), held.run_in_thread, "boot-1")
            s.sinks = [DiskSink(root / "files", run_now, heads=s.heads)]
            s.outbox = Outbox(s, poll=5.0)
            protocol, transport = connect(s)
            photo = b"\xff\xd8" + rng.randbytes(2500)
            protocol.dataReceived(codec.init_packet(5, IMEI, BITS["%videor"] | BITS["%photof"]))
            self.assertEqual(transport.value(), codec.file_request(b"%videor"))
            transport.clear()
            protocol.dataReceived(codec.start(9, 0) + codec.status(6))  # the video's open is held
            self.assertEqual(transport.value(), codec.file_request(b"%photof"))
            transport.clear()
            protocol.dataReceived(codec.start(3, 0))
            while held.waiting and not transport.value():
                if held.pool:
                    held.release_pool(rng.randrange(len(held.pool)))
                elif held.store:
                    held.release_store()
            self.assertEqual(transport.value(), codec.resume(1), f"seed {seed}: only the photo's RESUME")
            transport.clear()
            protocol.dataReceived(codec.sync(1) + b"".join(frames_of(photo, 0)))
            while held.waiting:
                if held.pool:
                    held.release_pool(rng.randrange(len(held.pool)))
                if held.store:
                    held.release_store()
            self.assertEqual(transport.value(), codec.repeat_init(), f"seed {seed}")
            [stored] = stored_files(root)
            failures += stored.read_bytes() != photo
        self.assertEqual(failures, 0)
