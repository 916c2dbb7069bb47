"""Two real ``twistd camgateway`` instances behind a real HAProxy, sharing Redis and a spool.

Everything runs as separate processes (redis-server, haproxy, two twistd), the
camera is a blocking socket client: this is the deployment of
docs/operations.md "Several instances", on loopback. Also: instances whose spools are not
the same folder, the orphan sweep, and ``etc/haproxy.cfg`` under a limit of
20,000 open files.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, TestCase

from camgateway.transfer.journal import Note
from camgateway.delivery.outbox import OutboxEntry
from camgateway.storage.records import Partial
from camgateway.delivery.sinks import ReceivedFile
from tests.support import poll
from tests.test_redis_store import SERVER, SKIP_REDIS
from tests.test_twistd import Camera, Gateway

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class HAProxy:
    """haproxy in front of the instances: TCP mode, PROXY v2, health checks on /healthz."""

    def __init__(self, work: Path, servers: dict[str, tuple[int, int]]) -> None:
        self.port = free_port()
        import tempfile

        self.socket_dir = tempfile.mkdtemp(prefix="cgw-")  # unix socket paths are short
        self.socket = Path(self.socket_dir) / "haproxy.sock"
        lines = [
            "global", f"    stats socket {self.socket} mode 600 level admin",
            "defaults", "    mode tcp", "    timeout connect 2s", "    timeout client 60s", "    timeout server 60s",
            "    retries 2", "    option redispatch",
            "frontend cameras", f"    bind 127.0.0.1:{self.port}", "    default_backend gateways",
            "backend gateways", "    balance first", "    option httpchk GET /healthz",
        ]
        for name, (port, check) in servers.items():
            lines.append(f"    server {name} 127.0.0.1:{port} send-proxy-v2 check port {check} inter 500 fall 2 rise 1")
        config = work / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdin=subprocess.DEVNULL,
                                        stdout=open(work / "haproxy.log", "wb"), stderr=subprocess.STDOUT)
        wait(lambda: self.socket.exists() or self.process.poll() is not None, what="haproxy's stats socket")
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited: {(work / 'haproxy.log').read_text()}")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            return s.makefile().read()

    def up(self, name: str) -> bool:
        return any(row.startswith(f"gateways,{name},") and ",UP," in row for row in self.command("show stat").splitlines())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


class Collector(http.server.BaseHTTPRequestHandler):
    """An HTTP endpoint: the first POST hangs (until released), the others get 200."""

    posts: list[bytes] = []
    hang = threading.Event()

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        first = not Collector.posts
        Collector.posts.append(body)
        if first:
            Collector.hang.wait(60)
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


class ScaleOutTests(TestCase):
    """A camera moving between instances resumes; one session per camera; a dead instance's deliveries go on."""

    timeout = 180

    def setUp(self) -> None:
        if SKIP_REDIS:
            raise SkipTest(SKIP_REDIS)
        if HAPROXY is None:
            raise SkipTest("haproxy is not installed (apt-get install haproxy)")
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.redis = SERVER.url().rsplit("/", 1)[0] + "/0"
        self.prefix_db = f"{self.redis}"
        import redis

        redis.Redis.from_url(self.redis).flushdb()

    def gateway(self, name: str, port: int, http: int, sinks: list[dict[str, Any]] | None = None) -> Gateway:
        config = self.work / f"{name}.yaml"
        config.write_text(json.dumps({
            "listen": [f"haproxy:tcp:{port}:interface=127.0.0.1"],
            "http": {"listen": [f"tcp:{http}:interface=127.0.0.1"]},
            "storage": {"spool": str(self.work / "spool"), "resume": self.redis, "instance": name, "lease_ttl": 10},
            "sinks": sinks or [{"type": "disk", "root": str(self.work / "files")}],
            "outbox": {"claim_ttl": 3},
            "timeouts": {"idle": 30, "metadata": 2},
        }))
        workdir = self.work / name
        workdir.mkdir(exist_ok=True)
        gateway = Gateway(workdir, "--config", str(config))
        self.addCleanup(gateway.stop, signal.SIGKILL)
        return gateway

    def pair(self, **kw: Any) -> tuple[Gateway, Gateway, HAProxy]:
        ports = {name: (free_port(), free_port()) for name in ("a", "b")}
        a = self.gateway("a", *ports["a"], **kw)
        b = self.gateway("b", *ports["b"], **kw)
        proxy = HAProxy(self.work, ports)
        self.addCleanup(proxy.stop)
        wait(lambda: proxy.up("a") and proxy.up("b"), what="both instances healthy in haproxy")
        return a, b, proxy

    def stored(self) -> list[Path]:
        return sorted(p for p in (self.work / "files").rglob("*") if p.is_file() and p.suffix != ".json"
                      and not p.name.startswith("."))

    def test_resume_on_the_other_instance(self) -> None:
        a, b, proxy = self.pair()
        content = os.urandom(30 * 1024 + 123)
        camera = Camera(proxy.port)
        source_port = camera.sock.getsockname()[1]
        camera.send_photo(content, drop_after=12)
        a._wait_for(r"connection lost during %photof at (\d+)")
        self.assertIn(f"connected from 127.0.0.1:{source_port}", a.log.read_text())  # PROXY v2: the camera's address
        proxy.command("set server gateways/a state maint")
        Camera(proxy.port).send_photo(content, resume_from=13)  # lands on b
        [stored] = wait(self.stored, what="the file stored")
        self.assertEqual(stored.read_bytes(), content)
        self.assertEqual(json.loads(stored.with_name(stored.name + ".json").read_text())["resumed_from"], 12 * 1024)
        self.assertIn("resuming %photof at 13", b.log.read_text())

    def test_one_session_per_camera(self) -> None:
        a, b, proxy = self.pair()
        content = os.urandom(20 * 1024)
        first = Camera(proxy.port)
        first.send_photo(content, drop_after=8, hang=True)  # on a, still connected
        wait(lambda: "resuming" not in a.log.read_text() and (self.work / "spool" / "partials").exists()
             and any(p.stat().st_size >= 8 * 1024 for p in (self.work / "spool" / "partials").iterdir()),
             what="a holding 8 packets")
        proxy.command("set server gateways/a state maint")
        second = Camera(proxy.port)  # the same camera again, now on b
        second.send_photo(content, resume_from=9)
        first.sock.settimeout(10)
        self.assertEqual(first.sock.recv(100), b"")  # a closed its session
        [stored] = wait(self.stored, what="the file stored")
        self.assertEqual(stored.read_bytes(), content)
        self.assertIn("asking it to let go", b.log.read_text())
        self.assertIn("another gateway instance took the camera over", a.log.read_text())

    def test_instance_killed_mid_delivery_delivers_once(self) -> None:
        Collector.posts = []
        Collector.hang.clear()
        self.addCleanup(Collector.hang.set)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.shutdown)
        url = f"http://127.0.0.1:{server.server_address[1]}/files/{{name}}"
        a, b, proxy = self.pair(sinks=[{"type": "http", "url": url, "timeout": 120}])
        proxy.command("set server gateways/b state maint")  # the camera lands on a
        content = b"\xff\xd8" + os.urandom(9000) + b"\xff\xd9"
        Camera(proxy.port).send_photo(content)
        wait(lambda: Collector.posts, what="a's delivery to start")
        a.stop(signal.SIGKILL)  # dies while the endpoint holds its request
        wait(lambda: len(Collector.posts) >= 2, timeout=60, what="b to take the delivery over")
        time.sleep(1.0)  # nothing more arrives
        self.assertEqual(len(Collector.posts), 2)  # a's (never answered) and b's (200)
        self.assertIn(content, Collector.posts[1])
        self.assertIn("file delivered to every sink", b.log.read_text())


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    """GET /healthz of the status service on ``port``: (status code, JSON body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(port: int, sample: str) -> float:
    """The value of ``sample`` (a metric's name and labels as written) in /metrics on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {sample} in /metrics")


def received(path: Path, imei: str = "356307042441013") -> ReceivedFile:
    """The record of a photo held at ``path``."""
    data = path.read_bytes()
    return ReceivedFile(
        path=path, imei=imei, peer="127.0.0.1:40000", protocol_id=5, camera="dualcam", flow="dualcam",
        source="photof", identifier=b"%photof", media="photo", metadata={}, size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), start_total=1, start_crc=0, computed_crc=0,
        received_at=datetime.datetime.now(datetime.timezone.utc), capture_time=None, resumed_from=0, crc_errors=0,
        id="f" * 32)


