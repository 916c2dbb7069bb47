"""Configuration: the YAML file, its defaults and its validation.

Every error names the key at fault (``timeouts.idle: must be a positive
number``), and validation reports every error it finds at once: it goes on
after each one, then raises one :class:`ConfigError` carrying them all. The
keys of the public contract are documented in docs/configuration.md (in
short in README.md) and in ``etc/camgateway.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Mapping, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit

import yaml

from camgateway.base.units import ConfigError, duration_text, parse_duration, parse_size, size_text
from camgateway.perf.settings import ENVIRONMENT, SWITCHES, Performance, environment_error

__all__ = [
    "Config",
    "ConfigError",
    "Performance",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_DATA_DIR",
    "DUALCAM_SOURCES",
    "MODES",
    "LOG_FORMATS",
    "DuplicateKeyError",
    "UniqueKeyLoader",
    "check_endpoint_strings",
    "check_workers",
    "effective",
    "load_config",
    "mask_url",
    "parse_config",
    "parse_duration",
    "parse_size",
]

DEFAULT_CONFIG_PATH = Path("/etc/camgateway/camgateway.yaml")
#: Where the built-in defaults keep everything: relative to the working directory.
DEFAULT_DATA_DIR = Path("camgateway-data")
DUALCAM_SOURCES = ("videor", "videof", "photor", "photof")
MODES = ("auto", "dualcam", "dsm", "adas")
LOG_FORMATS = ("auto", "text", "json")


class _Errors:
    """The errors found so far: validation goes on after each, to report them all at once."""

    def __init__(self) -> None:
        self.found: list[ConfigError] = []

    def add(self, key: str, message: str) -> None:
        """Keep an error."""
        self.found.append(ConfigError(key, message))

    def check(self, convert: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        """``convert(*args)``; or ``default``, keeping the ConfigError it raised."""
        try:
            return convert(*args)
        except ConfigError as e:
            self.found.extend(e.errors)
            return default

    def raise_any(self) -> None:
        """Raise one ConfigError for every error kept, if any."""
        if self.found:
            raise ConfigError.several(self.found)


@dataclasses.dataclass(frozen=True)
class Config:
    """The validated configuration the gateway runs on."""

    listen: tuple[str, ...] = ("tcp:5000:interface=0.0.0.0",)
    spool: Path = DEFAULT_DATA_DIR / "spool"
    partial_ttl: float = 7 * 86400.0
    checkpoint_bytes: int = 4 * 1024 * 1024
    #: "sqlite" (embedded, one instance) or a redis:// URL (several instances, shared spool).
    resume: str = "sqlite"
    #: This instance's name among several (default: host, pid and a random part).
    instance: Optional[str] = None
    #: How long a camera's session lease lives without renewal (several instances).
    lease_ttl: float = 30.0
    #: Files received longer ago leave the history of /api/files (not the sinks).
    history_ttl: float = 30 * 86400.0
    sinks: tuple[Mapping[str, Any], ...] = ({"type": "disk", "root": str(DEFAULT_DATA_DIR / "files")},)
    allow: frozenset[str] = frozenset()
    idle_timeout: float = 120.0
    metadata_timeout: float = 10.0
    step_timeout: float = 60.0
    mode: str = "auto"
    metadata: bool = True
    dualcam_sources: tuple[str, ...] = DUALCAM_SOURCES
    resume_retries: int = 20
    max_connections: int = 20000
    max_file_bytes: int = 1024**3
    min_free_bytes: int = 256 * 1024 * 1024
    outbox_concurrency: int = 32
    outbox_give_up_after: float = 7 * 86400.0
    #: Several instances: a delivery claimed by an instance that died is taken over after this.
    outbox_claim_ttl: float = 300.0
    #: /healthz says degraded once every delivery attempt to a sink has failed for this long.
    outbox_degraded_after: float = 600.0
    #: The status web service (camgateway.web): endpoints (none = off) and its token.
    http_listen: tuple[str, ...] = ()
    http_token: Optional[str] = None
    #: Logs: auto | text | json, an optional file (reopened after logrotate), progress events.
    log_format: str = "auto"
    log_file: Optional[Path] = None
    progress_interval: float = 30.0
    #: Gateway processes (camgateway.runtime.workers): 1, or one per core for large fleets.
    workers: int = 1
    #: The speed-ups, one switch each (camgateway.perf.settings; docs/performance.md).
    performance: Performance = dataclasses.field(default_factory=Performance.from_environment)
    source: str = "built-in defaults"

    def allowed(self, imei: str) -> bool:
        """Whether a device may transfer files (an empty allow-list allows all)."""
        return not self.allow or imei in self.allow


def _mapping(value: object, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
    return value


def _known(section: Mapping[str, Any], key: str, names: tuple[str, ...]) -> None:
    errors = [ConfigError(f"{key}.{name}" if key else str(name), f"unknown key (known: {', '.join(names)})")
              for name in section if name not in names]
    if errors:
        raise ConfigError.several(errors)


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _string_list(value: object, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list, got {type(value).__name__}")
    out = []
    errors = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            errors.append(ConfigError(f"{key}[{i}]", f"must be a string, got {item!r}"))
        out.append(str(item))
    if errors:
        raise ConfigError.several(errors)
    return tuple(out)


class _Section:
    """One mapping of the document (``storage``, ``timeouts``...): its values, checked, errors kept."""

    def __init__(self, errors: _Errors, value: object, key: str, names: tuple[str, ...],
                 where: Optional[str] = None) -> None:
        self.errors = errors
        self.key = key
        self.values: Mapping[str, Any] = errors.check(_mapping, value, where or key, default={})
        errors.check(_known, self.values, key, names)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str, default: Any = None) -> Any:
        """The raw value of ``name``."""
        return self.values.get(name, default)

    def take(self, name: str, convert: Callable[[Any, str], Any], default: Any) -> Any:
        """``name`` converted (``convert(value, "section.name")``), or ``default`` if absent or wrong."""
        if name not in self.values:
            return default
        return self.errors.check(convert, self.values[name], f"{self.key}.{name}", default=default)


#: The length of an IMEI (14 digits and a check digit).
IMEI_DIGITS = 15


def parse_config(raw: object, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate a parsed YAML document into a :class:`Config`.

    Relative paths are resolved against ``base`` (the working directory).
    Every error found is reported: one :class:`ConfigError` carries them all.
    """
    base = base or Path.cwd()
    errors = _Errors()
    doc = _Section(errors, raw, "", ("listen", "workers", "storage", "sinks", "devices", "timeouts", "download",
                                     "limits", "outbox", "http", "log", "performance"),
                   where="(top level)")
    d = Config()
    values: dict[str, Any] = {"source": source}

    if "listen" in doc:
        listen = errors.check(_string_list, doc.get("listen"), "listen")
        if listen == ():
            errors.add("listen", "needs at least one endpoint, e.g. tcp:5000")
        elif listen is not None:
            values["listen"] = listen

    storage = _Section(errors, doc.get("storage"), "storage",
                       ("spool", "partial_ttl", "checkpoint_bytes", "resume", "instance", "lease_ttl",
                        "history_ttl"))
    resume = storage.get("resume", "sqlite")
    if not isinstance(resume, str) or not (resume == "sqlite" or resume.startswith(("redis://", "rediss://",
                                                                                      "unix://"))):
        shown = mask_url(resume) if isinstance(resume, str) else resume
        errors.add("storage.resume", f"must be sqlite or a redis:// URL, got {shown!r}")
    else:
        values["resume"] = resume
    instance = storage.get("instance")
    if instance is not None and (not isinstance(instance, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}",
                                                                                  instance)):
        errors.add("storage.instance", f"must be a short name (letters, digits, _.:-), got {instance!r}")
    else:
        values["instance"] = instance
    values["lease_ttl"] = storage.take("lease_ttl", parse_duration, d.lease_ttl)
    values["spool"] = storage.take("spool", _directory(base), base / d.spool)
    values["partial_ttl"] = storage.take("partial_ttl", parse_duration, d.partial_ttl)
    values["history_ttl"] = storage.take("history_ttl", parse_duration, d.history_ttl)
    values["checkpoint_bytes"] = storage.take("checkpoint_bytes", parse_size, d.checkpoint_bytes)

    if "sinks" in doc:
        sinks = errors.check(_sinks, doc.get("sinks"), base)
    else:  # the built-in chain: MP4s with sound beside the originals when ffmpeg is installed, else disk alone
        from camgateway.delivery.sinks.mp4 import default_sinks

        sinks = errors.check(_sinks, default_sinks(str(DEFAULT_DATA_DIR / "files")), base)
    if sinks is not None:
        values["sinks"] = sinks
        for i, sink in enumerate(sinks):  # (the disk sink makes its root: one under a file never works)
            if sink.get("type") == "disk" and isinstance(sink.get("root"), str):
                errors.check(_directory(base), sink["root"], f"sinks[{i}].root")

    devices = _Section(errors, doc.get("devices"), "devices", ("allow",))
    allow = devices.take("allow", _string_list, ())
    raw_allow = devices.get("allow")
    for i, imei in enumerate(allow):
        if not (imei.isascii() and imei.isdigit()) or len(imei) != IMEI_DIGITS:
            number = isinstance(raw_allow, list) and isinstance(raw_allow[i], int)
            errors.add(f"devices.allow[{i}]", f"must be an IMEI of {IMEI_DIGITS} digits, got {imei!r}"
                                              + (" (write IMEIs in quotes: YAML misreads a number that starts"
                                                 " with 0)" if number else ""))
    # Cameras send the IMEI as a number: compared as str(int), without leading zeros.
    values["allow"] = frozenset(imei.lstrip("0") or "0" for imei in allow)

    timeouts = _Section(errors, doc.get("timeouts"), "timeouts", ("idle", "metadata", "step"))
    values["idle_timeout"] = timeouts.take("idle", parse_duration, d.idle_timeout)
    values["metadata_timeout"] = timeouts.take("metadata", parse_duration, d.metadata_timeout)
    values["step_timeout"] = timeouts.take("step", parse_duration, d.step_timeout)

    download = _Section(errors, doc.get("download"), "download",
                        ("mode", "metadata", "dualcam_sources", "resume_retries"))
    mode = download.get("mode", d.mode)
    if mode not in MODES:
        errors.add("download.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    else:
        values["mode"] = mode
    values["metadata"] = download.take("metadata", _bool, d.metadata)
    values["dualcam_sources"] = download.take("dualcam_sources", _dualcam_sources, d.dualcam_sources)
    values["resume_retries"] = download.take("resume_retries", _positive_int, d.resume_retries)

    limits = _Section(errors, doc.get("limits"), "limits", ("max_connections", "max_file_bytes", "min_free_bytes"))
    values["max_connections"] = limits.take("max_connections", _positive_int, d.max_connections)
    values["max_file_bytes"] = limits.take("max_file_bytes", parse_size, d.max_file_bytes)
    values["min_free_bytes"] = limits.take("min_free_bytes", _size_or_zero, d.min_free_bytes)

    outbox = _Section(errors, doc.get("outbox"), "outbox", ("concurrency", "give_up_after", "claim_ttl",
                                                            "degraded_after"))
    values["outbox_claim_ttl"] = outbox.take("claim_ttl", parse_duration, d.outbox_claim_ttl)
    values["outbox_concurrency"] = outbox.take("concurrency", _positive_int, d.outbox_concurrency)
    values["outbox_give_up_after"] = outbox.take("give_up_after", parse_duration, d.outbox_give_up_after)
    values["outbox_degraded_after"] = outbox.take("degraded_after", parse_duration, d.outbox_degraded_after)
    values.update(_http(_Section(errors, doc.get("http"), "http", ("listen", "token", "token_file")), base))
    values.update(_log(_Section(errors, doc.get("log"), "log", ("format", "file", "progress_interval")), base, d))
    if "workers" in doc:
        values["workers"] = errors.check(_workers, doc.get("workers"), default=d.workers)
    values["performance"] = _performance(_Section(errors, doc.get("performance"), "performance", SWITCHES), d)
    config = Config(**values)
    errors.found.extend(check_endpoint_strings(config))
    errors.check(check_workers, config)
    errors.raise_any()
    return config


def _performance(section: _Section, d: Config) -> Performance:
    """The ``performance`` section: a boolean per speed-up, each defaulting to on (off with
    ``CAMGATEWAY_PERFORMANCE=off``, whose other values are errors)."""
    why = environment_error()
    if why is not None:
        section.errors.add(ENVIRONMENT, f"(environment variable) {why}")
    return Performance(**{name: section.take(name, _bool, getattr(d.performance, name)) for name in SWITCHES})


def _dualcam_sources(value: object, key: str) -> tuple[str, ...]:
    sources = _string_list(value, key)
    errors = [ConfigError(f"{key}[{i}]", f"must be one of {', '.join(DUALCAM_SOURCES)}, got {name!r}")
              for i, name in enumerate(sources) if name not in DUALCAM_SOURCES]
    if not errors and len(set(sources)) != len(sources):
        errors.append(ConfigError(key, "lists a source twice"))
    if errors:
        raise ConfigError.several(errors)
    return sources


#: At most this many worker processes (``workers: auto`` takes one per core up to it).
MAX_WORKERS = 64
#: Endpoint types whose connections are plain TCP sockets, which can be handed to another worker.
_HANDOVER_ENDPOINTS = ("tcp", "tcp6", "haproxy", "systemd")


def _workers(value: object) -> int:
    """``workers``: a count, or ``auto`` (one per core)."""
    if value == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(MAX_WORKERS, cores)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError("workers", f"must be auto or a number of processes from 1 to {MAX_WORKERS},"
                                     f" got {value!r}")
    return value


def check_workers(config: Config) -> None:
    """What ``workers`` > 1 needs of the rest (also after ``--listen`` replaced the endpoints)."""
    errors = []
    if config.workers > 1:
        if config.resume != "sqlite":
            errors.append(ConfigError("workers", "several workers need storage.resume: sqlite (with a shared"
                                                 " Redis store, run several instances instead)"))
        for i, description in enumerate(config.listen):
            kind = description.split(":", 1)[0].lower()
            inner = description.split(":", 2)[1].lower() if kind == "haproxy" and ":" in description else "tcp"
            if kind not in _HANDOVER_ENDPOINTS or inner not in ("tcp", "tcp6"):
                errors.append(ConfigError(
                    f"listen[{i}]", f"{description!r}: with workers > 1 every camera endpoint must be plain TCP"
                                    " (tcp:, tcp6:, haproxy:tcp:, systemd:), since a connection is handed to its"
                                    " worker process; terminate TLS in front (HAProxy) or use workers: 1"))
    if errors:
        raise ConfigError.several(errors)


#: Endpoint types that listen on a TCP port: its number is their first argument, or ``port=``.
_TCP_ENDPOINTS = ("tcp", "tcp6", "ssl")


def _tcp_address(description: str) -> Optional[tuple[str, str, str]]:
    """``(family, port, interface)`` of an endpoint string listening on TCP, else None (``unix:``...)."""
    parts = [part.replace("\\", "") for part in re.split(r"(?<!\\):", description)]
    kind = parts[0].lower()
    if kind == "haproxy" and len(parts) > 1:
        parts = parts[1:]
        kind = parts[0].lower()
    if kind not in _TCP_ENDPOINTS:
        return None
    args = [part for part in parts[1:] if "=" not in part]
    kwargs = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
    port = kwargs.get("port", args[0] if args else "")
    interface = kwargs.get("interface", args[1] if kind != "ssl" and len(args) > 1 else "")
    family = "tcp6" if kind == "tcp6" else "tcp"
    if interface in ("", "0.0.0.0", "::"):
        interface = "*"
    return family, port, interface


def check_endpoint_strings(config: Config) -> list[ConfigError]:
    """The errors of ``listen`` and ``http.listen`` as strings: a TCP port out of range, an address twice.

    (:func:`camgateway.runtime.tap.check_endpoints` then has Twisted parse each one
    and load its TLS keys.)
    """
    errors = []
    seen: dict[tuple[str, str, str], str] = {}
    for key, descriptions in (("listen", config.listen), ("http.listen", config.http_listen)):
        for i, description in enumerate(descriptions):
            where = f"{key}[{i}]"
            address = _tcp_address(description)
            if address is not None:
                port = address[1]
                if not port.isdigit():
                    errors.append(ConfigError(where, f"{description!r}: the port must be a number from 0 to 65535,"
                                                     f" got {port!r}"))
                    continue
                if int(port) > 65535:
                    errors.append(ConfigError(where, f"{description!r}: port {int(port)} is out of range (0 to"
                                                     " 65535)"))
                    continue
                # (port 0 is any free port: the same string twice is still a mistake)
                address = (address[0], str(int(port)) if int(port) else description, address[2])
            same = address if address is not None else ("", description, "")
            if same in seen:
                errors.append(ConfigError(where, f"{description!r} is the address of {seen[same]} already: each"
                                                 " endpoint can be listened on once"))
            else:
                seen[same] = where
    return errors


def _positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, f"must be a positive integer, got {value!r}")
    return value


