"""The status API's failures an operator acts on: dead letters with their retry, and refused cameras."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from camgateway.delivery.dead_letters import dead_letters
from camgateway.delivery.outbox import write_dead_letter
from camgateway.delivery.sinks import PermanentFailure
from camgateway.storage.records import OutboxEntry
from camgateway.web.merge import merge_list, merge_summary
from camgateway.web.status import StatusRoot, StatusSite
from camgateway.wire.codec import init_packet
from tests.support import connect, make_services
from tests.test_metrics import received_file
from tests.test_outbox import Recorder

TOKEN = "s3cret-token-for-the-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
RETRY = {**BEARER, "X-Camgateway": "retry"}


class StatusCase(TestCase):
    """A status site with a token on loopback, over services on a Clock."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.s = make_services(self.root, allow=frozenset({"352093080000001"}))
        gateway = SimpleNamespace(services=self.s, ports=[], reactor=reactor, factory=None, workers=None)
        port = reactor.listenTCP(0, StatusSite(StatusRoot(gateway, TOKEN, None)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}/"

    @defer.inlineCallbacks
    def call(self, method: str, path: str, headers: Optional[dict[str, str]] = None) -> Any:
        """(code, headers, decoded JSON body) of a request."""
        raw = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
        response = yield Agent(reactor).request(method.encode(), (self.base + path).encode(), raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            body = yield readBody(response)
        return response.code, response.headers, json.loads(body) if body else None


class DeadLetterTests(StatusCase):
    """``/api/dead-letters`` lists them; ``POST /api/dead-letters/<id>/retry`` sends one to its sink again."""

    def setUp(self) -> None:
        super().setUp()
        self.refusing = Recorder("http:upstream", [PermanentFailure("HTTP 400: not a photo")])
        self.next_one = Recorder("disk")
        self.s.sinks = [self.refusing, self.next_one]
        self.received = received_file(self.s, b"the photo")
        self.s.outbox.add(self.received, None)
        self.assertEqual(self.next_one.got, [b"the photo"])  # it went on
        [self.letter] = dead_letters(self.s.spool)

    @defer.inlineCallbacks
    def test_listed_and_retried_to_the_sink_that_refused_it(self) -> Any:
        code, _, listed = yield self.call("GET", "api/dead-letters", BEARER)
        self.assertEqual(code, 200)
        [view] = listed
        self.assertEqual(view, {
            "id": self.letter["id"], "file_id": self.letter["entry"]["id"], "imei": "1", "file": "%photof",
            "source": "photof", "sink": "http:upstream", "reason": "HTTP 400: not a photo",
            "time": "1970-01-01T00:00:00.000Z", "size": 9, "sha256": self.received.sha256, "attempts": 1})
        code, _, summary = yield self.call("GET", "api/summary", BEARER)
        self.assertEqual(summary["dead_letters"], 1)

        code, _, body = yield self.call("POST", f"api/dead-letters/{self.letter['id']}/retry", RETRY)
        self.assertEqual((code, body), (200, {"retried": self.letter["id"]}))
        self.s.clock.advance(5)
        self.assertEqual(self.refusing.got, [b"the photo"])  # delivered to the sink that refused it
        self.assertEqual(self.next_one.got, [b"the photo"])  # and to no other: that one had it
        self.assertEqual(self.refusing.ids, [self.letter["entry"]["id"]] * 2)  # under the file's id
        self.assertEqual((self.s.store.outbox, self.s.spool.names()), ({}, set()))
        code, _, listed = yield self.call("GET", "api/dead-letters", BEARER)
        self.assertEqual((code, listed), (200, []))

        code, _, body = yield self.call("POST", f"api/dead-letters/{self.letter['id']}/retry", RETRY)
        self.assertEqual(code, 409)
        self.assertIn("was retried at 1970-01-01T00:00:00.000Z", body["error"])

    @defer.inlineCallbacks
    def test_what_a_retry_needs(self) -> Any:
        path = f"api/dead-letters/{self.letter['id']}/retry"
        code, headers, _ = yield self.call("POST", path, {"X-Camgateway": "retry"})
        self.assertEqual(code, 401)  # the token
        for header in ({}, {"X-Camgateway": "yes"}):  # the header a cross-site form cannot send
            code, _, body = yield self.call("POST", path, {**BEARER, **header})
            self.assertEqual(code, 403)
            self.assertIn("X-Camgateway: retry", body["error"])
        for method in ("GET", "HEAD", "PUT"):
            code, headers, _ = yield self.call(method, path, RETRY)
            self.assertEqual(code, 405, method)
        code, headers, _ = yield self.call("GET", path, RETRY)
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"POST"])
        for other in ("api/files", "api/dead-letters", f"api/dead-letters/{self.letter['id']}", "api/summary/retry",
                      f"files/{self.letter['id']}/retry"):
            code, _, _ = yield self.call("POST", other, RETRY)
            self.assertEqual(code, 405, other)
        for unknown in ("nothing-0", "..", ".hidden", "a%2F..%2F..%2Fetc"):
            code, _, body = yield self.call("POST", f"api/dead-letters/{unknown}/retry", RETRY)
            self.assertEqual(code, 404, unknown)
            self.assertIn("no dead letter", body["error"])
        code, _, _ = yield self.call("POST", f"api/dead-letters/{self.letter['id']}/retry/x", RETRY)
        self.assertEqual(code, 405)
        self.assertEqual((self.refusing.got, len(dead_letters(self.s.spool))), ([], 1))  # nothing retried

    @defer.inlineCallbacks
    def test_a_letter_that_cannot_be_retried_is_a_409_and_kept(self) -> Any:
        entry = OutboxEntry("lost", "gone.part", 0, 0, 0.0, None, self.received.to_record(), 0.0)
        write_dead_letter(str(self.s.spool.dead), entry, None, "http:upstream", "no instance has the file", 1.0)
        self.s.sinks = [Recorder("http:elsewhere"), self.next_one]
        for letter, why in (("lost-0", "its file was lost"), (self.letter["id"], "which the configuration no longer has")):
            code, _, body = yield self.call("POST", f"api/dead-letters/{letter}/retry", RETRY)
            self.assertEqual(code, 409, letter)
            self.assertIn(why, body["error"])
        code, _, listed = yield self.call("GET", "api/dead-letters", BEARER)
        self.assertEqual([v["id"] for v in listed], ["lost-0", self.letter["id"]])  # newest first, both kept
        self.assertEqual(self.s.store.outbox, {})


