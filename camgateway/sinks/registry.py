"""Sink types by name: the shipped ones and those of other packages.

A sink type is anything with two callables (a module will do):

``validate(config, key, base) -> Mapping``
    check one ``sinks:`` entry (raise :class:`~camgateway.config.ConfigError`
    naming ``key.<field>``); relative paths resolve against ``base``;
``make(config, services) -> IFileSink``
    build the sink from the validated entry.

Other packages register types under the entry point group ``camgateway.sinks``
(``[options.entry_points] camgateway.sinks = s3 = mypkg.s3sink``); the entry
point's name is the ``type:`` used in the configuration.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterable, Mapping

from camgateway.config import ConfigError

__all__ = ["BUILT_IN", "sink_type", "known_types", "validate", "make", "check_keys"]

ENTRY_POINT_GROUP = "camgateway.sinks"
BUILT_IN = {
    "disk": "camgateway.sinks.disk",
    "http": "camgateway.sinks.http",
    "command": "camgateway.sinks.command",
    "mp4": "camgateway.sinks.mp4",
}


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
    allowed = set(allowed) | {"type"}
    for name in config:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}", f"unknown key for a {config.get('type')} sink"
                                               f" (known: {', '.join(sorted(allowed))})")
    for name in required:
        if name not in config:
            raise ConfigError(f"{key}.{name}", f"a {config.get('type')} sink needs {name}")


def validate(item: object, key: str, base: Path) -> Mapping[str, Any]:
    """Check one ``sinks:`` entry."""
    if not isinstance(item, Mapping):
        raise ConfigError(key, "must be a mapping such as {type: disk, root: /var/lib/camgateway/files}")
    name = item.get("type")
    if not isinstance(name, str):
        raise ConfigError(f"{key}.type", f"must be one of {', '.join(known_types())}, got {name!r}")
    validated = dict(sink_type(name, key).validate(item, key, base))
    validated["type"] = name
    return validated


def make(config: Mapping[str, Any], services: Any) -> Any:
    """Build a sink from a validated entry."""
    return sink_type(config["type"], "sinks").make(config, services)
