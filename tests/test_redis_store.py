"""The Redis store: the store contracts on every backend, several instances on one Redis, leases.

The Redis tests start one real ``redis-server`` (Debian package ``redis-server``)
on a free port of 127.0.0.1 for the whole module, without persistence, and stop
it when the process exits; each test uses its own key prefix. They are skipped
when ``redis-server`` or the ``redis`` package is missing.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface.verify import verifyObject

from camgateway.base.health import SHARED_SPOOL, SPOOL
from camgateway.transfer.journal import Note
from camgateway.storage.memory import MemoryStore
from camgateway.delivery.outbox import IOutboxStore, Outbox, OutboxEntry
from camgateway.storage.redis import RedisStore
from camgateway.storage.redis_leases import RedisLeases
from camgateway.runtime.shared_spool import SharedSpool, sweep_orphans
from camgateway.delivery.sinks import ReceivedFile
from camgateway.storage.sqlite import SQLiteStore
from tests.support import make_services, poll
from tests.test_resume_store import StoreContract, partial

try:
    import redis
except ImportError:  # pragma: no cover
    redis = None  # type: ignore[assignment]

REDIS_SERVER = shutil.which("redis-server")
if redis is None:
    SKIP_REDIS: Optional[str] = "the redis package is not installed (pip install 'redis>=5')"
elif REDIS_SERVER is None:
    SKIP_REDIS = "redis-server is not installed (apt-get install redis-server)"
else:
    SKIP_REDIS = None


class _Server:
    """One redis-server for the module, started on first use and stopped at exit."""

    def __init__(self) -> None:
        self.process: Optional[subprocess.Popen] = None
        self.port = 0
        self.dir = ""

    def url(self) -> str:
        if self.process is None:
            self._start()
        return f"redis://127.0.0.1:{self.port}/0"

    def _start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="camgateway-redis-")
        for _ in range(5):  # a free port may be taken before the server binds it
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self.dir, "--logfile", "redis.log", "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = redis.Redis(port=port, socket_connect_timeout=1)
            deadline = time.monotonic() + 10
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    client.ping()
                except redis.ConnectionError:
                    time.sleep(0.02)
                    continue
                client.close()
                self.process, self.port = process, port
                atexit.register(self.stop)
                return
            client.close()
            process.kill()
            process.wait()
        raise RuntimeError(f"redis-server did not start; see {self.dir}/redis.log")

    def database(self, case: TestCase, number: int) -> str:
        """The URL of database ``number``, for ``case`` alone: emptied now and after it (skipped without Redis)."""
        if SKIP_REDIS:
            raise SkipTest(SKIP_REDIS)
        url = self.url().rsplit("/", 1)[0] + f"/{number}"
        client = redis.Redis.from_url(url)
        client.flushdb()
        case.addCleanup(client.close)
        case.addCleanup(client.flushdb)
        return url

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
            shutil.rmtree(self.dir, ignore_errors=True)


SERVER = _Server()


def entry(n: int = 1, **kw: Any) -> OutboxEntry:
    values = dict(id=f"e{n}", spool_name=f"{n}.file", sink=0, attempts=0, next_attempt=100.0 + n, last_error=None,
                  record={"imei": "863719061653375", "size": n, "source": "photof", "meta": {"a": [1, 2.5, None]},
                          "name": "caméra ✓"},
                  created=50.0 + n)
    values.update(kw)
    return OutboxEntry(**values)  # type: ignore[arg-type]


def ids(entries: list[Any]) -> list[str]:
    return [e.id for e in entries]


class OutboxStoreContract:
    """What every IOutboxStore must do, as MemoryStore does it (mixed into one TestCase per backend)."""

    def make_store(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()

    def tearDown(self) -> defer.Deferred:
        return self.store.close()

    @defer.inlineCallbacks
    def enqueue(self, *ns: int, **kw: Any) -> Any:
        for n in ns:
            yield self.store.enqueue(entry(n, **kw), None)

    def test_interface(self) -> None:
        verifyObject(IOutboxStore, self.store)

    @defer.inlineCallbacks
    def test_enqueue_and_pending_round_trip_oldest_first(self) -> Any:
        e1 = entry(1, last_error="refused\nby peer ✗", sink=2, attempts=3,
                   next_attempt=1730290000.123456789, created=0.1 + 0.2)
        e2 = entry(2, created=1e-7)
        yield self.store.enqueue(e1, None)
        yield self.store.enqueue(e2, None)
        self.assertEqual((yield self.store.pending()), [e2, e1])

    @defer.inlineCallbacks
    def test_enqueue_forgets_the_partial(self) -> Any:
        yield self.store.add(partial(1))
        yield self.store.add(partial(2, identifier=b"%photof"))
        yield self.store.enqueue(entry(1), "p1")
        yield self.store.enqueue(entry(2), None)
        yield self.store.enqueue(entry(3), "unknown")
        self.assertEqual(ids((yield self.store.all())), ["p2"])
        self.assertEqual(ids((yield self.store.pending())), ["e1", "e2", "e3"])

    @defer.inlineCallbacks
    def test_enqueue_same_id_replaces(self) -> Any:
        yield self.store.enqueue(entry(1), None)
        yield self.store.enqueue(entry(1, spool_name="other", last_error="x"), None)
        self.assertEqual((yield self.store.pending()), [entry(1, spool_name="other", last_error="x")])

    @defer.inlineCallbacks
    def test_due_in_next_attempt_order_up_to_limit(self) -> Any:
        yield self.enqueue(3, 1, 5, 2)
        self.assertEqual(ids((yield self.store.due(100.5, 10, frozenset()))), [])
        self.assertEqual(ids((yield self.store.due(101.0, 10, frozenset()))), ["e1"])  # due at next_attempt
        self.assertEqual(ids((yield self.store.due(103.0, 10, frozenset()))), ["e1", "e2", "e3"])
        self.assertEqual(ids((yield self.store.due(103.0, 2, frozenset()))), ["e1", "e2"])
        self.assertEqual((yield self.store.due(103.0, 0, frozenset())), [])
        self.assertEqual((yield self.store.due(1000.0, 10, frozenset())), [entry(n) for n in (1, 2, 3, 5)])

    @defer.inlineCallbacks
    def test_due_skips_excluded_without_counting_them(self) -> Any:
        yield self.enqueue(1, 2, 3, 4)
        due = yield self.store.due(200.0, 2, frozenset({"e1", "e3", "e9"}))
        self.assertEqual(ids(due), ["e2", "e4"])

    @defer.inlineCallbacks
    def test_due_again_without_update_gives_the_same(self) -> Any:
        yield self.enqueue(1, 2)
        first = yield self.store.due(200.0, 10, frozenset())
        self.assertEqual((yield self.store.due(200.0, 10, frozenset())), first)

    @defer.inlineCallbacks
    def test_update_saves_schedule_and_error(self) -> Any:
        yield self.enqueue(1)
        # Only these four fields: SQLiteStore and RedisStore keep the others as enqueued (MemoryStore
        # saves the whole entry; the Outbox never changes the others, so the difference does not show).
        yield self.store.update(entry(1, sink=1, attempts=2, next_attempt=500.25, last_error="down"))
        self.assertEqual((yield self.store.pending()),
                         [entry(1, sink=1, attempts=2, next_attempt=500.25, last_error="down")])
        self.assertEqual((yield self.store.due(500.0, 10, frozenset())), [])
        self.assertEqual(ids((yield self.store.due(500.25, 10, frozenset()))), ["e1"])
        yield self.store.update(entry(1, sink=1, attempts=0, next_attempt=10.0, last_error=None))
        [again] = yield self.store.pending()
        self.assertEqual((again.attempts, again.last_error, again.next_attempt), (0, None, 10.0))

    @defer.inlineCallbacks
    def test_update_of_an_unknown_entry_does_nothing(self) -> Any:
        yield self.store.update(entry(9))
        self.assertEqual((yield self.store.pending()), [])

    @defer.inlineCallbacks
    def test_replace(self) -> Any:
        yield self.enqueue(1, 2)
        yield self.store.replace("e1", [entry(3), entry(4, sink=1)])
        self.assertEqual(ids((yield self.store.pending())), ["e2", "e3", "e4"])
        yield self.store.replace("e2", [])
        self.assertEqual(ids((yield self.store.pending())), ["e3", "e4"])
        carried = entry(3, sink=2, next_attempt=7.0)
        yield self.store.replace("e3", [carried])  # the same entry, at the next sink
        self.assertEqual((yield self.store.pending()), [carried, entry(4, sink=1)])
        yield self.store.replace("unknown", [entry(5)])
        self.assertEqual(ids((yield self.store.pending())), ["e3", "e4", "e5"])
        self.assertEqual(ids((yield self.store.due(104.0, 10, frozenset()))), ["e3", "e4"])

    @defer.inlineCallbacks
    def test_replace_removes_the_files_named_once_committed(self) -> Any:
        folder = self.mktemp()
        os.makedirs(os.path.join(folder, "a-folder"))
        done = [os.path.join(folder, f"{n}.part") for n in (1, 2)]
        for path in done:
            with open(path, "wb") as f:
                f.write(b"x")
        kept = os.path.join(folder, "3.part")
        with open(kept, "wb") as f:
            f.write(b"x")
        yield self.enqueue(1, 2)
        missing, stuck = os.path.join(folder, "gone.part"), os.path.join(folder, "a-folder")
        left = yield self.store.replace("e1", [entry(3)], [*done, missing, stuck])
        self.assertEqual(ids((yield self.store.pending())), ["e2", "e3"])
        self.assertEqual([os.path.exists(p) for p in (*done, kept)], [False, False, True])
        self.assertEqual([path for path, _ in left], [stuck])  # a missing file counts as removed
        self.assertEqual((yield self.store.replace("e2", [])), [])  # nothing to remove


class ResumeStoreEdges:
    """Corners of IResumeStore the shared contract does not reach (mixed in per backend)."""

    @defer.inlineCallbacks
    def test_same_id_with_another_identity_replaces(self) -> Any:
        yield self.store.add(partial(1))
        yield self.store.add(partial(1, identifier=b"%photof", meta_timestamp=None))
        self.assertIsNone((yield self.store.find(partial().imei, "dualcam", b"%videof")))
        found = yield self.store.find(partial().imei, "dualcam", b"%photof")
        self.assertEqual(found, partial(1, identifier=b"%photof", meta_timestamp=None))
        self.assertEqual(len((yield self.store.all())), 1)

    @defer.inlineCallbacks
    def test_binary_identifiers_and_exact_times(self) -> Any:
        p = partial(1, flow="path", identifier=bytes(range(256)), first_seen=0.1 + 0.2, last_seen=1730290000.987654)
        yield self.store.add(p)
        self.assertEqual((yield self.store.find(p.imei, "path", bytes(range(256)))), p)
        self.assertEqual((yield self.store.expired(1730290000.987654)), [])
        self.assertEqual((yield self.store.expired(1730290000.98766)), [p])

    @defer.inlineCallbacks
    def test_checkpoint_and_remove_of_unknown_partials_do_nothing(self) -> Any:
        yield self.store.checkpoint("nope", 1, "b", 1.0)
        yield self.store.remove("nope")
        self.assertEqual((yield self.store.all()), [])


class MemoryOutboxStoreTests(OutboxStoreContract, ResumeStoreEdges, TestCase):
    """MemoryStore keeps the outbox contract (the reference)."""

    def make_store(self) -> Any:
        return MemoryStore()


class SQLiteOutboxStoreTests(OutboxStoreContract, ResumeStoreEdges, TestCase):
    """SQLiteStore keeps the outbox contract."""

    def make_store(self) -> Any:
        return SQLiteStore(":memory:")

    @defer.inlineCallbacks
    def test_files_stay_when_the_replace_fails(self) -> Any:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"x")
        yield self.enqueue(1)
        bad = entry(2, record={"not json": object()})
        with self.assertRaises(TypeError):
            yield self.store.replace("e1", [bad], [path])
        self.assertTrue(os.path.exists(path))  # nothing committed: the entry still names it
        self.assertEqual(ids((yield self.store.pending())), ["e1"])


class RedisCase:
    """Stores on the module's redis-server, each test under its own prefix (a TestCase mixin)."""

    skip = SKIP_REDIS

    def setUp(self) -> None:
        self.url = SERVER.url()
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.sync = redis.Redis.from_url(self.url, decode_responses=True)
        self.addCleanup(self._clean)
        super().setUp()  # type: ignore[misc]

    def _clean(self) -> None:
        keys = list(self.sync.scan_iter(f"{self.prefix}:*"))
        if keys:
            self.sync.delete(*keys)
        self.sync.close()

    def redis_store(self, instance: str = "a", **kw: Any) -> Any:
        store = RedisStore(kw.pop("url", self.url), prefix=self.prefix, instance=instance, **kw)
        self.addCleanup(store.close)
        return store

    def make_store(self) -> Any:
        return self.redis_store()

    def captured_logs(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events


class RedisStoreTests(RedisCase, StoreContract, ResumeStoreEdges, TestCase):
    """RedisStore keeps the IResumeStore contract."""

    @defer.inlineCallbacks
    def test_a_new_store_object_sees_the_data(self) -> Any:
        yield self.store.add(partial(1))
        yield self.store.enqueue(entry(1), None)
        other = self.redis_store("b")
        self.assertEqual(ids((yield other.all())), ["p1"])
        self.assertEqual(ids((yield other.pending())), ["e1"])

    @defer.inlineCallbacks
    def test_key_layout(self) -> Any:
        yield self.store.add(partial(1, identifier=b"%photof"))
        yield self.store.enqueue(entry(7), None)
        yield self.store.due(1000.0, 10, frozenset())
        leases = RedisLeases(self.store)
        yield leases.acquire("863719061653375", "a", 30.0)
        yield leases.request_takeover("863719061653375", "b")
        p = self.prefix
        self.assertEqual(set(self.sync.keys(f"{p}:*")), {
            f"{p}:partial:p1", f"{p}:partials:identity", f"{p}:partials:last_seen", f"{p}:outbox:e7",
            f"{p}:outbox:due", f"{p}:claim:e7", f"{p}:lease:863719061653375", f"{p}:takeover:b"})
        self.assertEqual(self.sync.hgetall(f"{p}:partials:identity"),
                         {f"863719061653375:dualcam:{b'%photof'.hex()}": "p1"})
        self.assertEqual(self.sync.zrange(f"{p}:partials:last_seen", 0, -1, withscores=True), [("p1", 101.0)])
        self.assertEqual(self.sync.zrange(f"{p}:outbox:due", 0, -1, withscores=True), [("e7", 107.0)])
        self.assertEqual(self.sync.get(f"{p}:claim:e7"), "a")
        self.assertTrue(0 < self.sync.pttl(f"{p}:claim:e7") <= 300_000)
        self.assertEqual(self.sync.hget(f"{p}:partial:p1", "identifier"), b"%photof".hex())

    @defer.inlineCallbacks
    def test_warns_when_append_only_is_off(self) -> Any:
        events = self.captured_logs()
        store = self.redis_store("c")
        self.assertEqual((yield store.persistence), "no-aof")
        self.assertTrue(any("appendonly no" in e.get("log_format", "") for e in events))

    @defer.inlineCallbacks
    def test_says_when_it_cannot_check(self) -> Any:
        user = f"{self.prefix}-user"
        self.sync.execute_command("ACL", "SETUSER", user, "on", ">secret", "~*", "&*", "+@all", "-config")
        self.addCleanup(self.sync.execute_command, "ACL", "DELUSER", user)
        events = self.captured_logs()
        store = self.redis_store("c", url=f"redis://{user}:secret@127.0.0.1:{SERVER.port}/0")
        self.assertEqual((yield store.persistence), "unknown")
        self.assertTrue(any("could not check" in e.get("log_format", "") for e in events))
        yield store.add(partial(1))  # the store works all the same
        self.assertEqual(ids((yield store.all())), ["p1"])

    @defer.inlineCallbacks
    def test_quiet_when_append_only_is_on(self) -> Any:
        self.sync.config_set("appendonly", "yes")
        try:
            self.assertEqual((yield self.store.check_persistence()), "aof")
        finally:
            self.sync.config_set("appendonly", "no")

    @defer.inlineCallbacks
    def test_closed_store_refuses_work(self) -> Any:
        yield self.store.close()
        yield self.assertFailure(self.store.all(), RuntimeError)
        yield self.store.close()


class RedisOutboxStoreTests(RedisCase, OutboxStoreContract, TestCase):
    """RedisStore keeps the outbox contract."""


class RedisInstancesTests(RedisCase, TestCase):
    """Several instances on one Redis: claims."""

    @defer.inlineCallbacks
    def test_due_never_gives_an_entry_to_two_instances(self) -> Any:
        a, b = self.redis_store("a"), self.redis_store("b")
        for n in range(1, 7):
            yield a.enqueue(entry(n), None)
        got_a = ids((yield a.due(200.0, 4, frozenset())))
        got_b = ids((yield b.due(200.0, 10, frozenset())))
        self.assertEqual((got_a, got_b), (["e1", "e2", "e3", "e4"], ["e5", "e6"]))
        self.assertEqual(ids((yield a.due(200.0, 10, frozenset()))), got_a)  # its own, again
        self.assertEqual(ids((yield b.due(200.0, 10, frozenset()))), got_b)

    @defer.inlineCallbacks
    def test_concurrent_dues_are_disjoint(self) -> Any:
        stores = [self.redis_store(f"i{k}") for k in range(4)]
        for n in range(40):
            yield stores[0].enqueue(entry(n), None)
        calls = [(s, s.due(500.0, 3, frozenset())) for _ in range(4) for s in stores]
        got: dict[str, set[str]] = {s.instance: set() for s in stores}
        for s, d in calls:
            got[s.instance].update(ids((yield d)))
        everyone = [i for s in got.values() for i in s]
        self.assertEqual(len(everyone), len(set(everyone)))
        self.assertEqual(len(everyone), 12)  # each instance gets its own 3 again on every call

    @defer.inlineCallbacks
    def test_update_and_replace_release_the_claim(self) -> Any:
        a, b = self.redis_store("a"), self.redis_store("b")
        yield a.enqueue(entry(1), None)
        yield a.enqueue(entry(2), None)
        [e1, e2] = yield a.due(200.0, 10, frozenset())
        self.assertEqual((yield b.due(200.0, 10, frozenset())), [])
        e1.attempts, e1.next_attempt, e1.last_error = 1, 150.0, "down"
        yield a.update(e1)
        self.assertEqual(ids((yield b.due(200.0, 10, frozenset()))), ["e1"])
        yield a.replace("e2", [dataclasses.replace(e2, sink=1), entry(3)])
        self.assertEqual(ids((yield b.due(200.0, 10, frozenset()))), ["e2", "e3", "e1"])
        self.assertIsNone(a.renew_claims())  # "a" claims nothing: nothing to renew

    @defer.inlineCallbacks
    def test_claims_of_a_dead_instance_expire(self) -> Any:
        a, b = self.redis_store("a", claim_ttl=2.0), self.redis_store("b")
        yield a.enqueue(entry(1), None)
        self.assertEqual(ids((yield a.due(200.0, 10, frozenset()))), ["e1"])
        a._renewal.stop()  # "a" dies: nothing renews its claims any more
        self.assertEqual((yield b.due(200.0, 10, frozenset())), [])
        got = yield poll(lambda: b.due(200.0, 10, frozenset()))
        self.assertEqual(ids(got), ["e1"])
        self.assertEqual(self.sync.get(f"{self.prefix}:claim:e1"), "b")

    @defer.inlineCallbacks
    def test_live_claims_are_renewed(self) -> Any:
        a = self.redis_store("a", claim_ttl=60.0)
        self.assertEqual(a._renewal.interval, 20.0)
        for n in (1, 2, 3):
            yield a.enqueue(entry(n), None)
        yield a.due(200.0, 10, frozenset())
        claim = f"{self.prefix}:claim:"
        self.sync.pexpire(claim + "e1", 1000)  # about to expire
        self.sync.delete(claim + "e2")  # expired, nobody took it
        self.sync.set(claim + "e3", "b")  # expired, and "b" took it
        events = self.captured_logs()
        yield a.renew_claims()
        self.assertGreater(self.sync.pttl(claim + "e1"), 30_000)
        self.assertEqual(self.sync.get(claim + "e2"), "a")
        self.assertEqual(self.sync.get(claim + "e3"), "b")
        self.assertTrue(any("may be delivered twice" in e.get("log_format", "") for e in events))
        self.sync.delete(claim + "e3")  # "b"'s claim lapses in turn: "a" gave e3 up and does not take it back
        yield self.redis_store("b").replace("e2", [])  # delivered elsewhere meanwhile
        yield a.renew_claims()
        self.assertEqual((self.sync.get(claim + "e1"), self.sync.get(claim + "e3")), ("a", None))
        yield a.replace("e1", [])  # "a" delivers e1: e2 and e3 are no longer its either
        self.assertIsNone(a.renew_claims())

    @defer.inlineCallbacks
    def test_close_releases_claims(self) -> Any:
        a, b = self.redis_store("a"), self.redis_store("b")
        yield a.enqueue(entry(1), None)
        yield a.due(200.0, 10, frozenset())
        yield a.close()
        self.assertEqual(ids((yield b.due(200.0, 10, frozenset()))), ["e1"])

    @defer.inlineCallbacks
    def test_a_restarted_instance_takes_its_entries_back(self) -> Any:
        a = self.redis_store("a")
        yield a.enqueue(entry(1), None)
        yield a.due(200.0, 10, frozenset())
        a._renewal.stop()  # killed, its claim still live
        self.assertEqual((yield self.redis_store("b").due(200.0, 10, frozenset())), [])
        self.assertEqual(ids((yield self.redis_store("a").due(200.0, 10, frozenset()))), ["e1"])

    @defer.inlineCallbacks
    def test_two_outboxes_deliver_each_file_once(self) -> Any:
        root = Path(self.mktemp())
        root.mkdir()
        delivered: list[tuple[str, str]] = []

        class Sink:
            def __init__(self, name: str) -> None:
                self.name = name

            def deliver(self, received: ReceivedFile) -> Any:
                delivered.append((self.name, received.path.read_bytes().decode()))
                return task.deferLater(reactor, 0.001, lambda: None)

        gateways = []
        for name in ("a", "b"):
            s = make_services(root, store=self.redis_store(name))  # one spool, shared
            yield s.outbox.idle()  # its first scan is over: it will not deliver anything
            yield s.outbox.stop()
            s.sinks = [Sink(name)]
            s.outbox = Outbox(s, concurrency=3, poll=5.0)
            gateways.append(s)
        for s in gateways:
            s.outbox.start()
        adds = []
        for n in range(20):
            s = gateways[n % 2]
            path = s.spool.path(s.spool.new_name())
            path.write_bytes(str(n).encode())
            received = ReceivedFile(
                path=path, imei="1", peer="p", protocol_id=5, camera="dualcam", flow="dualcam", source="photof",
                identifier=b"%photof", media="photo", metadata={}, size=1, sha256="x", start_total=1,
                start_crc=0, computed_crc=0, received_at=datetime.datetime(2024, 10, 30, tzinfo=datetime.timezone.utc),
                capture_time=None, resumed_from=0, crc_errors=0)
            adds.append(s.outbox.add(received, None))
            gateways[1 - n % 2].outbox.kick()
        yield defer.gatherResults(adds)
        yield poll(lambda: gateways[0].store.pending().addCallback(lambda p: not p))
        for s in gateways:
            yield s.outbox.idle()
            yield s.outbox.stop()
        self.assertEqual(sorted(int(content) for _, content in delivered), list(range(20)))


class RedisLeasesTests(RedisCase, TestCase):
    """One session per camera across instances."""

    IMEI = "863719061653375"

    def setUp(self) -> None:
        super().setUp()
        self.leases = RedisLeases(self.redis_store("a"))

    @defer.inlineCallbacks
    def test_acquire_renew_release(self) -> Any:
        leases, imei = self.leases, self.IMEI
        self.assertIsNone((yield leases.holder(imei)))
        self.assertTrue((yield leases.acquire(imei, "A", 30.0)))
        self.assertFalse((yield leases.acquire(imei, "B", 30.0)))
        self.assertEqual((yield leases.holder(imei)), "A")
        self.assertTrue((yield leases.acquire(imei, "A", 30.0)))  # holding it already
        self.assertFalse((yield leases.renew(imei, "B", 60.0)))
        self.assertLessEqual(self.sync.pttl(f"{self.prefix}:lease:{imei}"), 30_000)
        self.assertTrue((yield leases.renew(imei, "A", 60.0)))
        self.assertGreater(self.sync.pttl(f"{self.prefix}:lease:{imei}"), 30_000)
        yield leases.release(imei, "B")
        self.assertEqual((yield leases.holder(imei)), "A")
        yield leases.release(imei, "A")
        self.assertIsNone((yield leases.holder(imei)))
        self.assertFalse((yield leases.renew(imei, "A", 60.0)))
        self.assertTrue((yield leases.acquire(imei, "B", 30.0)))
        self.assertEqual((yield leases.holder(imei)), "B")

    @defer.inlineCallbacks
    def test_a_lease_expires(self) -> Any:
        leases, imei = self.leases, self.IMEI
        self.assertTrue((yield leases.acquire(imei, "A", 0.2)))
        yield poll(lambda: leases.holder(imei).addCallback(lambda h: h is None))
        self.assertFalse((yield leases.renew(imei, "A", 30.0)))
        self.assertTrue((yield leases.acquire(imei, "B", 30.0)))

    @defer.inlineCallbacks
    def test_takeover_requests_reach_the_holder_once(self) -> Any:
        leases = self.leases
        yield leases.request_takeover("111", "A")
        yield leases.request_takeover("222", "A")
        yield leases.request_takeover("111", "A")
        yield leases.request_takeover("333", "B")
        self.assertGreater(self.sync.pttl(f"{self.prefix}:takeover:A"), 0)
        self.assertEqual((yield leases.takeovers("A")), ["111", "222"])
        self.assertEqual((yield leases.takeovers("A")), [])
        self.assertEqual((yield leases.takeovers("C")), [])
        other = RedisLeases(self.redis_store("b"))
        self.assertEqual((yield other.takeovers("B")), ["333"])
        self.assertEqual((yield leases.takeovers("B")), [])


class SpoolFilesNotHereTests(RedisCase, TestCase):
    """Several instances, spools that are not the same: an entry goes to the instance that has its file."""

    def setUp(self) -> None:
        super().setUp()
        self.root = Path(self.mktemp()).resolve()

    def spool_dir(self, name: str) -> Path:
        folder = self.root / name / "partials"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def store(self, name: str, **kw: Any) -> Any:
        return self.redis_store(name, spool_dir=self.spool_dir(name), **kw)

    def put(self, name: str, n: int) -> None:
        (self.spool_dir(name) / entry(n).spool_name).write_bytes(b"x")

    def hash(self, n: int) -> dict[str, str]:
        return self.sync.hgetall(f"{self.prefix}:outbox:e{n}")

    def not_here(self, events: list[dict[str, Any]]) -> list[str]:
        return [e["id"] for e in events if e.get("event") == "spool_file_not_here"]

    @defer.inlineCallbacks
    def test_an_entry_whose_file_is_not_here_is_released_at_once_for_the_others(self) -> Any:
        a, b = self.store("a"), self.store("b")
        self.put("b", 1)
        yield a.enqueue(entry(1), None)
        events = self.captured_logs()
        self.assertEqual((yield a.due(200.0, 10, frozenset())), [])
        self.assertIsNone(self.sync.get(f"{self.prefix}:claim:e1"))
        self.assertIsNone(a.renew_claims())  # nor does "a" keep it as a claim of its own
        self.assertEqual(self.not_here(events), ["e1"])
        [line] = [formatEvent(e) for e in events if e.get("event") == "spool_file_not_here"]
        self.assertIn("spool file 1.file is not in this instance's spool: is the spool shared?", line)
        self.assertEqual(ids((yield b.due(200.0, 10, frozenset()))), ["e1"])  # at once: no backoff
        self.assertEqual(self.hash(1)["attempts"], "0")

    @defer.inlineCallbacks
    def test_logged_once_then_looked_at_again_after_a_while(self) -> Any:
        a = self.store("a", claim_ttl=60.0)  # unreadable_after 60 s: looked at again after 30 s
        yield a.enqueue(entry(1), None)
        events = self.captured_logs()
        self.assertEqual((yield a.due(200.0, 10, frozenset())), [])
        self.assertEqual((yield a.due(229.0, 10, frozenset())), [])  # skipped: not even claimed
        self.assertEqual(self.hash(1)["missing:a"], "200.0")
        self.assertEqual((yield a.due(231.0, 10, frozenset())), [])  # looked at again, still missing
        self.assertEqual(self.hash(1)["missing:a"], "231.0")
        self.assertEqual(self.not_here(events), ["e1"])  # once
        self.put("a", 1)  # the spool is mounted now
        self.assertEqual(ids((yield a.due(262.0, 10, frozenset()))), ["e1"])

    @defer.inlineCallbacks
    def test_the_places_of_missing_files_go_to_entries_that_are_here(self) -> Any:
        a = self.store("a")
        for n in (1, 2, 3, 4):
            yield a.enqueue(entry(n), None)
        self.put("a", 3)
        self.put("a", 4)
        self.assertEqual(ids((yield a.due(200.0, 2, frozenset()))), ["e3", "e4"])

    @defer.inlineCallbacks
    def test_a_delivery_attempt_forgets_the_marks(self) -> Any:
        a, b = self.store("a"), self.store("b")
        self.put("b", 1)
        yield a.enqueue(entry(1), None)
        yield a.due(200.0, 10, frozenset())
        self.assertEqual({k for k in self.hash(1) if k.startswith("missing")}, {"missing:a", "missing_since"})
        [e1] = yield b.due(200.0, 10, frozenset())
        e1.attempts, e1.next_attempt, e1.last_error = 1, 201.0, "the endpoint is down"
        yield b.update(e1)
        self.assertEqual({k for k in self.hash(1) if k.startswith("missing")}, set())
        self.assertEqual(self.hash(1)["attempts"], "1")

    @defer.inlineCallbacks
    def test_an_entry_no_running_instance_can_read_is_given_up_after_a_while(self) -> Any:
        a, b = self.store("a", claim_ttl=10.0), self.store("b", claim_ttl=10.0)
        for store in (a, b):
            yield store.register({"spool": store.spool_dir}, 60.0)
        yield a.enqueue(entry(1), None)
        self.assertEqual((yield a.due(200.0, 10, frozenset())), [])
        self.assertEqual((yield a.due(211.0, 10, frozenset())), [])  # b has not looked: it may have it
        self.assertEqual(a.unreadable, {})
        self.assertEqual((yield b.due(209.0, 10, frozenset())), [])  # only 9 s since the first look
        self.assertEqual(b.unreadable, {})
        [e1] = yield a.due(216.0, 10, frozenset())  # everybody looked, 16 s since the first: given up
        self.assertEqual(e1.id, "e1")
        self.assertIn("spool file 1.file is in the spool of no running instance", a.unreadable["e1"])
        self.assertIn("is the spool shared?", a.unreadable["e1"])
        self.assertEqual(self.sync.get(f"{self.prefix}:claim:e1"), "a")  # a dead-letters it

    @defer.inlineCallbacks
    def test_instances_register_and_lapse(self) -> Any:
        a, b = self.store("a"), self.store("b")
        yield a.register({"spool": "/a"}, 60.0)
        yield b.register({"spool": "/b"}, 0.2)
        self.assertEqual((yield a.instances()), {"a": {"spool": "/a"}, "b": {"spool": "/b"}})
        yield poll(lambda: a.instances().addCallback(lambda found: "b" not in found), what="b's registration lapsing")
        self.assertGreater(self.sync.zscore(f"{self.prefix}:instances:alive", "a"), 0)
        yield a.unregister()
        self.assertEqual((yield b.instances()), {})
        self.assertEqual(self.sync.keys(f"{self.prefix}:instances*"), [])

    @defer.inlineCallbacks
    def test_the_outbox_makes_an_unreadable_entry_a_dead_letter_of_its_record(self) -> Any:
        delivered: list[Any] = []

        class Sink:
            name = "http"

            def deliver(self, received: ReceivedFile) -> None:
                delivered.append(received)

        store = self.redis_store("a", spool_dir=self.spool_dir("a"), unreadable_after=0.0)
        s = make_services(self.root / "a", store=store)
        yield s.outbox.idle()
        s.sinks = [Sink()]
        events = self.captured_logs()
        yield store.enqueue(entry(1, next_attempt=0.0), None)
        yield s.outbox.idle()
        yield poll(lambda: store.pending().addCallback(lambda p: not p), what="the entry dropped")
        yield s.outbox.stop()
        self.assertEqual(delivered, [])
        [folder] = list(s.spool.dead.iterdir())
        self.assertFalse((folder / "file").exists())
        info = json.loads((folder / "dead-letter.json").read_text())
        self.assertIn("in the spool of no running instance", info["reason"])
        self.assertEqual(info["sink_name"], "http")
        self.assertEqual((s.outbox.dead_letters, s.outbox.failures, s.stats.delivery_failures), (1, 0, 0))
        self.assertTrue(any("cannot be delivered to http" in formatEvent(e) for e in events))


class SharedSpoolTests(RedisCase, TestCase):
    """The check that instances sharing a store share their spool, and the orphan sweep (real Redis)."""

    def setUp(self) -> None:
        super().setUp()
        self.root = Path(self.mktemp()).resolve()

    def instance(self, name: str, spool: str) -> Any:
        s = make_services(self.root / spool, store=self.redis_store(name))
        s.instance = name
        checker = SharedSpool(s, s.store, every=5.0)
        self.addCleanup(s.outbox.stop)
        return s, checker

    @defer.inlineCallbacks
    def test_instances_that_do_not_share_their_spool_say_so(self) -> Any:
        (sa, a), (sb, b) = self.instance("a", "one"), self.instance("b", "two")
        events = self.captured_logs()
        self.assertEqual((yield a.check()), {})
        self.assertTrue((sa.spool.root / "instances" / "a").is_file())
        missing = yield b.check()
        self.assertEqual(missing, {"a": str(sa.spool.root.resolve())})
        [error] = [e for e in events if e.get("event") == "spool_not_shared"]
        line = formatEvent(error)
        self.assertIn("instance a (spool " + str(sa.spool.root.resolve()), line)
        self.assertIn(f"the spool {sb.spool.root.resolve()} is not shared", line)
        self.assertIn("instance a", sb.health.warnings()[SHARED_SPOOL])
        self.assertEqual(set((yield a.check())), {"b"})  # a sees it too at its next check
        self.assertIn("instance b", sa.health.warnings()[SHARED_SPOOL])
        sb.health.working(SPOOL)  # (a spool write that works is another matter: the warning stays)
        self.assertIn(SHARED_SPOOL, sb.health.warnings())
        self.assertEqual(sb.health.problems(), {})  # (a warning: /healthz still answers 200)
        yield b.check()  # (the next check keeps it, without a second error line)
        self.assertIn(SHARED_SPOOL, sb.health.warnings())
        self.assertEqual(len([e for e in events if e.get("event") == "spool_not_shared"]), 2)

    @defer.inlineCallbacks
    def test_a_shared_spool_is_quiet(self) -> Any:
        (sa, a), (sb, b) = self.instance("a", "one"), self.instance("b", "one")
        events = self.captured_logs()
        yield a.check()
        self.assertEqual((yield b.check()), {})
        self.assertEqual((yield a.check()), {})
        self.assertTrue(sa.health.ok and sb.health.ok)
        self.assertEqual(sa.health.warnings(), {})
        self.assertEqual(sb.health.warnings(), {})
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.error], [])
        self.assertTrue(any("shared with instance b" in formatEvent(e) for e in events))

    @defer.inlineCallbacks
    def test_the_problem_clears_once_the_marker_is_seen_and_stopping_unregisters(self) -> Any:
        (sa, a), (sb, b) = self.instance("a", "one"), self.instance("b", "two")
        yield a.check()
        yield b.check()
        self.assertIn(SHARED_SPOOL, sb.health.warnings())
        sb.health.failing("store", "unrelated")
        (sb.spool.root / "instances" / "a").write_text("a\n")  # b's spool is the shared one now
        self.assertEqual((yield b.check()), {})
        self.assertEqual(sb.health.warnings(), {})
        self.assertEqual(sb.health.problems(), {"store": "unrelated"})
        yield a.stop()
        self.assertFalse((sa.spool.root / "instances" / "a").exists())
        self.assertEqual(set((yield b.store.instances())), {"b"})

    @defer.inlineCallbacks
    def test_markers_of_instances_gone_are_removed(self) -> Any:
        s, checker = self.instance("a", "one")
        folder = s.spool.root / "instances"
        folder.mkdir(parents=True)
        (folder / "gone").write_text("gone\n")
        checker.ttl = 3600.0
        yield checker.check()
        self.assertTrue((folder / "gone").exists())  # it may be starting: too young to tell
        checker.ttl = 0.0
        yield checker.check()
        self.assertEqual(sorted(p.name for p in folder.iterdir()), ["a"])

    @defer.inlineCallbacks
    def test_the_orphan_sweep_removes_only_what_nothing_names(self) -> Any:
        s = make_services(self.root, store=self.redis_store("a"))
        self.addCleanup(s.outbox.stop)
        yield s.outbox.idle()
        yield s.outbox.stop()  # (the entry below stays in the outbox)
        names = ["orphan.part", "partial.part", "entry.part", "noted.part", "open.part"]
        for name in names:
            s.spool.path(name).write_bytes(b"x")
        yield s.store.add(partial(1, spool_name="partial.part"))
        yield s.store.enqueue(entry(1, spool_name="entry.part"), None)
        note_folder = s.spool.root / "finished" / "b"  # another instance's note
        note_folder.mkdir(parents=True)
        (note_folder / "e9.json").write_bytes(Note(entry(9, spool_name="noted.part"), None, "down").to_json())

        class Session:
            transfer = type("T", (), {"partial": partial(2, spool_name="open.part")})()

        s.sessions["1"] = Session()  # type: ignore[assignment]
        self.assertEqual((yield sweep_orphans(s, 3600.0)), 0)  # all too young
        events = self.captured_logs()
        self.assertEqual((yield sweep_orphans(s, 0.0)), 1)
        self.assertEqual(sorted(s.spool.names()), sorted(set(names) - {"orphan.part"}))
        self.assertTrue((note_folder / "e9.json").exists())
        [line] = [formatEvent(e) for e in events if e.get("event") == "orphans_removed"]
        self.assertIn("1 orphan spool files removed", line)
