"""Turning runs into figures: the table, the ``BENCH`` JSON lines, the targets."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional

from scenarios import Load

__all__ = ["metrics", "print_report", "profile_top"]

MB = 1e6


def _find(events: list[dict[str, Any]], name: str, **match: Any) -> Optional[dict[str, Any]]:
    for ev in events:
        if ev["event"] == name and all(ev.get(k) == v for k, v in match.items()):
            return ev
    return None


def _mb(kb: Optional[int]) -> Optional[float]:
    return None if kb is None else kb / 1024.0


def metrics(load: Load, r: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run (one load against one server)."""
    if "load" not in r:
        return {"error": r.get("error", "no result")}
    lg = r["load"]
    groups = {g["name"]: g for g in lg.get("groups", [])}
    g = groups.get(load.measured)
    events = r.get("events", [])
    start = _find(events, "started", group=load.measured)
    acked = _find(events, "done", proc=start["proc"]) if start else None
    stored = _find(events, "stored")
    done = stored or acked  # the end: every file in the sink (gateway), or acknowledged (floor)
    if g is None or start is None or done is None or not g.get("wall"):
        return {"error": r.get("error") or lg.get("error") or "the measured cameras did not finish",
                "groups": list(groups.values())}
    wall = max(g["wall"], done["t"] - start["t"]) if stored else g["wall"]
    window = done["t"] - start["t"]
    gen = _generator_cpu(start, done, acked)
    server_cpu = done["server"].cpu - start["server"].cpu if done["server"] and start["server"] else None
    idle, end = r.get("idle"), r.get("end")
    peak_kb = max(s.hwm_kb for s in (end, done["server"]) if s) if (end or done["server"]) else None
    m: dict[str, Any] = {
        "cameras": g["cameras"],
        "cameras_ok": g["ok"],
        "files": g["files"],
        "files_total": g["files_total"],
        "MB": g["file_bytes"] / MB,
        "seconds": wall,
        "MB/s": g["file_bytes"] / MB / wall,
        "files/s": g["files"] / wall,
        "server_cpu_s": server_cpu,
        "cpu_s_per_GB": server_cpu / (g["file_bytes"] / 1e9) if server_cpu is not None and g["file_bytes"] else None,
        "server_cpu_pct": 100 * server_cpu / window if server_cpu is not None else None,
        "reactor_cpu_pct": (100 * (done["server"].main_cpu - start["server"].main_cpu) / window
                            if server_cpu is not None else None),
        "reactor_runqueue_pct": (100 * (done["server"].main_wait - start["server"].main_wait) / window
                                 if server_cpu is not None else None),
        "loadgen_cpu_pct": 100 * sum(gen) / window if gen else 100 * g["loadgen_cpu"] / window,
        "loadgen_busiest_process_pct": 100 * max(gen) / window if gen else 100 * g["loadgen_cpu"] / window,
        "loadgen_processes": len(gen) or 1,
        "others_cpu_pct": _others(start, done, window, server_cpu, gen),
        # (part of others_cpu_pct: the hypervisor's, not this machine's)
        "steal_cpu_pct": 100 * (done["steal"] - start["steal"]) / window if "steal" in start else None,
        "rss_idle_MB": _mb(idle.rss_kb) if idle else None,
        "peak_rss_MB": _mb(peak_kb),
        "rss_growth_MB": _mb(peak_kb - idle.rss_kb) if (peak_kb and idle) else None,
        "sink_lag_s": (stored["t"] - g["last_delivery"]) if stored else None,
        "sink_files": stored["files"] if stored else None,
        "p50_s": g["p50"],
        "p99_s": g["p99"],
        "verified": bool(r.get("verify", {}).get("ok")),
        "verify": r.get("verify"),
        "log": r.get("log"),
        "errors": g["errors"][:5],
        "stop_seconds": r.get("stop_seconds"),
        "busy_before_cpus": r.get("busy_before"),
        "exit_status": r.get("exit_status"),
    }
    m["rate"] = m[load.unit]
    warmed = next((ev for ev in events if "warm_s" in ev), None)
    if warmed is not None:
        m["warm_MiB"], m["warm_s"] = warmed["warm_mib"], warmed["warm_s"]
    if r.get("reported_kib") is not None:
        m["reported_MiB"] = r["reported_kib"] / 1024  # free memory the machine gave its host during the run
    progress = r.get("progress_times")
    if progress is not None and "clock_offset" in r:
        # transfer_progress events logged while the measured cameras ran (a
        # burst of them there is CPU the fast cameras did not get)
        m["progress_events_in_window"] = sum(start["t"] <= t - r["clock_offset"] <= done["t"] for t in progress)
    ready = _find(events, "ready")
    slow = next((x for x in groups.values() if x.get("background")), None)
    if ready is not None and slow is not None and idle is not None:
        settled = ready.get("settled") or ready["server"]
        m["slow_cameras"] = slow["cameras"]
        m["slow_requested"] = load.requested_slow
        m["slow_mid_transfer_at_ready"] = slow["synced"]
        m["slow_still_connected_at_end"] = slow.get("still_connected")
        m["rss_before_slow_MB"] = _mb(idle.rss_kb)
        m["rss_with_slow_MB"] = _mb(settled.rss_kb)
        m["per_connection_KB"] = (settled.rss_kb - idle.rss_kb) / slow["cameras"] if slow["cameras"] else None
        m["rss_at_end_MB"] = _mb(done["server"].rss_kb) if done["server"] else None
        m["server_fds_with_slow"] = ready.get("server_fds")
        before, during = r.get("idle_tcp_mem_kb"), ready.get("tcp_mem_kb")
        m["kernel_per_connection_KB"] = ((during - before) / slow["cameras"]
                                         if slow["cameras"] and before is not None and during is not None else None)
        m["connect_seconds"] = ready["t"] - (_find(events, "started", group=slow["name"]) or ready)["t"]
    return m


