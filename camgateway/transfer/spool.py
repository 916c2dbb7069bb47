"""The spool: files being received, and reconciling them with the store.

Layout under ``storage.spool``::

    resume.sqlite        the resume store and the outbox (camgateway.storage.sqlite)
    partials/<id>.part   files being received, finished ones in the outbox,
                         and empty ones made ahead (camgateway.perf.reserve)
    dead/<entry>/        files a sink refused: the file, dead-letter.json
    worker-<n>/          worker n's own resume.sqlite and partials/ (``workers``)

Names inside the spool are built by the gateway (random ids); nothing a
device sends ever becomes part of a path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from camgateway.base.ids import new_id
from camgateway.storage.records import Partial
from camgateway.wire.codec import PACKET

__all__ = ["Spool", "boot_id", "reconcile_partial"]


def boot_id() -> str:
    """The kernel's id of this boot: it changes exactly when the page cache was lost."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


class Spool:
    """The spool directory."""

    def __init__(self, root: Path, dead: Optional[Path] = None) -> None:
        self.root = Path(root)
        self.partials = self.root / "partials"
        #: Dead letters (a worker of several uses the configured spool's, see camgateway.runtime.workers).
        self.dead = Path(dead) if dead is not None else self.root / "dead"

    @property
    def store_path(self) -> Path:
        """Where the embedded resume store lives."""
        return self.root / "resume.sqlite"

    def ensure(self) -> None:
        """Create the spool directories (mode 0750)."""
        self.partials.mkdir(parents=True, exist_ok=True, mode=0o750)

    def new_name(self) -> str:
        """A fresh spool file name."""
        return new_id() + ".part"

    def path(self, name: str) -> Path:
        """The path of spool file ``name`` (a name the gateway made)."""
        return self.partials / name

    def open(self, name: str, held: int) -> int:
        """Open a spool file for writing from ``held``, truncating anything after it."""
        fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            if os.fstat(fd).st_size != held:
                os.ftruncate(fd, held)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlink(self, name: str) -> None:
        """Remove a spool file if it is there."""
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass

    def free_bytes(self) -> int:
        """Bytes available to the gateway on the spool's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def names(self) -> set[str]:
        """Every spool file present."""
        try:
            return {p.name for p in self.partials.iterdir() if p.name.endswith(".part")}
        except FileNotFoundError:
            return set()


def reconcile_partial(spool: Spool, partial: Partial, current_boot: str) -> int | None:
    """Make one partial's spool file and record agree; return its held bytes.

    None means the partial cannot be resumed (its spool file is gone) and must
    be dropped. Runs in a thread at start-up.
    """
    path = spool.path(partial.spool_name)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if partial.boot_id and partial.boot_id == current_boot:
        held = size  # same boot: the page cache survived, every written byte is good
    else:
        held = min(size, partial.held)  # after a reboot only checkpointed bytes count
    if partial.flow == "dualcam":
        last_start = max(partial.total - 1, 0) * PACKET
        limit = partial.total * PACKET
        if held > last_start:
            held = min(held, limit)  # the last packet may be short
        else:
            held -= held % PACKET
    else:
        held = min(held, partial.total)
    if held != size:
        with open(path, "r+b") as f:
            f.truncate(held)
            os.fsync(f.fileno())
    return held
