"""camgateway's performance benchmark: the real gateway against emulated cameras.

    /work/venv/bin/python benchmarks/run.py [--scenarios bulk,photos,idle-10k,big-file] [--quick]

For each load of each scenario (``scenarios.py``) it starts a server, the
real gateway (``twistd -n camgateway`` with a config file, disk sink) or the
floor (``floor.py``), then the load generator (``load.py``) in a process of
its own; it samples both processes' CPU and memory from /proc as the
generator reports progress, stops the server with SIGTERM and checks every
stored file against what was sent. Then it prints one table, a ``BENCH``
JSON line per load, and the targets met or missed. See README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import (Server, available_mib, fd_count, free_port, machine_cpu, raise_nofile, reported_kib,  # noqa: E402
                   sample, tcp_memory_kb, wait_for_quiet, warm_memory)
from camgateway.transfer.writes import FLUSH_AGE, TRICKLE_AGE  # noqa: E402
from report import metrics, print_report, profile_top  # noqa: E402
from scenarios import SCENARIOS, Load, MiB, plan, scaled  # noqa: E402
from verify import scan_gateway_log, verify_floor, verify_gateway  # noqa: E402

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
#: Seconds between "slow cameras all mid-transfer" and the RSS reading (then the fast cameras start):
#: until the last camera to connect has had its first spool write (which records its partial, once
#: per file: TRICKLE_AGE after its first bytes, at the next scan), so that idle-10k measures slow
#: links as they run for hours, not the seconds after 10,000 cameras connected.
SETTLE = TRICKLE_AGE + FLUSH_AGE + 1.0
#: Where the runs' directories go by default: a real disk (/tmp is tmpfs on many systems).
DEFAULT_WORKDIR = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


def py_spy() -> Optional[str]:
    """The py-spy next to this Python (the venv's), else on PATH; None if neither."""
    local = BIN / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def gateway_config(workdir: Path, port: int, workers: str = "1", interface: str = "127.0.0.1") -> Path:
    """The gateway's YAML: everything under ``workdir``, listening on interface:port.

    The log is JSON lines, as in production under systemd (there to standard
    output, here to ``gateway.log``: the same observer).
    """
    path = workdir / "camgateway.yaml"
    path.write_text(
        "# written by benchmarks/run.py\n"
        f'listen: ["tcp:{port}:interface={interface}:backlog=1024"]\n'
        f"workers: {workers}\n"
        "storage:\n"
        f"  spool: {workdir / 'spool'}\n"
        "sinks:\n"
        f"  - {{type: disk, root: {workdir / 'files'}}}\n"
        "timeouts: {idle: 900, step: 120, metadata: 10}\n"
        "limits: {max_connections: 20000, max_file_bytes: 2GiB}\n"
        f"log: {{format: json, file: {workdir / 'gateway.log'}}}\n"
    )
    return path


def make_server(target: str, workdir: Path, port: int, workers: str = "1", floor_processes: int = 1,
                interface: str = "127.0.0.1") -> Server:
    """The gateway (``twistd -n camgateway``) or the floor, in ``workdir``, to listen on interface:port."""
    if target == "gateway":
        config = gateway_config(workdir, port, workers, interface)
        log = workdir / "gateway.log"
        argv = [str(BIN / "twistd"), "-n", "--pidfile=", "camgateway", "--config", str(config)]
        return Server("gateway", argv, log, "listening for cameras", workdir)
    argv = [sys.executable, str(HERE / "floor.py"), "--port", str(port), "--root", str(workdir / "floor"),
            "--processes", str(floor_processes), "--interface", interface]
    return Server("floor", argv, workdir / "floor.out", "floor listening", workdir)


class Events:
    """The generator processes' ``EVENT`` lines, each stamped with samples of every process.

    One reader thread per generator process. ``ready`` (the slow cameras are
    all mid-transfer) is followed by a pause, a reading of the server's memory
    and descriptors, and the go file that starts the measured cameras.
    ``done`` from the process of the measured cameras is followed by the wait
    for the sink (event ``stored``), then the stop file that ends background
    processes.
    """

    def __init__(self, server: Server, loaders: list[subprocess.Popen], measured_proc: int,
                 go_file: Path, stop_file: Path, sink: Optional[Path], sink_files: int,
                 measured: str, profile_to: Optional[Path], sink_timeout: float = 180.0,
                 warm_mib: int = 0, background: bool = False) -> None:
        self.server = server
        #: MiB of memory warmed just before the go file (:func:`procs.warm_memory`).
        self.warm_mib = warm_mib
        #: Whether slow cameras must be ready first (the go file follows their ``ready``,
        #: not the measured generator's ``precomputed``).
        self.background = background
        self.loaders = loaders
        self.measured_proc = measured_proc
        self.go_file = go_file
        self.stop_file = stop_file
        self.sink = sink
        self.sink_files = sink_files
        self.sink_timeout = sink_timeout
        self.measured = measured
        self.profile_to = profile_to
        self.profiler: Optional[subprocess.Popen] = None
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(len(loaders))]
        for t in self.threads:
            t.start()

    def _stamp(self, ev: dict[str, Any]) -> dict[str, Any]:
        ev["server"] = sample(self.server.pid)
        ev["loaders"] = [sample(p.pid) for p in self.loaders]
        ev["busy"], ev["steal"] = machine_cpu()
        with self._lock:
            self.events.append(ev)
        return ev

    def _read(self, proc: int) -> None:
        stream = self.loaders[proc].stdout
        assert stream is not None
        for line in stream:
            if not line.startswith("EVENT "):
                continue
            ev = self._stamp(dict(json.loads(line[6:]), proc=proc))
            if (ev["event"] == "started" and ev.get("group") == self.measured
                    and self.profile_to is not None and self.profiler is None):
                self.profiler = subprocess.Popen(
                    [py_spy() or "py-spy", "record", "--pid", str(self.server.pid), "--rate", "100",
                     "--threads", "--idle", "--nonblocking", "--format", "raw", "-o", str(self.profile_to),
                     *os.environ.get("CAMGW_BENCH_PYSPY", "").split()],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if ev["event"] == "ready" and self.background:
                time.sleep(SETTLE)
                ev["settled"] = sample(self.server.pid)
                ev["server_fds"] = fd_count(self.server.pid)
                ev["tcp_mem_kb"] = tcp_memory_kb()
                self._go(ev)
            if ev["event"] == "precomputed" and proc == self.measured_proc and not self.background:
                self._go(ev)
            if ev["event"] == "done" and proc == self.measured_proc:
                self._wait_for_sink()
                if self.profiler is not None:
                    self.profiler.send_signal(2)  # SIGINT: py-spy writes its output and exits
                self.stop_file.touch()

    def _go(self, ev: dict[str, Any]) -> None:
        """Warm the memory the run is about to write into, then let the measured cameras start."""
        if self.warm_mib:
            ev["warm_s"] = warm_memory(self.warm_mib)
            ev["warm_mib"] = self.warm_mib
        self.go_file.touch()

    def _wait_for_sink(self) -> None:
        """The cameras are done: wait until every file is in the sink (a gateway may
        acknowledge a file once it is durable in its spool and deliver it to the
        sink after), then sample as event ``stored``."""
        if self.sink is None:
            return
        n = wait_for_sidecars(self.sink, self.sink_files, self.sink_timeout)
        self._stamp({"event": "stored", "t": time.monotonic(), "files": n, "proc": self.measured_proc})


def wait_for_sidecars(root: Path, files: int, timeout: float, stall: Optional[float] = None) -> int:
    """Wait until the disk sink under ``root`` holds ``files`` files, at most ``timeout`` s (or, with
    ``stall``, until its count has not moved for that long); how many it holds."""
    deadline = time.monotonic() + timeout
    n, moved = count_sidecars(root), time.monotonic()
    while n < files and time.monotonic() < deadline and (stall is None or time.monotonic() - moved < stall):
        time.sleep(0.02)
        now = count_sidecars(root)
        if now != n:
            n, moved = now, time.monotonic()
    return n


def count_sidecars(root: Path) -> int:
    """Files stored by the disk sink so far (each has a ``.json`` sidecar)."""
    n = 0
    stack = [str(root)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.name.endswith(".json") and not e.name.startswith("."):
                    n += 1
    return n


def run_one(load: Load, target: str, base: Path, opts: argparse.Namespace,
            profile_to: Optional[Path] = None) -> dict[str, Any]:
    """One load against one server (recorded by py-spy into ``profile_to`` if given)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"camgw-bench-{load.label}-{target}-", dir=base))
    port = free_port()
    server = make_server(target, workdir, port, opts.workers, opts.floor_processes)
    out: dict[str, Any] = {"target": target, "workdir": str(workdir), "code": code_digest()}
    t = time.monotonic()
    out["busy_before"] = wait_for_quiet(timeout=opts.quiet_wait) if opts.quiet_wait > 0 else None
    out["quiet_wait_s"] = time.monotonic() - t
    try:
        server.start()
    except RuntimeError:
        if not opts.keep:
            retire(workdir)
        raise
    try:
        time.sleep(0.5)
        out["idle"] = sample(server.pid)
        out["idle_fds"] = fd_count(server.pid)
        out["idle_tcp_mem_kb"] = tcp_memory_kb()
        # Every load's measured cameras start on the go file: after the slow
        # cameras are ready (idle-10k), or once their generator has precomputed
        # its frames; just before it, the memory the run will write into is warmed.
        go_file = workdir / "go"
        groups_run = [dict(g, phase=g.get("phase", 1)) for g in load.groups]
        background = any(g.get("background") for g in load.groups)
        reported_before = reported_kib()
        stop_file = workdir / "stop"
        procs = sorted({g.get("process", 0) for g in load.groups})
        loaders = []
        for proc in procs:
            spec = {"host": "127.0.0.1", "port": port, "seed": 1 + proc, "out": str(workdir / f"load-{proc}.json"),
                    "go_file": str(go_file), "stop_file": str(stop_file),
                    "deadline": load.deadline, "groups": [g for g in groups_run if g.get("process", 0) == proc]}
            (workdir / f"load-spec-{proc}.json").write_text(json.dumps(spec))
            with open(workdir / f"load-{proc}.err", "wb") as err:
                loaders.append(subprocess.Popen(
                    [sys.executable, str(HERE / "load.py"), str(workdir / f"load-spec-{proc}.json")],
                    stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=raise_nofile))
        measured = load.group(load.measured)
        files = measured["cameras"] * (measured.get("photos", 0) + measured.get("videos", 0))
        events = Events(server, loaders, procs.index(measured.get("process", 0)), go_file, stop_file,
                        workdir / "files" if target == "gateway" else None, files, load.measured, profile_to,
                        warm_mib=warm_size(load, opts.warm), background=background)
        deadline = time.monotonic() + load.deadline + 120
        for loader in loaders:
            try:
                loader.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                loader.kill()
                loader.wait(10)
                out["error"] = "load generator killed at its deadline"
        for t in events.threads:
            t.join(SETTLE + 5)
        out["end"] = sample(server.pid)
        out["end_fds"] = fd_count(server.pid)
        out["events"] = events.events
        reported_after = reported_kib()
        if reported_before is not None and reported_after is not None:
            out["reported_kib"] = reported_after - reported_before  # returned to the host during the run
        if events.profiler is not None:
            try:
                events.profiler.wait(30)
            except subprocess.TimeoutExpired:
                events.profiler.kill()
            out["profile"] = str(profile_to)
        out["load"] = {"groups": []}
        for proc in procs:
            try:
                part = json.loads((workdir / f"load-{proc}.json").read_text())
            except (OSError, ValueError) as e:
                part = {"error": f"no result from load generator {proc}: {e}; "
                                 f"stderr: {(workdir / f'load-{proc}.err').read_text()[-2000:]}"}
            out["load"]["groups"] += part.pop("groups", [])
            if "error" in part:
                out["load"]["error"] = part["error"]
    finally:
        t = time.monotonic()
        out["exit_status"] = server.stop(timeout=90)
        out["stop_seconds"] = time.monotonic() - t
    groups = {g["name"]: g for g in out.get("load", {}).get("groups", [])}
    measured = groups.get(load.measured, {})
    if target == "gateway":
        out["verify"] = verify_gateway(workdir / "files", measured.get("expected", []))
        out["log"] = scan_gateway_log(server.log_text())
        out["progress_times"] = out["log"].pop("progress_times")
        out["clock_offset"] = time.time() - time.monotonic()  # the log's wall clock to the events' monotonic one
    else:
        out["verify"] = verify_floor(workdir / "floor", measured.get("per_camera_bytes_sent", {}))
        out["log"] = {"reactor": "EPollReactor" if "EPollReactor" in server.log_text() else "?"}
    for g in groups.values():
        g.pop("expected", None)
        g.pop("per_camera_bytes_sent", None)
    if not opts.keep:
        retire(workdir)
    os.sync()
    return out


def load_bytes(load: Load) -> int:
    """File bytes the load's foreground cameras send."""
    return sum(g["cameras"] * (g.get("photos", 0) * g.get("photo_size", 0)
                               + g.get("videos", 0) * g.get("video_size", 0))
               for g in load.groups if not g.get("background"))


def warm_size(load: Load, warm: str) -> int:
    """MiB to warm before ``load``'s measured cameras start (``--warm``: auto, 0, or MiB)."""
    if warm != "auto":
        return int(warm)
    # Twice what the run writes (its files in the page cache, and the sockets'
    # and processes' buffers), and a margin; never a third of what is free.
    return min(2 * load_bytes(load) // MiB + 256, available_mib() // 3)


def retire(workdir: Path) -> None:
    """Free a finished run's disk space, but keep its inodes until the end of the benchmark.

    Every file is emptied, none is removed: on ext4 without a journal (this
    kind of VM), a new inode is never one freed in the last 1-6 minutes, and
    finding one skips each of those by reading its inode; so thousands of files
    removed between runs made every file the next run creates cost 0.3-0.5 ms
    of kernel CPU instead of 0.02 ms (measured), for both servers, and the
    gateway creates more files per photo than the floor. :func:`remove_all`
    removes the directories at the end.
    """
    for folder, _, names in os.walk(workdir):
        for name in names:
            try:
                os.truncate(os.path.join(folder, name), 0)
            except OSError:
                pass


def remove_all(session: Path) -> None:
    """The benchmark is over: remove every run's directory."""
    shutil.rmtree(session, ignore_errors=True)


def create_cost_us(folder: Path, n: int = 500) -> float:
    """Kernel and user CPU per empty file created in ``folder`` (the files are left there)."""
    probe = folder / "create-probe"
    probe.mkdir()
    t = time.process_time()
    for i in range(n):
        os.close(os.open(probe / f"f{i}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    return (time.process_time() - t) / n * 1e6


def quick_figure(load: Load, r: dict[str, Any]) -> str:
    """The run's headline figure, for the progress line."""
    m = metrics(load, r)
    if "error" in m:
        return ""
    return f"{m['rate']:8.1f} {load.unit:<7} (server CPU {m['server_cpu_pct'] or 0:.0f}%, " \
           f"main thread {m['reactor_cpu_pct'] or 0:.0f}% + {m['reactor_runqueue_pct'] or 0:.0f}% waiting for a CPU, " \
           f"generator {m['loadgen_cpu_pct']:.0f}%, others {m['others_cpu_pct'] or 0:.0f}%, " \
           f"stolen by the host {m['steal_cpu_pct'] or 0:.0f}%" + \
           (f"; {m['warm_MiB']} MiB warmed in {m['warm_s']:.1f} s" if m.get("warm_MiB") else "") + \
           (f"; {m['reported_MiB']:.0f} MiB returned to the host" if m.get("reported_MiB") else "") + ")"


def code_digest() -> str:
    """A digest of the package's sources now (to notice edits made during a benchmark)."""
    h = hashlib.sha256()
    for path in sorted((HERE.parent / "camgateway").rglob("*.py")):
        try:
            h.update(path.read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:12]


def code_version() -> str:
    """The commit measured, and how many files of the package differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "camgateway"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head} + {len(dirty)} changed files under camgateway/" if dirty else head


#: Above this (microseconds of CPU per file created), the run warns: see :func:`retire`.
SLOW_CREATE_US = 100.0


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/self/mounts)."""
    best, kind = "", "?"
    real = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mount, fstype = line.split()[:3]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fstype
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description="camgateway performance benchmark")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all; 'none' with "
                             "--profile to profile only)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check in 1-2 minutes")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="where spools, stored files and logs go: a real disk, not tmpfs (default /var/tmp:"
                             " /tmp is tmpfs on many systems)")
    parser.add_argument("--results", default=str(HERE / "results"), help="where profiles and the report go")
    parser.add_argument("--slow", type=int, default=None,
                        help="idle-10k: slow cameras (default 10000, or fewer if RLIMIT_NOFILE cannot hold them)")
    parser.add_argument("--profile", nargs="?", const="bulk-100", default=None, metavar="LOAD",
                        help="after the measured runs, run this load (default bulk-100) once more against "
                             "the gateway under py-spy, and print its hot spots")
    parser.add_argument("--profile-scale", type=int, default=5, metavar="N",
                        help="the profiled run carries N times the files per camera of LOAD (default 5),"
                             " so that py-spy at 100 Hz gets enough samples of a load that lasts seconds")
    parser.add_argument("--repeat", type=int, default=None,
                        help="run each load N times against each server and report the median run "
                             "(default: 1 in quick mode; in full mode 3 for bulk and photos, 1 for the others)")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="S",
                        help="before each run, wait up to S seconds for other processes to leave the CPUs "
                             "(< 0.25 CPU busy for 1 s); 0 to start at once")
    parser.add_argument("--keep", action="store_true", help="keep every run's directory")
    parser.add_argument("--workers", default="auto", metavar="N",
                        help="the gateway's workers setting (default auto: one process per core; 1: one process)")
    parser.add_argument("--floor-processes", type=int, default=1, metavar="N",
                        help="receiving processes of the floor (SO_REUSEPORT; default 1: the minimal receiver)")
    parser.add_argument("--warm", default="auto", metavar="MIB",
                        help="MiB of memory to write and free just before each run's measured cameras start"
                             " (default auto: twice the run's bytes + 256; 0: none). On a VM that returns free"
                             " memory to its host, that memory costs a host fault per page when next written;"
                             " see benchmarks/README.md")
    parser.add_argument("--targets", default="gateway,floor", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.warm != "auto" and not opts.warm.isdigit():
        parser.error(f"--warm: auto, 0 or a number of MiB, not {opts.warm!r}")
    if opts.profile and py_spy() is None:
        parser.error(f"--profile needs py-spy: {BIN / 'pip'} install py-spy")

    raise_nofile()
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # A mid-transfer camera holds two descriptors in the gateway (its socket and
    # its spool file) and in the floor (socket and output file); keep room for
    # the 100 fast cameras, the stores' files, logs and the thread pool.
    max_slow = opts.slow if opts.slow is not None else (nofile - 2 * 100 - 100) // 2
    names = [n.strip() for n in opts.scenarios.split(",") if n.strip() and n.strip() != "none"]
    loads = plan(names, opts.quick, max_slow)
    Path(opts.results).mkdir(parents=True, exist_ok=True)
    # Absolute: each server runs in its own directory, and its config names the paths.
    workroot = Path(opts.workdir).resolve()
    workroot.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="camgw-bench-", dir=workroot))
    try:
        run_all(opts, loads, base, max_slow, nofile)
    finally:
        if opts.keep:
            print(f"kept: {base}")
        else:
            remove_all(base)


