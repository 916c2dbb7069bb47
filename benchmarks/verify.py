"""After a run: is every file the cameras were told was stored really there, intact?

Gateway: every media file under the disk sink's root must match its sidecar
(size, SHA-256 recomputed from the bytes on disk), and the multiset of
``(imei, size, sha256)`` must equal what the emulator sent and saw
acknowledged. Floor: each camera's connection files must hold exactly the
bytes the camera wrote.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["scan_sink", "verify_gateway", "verify_floor", "scan_gateway_log"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def scan_sink(root: Path) -> tuple[collections.Counter, list[str], int]:
    """Every media file under the disk sink's ``root``, checked against its sidecar.

    Returns the multiset of ``(imei, size, sha256)`` found, the problems (a
    file without sidecar or whose size or SHA-256 differ from it, a sidecar
    without its file) and how many temporary files are left.
    """
    problems: list[str] = []
    found: collections.Counter = collections.Counter()
    temps = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if name.endswith(".tmp"):
                temps += 1
                continue
            if not name.endswith(".json"):
                if not Path(f"{path}.json").exists():
                    problems.append(f"{path}: no sidecar")
                continue
            side = json.loads(path.read_text())
            media = path.with_name(name[: -len(".json")])
            if not media.exists():
                problems.append(f"{media}: sidecar without media file")
                continue
            size = media.stat().st_size
            digest = _sha256(media)
            if size != side["size"] or digest != side["sha256"]:
                problems.append(f"{media}: {size} bytes sha256 {digest[:12]}, sidecar says "
                                f"{side['size']} / {side['sha256'][:12]}")
            found[(str(side["imei"]), size, digest)] += 1
    return found, problems, temps


def verify_gateway(root: Path, expected: list[list[Any]]) -> dict[str, Any]:
    """Compare the sink's files with ``expected`` ``[imei, identifier, size, sha256]`` rows."""
    found, problems, temps = scan_sink(root)
    wanted = collections.Counter((str(imei), size, sha) for imei, _, size, sha in expected)
    missing = wanted - found
    extra = found - wanted
    for key, n in list(missing.items())[:5]:
        problems.append(f"missing {n}x camera {key[0]} file of {key[1]} bytes sha256 {key[2][:12]}")
    for key, n in list(extra.items())[:5]:
        problems.append(f"unexpected {n}x camera {key[0]} file of {key[1]} bytes sha256 {key[2][:12]}")
    return {
        "ok": not problems and not temps,
        "files_expected": sum(wanted.values()),
        "files_found": sum(found.values()),
        "missing": sum(missing.values()),
        "unexpected": sum(extra.values()),
        "temp_files_left": temps,
        "problems": problems[:10],
    }


def verify_floor(root: Path, bytes_sent: dict[str, int]) -> dict[str, Any]:
    """Each camera's ``<imei>-<n>.bin`` files must hold every byte it sent."""
    held: dict[str, int] = collections.defaultdict(int)
    for path in root.glob("*.bin"):
        held[path.name.split("-", 1)[0]] += path.stat().st_size
    problems = [f"camera {imei}: sent {sent} bytes, floor holds {held.get(imei, 0)}"
                for imei, sent in bytes_sent.items() if held.get(imei, 0) != sent]
    return {"ok": not problems, "cameras_checked": len(bytes_sent), "problems": problems[:10]}


def scan_gateway_log(text: str) -> dict[str, Any]:
    """What the gateway's log says (JSON lines, or twistd's text): reactor, files stored, errors.

    ``progress_times``: when each ``transfer_progress`` event was logged (seconds
    since the epoch, JSON logs only), to count those in a measured window.
    """
    reactor = ""
    progress: list[float] = []
    messages: list[str] = []
    lowered: list[str] = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line, "level": "?"}
            message = str(record.get("message", ""))
            if record.get("level") in ("error", "critical") or "traceback" in record:
                lowered.append(line)
            if record.get("event") == "transfer_progress" and record.get("time"):
                progress.append(datetime.datetime.fromisoformat(record["time"]).timestamp())
        else:
            message = line
            if "#error]" in line or "#critical]" in line or "Traceback" in line or "Unhandled" in line:
                lowered.append(line)
        messages.append(message)
        if not reactor and "reactor class:" in message:
            reactor = message.split("reactor class:", 1)[1].strip().rstrip(".")
    joined = "\n".join(messages)
    return {
        "reactor": reactor,
        "files_stored_logged": joined.count("file stored:") + joined.count("file delivered to every sink"),
        "files_received_logged": joined.count("file received:"),
        "errors_logged": len(lowered),
        "first_errors": lowered[:5],
        "progress_times": progress,
    }
