"""Periodic work outlives its errors, and the lease logs say what happened.

The half-second scan, the partial sweep and the lease keeper's two loops run
on ``LoopingCall``s, which stop for good at the first exception (or failed
Deferred) of their function: each of these tests makes one tick fail and
checks that the rest of that tick, and the next ticks, still run. The lease
tests fake the store (:class:`FakeLeases`) and drive a real session on a
StringTransport and a Clock; one test runs the keeper against a real
redis-server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from twisted.application.internet import TimerService
from twisted.internet import defer, task
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from camgateway.wire import codec

from camgateway.session import leasing as leases_module

from camgateway.runtime import service

from camgateway.session import machine as session_module
from camgateway.runtime.config import parse_config
from camgateway.session.leasing import LeaseKeeper
from camgateway.session.machine import State
from camgateway.transfer.writes import FLUSH_AGE
from tests.support import connect, make_services
from tests.test_session import IMEI, PHOTOF

CAMERA = str(IMEI)


def capture(case: TestCase, module: Any, namespace: str) -> list[dict[str, Any]]:
    """Replace ``module``'s logger by one whose events land in the returned list (not in trial's log)."""
    events: list[dict[str, Any]] = []
    case.patch(module, "log", Logger(namespace=namespace, observer=events.append))
    return events


def texts(events: list[dict[str, Any]]) -> list[str]:
    """The events as the log would show them."""
    return [formatEvent(event) for event in events]


def failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events logged with ``log.failure`` (they carry a traceback)."""
    return [event for event in events if "log_failure" in event]


class FakeLeases:
    """A lease store whose every answer a test sets.

    ``answers[name]`` is the value a call returns (in a fired Deferred), or a
    callable of the call's arguments whose result is used the same way; an
    exception as that result is raised at once, and a Deferred is returned
    as it is (failed, or fired later by the test).
    """

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {"acquire": True, "renew": True, "holder": None, "takeovers": [],
                                        "release": None, "request_takeover": None}
        self.calls: list[tuple[Any, ...]] = []

    def _answer(self, name: str, *args: Any) -> defer.Deferred:
        self.calls.append((name, *args))
        answer = self.answers[name]
        if callable(answer):
            answer = answer(*args)
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, defer.Deferred):
            return answer
        return defer.succeed(answer)

    def acquire(self, imei: str, token: str, ttl: float) -> defer.Deferred:
        return self._answer("acquire", imei, token, ttl)

    def renew(self, imei: str, token: str, ttl: float) -> defer.Deferred:
        return self._answer("renew", imei, token, ttl)

    def release(self, imei: str, token: str) -> defer.Deferred:
        return self._answer("release", imei, token)

    def holder(self, imei: str) -> defer.Deferred:
        return self._answer("holder", imei)

    def request_takeover(self, imei: str, holder: str) -> defer.Deferred:
        return self._answer("request_takeover", imei, holder)

    def takeovers(self, instance: str) -> defer.Deferred:
        return self._answer("takeovers", instance)

    def named(self, name: str) -> list[tuple[Any, ...]]:
        """The calls of ``name`` so far (their arguments)."""
        return [call[1:] for call in self.calls if call[0] == name]


def leasing_services(case: TestCase, leases: Any) -> Any:
    """Services of instance ``a`` (storage.lease_ttl 30 s, a Clock) whose lease store is ``leases``."""
    root = Path(case.mktemp())
    root.mkdir()
    services = make_services(root, lease_ttl=30.0)
    services.leases = leases
    services.instance = "a"
    return services


class Visited:
    """A stand-in for a session in the scan: records its visits, raises if told to."""

    def __init__(self, imei: str, error: Optional[Exception] = None) -> None:
        self.imei = imei
        self.error = error
        self.visits: list[float] = []
        self.errors: list[Failure] = []

    def write_stale(self, now: float) -> None:
        self.visits.append(now)
        if self.error is not None:
            raise self.error

    def internal_error(self, failure: Failure) -> None:
        self.errors.append(failure)


