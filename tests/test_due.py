"""The half-second timer looks only at the sessions due (camgateway.due), and does what a scan of all did."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from camgateway import codec
from camgateway.due import DueQueue
from camgateway.service import flush_stale
from camgateway.session import State
from camgateway.transfer import FLUSH_AGE, TRICKLE_AGE
from tests.support import connect, make_services, stored_files
from tests.test_session import IMEI, VIDEOF, data_frames

KIB = 1024
TICK = FLUSH_AGE / 2  # the service's timer


class Thing:
    """Something queued (hashable by identity, never compared)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __lt__(self, other: Any) -> bool:
        raise AssertionError("the queue compared two things")

    def __repr__(self) -> str:
        return self.name


class DueQueueTests(TestCase):
    """The queue alone."""

    def setUp(self) -> None:
        self.q = DueQueue()
        self.a, self.b, self.c = Thing("a"), Thing("b"), Thing("c")

    def test_things_come_out_at_their_time_earliest_first(self) -> None:
        self.q.at(self.a, 3.0)
        self.q.at(self.b, 1.0)
        self.q.at(self.c, 1.0)  # the same time as b: never compared, b was first
        self.assertEqual(self.q.due(0.9), [])
        self.assertEqual(self.q.due(1.0), [self.b, self.c])
        self.assertEqual(self.q.due(2.9), [])
        self.assertEqual(self.q.due(10.0), [self.a])
        self.assertEqual((len(self.q), self.q.due(100.0)), (0, []))

    def test_an_earlier_time_replaces_a_later_one_and_a_later_one_is_ignored(self) -> None:
        self.q.at(self.a, 5.0)
        self.q.at(self.a, 2.0)
        self.q.at(self.a, 4.0)
        self.assertEqual((len(self.q), self.q.when(self.a)), (1, 2.0))
        self.assertEqual(self.q.due(2.0), [self.a])
        self.q.at(self.a, 7.0)
        self.assertEqual(self.q.due(6.0), [])  # the entry at 5.0 was replaced: skipped, not an early look
        self.assertEqual(self.q.due(7.0), [self.a])

    def test_a_thing_queued_again_comes_out_once(self) -> None:
        self.q.at(self.a, 5.0)
        self.q.at(self.a, 2.0)
        self.assertEqual(self.q.due(2.0), [self.a])
        self.q.at(self.a, 5.0)  # the same time as the replaced entry still in the heap
        self.assertEqual(self.q.due(5.0), [self.a])
        self.assertEqual(self.q.due(6.0), [])

    def test_a_discarded_thing_never_comes_out(self) -> None:
        self.q.at(self.a, 1.0)
        self.q.at(self.b, 1.0)
        self.q.discard(self.a)
        self.q.discard(self.c)  # (never queued: nothing happens)
        self.assertEqual((len(self.q), self.q.when(self.a)), (1, None))
        self.assertEqual(self.q.due(1.0), [self.b])

    def test_a_time_set_while_looking_is_for_the_next_call(self) -> None:
        self.q.at(self.a, 1.0)
        [thing] = self.q.due(1.0)
        self.q.at(thing, 0.5)  # already past
        self.assertEqual(self.q.when(self.a), 0.5)
        self.assertEqual(self.q.due(1.5), [self.a])


