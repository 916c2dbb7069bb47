"""``camgateway-sim``: play Teltonika cameras against a gateway, then report.

Examples::

    camgateway-sim --connect tcp:host=127.0.0.1:port=5000 --cameras 50 --kind mixed
    camgateway-sim --connect tls:host=gw.example.com:port=5001 --kind dsm --videos 2 --video-size 5M
    camgateway-sim --cameras 20 --drop-after 10 --bad-crc 3,40 --faulty 5
    camgateway-sim --cameras 100 --photos 1 --videos 1 --status-after-start videor
    camgateway-sim --cameras 1000 --content random --photo-size 30K --video-size 2M

Cameras send real photos and videos (made with ffmpeg once and cached, see
camgateway.sim.media) unless ``--content random`` (the default when a size is
given) asks for random bytes, which cost nothing to make; without ffmpeg the
emulator says so in one line and sends random bytes.

Exits 0 when every camera delivered all its files (a ``--garbage`` camera:
when the gateway closed its connection), 1 otherwise, 2 on bad options.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any, Optional, Sequence

from twisted.internet.endpoints import clientFromString
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.internet.task import react
from twisted.python import usage

from camgateway.sim.content import DEFAULT_TIMESTAMP, ContentPool, files_from_dir, make_files, parse_size
from camgateway.sim.media import Media, MediaUnavailable, load_media
from camgateway.sim.model import KINDS, CameraSpec, SimFile
from camgateway.sim.result import CameraResult
from camgateway.sim.runner import run_cameras
from camgateway.wire.status_codes import INVALID_RESUME

__all__ = ["Options", "build_specs", "summarize", "main"]


def _size(text: str) -> int:
    return parse_size(text)


class Options(usage.Options):
    """Command-line options of ``camgateway-sim``."""

    synopsis = "camgateway-sim [options]"
    longdesc = "Emulates Teltonika cameras (the TCP client side) against a camgateway."

    optParameters: list[list[Any]] = [
        ["connect", "c", "tcp:host=127.0.0.1:port=5000", "Gateway as a client endpoint string (tcp:… or tls:…)."],
        ["cameras", "n", 1, "Number of cameras.", int],
        ["kind", "k", "dualcam", "Camera kind: dualcam, dsm, adas, dashcam or mixed (cycles through all)."],
        ["protocol-id", None, 5, "Protocol id in the init packet; 6+ makes every camera use the path flow.", int],
        ["photos", None, 1, "Photos per camera.", int],
        ["videos", None, 1, "Videos per camera.", int],
        ["content", None, None,
         "real: JPEG photos and PTMF/MP4 videos with sound, made with ffmpeg once (the default); random: random "
         "bytes of --photo-size/--video-size, nothing to make (the default when a size is given)."],
        ["photo-size", None, "30K", "Size of each random photo (e.g. 30K; --content random).", _size],
        ["video-size", None, "2M", "Size of each random video (e.g. 2M; --content random).", _size],
        ["files", None, None, "Offer the files of this directory instead (*.jpg photos, others videos)."],
        ["imei-base", None, 863719061600000, "IMEI of the first camera; the others count up.", int],
        ["concurrency", None, None, "Cameras running at the same time (default all).", int],
        ["reconnect-delay", None, 0.05, "Seconds before a camera with pending files reconnects.", float],
        ["max-connections", None, 20, "Connection attempts per camera before it gives up.", int],
        ["idle-timeout", None, 30.0, "Abort a connection on which the gateway is silent this long.", float],
        ["seed", None, None, "Seed of the random contents (reproducible runs).", int],
        ["variants", None, 4, "Distinct random contents per file slot, shared between cameras.", int],
        ["bad-crc", None, None, "Fault: frame indexes (e.g. 3,40) whose CRC is sent wrong, once per file."],
        ["drop-after", None, None, "Fault: close the connection after frame K of each file, once.", int],
        ["slow", None, None, "Fault: limit each camera's DATA to this many bytes/s (e.g. 50K).", _size],
        ["status-for", None, None,
         "Fault: answer STATUS 0x11 instead of START for these files: DualCam sources, "
         "paths, or 0-based file numbers, comma-separated."],
        ["status-after-start", None, None,
         "Fault: answer START and, in the same write, STATUS (--status-after-start-code) for these "
         "files (as --status-for), then give them up and go on with the next, as a real DualCam did."],
        ["status-after-start-code", None, INVALID_RESUME,
         "The STATUS code sent after START by --status-after-start (default 6, invalid response to resume).",
         int],
        ["faulty", None, None, "Apply the faults to the first N cameras only (default all).", int],
        ["garbage", None, 0, "Fault: add N cameras that send random bytes instead of an init.", int],
    ]
    optFlags: list[list[Any]] = [
        ["no-metadata-answer", None, "Never answer 0x000A, as firmware before 03.27.04."],
        ["enhanced-data", None, "Send ENHANCED DATA 0x000E in the path flow (needs --protocol-id 6+)."],
        ["tiny-segments", None, "Fault: send every write as 1..7-byte TCP segments."],
        ["no-reconnect", None, "Do not reconnect a camera whose connection ended with files pending."],
        ["json", None, "Print every camera's result as JSON after the summary."],
        ["quiet", "q", "Print nothing but the summary (no warnings)."],
    ]

    def postOptions(self) -> None:
        sized = [key for key in ("photo-size", "video-size") if not isinstance(self[key], str)]
        for key in ("photo-size", "video-size"):
            if isinstance(self[key], str):  # defaults are not coerced
                self[key] = parse_size(self[key])
        if self["content"] is None:
            self["content"] = "random" if sized else "real"
        if self["content"] not in ("real", "random"):
            raise usage.UsageError(f"--content must be real or random, not {self['content']!r}")
        if self["content"] == "real" and sized:
            raise usage.UsageError(f"--{sized[0]} sizes random content: use it with --content random")
        if self["kind"] not in KINDS + ("mixed",):
            raise usage.UsageError(f"--kind must be one of {', '.join(KINDS)} or mixed, not {self['kind']!r}")
        for key in ("cameras", "photos", "videos", "garbage", "variants"):
            if self[key] < 0:
                raise usage.UsageError(f"--{key} must not be negative")
        if self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        if not 0 < self["status-after-start-code"] <= 0xFFFFFFFF:
            raise usage.UsageError("--status-after-start-code must be 1..4294967295 (0 is success: it ends no file)")
        if self["enhanced-data"] and self["protocol-id"] < 6:
            raise usage.UsageError("--enhanced-data needs --protocol-id 6 or more")
        try:
            self["bad-crc-frames"] = frozenset(
                int(x) for x in (self["bad-crc"] or "").split(",") if x.strip()
            )
        except ValueError:
            raise usage.UsageError(f"--bad-crc wants frame numbers like 3,40, not {self['bad-crc']!r}")


def _status_identifiers(option: Optional[str], files: Sequence[SimFile]) -> frozenset[str]:
    chosen = set()
    for item in (option or "").split(","):
        item = item.strip()
        if item.isdigit():
            if int(item) < len(files):
                chosen.add(files[int(item)].identifier)
        elif item:
            chosen.add(item)
    return frozenset(chosen)


def build_specs(options: Options, media: Optional[Media] = None) -> list[CameraSpec]:
    """The cameras the options describe; their photos and videos from ``media`` when given, else random."""
    seed = options["seed"]
    rng = random.Random(seed)
    pool = ContentPool(rng, options["variants"])
    protocol_id = options["protocol-id"]
    metadata = "never" if options["no-metadata-answer"] else "answer"
    from_disk: dict[str, list[SimFile]] = {}
    specs = []
    for number in range(options["cameras"]):
        kind = KINDS[number % len(KINDS)] if options["kind"] == "mixed" else options["kind"]
        if options["files"]:
            if kind not in from_disk:
                try:
                    from_disk[kind] = files_from_dir(options["files"], kind, protocol_id=protocol_id)
                except ValueError as e:
                    raise usage.UsageError(str(e))
            files = from_disk[kind]
        else:
            files = make_files(
                kind,
                protocol_id=protocol_id,
                photos=options["photos"],
                videos=options["videos"],
                photo_size=options["photo-size"],
                video_size=options["video-size"],
                pool=pool,
                key=number,
                timestamp=DEFAULT_TIMESTAMP + 100 * number,
                media=media,
            )
        faulty = options["faulty"] is None or number < options["faulty"]
        specs.append(
            CameraSpec(
                imei=options["imei-base"] + number,
                kind=kind,  # type: ignore[arg-type]
                files=tuple(files),
                protocol_id=protocol_id,
                metadata_behaviour=metadata,  # type: ignore[arg-type]
                enhanced_data=options["enhanced-data"],
                bad_crc_frames=options["bad-crc-frames"] if faulty else frozenset(),
                drop_after_frames=options["drop-after"] if faulty else None,
                slow_bps=options["slow"] if faulty else None,
                segment_sizes=(1, 7) if faulty and options["tiny-segments"] else None,
                status_instead_of_start=_status_identifiers(options["status-for"], files) if faulty else frozenset(),
                status_after_start=(_status_identifiers(options["status-after-start"], files) if faulty
                                    else frozenset()),
                status_after_start_code=options["status-after-start-code"],
            )
        )
    for extra in range(options["garbage"]):
        imei = options["imei-base"] + options["cameras"] + extra
        specs.append(CameraSpec(imei=imei, protocol_id=protocol_id, garbage=True))
    return specs


def summarize(results: Sequence[CameraResult], elapsed: float) -> str:
    """The human summary printed at the end of a run."""
    failed = [r for r in results if not r.ok]
    total = sum(r.files_total for r in results)
    delivered = sum(len(r.delivered) for r in results)
    refused = sum(len(r.refused) for r in results)
    given_up = sum(len(r.given_up) for r in results)
    pending = sum(len(r.pending) for r in results)
    sent = sum(r.bytes_sent for r in results)
    data = sum(r.data_bytes_sent for r in results)
    connections = sum(r.connections for r in results)
    resumes = [p for r in results for p in r.resumes]
    rate = data / elapsed / 1e6 if elapsed > 0 else 0.0
    lines = [
        f"cameras: {len(results)} ({len(results) - len(failed)} ok, {len(failed)} failed) in {elapsed:.2f} s",
        f"files: {delivered}/{total} delivered, {refused} refused, {given_up} given up, {pending} pending",
        f"sent: {sent / 1e6:.2f} MB ({data / 1e6:.2f} MB file data), {rate:.2f} MB/s",
        f"connections: {connections} ({sum(r.connect_failures for r in results)} failed to connect, "
        f"{sum(r.closed_by_peer for r in results)} closed by the gateway), "
        f"resumes seen: {len(resumes)} ({sum(1 for p in resumes if p > 1)} past the start)",
        f"faults fired: {sum(r.bad_crcs_sent for r in results)} bad CRCs, {sum(r.drops for r in results)} drops",
        f"errors: {sum(len(r.errors) for r in results)}",
    ]
    for r in failed[:20]:
        why = "; ".join(r.errors[:3]) or (f"pending: {', '.join(r.pending[:3])}" if r.pending else "no close")
        lines.append(f"  FAILED camera {r.imei} ({'garbage' if r.garbage else r.kind}): {why}")
    if len(failed) > 20:
        lines.append(f"  … and {len(failed) - 20} more")
    return "\n".join(lines)


async def _media(reactor: Any, options: Options) -> Optional[Media]:
    """The real media of the cameras' kinds; None (and one line on stderr) when ffmpeg cannot make them."""
    kinds = KINDS if options["kind"] == "mixed" else (options["kind"],)

    def making(folder: Any) -> None:
        if not options["quiet"]:
            print(f"camgateway-sim: making the cameras' photos and videos (once; kept in {folder})", file=sys.stderr)

    try:
        return await load_media(reactor, kinds, notify=making)
    except (MediaUnavailable, OSError) as e:  # (OSError: the cache cannot be written)
        if not options["quiet"]:
            print(f"camgateway-sim: {e}: sending random bytes instead of real photos and videos"
                  " (install ffmpeg for real ones, or pass --content random)", file=sys.stderr)
        return None


