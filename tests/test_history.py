"""The history of stored files and of the cameras seen, in every store, and the status API over it.

The store tests run on MemoryStore, a real SQLite file and a real
``redis-server`` (as tests/test_redis_store.py starts it); the API tests on
real gateways: a restart (SQLite), two gateways sharing one Redis, the mp4
sink with the real ffmpeg, and ``twistd`` with two workers.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import random
import shutil
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface.verify import verifyObject

from camgateway.base.reasons import PermanentFailure
from camgateway.delivery.outbox import Outbox
from camgateway.delivery.sinks import ReceivedFile, Transformed
from camgateway.runtime.config import parse_config
from camgateway.storage.memory import MemoryStore
from camgateway.storage.records import (CameraSighting, FileEvent, FileQuery, IHistoryStore, StoredFile,
                                        next_status)
from camgateway.storage.sightings import CameraSightings
from camgateway.storage.sqlite import SQLiteStore
from tests.ops_support import OpsTestCase, http_get, jpeg_camera, poll, tiny_jpeg
from tests.support import make_services
from tests.test_integration import IMEI_BASE
from tests.test_outbox import Recorder

DAY = 86400.0
T0 = 1_730_000_000.0


def record(n: int, imei: str = "863719061653375", media: str = "photo", received_at: float = T0, **more: Any) -> dict:
    """A file's record as the outbox keeps it (ReceivedFile.to_record)."""
    meta = more.pop("metadata", {"trigger": 3, "trigger_name": "DIN1", "latitude": 54.68, "longitude": 25.28})
    values = {"id": f"f{n}", "imei": imei, "peer": "10.0.0.1:4000", "protocol_id": 5, "camera": "dualcam",
              "flow": "dualcam", "source": "photof" if media == "photo" else "videof",
              "identifier": b"%photof".hex(), "media": media, "metadata": meta, "size": 100 + n,
              "sha256": hashlib.sha256(str(n).encode()).hexdigest(), "start_total": 1, "start_crc": 0,
              "computed_crc": 0, "received_at": received_at, "capture_time": received_at - 5,
              "resumed_from": 0, "crc_errors": 0, "derived": None}
    values.update(more)
    return values