class ScanTests(TestCase):
    """The half-second scan (make_gateway's TimerService over flush_stale) outlives a session that raises."""

    def setUp(self) -> None:
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        self.clock = task.Clock()
        self.clock.advance(1000)
        config = parse_config({"listen": ["tcp:0:interface=127.0.0.1"], "storage": {"partial_ttl": "4h"}},
                              base=work)
        self.top = service.make_gateway(config, reactor=self.clock)
        self.services = make_services(work, clock=self.clock)
        self.top.gateway.services = self.services  # (the gateway itself is not started: only its timers)
        self.session_events = capture(self, session_module, "camgateway.session.machine")
        self.service_events = capture(self, service, "camgateway.runtime.service")

    def timer(self, step: float) -> TimerService:
        """Start make_gateway's TimerService of period ``step`` (stopped at the test's end)."""
        [timer] = [s for s in self.top if isinstance(s, TimerService) and s.step == step]
        timer.startService()
        self.addCleanup(timer.stopService)
        return timer

    def test_a_session_that_raises_does_not_stop_the_scan(self) -> None:
        due = self.services.due
        now = self.clock.seconds()
        first, bad, last = Visited("1"), Visited("2", RuntimeError("boom")), Visited("3")
        for n, item in enumerate((first, bad, last)):
            due.at(item, now + 0.1 + n * 0.01)  # all due at the next tick, in this order
        self.timer(FLUSH_AGE / 2)
        self.clock.advance(FLUSH_AGE / 2)
        self.assertEqual([len(first.visits), len(bad.visits), len(last.visits)], [1, 1, 1])  # the one after, too
        [failure] = bad.errors  # handed to the session: logged with its camera, the connection dropped
        self.assertIsInstance(failure.value, RuntimeError)
        self.assertEqual(len(due), 0)
        later = Visited("4")
        due.at(later, self.clock.seconds() + 0.1)
        self.clock.advance(FLUSH_AGE / 2)
        self.assertEqual(later.visits, [self.clock.seconds()])  # the next tick ran

    def test_a_real_session_that_raises_is_logged_with_its_camera_and_closed(self) -> None:
        protocol, transport = connect(self.services)
        protocol.dataReceived(codec.init_packet(5, IMEI, PHOTOF))  # asks for metadata: the connection stays
        session = protocol.session
        self.assertEqual(session.state, State.AWAIT_METADATA)

        def broken(now: float) -> None:
            raise ZeroDivisionError("a bug in write_stale")

        session.write_stale = broken  # type: ignore[method-assign]
        other = Visited("other")
        self.services.due.at(session, self.clock.seconds() + 0.1)
        self.services.due.at(other, self.clock.seconds() + 0.2)
        self.timer(FLUSH_AGE / 2)
        self.clock.advance(FLUSH_AGE / 2)
        [event] = failures(self.session_events)
        self.assertEqual(event["imei"], CAMERA)
        self.assertIsInstance(event["log_failure"].value, ZeroDivisionError)
        self.assertIn(f"internal error in session of camera {CAMERA}", formatEvent(event))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(other.visits), 1)
        self.assertEqual(self.services.stats.protocol_errors, 0)
        later = Visited("later")
        self.services.due.at(later, self.clock.seconds() + 0.1)
        self.clock.advance(FLUSH_AGE / 2)
        self.assertEqual(later.visits, [self.clock.seconds()])  # the scan goes on

    def test_a_scan_that_fails_as_a_whole_runs_again(self) -> None:
        calls = []

        def take(now: float) -> list[Any]:
            calls.append(now)
            if len(calls) == 2:
                raise RuntimeError("the heap is broken")
            return []

        self.patch(self.services.due, "take", take)
        self.timer(FLUSH_AGE / 2)  # (runs at once: call 1)
        self.clock.advance(FLUSH_AGE / 2)  # call 2 raises
        self.clock.advance(FLUSH_AGE / 2)
        self.assertEqual(len(calls), 3)
        self.clock.advance(FLUSH_AGE / 2)
        self.assertEqual(len(calls), 4)  # and goes on
        [event] = failures(self.service_events)
        self.assertIn("the half-second scan failed", formatEvent(event))

    def test_the_sweep_goes_on_after_a_failed_store(self) -> None:
        calls: list[float] = []

        def expired(before: float) -> defer.Deferred:
            calls.append(before)
            if len(calls) == 1:
                return defer.fail(ConnectionError("the store is down"))
            return defer.succeed([])

        self.patch(self.services.store, "expired", expired)
        self.timer(3600.0)  # (partial_ttl 4 h: a sweep every hour; the first at once, failing)
        self.assertEqual(len(calls), 1)
        self.clock.advance(3600.0)
        self.assertEqual(len(calls), 2)
        self.clock.advance(3600.0)
        self.assertEqual(len(calls), 3)  # and goes on
        [event] = failures(self.service_events)
        self.assertIn("the partial sweep failed", formatEvent(event))
        self.assertIsInstance(event["log_failure"].value, ConnectionError)

    def test_periodic_keeps_the_result_and_logs_errors(self) -> None:
        pending: defer.Deferred = defer.Deferred()
        self.assertIs(service.periodic("x", lambda: pending)(), pending)  # a LoopingCall waits for it
        pending.errback(ValueError("late"))
        self.assertIsNone(self.successResultOf(pending))
        self.assertIsNone(service.periodic("y", lambda: 1 / 0)())
        self.assertEqual([e["what"] for e in failures(self.service_events)], ["x", "y"])


