"""Two real ``twistd camgateway`` instances behind a real HAProxy, sharing Redis and a spool.

Everything runs as separate processes (redis-server, haproxy, two twistd), the
camera is a blocking socket client: this is the deployment of README
"Running several instances", on loopback.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.test_redis_store import SERVER, SKIP_REDIS
from tests.test_twistd import Camera, Gateway

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


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
