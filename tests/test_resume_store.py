"""The resume-offset store (one contract for every IResumeStore) and reconcile."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from camgateway.storage.memory import MemoryStore
from camgateway.storage.records import IResumeStore, Partial
from camgateway.storage.sqlite import SCHEMA_VERSION, SQLiteStore
from camgateway.runtime.service import reconcile, sweep_expired
from camgateway.transfer.spool import Spool, reconcile_partial
from camgateway.wire.codec import PACKET as DUALCAM_PACKET
from tests.support import make_services


def partial(n: int = 1, **kw: object) -> Partial:
    values = dict(id=f"p{n}", imei="863719061653375", flow="dualcam", identifier=b"%videof", total=10,
                  start_crc=0, meta_timestamp="2024-10-29T12:43:42Z", held=0, boot_id="b",
                  spool_name=f"{n}.part", first_seen=100.0 + n, last_seen=100.0 + n)
    values.update(kw)
    return Partial(**values)  # type: ignore[arg-type]


class StoreContract:
    """What every IResumeStore must do (mixed into one TestCase per backend)."""

    def make_store(self) -> object:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()

    def tearDown(self) -> defer.Deferred:
        return self.store.close()

    def test_interface(self) -> None:
        verifyObject(IResumeStore, self.store)

    @defer.inlineCallbacks
    def test_add_find_checkpoint_remove(self) -> object:
        # Every field distinct, so a store that mixes up two columns fails.
        p = partial(identifier=b"/sdcard/dsm/a.mp4\0", flow="path", total=7, start_crc=0x1D0F, held=3,
                    first_seen=99.5, last_seen=101.25)
        yield self.store.add(p)
        found = yield self.store.find(p.imei, "path", b"/sdcard/dsm/a.mp4\0")
        self.assertEqual(found, p)
        self.assertIsNone((yield self.store.find(p.imei, "path", b"/sdcard/dsm/a.mp4")))
        self.assertIsNone((yield self.store.find("1", "path", b"/sdcard/dsm/a.mp4\0")))
        yield self.store.checkpoint(p.id, 4096, "boot-2", 500.0)
        found = yield self.store.find(p.imei, "path", p.identifier)
        self.assertEqual((found.held, found.boot_id, found.last_seen), (4096, "boot-2", 500.0))
        yield self.store.remove(p.id)
        self.assertIsNone((yield self.store.find(p.imei, "path", p.identifier)))

    @defer.inlineCallbacks
    def test_outbox_entries_round_trip(self) -> object:
        from camgateway.delivery.outbox import OutboxEntry

        entry = OutboxEntry("e1", "1.part", 2, 3, 104.5, "sink said no", {"size": 9, "metadata": {"a": [1]}},
                            99.25)
        yield self.store.enqueue(entry, None)
        self.assertEqual((yield self.store.pending()), [entry])

    @defer.inlineCallbacks
    def test_one_partial_per_identity(self) -> object:
        yield self.store.add(partial(1))
        yield self.store.add(partial(2, total=20))
        everything = yield self.store.all()
        self.assertEqual([p.id for p in everything], ["p2"])

    @defer.inlineCallbacks
    def test_expired_and_all_in_order(self) -> object:
        yield self.store.add(partial(1, identifier=b"%photof"))
        yield self.store.add(partial(3, identifier=b"%videor"))
        yield self.store.add(partial(2, identifier=b"%photor"))
        self.assertEqual([p.id for p in (yield self.store.all())], ["p1", "p2", "p3"])
        self.assertEqual([p.id for p in (yield self.store.expired(102.5))], ["p1", "p2"])

    def test_matches(self) -> None:
        p = partial()
        self.assertTrue(p.matches(10, 0, "2024-10-29T12:43:42Z"))
        self.assertTrue(p.matches(10, 0, None))
        self.assertFalse(p.matches(11, 0, None))
        self.assertFalse(p.matches(10, 1, None))
        self.assertFalse(p.matches(10, 0, "2024-10-29T12:43:43Z"))


class MemoryStoreTests(StoreContract, TestCase):
    """MemoryStore keeps the contract."""

    def make_store(self) -> object:
        return MemoryStore()


class SQLiteMemoryStoreTests(StoreContract, TestCase):
    """SQLiteStore on :memory: keeps the contract."""

    def make_store(self) -> object:
        return SQLiteStore(":memory:")


class SQLiteFileStoreTests(StoreContract, TestCase):
    """SQLiteStore on disk keeps the contract, persists and is versioned."""

    def make_store(self) -> object:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return SQLiteStore(self.path)

    @defer.inlineCallbacks
    def test_persists_across_instances(self) -> object:
        yield self.store.add(partial())
        yield self.store.close()
        self.store = SQLiteStore(self.path)
        self.assertEqual([p.id for p in (yield self.store.all())], ["p1"])
        db = sqlite3.connect(self.path)
        self.assertEqual(db.execute("SELECT version FROM version").fetchone(), (SCHEMA_VERSION,))
        db.close()
        self.assertEqual([n for n in os.listdir(self.path.parent) if ".new-" in n], [])

    @defer.inlineCallbacks
    def test_refuses_newer_schema(self) -> object:
        yield self.store.all()
        yield self.store.close()
        db = sqlite3.connect(self.path)
        db.execute("UPDATE version SET version = ?", (SCHEMA_VERSION + 1,))
        db.commit()
        db.close()
        self.store = SQLiteStore(self.path)
        error = yield self.assertFailure(self.store.all(), RuntimeError)
        self.assertIn("newer", str(error))


class ReconcileTests(TestCase):
    """After a crash the spool and the store are made to agree (resume_store docs)."""

    def setUp(self) -> None:
        self.spool = Spool(Path(self.mktemp()))
        self.spool.ensure()

    def write(self, name: str, size: int) -> None:
        self.spool.path(name).write_bytes(b"x" * size)

    def test_same_boot_trusts_the_file_in_whole_packets(self) -> None:
        self.write("1.part", 5 * DUALCAM_PACKET + 300)
        held = reconcile_partial(self.spool, partial(held=DUALCAM_PACKET, boot_id="now"), "now")
        self.assertEqual(held, 5 * DUALCAM_PACKET)
        self.assertEqual(self.spool.path("1.part").stat().st_size, 5 * DUALCAM_PACKET)

    def test_other_boot_truncates_to_checkpoint(self) -> None:
        self.write("1.part", 5 * DUALCAM_PACKET)
        held = reconcile_partial(self.spool, partial(held=2 * DUALCAM_PACKET, boot_id="old"), "now")
        self.assertEqual(held, 2 * DUALCAM_PACKET)
        self.assertEqual(self.spool.path("1.part").stat().st_size, 2 * DUALCAM_PACKET)

    def test_never_beyond_the_file(self) -> None:
        self.write("1.part", 100)
        held = reconcile_partial(self.spool, partial(flow="path", total=10_000, held=5000, boot_id="old"), "now")
        self.assertEqual(held, 100)

    def test_short_last_packet_kept(self) -> None:
        self.write("1.part", 9 * DUALCAM_PACKET + 10)
        self.assertEqual(reconcile_partial(self.spool, partial(boot_id="now"), "now"), 9 * DUALCAM_PACKET + 10)

    def test_missing_file(self) -> None:
        self.assertIsNone(reconcile_partial(self.spool, partial(), "now"))

    @defer.inlineCallbacks
    def test_reconcile_drops_orphans_and_lost_partials(self) -> object:
        services = make_services(Path(self.mktemp()))
        spool = services.spool
        yield services.store.add(partial(1, spool_name="kept.part", held=1024, boot_id="old"))
        yield services.store.add(partial(2, identifier=b"%photof", spool_name="gone.part"))
        spool.path("kept.part").write_bytes(b"k" * 3000)
        spool.path("orphan.part").write_bytes(b"o")
        yield reconcile(services)
        everything = yield services.store.all()
        self.assertEqual([(p.id, p.held, p.boot_id) for p in everything], [("p1", 1024, "boot-1")])
        self.assertEqual(spool.names(), {"kept.part"})
        self.assertEqual(spool.path("kept.part").stat().st_size, 1024)

    @defer.inlineCallbacks
    def test_sweep_removes_expired(self) -> object:
        services = make_services(Path(self.mktemp()), partial_ttl=3600.0)
        yield services.store.add(partial(1, spool_name="a.part", last_seen=0.0))
        yield services.store.add(partial(2, identifier=b"%photof", spool_name="b.part", last_seen=5000.0))
        services.spool.path("a.part").write_bytes(b"a")
        services.spool.path("b.part").write_bytes(b"b")
        services.clock.advance(4000)
        yield sweep_expired(services)
        self.assertEqual([p.id for p in (yield services.store.all())], ["p2"])
        self.assertEqual(services.spool.names(), {"b.part"})


class GroupCommitTests(TestCase):
    """Statements queued while the store's thread is busy share one transaction."""

    @defer.inlineCallbacks
    def test_batched_and_isolated(self) -> object:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore(path)
        self.addCleanup(store.close)
        batches: list[int] = []
        real = store._in_thread

        def counting(fns: list) -> list:
            batches.append(len(fns))
            return real(fns)

        store._in_thread = counting  # type: ignore[method-assign]
        adds = [store.add(partial(n, identifier=b"%id" + bytes([n]))) for n in range(50)]
        bad = store._run(lambda db: db.execute("INSERT INTO no_such_table VALUES (1)"))
        more = [store.add(partial(n, identifier=b"%id" + bytes([n]))) for n in range(50, 60)]
        yield defer.gatherResults(adds + more)
        yield self.assertFailure(bad, sqlite3.OperationalError)
        self.assertEqual(len((yield store.all())), 60)  # the failure undid nothing else
        self.assertEqual(sum(batches), 62)
        self.assertLess(len(batches), 10)  # 62 statements, a handful of commits


