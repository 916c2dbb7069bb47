"""Several instances, one spool: the check that it is shared, and the sweep of orphan spool files.

Instances that share a Redis store (``storage.resume: redis://...``) must
share their spool too: the store's partials and outbox entries name spool
files, and an instance can resume or deliver only those it can read.

**The check.** Each instance keeps a marker file, ``<spool>/instances/<name>``
(its instance name), and registers in the store (its name, spool path and
host, :meth:`~camgateway.storage.redis.RedisStore.register`). At start-up, then
every ``storage.lease_ttl``, it writes its marker if it is missing, renews its
registration (which lapses ``3 × lease_ttl`` after the last renewal, and ends
when the instance stops), and looks in its spool for the marker of every other
running instance. A marker it cannot see means the spools are not the same
folder: an error names the instance, its spool and this one's, and
``/healthz`` reports a ``shared_spool`` warning (``degraded``, still 200: the
instances go on serving their cameras) until the markers are seen. Markers of instances no longer running are removed once
older than the registration's lifetime.

**The orphan sweep.** With a shared store there is no start-up reconcile (an
instance cannot tell another's files in progress from its own leftovers). An
instance killed between making a spool file and recording it, or between
recording a delivery and removing the file, leaves a spool file nothing
names. :func:`sweep_orphans` (run with the partial sweep) removes spool files
that no partial, no outbox entry and no finish note (``<spool>/finished/*/``,
any instance's, camgateway.transfer.journal) names, that no local session has open,
and that nothing changed for :func:`orphan_age` (their inode's ctime). Finish
notes themselves, dead letters and markers are never touched: it looks only at
``partials/*.part``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer, task
from twisted.logger import Logger

from camgateway.runtime.config import Config
from camgateway.base.health import SHARED_SPOOL
from camgateway.transfer.journal import Note

if TYPE_CHECKING:
    from camgateway.runtime.context import Services

__all__ = ["SharedSpool", "sweep_orphans", "orphan_age", "marker_name"]

log = Logger(namespace="camgateway.runtime.shared_spool")

#: A registration lives this many check periods (``storage.lease_ttl``) after its last renewal.
REGISTRATION_PERIODS = 3


def marker_name(instance: str) -> str:
    """The file name of ``instance``'s marker (only letters, digits and ``-_.:``)."""
    return "".join(c if c.isalnum() or c in "-_.:" else "_" for c in instance) or "_"


def orphan_age(config: Config) -> float:
    """Seconds a spool file nothing names must stay unchanged before the sweep removes it.

    Twice the lease's and the outbox claim's lifetimes: longer than an
    instance that still runs leaves a file of its own unrecorded (a session
    holds its lease, a delivery its claim).
    """
    return max(2 * config.lease_ttl, 2 * config.outbox_claim_ttl)


def _write_marker(folder: Path, name: str, instance: str) -> None:
    """Make ``folder/name`` if it is missing (thread)."""
    path = folder / name
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    temp = folder / f".{name}.tmp"
    temp.write_text(instance + "\n", encoding="utf-8")
    os.rename(temp, path)


def _markers(folder: Path) -> dict[str, float]:
    """The markers in ``folder``: name -> ctime (thread)."""
    found: dict[str, float] = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith("."):
                    try:
                        found[entry.name] = entry.stat().st_ctime
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        pass
    return found