class HistoryStoreContract:
    """What every IHistoryStore does (mixed into one TestCase per backend)."""

    def make_store(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()

    def tearDown(self) -> Any:
        return self.store.close()

    @defer.inlineCallbacks
    def received(self, *records: dict) -> Any:
        for r in records:
            yield self.store.note_file(FileEvent(r["id"], r, r["received_at"]))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IHistoryStore, self.store))

    @defer.inlineCallbacks
    def test_a_file_from_received_to_stored(self) -> Any:
        r = record(1)
        yield self.received(r)
        [f], total = yield self.store.files(FileQuery())
        self.assertEqual((f.id, f.status, f.places, f.stored_at, f.received_at, total),
                         ("f1", "delivering", [], None, T0, 1))
        self.assertEqual(f.record["metadata"]["trigger_name"], "DIN1")
        yield self.store.note_file(FileEvent("f1", r, T0 + 2, place="/files/a.jpg"))
        yield self.store.note_file(FileEvent("f1", r, T0 + 3, place="/files/a.jpg", status="stored"))  # a repeat
        f = yield self.store.file("f1")
        self.assertEqual((f.status, f.places, f.stored_at), ("stored", ["/files/a.jpg"], T0 + 3))
        self.assertIsNone((yield self.store.file("nope")))

    @defer.inlineCallbacks
    def test_a_dead_letter_stays_one_until_retried(self) -> Any:
        r = record(1)
        yield self.received(r)
        yield self.store.note_file(FileEvent("f1", r, T0 + 1, status="dead-letter"))
        yield self.store.note_file(FileEvent("f1", r, T0 + 2, place="/a", status="stored"))
        self.assertEqual((yield self.store.file("f1")).status, "dead-letter")
        yield self.store.note_file(FileEvent("f1", r, T0 + 3, place="/b", status="stored", retried=True))
        f = yield self.store.file("f1")
        self.assertEqual((f.status, f.places, f.stored_at), ("stored", ["/a", "/b"], T0 + 1))

    @defer.inlineCallbacks
    def test_files_made_from_a_file_are_listed_under_it(self) -> Any:
        video = record(1, media="video")
        mp4 = dict(video, id="m1", derived="mp4")
        poster = dict(video, id="p1", derived="poster", media="photo")
        yield self.received(video)
        yield self.store.note_file(FileEvent("f1", video, T0 + 1, made=(("m1", mp4), ("p1", poster))))
        yield self.store.note_file(FileEvent("m1", mp4, T0 + 2, parent="f1", place="/x.mp4", status="stored"))
        yield self.store.note_file(FileEvent("f1", dict(video, derived="original"), T0 + 3, place="/x.ptmf",
                                             status="stored"))
        [f], total = yield self.store.files(FileQuery())
        self.assertEqual(total, 1)  # the derived files are not listed of their own
        self.assertEqual((f.status, f.places), ("stored", ["/x.ptmf"]))
        made = {d.id: d for d in f.derived}
        self.assertEqual(sorted(made), ["m1", "p1"])
        self.assertEqual((made["m1"].made_as, made["m1"].places, made["m1"].status, made["m1"].parent),
                         ("mp4", ["/x.mp4"], "stored", "f1"))
        self.assertEqual((made["p1"].made_as, made["p1"].status), ("poster", "delivering"))
        one = yield self.store.file("m1")
        self.assertEqual((one.parent, one.kind), ("f1", "video"))
        camera = yield self.store.camera(video["imei"], T0)
        self.assertEqual(camera.files_total, 1)

    @defer.inlineCallbacks
    def test_paging_filters_and_counts(self) -> Any:
        other = "352093080000001"
        records = [record(i, received_at=T0 + i, media="video" if i % 3 == 0 else "photo") for i in range(1, 13)]
        records += [record(20, imei=other, camera="dsm", received_at=T0 + 20,
                           metadata={"trigger": 7, "trigger_name": "Drowsiness"}, source="dsm")]
        yield self.received(*records)
        page, total = yield self.store.files(FileQuery(limit=5))
        self.assertEqual(([f.id for f in page], total), (["f20", "f12", "f11", "f10", "f9"], 13))
        page, total = yield self.store.files(FileQuery(limit=5, offset=10))
        self.assertEqual(([f.id for f in page], total), (["f3", "f2", "f1"], 13))
        page, total = yield self.store.files(FileQuery(limit=100, offset=50))
        self.assertEqual((page, total), ([], 13))
        for query, wanted in (
                (FileQuery(imei=other), ["f20"]),
                (FileQuery(camera="dsm"), ["f20"]),
                (FileQuery(kind="video"), ["f12", "f9", "f6", "f3"]),
                (FileQuery(kind="video", imei=other), []),
                (FileQuery(media="video", since=T0 + 6, until=T0 + 12), ["f9", "f6"]),
                (FileQuery(source="dsm"), ["f20"]),
                (FileQuery(trigger=7), ["f20"]),
                (FileQuery(trigger="Drowsiness"), ["f20"]),
                (FileQuery(trigger=3, kind="photo", limit=2), ["f11", "f10"]),
                (FileQuery(since=T0 + 11), ["f20", "f12", "f11"]),
                (FileQuery(until=T0 + 2), ["f1"])):
            page, total = yield self.store.files(query)
            self.assertEqual([f.id for f in page], wanted, query)
            if query.limit > len(wanted):
                self.assertEqual(total, len(wanted), query)
        _, total = yield self.store.files(FileQuery(trigger=3, kind="photo", limit=2))
        self.assertEqual(total, 8)

    @defer.inlineCallbacks
    def test_cameras(self) -> Any:
        imei = "863719061653375"
        yield self.store.note_camera(CameraSighting(imei, T0 - 100, peer="10.0.0.1:4000"))
        c = yield self.store.camera(imei, T0)
        self.assertEqual((c.first_seen, c.last_seen, c.peer, c.files_total, c.files_24h, c.latitude),
                         (T0 - 100, T0 - 100, "10.0.0.1:4000", 0, 0, None))
        old = record(1, received_at=T0 - 2 * DAY, metadata={"latitude": 1.5, "longitude": 2.5})
        yield self.received(old, record(2, received_at=T0 - 10), record(3, received_at=T0 - 5, metadata={}))
        yield self.store.note_camera(CameraSighting(imei, T0, error="protocol error: bad CRC"))
        yield self.store.note_camera(CameraSighting("352093080000001", T0 - 50, peer="10.0.0.2:1"))
        c = yield self.store.camera(imei, T0)
        self.assertEqual((c.camera, c.first_seen, c.last_seen, c.peer, c.files_total, c.files_24h),
                         ("dualcam", T0 - 2 * DAY, T0, "10.0.0.1:4000", 3, 2))
        self.assertEqual((c.latitude, c.longitude, c.position_at), (54.68, 25.28, T0 - 15))  # the newest fix
        self.assertEqual((c.last_file_at, c.last_error, c.last_error_at), (T0 - 5, "protocol error: bad CRC", T0))
        cameras = yield self.store.cameras(T0)
        self.assertEqual(sorted((c.imei, c.files_24h) for c in cameras),
                         [("352093080000001", 0), (imei, 2)])
        self.assertIsNone((yield self.store.camera("1", T0)))

    @defer.inlineCallbacks
    def test_sweep_forgets_old_files_and_what_was_made_of_them(self) -> Any:
        old = record(1, media="video", received_at=T0 - 40 * DAY)
        yield self.received(old, record(2, received_at=T0))
        yield self.store.note_file(FileEvent("f1", old, T0, made=(("m1", dict(old, id="m1", derived="mp4")),)))
        removed = yield self.store.sweep_history(T0 - 30 * DAY)
        self.assertEqual(removed, 1)
        page, total = yield self.store.files(FileQuery())
        self.assertEqual(([f.id for f in page], total), (["f2"], 1))
        self.assertIsNone((yield self.store.file("m1")))
        self.assertEqual((yield self.store.camera(old["imei"], T0)).files_total, 2)  # counted still
        self.assertEqual((yield self.store.sweep_history(T0 - 30 * DAY)), 0)

    @defer.inlineCallbacks
    def test_a_file_made_from_a_swept_one_is_not_recorded(self) -> Any:
        old = record(1, media="video", received_at=T0 - 40 * DAY)
        yield self.received(old)
        yield self.store.sweep_history(T0 - 30 * DAY)
        mp4 = dict(old, id="m1", derived="mp4")  # (its dead letter retried late, say)
        yield self.store.note_file(FileEvent("m1", mp4, T0, parent="f1", place="/x.mp4", status="stored"))
        self.assertEqual(((yield self.store.file("m1")), (yield self.store.file("f1"))), (None, None))
        self.assertEqual((yield self.store.camera(old["imei"], T0)).files_total, 1)