def _size_or_zero(value: object, key: str) -> int:
    return 0 if value == 0 and not isinstance(value, bool) else parse_size(value, key)


def _path(base: Path) -> Callable[[Any, str], Path]:
    def convert(value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"must be a directory path, got {value!r}")
        return base / os.path.expanduser(value)
    return convert


def _directory(base: Path) -> Callable[[Any, str], Path]:
    """A path as :func:`_path`, that is a directory or can be made one (the gateway makes the folders).

    Refused: a path that is a file, or lies under one. Whether the gateway
    may write there is found out when it starts (it may run as another user).
    """
    as_path = _path(base)

    def convert(value: Any, key: str) -> Path:
        path = as_path(value, key)
        for candidate in (path, *path.parents):
            try:
                mode = candidate.stat().st_mode
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                break  # cannot look (permissions): the start will tell
            if not stat.S_ISDIR(mode):
                raise ConfigError(key, f"{path} is a file, not a directory" if candidate == path else
                                       f"{path} cannot be made: {candidate} is a file, not a directory")
            break
        return path
    return convert


def _sinks(value: object, base: Path) -> tuple[Mapping[str, Any], ...]:
    from camgateway.delivery.sinks import validate_sink_config  # sinks know their own keys

    if not isinstance(value, list) or not value:
        raise ConfigError("sinks", "must be a non-empty list of sinks, e.g. [{type: disk, root: ...}]")
    from camgateway.delivery.sinks.registry import checked_chain  # names, and output some sink stores

    errors = _Errors()
    validated = [errors.check(validate_sink_config, item, f"sinks[{i}]", base) for i, item in enumerate(value)]
    errors.raise_any()
    return checked_chain(validated)


