"""Which speed-ups are on: the ``performance:`` section, one switch each (see docs/performance.md).

Every speed-up of :mod:`camgateway.perf` has a plain path beside it, the one
a switch turned off selects: a ``transport.write`` per reply, a scan of every
session, an ``fdatasync`` per file, a commit per statement, Twisted's thread
pool... All are on by default. ``CAMGATEWAY_PERFORMANCE=off`` in the
environment turns the default of every switch off (a setting given in the
configuration still wins): a quick way to tell whether a fault is a
speed-up's.

The settings are read when the gateway's parts are made (per service, per
connection), never per frame.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

__all__ = ["Performance", "ENVIRONMENT", "SWITCHES", "environment_default", "environment_error"]

#: The environment variable that turns every switch's default off (``off``) or leaves it on (``on``, unset).
ENVIRONMENT = "CAMGATEWAY_PERFORMANCE"
_VALUES = {"": True, "on": True, "off": False}


def environment_default(environ: Mapping[str, str] = os.environ) -> bool:
    """Every switch's default: False when ``CAMGATEWAY_PERFORMANCE=off`` (any case), else True."""
    return _VALUES.get(environ.get(ENVIRONMENT, "").strip().lower(), True)


def environment_error(environ: Mapping[str, str] = os.environ) -> str | None:
    """What is wrong with ``CAMGATEWAY_PERFORMANCE``'s value, or None (unset, ``on`` or ``off``)."""
    value = environ.get(ENVIRONMENT, "")
    if value.strip().lower() in _VALUES:
        return None
    return f"must be on or off, got {value!r}"


@dataclasses.dataclass(frozen=True)
class Performance:
    """One switch per speed-up; True runs the speed-up, False its plain path."""

    #: The half-second scan visits only the sessions with something due (camgateway.perf.due),
    #: not every session.
    due_heap: bool = True
    #: One flush for many finishing files (camgateway.perf.durability.GroupSync: ``syncfs``), not an
    #: ``fdatasync`` per spool file and an ``fsync`` per sidecar and folder in the disk sink.
    group_sync: bool = True
    #: The store's statements and the disk sink's stores in batches on one shared thread
    #: (camgateway.perf.groupcommit), not one commit, one store per call.
    group_commit: bool = True
    #: Empty spool files made ahead (camgateway.perf.reserve), not one made per new file.
    spool_reserve: bool = True
    #: A slow camera's socket read a few frames at a time (``SO_RCVLOWAT``, camgateway.perf.slow_reads).
    read_marks: bool = True
    #: A reply with nothing queued before it sent with one ``send``, not through Twisted's write buffer.
    direct_send: bool = True
    #: A reactor turn's replies sent together at its end (camgateway.perf.sockets.TurnWriter).
    reply_batching: bool = True
    #: A connection whose reads come back full read 256 KiB at a time, not Twisted's 64 KiB.
    wide_reads: bool = True
    #: Blocking calls on camgateway.perf.threads.WorkerPool, not Twisted's ThreadPool.
    worker_pool: bool = True
    #: glibc's allocator keeps big buffers in its heap (camgateway.perf.process.tune_malloc).
    malloc: bool = True
    #: The start-up objects frozen out of the collector, a young-generation threshold of 10,000.
    gc: bool = True
    #: The GIL switch interval of 0.5 ms (one process), not CPython's 5 ms.
    switch_interval: bool = True

    @classmethod
    def every(cls, on: bool) -> "Performance":
        """Every switch ``on`` (True) or off (False)."""
        return cls(**{name: on for name in SWITCHES})

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Performance":
        """Every switch at its default: on, or off with ``CAMGATEWAY_PERFORMANCE=off``."""
        return cls.every(environment_default(environ))


#: The switches' names, in the order of the section.
SWITCHES: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(Performance))
