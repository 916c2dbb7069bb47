"""The gateway as a Twisted service: start-up reconcile, listening, sweeps, shutdown."""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python.failure import Failure

from camgateway import __version__
from camgateway.base.reasons import StartError, listen_error
from camgateway.runtime.config import Config, ConfigError
from camgateway.perf.durability import WRITEBACK_BYTES, GroupSync
from camgateway.perf.groupcommit import BatchThread
from camgateway.transfer.journal import FinishJournal
from camgateway.session.leasing import LeaseKeeper
from camgateway.delivery.outbox import Outbox
from camgateway.web.progress import PROGRESS_SPREAD, ProgressReporter
from camgateway.session.protocol import CameraFactory
from camgateway.perf.reserve import SpoolReserve
from camgateway.runtime.context import Services
from camgateway.runtime.shared_spool import SharedSpool, orphan_age, sweep_orphans
from camgateway.delivery.sinks import GatewayInternals, SinkContext, SpoolView, make_sinks
from camgateway.transfer.spool import Spool, boot_id, reconcile_partial
from camgateway.storage.sightings import CameraSightings
from camgateway.storage.sqlite import SQLiteStore
from camgateway.perf.threads import TwistedPool, WorkerPool
from camgateway.transfer.writes import FLUSH_AGE
from camgateway.runtime.workers import DispatchFactory, Shard, Workers, children_needed

__all__ = ["GatewayService", "StartError", "make_gateway", "sink_context", "sink_internals", "reconcile", "sweep_expired", "sweep_history", "flush_stale", "periodic"]

log = Logger(namespace="camgateway.runtime.service")

SHUTDOWN_GRACE = 8.0  # seconds to persist partials and finish stores on SIGTERM


@defer.inlineCallbacks
def reconcile(s: Services) -> Any:
    """Make the store and the spool agree (start-up; see camgateway.storage.records)."""
    partials = yield s.store.all()
    outbox = yield s.store.pending()
    known = {entry.spool_name for entry in outbox}
    if s.journal is not None:
        known |= s.journal.spool_names  # complete files waiting for the store (camgateway.transfer.journal)
    shard = s.shard
    moved = 0
    for partial in partials:
        if shard is not None and not shard.owns(partial.imei):
            # ``workers`` changed: this camera now goes to another worker, which
            # cannot resume this partial; the camera still holds the file.
            yield s.store.remove(partial.id)
            yield s.run_in_thread(s.spool.unlink, partial.spool_name)
            moved += 1
            continue
        held = yield s.run_in_thread(reconcile_partial, s.spool, partial, s.boot_id)
        if held is None:
            log.warn("partial {id} of camera {imei} lost its spool file; dropped", id=partial.id, imei=partial.imei)
            yield s.store.remove(partial.id)
            continue
        known.add(partial.spool_name)
        if held != partial.held or partial.boot_id != s.boot_id:
            yield s.store.checkpoint(partial.id, held, s.boot_id, partial.last_seen)
    orphans = s.spool.names() - known
    for name in orphans:
        yield s.run_in_thread(s.spool.unlink, name)
    if moved:
        log.warn("{n} partial transfers of cameras that now go to another worker (workers changed) dropped;"
                 " those cameras send the files again", n=moved)
    if partials or orphans or outbox:
        log.info("spool reconciled: {n} partial transfers kept, {q} files in the outbox, {o} unused spool files"
                 " removed (made ahead for new transfers, or of transfers never recorded)",
                 n=len(partials) - moved, q=len(outbox), o=len(orphans))


