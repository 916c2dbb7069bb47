"""The disk sink: files and their JSON sidecars under ``<root>/<imei>/<date>/``.

Names are built by the gateway, never taken from the device::

    <root>/<imei>/<YYYY-MM-DD>/<YYYYmmddTHHMMSSZ>_<source>[_<basename>][-<n>].<ext>
    ... and the same name + ".json" for the sidecar

The time is the capture time from the metadata, else the arrival time (UTC).
``basename`` is a sanitised basename of a device path; ``n`` counts up when a
name is taken, so two files never collide. The extension comes from the
content (JPEG, PTMF, MP4) or a known extension of the device path.

A file is stored once: a delivery repeated (a crash, or an outbox that could
not record it, after the sink had stored it) finds its own sidecar (the same
``id`` and ``sha256``) under the name, completes it if the media file is
missing, and reports that path. Only a name already taken pays for that
look; a file without an id (an old record) gets the next name as any other.

Delivery is atomic and durable: the sidecar is written to a temporary name
and linked under its final name; then the media file is hard-linked from the
spool (copied and fsynced first when the spool is on another filesystem)
beside it. A reader that sees a media file therefore finds it complete, with
its sidecar. Before a delivery is reported done, all of it is made durable
by one ``syncfs`` shared with every delivery that finished meanwhile: at
hundreds of files a second that is one journal commit per batch instead of
three fsyncs per file. On the spool's filesystem the deliveries waiting are
stored together on a thread (in the gateway, the one its store and spool
flushes use: camgateway.perf.groupcommit.BatchThread), then flushed; on another
filesystem (where a store copies the file) each is stored on the shared
pool, then flushed by :class:`~camgateway.perf.durability.GroupSync`. Where
``syncfs`` is missing, the sidecar and the folders are fsynced file by file.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from camgateway.base.units import ConfigError
from camgateway.perf.durability import HAVE_SYNCFS, GroupSync, fsync_dir, syncfs
from camgateway.perf.groupcommit import BatchThread, GroupCommitThread
from camgateway.base.ids import new_id
from camgateway.wire.media import EXTENSIONS, head_of, kind_of
from camgateway.delivery.sinks import GatewayInternals, IFileSink, ReceivedFile, SinkContext
from camgateway.delivery.sinks.registry import check_keys

__all__ = ["DiskSink", "sanitise_basename", "build_stem", "extension_for", "indented_json", "validate", "make"]


def validate(config: Mapping[str, Any], key: str, base: Path) -> Mapping[str, Any]:
    """``{type: disk, root: DIR}``."""
    check_keys(config, key, {"root"}, {"root"})
    root = config["root"]
    if not isinstance(root, str) or not root:
        raise ConfigError(f"{key}.root", "a disk sink needs root: the directory files are stored under")
    return {"type": "disk", "root": str(base / Path(root).expanduser())}


#: ``make`` takes the gateway's internals as well (see :class:`camgateway.delivery.sinks.GatewayInternals`).
uses_internals = True


def make(config: Mapping[str, Any], context: SinkContext, internals: GatewayInternals) -> "DiskSink":
    """A DiskSink from a validated entry.

    On the spool's filesystem (a store is a few links, whatever the file's
    size) deliveries are stored in batches on a thread, the gateway's
    ``internals.batch_thread`` if it has one; elsewhere (a store copies the
    file) each runs on the shared pool. ``internals.heads`` spares reading
    the first bytes of a file again. With ``performance.group_sync`` off
    each store fsyncs its own files on the pool; with ``group_commit`` off
    stores are not batched (docs/performance.md).
    """
    root = Path(config["root"])
    heads = internals.heads
    performance = internals.performance
    if not HAVE_SYNCFS or (performance is not None and not performance.group_sync):
        return DiskSink(root, context.run_in_thread, heads=heads)  # (each store fsyncs its own files)
    if (performance is None or performance.group_commit) and _same_filesystem(root, context.spool.root):
        return DiskSink(root, context.run_in_thread, batched_on=context.clock, shared=internals.batch_thread,
                        heads=heads)
    return DiskSink(root, context.run_in_thread, group=GroupSync(root, context.clock, name="camgateway-disk-sync"),
                    heads=heads)


def _same_filesystem(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (or their nearest existing parents) are on one filesystem."""
    def device(path: Path) -> Optional[int]:
        for candidate in (path, *path.parents):
            try:
                return os.stat(candidate).st_dev
            except OSError:
                continue
        return None

    first = device(Path(a).absolute())
    return first is not None and first == device(Path(b).absolute())


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_KNOWN_EXT = {"jpg", "jpeg", "mp4", "h265", "h264", "hevc", "avi", "mov", "png", "bin", "ptmf"}


