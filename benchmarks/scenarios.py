"""The benchmark's scenarios: which cameras send what, in quick and full mode.

Every size is a multiple of 1024 bytes (whole DualCam packets; the floor
relies on it, see ``floor.py``). Throughput is reported in MB/s with
MB = 10**6 bytes; file sizes are given in MiB/KiB.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

__all__ = ["Load", "SCENARIOS", "plan", "KiB", "MiB"]

KiB = 1024
MiB = 1024 * 1024
SCENARIOS = ("bulk", "photos", "idle-10k", "big-file")
_IMEI = 352093080000000


@dataclasses.dataclass
class Load:
    """One load, run once against the gateway and once against the floor."""

    scenario: str  # bulk, photos, idle-10k, big-file
    label: str  # bulk-100, big-file-500M...
    groups: list[dict[str, Any]]
    #: The group whose files are measured (rate, completion times, CPU per GB).
    measured: str
    #: "MB/s" or "files/s".
    unit: str
    deadline: float = 600.0
    #: For idle-10k: how many slow cameras were asked for (before the fd limit).
    requested_slow: Optional[int] = None
    #: Runs against each server (the median is reported); ``run.py --repeat`` overrides.
    repeat: int = 1

    @property
    def cameras(self) -> int:
        """Cameras in the measured group."""
        return next(g["cameras"] for g in self.groups if g["name"] == self.measured)

    def group(self, name: str) -> dict[str, Any]:
        """The spec of group ``name``."""
        return next(g for g in self.groups if g["name"] == name)


def _videos(name: str, cameras: int, per_camera: int, size: int, *, variants: int = 4,
            imei_offset: int = 0, **extra: Any) -> dict[str, Any]:
    return dict(name=name, cameras=cameras, kind="dualcam", photos=0, videos=per_camera,
                video_size=size, variants=variants, imei_base=_IMEI + imei_offset, **extra)


def _bulk(quick: bool) -> list[Load]:
    # (cameras, videos per camera, video size): >= 200 MB per load in full mode.
    shapes = ((1, 2, 32 * MiB), (10, 1, 8 * MiB), (100, 1, 1 * MiB)) if quick else \
             ((1, 4, 128 * MiB), (10, 2, 24 * MiB), (100, 1, 4 * MiB))
    return [Load("bulk", f"bulk-{n}", [_videos("cameras", n, per, size, variants=2 if size > 32 * MiB else 4)],
                 "cameras", "MB/s", deadline=300, repeat=1 if quick else 3)
            for n, per, size in shapes]


def bulk_100(quick: bool) -> Load:
    """The bulk load with 100 cameras (idle-10k compares its fast cameras with it)."""
    return _bulk(quick)[2]


def _photos(quick: bool) -> list[Load]:
    per_camera = 10 if quick else 20
    group = dict(name="cameras", cameras=100, kind="dualcam", photos=per_camera, videos=0,
                 photo_size=30 * KiB, variants=16, imei_base=_IMEI + 1000)
    return [Load("photos", "photos", [group], "cameras", "files/s", deadline=300, repeat=1 if quick else 3)]


def _idle(quick: bool, max_slow: Optional[int]) -> list[Load]:
    requested = 2000 if quick else 10000
    slow_n = requested if max_slow is None else min(requested, max_slow)
    fast = bulk_100(quick).groups[0]
    # The slow cameras get a generator process of their own (process 0), the
    # full-speed ones another (process 1), so that 10,000 timers do not delay them.
    slow = _videos("slow", slow_n, 1, 8 * MiB, variants=1, imei_offset=100000,
                   slow_bps=1024, background=True, phase=0, connect_rate=1000, process=0)
    fast = dict(fast, name="fast", phase=1, imei_base=_IMEI + 50000, process=1)
    # Three runs in full mode, as bulk-100's: the target compares the two
    # medians (one run each moved the ratio between 43 % and 96 %).
    return [Load("idle-10k", "idle-10k", [slow, fast], "fast", "MB/s", deadline=600, requested_slow=requested,
                 repeat=1 if quick else 3)]


def _big(quick: bool) -> list[Load]:
    sizes = (32 * MiB, 128 * MiB) if quick else (100 * MiB, 500 * MiB)
    return [Load("big-file", f"big-file-{size // MiB}M", [_videos("camera", 1, 1, size, variants=1)],
                 "camera", "MB/s", deadline=300) for size in sizes]


def scaled(load: Load, factor: int) -> Load:
    """``load`` with ``factor`` times the files per camera in its measured group (a longer run, same shape)."""
    groups = [dict(g, photos=g.get("photos", 0) * factor, videos=g.get("videos", 0) * factor)
              if g["name"] == load.measured else g for g in load.groups]
    return dataclasses.replace(load, groups=groups, deadline=load.deadline * factor)


def plan(names: list[str], quick: bool, max_slow: Optional[int] = None) -> list[Load]:
    """The loads of the named scenarios, in the order given.

    idle-10k needs the bulk-100 figure of the same run: it is added before
    it when ``bulk`` is not among the scenarios.
    """
    loads: list[Load] = []
    for name in names:
        if name == "bulk":
            loads += _bulk(quick)
        elif name == "photos":
            loads += _photos(quick)
        elif name == "idle-10k":
            if "bulk" not in names:
                loads.append(bulk_100(quick))
            loads += _idle(quick, max_slow)
        elif name == "big-file":
            loads += _big(quick)
        else:
            raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    return loads
