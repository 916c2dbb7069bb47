"""Slow cameras read a few frames at a time (the receive low-water mark), never held for long."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from camgateway.wire import codec
from camgateway.runtime.service import flush_stale
from camgateway.session.machine import State
from camgateway.sim import ContentPool
from camgateway.perf.slow_reads import MARK_MAX, MARK_MIN, READ_WAIT, SlowReads
from camgateway.wire.codec import DATA_FRAME as FRAME
from camgateway.perf.sockets import set_read_mark
from camgateway.perf.settings import Performance
from tests.support import connect, loopback_pair, make_services, stored_files
from tests.test_integration import GatewayTestCase, camera
from tests.test_session import IMEI, VIDEOF, data_frames

KIB = 1024
#: The mark of a camera at a frame a second, with the sessions' wait.
HELD = min(round(READ_WAIT), MARK_MAX // FRAME) * FRAME


class Marks:
    """A link that records the marks asked for (and can refuse them)."""

    def __init__(self, can: bool = True) -> None:
        self.asked: list[int] = []
        self.can = can

    def set_read_mark(self, nbytes: int) -> bool:
        self.asked.append(nbytes)
        return self.can


class SlowReadsTests(TestCase):
    """The policy alone: reads at given times, with given bytes held and still to come."""

    def setUp(self) -> None:
        self.link = Marks()
        self.reads = SlowReads(self.link, wait=4.0)
        self.now = 100.0
        self.held = 0

    def read(self, payload: int, after: float, left: int = 10**9) -> int:
        """A read ``after`` seconds after the last one, bringing ``payload`` bytes of the file; the mark."""
        self.now += after
        self.held += payload
        self.reads.read(self.now, self.held, left)
        return self.reads.mark

    def test_a_camera_at_a_frame_a_second_is_read_four_frames_at_a_time(self) -> None:
        self.assertEqual(self.read(KIB, 1.0), 1)  # the first read of a stretch: no rate yet
        self.assertEqual(self.read(KIB, 1.0), 4 * FRAME)
        for late in (0.0, 0.1, -0.1, 0.3, -0.3):  # its reads then bring four frames, a little early or late
            self.assertEqual(self.read(4 * KIB, 4.0 + late), 4 * FRAME)
        self.assertEqual(self.link.asked, [4 * FRAME])  # one system call for all of it

    def test_a_camera_that_is_not_slow_is_never_held(self) -> None:
        for _ in range(20):
            self.assertEqual(self.read(64 * KIB, 0.002), 1)
        self.assertEqual(self.link.asked, [])

    def test_a_very_slow_camera_is_not_held(self) -> None:
        for _ in range(5):  # a frame every 3 s: under two frames in the wait
            self.assertEqual(self.read(KIB, 3.0), 1)
        self.assertEqual(self.link.asked, [])

    def test_a_faster_camera_is_held_at_most_mark_max(self) -> None:
        self.read(KIB, 0.05)
        self.assertEqual(self.read(KIB, 0.05), MARK_MAX)  # 20 KiB/s
        self.assertEqual(self.read(8 * KIB, 0.4), MARK_MAX)
        self.assertEqual(self.read(64 * KIB, 0.01), MARK_MAX)  # it sped up: still held, at most MARK_MAX

    def test_the_mark_never_passes_the_bytes_still_to_come(self) -> None:
        self.read(KIB, 1.0)
        self.assertEqual(self.read(KIB, 1.0, left=3 * KIB), 3 * KIB)
        self.assertEqual(self.read(KIB, 1.0, left=MARK_MIN), MARK_MIN)
        self.assertEqual(self.read(KIB, 1.0, left=MARK_MIN - 1), 1)  # the end of the file: every byte
        self.assertEqual(self.link.asked, [3 * KIB, MARK_MIN, 1])

    def test_a_rewind_drops_the_mark(self) -> None:
        self.read(KIB, 1.0)
        self.read(KIB, 1.0)
        self.assertEqual(self.read(-8 * KIB, 1.0), 1)  # SYNC went back: held is lower than before

    def test_a_held_camera_not_read_for_twice_its_wait_is_read_at_once(self) -> None:
        self.read(KIB, 1.0)
        self.read(KIB, 1.0)
        self.reads.stale(self.now + 8.0)
        self.assertEqual(self.reads.mark, 4 * FRAME)  # not yet
        self.reads.stale(self.now + 8.01)
        self.assertEqual(self.reads.mark, 1)
        self.assertEqual(self.link.asked, [4 * FRAME, 1])
        self.assertEqual(self.read(KIB, 9.0), 1)  # a new stretch: its first read only measures
        self.assertEqual(self.read(KIB, 1.0), 4 * FRAME)

    def test_drop(self) -> None:
        self.read(KIB, 1.0)
        self.read(KIB, 1.0)
        self.reads.drop()
        self.assertEqual((self.reads.mark, self.link.asked), (1, [4 * FRAME, 1]))
        self.reads.drop()
        self.assertEqual(self.link.asked, [4 * FRAME, 1])  # nothing to change: no call

    def test_a_link_that_cannot_is_not_asked_again(self) -> None:
        self.link.can = False
        self.read(KIB, 1.0)
        self.read(KIB, 1.0)
        self.read(KIB, 1.0)
        self.assertEqual((self.reads.mark, self.link.asked), (1, [4 * FRAME]))


class SocketTests(TestCase):
    """The mark on real sockets, and on transports that have none."""

    def test_only_plain_tcp_connections_take_a_mark(self) -> None:
        self.assertFalse(set_read_mark(StringTransport(), 4096))

    @defer.inlineCallbacks
    def test_the_mark_is_the_sockets(self) -> Any:
        transport, _ = yield loopback_pair(self)
        self.assertTrue(set_read_mark(transport, 5000))
        self.assertEqual(transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT), 5000)
        self.assertTrue(set_read_mark(transport, 1))
        self.assertEqual(transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT), 1)


class SessionTests(TestCase):
    """The session sets and drops the mark (StringTransport, Clock, a link that records)."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.services = make_services(self.root, metadata=False, performance=Performance.every(True))
        self.clock = self.services.clock
        self.protocol, self.transport = connect(self.services)
        self.marks = Marks()
        self.protocol.set_read_mark = self.marks.set_read_mark  # type: ignore[method-assign]

    @property
    def mark(self) -> int:
        return self.protocol.session.writes.reads.mark

    def begin(self, content: bytes) -> list[bytes]:
        """Up to the SYNC of a DualCam video; its DATA frames."""
        self.protocol.dataReceived(codec.init_packet(5, IMEI, VIDEOF))
        self.protocol.dataReceived(codec.start((len(content) + 1023) // 1024, 0))
        self.protocol.dataReceived(codec.sync(1))
        self.assertEqual(self.protocol.session.state, State.RECEIVING)
        return data_frames(content)

    def test_a_slow_file_never_waits_for_bytes_that_will_not_come(self) -> None:
        content = random.Random(1).randbytes(40 * KIB + 300)
        frames = self.begin(content)
        queue = bytearray()  # the kernel's receive queue: readable once it holds the mark
        reads = 0

        def kernel() -> None:
            nonlocal reads
            if queue and len(queue) >= self.mark:
                data = bytes(queue)
                queue.clear()
                reads += 1
                self.protocol.dataReceived(data)

        # A frame a second, each in two pieces as a slow link may cut them; the scan twice a second.
        for frame in frames:
            for piece in (frame[:500], frame[500:]):
                self.clock.advance(0.5)
                queue += piece
                kernel()
                flush_stale(self.services)
                kernel()
        self.assertEqual(bytes(queue), b"")  # nothing left waiting once the camera has sent it all
        self.assertIn(HELD, self.marks.asked)
        self.assertLess(reads, len(frames) // 2)  # 82 pieces, 41 frames: read a few frames at a time
        self.assertEqual((self.mark, self.marks.asked[-1]), (1, 1))
        self.assertEqual(self.protocol.session.state, State.AWAIT_INIT)
        [stored] = stored_files(self.root)
        self.assertEqual(stored.read_bytes(), content)

    def held(self, seed: int) -> list[bytes]:
        """A 64 KiB video's first four frames, a second apart: the connection is held; its frames."""
        frames = self.begin(random.Random(seed).randbytes(64 * KIB))
        for frame in frames[:4]:
            self.clock.advance(1.0)
            self.protocol.dataReceived(frame)
        self.assertEqual(self.mark, HELD)
        return frames

    def test_a_bad_crc_drops_the_mark(self) -> None:
        frames = self.held(2)
        bad = bytearray(frames[4])
        bad[10] ^= 0xFF
        self.protocol.dataReceived(bytes(bad))
        self.assertEqual(self.protocol.session.state, State.DISCARDING)
        self.assertEqual(self.mark, 1)

    def test_a_status_in_the_middle_of_a_held_file_is_read_by_the_scan(self) -> None:
        self.held(3)
        # The camera sends STATUS (8 bytes, under the mark) and waits: the kernel holds it...
        for _ in range(int(2 * READ_WAIT / 0.5)):
            self.clock.advance(0.5)
            flush_stale(self.services)
        self.assertEqual(self.mark, HELD)  # unread for twice the wait, not more
        self.clock.advance(0.5)
        flush_stale(self.services)
        self.assertEqual(self.mark, 1)  # ... until the scan finds the camera unread for twice the wait
        self.assertEqual(self.marks.asked, [HELD, 1])
        self.protocol.dataReceived(codec.status(2))
        self.assertNotEqual(self.protocol.session.state, State.RECEIVING)

    def test_the_wait_stays_far_from_the_idle_timeout(self) -> None:
        self.assertEqual(self.protocol.session.writes.reads.wait, READ_WAIT)
        services = make_services(self.root / "short", idle_timeout=6.0, performance=Performance.every(True))
        protocol, _ = connect(services)
        self.assertEqual(protocol.session.writes.reads.wait, 1.5)

    def test_a_camera_read_as_it_comes_is_not_held(self) -> None:
        frames = self.begin(random.Random(4).randbytes(200 * KIB))
        for i in range(0, len(frames), 16):  # 16 frames a read: not slow
            self.clock.advance(0.01)
            self.protocol.dataReceived(b"".join(frames[i : i + 16]))
        self.assertEqual(self.marks.asked, [])

    def test_each_file_measures_its_rate_afresh(self) -> None:
        # A short file read at once (never held), a pause, then a slow file:
        # it is held from its first frame, its rate measured from its own SYNC,
        # not from anything the first file's reads left.
        frames = self.begin(random.Random(5).randbytes(4 * KIB))
        self.clock.advance(0.01)
        self.protocol.dataReceived(b"".join(frames))
        self.assertEqual(self.protocol.session.state, State.AWAIT_INIT)
        self.clock.advance(10.0)
        frames = self.begin(random.Random(6).randbytes(64 * KIB))
        self.clock.advance(1.0)
        self.protocol.dataReceived(frames[0])
        self.assertEqual((self.mark, self.marks.asked), (HELD, [HELD]))


class LoopbackTests(GatewayTestCase):
    """Emulated slow cameras over TCP: held by the kernel, every file intact."""

    @defer.inlineCallbacks
    def test_slow_cameras_are_read_a_few_frames_at_a_time(self) -> Any:
        yield self.start_gateway(performance=Performance.every(True))
        seen: list[int] = []

        def look() -> bool:
            for protocol in self.gateway.factory.protocols:
                sock = getattr(protocol.transport, "socket", None)
                if sock is not None and sock.fileno() >= 0:
                    seen.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))
            return False

        loop = LoopingCall(look)
        loop.start(0.1)
        self.addCleanup(lambda: loop.running and loop.stop())
        rng = random.Random(5)
        pool = ContentPool(rng, variants=2)
        specs = [camera(n, kind, rng, pool, photos=0, videos=1, video_size=40 * KIB, slow_bps=16 * KIB)
                 for n, kind in enumerate(("dualcam", "dsm"))]
        results = yield self.cameras(specs)
        loop.stop()
        self.assertEqual([r.imei for r in results if not r.ok], [])
        self.assertEqual(self.stored(), self.expected(specs))
        self.assertTrue([m for m in seen if m > 1], f"no connection was held: marks seen {sorted(set(seen))}")
        self.assertLessEqual(max(seen), MARK_MAX)