def sanitise_basename(identifier: bytes, limit: int = 64) -> str:
    """A harmless name from a device path: last component, safe characters only."""
    text = identifier.split(b"\0", 1)[0].decode("utf-8", "replace")
    text = re.split(r"[\\/]", text)[-1]
    stem = text.rsplit(".", 1)[0] if "." in text.lstrip(".") else text
    stem = _SAFE.sub("_", stem).strip("._-")
    return stem[:limit]


def extension_for(received: ReceivedFile, head: bytes) -> str:
    """The file extension, from the content first (JPEG, PTMF, MP4, bare H.265/H.264:
    :func:`camgateway.wire.media.kind_of`), then a known extension of the device path."""
    kind = kind_of(head)
    if kind is not None:
        return EXTENSIONS[kind]
    if received.flow == "path":
        name = received.identifier.split(b"\0", 1)[0].decode("utf-8", "replace")
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if ext in _KNOWN_EXT:
            return ext
    return "h265" if received.media == "video" else "bin"


def build_stem(received: ReceivedFile) -> tuple[str, str]:
    """``(date folder, file stem)`` for a received file."""
    when = (received.capture_time or received.received_at).astimezone(datetime.timezone.utc)
    stem = f"{when:%Y%m%dT%H%M%SZ}_{received.source}"
    base = sanitise_basename(received.identifier) if received.flow == "path" else ""
    if base:
        stem += "_" + base
    if received.derived and received.derived not in ("mp4", "original"):  # their extensions tell them apart
        stem += "_" + sanitise_basename(received.derived.encode())
    return f"{when:%Y-%m-%d}", stem


#: The C encoder of a JSON string (json.encoder's own choice).
_key: Callable[[str], str] = json.encoder.encode_basestring_ascii
_CONSTANTS = {None: "null", True: "true", False: "false"}


def indented_json(value: Any, indent: str = "") -> str:
    """``json.dumps(value, indent=2)``, exactly, at the speed of the C encoder.

    With ``indent`` the standard library encodes in Python, a third of a
    delivery's CPU for a photo's sidecar; here only the nesting is Python and
    every leaf is encoded in C. A dict with a key that is not a string is
    left to ``json.dumps`` whole (it converts such keys).
    """
    kind = type(value)
    if kind is dict and value:
        if not all(type(k) is str for k in value):
            return json.dumps(value, indent=2).replace("\n", "\n" + indent)
        inner = indent + "  "
        return ("{\n" + ",\n".join(f"{inner}{_key(k)}: {indented_json(v, inner)}" for k, v in value.items())
                + "\n" + indent + "}")
    if (kind is list or kind is tuple) and value:
        inner = indent + "  "
        return "[\n" + ",\n".join(inner + indented_json(v, inner) for v in value) + "\n" + indent + "]"
    if kind is str:
        return _key(value)
    if kind is int:
        return int.__repr__(value)
    if value is None or kind is bool:
        return _CONSTANTS[value]
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value)  # NaN and infinities, empty containers, anything else