def flush_stale(s: Services) -> None:
    """Write the few bytes slow cameras left pending, drop stale read marks (the half-second scan).

    Only the sessions whose filed moment has come are visited (:mod:`camgateway.perf.due`);
    with ``performance.due_heap`` off, every session. A visit that raises is a bug in that session: it is logged with the
    camera's IMEI and that connection is dropped (what it held is kept, as
    after any internal error), and the scan goes on with the other sessions
    due; :meth:`DueSessions.take` has already unfiled them all, so one that
    was skipped would not come due again.
    """
    now = s.clock.seconds()
    for session in s.due.take(now):
        try:
            session.write_stale(now)
        except Exception:
            _visit_failed(session, Failure())


def _visit_failed(session: Any, failure: Failure) -> None:
    """The scan's visit of ``session`` raised: log it with the camera, drop that connection."""
    try:
        session.internal_error(failure)  # (log.failure with the camera's IMEI, peer and state; then closes)
    except Exception:
        imei = getattr(session, "imei", "?")
        log.failure("the half-second scan: visiting the session of camera {imei} failed", failure, imei=imei)
        log.failure("the half-second scan: closing the session of camera {imei} failed too", imei=imei)


def periodic(what: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` for a :class:`TimerService`: what it raises, or a Deferred it returns fails with, is logged.

    A LoopingCall stops for good on the first exception or failed Deferred
    of its function (TimerService only logs that it stopped); wrapped, the
    error is logged as ``what`` failing and the next tick runs as usual. A
    Deferred is still returned, so a tick that takes long delays the next.
    """
    def tick() -> Any:
        try:
            result = fn()
        except Exception:
            log.failure("{what} failed; it runs again at its next tick", what=what)
            return None
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: log.failure("{what} failed; it runs again at its next tick", f, what=what))
        return result

    return tick


@defer.inlineCallbacks
def sweep_expired(s: Services) -> Any:
    """Remove partials not seen for ``storage.partial_ttl``."""
    before = s.clock.seconds() - s.config.partial_ttl
    expired = yield s.store.expired(before)
    busy = {session.transfer.partial.id for session in s.sessions.values() if session.transfer}
    for partial in expired:
        if partial.id in busy:
            continue
        yield s.store.remove(partial.id)
        yield s.run_in_thread(s.spool.unlink, partial.spool_name)
        log.info("expired partial of camera {imei} ({held} bytes, last seen {age:.0f} s ago) removed",
                 imei=partial.imei, held=partial.held, age=s.clock.seconds() - partial.last_seen)


def sink_context(services: Services, reactor: Any) -> SinkContext:
    """What the sinks are built with (the plugin surface, camgateway.delivery.sinks.SinkContext)."""
    return SinkContext(reactor=reactor, clock=services.clock, run_in_thread=services.run_in_thread,
                       spool=SpoolView(services.spool))


def sink_internals(services: Services) -> GatewayInternals:
    """What the shipped disk sink shares with the gateway's hot path (camgateway.delivery.sinks.GatewayInternals)."""
    return GatewayInternals(batch_thread=services.batch_thread, heads=services.heads,
                            performance=services.config.performance)


@defer.inlineCallbacks
def sweep_history(s: Services) -> Any:
    """Forget the files received more than ``storage.history_ttl`` ago from the history (/api/files)."""
    history = getattr(s.store, "sweep_history", None)
    if history is None:
        return
    removed = yield history(s.clock.seconds() - s.config.history_ttl)
    if removed:
        log.info("{n} files received more than {ttl:.0f} s ago left the history (storage.history_ttl; the files"
                 " stay where the sinks put them)", n=removed, ttl=s.config.history_ttl)


class GatewayService(Service):
    """Reconciles the spool, then listens on every configured endpoint.

    With ``workers: N`` (N > 1) it is worker 0 and starts the other workers
    (:mod:`camgateway.runtime.workers`); ``shard`` says which worker a child process is.
    ``ready`` fires once every port listens, or fails with why the gateway
    could not start (:meth:`cannot_start`).
    """

    #: Why the start failed, once it has (:meth:`cannot_start`).
    start_failure: Optional[Failure] = None

    def __init__(self, config: Config, reactor: Any = None, shard: Optional[Shard] = None,
                 twistd_logfile: Optional[str] = None, forward_logs: bool = False) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.ports: list[Any] = []
        self.factory: Optional[CameraFactory] = None
        self.keeper: Optional[LeaseKeeper] = None
        self.services: Optional[Services] = None
        #: With a shared store: this instance's marker and the check that the spool is shared.
        self.shared_spool: Optional[SharedSpool] = None
        self.ready: defer.Deferred = defer.Deferred()
        self.pool: Optional[WorkerPool | TwistedPool] = None
        if shard is None and config.workers > 1:
            shard = Shard(0, config.workers, config.spool)
        self.shard = shard
        self.workers: Optional[Workers] = None
        if (shard is None or shard.index == 0) and children_needed(config):  # the listening process
            self.workers = Workers(config, config.workers, reactor, twistd_logfile, forward_logs=forward_logs)

    def _run_in_thread(self, f: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
        assert self.pool is not None, "the service is not started"
        return self.pool.run(f, *args, **kwargs)

    def startService(self) -> None:
        # (The process-wide tuning, camgateway.perf.process, is the process's to
        # apply: the tap and the worker's entry do, not the service.)
        super().startService()
        try:
            d = self._start()
        except Exception:  # (twistd would print the traceback; the failure is told as any other)
            d = defer.fail()
        d.addCallbacks(self.ready.callback, self._failed)

    def _start(self) -> defer.Deferred:
        """Make the spool, the store, the sinks...; the Deferred fires once every port listens.

        Each speed-up is made only when its switch of ``performance:`` is on
        (camgateway.perf.settings); off, its plain path is (docs/performance.md).
        """
        config = self.config
        performance = config.performance
        # Blocking steps (spool opens, writes, digests, sink I/O) share one
        # pool: sized so the outbox's deliveries never starve the sessions'
        # own steps (each waits on the disk, not on the CPU).
        pool_type = WorkerPool if performance.worker_pool else TwistedPool
        self.pool = pool_type(self.reactor, 2 * config.outbox_concurrency + 16)
        shard = self.shard
        spool = Spool(config.spool, shard.dead if shard is not None and shard.index else None)
        try:
            spool.ensure()
        except OSError as e:
            raise StartError("storage.spool", f"cannot make {e.filename or spool.root}: {e.strerror or e}") from None
        if self.workers is not None:
            self.workers.start()
        leases = None
        # One thread for the spool's flushes, the embedded store's commits and
        # the disk sink's stores (camgateway.perf.groupcommit.BatchThread).
        batch_thread = BatchThread(self.reactor, "camgateway-disk") if performance.group_commit else None
        if config.resume == "sqlite":
            store: Any = SQLiteStore(spool.store_path, self.reactor, batch_thread,
                                     batching=performance.group_commit)
        else:  # several instances: a shared store, leases, a shared spool
            from camgateway.storage.redis import RedisStore
            from camgateway.storage.redis_leases import RedisLeases

            store = RedisStore(config.resume, self.reactor, instance=config.instance,
                               claim_ttl=config.outbox_claim_ttl, spool_dir=spool.partials)
            leases = RedisLeases(store)
        self.services = Services(config, store, spool, [], self.reactor, self._run_in_thread, boot_id())
        self.services.shard = shard
        self.services.leases = leases
        if performance.group_sync:  # (else one fdatasync per finished file: Services.durable)
            self.services.spool_sync = GroupSync(spool.root, self.reactor, shared=batch_thread,
                                                 writeback_bytes=WRITEBACK_BYTES)
        self.services.batch_thread = batch_thread
        if performance.spool_reserve and self.services.own_store and not (shard is not None and shard.drain):
            # (see camgateway.perf.reserve: needs the start-up reconcile; a drain worker takes no files)
            services = self.services
            services.reserve = SpoolReserve(spool, self._run_in_thread, self.reactor,
                                            lambda: services.config.min_free_bytes)
        self.services.instance = getattr(store, "instance", "local")
        self.services.sightings = CameraSightings(store, self.reactor)
        self.keeper = LeaseKeeper(self.services) if leases is not None else None
        if leases is not None:
            self.shared_spool = SharedSpool(self.services, store, config.lease_ttl)
        sinks = self.services.sinks = make_sinks(config.sinks, sink_context(self.services, self.reactor),
                                                 sink_internals(self.services))
        self.services.outbox = Outbox(self.services, config.outbox_concurrency,
                                      give_up_after=config.outbox_give_up_after)
        self.services.journal = FinishJournal(self.services)
        self.factory = CameraFactory(self.services)
        log.info("camgateway {version}: configuration from {source}; spool {spool}; files go to: {sinks}",
                 version=__version__, source=config.source, spool=spool.root.resolve(),
                 sinks=", ".join(sink.name for sink in sinks))
        # Files finished while the store could not record them: into the store
        # first (the reconcile would take their spool files for orphans).
        d = self.services.journal.load()
        d.addCallback(lambda _: self.services.journal.replay())
        if leases is None:
            d.addCallback(lambda _: reconcile(self.services))
            if self.services.reserve is not None:
                d.addCallback(lambda _: self.services.reserve.start())
        else:
            log.info("shared store {url} as instance {instance}: spool files are checked when resumed",
                     url=config.resume.split("@")[-1], instance=self.services.instance)
            # Registered before the outbox starts: the others count this instance in (camgateway.storage.redis).
            d.addCallback(lambda _: self.shared_spool.start())  # type: ignore[union-attr]
            d.addCallback(lambda _: self.keeper.start())  # type: ignore[union-attr]
        d.addCallback(lambda _: self.services.outbox.start())
        d.addCallback(lambda _: self.services.journal.start())
        if self.workers is not None:  # listen once the other workers can take their cameras
            d.addCallback(lambda _: self.workers.wait_ready())
        d.addCallback(lambda _: self._listen())
        return d

    @defer.inlineCallbacks
    def _listen(self) -> Any:
        factory: Any = self.factory
        if self.workers is not None and self.config.workers > 1:
            factory = DispatchFactory(self.factory, self.workers, self.config.workers, self.reactor,
                                      self.config.idle_timeout)
        for i, description in enumerate(self.config.listen):
            try:
                port = yield serverFromString(self.reactor, description).listen(factory)
            except Exception as e:
                raise StartError(f"listen[{i}]", f"cannot listen on {description!r}: {listen_error(e)}") from None
            self.ports.append(port)
            log.info("listening for cameras on {description} ({address})",
                     description=description, address=port.getHost())
        return self.ports

    def _failed(self, failure: Failure) -> None:
        self.cannot_start(failure)
        self.ready.errback(failure)

    def cannot_start(self, failure: Failure) -> None:
        """The gateway (or its status service) cannot start: say why, and stop the reactor.

        A :class:`StartError` (or ConfigError) is one line naming the key at fault
        (``camgateway cannot start: listen[0]: ...``); anything else is a bug,
        logged with its traceback. The reactor stops (as soon as it runs, when
        the start failed before it did), so every service stops as on SIGTERM.
        Only the first failure is told.
        """
        if self.start_failure is not None:
            return
        self.start_failure = failure
        if failure.check(StartError, ConfigError):
            log.critical("camgateway cannot start: {reason}", reason=failure.getErrorMessage(),
                         key=getattr(failure.value, "key", None))
        else:
            log.failure("camgateway could not start", failure)
        if not self.reactor.running:
            self.reactor.callWhenRunning(self.reactor.stop)
            return
        try:
            self.reactor.stop()
        except ReactorNotRunning:  # already stopping
            pass

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        for port in self.ports:
            yield port.stopListening()
        children = self.workers.stop() if self.workers is not None else defer.succeed(None)
        if self.factory is not None:
            shutdown = self.factory.shutdown()
            timeout = self.reactor.callLater(SHUTDOWN_GRACE, shutdown.cancel)
            try:
                yield shutdown
            except defer.CancelledError:
                log.warn("shutdown: some files were still being stored after {t} s", t=SHUTDOWN_GRACE)
            if timeout.active():
                timeout.cancel()
        yield children
        if self.keeper is not None:
            self.keeper.stop()
        if self.services is not None:
            if self.services.reserve is not None:
                yield self.services.reserve.close()
            if self.services.journal is not None:  # (None when the start failed before)
                yield self.services.journal.stop()
            if self.services.outbox is not None:
                yield self.services.outbox.stop()
            if self.services.sightings is not None:
                yield self.services.sightings.close()
            for sink in self.services.sinks:
                if hasattr(sink, "close"):
                    yield defer.maybeDeferred(sink.close)
            if self.shared_spool is not None:
                yield self.shared_spool.stop()
            yield self.services.store.close()
            if self.services.spool_sync is not None:
                yield self.services.spool_sync.close()
        if self.pool is not None:
            yield self.pool.close()
        log.info("camgateway stopped")


def make_gateway(config: Config, reactor: Any = None, shard: Optional[Shard] = None,
                 twistd_logfile: Optional[str] = None, forward_logs: bool = False) -> MultiService:
    """The whole gateway: the listening service, the periodic sweep, progress logs and status web service.

    ``shard``: a child worker's place (:mod:`camgateway.runtime.worker`); ``twistd_logfile``:
    twistd's ``--logfile``; ``forward_logs``: child workers send their log events
    here (when this process logs through twistd's own log file or syslog).

    The process-wide tuning (:func:`camgateway.perf.process.tune_process`) is
    not applied here: the process that runs the gateway does that.
    """
    top = MultiService()
    gateway = GatewayService(config, reactor, shard, twistd_logfile, forward_logs)
    gateway.setServiceParent(top)

    def every(seconds: float, tick: Callable[[], Any]) -> None:
        timer = TimerService(seconds, tick)
        if reactor is not None:
            timer.clock = reactor
        timer.setServiceParent(top)

    # The periodic jobs are wrapped (periodic()): an error in one tick is
    # logged, and the next tick runs; unwrapped, it would stop its loop for good.
    # Each runs on the gateway's services, once it has them.
    def job(what: str, fn: Callable[[Services], Any]) -> Callable[[], Any]:
        return periodic(what, lambda: None if gateway.services is None else fn(gateway.services))

    partial_sweep = job("the partial sweep", sweep_expired)
    # (The orphan sweep is a shared store's only: it has no start-up reconcile.)
    orphan_sweep = job("the orphan sweep",
                       lambda s: None if gateway.shared_spool is None else sweep_orphans(s, orphan_age(config)))
    history_sweep = job("the history sweep", sweep_history)

    def sweeps() -> Any:
        return defer.maybeDeferred(partial_sweep).addCallback(lambda _: orphan_sweep()).addCallback(
            lambda _: history_sweep())

    every(min(3600.0, config.partial_ttl / 4), sweeps)
    every(FLUSH_AGE / 2, job("the half-second scan", flush_stale))
    # (Not wrapped: ProgressReporter catches and logs its own errors, per slice of a tick.)
    every(config.progress_interval,
          ProgressReporter(lambda: gateway.services, spread=PROGRESS_SPREAD * config.progress_interval))
    top.status = None  # type: ignore[attr-defined]
    if config.http_listen:
        from camgateway.web.service import StatusService  # twisted.web only when asked for

        top.status = StatusService(gateway, config, reactor)  # type: ignore[attr-defined]
        top.status.setServiceParent(top)  # type: ignore[attr-defined]
    top.gateway = gateway  # type: ignore[attr-defined]
    return top
