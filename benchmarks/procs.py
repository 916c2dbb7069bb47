"""Processes of a benchmark run: starting and stopping them, and reading /proc.

CPU time comes from ``/proc/<pid>/stat`` (utime + stime of every thread of
the process), memory from ``/proc/<pid>/status`` (``VmRSS`` now, ``VmHWM``
the peak since the process started). A server with worker processes
(``workers: N``) is measured whole: every figure is the sum over the
process and its descendants, the main-thread figures over each process's
main (reactor) thread.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["Sample", "sample", "free_port", "raise_nofile", "nofile_hard", "Server", "fd_count", "machine_cpu",
           "wait_for_quiet", "tcp_memory_kb"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One look at a process: when, CPU seconds so far (all threads, and its main
    thread alone: the reactor's), RSS and peak RSS (KiB)."""

    t: float
    cpu: float
    rss_kb: int
    hwm_kb: int
    main_cpu: float = 0.0
    #: Seconds the main thread waited for a CPU while runnable (``/proc/<pid>/task/<pid>/schedstat``).
    main_wait: float = 0.0


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (read from every ``/proc/<pid>/stat``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(parents.get(p, ()))
    return found


def sample(pid: int) -> Optional[Sample]:
    """CPU and memory of ``pid`` and its descendants now; None if ``pid`` is gone."""
    first = _sample_one(pid)
    if first is None:
        return None
    total = first
    for child in tree(pid)[1:]:
        more = _sample_one(child)
        if more is not None:
            total = Sample(total.t, total.cpu + more.cpu, total.rss_kb + more.rss_kb, total.hwm_kb + more.hwm_kb,
                           total.main_cpu + more.main_cpu, total.main_wait + more.main_wait)
    return total


def _sample_one(pid: int) -> Optional[Sample]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            main = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        try:
            with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
                main_wait = int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            main_wait = 0.0
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    t = time.monotonic()
    cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)
    main_cpu = (int(main[11]) + int(main[12])) / _TICK
    rss = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
    hwm = re.search(r"^VmHWM:\s+(\d+)", status, re.M)
    return Sample(t, cpu, int(rss.group(1)) if rss else 0, int(hwm.group(1)) if hwm else 0, main_cpu,
                  main_wait)


def machine_cpu() -> tuple[float, float]:
    """CPU seconds since boot, every CPU together (``/proc/stat``): ``(busy, steal)``.

    Busy is all but idle and iowait; steal (a part of busy) is what the
    hypervisor ran elsewhere while this machine's CPUs wanted to run.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK, (fields[7] if len(fields) > 7 else 0) / _TICK


def wait_for_quiet(limit: float = 0.25, window: float = 1.0, timeout: float = 60.0) -> float:
    """Wait (up to ``timeout`` s) for a ``window`` in which the machine's other
    processes use less than ``limit`` of one CPU; return the last level seen (CPUs busy)."""
    deadline = time.monotonic() + timeout
    level = 0.0
    while True:
        before = machine_cpu()[0]
        time.sleep(window)
        level = (machine_cpu()[0] - before) / window
        if level < limit or time.monotonic() >= deadline:
            return level


def tcp_memory_kb() -> Optional[int]:
    """KiB the kernel holds for every TCP socket of the machine (``/proc/net/sockstat``, ``TCP: ... mem``).

    Bytes a server leaves in its sockets' receive queues (the gateway's read
    mark holds a slow camera's few frames there) are memory too, outside
    its RSS. None where the system does not say.
    """
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    fields = line.split()
                    return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


#: Where Linux says how much free memory it has handed back to the hypervisor
#: (virtio-balloon free page reporting), in KiB since boot.
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/reported_kib")


def reported_kib() -> Optional[int]:
    """KiB of free memory this (virtual) machine has returned to its host so far; None if it does not."""
    try:
        return int(PAGE_REPORTING.read_text())
    except (OSError, ValueError):
        return None


def available_mib() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in MiB (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def warm_memory(mib: int) -> float:
    """Write one byte in every page of ``mib`` MiB of new memory, then free it; the seconds it took.

    On a VM that returns free memory to its host (:func:`reported_kib`), the
    first write to a page the host took back stops the virtual CPU while the
    host supplies it: on a 2-vCPU Firecracker VM, touching 1.5 GiB here
    took 3.4 s (about 9 us a 4 KiB page) when the host had taken it back,
    0.5 s for 1 GiB when it had not, and writing 400 MB into new files cost
    0.9-1.25 s of kernel CPU or 0.1 s, depending only on what the machine
    had done in the seconds before. Pages freed here go back to the kernel's
    free lists, first in line for the next allocations (reported pages are
    taken last), until the host is told of them again (a few seconds
    later): the run that starts now gets memory as warm as a machine that
    never gives any back.
    """
    n = mib << 20
    page = os.sysconf("SC_PAGE_SIZE")
    t = time.monotonic()
    buf = bytearray(n)  # (calloc: the pages are not touched yet)
    buf[::page] = b"\1" * len(range(0, n, page))
    del buf
    return time.monotonic() - t


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` and its descendants (-1 if ``pid`` is gone)."""
    total = 0
    for i, p in enumerate(tree(pid)):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            if i == 0:
                return -1
    return total


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nofile_hard() -> int:
    """The hard RLIMIT_NOFILE: how far a process may raise its own."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_nofile() -> None:
    """preexec_fn of the children: soft RLIMIT_NOFILE up to the hard limit.

    Raising the hard limit itself needs CAP_SYS_RESOURCE; where it is
    missing the hard limit is the ceiling (reported by ``run.py``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Server:
    """The process under test (gateway or floor), started and stopped within bounds."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, ready: str, cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.ready_pattern = ready
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self.output = cwd / f"{name}.out"
        self.starts_failed = 0
        #: Start it in a session of its own, so that a terminal's Ctrl-C reaches only its parent.
        self.detach = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        """Everything logged (twistd rotates its log at 1 MB: every piece, oldest first)."""
        parts = sorted(glob.glob(f"{self.log}.*"), key=lambda p: -int(p.rsplit(".", 1)[1])
                       if p.rsplit(".", 1)[1].isdigit() else 0)
        text = ""
        for path in dict.fromkeys([*parts, str(self.log), str(self.output)]):
            try:
                text += Path(path).read_text(errors="replace")
            except OSError:
                pass
        return text

    def start(self, timeout: float = 30.0, tries: int = 2) -> None:
        """Start and wait for the ready line in the log (a second try after a failed start)."""
        for attempt in range(tries):
            try:
                return self._start(timeout)
            except RuntimeError:
                if attempt == tries - 1:
                    raise
                time.sleep(3)
                self.starts_failed += 1

    def _start(self, timeout: float) -> None:
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=raise_nofile, start_new_session=self.detach)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_pattern in self.log_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        lines = [line for line in self.log_text().splitlines() if line.strip()]
        self.stop()
        for path in glob.glob(f"{self.log}*"):
            if path != str(self.output):
                os.unlink(path)
        last = lines[-1].split("] ", 1)[-1] if lines else "(no output)"
        raise RuntimeError(f"{self.name} did not become ready: {last}")

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
