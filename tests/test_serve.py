"""``benchmarks/serve.py``: the benchmark's gateway or floor for a load generator of one's own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

SERVE = Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py"


class ServeTests(TestCase):
    """Started, driven by the emulator, stopped by Ctrl-C: what it received, verified, and its cost."""

    def serve(self, target: str, *extra: str, host: str = "127.0.0.1", video_mib: int = 1) -> dict[str, Any]:
        workdir = Path(self.mktemp())
        workdir.mkdir()
        proc = subprocess.Popen([sys.executable, str(SERVE), target, "--workdir", str(workdir), "--interface", host,
                                 *extra],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # a process group of its own, as in a terminal
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            match = re.search(rf"listening on {re.escape(host)}:(\d+) ", line)
            if match is None:
                self.fail(f"serve.py did not start: {line!r}")
            sim = subprocess.run(
                [sys.executable, "-m", "camgateway.sim", "-c", f"tcp:{host}:{match.group(1)}", "-n", "5",
                 "--photos", "3", "--videos", "1", "--photo-size", "30001", "--video-size", f"{video_mib}M",
                 "--no-reconnect", "-q"],
                capture_output=True, text=True, timeout=120)
            self.assertEqual(sim.returncode, 0, sim.stdout + sim.stderr)
            time.sleep(0.5)
            # Ctrl-C: SIGINT to the terminal's foreground group. The server, in a session
            # of its own, is stopped by serve.py (SIGTERM) once its sink has every file.
            os.killpg(proc.pid, signal.SIGINT)
            out, _ = proc.communicate(timeout=150)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.assertEqual(proc.returncode, 0, out)
        [report] = [json.loads(line[len("SERVE "):]) for line in out.splitlines() if line.startswith("SERVE ")]
        self.assertEqual(list(workdir.iterdir()), [], "the run's directory is removed")
        return report

    def check(self, report: dict[str, Any], target: str, video_mib: int = 1) -> None:
        self.assertEqual(report["server"], target)
        self.assertTrue(report["ok"], report)
        self.assertEqual(report["files"], 20)
        self.assertEqual(report["files_acknowledged"], 20)
        self.assertEqual(report["MB"], round(5 * (3 * 30001 + video_mib * 1048576) / 1e6, 3))
        self.assertGreater(report["cpu_s"], 0)
        self.assertGreater(report["busy_s"], 0)
        self.assertGreater(report["MB_per_s"], 0)
        self.assertGreater(report["peak_rss_mb"], 10)

    def test_gateway(self) -> None:
        """The real gateway (twistd, two workers): every file in its sink, checked against its sidecar."""
        report = self.serve("gateway", "--workers", "2")
        self.check(report, "gateway")
        self.assertEqual(report["exit_status"], -signal.SIGTERM)  # twistd's clean stop

    def test_floor(self) -> None:
        """The floor, on another address (--interface): its files and their bytes, from its own count."""
        # (Videos big enough that the floor's CPU time spans more than the clock's 10 ms ticks.)
        report = self.serve("floor", host="127.0.0.2", video_mib=16)
        self.check(report, "floor", video_mib=16)
        self.assertEqual(report["exit_status"], 0)