@implementer(IFileSink)
class DiskSink:
    """Stores files and sidecars under a root directory."""

    def __init__(self, root: Path, run_in_thread: Callable[..., Deferred], group: Optional[GroupSync] = None,
                 *, batched_on: Any = None, shared: Optional[BatchThread] = None, heads: Any = None) -> None:
        self.root = Path(root)
        self.name = f"disk:{self.root}"
        self._run = run_in_thread
        #: Batches the flushes of deliveries, flushing ``root``'s filesystem
        #: (None: each store fsyncs its own files).
        self.group = group
        #: With ``batched_on`` (a reactor), deliveries are stored on a thread
        #: of this sink's own, every delivery asked meanwhile in one batch with
        #: one ``syncfs`` after it: a thread step per batch instead of a pool
        #: call and a group flush per file.
        self._batches: Optional[GroupCommitThread[ReceivedFile]] = (
            GroupCommitThread(self._store_batch, batched_on, "camgateway-disk-sink", shared)
            if batched_on is not None else None)
        # Folders known to exist. A store runs on a thread other than the
        # reactor's, and every system call there gives up the GIL and waits to
        # win it back from a busy reactor: a delivery makes as few as it can.
        self._folders: set[str] = set()
        self._root = os.fspath(self.root)
        #: Where the first bytes of files just finished are (camgateway.runtime.context.FileHeads).
        self._heads = heads

    def close(self) -> Optional[Deferred]:
        """End the sink's thread (after the deliveries and flushes asked for)."""
        if self._batches is not None:
            return self._batches.close()
        return self.group.close() if self.group is not None else None

    def deliver(self, received: ReceivedFile) -> Deferred:
        """Store the file and its sidecar; fire with the stored path once durable."""
        if self._batches is not None:
            return self._batches.submit(received)
        group = self.group
        if group is None:
            return self._run(self.store, received)
        d = self._run(self.store, received, durable=False)
        d.addCallback(lambda target: group.sync().addCallback(lambda _: target))
        return d

    def store(self, received: ReceivedFile, durable: bool = True) -> str:
        """The blocking work of :meth:`deliver` (runs in a thread).

        With ``durable`` False the caller makes the filesystem durable
        afterwards (a ``syncfs``); until then the file may be lost in a crash.
        """
        # Paths are plain strings here: pathlib objects cost more Python per
        # file than the system calls they name, on a thread sharing the GIL.
        imei = received.imei if received.imei.isdigit() else "unknown"
        media = os.fspath(received.path)
        head = (self._heads.take(media) if self._heads is not None else None) or head_of(media)
        date, stem = build_stem(received)
        folder = f"{self._root}/{imei}/{date}"
        created = self._ensure(folder)
        ext = extension_for(received, head)
        payload = indented_json(received.sidecar()).encode() + b"\n"
        temps: list[str] = []
        try:
            sidecar = self._temp(folder, stem, temps)
            try:
                _write_new(sidecar, payload, durable)
            except FileNotFoundError:  # the folder was removed since it was made: make it again
                self._folders.discard(folder)
                created = self._ensure(folder) or created
                _write_new(sidecar, payload, durable)
            target = self._place(received, media, sidecar, folder, stem, ext, temps)
        finally:
            for temp in temps:
                _discard(temp)
        if not durable:
            return target
        fsync_dir(folder)
        if created:
            parent = os.path.dirname(folder)
            fsync_dir(parent)
            fsync_dir(os.path.dirname(parent))
        return target

    def _store_batch(self, batch: list[ReceivedFile]) -> list[Any]:
        """On the sink's thread: store each (a failure is that delivery's alone), then one ``syncfs``."""
        outcomes: list[Any] = []
        for received in batch:
            try:
                outcomes.append(self.store(received, durable=False))
            except Exception:
                failure = Failure()
                failure.cleanFailure()
                outcomes.append(failure)
        if not all(isinstance(outcome, Failure) for outcome in outcomes):
            syncfs(self.root)  # if it fails, every delivery of the batch fails (and is retried)
        return outcomes

    def _ensure(self, folder: str) -> bool:
        """Make ``folder`` if needed (remembered, so it costs no system call next time); True if made."""
        if folder in self._folders:
            return False
        created = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        if len(self._folders) >= _FOLDERS_KEPT:
            self._folders.clear()
        self._folders.add(folder)
        return created

    @staticmethod
    def _temp(folder: str, stem: str, temps: list[str]) -> str:
        temp = f"{folder}/.{stem}.{os.getpid()}.{new_id()}.tmp"
        temps.append(temp)
        return temp

    def _place(self, received: ReceivedFile, media: str, sidecar: str, folder: str, stem: str, ext: str,
               temps: list[str]) -> str:
        """Put sidecar then media under the first free name; never overwrite.

        The sidecar is in place before the media file appears, so a reader
        that sees a file finds its sidecar. Names are claimed with ``link``,
        which fails if the name exists. When the spool is on another
        filesystem the media is first copied (and fsynced) to a temporary
        name in ``folder`` and linked from there.

        A name taken by this very file (a sidecar with its sha256 and size: an
        earlier delivery of it that the outbox could not record, or the same
        file the camera sent again) is this delivery's: its media file is
        linked if it is missing, and no ``-n`` copy is made. Only a taken
        name costs that look. A name whose media file is another's (beside
        this file's sidecar: a leftover of a delivery cut between its two
        links) loses that sidecar, and the next name is tried.
        """
        n = 1
        while True:
            target = f"{folder}/{stem}.{ext}" if n == 1 else f"{folder}/{stem}-{n}.{ext}"
            meta = target + ".json"
            claimed = _claim(sidecar, meta)
            if claimed or _describes(meta, received):
                try:
                    media, placed = self._link(media, target, folder, stem, temps)
                    # (not placed: the same delivery, running at once elsewhere, may have linked it first)
                    placed = placed or _holds(target, media, received)
                except BaseException:
                    if claimed:
                        os.unlink(meta)
                    raise
                if placed:
                    return target
                _discard(meta)
            n += 1

    def _link(self, media: str, target: str, folder: str, stem: str, temps: list[str]) -> tuple[str, bool]:
        """Link ``media`` as ``target`` (copied into ``folder`` first across filesystems).

        Returns the file linked from (the copy, once made) and whether
        ``target`` was free.
        """
        try:
            return media, _claim(media, target)
        except OSError as e:
            if e.errno != errno.EXDEV or media in temps:
                raise
        copy = self._temp(folder, stem, temps)
        _copy_durably(media, copy)
        return copy, _claim(copy, target)


