"""The allocator keeps a streaming camera's read buffers (camgateway.perf.process)."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from camgateway.perf import process as malloc
from camgateway.perf.settings import Performance

from camgateway.runtime import service
from camgateway.runtime.config import Config

#: Grows and frees 1 MiB buffers 256 KiB at a time, as a streaming camera's reads fill a spool write; prints
#: whether the allocator was tuned and the minor page faults.
FAULTS = """
import resource, sys
from camgateway.perf.process import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tune" else False
read = bytes(256 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(500):
    pending = bytearray()
    for _ in range(4):
        pending += read
    pending.clear()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


class Libc:
    """A libc whose mallopt records what it is asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.asked.append((param, value))
        return 1


class TuneMallocTests(TestCase):
    def faults(self, how: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS, how], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin"}).stdout.split()
        return out[0], int(out[1])

    def test_big_buffers_are_reused_instead_of_faulted_in_again(self) -> None:
        if platform.libc_ver()[0] != "glibc":
            raise SkipTest("not glibc: tune_malloc does nothing here")
        (said, tuned), (_, untuned) = self.faults("tune"), self.faults("plain")
        self.assertEqual(said, "True")
        # 500 buffers of 256 pages: glibc maps each afresh (about 128,000 faults); tuned, it reuses the heap.
        self.assertGreater(untuned, 50_000)
        self.assertLess(tuned, untuned // 20)

    def test_both_limits_are_set(self) -> None:
        libc = Libc()
        self.assertTrue(malloc.tune_malloc({}, libc))
        self.assertEqual(libc.asked, [(-3, malloc.MMAP_THRESHOLD), (-1, malloc.TRIM_THRESHOLD)])

    def test_the_operators_own_settings_win(self) -> None:
        for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            libc = Libc()
            self.assertFalse(malloc.tune_malloc({name: "131072"}, libc))
            self.assertEqual(libc.asked, [])

    def test_a_refused_setting_says_so(self) -> None:
        class Refusing(Libc):
            def mallopt(self, param: int, value: int) -> Any:
                return 0

        self.assertFalse(malloc.tune_malloc({}, Refusing()))

    def test_the_process_tuning_tunes_the_allocator_only_when_on(self) -> None:
        # Applied by the processes that run a gateway (the tap, a child worker), not by make_gateway.
        calls: list[None] = []
        self.patch(malloc, "tune_malloc", lambda: calls.append(None) or True)
        off = Performance.every(False)
        self.assertEqual(malloc.tune_process(off), [])
        self.assertEqual(malloc.tune_process(dataclasses.replace(off, malloc=True)), ["malloc"])
        self.assertEqual(len(calls), 1)
        root = Path(self.mktemp())
        service.make_gateway(Config(listen=("tcp:0:interface=127.0.0.1",), spool=root / "spool",
                                    sinks=({"type": "disk", "root": str(root / "files")},), min_free_bytes=0))
        self.assertEqual(len(calls), 1)