class Camera:
    """One emulated slow camera on a StringTransport, with the kernel's receive queue and its read mark."""

    def __init__(self, services: Any, n: int, content: bytes) -> None:
        self.protocol, self.transport = connect(services, peer=f"10.0.0.{n + 1}")
        self.protocol.set_read_mark = lambda nbytes: True  # type: ignore[method-assign]
        self.queue = bytearray()
        self.protocol.dataReceived(codec.init_packet(5, IMEI + n, VIDEOF))
        self.protocol.dataReceived(codec.start((len(content) + KIB - 1) // KIB, 0))
        self.protocol.dataReceived(codec.sync(1))
        assert self.protocol.session.state is State.RECEIVING
        self.frames = data_frames(content)
        self.sent = 0

    @property
    def session(self) -> Any:
        return self.protocol.session

    def send(self, n: int) -> None:
        """The next ``n`` frames onto the wire (into the kernel's queue)."""
        self.queue += b"".join(self.frames[self.sent : self.sent + n])
        self.sent += n
        self.kernel()

    def kernel(self) -> None:
        """What the reactor reads: everything queued, once the queue holds the mark."""
        if self.queue and len(self.queue) >= self.session._reads.mark:
            data = bytes(self.queue)
            self.queue.clear()
            self.protocol.dataReceived(data)

    def seen(self) -> tuple[Any, ...]:
        """What the timer's looks decide: the state, bytes written, bytes waiting, the mark, bytes held."""
        session = self.session
        transfer = session.transfer
        return (session.state, transfer.flushed if transfer else None, len(transfer.pending) if transfer else None,
                session._reads.mark, len(self.queue))


def scan_every_session(services: Any) -> None:
    """The timer before camgateway.due: every session, every tick."""
    now = services.clock.seconds()
    for session in list(services.sessions.values()):
        session.write_stale(now)


class TimerTests(TestCase):
    """The service's timer with real sessions (a StringTransport each, a task.Clock)."""

    def world(self, name: str, cameras: int, contents: list[bytes]) -> tuple[Any, list[Camera]]:
        root = Path(self.mktemp()) / name
        root.mkdir(parents=True)
        services = make_services(root, metadata=False)
        services.root = root  # type: ignore[attr-defined]
        return services, [Camera(services, n, contents[n]) for n in range(cameras)]

    def same_as_a_scan(self, name: str, contents: list[bytes], plans: list[list[int]]) -> list[Camera]:
        """Cameras sending the same frames at the same times to two gateways, compared at every tick.

        ``plans[c][step]``: the frames camera ``c`` sends in tick ``step``.
        One gateway's timer looks at the sessions due, the other's at every
        session every tick. Every tick, both must have written the same
        bytes, kept the same bytes waiting and held the same marks; at the
        end (every camera then sends a frame a tick) both stored the same
        files. Returns the first gateway's cameras.
        """
        due, due_cams = self.world(f"due-{name}", len(contents), contents)
        scan, scan_cams = self.world(f"scan-{name}", len(contents), contents)
        steps = len(plans[0]) + int(TRICKLE_AGE / TICK) + 40
        for step in range(steps):
            for services, cams in ((due, due_cams), (scan, scan_cams)):
                services.clock.advance(TICK)
                for cam, plan in zip(cams, plans):
                    if cam.session.state is State.RECEIVING:
                        cam.send(plan[step] if step < len(plan) else 1)
                (flush_stale if services is due else scan_every_session)(services)
                for cam in cams:
                    cam.kernel()
            self.assertEqual([c.seen() for c in due_cams], [c.seen() for c in scan_cams], f"{name}, step {step}")
        stored = sorted(p.read_bytes() for p in stored_files(due.root))
        self.assertEqual(stored, sorted(p.read_bytes() for p in stored_files(scan.root)))
        self.assertEqual(len(stored), sum(1 for c in due_cams if c.sent >= len(c.frames)))
        return due_cams

    def test_the_timer_does_what_a_scan_of_every_session_did(self) -> None:
        for seed in range(6):
            rng = random.Random(seed)
            contents = [rng.randbytes(rng.randint(40, 400) * KIB + rng.randint(0, 1023)) for _ in range(4)]
            # Each camera's pace: a frame a second, bursts, pauses longer than a read mark waits.
            plans = [[rng.choice([0, 0, 0, 0, 1, 1, 1, 2, 8, 60, 300]) for _ in range(200)] for _ in range(4)]
            cams = self.same_as_a_scan(f"random-{seed}", contents, plans)
            self.assertTrue(any(c.sent >= len(c.frames) for c in cams), f"seed {seed}: no file finished")

    def test_a_held_camera_that_slows_down_has_its_bytes_written_in_time(self) -> None:
        # A frame every 2 s: held four frames a read. Then a frame every 3 s:
        # each read comes 12 s after the one before, and its 4 KiB wait the
        # trickle age, 5 s, past the time the mark would go stale (16 s after
        # the read before). The look at that time finds neither to do, and
        # must ask again for the write's time, not only the mark's.
        plan = ([1, 0, 0, 0] * 6 + [1, 0, 0, 0, 0, 0] * 12)
        [cam] = self.same_as_a_scan("slowing", [random.Random(9).randbytes(60 * KIB)], [plan])
        self.assertEqual(cam.session._reads.mark, 1)  # (the file is done)
    def test_an_idle_session_is_never_looked_at_and_a_slow_one_only_when_due(self) -> None:
        services, cams = self.world("looks", 3, [random.Random(7).randbytes(200 * KIB)] * 3)
        looks = {id(cam.session): 0 for cam in cams}
        for cam in cams:
            session = cam.session
            real = session.write_stale

            def counted(now: float, real: Any = real, key: int = id(session)) -> None:
                looks[key] += 1
                real(now)

            session.write_stale = counted
        slow, idle = cams[0], cams[1:]
        ticks = 120  # 60 s, a frame a second from the slow camera
        for step in range(ticks):
            services.clock.advance(TICK)
            if step % 2 == 0:
                slow.send(1)
            flush_stale(services)
            slow.kernel()
        self.assertEqual([looks[id(c.session)] for c in idle], [0, 0])
        self.assertEqual([services.due.when(c.session) for c in idle], [None, None])
        # Held eight frames a read, written a second after each read: a look or
        # two per read, where every tick was a look before.
        self.assertGreater(slow.session.transfer.flushed, 40 * KIB)
        self.assertLessEqual(looks[id(slow.session)], ticks // 4)
        self.assertGreater(looks[id(slow.session)], 0)

    def test_a_closed_connection_leaves_the_queue(self) -> None:
        services, [cam] = self.world("closed", 1, [random.Random(8).randbytes(100 * KIB)])
        cam.send(3)
        self.assertIsNotNone(services.due.when(cam.session))
        cam.protocol.connectionLost(None)  # type: ignore[arg-type]
        self.assertIsNone(services.due.when(cam.session))
        self.assertEqual(services.due.due(services.clock.seconds() + 100), [])
