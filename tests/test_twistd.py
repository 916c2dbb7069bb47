"""The real ``twistd -n camgateway`` as a subprocess, with a scripted camera."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from camgateway.wire import codec
from camgateway.wire.codec import ServerFrameDecoder
from camgateway.wire.crc import crc16

IMEI = 356307042441013


def twistd() -> str:
    """The twistd next to this Python (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("twistd")
    return str(local) if local.exists() else shutil.which("twistd") or "twistd"


class Gateway:
    """A running ``twistd -n camgateway``; finds its port in its log."""

    started = 0

    def __init__(self, workdir: Path, *args: str, log: Path | None = None) -> None:
        """``log``: where the gateway logs, when its config says (else twistd's --logfile)."""
        Gateway.started += 1
        self.workdir = workdir
        twistd_log = workdir / f"twistd-{Gateway.started}.log"
        self.log = log or twistd_log
        self.process = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", "--logfile", str(twistd_log), "camgateway", *args],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self.port = self._wait_for(r"listening for cameras on .*port=(\d+)\)")
        except BaseException:  # never leave a gateway (and its workers) running behind a failed test
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
            raise

    def _wait_for(self, pattern: str, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text() if self.log.exists() else ""
            match = re.search(pattern, text)
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited {self.process.returncode}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"twistd did not log {pattern!r} in {timeout} s:\n{text}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal twistd; its exit status (twistd re-raises the signal it stopped on)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def stopped_cleanly(self) -> bool:
        """SIGTERM, then a clean shutdown: exit status -SIGTERM and the last log line."""
        return self.stop() == -signal.SIGTERM and "camgateway stopped" in self.log.read_text()


def sizes(folder: Path) -> list[int]:
    """The sizes of the files in ``folder`` (the gateway may remove one while they are read)."""
    out = []
    for path in folder.glob("*"):
        try:
            out.append(path.stat().st_size)
        except FileNotFoundError:
            pass
    return out


class Camera:
    """A DualCam device scripted over a blocking socket."""

    def __init__(self, port: int, imei: int = IMEI) -> None:
        self.imei = imei
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.decoder = ServerFrameDecoder()
        self.frames: list[tuple[int, bytes]] = []

    def expect(self, cmd: int) -> bytes:
        while not self.frames:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed while waiting for 0x{cmd:04x}")
            self.frames.extend(self.decoder.feed(chunk))
        got, payload = self.frames.pop(0)
        if got != cmd:
            raise AssertionError(f"expected 0x{cmd:04x}, got 0x{got:04x} {payload!r}")
        return payload

    def send_photo(self, content: bytes, *, drop_after: int | None = None, resume_from: int = 1,
                   hang: bool = False) -> None:
        """One photo; with ``drop_after`` stop after that many packets, and close unless ``hang``."""
        self.sock.sendall(codec.init_packet(5, self.imei, 0x44000400))
        self.expect(codec.Cmd.METADATA_REQUEST)
        self.sock.sendall(codec.metadata(b"\x01\x04" + (1730288105000).to_bytes(8, "big") + b"\x00\x00\x00"))
        self.expect(codec.Cmd.FILE_REQUEST)
        packets = (len(content) + 1023) // 1024
        self.sock.sendall(codec.start(packets, 0))
        position = int.from_bytes(self.expect(codec.Cmd.RESUME), "big")
        assert position == resume_from, (position, resume_from)
        crc = 0
        out = [codec.sync(position)]
        for n, i in enumerate(range((position - 1) * 1024, len(content), 1024)):
            if drop_after is not None and n == drop_after:
                self.sock.sendall(b"".join(out))
                if not hang:
                    self.sock.close()
                return
            crc = crc16(content[i : i + 1024], crc)
            out.append(codec.data(content[i : i + 1024], crc))
        self.sock.sendall(b"".join(out))
        self.expect(codec.Cmd.REPEAT_INIT)
        self.sock.sendall(codec.init_packet(5, self.imei, 0x40000400))
        self.expect(codec.Cmd.INIT)  # CLOSE
        self.sock.close()


class TwistdTests(TestCase):
    """``twistd -n --pidfile= camgateway --config ...`` receives files and stops cleanly."""

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.config = self.work / "camgateway.yaml"
        self.config.write_text(json.dumps({
            "listen": ["tcp:0:interface=127.0.0.1"],
            "storage": {"spool": "spool"},
            "sinks": [{"type": "disk", "root": "files"}],
            "timeouts": {"idle": 30, "metadata": 5},
        }))

    def stored(self, count: int = 1, timeout: float = 20.0) -> list[Path]:
        """The stored media files, once there are ``count`` (the outbox delivers asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(p for p in (self.work / "files").rglob("*")
                           if p.is_file() and p.suffix != ".json" and not p.name.startswith("."))
            if len(files) >= count or time.monotonic() > deadline:
                return files
            time.sleep(0.02)

    def test_receives_a_photo_and_stops_on_sigterm(self) -> None:
        gateway = Gateway(self.work, "--config", str(self.config))
        self.addCleanup(gateway.stop, signal.SIGKILL)
        content = b"\xff\xd8" + os.urandom(20_000) + b"\xff\xd9"
        Camera(gateway.port).send_photo(content)
        [stored] = self.stored()
        self.assertEqual(stored.read_bytes(), content)
        self.assertEqual(stored.parent.parent.name, str(IMEI))
        self.assertTrue(gateway.stopped_cleanly())

    def test_resumes_across_a_restart(self) -> None:
        content = os.urandom(30 * 1024 + 77)
        # (signal, the camera's link dropped before the signal?)
        for sig, dropped in ((signal.SIGTERM, True), (signal.SIGTERM, False), (signal.SIGKILL, True),
                             (signal.SIGKILL, False)):
            shutil.rmtree(self.work / "files", ignore_errors=True)
            gateway = Gateway(self.work, "--config", str(self.config))
            self.addCleanup(gateway.stop, signal.SIGKILL)
            camera = Camera(gateway.port)
            camera.send_photo(content, drop_after=12, hang=not dropped)
            spool = self.work / "spool" / "partials"
            deadline = time.monotonic() + 20
            while sum(sizes(spool)) < 12 * 1024:
                self.assertLess(time.monotonic(), deadline, "the gateway never wrote the 12 packets")
                time.sleep(0.02)
            gateway.stop(sig)
            camera.sock.close()
            gateway = Gateway(self.work, "--config", str(self.config))
            self.addCleanup(gateway.stop, signal.SIGKILL)
            Camera(gateway.port).send_photo(content, resume_from=13)
            [stored] = self.stored()
            self.assertEqual(stored.read_bytes(), content)
            sidecar = json.loads(stored.with_name(stored.name + ".json").read_text())
            self.assertEqual(sidecar["resumed_from"], 12 * 1024)
            deadline = time.monotonic() + 20
            while any(sizes(spool)) and time.monotonic() < deadline:
                time.sleep(0.02)  # the outbox's last step (the empty files are made ahead for new ones)
            self.assertTrue(gateway.stopped_cleanly())
            self.assertEqual(list(spool.iterdir()), [])  # a clean stop removes those too

    def test_defaults_without_config_say_where_files_go(self) -> None:
        gateway = Gateway(self.work, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(gateway.stop, signal.SIGKILL)
        text = gateway.log.read_text()
        self.assertIn("built-in defaults", text)
        self.assertIn(str(self.work / "camgateway-data" / "files"), text)
        self.assertTrue((self.work / "camgateway-data" / "spool" / "resume.sqlite").exists())
        self.assertTrue(gateway.stopped_cleanly())

    def test_bad_config_names_the_key(self) -> None:
        """One line per error on standard error, after which key; not twistd's whole usage text."""
        self.config.write_text("timeouts: {idle: -3}\n")
        result = subprocess.run([twistd(), "-n", "--pidfile=", "camgateway", "--config", str(self.config)],
                                cwd=self.work, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, "twistd camgateway: error: timeouts.idle: must be positive, got -3"
                                        " (see twistd camgateway --help)\n")
        self.config.write_text("timeouts: {idle: -3, step: soon}\nlisen: []\n")
        result = subprocess.run([twistd(), "-n", "--pidfile=", "camgateway", "--config", str(self.config)],
                                cwd=self.work, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual([line.split(":")[1] for line in result.stderr.splitlines()],
                         [" error"] * 3)
        self.assertEqual([line.split(": ")[2] for line in result.stderr.splitlines()],
                         ["lisen", "timeouts.idle", "timeouts.step"])
        self.assertTrue(result.stderr.endswith(" (see twistd camgateway --help)\n"))


class StartFailureTests(TestCase):
    """A gateway that cannot start exits 1 and says why in one line naming the key, without a traceback.

    What can be checked before the reactor runs is refused while twistd reads
    its options (on standard error, before anything is made); what fails once
    it runs (a port another process holds, a spool it may not write) is logged
    by the gateway, which stops.
    """

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.config = self.work / "camgateway.yaml"
        self.log = self.work / "twistd.log"

    def write(self, **doc: object) -> None:
        doc.setdefault("listen", ["tcp:0:interface=127.0.0.1"])
        doc.setdefault("storage", {"spool": "spool"})
        doc.setdefault("sinks", [{"type": "disk", "root": "files"}])
        self.config.write_text(json.dumps(doc))

    def run_twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``twistd -n camgateway`` until it exits (a gateway that started would run until the timeout)."""
        return subprocess.run([twistd(), "-n", "--pidfile=", "--logfile", str(self.log), *args, "camgateway",
                               "--config", str(self.config)], cwd=self.work, capture_output=True, text=True,
                              timeout=60)

    def assertRefused(self, key: str, *args: str) -> str:
        """twistd refused the configuration: exit 1, one line naming ``key`` on standard error, nothing made."""
        result = self.run_twistd(*args)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        [line] = result.stderr.splitlines()
        self.assertTrue(line.startswith(f"twistd camgateway: error: {key}: "), line)
        self.assertTrue(line.endswith(" (see twistd camgateway --help)"), line)
        self.assertFalse((self.work / "spool").exists())
        self.assertFalse(self.log.exists())  # refused before twistd started logging
        return line

    def assertFailedStart(self, key: str, *args: str, log: Path | None = None) -> str:
        """The gateway failed to start: exit 1, one line naming ``key`` in its log, no traceback, stopped."""
        result = self.run_twistd(*args)
        text = (log or self.log).read_text()
        self.assertEqual(result.returncode, 1, text)
        said = [line for line in text.splitlines() if "cannot start" in line]
        self.assertEqual(len(said), 1, text)
        self.assertIn(f"camgateway cannot start: {key}: ", said[0])
        self.assertNotIn("Traceback", text + result.stdout + result.stderr)
        self.assertIn("camgateway stopped", text)  # every service stopped, as on SIGTERM
        return said[0]

    def held_port(self) -> int:
        """A port on 127.0.0.1 another socket listens on (for the test's duration)."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        return int(holder.getsockname()[1])

    def test_camera_port_in_use(self) -> None:
        """The gateway's log is JSON here: still one record, its key, and no traceback."""
        port = self.held_port()
        self.write(listen=["tcp:0:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"],
                   log={"format": "json", "file": "gw.log"})
        line = self.assertFailedStart("listen[1]", log=self.work / "gw.log")
        record = json.loads(line)
        self.assertEqual((record["level"], record["key"]), ("critical", "listen[1]"))
        self.assertIn("Address already in use", record["message"])
        self.assertNotIn("traceback", record)

    def test_duplicate_listen_entry(self) -> None:
        self.write(listen=["tcp:5000:interface=127.0.0.1", "tcp:5000:interface=127.0.0.1"])
        self.assertIn("'tcp:5000:interface=127.0.0.1' is the address of listen[0] already",
                      self.assertRefused("listen[1]"))

    def test_status_port_in_use(self) -> None:
        """The status web service failing to listen fails the start: no gateway left running without it."""
        port = self.held_port()
        self.write(http={"listen": [f"tcp:{port}:interface=127.0.0.1"]})
        self.assertIn("Address already in use", self.assertFailedStart("http.listen[0]"))
        self.assertIn("listening for cameras", self.log.read_text())  # (the camera port had opened)

    def test_unusable_status_endpoint(self) -> None:
        self.write(http={"listen": ["tcp:8080:interface=127.0.0.1", "bogus:8081"]})
        self.assertIn("'bogus:8081' is not a usable endpoint", self.assertRefused("http.listen[1]"))
        self.write(http={"listen": ["tcp:99999:interface=127.0.0.1"]})
        self.assertIn("out of range", self.assertRefused("http.listen[0]"))

    def test_spool_under_a_regular_file(self) -> None:
        (self.work / "a-file").write_text("not a folder\n")
        self.write(storage={"spool": "a-file/spool"})
        self.assertIn(f"{self.work / 'a-file'} is a file", self.assertRefused("storage.spool"))

    def test_spool_without_permission(self) -> None:
        """Found out by the start itself: as the user twistd runs the gateway as (``--uid``, when root)."""
        locked = self.work / "locked"
        locked.mkdir()
        self.write(storage={"spool": str(locked / "spool")})
        args: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                nobody = pwd.getpwnam("nobody")
            except KeyError:
                raise SkipTest("running as root without a user nobody to run the gateway as") from None
            locked.chmod(0o700)  # root's: nobody may not look inside
            args = ["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)]
        else:
            locked.chmod(0o500)
            self.addCleanup(locked.chmod, 0o700)
        self.assertIn("Permission denied", self.assertFailedStart("storage.spool", *args))

    def test_log_file_in_a_missing_folder(self) -> None:
        self.write(log={"file": "missing/gw.log"})
        self.assertIn(f"the folder {self.work / 'missing'} does not exist", self.assertRefused("log.file"))

    def test_disk_sink_root_under_a_regular_file(self) -> None:
        (self.work / "a-file").write_text("not a folder\n")
        self.write(sinks=[{"type": "disk", "root": "a-file/files"}])
        self.assertIn(f"{self.work / 'a-file'} is a file", self.assertRefused("sinks[0].root"))


class CannotStartTests(TestCase):
    """The failure paths in memory: the status service fails the start; the reactor is stopped once."""

    def gateway(self, reactor: object) -> object:
        from camgateway.runtime.config import Config
        from camgateway.runtime.service import GatewayService

        return GatewayService(Config(listen=("tcp:0",)), reactor)

    def test_status_service_that_cannot_listen_fails_the_start(self) -> None:
        from twisted.internet.error import CannotListenError
        from twisted.internet.testing import MemoryReactorClock

        from camgateway.runtime.config import Config
        from camgateway.runtime.service import StartError
        from camgateway.web.service import StatusService

        class Refusing(MemoryReactorClock):
            def listenTCP(self, port: int, factory: object, backlog: int = 50,  # noqa: N802 - Twisted's name
                          interface: str = "") -> object:
                if port == 8081:
                    raise CannotListenError(interface, port, OSError(98, "Address already in use"))
                return super().listenTCP(port, factory, backlog, interface)

        reactor = Refusing()
        reactor.running = True
        told: list[object] = []

        class Gateway:
            ready: object = None
            services = None  # (not started: no figures to serve)

            def cannot_start(self, failure: object) -> None:
                told.append(failure)

        from twisted.internet import defer

        gateway = Gateway()
        gateway.ready = defer.Deferred()
        status = StatusService(gateway, Config(http_listen=("tcp:8080", "tcp:8081")), reactor)
        status.startService()
        outcome: list[object] = []
        gateway.ready.addBoth(outcome.append)
        gateway.ready.callback([])
        [failure] = told
        self.assertIs(outcome[0], failure)
        self.assertIsInstance(failure.value, StartError)
        self.assertEqual(failure.value.key, "http.listen[1]")
        self.assertEqual(str(failure.value), "http.listen[1]: status web service: cannot listen on 'tcp:8081':"
                                             " Address already in use")
        self.assertEqual(len(status.ports), 1)  # the one it opened: closed by stopService
        status.stopService()

    def test_the_reactor_is_stopped_once(self) -> None:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.python.failure import Failure

        from camgateway.runtime.service import StartError

        reactor = MemoryReactorClock()
        gateway = self.gateway(reactor)
        gateway.cannot_start(Failure(StartError("listen[0]", "cannot listen")))  # before the reactor runs
        self.assertEqual(reactor.whenRunningHooks, [(reactor.stop, (), {})])
        reactor = MemoryReactorClock()
        reactor.running = True
        gateway = self.gateway(reactor)
        gateway.cannot_start(Failure(StartError("listen[0]", "cannot listen")))
        gateway.cannot_start(Failure(StartError("http.listen[0]", "cannot listen")))
        self.assertTrue(reactor.hasStopped)
        self.assertEqual(gateway.start_failure.value.key, "listen[0]")