class KeptSession:
    """A stand-in for a leased session in the keeper's rounds."""

    def __init__(self, imei: str, error: Optional[Exception] = None) -> None:
        self.imei = imei
        self.lease_token = f"a|{imei}"
        self.leased = True
        self.error = error
        self.stopped: list[str] = []

    def stop(self, why: str) -> defer.Deferred:
        self.stopped.append(why)
        if self.error is not None:
            raise self.error
        return defer.succeed(None)


class LeaseKeeperTests(TestCase):
    """The keeper's renewals and takeover polls: each guarded, the loops never stop."""

    def setUp(self) -> None:
        self.leases = FakeLeases()
        self.services = leasing_services(self, self.leases)
        self.clock = self.services.clock
        self.events = capture(self, leases_module, "camgateway.session.leasing")
        self.keeper = LeaseKeeper(self.services)
        self.keeper.start()
        self.addCleanup(self.keeper.stop)

    def add(self, *sessions: KeptSession) -> None:
        for session in sessions:
            self.services.sessions[session.imei] = session  # type: ignore[assignment]

    def test_renewals_that_raise_or_fail_do_not_stop_the_others_or_the_loop(self) -> None:
        self.add(KeptSession("1"), KeptSession("2"), KeptSession("3"))

        def renew(imei: str, token: str, ttl: float) -> Any:
            if imei == "1":
                return RuntimeError("raised at once")
            if imei == "2":
                return defer.fail(ConnectionError("the store is down"))
            return True

        self.leases.answers["renew"] = renew
        self.clock.advance(10.0)
        self.assertEqual([imei for imei, *_ in self.leases.named("renew")], ["1", "2", "3"])
        [event] = failures(self.events)  # one line a round, naming the first camera
        self.assertEqual((event["imei"], event["failed"]), ("1", 2))
        self.assertIsInstance(event["log_failure"].value, RuntimeError)
        self.assertEqual([s.stopped for s in self.services.sessions.values()], [[], [], []])  # sessions go on
        self.clock.advance(10.0)
        self.assertEqual(len(self.leases.named("renew")), 6)
        self.assertTrue(self.keeper.running)

    def test_a_round_that_fails_as_a_whole_is_logged_and_the_next_runs(self) -> None:
        real = self.services.sessions

        class Broken(dict):
            def items(self) -> Any:
                raise RuntimeError("not iterable today")

        self.services.sessions = Broken()  # type: ignore[assignment]
        self.clock.advance(10.0)
        [event] = failures(self.events)
        self.assertIn("renewing the leases failed", formatEvent(event))
        self.services.sessions = real
        self.add(KeptSession("1"))
        self.clock.advance(10.0)
        self.assertEqual(len(self.leases.named("renew")), 1)
        self.assertTrue(self.keeper.running)

    def test_a_lapsed_lease_is_logged_as_lapsed(self) -> None:
        session = KeptSession("1")
        self.add(session)
        self.leases.answers["renew"] = False
        self.clock.advance(10.0)
        [line] = texts(self.events)
        self.assertEqual(line, "the lease of camera 1 lapsed (not renewed within storage.lease_ttl, 30 s,"
                               " or lost by the store); no instance holds it now: closing its session here")
        self.assertEqual(session.stopped, ["its lease lapsed"])

    def test_a_lease_another_instance_holds_now_names_it(self) -> None:
        session = KeptSession("1")
        self.add(session)
        self.leases.answers.update(renew=False, holder="b|0123456789ab")
        self.clock.advance(10.0)
        [line] = texts(self.events)
        self.assertIn("the lease of camera 1 lapsed (not renewed within storage.lease_ttl", line)
        self.assertIn("; instance b holds it now", line)
        self.assertNotIn("another instance holds the camera now", line)
        self.assertEqual(session.stopped, ["its lease lapsed"])

    def test_a_lost_lease_whose_holder_cannot_be_read_still_stops_the_session(self) -> None:
        session = KeptSession("1")
        self.add(session)
        self.leases.answers.update(renew=False, holder=lambda imei: defer.fail(ConnectionError("down")))
        self.clock.advance(10.0)
        [line] = texts(self.events)
        self.assertIn("the store could not say who holds it now (down)", line)
        self.assertEqual(session.stopped, ["its lease lapsed"])

    def test_takeover_polls_that_raise_or_fail_do_not_stop_the_loop(self) -> None:
        answers = [RuntimeError("raised at once"), defer.fail(ConnectionError("down")), ["1", "2", "9"]]
        self.leases.answers["takeovers"] = lambda instance: answers.pop(0)
        first, second = KeptSession("1", error=RuntimeError("stop broke")), KeptSession("2")
        self.add(first, second)
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        self.assertEqual(len(texts(self.events)), 2)
        self.assertTrue(all(line.startswith("reading takeover requests failed") for line in texts(self.events)))
        self.clock.advance(0.5)
        self.assertEqual(first.stopped, ["another gateway instance took the camera over"])
        self.assertEqual(second.stopped, ["another gateway instance took the camera over"])  # after the one that broke
        [event] = failures(self.events)
        self.assertEqual(event["imei"], "1")
        self.leases.answers["takeovers"] = []
        self.clock.advance(0.5)
        self.assertEqual(self.leases.named("takeovers"), [("a",)] * 4)
        self.assertTrue(self.keeper.running)