def _read_text(path: Path, key: str) -> str:
    """A UTF-8 file's text; errors name ``key``."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{path} is not UTF-8 text: {e}") from None


def load_config(path: Path | None, *, explicit: bool = True, base: Path | None = None) -> Config:
    """Read and validate the YAML file at ``path``.

    With ``explicit=False`` (the default path, not named by the user) a missing
    file means the built-in defaults. An explicitly named file must exist.
    """
    base = base or Path.cwd()
    if path is None or (not explicit and not path.exists()):
        return parse_config({}, "built-in defaults", base)
    text = _read_text(path, "--config")
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as e:
        mark = e.problem_mark
        second = mark.line + 1 if mark is not None else "?"
        raise ConfigError(e.key_path, f"given twice in {path} (line {e.first_line} and line {second}):"
                                      " YAML would silently keep only the last") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        context = ""
        if e.context:
            since = e.context_mark
            context = f" ({e.context}" + (f" at line {since.line + 1}" if since is not None else "") + ")"
        raise ConfigError("--config", f"{where}: not valid YAML: {e.problem}{context}") from None
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}") from None
    return parse_config(raw, str(path), base)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping of the YAML document has a key twice; ``key_path`` is its dotted path."""

    def __init__(self, key_path: str, first_line: int, context_mark: Any, problem_mark: Any) -> None:
        super().__init__("while constructing a mapping", context_mark,
                         f"found {key_path} a second time (first at line {first_line})", problem_mark)
        self.key_path = key_path
        self.first_line = first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently).

    Raises :class:`DuplicateKeyError`. Merge keys (``<<: *defaults``) still
    work: a mapping's own key may override one it merges.
    """

    def get_single_node(self) -> Any:
        self.root_node = super().get_single_node()
        return self.root_node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: SafeConstructor refuses it itself
                if earlier is not key_node:
                    where = _node_path(self.root_node, node)
                    raise DuplicateKeyError(f"{where}.{key}" if where else str(key), earlier.start_mark.line + 1,
                                            node.start_mark, key_node.start_mark)
        return super().construct_mapping(node, deep)


def _node_path(root: Any, target: Any) -> str:
    """The dotted path (``sinks[1].headers``) of ``target`` in a YAML node tree."""
    stack = [(root, "")]
    seen = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                stack.append((value, f"{path}.{name}" if path else str(name)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node.value))
    return ""


def _http(http: _Section, base: Path) -> dict[str, Any]:
    """The ``http`` section: the status web service (off unless ``listen`` is given)."""
    out: dict[str, Any] = {"http_listen": http.take("listen", _string_list, ())}
    if "token" in http and "token_file" in http:
        http.errors.add("http.token_file", "give either http.token or http.token_file, not both")
    elif "token" in http:
        out["http_token"] = http.take("token", _token, None)
    elif "token_file" in http:
        out["http_token"] = http.take("token_file", _token_file(base), None)
    return out


def _token_file(base: Path) -> Callable[[Any, str], str]:
    def convert(value: Any, key: str) -> str:
        return _token(_read_text(_path(base)(value, key), key).strip(), key)
    return convert


def _token(value: object, key: str) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or value != value.strip():
        raise ConfigError(key, "must be a non-empty printable string without surrounding spaces")
    if len(value) < 16:
        raise ConfigError(key, f"is too short ({len(value)} characters): use at least 16, e.g. from"
                               " python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return value


def _log(section: _Section, base: Path, d: Config) -> dict[str, Any]:
    """The ``log`` section: format, an optional file, the interval of progress events."""
    fmt = section.get("format", d.log_format)
    if fmt not in LOG_FORMATS:
        section.errors.add("log.format", f"must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
        fmt = d.log_format

    def log_file(value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value or value.endswith("/"):
            raise ConfigError(key, f"must be a file path, got {value!r}")
        return base / os.path.expanduser(value)

    return {"log_format": fmt, "log_file": section.take("file", log_file, None),
            "progress_interval": section.take("progress_interval", parse_duration, d.progress_interval)}


#: Keys whose values are secrets, in a sink's entry (of any type) or a URL's query.
_SECRET = re.compile(r"pass|secret|token|credential|auth|api[_-]?key|private", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with its user information and secret-looking query values shown as ``***``.

    ``redis://:hunter2@host:6379/0`` -> ``redis://:***@host:6379/0``.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    masked = url
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        masked = masked.replace(parts.netloc, f"{user}:***@{host}" if colon else f"***@{host}", 1)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(_SECRET.search(name) for name, _ in pairs):
        query = urlencode([(name, "***" if _SECRET.search(name) else value) for name, value in pairs], safe="*{}")
        masked = masked.replace(f"?{parts.query}", f"?{query}", 1)
    return masked


def _masked_sink(sink: Mapping[str, Any]) -> dict[str, Any]:
    """A validated sink entry with its secrets shown as ``***`` (header values, URL passwords...)."""
    out: dict[str, Any] = {}
    for name, value in sink.items():
        if name == "headers" and isinstance(value, Mapping):  # {env: NAME} and {file: PATH} are no secret
            value = {header: "***" if isinstance(given, str) else dict(given) for header, given in value.items()}
        elif isinstance(value, str) and _SECRET.search(str(name)):
            value = "***"
        elif isinstance(value, str) and "://" in value:
            value = mask_url(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def effective(config: Config) -> dict[str, Any]:
    """``config`` in the file's shape, every key with the value in effect, secrets shown as ``***``.

    Defaults are filled in, ``workers: auto`` is the count it gave, paths are
    absolute. Read back by :func:`parse_config` it gives ``config`` again
    (but for the secrets): what ``check-config`` prints, as YAML.
    """
    return {
        "listen": list(config.listen),
        "workers": config.workers,
        "storage": {"spool": str(config.spool), "partial_ttl": duration_text(config.partial_ttl),
                    "checkpoint_bytes": size_text(config.checkpoint_bytes), "resume": mask_url(config.resume),
                    **({"instance": config.instance} if config.instance is not None else {}),
                    "lease_ttl": duration_text(config.lease_ttl), "history_ttl": duration_text(config.history_ttl)},
        "sinks": [_masked_sink(sink) for sink in config.sinks],
        "devices": {"allow": sorted(imei.zfill(IMEI_DIGITS) for imei in config.allow)},
        "timeouts": {"idle": duration_text(config.idle_timeout), "metadata": duration_text(config.metadata_timeout),
                     "step": duration_text(config.step_timeout)},
        "download": {"mode": config.mode, "metadata": config.metadata,
                     "dualcam_sources": list(config.dualcam_sources), "resume_retries": config.resume_retries},
        "limits": {"max_connections": config.max_connections, "max_file_bytes": size_text(config.max_file_bytes),
                   "min_free_bytes": size_text(config.min_free_bytes)},
        "outbox": {"concurrency": config.outbox_concurrency,
                   "give_up_after": duration_text(config.outbox_give_up_after),
                   "claim_ttl": duration_text(config.outbox_claim_ttl),
                   "degraded_after": duration_text(config.outbox_degraded_after)},
        "http": {"listen": list(config.http_listen), **({"token": "***"} if config.http_token else {})},
        "log": {"format": config.log_format, **({"file": str(config.log_file)} if config.log_file else {}),
                "progress_interval": duration_text(config.progress_interval)},
        "performance": dataclasses.asdict(config.performance),
    }