def run_all(opts: argparse.Namespace, loads: list[Load], base: Path, max_slow: int, nofile: int) -> None:
    """Every load against every server, then the report."""
    context = {
        "mode": "quick" if opts.quick else "full",
        "cpus": os.cpu_count(),
        "nofile": nofile,
        "workdir": str(base),
        "workdir_fs": filesystem_of(base),
        "create_us": round(create_cost_us(base), 1),
        "python": sys.version.split()[0],
        "code": code_version(),
        "gateway_workers": opts.workers,
        "floor_processes": opts.floor_processes,
        "warm": opts.warm,
        "reported_kib": reported_kib(),
    }
    print(f"camgateway benchmark ({context['mode']}) of {context['code']}: {len(loads)} loads x gateway"
          f" (workers: {opts.workers}) + floor ({opts.floor_processes} process(es)); "
          f"workdir {base} ({context['workdir_fs']}, {context['create_us']} us of CPU per file created);"
          f" RLIMIT_NOFILE {nofile}; {context['cpus']} CPUs", flush=True)
    if context["create_us"] > SLOW_CREATE_US:
        print(f"WARNING: creating a file in {base.parent} costs {context['create_us']} us of CPU (a healthy disk:"
              " 15-30 us). On ext4 without a journal, inodes freed in the last minutes there are skipped one by"
              " one when a file is created; every figure will be low, the gateway's most (it creates two files"
              " per photo). Wait a few minutes after removing many files there, or use another --workdir.",
              flush=True)
    if context["reported_kib"] is not None:
        given = context["reported_kib"] / 2**20
        print(f"this machine returns free memory to its host (free page reporting: {given:.1f} GiB since boot):"
              " writing into memory the host took back costs a host fault per page; "
              + ("each run starts on memory warmed just before (--warm)" if opts.warm != "0" else
                 "--warm 0: runs start on whatever memory the machine has"), flush=True)
    if context["workdir_fs"] in ("tmpfs", "ramfs"):
        print(f"WARNING: {base} is in memory ({context['workdir_fs']}): nothing reaches a disk and fsync is free, so"
              " every figure flatters both servers; use --workdir on a real disk", flush=True)
    results = []
    for load in loads:
        runs: dict[str, list[dict[str, Any]]] = {}
        for i in range(opts.repeat or load.repeat):
            for target in opts.targets.split(","):
                t = time.monotonic()
                print(f"  {load.label:<14} {target:<8}", end=" ", flush=True)
                try:
                    r = run_one(load, target, base, opts)
                except Exception as e:  # noqa: BLE001 - one failed run must not hide the others
                    r = {"target": target, "error": f"{type(e).__name__}: {e}"}
                runs.setdefault(target, []).append(r)
                status = r.get("error") or r.get("load", {}).get("error") or \
                    ("ok" if r.get("verify", {}).get("ok") else f"verify: {r.get('verify')}")
                waited = r.get("quiet_wait_s") or 0
                note = f" (waited {waited:.0f} s for a quiet machine)" if waited > 2.5 else ""
                print(f"{time.monotonic() - t:6.1f} s  {quick_figure(load, r)}  {str(status)[:300]}{note}", flush=True)
        results.append((load, runs))
    profile = None
    if opts.profile:
        chosen = [x for x in plan(list(SCENARIOS), opts.quick, max_slow) if x.label == opts.profile]
        if not chosen:
            sys.exit(f"--profile: no load named {opts.profile!r}")
        raw = Path(opts.results) / f"profile-{opts.profile}.raw"
        raw.unlink(missing_ok=True)
        load = scaled(chosen[0], max(1, opts.profile_scale))
        print(f"  {opts.profile:<14} gateway  under py-spy, x{max(1, opts.profile_scale)} files", end=" ",
              flush=True)
        r = run_one(load, "gateway", base, opts, profile_to=raw)
        print(quick_figure(load, r), flush=True)
        if raw.exists():
            profile = profile_top(raw, 12)
            profile["load"] = opts.profile
            profile["scale"] = max(1, opts.profile_scale)
            profile["rate"] = metrics(load, r).get("rate")
    digests = {r.get("code") for _, runs in results for rs in runs.values() for r in rs if r.get("code")}
    if len(digests) > 1:
        context["code_changed_during_run"] = sorted(digests)
        print(f"WARNING: the camgateway sources changed during the benchmark ({len(digests)} versions "
              "measured): figures of different loads may not be comparable", flush=True)
    print_report(results, context, profile, Path(opts.results))


if __name__ == "__main__":
    main()
