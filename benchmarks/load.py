"""The benchmark's load generator: emulated cameras, in a process of their own.

Started by ``run.py`` as ``python benchmarks/load.py SPEC.json``. It plays the
camera groups the spec describes with the package's emulator
(:mod:`camgateway.sim`: :class:`ContentPool`, :func:`make_files`,
:class:`CameraProtocol` and its precomputed frame plans), against the gateway
or the floor, and reports what happened.

Everything that costs CPU and does not depend on the server (random contents,
DATA frame bodies, CRC chains) is computed before the first connection, so
during the run the generator only joins precomputed frames and writes them.
Its own CPU time over the measured window is reported, to show it is not
the bottleneck.

Spec (JSON)::

    {"host": "127.0.0.1", "port": 5000, "seed": 1, "out": "result.json",
     "go_file": "go" or null, "deadline": 600,
     "groups": [{"name": "fast", "cameras": 100, "kind": "dualcam",
                 "photos": 0, "videos": 1, "photo_size": 30720,
                 "video_size": 10485760, "variants": 4, "imei_base": 35...,
                 "slow_bps": null, "background": false, "phase": 0,
                 "connect_rate": 0}]}

* ``background`` groups (slow cameras) never finish on their own: they are
  "ready" once every camera has had its SYNC (it is mid-transfer), and their
  connections are dropped when the foreground groups are done.
* Groups of ``phase`` 1 start once every phase-0 group is ready and, when
  ``go_file`` is set, once that file exists (``run.py`` measures the
  server in between).
* ``connect_rate``: at most this many new connections per second (0 = all at once).
* A process given only background groups (``run.py`` puts the slow cameras
  of idle-10k in a process of their own) says ``ready`` when they are all
  mid-transfer and keeps them going until ``stop_file`` exists.

Progress goes to stdout as ``EVENT {json}`` lines (``precomputed``,
``started``, ``ready``, ``go``, ``done``), read by ``run.py`` as they come,
which samples the server's CPU and memory at each of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import sys
import time
from typing import Any, Optional

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.task import LoopingCall, deferLater  # noqa: E402

from camgateway.sim import Camera, CameraProtocol, CameraSpec, ContentPool, make_files  # noqa: E402
from camgateway.sim.content import DEFAULT_TIMESTAMP  # noqa: E402
from camgateway.sim.frames import PlanCache  # noqa: E402


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def event(name: str, **fields: Any) -> None:
    """One progress line for ``run.py``, with the monotonic clock (shared by every process)."""
    fields.update(event=name, t=time.monotonic())
    sys.stdout.write("EVENT " + json.dumps(fields) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    t = os.times()
    return t.user + t.system


class TimedCamera(Camera):
    """A :class:`Camera` that records when each file was acknowledged.

    A file's completion time runs from the moment the camera started to
    offer it (its connection attempt, or the acknowledgement of its previous
    file) to the gateway's acknowledgement (REPEAT INIT or CLOSE after the
    file is stored, which the emulator counts as "delivered").
    """

    def __init__(self, spec: CameraSpec) -> None:
        super().__init__(spec)
        self.mark = 0.0
        self.completions: list[float] = []
        self.last_delivery: Optional[float] = None
        self.protocol: Optional[CameraProtocol] = None

    def delivered(self, index: int) -> None:
        if index in self.pending:
            now = time.monotonic()
            self.completions.append(now - self.mark)
            self.mark = self.last_delivery = now
        super().delivered(index)


class Group:
    """The cameras of one spec group and their precomputed content."""

    def __init__(self, raw: dict[str, Any], pool_rng: random.Random) -> None:
        self.name: str = raw["name"]
        self.background: bool = bool(raw.get("background"))
        self.phase: int = int(raw.get("phase", 0))
        self.connect_rate: float = float(raw.get("connect_rate", 0))
        pool = ContentPool(pool_rng, int(raw.get("variants", 4)))
        self.cameras: list[TimedCamera] = []
        base = int(raw["imei_base"])
        for n in range(int(raw["cameras"])):
            files = make_files(
                raw.get("kind", "dualcam"),
                protocol_id=int(raw.get("protocol_id", 5)),
                photos=int(raw.get("photos", 0)),
                videos=int(raw.get("videos", 0)),
                photo_size=int(raw.get("photo_size", 30 * 1024)),
                video_size=int(raw.get("video_size", 1 << 20)),
                pool=pool,
                key=n,
                timestamp=DEFAULT_TIMESTAMP + 1000 * n,
            )
            spec = CameraSpec(imei=base + n, kind=raw.get("kind", "dualcam"), files=tuple(files),
                              protocol_id=int(raw.get("protocol_id", 5)), slow_bps=raw.get("slow_bps"))
            self.cameras.append(TimedCamera(spec))
        self.started: Optional[float] = None
        self.cpu_started = 0.0
        self.finished: Optional[Deferred] = None
        #: Background cameras still connected when the foreground ones were done.
        self.still_connected: Optional[int] = None
        #: SHA-256 of every content, by id (filled before the run).
        self.digests: dict[int, str] = {}

    def ready(self) -> bool:
        """Every camera is mid-transfer (had its SYNC) or, for a foreground group, done."""
        return all(c.result.syncs or c.done for c in self.cameras)


#: DATA frames written per reactor turn by a full-speed camera (the emulator's default is 32).
BATCH_FRAMES = int(os.environ.get("CAMGW_BENCH_BATCH", "128"))


async def play(endpoint: TCP4ClientEndpoint, camera: TimedCamera, plans: PlanCache) -> None:
    """One connection of one camera; no reconnect (a benchmark run must not need one)."""
    camera.mark = time.monotonic()
    camera.result.started = reactor.seconds()
    protocol = CameraProtocol(camera, reactor, plans=plans, idle_timeout=None, batch_frames=BATCH_FRAMES)
    camera.protocol = protocol
    try:
        await connectProtocol(endpoint, protocol)
    except Exception as e:  # noqa: BLE001 - reported, never raised
        camera.result.connect_failures += 1
        camera.result.errors.append(f"could not connect: {e}")
        camera.finish(reactor.seconds())
        return
    await protocol.closed
    camera.finish(reactor.seconds())


def start_group(group: Group, endpoint: TCP4ClientEndpoint, plans: PlanCache) -> Deferred:
    """Start every camera of ``group`` (at ``connect_rate`` per second); fires when all ended."""
    group.started = time.monotonic()
    group.cpu_started = cpu_seconds()
    event("started", group=group.name, cameras=len(group.cameras))
    waits: list[Deferred] = []
    pending = list(group.cameras)
    all_started: Deferred = Deferred()

    def launch(n: int) -> None:
        for _ in range(min(n, len(pending))):
            waits.append(ensureDeferred(play(endpoint, pending.pop(0), plans)))
        if not pending and not all_started.called:
            all_started.callback(None)

    if group.connect_rate <= 0:
        launch(len(pending))
    else:
        tick = 0.05
        per_tick = max(1, int(group.connect_rate * tick))
        loop = LoopingCall(launch, per_tick)
        all_started.addCallback(lambda _: loop.stop() if loop.running else None)
        loop.start(tick)
    d = all_started.addCallback(lambda _: DeferredList(waits))
    group.finished = d
    return d


async def wait_until(predicate: Any, interval: float = 0.1) -> None:
    """Poll ``predicate`` until it is true."""
    while not predicate():
        await deferLater(reactor, interval)


def percentile(values: list[float], q: float) -> Optional[float]:
    """The ``q`` quantile (0..1) by nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def group_report(group: Group, done_at: float, cpu_done: float) -> dict[str, Any]:
    """What the group did, for ``run.py``."""
    cams = group.cameras
    completions = [t for c in cams for t in c.completions]
    last = max((c.last_delivery for c in cams if c.last_delivery is not None), default=None)
    wall = (last - group.started) if (last is not None and group.started is not None) else None
    digests = group.digests
    expected = []
    if not group.background:
        for c in cams:
            # The k-th delivery of an identifier is the k-th file with it: a
            # camera offers files with the same identifier in spec order.
            seen: dict[str, int] = {}
            for identifier, size in c.result.delivered:
                k = seen.get(identifier, 0)
                seen[identifier] = k + 1
                f = [f for f in c.spec.files if f.identifier == identifier][k]
                expected.append([c.spec.imei, identifier, f.size, digests[id(f.content)]])
    failed = [c for c in cams if not (c.result.ok or group.background)]
    return {
        "name": group.name,
        "background": group.background,
        "cameras": len(cams),
        "ok": len(cams) - len(failed),
        "files_total": sum(c.result.files_total for c in cams),
        "files": len(completions),
        "file_bytes": sum(size for c in cams for _, size in c.result.delivered),
        "bytes_sent": sum(c.result.bytes_sent for c in cams),
        "data_bytes_sent": sum(c.result.data_bytes_sent for c in cams),
        "started": group.started,
        "last_delivery": last,
        "wall": wall,
        "loadgen_cpu": cpu_done - group.cpu_started,
        "p50": percentile(completions, 0.50),
        "p99": percentile(completions, 0.99),
        "completions_max": max(completions, default=None),
        "synced": sum(1 for c in cams if c.result.syncs),
        "still_connected": group.still_connected,
        "errors": [f"{c.spec.imei}: {e}" for c in failed for e in (c.result.errors or ["not ok"])][:20],
        "per_camera_bytes_sent": {str(c.spec.imei): c.result.bytes_sent for c in cams} if not group.background else {},
        "expected": expected,
    }


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    nofile = raise_nofile()
    t0 = time.monotonic()
    rng = random.Random(spec.get("seed", 1))
    groups = [Group(raw, rng) for raw in spec["groups"]]
    plans = PlanCache()
    digests: dict[int, str] = {}
    for g in groups:  # precompute every frame plan, its stream from the start, and its SHA-256
        g.digests = digests
        for c in g.cameras:
            for f in c.spec.files:
                plans.get(f.content).wire()
                if id(f.content) not in digests and not g.background:
                    digests[id(f.content)] = hashlib.sha256(f.content).hexdigest()
    event("precomputed", seconds=time.monotonic() - t0, nofile=nofile,
          cameras=sum(len(g.cameras) for g in groups))
    endpoint = TCP4ClientEndpoint(reactor, spec["host"], spec["port"], timeout=60)

    by_phase: dict[int, list[Group]] = {}
    for g in groups:
        by_phase.setdefault(g.phase, []).append(g)
    for phase in sorted(by_phase):
        if phase > 0:
            earlier = [g for p in by_phase if p < phase for g in by_phase[p]]
            if earlier:
                await wait_until(lambda: all(g.ready() for g in earlier))
                event("ready", phase=phase - 1, connected=sum(len(g.cameras) for g in earlier))
            if spec.get("go_file"):
                await wait_until(lambda: os.path.exists(spec["go_file"]), 0.05)
            event("go", phase=phase)
        for g in by_phase[phase]:
            start_group(g, endpoint, plans)

    foreground = [g for g in groups if not g.background]
    if foreground:
        for g in foreground:
            await wait_until(lambda g=g: g.finished is not None)
            await g.finished  # type: ignore[misc]
    else:  # background cameras only: the measured ones run in another process
        await wait_until(lambda: all(g.ready() for g in groups))
        event("ready", phase=max(by_phase), connected=sum(len(g.cameras) for g in groups))
        await wait_until(lambda: os.path.exists(spec["stop_file"]), 0.05)
    done_at, cpu_done = time.monotonic(), cpu_seconds()
    event("done", foreground=bool(foreground))
    for g in groups:
        if g.background:
            g.still_connected = sum(1 for c in g.cameras if c.protocol is not None and not c.protocol.closed.called)
            for c in g.cameras:
                if c.protocol is not None and c.protocol.transport is not None:
                    c.protocol.transport.abortConnection()
    return {
        "nofile": nofile,
        "groups": [group_report(g, done_at, cpu_done) for g in groups],
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def run(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    outcome: dict[str, Any] = {}

    def go() -> Deferred:
        d = ensureDeferred(main(spec))
        d.addCallback(outcome.update)
        d.addErrback(lambda failure: outcome.update(error=failure.getTraceback()))
        d.addBoth(lambda _: reactor.stop())
        return d

    reactor.callWhenRunning(go)
    reactor.callLater(float(spec.get("deadline", 600)), lambda: (
        outcome.setdefault("error", "deadline reached"), reactor.stop()))
    reactor.run()
    with open(spec["out"], "w") as f:
        json.dump(outcome, f)
    event("exit", error=outcome.get("error"))


if __name__ == "__main__":
    run(sys.argv[1])