class KeyCacheTests(TestCase):
    """Once all() has read the partials, finding no partial needs no round trip."""

    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store = SQLiteStore(path)
        self.addCleanup(self.store.close)

    @defer.inlineCallbacks
    def test_absent_keys_answer_at_once_and_changes_are_followed(self) -> object:
        from camgateway.delivery.outbox import OutboxEntry

        p1 = partial(1)
        yield self.store.add(p1)
        missing = self.store.find(p1.imei, "dualcam", b"%photof")
        self.assertFalse(missing.called)  # no cache before all(): a real query
        self.assertIsNone((yield missing))
        reading = self.store.all()
        p2 = partial(2, identifier=b"%videor")
        added = self.store.add(p2)  # while all() is in flight
        yield reading
        yield added
        absent = self.store.find(p1.imei, "dualcam", b"%photof")
        self.assertIsNone(self.successResultOf(absent))  # answered at once
        self.assertEqual((yield self.store.find(p1.imei, "dualcam", b"%videof")), p1)
        self.assertEqual((yield self.store.find(p2.imei, "dualcam", b"%videor")), p2)
        yield self.store.enqueue(OutboxEntry("e1", "1.part", 0, 0, 0.0, None, {}, 0.0), p1.id)
        self.assertIsNone(self.successResultOf(self.store.find(p1.imei, "dualcam", b"%videof")))
        yield self.store.remove(p2.id)
        self.assertIsNone(self.successResultOf(self.store.find(p2.imei, "dualcam", b"%videor")))
        p3 = partial(3)  # the same key as p1, a new partial
        yield self.store.add(p3)
        self.assertEqual((yield self.store.find(p3.imei, "dualcam", b"%videof")), p3)
