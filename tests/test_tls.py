"""TLS: cameras over an ``ssl:`` endpoint with a certificate made in the test, and the status service over HTTPS."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import clientFromString
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from camgateway.sim import CameraSpec, ContentPool
from tests.ops_support import OpsTestCase, get_json, http_get, jpeg_camera, self_signed, tiny_jpeg
from tests.test_integration import camera


class TLSTests(OpsTestCase):
    """The emulator connects with ``tls:…:trustRoots=DIR`` and verifies the gateway's certificate."""

    def setUp(self) -> None:
        self.certs = Path(self.mktemp()).resolve()
        self.key, self.cert = self_signed(self.certs)

    def ssl_endpoint(self) -> str:
        return f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"

    def endpoint(self, spec: CameraSpec) -> Any:
        return clientFromString(reactor, f"tls:host=127.0.0.1:port={self.port}:trustRoots={self.certs}")

    @defer.inlineCallbacks
    def test_files_arrive_over_tls(self) -> Any:
        yield self.start_ops(listen=(self.ssl_endpoint(),), http_listen=(self.ssl_endpoint(),))
        rng = random.Random(31)
        pool = ContentPool(rng, variants=2)
        specs = [jpeg_camera(0, tiny_jpeg(), b"PTMF" + rng.randbytes(40_000)),
                 camera(1, "dsm", rng, pool, photos=1, videos=1, video_size=200_000)]
        results = yield self.cameras(specs)
        self.assertEqual([r.imei for r in results if not r.ok], [])
        self.assertEqual(self.stored(), self.expected(specs))
        self.assertEqual(self.gateway.services.stats.protocol_errors, 0)

        # the status service on an ssl: endpoint too, checked against the same certificate
        trust = ssl.Certificate.loadPEM(self.cert.read_bytes())
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
        base = f"https://127.0.0.1:{self.top.status.ports[0].getHost().port}/"
        code, _, body = yield http_get(base + "healthz", agent=agent)
        self.assertEqual(code, 200)
        code, _, listing = yield http_get(base + "api/files", agent=agent)
        self.assertEqual(code, 200)
        self.assertEqual(len(json.loads(listing)), 4)

    @defer.inlineCallbacks
    def test_a_camera_that_does_not_trust_the_certificate_gets_nothing_through(self) -> Any:
        yield self.start_ops(listen=(self.ssl_endpoint(),))
        other = Path(self.mktemp()).resolve()
        self_signed(other)  # another certificate: verification fails
        self.endpoint = lambda spec: clientFromString(  # type: ignore[method-assign]
            reactor, f"tls:host=127.0.0.1:port={self.port}:trustRoots={other}")
        results = yield self.cameras([jpeg_camera(0, tiny_jpeg())], reconnect=False)
        self.assertFalse(results[0].ok)
        self.assertEqual(self.stored(), {})
        self.assertEqual((yield get_json(self.url("api/files"))), [])