#: Folders remembered by a DiskSink (a camera's folder per day) before it forgets them all.
_FOLDERS_KEPT = 10_000


def _discard(path: str) -> None:
    """Remove ``path`` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_new(path: str, data: bytes, durable: bool) -> None:
    """Create ``path`` (it must not exist) holding ``data``; fsync it if ``durable``.

    Mode 0640, as the spool's files (the media files are links of them): a
    sidecar holds the camera's GPS positions.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _claim(source: str, target: str) -> bool:
    """Hard-link ``source`` as ``target``; False if ``target`` exists."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False


def _describes(meta: str, received: ReceivedFile) -> bool:
    """Whether the sidecar at ``meta`` is ``received``'s: the same camera, source, device path and content.

    The same delivery repeated (same id), or the same file sent twice by
    the camera (a kill after the file was received but before the camera
    was told: a new id, the same bytes, capture time and source).
    """
    try:
        with open(meta, "rb") as f:
            data = f.read()
    except OSError:
        return False
    if received.sha256.encode() not in data:  # another file's (the usual collision): no parse
        return False
    try:
        record = json.loads(data)
    except ValueError:
        return False
    return (isinstance(record, dict) and record.get("sha256") == received.sha256
            and record.get("size") == received.size and record.get("imei") == received.imei
            and record.get("source") == received.source and record.get("device_path") == received.device_path)


def _holds(target: str, media: str, received: ReceivedFile) -> bool:
    """Whether ``target`` is ``received``'s file: a link of ``media``, or the same bytes."""
    try:
        held = os.stat(target)
    except FileNotFoundError:
        return False
    ours = os.stat(media)
    if (held.st_ino, held.st_dev) == (ours.st_ino, ours.st_dev):
        return True
    if held.st_size != received.size:
        return False
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == received.sha256


def _copy_durably(source: str, target: str) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
