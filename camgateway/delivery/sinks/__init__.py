"""Where finished files go: the sink interface and the sinks shipped.

A sink receives a :class:`ReceivedFile` (a complete, durable spool file plus
everything known about it) and returns a Deferred that fires once the file is
durably delivered, or fails: with :class:`PermanentFailure` when retrying
cannot help. Sinks form a chain (see :mod:`camgateway.delivery.outbox`): a sink passes
the file on, or returns :class:`Transformed` files that the following sinks
get instead. Sinks must not modify or move the file they are given.

A sink may be given the same file again: the outbox records a delivery only
after the sink confirmed it, so a crash (or a failure to record) in between
repeats it. Every file carries its outbox entry's :attr:`ReceivedFile.id`,
the same on every attempt: a sink that can, recognises a repeat by it (the
disk sink does); the others pass it on for their receivers to de-duplicate.

Sink types are found by name in ``sinks:`` (:mod:`camgateway.delivery.sinks.registry`):
the shipped ``disk``, ``http``, ``command`` and ``mp4``, and third-party ones
registered under the entry point group ``camgateway.sinks``.

The plugin surface
------------------

A sink type's ``make(config, context)`` gets the validated entry and a
:class:`SinkContext`: the reactor, its clock, the gateway's thread pool, a
view of the spool and a logger of its own. That is all a sink is given, and
all that third-party sinks may rely on; the gateway's internal objects
(stores, sessions, the outbox) stay out of reach, so they can change without
breaking a sink. The shipped disk sink alone also gets
:class:`GatewayInternals` (a thread and a cache the gateway's own hot path
shares with it, see there).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from camgateway.base.reasons import PermanentFailure
from camgateway.delivery.sinks.context import GatewayInternals, SinkContext, SpoolView
from camgateway.storage.records import ReceivedFile


__all__ = ["IFileSink", "ReceivedFile", "PermanentFailure", "Transformed", "SinkContext", "SpoolView",
           "GatewayInternals", "validate_sink_config", "make_sinks"]


@dataclasses.dataclass(frozen=True)
class Transformed:
    """A sink's result: the files the following sinks get instead of the one it was given."""

    files: list[ReceivedFile]


class IFileSink(Interface):
    """Delivers finished files somewhere."""

    name = Attribute("A short name for logs, e.g. 'disk:/var/lib/camgateway/files'.")

    def deliver(received: ReceivedFile) -> Deferred:
        """Deliver ``received``; fire (with a description of where it went) once durable.

        A sink may also have ``close()`` (returning a Deferred or None), called
        when the gateway stops, to release connections or processes."""


def validate_sink_config(item: object, key: str, base: Path) -> Mapping[str, Any]:
    """Check one entry of ``sinks:``; relative paths resolve against ``base``."""
    from camgateway.delivery.sinks.registry import validate

    return validate(item, key, base)


def make_sinks(configs: tuple[Mapping[str, Any], ...], context: SinkContext,
               internals: Optional[GatewayInternals] = None) -> list[Any]:
    """Build the configured sinks, in order, each under its name (unique in the chain).

    Each sink gets ``context`` with a logger of its type's namespace; the
    shipped ones that ask for it also get ``internals``.
    """
    from camgateway.delivery.sinks.registry import make_chain

    return make_chain(configs, context, internals)