def _remove(paths: list[Path]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class SharedSpool:
    """This instance's marker and registration, and the periodic check of the others' (see the module)."""

    def __init__(self, services: "Services", store: Any, every: float) -> None:
        self.s = services
        self.store = store
        self.every = every
        self.ttl = REGISTRATION_PERIODS * every
        self.root = services.spool.root.resolve()
        self.folder = self.root / "instances"
        self.marker = marker_name(services.instance)
        #: The other running instances whose marker is not in this spool: name -> their spool path.
        self.missing: dict[str, str] = {}
        #: The other running instances at the last check.
        self.others: frozenset[str] = frozenset()
        self._loop: Optional[task.LoopingCall] = None
        self._checking: Optional[defer.Deferred] = None

    def start(self) -> defer.Deferred:
        """Check now (fires once done, never fails), then every :attr:`every` seconds."""
        d = self._tick()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.s.clock
        self._loop.start(self.every, now=False)
        return d

    def _tick(self) -> defer.Deferred:
        if self._checking is not None:
            return self._checking
        d = self._checking = self.check()
        d.addErrback(lambda f: log.failure("checking that the spool is shared failed; it runs again in"
                                           " {t:g} s", f, t=self.every))

        def over(_: object) -> None:
            self._checking = None

        d.addBoth(over)
        return d

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop checking; say in the store that this instance stopped and remove its marker."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._checking is not None:
            yield self._checking
        try:
            yield self.store.unregister()
            yield self.s.run_in_thread(_remove, [self.folder / self.marker])
        except Exception as e:
            log.warn("could not remove this instance's spool marker (it lapses): {error}", error=e)

    @defer.inlineCallbacks
    def check(self) -> Any:
        """Renew this instance's marker and registration; report the other running instances' markers not here."""
        s = self.s
        try:
            yield s.run_in_thread(_write_marker, self.folder, self.marker, s.instance)
            yield self.store.register({"spool": str(self.root), "host": socket.gethostname()}, self.ttl)
            running = yield self.store.instances()
            markers = yield s.run_in_thread(_markers, self.folder)
        except Exception as e:
            log.warn("could not check that the spool is shared: {error}", error=str(e) or type(e).__name__)
            return None
        others = {name: info for name, info in running.items() if name != s.instance}
        missing = {name: str(info.get("spool", "?")) for name, info in others.items()
                   if marker_name(name) not in markers}
        self._report(others, missing)
        live = {marker_name(name) for name in running} | {self.marker}
        stale = [self.folder / name for name, ctime in markers.items()
                 if name not in live and ctime < time.time() - self.ttl]
        if stale:
            yield s.run_in_thread(_remove, stale)
            log.info("removed the spool markers of {n} instances no longer running", n=len(stale))
        return missing

    def _report(self, others: dict[str, Any], missing: dict[str, str]) -> None:
        health = self.s.health
        if missing:
            names = ", ".join(f"{name} (spool {spool} on {others[name].get('host', '?')})"
                              for name, spool in sorted(missing.items()))
            reason = (f"the spool {self.root} is not shared with instance{'s' if len(missing) > 1 else ''}"
                      f" {names}: their marker is not in {self.folder}; files they receive cannot be resumed"
                      f" or delivered here. Mount the same folder at storage.spool on every instance")
            if missing != self.missing:
                log.error("{reason}", reason=reason, instances=sorted(missing), spool=str(self.root),
                          event="spool_not_shared")
            health.warn(SHARED_SPOOL, reason)
        else:
            health.warning_over(SHARED_SPOOL)
            current = frozenset(others)
            if self.missing or (current and current != self.others):
                log.info("spool {spool} shared with instance{s} {names}", spool=str(self.root),
                         s="s" if len(current) > 1 else "", names=", ".join(sorted(current)))
        self.missing = missing
        self.others = frozenset(others)


def _old_spool_files(partials: Path, before: float) -> list[str]:
    """The spool files whose ctime is before ``before`` (thread)."""
    old = []
    try:
        with os.scandir(partials) as entries:
            for entry in entries:
                if entry.name.endswith(".part"):
                    try:
                        if entry.stat().st_ctime < before:
                            old.append(entry.name)
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        pass
    return old


def noted_spool_names(finished: Path) -> set[str]:
    """The spool files named by the finish notes of every instance under ``finished`` (thread)."""
    names: set[str] = set()
    try:
        folders = [p for p in finished.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return names
    for folder in folders:
        try:
            paths = [p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".")]
        except FileNotFoundError:
            continue
        for path in paths:
            try:
                names.add(Note.from_json(path.read_bytes()).entry.spool_name)
            except FileNotFoundError:
                pass  # replayed meanwhile: its entry is in the store, which is read after the notes
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise RuntimeError(f"finish note {path} cannot be read ({e}): no orphan removed") from e
    return names


def _remove_old(partials: Path, names: list[str], before: float) -> int:
    """Remove the spool files ``names`` still unchanged since before ``before`` (thread); how many."""
    removed = 0
    for name in names:
        path = partials / name
        try:
            if os.stat(path).st_ctime < before:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


@defer.inlineCallbacks
def sweep_orphans(s: "Services", min_age: float) -> Any:
    """Remove the spool files nothing names and nothing changed for ``min_age`` seconds; how many.

    The order makes it safe against instances at work: the files are listed
    first, then the finish notes read, then the store (partials, then the
    outbox). A file that is named when it is listed stays named until its
    owner removes it: a partial becomes an entry in one step, a note becomes
    an entry before the note is removed.
    """
    before = time.time() - min_age
    old = yield s.run_in_thread(_old_spool_files, s.spool.partials, before)
    if not old:
        return 0
    named = yield s.run_in_thread(noted_spool_names, s.spool.root / "finished")
    partials = yield s.store.all()
    entries = yield s.store.pending()
    named.update(p.spool_name for p in partials)
    named.update(e.spool_name for e in entries)
    named.update(session.transfer.partial.spool_name for session in s.sessions.values() if session.transfer)
    orphans = sorted(set(old) - named)
    if not orphans:
        return 0
    removed = yield s.run_in_thread(_remove_old, s.spool.partials, orphans, before)
    if removed:
        log.info("{n} orphan spool files removed (named by no partial, outbox entry or finish note, unchanged"
                 " for {age:.0f} s)", n=removed, age=min_age, event="orphans_removed")
    return removed
