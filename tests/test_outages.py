"""Outages with the real components: Redis killed, a full spool, the gateway killed mid-delivery.

Black-box tests: every component is a separate process (``redis-server``,
``twistd -n camgateway``, the emulator ``python -m camgateway.sim``), as in
tests/test_scaleout.py. The emulator's cameras reconnect and offer again
whatever they were not told is done, as devices do; at the end the disk sink's
folder is compared with what the emulator says was acknowledged, byte for byte
(the expected contents are rebuilt from the emulator's own options and seed).

- :class:`RedisOutageTests`: Redis (append-only, fsync always) ``kill -9`` for
  6 s while 40 cameras send, then restarted on the same port and data;
- :class:`FullSpoolTests`: the spool (with the SQLite store) on an 8 MB tmpfs
  filled up by another file while 20 cameras send, then freed (needs root to
  mount; skipped otherwise);
- :class:`GatewayKilledTests`: the gateway ``kill -9`` five times while its
  outbox delivers, restarted each time on the same spool and port.

Every camera file the emulator was told is done is stored exactly once, with
its bytes: one media file with its sidecar, never a numbered ``-2`` copy. That
includes a file the camera sent again because a killed gateway had received
all of it but not yet told the camera (the disk sink recognises the same
content under the same name).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from twisted.trial.unittest import SkipTest, TestCase

from tests.test_redis_store import REDIS_SERVER, SKIP_REDIS
from tests.test_scaleout import free_port, wait
from tests.test_twistd import Gateway, twistd

#: A stored media file name made unique by the disk sink (``name-2.jpg``): a second file under one name.
NUMBERED = re.compile(r"-\d+\.[A-Za-z0-9]+$")


# -- the processes


class PersistentRedis:
    """A ``redis-server`` that keeps every acknowledged write across ``kill -9``.

    Append-only file fsynced on every write, its own folder, one port for its
    whole life: :meth:`start` after :meth:`kill` brings back the same data on
    the same address.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        """The ``storage.resume`` URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server and wait until it answers PING."""
        import redis

        first = self.port == 0
        for _ in range(5 if first else 1):  # a free port may be taken before the server binds it
            if first:
                self.port = free_port()
            self.process = subprocess.Popen(
                [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", "redis.log",
                 "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = redis.Redis(port=self.port, socket_connect_timeout=1)
            try:
                deadline = time.monotonic() + 15
                while self.process.poll() is None and time.monotonic() < deadline:
                    try:
                        if client.ping():
                            return
                    except (redis.ConnectionError, redis.BusyLoadingError):
                        time.sleep(0.02)
            finally:
                client.close()
            self.kill()
        log = self.dir / "redis.log"
        raise AssertionError(f"redis-server did not start on port {self.port}:\n"
                             f"{log.read_text() if log.exists() else '(no log)'}")

    def kill(self) -> None:
        """``kill -9`` the server (no shutdown save: only what the append-only file holds survives)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)


class Emulator:
    """``python -m camgateway.sim`` in the background, with ``--json`` results.

    The options are kept, so the files each camera holds (and their sha256)
    can be rebuilt here exactly as the emulator built them.
    """

    def __init__(self, work: Path, port: int, *options: str) -> None:
        self.options = ["--connect", f"tcp:host=127.0.0.1:port={port}", *options]
        self.out, self.err = work / "sim.out", work / "sim.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "camgateway.sim", *self.options, "-q", "--json"],
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def running(self) -> bool:
        """Whether the emulator still runs (some camera still holds files)."""
        return self.process.poll() is None

    def stop(self) -> None:
        """Kill the emulator if it still runs (cleanup)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def finish(self, timeout: float) -> tuple[str, list[dict[str, Any]]]:
        """Wait for the emulator's exit: its summary and every camera's result."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"the emulator did not finish in {timeout} s:\n{self.out.read_text()[:3000]}")
        text = self.out.read_text()
        if "\n[" not in text:
            raise AssertionError(f"the emulator exited {code} without results:\n{text}\n{self.err.read_text()}")
        summary, results = text[:text.index("\n[")], json.loads(text[text.index("\n[") + 1:])
        return summary, results

    def expected(self) -> dict[tuple[str, str], str]:
        """``(imei, device path) -> sha256`` of every file the cameras hold."""
        from camgateway.sim.cli import Options, build_specs

        options = Options()
        options.parseOptions(self.options)
        return {(str(spec.imei), f.identifier): hashlib.sha256(f.content).hexdigest()
                for spec in build_specs(options) for f in spec.files}


def acknowledged(results: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """``(imei, device path) -> size`` of every file the emulator's cameras were told is done."""
    return {(str(r["imei"]), identifier): size for r in results for identifier, size in r["delivered"]}


# -- the gateway's answers


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``http://127.0.0.1:port/path``: status and body (a 503 is an answer, not an error)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    """``/healthz``: status and JSON body."""
    code, body = http_get(port, "healthz")
    return code, json.loads(body)


def healthz_answers(port: int, code: int) -> Any:
    """A check for :func:`wait`: ``/healthz``'s (status, body) once its status is ``code``."""
    def check() -> Optional[tuple[int, dict[str, Any]]]:
        answer = healthz(port)
        return answer if answer[0] == code else None

    return check


def metrics(port: int) -> dict[str, float]:
    """``/metrics``: every sample, by its name with labels (``camgateway_degraded{part="store"}``)."""
    code, body = http_get(port, "metrics")
    assert code == 200, (code, body[:200])
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def drained(port: int) -> bool:
    """Nothing left to do: no transfer, no file in the outbox, no file waiting for the store."""
    m = metrics(port)
    return (m["camgateway_outbox_depth"] == 0 and m["camgateway_files_awaiting_store"] == 0
            and m["camgateway_transfers_active"] == 0)


def events(log: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log records of ``log`` with ``"event": name``."""
    found = []
    for line in log.read_text().splitlines():
        if f'"{name}"' in line:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by kill -9
            if record.get("event") == name:
                found.append(record)
    return found


# -- what the disk sink holds


@dataclasses.dataclass
class Stored:
    """One media file of the disk sink, with its sidecar."""

    path: Path
    sidecar: dict[str, Any]
    sha256: str

    @property
    def key(self) -> tuple[str, str]:
        """``(imei, device path)``: the camera file this is a copy of."""
        return str(self.sidecar["imei"]), self.sidecar["device_path"]


def stored_count(root: Path) -> int:
    """How many media files the disk sink holds (cheap: names only)."""
    return sum(1 for _, _, names in os.walk(root) for n in names if not n.startswith(".") and not n.endswith(".json"))


def inventory(root: Path) -> tuple[list[Stored], list[Path]]:
    """Every stored media file with its sidecar, and the sidecars without a media file."""
    found, orphans = [], []
    for meta in sorted(root.rglob("*.json")):
        if meta.name.startswith("."):
            continue
        media = meta.with_name(meta.name[:-len(".json")])
        if not media.exists():
            orphans.append(meta)
            continue
        found.append(Stored(media, json.loads(meta.read_bytes()), hashlib.sha256(media.read_bytes()).hexdigest()))
    return found, orphans


#: A file received this long before the gateway was killed may not have been acknowledged yet (seconds).


def received_at(sidecar: dict[str, Any]) -> float:
    """The sidecar's ``received_at`` (ISO 8601 UTC), in seconds since the epoch."""
    return datetime.datetime.fromisoformat(sidecar["received_at"].replace("Z", "+00:00")).timestamp()


def check_stored(root: Path, expected: dict[tuple[str, str], str], acked: dict[tuple[str, str], int]) -> dict[str, Any]:
    """Compare the disk sink's folder with what the cameras sent and were told is done.

    Raises AssertionError naming every file lost, corrupted or stored twice
    (also a file a killed process received in full and the camera sent
    again to the next one: the disk sink recognises it by its content).
    Returns counts for the report.
    """
    stored, orphans = inventory(root)
    problems: list[str] = []
    media = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix != ".json"]
    without_sidecar = sorted(set(media) - {s.path for s in stored})
    problems += [f"media file without a sidecar: {p}" for p in without_sidecar]
    problems += [f"sidecar without its media file: {p}" for p in orphans]
    by_key: dict[tuple[str, str], list[Stored]] = {}
    by_id: dict[str, list[Stored]] = {}
    for s in stored:
        by_key.setdefault(s.key, []).append(s)
        by_id.setdefault(s.sidecar["id"], []).append(s)
        want = expected.get(s.key)
        if want is None:
            problems.append(f"{s.path}: no camera sent {s.key}")
        elif not s.sha256 == s.sidecar["sha256"] == want:
            problems.append(f"{s.path}: corrupted: content sha256 {s.sha256}, sidecar {s.sidecar['sha256']},"
                            f" sent {want}")
    for file_id, copies in by_id.items():
        if len(copies) > 1:
            problems.append(f"one delivery ({file_id}) stored {len(copies)} times: {[str(c.path) for c in copies]}")
    for key, size in sorted(acked.items()):
        if key not in by_key:
            problems.append(f"acknowledged but not stored (lost): camera {key[0]} {key[1]} ({size} bytes)")
    for key, copies in sorted(by_key.items()):
        if len(copies) == 1:
            continue
        problems.append(f"camera {key[0]} {key[1]} stored {len(copies)} times"
                        f" (ids {[c.sidecar['id'] for c in copies]}): {[c.path.name for c in copies]}")
    numbered = [s for s in stored if NUMBERED.search(s.path.name)]
    for s in numbered:
        if len(by_key.get(s.key, [])) == 1:
            problems.append(f"{s.path.name}: a numbered name for the only copy of {s.key}")
    if problems:
        raise AssertionError(f"{len(problems)} problems in {root} ({len(stored)} stored, {len(acked)} acknowledged):\n"
                             + "\n".join(problems[:40]))
    return {"stored": len(stored), "acknowledged": len(acked), "numbered_names": len(numbered)}


class OutageTestCase(TestCase):
    """A work folder, and the pieces every outage test starts."""

    def setUp(self) -> None:
        if not Path(twistd()).exists() and shutil.which(twistd()) is None:
            raise SkipTest(f"twistd is not installed ({twistd()}): pip install -e . in a venv")
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.files = self.work / "files"
        #: Faults that do not lose files, checked last so that the files are checked anyway.
        self.defects: list[str] = []

    def outage_metrics(self, port: int, during: str) -> dict[str, float]:
        """``/metrics`` during an outage; a defect (and no samples) if it does not answer 200."""
        code, body = http_get(port, "metrics")
        if code != 200:
            defect = (f"/metrics answers {code} while {during} ({body[:60]!r}): camgateway_degraded and"
                      " camgateway_files_awaiting_store cannot be scraped when they matter")
            if defect not in self.defects:
                self.defects.append(defect)
            return {}
        return metrics(port)

    def config(self, name: str, **sections: Any) -> Path:
        """A gateway configuration file (JSON is YAML) with the sections given."""
        path = self.work / f"{name}.yaml"
        path.write_text(json.dumps(sections))
        return path

    def gateway(self, config: Path) -> Gateway:
        """A running ``twistd -n camgateway``, killed at cleanup."""
        gateway = Gateway(self.work, "--config", str(config))
        self.addCleanup(gateway.stop, signal.SIGKILL)
        return gateway

    def emulator(self, port: int, *options: str) -> Emulator:
        """The emulator sending to ``port``, killed at cleanup if it still runs."""
        emulator = Emulator(self.work, port, *options)
        self.addCleanup(emulator.stop)
        return emulator

    def report(self, what: str, **numbers: Any) -> None:
        """A line in the test's output (pytest -s) and in the work folder."""
        line = f"{self.id()}: {what}: " + ", ".join(f"{k}={v}" for k, v in numbers.items())
        print(line)
        with open(self.work / "report.txt", "a") as f:
            f.write(line + "\n")


def camera_options(cameras: int, photos: int, seed: int) -> list[str]:
    """Emulator options: photo-only path-flow cameras, slowed so that each is always in the middle of a file.

    Every file has its own device path (DSM cameras), so a second stored copy
    of one is a duplicate; 16 KiB at 40 KB/s is 0.4 s a photo. The cameras
    reconnect for as long as a test needs (5000 connections each).
    """
    return ["--cameras", str(cameras), "--kind", "dsm", "--photos", str(photos), "--videos", "0",
            "--photo-size", "16K", "--slow", "40K", "--seed", str(seed), "--variants", "1000",
            "--reconnect-delay", "0.25", "--max-connections", "5000", "--idle-timeout", "20"]


class RedisOutageTests(OutageTestCase):
    """Redis killed (``kill -9``) and restarted while cameras send: no acknowledged file lost."""

    def setUp(self) -> None:
        if SKIP_REDIS:
            raise SkipTest(SKIP_REDIS)
        super().setUp()
        self.redis = PersistentRedis(self.work / "redis")
        self.addCleanup(self.redis.kill)
        self.redis.start()

    def test_redis_killed_and_restarted_during_transfers(self) -> None:
        http = free_port()
        config = self.config(
            "gateway",
            listen=["tcp:0:interface=127.0.0.1"], http={"listen": [f"tcp:{http}:interface=127.0.0.1"]},
            storage={"spool": str(self.work / "spool"), "resume": self.redis.url, "instance": "gw1",
                     "lease_ttl": 5},
            sinks=[{"type": "disk", "root": str(self.files)}], timeouts={"idle": 30, "metadata": 5},
            log={"format": "json"})
        gateway = self.gateway(config)
        emulator = self.emulator(gateway.port, *camera_options(40, 15, seed=11))
        expected = emulator.expected()
        wait(lambda: stored_count(self.files) >= 80 or not emulator.running(), timeout=30,
             what="80 files stored before the outage")
        self.assertTrue(emulator.running(), "the emulator finished before the outage: more load needed")
        before = stored_count(self.files)
        killed = time.monotonic()
        self.redis.kill()
        code, body = wait(healthz_answers(http, 503), timeout=8, what="/healthz 503 while Redis is down")
        self.assertEqual(body["status"], "degraded")
        self.assertIn("store", body["problems"])
        degraded = self.outage_metrics(http, "Redis is down")
        outage = 6.0
        time.sleep(max(0.0, killed + outage - time.monotonic()))  # the outage itself, not a proof of anything
        during = stored_count(self.files) - before
        held = len(events(gateway.log, "file_held_for_store"))
        awaiting = self.outage_metrics(http, "Redis is down").get("camgateway_files_awaiting_store")
        self.redis.start()
        restarted = time.monotonic()
        summary, results = emulator.finish(timeout=40)
        wait(lambda: drained(http), timeout=20, what="the outbox drained")
        code, body = wait(healthz_answers(http, 200), timeout=15, what="/healthz 200 again")
        self.assertEqual(body["status"], "ok")
        counts = check_stored(self.files, expected, acknowledged(results))
        self.assertEqual(emulator.process.returncode, 0, summary)
        self.assertEqual(counts["stored"], len(expected))  # every camera sent every file in the end
        self.assertEqual(counts["numbered_names"], 0)
        late = len(events(gateway.log, "file_recorded_late"))
        # Complete files that finished while Redis was down were held with a note, then recorded.
        self.assertGreater(held, 0, "no file finished during the outage: more load needed")
        self.assertLessEqual(late, held)
        self.assertEqual([p for p in (self.work / "spool" / "finished").rglob("*.json")], [])
        self.assertEqual(degraded.get('camgateway_degraded{part="store"}', 1), 1)
        self.report("redis outage", stored_before=before, stored_during_outage=during, held_for_store=held,
                    awaiting_store_metric=awaiting, recorded_late=late,
                    recovery_s=round(time.monotonic() - restarted, 1), **counts, summary=summary.splitlines()[1])
        self.assertEqual(self.defects, [])


def mount_tmpfs(directory: Path, size: str) -> Optional[str]:
    """Mount a tmpfs of ``size`` on ``directory``; None, or why it cannot be done here."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        return "mount/umount are not installed here"
    if os.geteuid() != 0:
        return "mount not permitted here (mounting a tmpfs needs root)"
    run = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
                         capture_output=True, text=True, timeout=30)
    if run.returncode != 0:
        return f"mount not permitted here: mount -t tmpfs exited {run.returncode}: {run.stderr.strip()}"
    return None


def unmount(directory: Path) -> None:
    """Unmount ``directory`` (lazily if something still holds it)."""
    if subprocess.run(["umount", str(directory)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)


def fill(path: Path, leave: int) -> int:
    """Write ``path`` until its filesystem has about ``leave`` bytes free (or none); the bytes written."""
    st = os.statvfs(path.parent)
    want = max(0, st.f_bavail * st.f_frsize - leave)
    written = 0
    block = b"\0" * (64 * 1024)
    with open(path, "wb") as f:
        try:
            while written < want:
                written += f.write(block[:min(len(block), want - written)])
                f.flush()
        except OSError:  # the gateway took the rest meanwhile: full it is
            pass
    return written


class FullSpoolTests(OutageTestCase):
    """The spool's filesystem (and the SQLite store in it) full while cameras send, then freed."""

    def setUp(self) -> None:
        super().setUp()
        self.spool_fs = self.work / "spoolfs"
        self.spool_fs.mkdir()
        why = mount_tmpfs(self.spool_fs, "8m")
        if why is not None:
            raise SkipTest(why)
        self.addCleanup(unmount, self.spool_fs)  # (cleanups run last first: after the gateway is killed)

    def test_full_spool(self) -> None:
        http = free_port()
        spool = self.spool_fs / "spool"
        config = self.config(
            "gateway",
            listen=["tcp:0:interface=127.0.0.1"], http={"listen": [f"tcp:{http}:interface=127.0.0.1"]},
            storage={"spool": str(spool)}, sinks=[{"type": "disk", "root": str(self.files)}],
            # No reserve kept free: the writes themselves meet the full disk (ENOSPC, SQLITE_FULL).
            limits={"min_free_bytes": 0}, timeouts={"idle": 30, "metadata": 5}, log={"format": "json"})
        gateway = self.gateway(config)
        emulator = self.emulator(gateway.port, *camera_options(20, 15, seed=12))
        expected = emulator.expected()
        wait(lambda: stored_count(self.files) >= 40 or not emulator.running(), timeout=30,
             what="40 files stored before the spool fills")
        self.assertTrue(emulator.running(), "the emulator finished before the spool filled: more load needed")
        filler = self.spool_fs / "filler"
        filled = time.monotonic()
        written = fill(filler, leave=40 * 1024)
        code, body = wait(healthz_answers(http, 503), timeout=10, what="/healthz 503 while the spool is full")
        problems = body.get("problems", {})
        self.outage_metrics(http, "the spool is full")
        full_for = 4.0
        time.sleep(max(0.0, filled + full_for - time.monotonic()))  # the outage itself, not a proof of anything
        self.assertIsNone(gateway.process.poll(), "the gateway died while its spool was full")
        log_text = gateway.log.read_text()
        no_space = log_text.count("No space left on device") + log_text.count("database or disk is full")
        free_at_end = os.statvfs(self.spool_fs).f_bavail * os.statvfs(self.spool_fs).f_frsize
        filler.unlink()
        freed = time.monotonic()
        summary, results = emulator.finish(timeout=40)
        self.assertIsNone(gateway.process.poll(), "the gateway died")
        wait(lambda: drained(http), timeout=20, what="the outbox drained")
        code, body = wait(healthz_answers(http, 200), timeout=15, what="/healthz 200 again")
        counts = check_stored(self.files, expected, acknowledged(results))
        self.assertEqual(counts["numbered_names"], 0)
        self.assertGreater(no_space, 0, "nothing met the full spool: more load needed")
        self.report("full spool", filler_bytes=written, free_while_full=free_at_end, problems=sorted(problems),
                    no_space_errors=no_space, recovery_s=round(time.monotonic() - freed, 1), **counts,
                    summary=summary.splitlines()[1])
        self.assertEqual(emulator.process.returncode, 0, summary)
        self.assertEqual(self.defects, [])


def stored_not_recorded(spool: Path, root: Path) -> int:
    """Outbox entries (of a stopped gateway's SQLite store) whose file the disk sink holds already.

    Each is a delivery made but not recorded when the gateway died: the next
    run delivers it again, and the sink must recognise it.
    """
    db = sqlite3.connect(f"file:{spool / 'resume.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        waiting = {row[0] for row in db.execute("SELECT id FROM outbox")}
    finally:
        db.close()
    held = set()
    for meta in root.rglob("*.json"):
        if not meta.name.startswith("."):
            try:
                held.add(json.loads(meta.read_bytes())["id"])
            except (OSError, ValueError, KeyError):
                pass  # a sidecar being written by no one any more is checked at the end
    return len(waiting & held)


class GatewayKilledTests(OutageTestCase):
    """``kill -9`` of the gateway, again and again, while its outbox delivers: each file stored once."""

    def test_killed_while_delivering(self) -> None:
        port, http = free_port(), free_port()
        spool = self.work / "spool"
        config = self.config(
            "gateway",
            listen=[f"tcp:{port}:interface=127.0.0.1"], http={"listen": [f"tcp:{http}:interface=127.0.0.1"]},
            storage={"spool": str(spool)}, sinks=[{"type": "disk", "root": str(self.files)}],
            timeouts={"idle": 30, "metadata": 5}, log={"format": "json"})
        rng = random.Random()
        seed = rng.randrange(1 << 30)
        gateway = self.gateway(config)
        emulator = self.emulator(port, *camera_options(30, 16, seed=seed))
        expected = emulator.expected()
        kills: list[float] = []
        redelivered = 0
        while len(kills) < 5 and emulator.running():
            # A random moment while the outbox delivers: right as a random
            # file appears in the sink's folder, the moment its delivery is
            # about to be recorded.
            target = stored_count(self.files) + rng.randint(5, 40)
            deadline = time.monotonic() + 30
            while stored_count(self.files) < target and emulator.running():
                self.assertLess(time.monotonic(), deadline, f"{target} files never stored")
                time.sleep(0.002)
            if not emulator.running():
                break
            gateway.stop(signal.SIGKILL)
            kills.append(time.time())
            redelivered += stored_not_recorded(spool, self.files)
            gateway = self.gateway(config)
        self.assertEqual(len(kills), 5, f"the emulator finished after {len(kills)} kills: more load needed"
                                        f" (seed {seed})")
        summary, results = emulator.finish(timeout=40)
        wait(lambda: drained(http), timeout=20, what="the outbox drained")
        wait(healthz_answers(http, 200), timeout=15, what="/healthz 200")
        counts = check_stored(self.files, expected, acknowledged(results))
        self.report("gateway killed", kills=len(kills), seed=seed, stored_not_recorded_at_kills=redelivered, **counts,
                    summary=summary.splitlines()[1])
        self.assertEqual(emulator.process.returncode, 0, summary)
        self.assertEqual(counts["stored"], len(expected))
        # The kills did fall between deliveries and their records (else the sink's recognition went untested).
        self.assertGreater(redelivered, 0, f"no kill fell between a delivery and its record (seed {seed})")