class MemoryHistoryTests(HistoryStoreContract, TestCase):
    def make_store(self) -> Any:
        return MemoryStore()


class SQLiteHistoryTests(HistoryStoreContract, TestCase):
    def make_store(self) -> Any:
        return SQLiteStore(Path(self.mktemp() + ".sqlite"), reactor)

    @defer.inlineCallbacks
    def test_kept_across_a_reopen(self) -> Any:
        path = Path(self.mktemp() + ".sqlite")
        store = SQLiteStore(path, reactor)
        r = record(1)
        yield store.note_file(FileEvent("f1", r, T0, place="/a", status="stored"))
        yield store.close()
        store = SQLiteStore(path, reactor)
        self.addCleanup(store.close)
        [f], total = yield store.files(FileQuery())
        self.assertEqual((f.id, f.status, f.places, total), ("f1", "stored", ["/a"], 1))
        self.assertEqual((yield store.camera(r["imei"], T0)).files_total, 1)

    @defer.inlineCallbacks
    def test_an_older_database_is_upgraded(self) -> Any:
        import sqlite3

        from camgateway.storage import sqlite as schema

        path = Path(self.mktemp() + ".sqlite")
        db = sqlite3.connect(path, isolation_level=None)
        db.executescript(schema._SCHEMA_V1)
        db.execute("INSERT INTO version VALUES (1)")
        db.executescript(schema._UPGRADES[2])
        db.execute("UPDATE version SET version = 2")
        db.close()
        store = SQLiteStore(path, reactor)
        self.addCleanup(store.close)
        yield self.received_in(store, record(1))
        _, total = yield store.files(FileQuery())
        self.assertEqual(total, 1)

    def received_in(self, store: Any, r: dict) -> Any:
        return store.note_file(FileEvent(r["id"], r, r["received_at"]))


