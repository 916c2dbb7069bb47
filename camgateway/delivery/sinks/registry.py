"""Sink types by name: the shipped ones and those of other packages; the chain's names and shape.

A sink type is anything with two callables (a module will do):

``validate(config, key, base) -> Mapping``
    check one ``sinks:`` entry (raise :class:`~camgateway.runtime.config.ConfigError`
    naming ``key.<field>``); relative paths resolve against ``base``;
``make(config, context) -> IFileSink``
    build the sink from the validated entry and a
    :class:`~camgateway.delivery.sinks.SinkContext` (the reactor, clock,
    thread pool, spool view and the sink's logger).

and, optionally:

``stores``
    whether the sink keeps the files it is given somewhere (True when
    absent): ``disk``, ``http`` and ``command`` do; ``mp4`` does not, it
    hands the sinks after it other files, so a chain must not end with it
    (:func:`check_chain`);
``passes_on``
    for a sink that does not store: what it hands on, for the error that
    says so (``"the MP4s and posters it makes"``);
``default_name(config) -> str``
    a readable name for the sink when the entry has no ``name:`` (the type's
    name when absent).
``uses_internals``
    shipped types only (third-party ones never get them): ``make`` takes a
    third argument, the :class:`~camgateway.delivery.sinks.GatewayInternals`.

Every entry may have a ``name:`` (letters, digits and ``_.:-``): the sink's
name in logs, metrics, the outbox and dead letters. Without one a sink gets
its type's default name, with ``-2``, ``-3``… when two would be the same
(:func:`sink_names`).

Other packages register types under the entry point group ``camgateway.sinks``
(``[options.entry_points] camgateway.sinks = s3 = mypkg.s3sink``); the entry
point's name is the ``type:`` used in the configuration.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

from twisted.logger import Logger

from camgateway.base.units import ConfigError
from camgateway.delivery.sinks.context import GatewayInternals, SinkContext

__all__ = ["BUILT_IN", "sink_type", "known_types", "validate", "make", "check_keys", "stores", "sink_names",
           "check_chain", "checked_chain", "make_chain"]

log = Logger(namespace="camgateway.delivery.sinks")

ENTRY_POINT_GROUP = "camgateway.sinks"
BUILT_IN = {
    "disk": "camgateway.delivery.sinks.disk",
    "http": "camgateway.delivery.sinks.http",
    "command": "camgateway.delivery.sinks.command",
    "mp4": "camgateway.delivery.sinks.mp4",
}
#: What a sink's name may hold (it becomes a metrics label and a log field).
NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_.:-]+")


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_types() -> list[str]:
    """Every type name that can be configured."""
    return sorted(set(BUILT_IN) | set(_plugins()))


def sink_type(name: str, key: str) -> Any:
    """The sink type called ``name`` (``key`` names the config entry, for errors)."""
    if name in BUILT_IN:
        return importlib.import_module(BUILT_IN[name])
    plugin = _plugins().get(name)
    if plugin is None:
        raise ConfigError(f"{key}.type", f"must be one of {', '.join(known_types())}, got {name!r}")
    try:
        return plugin.load()
    except Exception as e:
        raise ConfigError(f"{key}.type", f"sink type {name!r} ({plugin.value}) failed to load: {e}") from None


def check_keys(config: Mapping[str, Any], key: str, allowed: Iterable[str], required: Iterable[str] = ()) -> None:
    """Refuse unknown keys and require some (errors name ``key.<field>``)."""
    allowed = set(allowed) | {"type", "name"}
    for name in config:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}", f"unknown key for a {config.get('type')} sink"
                                               f" (known: {', '.join(sorted(allowed))})")
    for name in required:
        if name not in config:
            raise ConfigError(f"{key}.{name}", f"a {config.get('type')} sink needs {name}")


def validate(item: object, key: str, base: Path) -> Mapping[str, Any]:
    """Check one ``sinks:`` entry, its optional ``name`` included."""
    if not isinstance(item, Mapping):
        raise ConfigError(key, "must be a mapping such as {type: disk, root: /var/lib/camgateway/files}")
    kind = item.get("type")
    if not isinstance(kind, str):
        raise ConfigError(f"{key}.type", f"must be one of {', '.join(known_types())}, got {kind!r}")
    name = item.get("name")
    if "name" in item and not (isinstance(name, str) and NAME.fullmatch(name)):
        raise ConfigError(f"{key}.name", "must be a non-empty name of letters, digits and _ . : -"
                                          f" (e.g. {kind}-archive), got {name!r}")
    validated = dict(sink_type(kind, key).validate({k: v for k, v in item.items() if k != "name"}, key, base))
    validated["type"] = kind
    if name is not None:
        validated["name"] = name
    return validated


def make(config: Mapping[str, Any], context: SinkContext, internals: Optional[GatewayInternals] = None) -> Any:
    """Build a sink from a validated entry (named after its ``name``, when it has one).

    The sink gets ``context`` with a logger of its type's namespace
    (``camgateway.delivery.sinks.<type>``); a shipped type that says
    ``uses_internals`` also gets ``internals`` (an empty set when None).
    """
    kind_name = config["type"]
    kind = sink_type(kind_name, "sinks")
    context = dataclasses.replace(context, log=Logger(namespace=f"camgateway.delivery.sinks.{kind_name}"))
    if kind_name in BUILT_IN and getattr(kind, "uses_internals", False):
        sink = kind.make(config, context, internals if internals is not None else GatewayInternals())
    else:
        sink = kind.make(config, context)
    if config.get("name"):
        sink.name = config["name"]
    return sink


def stores(config: Mapping[str, Any]) -> bool:
    """Whether the sink of a validated entry keeps what it is given (see the module's doc)."""
    return bool(getattr(sink_type(config["type"], "sinks"), "stores", True))


def _default_name(config: Mapping[str, Any]) -> str:
    kind = sink_type(config["type"], "sinks")
    describe = getattr(kind, "default_name", None)
    name = str(describe(config)) if callable(describe) else str(config["type"])
    return _NOT_NAME.sub("_", name) or "sink"


def _names(configs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[ConfigError]]:
    """Every sink's name (given, else its default, made unique) and the duplicate given names."""
    errors: list[ConfigError] = []
    given: dict[str, int] = {}
    for i, config in enumerate(configs):
        name = config.get("name")
        if name is None:
            continue
        if name in given:
            errors.append(ConfigError(f"sinks[{i}].name", f"{name!r} is already the name of sinks[{given[name]}]:"
                                                          " give each sink a name of its own"))
        else:
            given[name] = i
    taken = set(given)
    names = []
    for config in configs:
        name = config.get("name")
        if name is None:
            base = name = _default_name(config)
            n = 2
            while name in taken:
                name, n = f"{base}-{n}", n + 1
            taken.add(name)
        names.append(name)
    return names, errors


def sink_names(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The names of a chain's sinks, in order: unique, the given ones kept (ConfigError on duplicates)."""
    names, errors = _names(configs)
    if errors:
        raise errors[0]
    return names


def check_chain(configs: Sequence[Mapping[str, Any]]) -> list[ConfigError]:
    """What is wrong with a chain of validated entries as a whole: duplicate names, output that no sink stores.

    A sink that does not store (``mp4``) hands the files it makes only to the
    sinks after it: one with no storing sink after it loses them.
    """
    _, errors = _names(configs)
    storing = [stores(config) for config in configs]
    keeping = [kind for kind in BUILT_IN if getattr(sink_type(kind, "sinks"), "stores", True)]
    remedy = f"{', '.join(keeping[:-1])} or {keeping[-1]}"
    for i, config in enumerate(configs):
        if storing[i] or any(storing[i + 1:]):
            continue
        kind = config["type"]
        what = getattr(sink_type(kind, "sinks"), "passes_on", "the files it passes on")
        where = (f"the {kind} sink is the last sink and stores nothing itself" if i == len(configs) - 1
                 else f"this {kind} sink stores nothing itself and no sink after it does")
        errors.append(ConfigError(f"sinks[{i}]", f"{where}: {what} go only to the sinks after it;"
                                                 f" put a {remedy} sink after it"))
    return errors


def checked_chain(configs: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
    """The validated entries of ``sinks:``, once :func:`check_chain` found nothing wrong (else its first error)."""
    errors = check_chain(configs)
    if errors:
        raise errors[0]
    return tuple(configs)


def _where(config: Mapping[str, Any]) -> str:
    """Where a sink puts files, for the log: its root, URL (no query, no credentials) or program."""
    if isinstance(config.get("root"), str):
        return config["root"]
    if isinstance(config.get("url"), str):
        parts = urlsplit(config["url"])
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    command = config.get("command")
    return command[0] if isinstance(command, list) and command and isinstance(command[0], str) else ""


def make_chain(configs: Sequence[Mapping[str, Any]], context: SinkContext,
               internals: Optional[GatewayInternals] = None) -> list[Any]:
    """Build the sinks of a chain, in order, each under its name (:func:`sink_names`); log where each puts files."""
    names = sink_names(configs)
    log.info("sinks: {chain}", chain=", ".join(f"{name} ({_where(config)})" if _where(config) else name
                                               for config, name in zip(configs, names)))
    return [make({**config, "name": name}, context, internals) for config, name in zip(configs, names)]