class RefusedCameraTests(StatusCase):
    """``/api/refused``: the cameras ``devices.allow`` refused, with counts."""

    @defer.inlineCallbacks
    def test_refused_cameras_with_counts(self) -> Any:
        for imei, peer, at in ((352093080000009, "10.0.0.7", 10), (352093080000009, "10.0.0.8", 20),
                               (352093080000002, "10.0.0.9", 30), (352093080000001, "10.0.0.1", 40)):
            self.s.clock.advance(at - self.s.clock.seconds())
            protocol, transport = connect(self.s, peer)
            protocol.dataReceived(init_packet(5, imei, 0))
            protocol.connectionLost(None)
        code, _, refused = yield self.call("GET", "api/refused", BEARER)
        self.assertEqual(code, 200)
        self.assertEqual(refused, [
            {"imei": "352093080000002", "peer": "10.0.0.9:40000", "count": 1, "last_at": "1970-01-01T00:00:30.000Z"},
            {"imei": "352093080000009", "peer": "10.0.0.8:40000", "count": 2, "last_at": "1970-01-01T00:00:20.000Z"},
        ])
        code, _, summary = yield self.call("GET", "api/summary", BEARER)
        self.assertEqual((summary["refused"], summary["dead_letters"]), (2, 0))
        code, _, _ = yield self.call("GET", "api/refused")
        self.assertEqual(code, 401)

    def test_merged_over_workers(self) -> None:
        one = [{"imei": "1", "peer": "a", "count": 3, "last_at": "1970-01-01T00:00:30.000Z"}]
        two = [{"imei": "2", "peer": "b", "count": 1, "last_at": "1970-01-01T00:00:50.000Z"}]
        self.assertEqual(merge_list("refused", [one, two]), two + one)
        merged = merge_summary({"refused": 1, "dead_letters": 4, "stats": {}}, [{"refused": 2, "dead_letters": 4}])
        self.assertEqual((merged["refused"], merged["dead_letters"]), (3, 4))  # one dead-letter folder