def _redis_case() -> Any:
    from tests.test_redis_store import RedisCase

    return RedisCase


class RedisHistoryTests(_redis_case(), HistoryStoreContract, TestCase):  # type: ignore[misc]
    @defer.inlineCallbacks
    def test_shared_by_two_instances_with_online_from_the_leases(self) -> Any:
        from camgateway.storage.redis_leases import RedisLeases

        a, b = self.store, self.redis_store("b")
        r = record(1)
        yield a.note_file(FileEvent("f1", r, T0))
        yield b.note_file(FileEvent("f1", r, T0 + 1, place="/b/a.jpg", status="stored"))
        [f], total = yield a.files(FileQuery())
        self.assertEqual((f.status, f.places, total), ("stored", ["/b/a.jpg"], 1))
        [c] = yield a.cameras(T0)
        self.assertEqual((c.files_total, c.online), (1, False))
        yield RedisLeases(b).acquire(r["imei"], "b", 30)
        self.assertTrue((yield a.camera(r["imei"], T0)).online)
        keys = sorted(self.sync.scan_iter(f"{self.prefix}:file*"))
        self.assertEqual(keys[:2], [f"{self.prefix}:file:f1", f"{self.prefix}:files:by:camera:dualcam"])


# -- the outbox tells the history


class Maker:
    """A sink like mp4: the sinks after it get an MP4, a poster and the camera's file."""

    name = "maker"

    def __init__(self, services: Any) -> None:
        self.s = services

    def deliver(self, received: ReceivedFile) -> Any:
        if received.media != "video":
            return None
        made = []
        for what, media in (("mp4", "video"), ("poster", "photo")):
            path = self.s.spool.path(self.s.spool.new_name())
            path.write_bytes(what.encode())
            made.append(dataclasses.replace(received, path=path, derived=what, media=media))
        return Transformed(made + [dataclasses.replace(received, derived="original")])


class Keeper(Recorder):
    """A sink that stores each file at a path of its own."""

    def __init__(self, root: Path, failures: Optional[list[Exception]] = None) -> None:
        super().__init__("keeper", failures)
        self.root = root

    def deliver(self, received: ReceivedFile) -> Any:
        super().deliver(received)
        path = self.root / f"{received.id}.bin"
        shutil.copyfile(received.path, path)
        return path


def video_file(services: Any, content: bytes = b"video") -> ReceivedFile:
    path = services.spool.path(services.spool.new_name())
    path.write_bytes(content)
    return ReceivedFile(path=path, imei="863719061653375", peer="10.0.0.1:4000", protocol_id=5, camera="dualcam",
                        flow="dualcam", source="videof", identifier=b"%videof", media="video",
                        metadata={"latitude": 54.0, "longitude": 25.0}, size=len(content),
                        sha256=hashlib.sha256(content).hexdigest(), start_total=1, start_crc=0, computed_crc=0,
                        received_at=datetime.datetime.fromtimestamp(T0, datetime.timezone.utc), capture_time=None,
                        resumed_from=0, crc_errors=0)


