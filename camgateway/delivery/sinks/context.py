"""What a sink is built with: the plugin surface (:class:`SinkContext`) and, for the shipped disk sink, more.

Re-exported by :mod:`camgateway.delivery.sinks`, where sink authors find
them; kept apart so that the registry can name them without importing the
package that imports it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["SinkContext", "SpoolView", "GatewayInternals"]


class _SpoolFiles(Protocol):
    """What :class:`SpoolView` reads of the gateway's spool (camgateway.transfer.spool.Spool)."""

    root: Path

    def new_name(self) -> str: ...

    def path(self, name: str) -> Path: ...


@dataclasses.dataclass(frozen=True)
class SpoolView:
    """What a sink sees of the spool: where its files are, and fresh paths for files it makes.

    The files a sink is given live in the spool (``ReceivedFile.path``) and
    are the gateway's: a sink reads them, never changes, moves or removes
    them. A sink that hands the sinks after it new files (:class:`Transformed`,
    as the mp4 sink does) writes each to a :meth:`new_path`: the gateway
    removes those once the last sink has them; the sink removes any it does
    not hand on.
    """

    _spool: _SpoolFiles

    @property
    def root(self) -> Path:
        """The spool's folder (to tell, say, whether another folder is on the same filesystem)."""
        return self._spool.root

    def path(self, name: str) -> Path:
        """The path of the spool file called ``name``."""
        return self._spool.path(name)

    def new_path(self) -> Path:
        """A fresh path in the spool, for a file the sink makes and hands on (nothing is there yet)."""
        return self._spool.path(self._spool.new_name())


@dataclasses.dataclass(frozen=True)
class SinkContext:
    """What a sink is built with (``make(config, context)``): the whole of the plugin surface.

    ``reactor`` and ``clock`` are usually the same object; tests give a
    :class:`twisted.internet.task.Clock` as ``clock`` to drive time.
    """

    #: The reactor: ``callLater``, ``spawnProcess``, ``connectTCP``… (IReactorTime, IReactorProcess, IReactorTCP).
    reactor: Any
    #: Time and timers (IReactorTime): what a sink schedules retries or timeouts on.
    clock: Any
    #: ``run_in_thread(f, *args, **kwargs) -> Deferred``: blocking work (file I/O,
    #: hashing) on the gateway's thread pool, never on the reactor's thread.
    run_in_thread: Callable[..., Deferred]
    #: The spool, read-only but for fresh paths of files the sink makes (see :class:`SpoolView`).
    spool: SpoolView
    #: The sink's logger: namespace ``camgateway.delivery.sinks.<type>``.
    log: Logger = dataclasses.field(default_factory=lambda: Logger(namespace="camgateway.delivery.sinks"))


@dataclasses.dataclass(frozen=True)
class GatewayInternals:
    """What the shipped disk sink gets beside its :class:`SinkContext`: not part of the plugin surface.

    The disk sink sits on the gateway's hot path (hundreds of files a second):
    it stores its batches on the thread the spool's flushes and the embedded
    store share, so one ``syncfs`` covers them all, and it takes the first
    bytes of a file from the writes that saw them instead of reading them
    again. Both are the gateway's own objects, with no promise to stay as
    they are; a sink type gets them only when it is shipped with the gateway
    and says ``uses_internals = True``.
    """

    #: The thread the spool's flushes and the embedded store share (camgateway.perf.groupcommit.BatchThread), or None.
    batch_thread: Any = None
    #: The first bytes of files just finished, by spool path (camgateway.runtime.context.FileHeads), or None.
    heads: Any = None
    #: The gateway's speed-up switches (camgateway.perf.settings.Performance; None: every one on).
    performance: Any = None
