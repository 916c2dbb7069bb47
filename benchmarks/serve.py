"""One server of the benchmark, for a load generator of your own.

    .venv/bin/python benchmarks/serve.py gateway [--port 5000] [--workers auto]
    .venv/bin/python benchmarks/serve.py floor [--port 5001]

starts the real gateway (``twistd -n camgateway`` with the benchmark's
config: disk sink, JSON log, ``workers: auto``) or the floor
(``floor.py``), exactly as ``run.py`` does, in a fresh directory under
``--workdir``, and says where it listens. Drive it with any load: another
machine's generator, real cameras, ``camgateway-sim``. Ctrl-C (or SIGTERM,
or ``--seconds``) ends it: it waits for the gateway's sink to hold every
file acknowledged (the outbox may trail the cameras), stops the server, and
prints what it received and what that cost, then one ``SERVE`` JSON line:

* files and MB (file bytes, 10^6): for the gateway, the media files in
  its disk sink, each checked against its sidecar (size, SHA-256
  recomputed from the disk), none missing of those it acknowledged, no
  temporary file left; for the floor, the files it acknowledged and their
  sizes (from START and each file's last frame: it parses nothing else);
* the busy window: from the first to the last 0.2 s sample in which the
  server used more than a twentieth of a core, and MB/s and files/s over
  it (to 0.2 s: for a short load, the generator's own timing is the finer
  rate);
* CPU seconds over the window, CPU s/GB, peak RSS (``VmHWM``, all
  processes), the most descriptors open (sampled each second), and the host's
  steal over the window.

Run the gateway and then the floor with the same load: the ratio of their
MB/s (or files/s) is the benchmark's ``x floor``. Everything listens on
127.0.0.1 unless ``--interface`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import fd_count, free_port, machine_cpu, sample  # noqa: E402
from run import DEFAULT_WORKDIR, make_server, wait_for_sidecars  # noqa: E402
from verify import scan_gateway_log, scan_sink  # noqa: E402

#: Seconds between samples of the server (the busy window's resolution).
INTERVAL = 0.2
#: A sample interval in which the server used more than this share of a core is busy.
BUSY = 0.05


def gateway_files(workdir: Path) -> tuple[int, int, list[str]]:
    """Files and bytes in the gateway's disk sink, and the problems found checking them."""
    found, problems, temps = scan_sink(workdir / "files")
    if temps:
        problems.append(f"{temps} temporary file(s) left in the sink")
    return sum(found.values()), sum(size * n for (_, size, _), n in found.items()), problems


def floor_files(text: str) -> tuple[int, int]:
    """Files the floor acknowledged and their own bytes (its last line)."""
    match = re.search(r"floor stopped: \d+ connections, (\d+) files, (\d+) file bytes", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", choices=("gateway", "floor"))
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--workers", default="auto", help="the gateway's workers (default auto)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="where the run's directory goes (a real disk; default /var/tmp)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (config, log, files)")
    args = parser.parse_args(argv)

    port = args.port or free_port()
    workroot = Path(args.workdir).resolve()  # absolute: the server runs in the directory its config names
    workroot.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"camgw-serve-{args.target}-", dir=workroot))
    server = make_server(args.target, workdir, port, args.workers, interface=args.interface)
    server.detach = True  # Ctrl-C is for this script: it stops the server once the sink has every file
    stop = {"now": False}

    def request_stop(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        server.start()
        print(f"{args.target} listening on {args.interface}:{port} (directory {workdir}); Ctrl-C to stop",
              flush=True)
        first = sample(server.pid)
        assert first is not None
        samples = [(first, machine_cpu()[1], fd_count(server.pid))]
        n = 0
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        while not stop["now"] and (deadline is None or time.monotonic() < deadline):
            time.sleep(INTERVAL)
            now = sample(server.pid)
            if now is None:
                print(f"{args.target} exited", file=sys.stderr)
                break
            n += 1  # (descriptors each second: listing 20,000 of them costs the server CPU)
            samples.append((now, machine_cpu()[1], fd_count(server.pid) if n % 5 == 0 else 0))
        files_acked = 0
        if args.target == "gateway":  # acknowledged to the cameras; the sink may trail: wait (2 s without one more)
            files_acked = scan_gateway_log(server.log_text())["files_received_logged"]
            wait_for_sidecars(workdir / "files", files_acked, timeout=120.0, stall=2.0)
        last = sample(server.pid)
        if last is not None:
            samples.append((last, machine_cpu()[1], fd_count(server.pid)))
        exit_status = server.stop(timeout=90)
        if args.target == "gateway":
            files, nbytes, problems = gateway_files(workdir)
        else:
            (files, nbytes), problems = floor_files(server.log_text()), []
            files_acked = files
        report = figures(args.target, samples, files, nbytes, problems, files_acked, exit_status)
        print_report(report)
        print("SERVE " + json.dumps(report), flush=True)
        return 0 if report["ok"] else 1
    finally:
        server.stop(timeout=90)
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def figures(target: str, samples: list[tuple[Any, float, int]], files: int, nbytes: int, problems: list[str],
            files_acked: int, exit_status: Optional[int]) -> dict[str, Any]:
    """The report: the busy window's rate and cost."""
    busy = [i for i in range(1, len(samples))
            if samples[i][0].cpu - samples[i - 1][0].cpu > BUSY * (samples[i][0].t - samples[i - 1][0].t)]
    if busy:
        start, end = samples[busy[0] - 1], samples[busy[-1]]
    else:
        start, end = samples[0], samples[-1]
    seconds = max(end[0].t - start[0].t, 1e-9)
    cpu = end[0].cpu - start[0].cpu
    mb = nbytes / 1e6
    return {
        "server": target,
        "ok": not problems and (target == "floor" or files == files_acked),
        "files": files,
        "files_acknowledged": files_acked,
        "MB": round(mb, 3),
        "busy_s": round(seconds, 2),
        "MB_per_s": round(mb / seconds, 1),
        "files_per_s": round(files / seconds, 1),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_GB": round(cpu / (mb / 1000), 2) if mb else None,
        "cpu_pct": round(100 * cpu / seconds),
        "peak_rss_mb": round(max(s[0].hwm_kb for s in samples) / 1024, 1),
        "max_fds": max(s[2] for s in samples),
        "steal_pct": round(100 * (end[1] - start[1]) / seconds),
        "exit_status": exit_status,
        "problems": problems[:10],
    }


def print_report(r: dict[str, Any]) -> None:
    """The human-readable lines."""
    what = (f"{r['files']} files verified against their sidecars" if r["server"] == "gateway"
            else f"{r['files']} files acknowledged")
    print(f"{r['server']}: {r['MB']:.1f} MB held, {what}; busy {r['busy_s']:.2f} s:"
          f" {r['MB_per_s']:.1f} MB/s, {r['files_per_s']:.1f} files/s")
    per_gb = "-" if r["cpu_s_per_GB"] is None else f"{r['cpu_s_per_GB']:.2f}"
    print(f"  CPU {r['cpu_s']:.2f} s ({r['cpu_pct']} % of a core), {per_gb} CPU s/GB; peak RSS"
          f" {r['peak_rss_mb']:.1f} MB; at most {r['max_fds']} descriptors; host steal {r['steal_pct']} %")
    if r["server"] == "gateway" and r["files"] != r["files_acknowledged"]:
        print(f"  the sink holds {r['files']} of the {r['files_acknowledged']} files acknowledged")
    for problem in r["problems"]:
        print(f"  problem: {problem}")
    print("  ok" if r["ok"] else "  NOT ok")


if __name__ == "__main__":
    sys.exit(main())