class OutboxHistoryTests(TestCase):
    """The outbox records each file when it is received, then what each sink did with it."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        (self.root / "kept").mkdir(parents=True)
        self.s = make_services(self.root)

    def only(self) -> StoredFile:
        [f] = self.s.store.files(FileQuery()).result[0]
        return f

    def test_received_then_stored(self) -> None:
        gate: defer.Deferred = defer.Deferred()

        class Slow(Keeper):
            def deliver(inner, received: ReceivedFile) -> Any:  # noqa: N805
                return gate.addCallback(lambda _: Keeper.deliver(inner, received))

        self.s.sinks = [Slow(self.root / "kept")]
        self.s.outbox.add(video_file(self.s), None)
        f = self.only()
        self.assertEqual((f.status, f.places, f.record["source"]), ("delivering", [], "videof"))
        gate.callback(None)
        f = self.only()
        self.assertEqual((f.status, f.places), ("stored", [str(self.root / "kept" / f"{f.id}.bin")]))

    def test_what_a_sink_makes_is_listed_under_the_original(self) -> None:
        self.s.sinks = [Maker(self.s), Keeper(self.root / "kept")]
        self.s.outbox.add(video_file(self.s), None)
        f = self.only()
        self.assertEqual((f.status, len(f.places)), ("stored", 1))  # the camera's own file, passed on
        self.assertEqual(sorted((d.made_as, d.status, len(d.places)) for d in f.derived),
                         [("mp4", "stored", 1), ("poster", "stored", 1)])
        self.assertEqual((self.s.store.files(FileQuery()).result[1]), 1)
        pending = self.s.store.outbox
        self.assertEqual(pending, {})  # (all delivered)

    def test_a_refused_file_is_a_dead_letter_and_its_retry_stores_it(self) -> None:
        self.s.sinks = [Keeper(self.root / "kept", [PermanentFailure("HTTP 400: no")])]
        self.s.outbox.add(video_file(self.s), None)
        f = self.only()
        self.assertEqual(f.status, "dead-letter")
        entry = dataclasses.replace(next(iter(self.s.store.history.values())), status="x")
        from camgateway.delivery.dead_letters import prepare_retry

        [letter] = [p.name for p in self.s.spool.dead.iterdir()]
        self.s.store.enqueue(prepare_retry(self.s.spool, letter, self.s.clock.seconds(), ["keeper"]), None)
        self.s.clock.advance(5)
        f = self.only()
        self.assertEqual((f.id, f.status, len(f.places)), (entry.id, "stored", 1))

    def test_a_store_without_a_history_is_fine(self) -> None:
        class Plain(MemoryStore):
            pass

        import zope.interface

        zope.interface.classImplementsOnly(Plain)
        self.s.store = Plain()
        self.s.outbox = Outbox(self.s)
        self.s.sinks = [Keeper(self.root / "kept")]
        self.s.outbox.start()
        self.s.outbox.add(video_file(self.s), None)
        self.assertEqual(self.s.store.history, {})
        self.assertEqual(len(self.s.sinks[0].got), 1)


class SightingTests(TestCase):
    """At most one store write per camera per quiet time; a camera that goes is written at once."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.store = MemoryStore()
        self.writes: list[CameraSighting] = []
        note = self.store.note_camera
        self.store.note_camera = lambda s: (self.writes.append(dataclasses.replace(s)), note(s))[1]  # type: ignore
        self.sightings = CameraSightings(self.store, self.clock, quiet=5.0)

    def test_coalesced(self) -> None:
        self.sightings.connected("1", "10.0.0.1:1")
        self.assertEqual(len(self.writes), 1)
        for i in range(10):
            self.clock.advance(0.1)
            self.sightings.error("1", f"protocol error {i}")
            self.sightings.connected("1", f"10.0.0.1:{i}")
        self.assertEqual(len(self.writes), 1)
        self.clock.advance(5)
        self.assertEqual(len(self.writes), 2)
        self.assertEqual((self.writes[1].peer, self.writes[1].error), ("10.0.0.1:9", "protocol error 9"))
        self.clock.advance(60)  # nothing new: no write, and the quiet time is over
        self.assertEqual((len(self.writes), self.clock.getDelayedCalls()), (2, []))
        self.sightings.connected("1", "p")
        self.clock.advance(1)
        self.sightings.gone("1")
        self.assertEqual(len(self.writes), 4)
        c = self.store.camera_records["1"]
        self.assertEqual((c.last_seen, c.peer, c.last_error), (self.clock.seconds(), "p", "protocol error 9"))

    def test_close_writes_what_is_pending(self) -> None:
        self.sightings.connected("1", "a")
        self.sightings.error("1", "boom")
        self.assertEqual(len(self.writes), 1)
        self.sightings.close()
        self.assertEqual((len(self.writes), self.clock.getDelayedCalls()), (2, []))
        self.sightings.connected("1", "b")  # after close: nothing
        self.assertEqual(len(self.writes), 2)

    def test_statuses(self) -> None:
        self.assertEqual(next_status("delivering", None), "delivering")
        self.assertEqual(next_status("delivering", "stored"), "stored")
        self.assertEqual(next_status("dead-letter", "stored"), "dead-letter")
        self.assertEqual(next_status("dead-letter", "stored", retried=True), "stored")
        self.assertEqual(next_status("stored", "dead-letter"), "dead-letter")

    def test_history_ttl_is_configured(self) -> None:
        self.assertEqual(parse_config({}).history_ttl, 30 * DAY)
        self.assertEqual(parse_config({"storage": {"history_ttl": "2d"}}).history_ttl, 2 * DAY)