class SeveralSpoolsTests(TestCase):
    """Real instances on one Redis (no HAProxy: cameras are not needed).

    Spools that are not the same folder are reported, a delivery goes to the
    instance that has its file, orphan spool files are swept.
    """

    timeout = 120

    def setUp(self) -> None:
        if SKIP_REDIS:
            raise SkipTest(SKIP_REDIS)
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.redis = SERVER.url()
        import redis

        self.client = redis.Redis.from_url(self.redis, decode_responses=True)
        self.client.flushdb()
        self.addCleanup(self.client.close)

    def gateway(self, name: str, spool: str, **storage: Any) -> tuple[Gateway, int]:
        """A twistd instance with its own spool folder ``spool``; its status service's port."""
        http = free_port()
        config = self.work / f"{name}.yaml"
        config.write_text(json.dumps({
            "listen": ["tcp:0:interface=127.0.0.1"],
            "http": {"listen": [f"tcp:{http}:interface=127.0.0.1"]},
            "storage": {"spool": str(self.work / spool), "resume": self.redis, "instance": name, "lease_ttl": 2,
                        **storage},
            "sinks": [{"type": "disk", "root": str(self.work / "files")}],
            "outbox": {"claim_ttl": 3},
        }))
        workdir = self.work / name
        workdir.mkdir(exist_ok=True)
        gateway = Gateway(workdir, "--config", str(config))
        self.addCleanup(gateway.stop)
        return gateway, http

    def store(self) -> Any:
        from camgateway.storage.redis import RedisStore

        store = RedisStore(self.redis, instance="test")
        self.addCleanup(store.close)
        return store

    def test_spools_not_shared_are_reported_loudly(self) -> None:
        a, a_http = self.gateway("a", "spool-a")
        b, b_http = self.gateway("b", "spool-b")  # a runs already: b sees at once that a's marker is missing
        line = wait(lambda: re.search(r".*is not shared.*", b.log.read_text()), what="b's error")[0]
        self.assertIn(f"the spool {self.work / 'spool-b'} is not shared with instance a (spool"
                      f" {self.work / 'spool-a'}", line)
        self.assertIn("#error", line)
        code, body = healthz(b_http)
        # Said, but the check passes: a balancer taking every instance out would stop all cameras.
        self.assertEqual((code, body["status"]), (200, "degraded"))
        self.assertIn("not shared with instance a", body["warnings"]["shared_spool"])
        line = wait(lambda: re.search(r".*is not shared.*", a.log.read_text()), what="a's error")[0]
        self.assertIn(f"not shared with instance b (spool {self.work / 'spool-b'}", line)  # at a's next check
        wait(lambda: "shared_spool" in healthz(a_http)[1].get("warnings", {}), what="a's /healthz warning")
        self.assertTrue((self.work / "spool-a" / "instances" / "a").is_file())

    def test_a_shared_spool_is_quiet(self) -> None:
        a, a_http = self.gateway("a", "spool")
        b, b_http = self.gateway("b", "spool")
        wait(lambda: "shared with instance b" in a.log.read_text() and "shared with instance a" in b.log.read_text(),
             what="both instances seeing each other's marker")
        for gateway, port in ((a, a_http), (b, b_http)):
            self.assertNotIn("not shared", gateway.log.read_text())
            self.assertEqual(healthz(port)[0], 200)
        self.assertEqual(sorted(p.name for p in (self.work / "spool" / "instances").iterdir()), ["a", "b"])
        self.assertTrue(b.stopped_cleanly())
        self.assertEqual(sorted(p.name for p in (self.work / "spool" / "instances").iterdir()), ["a"])

    @defer.inlineCallbacks
    def test_an_entry_whose_file_another_instance_has_is_delivered_by_it_without_backoff(self) -> Any:
        a, a_http = self.gateway("a", "spool-a")
        b, b_http = self.gateway("b", "spool-b")
        path = self.work / "spool-a" / "partials" / "photo.part"
        content = b"\xff\xd8" + os.urandom(5000) + b"\xff\xd9"
        path.write_bytes(content)
        photo = received(path)
        now = time.time()
        entry = OutboxEntry(photo.id, path.name, 0, 0, now, None, photo.to_record(), now)
        self.client.set(f"camgateway:claim:{entry.id}", "b", px=60_000)  # b claims it first
        yield self.store().enqueue(entry, None)
        [stored] = yield poll(lambda: list((self.work / "files").rglob("*.jpg")), what="a delivering it")
        self.assertEqual(stored.read_bytes(), content)
        self.assertEqual(metric(a_http, 'camgateway_sink_deliveries_total{sink="disk"}'), 1)
        self.assertEqual(metric(b_http, 'camgateway_sink_deliveries_total{sink="disk"}'), 0)
        self.assertEqual(metric(b_http, "camgateway_delivery_failures_total"), 0)  # no attempt, no backoff
        self.assertEqual(metric(a_http, "camgateway_delivery_failures_total"), 0)
        b_log = yield poll(lambda: (lambda text: "spool file photo.part is not in this instance's spool: is the"
                                    " spool shared?" in text and text)(b.log.read_text()), what="b's log line")
        self.assertEqual(b_log.count("is not in this instance's spool"), 1)

    @defer.inlineCallbacks
    def test_orphan_spool_files_are_swept(self) -> Any:
        # lease_ttl 2 s and claim_ttl 3 s: orphans are files unchanged for 6 s; partial_ttl: a sweep every 2 s.
        gateway, _ = self.gateway("a", "spool", partial_ttl=8)
        partials = self.work / "spool" / "partials"
        store = self.store()
        far = time.time() + 3600
        yield store.add(Partial("p1", "356307042441013", "dualcam", b"%photof", 10, 0, None, 1024, "boot",
                                "partial.part", far, far))
        (self.work / "photo.jpg").write_bytes(b"\xff\xd8\xff\xd9")
        record = received(self.work / "photo.jpg").to_record()
        yield store.enqueue(OutboxEntry("e1", "entry.part", 0, 0, far, None, record, far), None)
        notes = self.work / "spool" / "finished" / "gone-instance"
        notes.mkdir(parents=True)
        note = Note(OutboxEntry("e2", "noted.part", 0, 0, far, None, record, far), None, "the store is down")
        (notes / "e2.json").write_bytes(note.to_json())
        for name in ("orphan.part", "partial.part", "entry.part", "noted.part"):
            (partials / name).write_bytes(b"x" * 100)
        match = yield poll(lambda: re.search(r".*orphan spool files removed.*", gateway.log.read_text()),
                           timeout=60, what="the orphan sweep")
        self.assertIn("1 orphan spool files removed", match[0])
        self.assertEqual(sorted(p.name for p in partials.iterdir()), ["entry.part", "noted.part", "partial.part"])
        self.assertTrue((notes / "e2.json").exists())