class LeasingSessionTests(TestCase):
    """A real session while it takes its camera's lease (the store faked, a Clock)."""

    def setUp(self) -> None:
        self.leases = FakeLeases()
        self.services = leasing_services(self, self.leases)
        self.clock = self.services.clock
        self.clock.advance(1000)
        self.events = capture(self, session_module, "camgateway.session.machine")
        self.protocol, self.transport = connect(self.services)

    def init(self) -> None:
        self.protocol.dataReceived(codec.init_packet(5, IMEI, PHOTOF))

    def lines(self, start: str) -> list[str]:
        return [line for line in texts(self.events) if line.startswith(start)]

    def test_a_store_error_while_leasing_closes_without_a_protocol_error(self) -> None:
        self.leases.answers["acquire"] = lambda *args: defer.fail(ConnectionError("Error 111 connecting"))
        self.init()
        self.assertEqual(self.lines("could not take the lease"),
                         [f"could not take the lease of camera {CAMERA} (10.0.0.1:40000): the store answered"
                          " ConnectionError: Error 111 connecting; closing (the camera will retry)"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.protocol.session.state, State.CLOSED)
        self.assertEqual(self.services.stats.protocol_errors, 0)
        self.assertEqual(failures(self.events), [])
        self.assertEqual([f["what"] for f in self.services.failures], ["lease"])

    def test_a_store_error_raised_at_once_is_handled_alike(self) -> None:
        self.leases.answers.update(acquire=False, holder=RuntimeError("no connection"))
        self.init()
        self.assertEqual(len(self.lines(f"could not take the lease of camera {CAMERA}")), 1)
        self.assertEqual(self.services.stats.protocol_errors, 0)
        self.assertTrue(self.transport.disconnecting)

    def test_a_store_error_after_the_connection_closed_is_dropped(self) -> None:
        answer: defer.Deferred = defer.Deferred()
        self.leases.answers["acquire"] = lambda *args: answer
        self.init()
        self.protocol.connectionLost(Failure(ConnectionError("the camera hung up")))
        answer.errback(ConnectionError("too late"))
        self.assertEqual(self.services.stats.protocol_errors, 0)
        self.assertEqual(self.lines("could not take the lease"), [])
        self.assertEqual(len(self.lines(f"camera {CAMERA}: the lease store answered after the connection closed")), 1)
        self.assertEqual(failures(self.events), [])
        self.assertEqual(self.leases.named("release"), [])

    def test_a_lease_taken_after_the_connection_closed_is_released(self) -> None:
        answer: defer.Deferred = defer.Deferred()
        self.leases.answers["acquire"] = lambda *args: answer
        self.init()
        session = self.protocol.session
        self.protocol.connectionLost(Failure(ConnectionError("the camera hung up")))
        answer.callback(True)
        self.assertEqual(self.leases.named("release"), [(CAMERA, session.lease_token)])
        self.assertFalse(session.leased)
        self.assertEqual(self.services.stats.protocol_errors, 0)

    def test_a_dead_holder_is_named_at_once_and_waited_out(self) -> None:
        self.leases.answers.update(acquire=False, holder="b|0123456789ab")
        self.init()
        session = self.protocol.session
        held = f"camera {CAMERA} is held by instance b"
        self.assertEqual(self.lines(held), [f"camera {CAMERA} is held by instance b: asking it to let go; if it is"
                                            " down, waiting up to 30 s (storage.lease_ttl) for its lease to expire"])
        self.assertEqual(self.leases.named("request_takeover"), [(CAMERA, "b")])
        for _ in range(132):  # 26.4 s of tries, every 0.2 s
            self.clock.advance(0.2)
        self.assertEqual(len(self.lines(held)), 1)  # once
        self.assertEqual(len(self.leases.named("request_takeover")), 1)
        self.assertEqual(session.state, State.LEASING)
        self.leases.answers["acquire"] = True  # b's lease expired
        self.clock.advance(0.2)
        self.assertEqual(self.lines(f"camera {CAMERA}: lease taken after"),
                         [f"camera {CAMERA}: lease taken after 26.6 s"])
        self.assertEqual(session.state, State.AWAIT_METADATA)
        self.assertTrue(session.leased)

    def test_a_lease_left_by_this_instance_is_waited_for_without_a_takeover_request(self) -> None:
        self.leases.answers.update(acquire=False, holder="a|before-restart")
        self.init()
        [line] = self.lines(f"camera {CAMERA} is held by an earlier session of this instance")
        self.assertIn("(a|before-restart: from before a restart, or its release failed)", line)
        self.assertIn("waiting up to 30 s (storage.lease_ttl) for its lease to expire", line)
        self.assertEqual(self.leases.named("request_takeover"), [])

    def test_a_holder_that_never_lets_go_closes_the_connection_in_the_end(self) -> None:
        self.leases.answers.update(acquire=False, holder="b|0123456789ab")
        self.init()
        self.clock.pump([0.2] * 180)  # 36 s: past lease_ttl + 5
        [line] = self.lines("could not take the lease")
        self.assertIn(f"could not take the lease of camera {CAMERA} (10.0.0.1:40000): instance b still holds it"
                      " after 35 s", line)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.services.stats.protocol_errors, 0)


