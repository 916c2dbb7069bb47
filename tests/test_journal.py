"""Finished files the store cannot record: kept with a durable note, handed over when it answers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from camgateway.wire import codec
from camgateway.base.health import SPOOL, STORE
from camgateway.transfer.journal import FinishJournal
from camgateway.runtime.service import reconcile
from tests.support import connect, make_services, stored_files
from tests.test_session import IMEI, PHOTOF, data_frames


class FlakyStore:
    """A MemoryStore whose records of finished files fail while ``down`` (it went away mid-transfer)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False
        self.shared = inner.shared

    def enqueue(self, entry: Any, partial_id: Any) -> defer.Deferred:
        if self.down:
            return defer.fail(ConnectionError("Connection refused by the store"))
        return self.inner.enqueue(entry, partial_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class JournalTests(TestCase):
    def setUp(self) -> None:
        from camgateway.storage.memory import MemoryStore

        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.store = FlakyStore(MemoryStore())
        self.s = make_services(self.root, store=self.store, metadata=False)
        self.s.journal = FinishJournal(self.s)

    def send_photo(self, content: bytes) -> Any:
        protocol, transport = connect(self.s)
        protocol.dataReceived(codec.init_packet(5, IMEI, PHOTOF))
        self.assertEqual(transport.value(), codec.file_request(b"%photof"))
        transport.clear()
        protocol.dataReceived(codec.start((len(content) + 1023) // 1024, 0))
        self.assertEqual(transport.value(), codec.resume(1))
        transport.clear()
        protocol.dataReceived(codec.sync(1) + b"".join(data_frames(content)))
        return protocol, transport

    def hang_up(self, protocol: Any, transport: Any) -> None:
        from twisted.python.failure import Failure

        protocol.dataReceived(codec.init_packet(5, IMEI, 0))  # nothing more: CLOSE
        self.assertTrue(transport.value().endswith(codec.close()))
        protocol.connectionLost(Failure(ConnectionError("closed")))

    def test_store_down_at_the_finish_keeps_the_file_and_delivers_it_once_the_store_answers(self) -> None:
        content = b"\xff\xd8" + os.urandom(3000)
        self.store.down = True
        protocol, transport = self.send_photo(content)
        # The note is durable: the camera is told the file is done.
        self.assertEqual(transport.value(), codec.repeat_init())
        self.assertEqual(stored_files(self.root), [])
        [note] = list((self.s.spool.root / "finished" / "local").glob("*.json"))
        doc = json.loads(note.read_text())
        self.assertEqual(doc["entry"]["record"]["sha256"], __import__("hashlib").sha256(content).hexdigest())
        self.assertIn("Connection refused", self.s.health.problem(STORE))
        self.assertFalse(self.s.health.ok)
        # Still down: the replay keeps the note.
        self.s.journal.replay()
        self.assertEqual(len(self.s.journal.notes), 1)
        self.assertTrue(note.exists())
        # Back: handed to the outbox, delivered, the note removed, health clear.
        self.store.down = False
        self.s.journal.replay()
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), content)
        self.assertFalse(note.exists())
        self.assertEqual(self.s.journal.notes, {})
        self.assertTrue(self.s.health.ok)

    def test_notes_survive_a_restart_and_the_reconcile_keeps_their_spool_files(self) -> None:
        content = b"\xff\xd8" + os.urandom(5000)
        self.store.down = True
        self.send_photo(content)
        [spool_file] = self.s.spool.names()
        # A new process: same spool, a store that lost nothing (it never recorded the file).
        s2 = make_services(self.root, store=self.store.inner, metadata=False)
        journal = s2.journal = FinishJournal(s2)
        loaded = []
        journal.load().addCallback(loaded.append)
        self.assertEqual(loaded, [1])
        done = []
        reconcile(s2).addCallback(done.append)
        self.assertEqual(len(done), 1)
        self.assertEqual(s2.spool.names(), {spool_file})  # not taken for an orphan
        journal.replay()
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), content)

    def test_a_note_whose_spool_file_is_gone_is_removed(self) -> None:
        self.store.down = True
        self.send_photo(b"\xff\xd8" + os.urandom(100))
        [name] = self.s.spool.names()
        self.s.spool.unlink(name)  # delivered by a run whose answer was lost
        self.store.down = False
        self.s.journal.replay()
        self.assertEqual(self.s.journal.notes, {})
        self.assertEqual(list((self.s.spool.root / "finished" / "local").glob("*.json")), [])
        self.assertEqual(stored_files(self.root), [])

    def test_neither_store_nor_spool_can_record_the_camera_is_not_told_the_file_is_done(self) -> None:
        self.store.down = True
        # The notes' folder cannot be made: a file stands where it should be.
        (self.s.spool.root / "finished").write_text("in the way")
        protocol, transport = self.send_photo(b"\xff\xd8" + os.urandom(2000))
        sent = transport.value()
        self.assertNotIn(codec.repeat_init(), sent)
        self.assertNotIn(codec.close(), sent)
        self.assertTrue(transport.disconnecting)
        self.assertIsNotNone(self.s.health.problem(SPOOL))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_a_new_offer_of_the_same_identifier_never_touches_a_held_file(self) -> None:
        """A DualCam's next photo has the same identifier (%photof) as the one held for the store."""
        self.store.shared = True  # (as with Redis: the partial is recorded when the transfer opens)
        first = b"\xff\xd8" + os.urandom(3000)
        self.store.down = True
        self.hang_up(*self.send_photo(first))
        # Before the replay: a partial record of the held file may remain in the store.
        held_names = self.s.journal.spool_names
        self.store.down = False
        second = b"\xff\xd8" + os.urandom(2000)
        self.send_photo(second)
        for name in held_names:
            self.assertTrue(self.s.spool.path(name).exists())
        self.s.journal.replay()
        self.assertEqual(sorted(p.read_bytes() for p in stored_files(self.root)), sorted([first, second]))

    def test_healthz_says_degraded_with_the_reason(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        from camgateway.web.status import StatusRoot

        class Gateway:
            services = self.s
            ports: list = []

        self.s.health.failing(STORE, "cannot record finished files (Connection refused)")

        class Port:
            def getHost(self) -> Any:
                from twisted.internet.address import IPv4Address

                return IPv4Address("TCP", "127.0.0.1", 5000)

        Gateway.ports = [Port()]
        root = StatusRoot(Gateway(), None, None)  # type: ignore[arg-type]
        request = DummyRequest([b"healthz"])
        body = root.getChildWithDefault(b"healthz", request).render(request)
        self.assertEqual(request.responseCode, 503)
        doc = json.loads(body)
        self.assertEqual(doc["status"], "degraded")
        self.assertIn("Connection refused", doc["problems"]["store"])


class RefusalTests(TestCase):
    """A file the gateway cannot take is never ended for the camera with CLOSE."""

    def test_a_full_spool_drops_the_connection_without_close(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        s = make_services(root, metadata=False)
        import dataclasses

        s.config = dataclasses.replace(s.config, min_free_bytes=10**18)  # "the disk is full"
        protocol, transport = connect(s)
        protocol.dataReceived(codec.init_packet(5, IMEI, PHOTOF))
        transport.clear()
        protocol.dataReceived(codec.start(3, 0))
        self.assertEqual(transport.value(), b"")  # no CLOSE, no RESUME
        self.assertTrue(transport.disconnecting)
        self.assertIn("min_free_bytes", s.health.problem(SPOOL))