class HAProxyConfigTests(TestCase):
    """``etc/haproxy.cfg`` runs where at most 20,000 files may be open.

    ``haproxy -c`` accepts a ``maxconn`` that needs more open files than the
    limit allows (it does not check the limit): only starting it tells.
    """

    def test_the_sample_config_starts_with_20000_open_files(self) -> None:
        if HAPROXY is None:
            raise SkipTest("haproxy is not installed (apt-get install haproxy)")
        if subprocess.run(["bash", "-c", "ulimit -n 20000"]).returncode:
            raise SkipTest("cannot set an open-files limit of 20000 here (hard limit lower)")
        folder = Path(tempfile.mkdtemp(prefix="cgw-"))  # unix socket paths are short
        self.addCleanup(shutil.rmtree, folder, True)
        text = (REPO / "etc" / "haproxy.cfg").read_text()
        local = text.replace("/run/haproxy/admin.sock", str(folder / "admin.sock"))
        local = local.replace("bind :5000", f"bind 127.0.0.1:{free_port()}")
        local = re.sub(r"10\.0\.0\.\d+", "127.0.0.1", local)  # the instances: none there, checks fail quietly
        self.assertEqual(local.count(str(folder)) + local.count("bind 127.0.0.1") + local.count("127.0.0.1:5000"),
                         1 + 1 + 2, "etc/haproxy.cfg changed: update this test's substitutions")
        config = folder / "haproxy.cfg"
        config.write_text(local)
        limited = 'ulimit -n 20000 && exec "$0" "$@"'
        check = subprocess.run(["bash", "-c", limited, HAPROXY, "-c", "-f", str(config)], capture_output=True)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        output = folder / "haproxy.out"
        process = subprocess.Popen(["bash", "-c", limited, HAPROXY, "-db", "-f", str(config)],
                                   stdin=subprocess.DEVNULL, stdout=open(output, "wb"), stderr=subprocess.STDOUT)
        self.addCleanup(lambda: process.poll() is None and (process.terminate(), process.wait(10)))

        def info() -> Any:
            if process.poll() is not None:
                raise AssertionError(f"haproxy exited {process.returncode}: {output.read_text()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(folder / "admin.sock"))
                    s.sendall(b"show info\n")
                    return dict(line.split(": ", 1) for line in s.makefile().read().splitlines() if ": " in line)
            except OSError:
                return None

        shown = wait(info, what="haproxy running")
        self.assertLessEqual(int(shown["Ulimit-n"]), 20000)
        self.assertGreaterEqual(int(shown["Maxconn"]), 9000)