class RedisKeeperTests(TestCase):
    """The keeper against a real redis-server: a lapsed lease told from one another instance took."""

    def setUp(self) -> None:
        from tests.test_redis_store import SERVER, SKIP_REDIS

        if SKIP_REDIS:
            self.skipTest(SKIP_REDIS)
        import uuid

        from camgateway.storage.redis import RedisStore
        from camgateway.storage.redis_leases import RedisLeases

        store = RedisStore(SERVER.url(), prefix=f"test-{uuid.uuid4().hex[:12]}", instance="a")
        self.addCleanup(store.close)
        self.leases = RedisLeases(store)
        self.services = leasing_services(self, self.leases)  # (a Clock: the rounds are run by the test)
        self.events = capture(self, leases_module, "camgateway.session.leasing")
        self.keeper = LeaseKeeper(self.services)  # (not started)

    @defer.inlineCallbacks
    def test_lapsed_then_taken(self) -> Any:
        gone, taken = KeptSession("111"), KeptSession("222")
        self.services.sessions.update({"111": gone, "222": taken})  # type: ignore[dict-item]
        kept = KeptSession("333")
        self.services.sessions["333"] = kept  # type: ignore[assignment]
        yield self.leases.acquire("222", "b|other", 30.0)  # (222's lease lapsed and b took it)
        yield self.leases.acquire("333", kept.lease_token, 30.0)
        yield self.keeper.renew()
        lines = texts(self.events)
        self.assertIn("the lease of camera 111 lapsed (not renewed within storage.lease_ttl, 30 s, or lost by the"
                      " store); no instance holds it now: closing its session here", lines)
        self.assertIn("the lease of camera 222 lapsed (not renewed within storage.lease_ttl, 30 s, or lost by the"
                      " store); instance b holds it now: closing its session here", lines)
        self.assertEqual(len(lines), 2)
        self.assertEqual((gone.stopped, taken.stopped, kept.stopped), (["its lease lapsed"], ["its lease lapsed"], []))
