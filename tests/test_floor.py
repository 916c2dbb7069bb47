"""The benchmark's floor (``benchmarks/floor.py``) as the benchmark runs it: a process of its own.

Its figures divide every gateway figure, and a reviewer drives it with an
independent load generator, so it must complete any file a camera sends,
whatever its size, with the gateway's own round trips.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from camgateway.wire import codec
from tests.support import NO_VECTORS, VECTORS, capture_stream

FLOOR = Path(__file__).resolve().parents[1] / "benchmarks" / "floor.py"


class Floor:
    """A running ``benchmarks/floor.py`` on a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process = subprocess.Popen([sys.executable, str(FLOOR), "--port", "0", "--root", str(root)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"floor listening on .*port=(\d+)\)", line)
        if match is None:
            self.stop()
            raise AssertionError(f"the floor did not start: {line!r}")
        self.port = int(match.group(1))

    def stop(self) -> str:
        """SIGTERM; what it printed after its first line."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=30)
        return out

    def files(self) -> dict[str, bytes]:
        """Each connection's file, by name."""
        return {p.name: p.read_bytes() for p in sorted(self.root.glob("*.bin"))}


def receive_until(sock: socket.socket, want: bytes | None, timeout: float = 15.0) -> bytes:
    """Read from ``sock`` until what arrived ends with ``want``, or (``want`` None) until the peer closes."""
    got = b""
    deadline = time.monotonic() + timeout
    while want is None or not got.endswith(want):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"waited {timeout} s for {want!r}; got {got.hex()}") from None
        if not chunk:
            if want is None:
                break
            raise AssertionError(f"closed before {want.hex()}; got {got.hex()}")
        got += chunk
    return got


class FloorTests(TestCase):
    """Files of every size complete, with the bytes and answers of a camera session."""

    def setUp(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        self.floor = Floor(root)
        self.addCleanup(self.floor.stop)

    def test_emulated_cameras_of_any_size(self) -> None:
        """Sizes that are not whole 1024-byte packets, DualCam and path-flow cameras: every file acknowledged."""
        run = subprocess.run(
            [sys.executable, "-m", "camgateway.sim", "-c", f"tcp:127.0.0.1:{self.floor.port}", "-n", "4",
             "-k", "mixed", "--photos", "2", "--videos", "1", "--photo-size", "30001", "--video-size", "100001",
             "--idle-timeout", "10", "--no-reconnect", "-q", "--json"],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        results = json.loads(run.stdout[run.stdout.index("\n[") + 1:])
        self.assertEqual(len(results), 4)
        for r in results:
            self.assertEqual(sorted(size for _, size in r["delivered"]), [30001, 30001, 100001], r)
        # Each connection's file holds exactly the bytes its camera sent.
        self.assertEqual(sorted(len(data) for data in self.floor.files().values()),
                         sorted(r["bytes_sent"] for r in results))
        # 4 cameras x (2 x 30,001 + 100,001) bytes of their own, without frame headers and CRCs.
        self.assertIn("4 connections, 12 files, 640012 file bytes", self.floor.stop())

    def test_one_byte_files(self) -> None:
        """A file of one packet: the floor reads its only frame's header at once."""
        run = subprocess.run(
            [sys.executable, "-m", "camgateway.sim", "-c", f"tcp:127.0.0.1:{self.floor.port}", "-n", "1",
             "--photos", "1", "--videos", "1", "--photo-size", "1", "--video-size", "1024",
             "--idle-timeout", "10", "--no-reconnect", "-q"],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        self.assertIn("1 connections, 2 files, 1025 file bytes", self.floor.stop())

    def replay(self, stream: bytes, last_frame: int) -> tuple[bytes, bytes]:
        """A camera's stream, sent as the camera does: the file, then (once acknowledged) its last init.

        The file goes in two writes a moment apart, cut inside the header of
        its last frame (``last_frame`` bytes long), which the floor reads.
        """
        file_part, last_init = stream[:-16], stream[-16:]
        cut = len(file_part) - last_frame + 2
        with socket.create_connection(("127.0.0.1", self.floor.port), timeout=15) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(file_part[:cut])
            time.sleep(0.2)
            sock.sendall(file_part[cut:])
            replies = receive_until(sock, codec.repeat_init())
            sock.sendall(last_init)
            replies += receive_until(sock, None)
        return stream, replies

    def test_last_frame_header_cut(self) -> None:
        """A DualCam file whose last frame's header arrives in two reads: the floor waits for the rest."""
        for n, size in enumerate((1, 1025, 3000, 2048)):
            imei = 352093080000100 + n
            content = bytes(i % 251 for i in range(size))
            packets = [content[i : i + 1024] for i in range(0, size, 1024)]
            stream = (codec.init_packet(5, imei, 0x04000400) + codec.metadata(b"\x03" + bytes(31))
                      + codec.start(len(packets)) + codec.sync(1)
                      + b"".join(codec.data(p, 0) for p in packets)  # (the floor checks no CRC)
                      + codec.init_packet(5, imei, 0x40000400))
            sent, replies = self.replay(stream, 4 + len(packets[-1]) + 2)
            self.assertEqual(replies, codec.metadata_request(b"%photof") + codec.file_request(b"%photof")
                             + codec.resume(1) + codec.repeat_init() + codec.close(), size)
        self.assertIn(f"4 connections, 4 files, {1 + 1025 + 3000 + 2048} file bytes", self.floor.stop())

    def test_real_photos(self) -> None:
        """The real DualCam photos (29,395 and 28,826 bytes): the gateway's answers, every byte kept."""
        if not VECTORS.is_dir():
            raise SkipTest(NO_VECTORS)
        for name, size in (("dualcam-photo-front-a.json", 29395), ("dualcam-photo-front-b.json", 28826)):
            stream, replies = self.replay(capture_stream(name), 4 + size % 1024 + 2)
            self.assertEqual(replies, codec.metadata_request(b"%photof") + codec.file_request(b"%photof")
                             + codec.resume(1) + codec.repeat_init() + codec.close())
        self.assertEqual(sorted(len(data) for data in self.floor.files().values()),
                         sorted(len(capture_stream(name)) for name in
                                ("dualcam-photo-front-a.json", "dualcam-photo-front-b.json")))
        self.assertIn("2 connections, 2 files, 58221 file bytes", self.floor.stop())  # 29,395 + 28,826