async def _run(reactor: Any, options: Options, specs: Optional[list[CameraSpec]]) -> None:
    if specs is None:  # --content real: the media are made (or read from the cache) first
        specs = build_specs(options, await _media(reactor, options))
    endpoint = clientFromString(reactor, options["connect"])
    started = reactor.seconds()
    results = await run_cameras(
        reactor,
        lambda spec: endpoint,
        specs,
        concurrency=options["concurrency"],
        reconnect=not options["no-reconnect"],
        reconnect_delay=options["reconnect-delay"],
        max_connections_per_camera=options["max-connections"],
        idle_timeout=options["idle-timeout"] or None,
    )
    print(summarize(results, reactor.seconds() - started))
    if options["json"]:
        print(json.dumps([r.as_dict() for r in results], indent=1))
    if any(not r.ok for r in results):
        raise SystemExit(1)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``camgateway-sim`` and ``python -m camgateway.sim``."""
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
        specs = None if options["content"] == "real" and not options["files"] else build_specs(options)
    except (usage.UsageError, ValueError) as e:
        print(f"camgateway-sim: {e}\n", file=sys.stderr)
        print(options, file=sys.stderr)
        raise SystemExit(2)
    if not options["quiet"]:
        level = LogLevelFilterPredicate(LogLevel.warn)
        globalLogBeginner.beginLoggingTo(
            [FilteringLogObserver(textFileLogObserver(sys.stderr), [level])], redirectStandardIO=False
        )
    react(_run, (options, specs))