def _generator_cpu(start: dict[str, Any], done: dict[str, Any], acked: dict[str, Any]) -> list[float]:
    """CPU seconds of each generator process over the run (its last sample if it has exited)."""
    out = []
    for i, first in enumerate(start.get("loaders", [])):
        last = done["loaders"][i] or acked["loaders"][i]
        if first is not None and last is not None:
            out.append(last.cpu - first.cpu)
    return out


def _others(start: dict[str, Any], done: dict[str, Any], window: float, server_cpu: Optional[float],
            gen: list[float]) -> Optional[float]:
    """CPU% of the machine not spent by the server or the generators (other processes, kernel threads)."""
    if server_cpu is None or "busy" not in start:
        return None
    return max(0.0, 100 * (done["busy"] - start["busy"] - server_cpu - sum(gen)) / window)


def median_run(load: Load, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of the median run (by rate) of several; every rate is kept."""
    all_m = [metrics(load, r) for r in runs]
    good = sorted((m for m in all_m if "error" not in m), key=lambda m: m["rate"])
    if not good:
        return all_m[-1]
    m = dict(good[(len(good) - 1) // 2])
    m["runs"] = len(runs)
    m["rates"] = [round(x["rate"], 1) for x in good]
    m["failed_runs"] = len(all_m) - len(good)
    if any(not x["verified"] for x in good):
        m["verified"] = False
        m["verify"] = next(x["verify"] for x in good if not x["verified"])
    return m


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if (a is not None and b) else None


def _fmt(x: Any, spec: str = ".1f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


_RATIO_KEYS = ("rate", "MB/s", "files/s", "cpu_s_per_GB", "peak_rss_MB", "rss_growth_MB", "p50_s", "p99_s",
               "per_connection_KB")


def _pct(value: float, target: float, higher_is_better: bool = True) -> str:
    if higher_is_better:
        return f"{100 * (value - target) / target:+.0f}% vs target"
    return f"{100 * (target - value) / target:+.0f}% headroom" if value <= target else \
        f"{100 * (value - target) / target:.0f}% over"


def targets(table: dict[str, dict[str, Any]]) -> list[tuple[str, Optional[bool], str]]:
    """Each target of the issue: (what, met?, measured)."""
    out: list[tuple[str, Optional[bool], str]] = []

    def gw(label: str) -> dict[str, Any]:
        return table.get(label, {}).get("gateway", {})

    b100, ratio = gw("bulk-100").get("MB/s"), table.get("bulk-100", {}).get("ratio", {}).get("rate")
    if b100 is not None:
        out.append(("bulk-100 >= 150 MB/s", b100 >= 150, f"{b100:.1f} MB/s ({_pct(b100, 150)})"))
    if ratio is not None:
        out.append(("bulk-100 >= 50% of the floor", ratio >= 0.5, f"{100 * ratio:.0f}% of the floor"))
    photos = gw("photos").get("files/s")
    if photos is not None:
        out.append(("photos >= 1,000 files/s", photos >= 1000, f"{photos:.0f} files/s ({_pct(photos, 1000)})"))
    idle = gw("idle-10k")
    if idle.get("per_connection_KB") is not None:
        n = idle["slow_cameras"]
        note = "" if n == idle.get("slow_requested") else f" [{n} slow cameras, not {idle.get('slow_requested')}]"
        peak = idle["peak_rss_MB"]
        out.append(("idle-10k gateway RSS <= 1 GB", peak <= 1024, f"peak {peak:.0f} MB{note}"))
        kb = idle["per_connection_KB"]
        kernel = idle.get("kernel_per_connection_KB")  # the kernel's receive queues count too (read marks)
        out.append(("idle-10k <= 100 KB per connection", kb + max(kernel or 0.0, 0.0) <= 100,
                    f"{kb:.1f} KB per connection"
                    + (f" + {kernel:.1f} KB in the kernel's TCP buffers" if kernel is not None else "")))
        if b100:
            keep = idle["MB/s"] / b100
            floor_idle = table.get("idle-10k", {}).get("floor", {}).get("MB/s")
            floor_b100 = table.get("bulk-100", {}).get("floor", {}).get("MB/s")
            context = (f"; the floor keeps {100 * floor_idle / floor_b100:.0f}% of its own"
                       if floor_idle and floor_b100 else "")
            stolen = (idle.get("steal_cpu_pct"), gw("bulk-100").get("steal_cpu_pct"))
            if None not in stolen:  # the host's share of the two windows: a reason the ratio moves
                context += f"; the host took {stolen[1]:.0f}% of a CPU in bulk-100, {stolen[0]:.0f}% in idle-10k"
            out.append(("idle-10k fast cameras keep >= 80% of bulk-100", keep >= 0.8,
                        f"{idle['MB/s']:.1f} MB/s = {100 * keep:.0f}% of bulk-100's {b100:.1f}{context}"))
    bigs = sorted((label, row["gateway"]) for label, row in table.items()
                  if label.startswith("big-file") and row.get("gateway", {}).get("rss_growth_MB") is not None)
    for label, m in bigs:
        growth = m["rss_growth_MB"]
        out.append((f"{label} RSS growth <= 64 MB", growth <= 64, f"{growth:.1f} MB (peak {m['peak_rss_MB']:.0f} MB)"))
    if len(bigs) >= 2:
        small, large = bigs[0][1]["rss_growth_MB"], bigs[-1][1]["rss_growth_MB"]
        out.append(("big-file RSS growth independent of file size", large - small <= 16,
                    f"{bigs[0][0]} {small:.1f} MB vs {bigs[-1][0]} {large:.1f} MB"))
    for label, row in table.items():
        for target in ("gateway", "floor"):
            m = row.get(target, {})
            if m and not m.get("verified"):
                out.append((f"{label} {target}: every file stored intact", False,
                            json.dumps(m.get("verify") or m.get("error"))[:300]))
    return out


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(type(x).__name__)


def print_report(results: list[tuple[Load, dict[str, Any]]], context: dict[str, Any],
                 profile: Optional[dict[str, Any]], out_dir: Path) -> None:
    """Print (and save under ``out_dir``) the table, BENCH lines, idle details and targets."""
    lines: list[str] = []
    table: dict[str, dict[str, Any]] = {}
    header = (f"{'load':<15} {'server':<7} {'cams':>5} {'MB':>7} {'s':>6} {'rate':>13} {'x floor':>7} "
              f"{'CPU s/GB':>8} {'CPU%':>5} {'main%':>5} {'rq%':>4} {'peak RSS MB':>11} {'p50 s':>6} {'p99 s':>6} "
              f"{'gen CPU%':>8} {'other%':>6} {'steal%':>6} {'ok':>3}")
    lines += ["", header, "-" * len(header)]
    for load, runs in results:
        row: dict[str, Any] = {"unit": load.unit}
        for target, rs in runs.items():
            row[target] = median_run(load, rs)
        g, f = row.get("gateway", {}), row.get("floor", {})
        row["ratio"] = {k: _ratio(g.get(k), f.get(k)) for k in _RATIO_KEYS}
        table[load.label] = row
        for target in runs:
            m = row[target]
            if "error" in m:
                lines.append(f"{load.label:<15} {target:<7} ERROR {m['error']}"[:200])
                continue
            ratio = row["ratio"]["rate"] if target == "gateway" else 1.0
            lines.append(
                f"{load.label:<15} {target:<7} {m['cameras']:>5} {m['MB']:>7.1f} {m['seconds']:>6.2f} "
                f"{m['rate']:>7.1f} {load.unit:<5} {_fmt(ratio, '.2f'):>7} {_fmt(m['cpu_s_per_GB']):>8} "
                f"{_fmt(m['server_cpu_pct'], '.0f'):>5} {_fmt(m['reactor_cpu_pct'], '.0f'):>5} "
                f"{_fmt(m['reactor_runqueue_pct'], '.0f'):>4} "
                f"{_fmt(m['peak_rss_MB'], '.0f'):>11} "
                f"{_fmt(m['p50_s'], '.2f'):>6} {_fmt(m['p99_s'], '.2f'):>6} {m['loadgen_cpu_pct']:>8.0f} "
                f"{_fmt(m['others_cpu_pct'], '.0f'):>6} {_fmt(m['steal_cpu_pct'], '.0f'):>6} "
                f"{'yes' if m['verified'] else 'NO':>3}"
                + (f"  runs: {m['rates']}" if m.get("runs", 1) > 1 else ""))
    lags = [f"{label} {m['sink_lag_s']:.2f} s" for label, row in table.items()
            for m in [row.get("gateway", {})] if (m.get("sink_lag_s") or 0) > 0.05]
    if lags:
        lines += ["", "gateway: the sink trailed the cameras' acknowledgements by (outbox): " + ", ".join(lags)]
    idle_rows = [(label, row) for label, row in table.items() if "per_connection_KB" in row.get("gateway", {})]
    for label, row in idle_rows:
        lines.append("")
        for target in ("gateway", "floor"):
            m = row.get(target, {})
            if "per_connection_KB" not in m:
                continue
            lines.append(
                f"{label} {target}: {m['slow_cameras']} slow cameras (1 frame/s, {m['slow_mid_transfer_at_ready']} "
                f"mid-transfer after {m['connect_seconds']:.1f} s; {m['slow_still_connected_at_end']} still "
                f"connected at the end); RSS {m['rss_before_slow_MB']:.0f} MB -> {m['rss_with_slow_MB']:.0f} MB "
                f"= {m['per_connection_KB']:.1f} KB per connection, {m['server_fds_with_slow']} fds; "
                + (f"kernel TCP buffers {m['kernel_per_connection_KB']:+.1f} KB per connection; "
                   if m.get("kernel_per_connection_KB") is not None else "") +
                f"peak {m['peak_rss_MB']:.0f} MB with the 100 fast ones"
                + (f"; {m['progress_events_in_window']} progress events logged in the window"
                   if m.get("progress_events_in_window") is not None else ""))
    lines.append("")
    lines.append("targets:")
    for what, met, measured in targets(table):
        lines.append(f"  [{'MET ' if met else 'MISS'}] {what}: {measured}")
    if profile and profile.get("threads"):
        scale = f", {profile['scale']} times its files" if profile.get("scale", 1) > 1 else ""
        lines += ["", f"profile of the gateway during {profile['load']} (a separate run{scale}, py-spy --idle, "
                      f"{profile['samples_per_thread']} samples per thread); % of wall time of one thread "
                      "(self = in the function itself, total = with what it calls):"]
        for kind in ("reactor", "pool threads", "store thread"):
            k = profile["threads"].get(kind)
            if not k:
                continue
            lines.append(f"  {kind} ({k['threads']} thread{'s' if k['threads'] > 1 else ''}): "
                         f"busy {k['busy_pct']:.0f}% of one thread's time")
            lines.append(f"    {'self %':>6} {'total %':>7}  function")
            lines += [f"    {s_:>6.1f} {t_:>7.1f}  {f}" for f, s_, t_ in k["top"][: 10 if kind == "reactor" else 5]]
    bench = []
    for load, _ in results:
        row = table[load.label]
        doc = {"scenario": load.scenario, "load": load.label, "unit": load.unit, "context": context}
        for target in ("gateway", "floor"):
            if target in row:
                doc[target] = {k: v for k, v in row[target].items() if k not in ("log", "verify")} | {
                    "verify": row[target].get("verify"), "log": row[target].get("log")}
        doc["ratio_to_floor"] = row["ratio"]
        bench.append("BENCH " + json.dumps(doc, default=_jsonable, sort_keys=True))
    text = "\n".join(lines)
    print(text)
    for b in bench:
        print(b)
    (out_dir / f"last-{context['mode']}.txt").write_text(text + "\n" + "\n".join(bench) + "\n")


_IDLE_LEAVES = ("EPollReactor.doPoll ", "Condition.wait ", "wait (threading.py)", "Queue.get ", "Event.wait ",
                "SimpleQueue.get", "_worker (", "get (queue.py)", "wait_for_work (")


def _thread_kind(name: str) -> str:
    if name == "MainThread":
        return "reactor"
    if "resume-store" in name or "store" in name:
        return "store thread"
    return "pool threads"


def profile_top(raw: Path, n: int) -> dict[str, Any]:
    """Hot spots of a py-spy ``record --threads --idle --format raw`` file.

    Samples whose innermost frame is a wait (the reactor in ``epoll_wait``, a
    pool thread waiting for work) are idle. Percentages are of wall time of
    one thread (py-spy samples every thread at the same rate): for each kind
    of thread (reactor, pool threads, store thread), how busy it was and the
    ``n`` functions with the most samples of their own (self) and with their
    callees (total). A pool thread blocked in ``fdatasync`` counts as busy.
    """
    per_thread: collections.Counter = collections.Counter()
    kinds: dict[str, dict[str, Any]] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        parts = stack.split(";")
        head = parts[0]
        name = head.split(": ", 1)[1] if head.startswith("thread (") and ": " in head else "?"
        kind = kinds.setdefault(_thread_kind(name), {"threads": set(), "busy": 0, "self": collections.Counter(),
                                                     "total": collections.Counter()})
        kind["threads"].add(head.split(")", 1)[0])
        per_thread[head.split(")", 1)[0]] += c
        frames = [re.sub(r":\d+\)$", ")", fr) for fr in parts[1:] if fr]
        if not frames or frames[-1].startswith(_IDLE_LEAVES):
            continue
        kind["busy"] += c
        kind["self"][frames[-1]] += c
        for fr in set(frames):
            kind["total"][fr] += c
    if not per_thread:
        return {}
    wall = max(per_thread.values())  # samples of a thread that lived through the whole recording
    return {
        "samples_per_thread": wall,
        "threads": {
            name: {
                "threads": len(k["threads"]),
                "busy_pct": 100 * k["busy"] / wall,
                "top": [(f, 100 * c / wall, 100 * k["total"][f] / wall) for f, c in k["self"].most_common(n)],
            }
            for name, k in kinds.items()
        },
    }