# -- the status API over it, on real gateways


def fetch(url: str) -> tuple[int, dict[str, str], Any]:
    """GET ``url`` (blocking): code, headers, decoded JSON."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


class HistoryApiTests(OpsTestCase):
    """/api/files and /api/cameras from the store: restarts, queries, cameras, MP4s and posters."""

    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        code, headers, body = yield http_get(self.url(path))
        return code, headers, json.loads(body)

    @defer.inlineCallbacks
    def test_history_survives_a_restart(self) -> Any:
        yield self.start_ops()
        jpeg = tiny_jpeg()
        yield self.cameras([jpeg_camera(0, jpeg), jpeg_camera(1, tiny_jpeg(48, 32))])
        before = yield self.settled(2)
        self.assertEqual({f["status"] for f in before}, {"stored"})
        root = self.root
        yield self.top.stopService()
        yield self.start_ops(root=root)
        code, headers, after = yield self.get("api/files")
        self.assertEqual(code, 200)
        self.assertEqual([f["id"] for f in after], [f["id"] for f in before])
        self.assertEqual(headers.getRawHeaders(b"x-total-count"), [b"2"])
        [photo] = [f for f in after if f["imei"] == str(IMEI_BASE)]
        self.assertEqual((photo["kind"], photo["thumb"], photo["url"], photo["poster"], photo["play"],
                          photo["derived"]), ("photo", photo["url"], f"files/{photo['id']}", None, None, []))
        self.assertTrue(photo["stored_at"].endswith("Z"))
        code, _, body = yield http_get(self.url(photo["url"]))
        self.assertEqual((code, body), (200, jpeg))
        code, _, one = yield self.get(f"api/files/{photo['id']}")
        self.assertEqual((code, one), (200, photo))
        code, _, cameras = yield self.get("api/cameras")
        self.assertEqual(sorted(c["imei"] for c in cameras), [str(IMEI_BASE), str(IMEI_BASE + 1)])
        self.assertEqual({(c["files_total"], c["files_24h"], c["online"]) for c in cameras}, {(1, 1, False)})

    @defer.inlineCallbacks
    def test_queries_and_their_errors(self) -> Any:
        yield self.start_ops()
        yield self.cameras([jpeg_camera(i, tiny_jpeg()) for i in range(3)])
        files = yield self.settled(3)
        code, headers, page = yield self.get("api/files?limit=1&offset=1")
        self.assertEqual((code, [f["id"] for f in page]), (200, [files[1]["id"]]))
        self.assertEqual(headers.getRawHeaders(b"x-total-count"), [b"3"])
        code, headers, page = yield self.get(f"api/files?imei={IMEI_BASE + 2}&kind=photo&camera=dualcam")
        self.assertEqual(([f["imei"] for f in page], headers.getRawHeaders(b"x-total-count")),
                         ([str(IMEI_BASE + 2)], [b"1"]))
        since = files[1]["received_at"]  # (ms: a file received in the same one is at or after it)
        code, _, page = yield self.get(f"api/files?since={since}")
        self.assertEqual([f["id"] for f in page], [f["id"] for f in files if f["received_at"] >= since])
        self.assertIn(files[0]["id"], [f["id"] for f in page])
        code, _, page = yield self.get(f"api/files?until={since}&source=photof")
        self.assertEqual([f["id"] for f in page], [f["id"] for f in files if f["received_at"] < since])
        code, _, page = yield self.get("api/files?kind=video")
        self.assertEqual((code, page), (200, []))
        for bad in ("limit=abc", "limit=0", "limit=-1", "limit=1001", "offset=-1", "offset=x", "since=yesterday",
                    "until=2024-13-01", "kind=movie", "camera=webcam"):
            code, _, body = yield self.get(f"api/files?{bad}")
            self.assertEqual(code, 400, bad)
            self.assertIn(bad.split("=")[0], body["error"])
        for bad in ("limit=abc", "limit=0", "limit=5000"):
            code, _, body = yield self.get(f"api/failures?{bad}")
            self.assertEqual(code, 400, bad)
        code, _, body = yield self.get("api/files/0123456789abcdef")
        self.assertEqual((code, body["error"]), (404, "not found"))
        code, _, body = yield self.get("api/cameras?online=maybe")
        self.assertEqual(code, 400)
        code, _, _ = yield self.get("api/cameras/123")
        self.assertEqual(code, 404)
        code, _, body = yield self.get("api/files")
        self.assertEqual(len(body), 3)  # (the default limit is 200)

    @defer.inlineCallbacks
    def test_cameras_online_while_connected_and_their_last_position(self) -> Any:
        yield self.start_ops()
        slow = b"PTMF" + random.Random(5).randbytes(200_000)
        spec = jpeg_camera(0, tiny_jpeg(), slow, slow_bps=80_000)  # a session of a few seconds
        running = self.cameras([spec])
        imei = str(spec.imei)

        def online() -> Any:
            d = self.get(f"api/cameras/{imei}")
            return d.addCallback(lambda answer: answer[2] if answer[0] == 200 and answer[2]["online"] else None)

        camera = yield poll(online, what="the camera online")
        self.assertTrue(camera["last_seen"].endswith("Z") and camera["peer"].startswith("127.0.0.1:"))
        code, _, summary = yield self.get("api/summary")
        self.assertEqual((summary["cameras"], summary["cameras_online"], summary["health"]["status"]), (1, 1, "ok"))
        code, _, listed = yield self.get("api/cameras?online=true&q=" + imei[-5:])
        self.assertEqual([c["imei"] for c in listed], [imei])
        yield running

        def offline() -> Any:
            return self.get(f"api/cameras/{imei}").addCallback(
                lambda a: a[2] if not a[2]["online"] and a[2]["files_total"] == 2 else None)

        camera = yield poll(offline, what="the camera offline with its two files, once its session ended")
        self.assertEqual((camera["files_24h"], camera["camera"]), (2, "dualcam"))
        self.assertAlmostEqual(camera["latitude"], 24.9225)
        self.assertAlmostEqual(camera["longitude"], 67.1388)
        self.assertTrue(camera["position_at"].endswith("Z"))
        code, _, listed = yield self.get("api/cameras?online=true")
        self.assertEqual(listed, [])
        code, _, summary = yield self.get("api/summary")
        self.assertEqual((summary["cameras"], summary["cameras_online"]), (1, 0))

    @defer.inlineCallbacks
    def test_the_mp4_and_poster_are_listed_under_the_video(self) -> Any:
        from camgateway.delivery.sinks.registry import validate
        from tests.test_video import HAVE_FFMPEG, NO_FFMPEG, emulator_media

        if not HAVE_FFMPEG:
            raise SkipTest(NO_FFMPEG)
        media = yield emulator_media()
        root = Path(self.mktemp()).resolve()
        sinks = (validate({"type": "mp4"}, "sinks[0]", root),
                 {"type": "disk", "root": str(root / "files")})
        yield self.start_ops(root=root, sinks=sinks)
        yield self.cameras([jpeg_camera(0, tiny_jpeg(), media.video("dualcam"))])

        def video() -> Any:
            d = self.get("api/files?kind=video")
            return d.addCallback(lambda a: a[2][0] if a[2] and a[2][0]["status"] == "stored"
                                 and len(a[2][0]["derived"]) == 2 and all(m["url"] for m in a[2][0]["derived"])
                                 else None)

        f = yield poll(video, timeout=60, what="the video with its MP4 and poster")
        self.assertEqual([m["kind"] for m in f["derived"]], ["mp4", "poster"])
        self.assertTrue(f["name"].endswith(".ptmf"))
        self.assertEqual((f["poster"], f["play"], f["thumb"]),
                         (f"files/{f['id']}/poster", f"files/{f['id']}/play", f"files/{f['id']}/poster"))
        mp4, poster = f["derived"]
        code, _, body = yield http_get(self.url(mp4["url"]))
        self.assertEqual((code, body[4:8]), (200, b"ftyp"))
        code, _, body = yield http_get(self.url(poster["url"]))
        self.assertEqual((code, body[:2]), (200, b"\xff\xd8"))
        self.assertTrue(poster["name"].endswith("_poster.jpg"))
        code, headers, listed = yield self.get("api/files")
        self.assertEqual((len(listed), headers.getRawHeaders(b"x-total-count")), (2, [b"2"]))
        code, _, one = yield self.get(f"api/files/{mp4['id']}")
        self.assertEqual((code, one["url"], one["kind"]), (200, mp4["url"], "video"))


class SharedRedisApiTests(OpsTestCase):
    """Two gateways on one Redis show the same history, whichever received the file."""

    timeout = 120

    @defer.inlineCallbacks
    def test_two_gateways_one_history(self) -> Any:
        from tests.test_redis_store import SERVER

        url = SERVER.database(self, 9)
        work = Path(self.mktemp()).resolve()
        shared = dict(spool=work / "spool", resume=url, sinks=({"type": "disk", "root": str(work / "files")},))
        yield self.start_ops(root=work / "a", instance="a", **shared)
        first = self.url("")
        yield self.cameras([jpeg_camera(0, tiny_jpeg())])
        [mine] = yield self.settled(1)
        a_gateway = self.gateway
        yield self.start_ops(root=work / "b", instance="b", **shared)  # (the second one: self.url is b's now)
        self.assertNotEqual(first, self.url(""))
        [theirs] = yield self.settled(1)
        self.assertEqual(theirs, mine)
        code, _, body = yield http_get(self.url(theirs["url"]))
        self.assertEqual(code, 200)
        code, _, body = yield http_get(self.url("api/cameras"))
        [camera] = json.loads(body)
        self.assertEqual((camera["imei"], camera["files_total"], camera["online"]), (str(IMEI_BASE), 1, False))
        self.assertIsNot(self.gateway, a_gateway)


class WorkersHistoryTests(TestCase):
    """``workers: 2``: each worker's history once in the merged answers."""

    timeout = 120

    def test_no_duplicates(self) -> None:
        from tests.test_scaleout import free_port, wait
        from tests.test_twistd import Camera, Gateway
        from tests.test_workers import imei_of

        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        http_port = free_port()
        (work / "camgateway.yaml").write_text(json.dumps({
            "listen": ["tcp:0:interface=127.0.0.1"], "workers": 2,
            "http": {"listen": [f"tcp:{http_port}:interface=127.0.0.1"]}, "storage": {"spool": "spool"},
            "sinks": [{"type": "disk", "root": "files"}], "timeouts": {"idle": 30, "metadata": 5}}))
        gateway = Gateway(work, "--config", str(work / "camgateway.yaml"))
        self.addCleanup(gateway.stop, signal.SIGKILL)
        photos = {}
        for worker in (0, 1):
            for n in range(2):
                photos[(worker, n)] = b"\xff\xd8" + os.urandom(3000) + b"\xff\xd9"
                Camera(gateway.port, imei_of(worker)).send_photo(photos[(worker, n)])
        base = f"http://127.0.0.1:{http_port}"

        def listed() -> Any:
            return wait(lambda: (lambda a: a if len(a[2]) == 4 and all(f["status"] == "stored" for f in a[2])
                                 else None)(fetch(base + "/api/files")), what="the four files listed")

        code, headers, files = listed()
        self.assertEqual(len({f["id"] for f in files}), 4)
        self.assertEqual(headers["X-Total-Count"], "4")
        self.assertEqual(sorted(f["sha256"] for f in files),
                         sorted(hashlib.sha256(p).hexdigest() for p in photos.values()))
        code, headers, page = fetch(base + "/api/files?limit=2&offset=1")
        self.assertEqual(([f["id"] for f in page], headers["X-Total-Count"]), ([f["id"] for f in files[1:3]], "4"))
        code, _, cameras = fetch(base + "/api/cameras")
        self.assertEqual(sorted((c["imei"], c["files_total"]) for c in cameras),
                         sorted((str(imei_of(w)), 2) for w in (0, 1)))
        for f in files:
            code, _, one = fetch(f"{base}/api/files/{f['id']}")
            self.assertEqual((code, one["id"]), (200, f["id"]))
            with urllib.request.urlopen(f"{base}/{f['url']}", timeout=10) as response:
                self.assertEqual(hashlib.sha256(response.read()).hexdigest(), f["sha256"])
        summary = wait(lambda: (lambda a: a[2] if a[2]["cameras_online"] == 0 else None)(fetch(base + "/api/summary")),
                       what="both cameras' sessions over")
        self.assertEqual(summary["cameras"], 2)
        self.assertTrue(gateway.stopped_cleanly())
