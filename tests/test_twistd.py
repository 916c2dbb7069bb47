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

from twisted.trial.unittest import TestCase

from camgateway import codec
from camgateway.codec import ServerFrameDecoder
from camgateway.crc import crc16

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
        self.config.write_text("timeouts: {idle: -3}\n")
        result = subprocess.run([twistd(), "-n", "--pidfile=", "camgateway", "--config", str(self.config)],
                                cwd=self.work, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("timeouts.idle", result.stdout + result.stderr)
