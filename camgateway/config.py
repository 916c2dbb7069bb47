"""Configuration: the YAML file, its defaults and its validation.

Every error names the key at fault (``timeouts.idle: must be a positive
number``). The keys of the public contract are documented in README.md and in
``etc/camgateway.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_DATA_DIR",
    "DUALCAM_SOURCES",
    "MODES",
    "LOG_FORMATS",
    "load_config",
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


class ConfigError(ValueError):
    """A configuration value is wrong; ``key`` is its dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


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
    #: The status web service (camgateway.web): endpoints (none = off) and its token.
    http_listen: tuple[str, ...] = ()
    http_token: Optional[str] = None
    #: Logs: auto | text | json, an optional file (reopened after logrotate), progress events.
    log_format: str = "auto"
    log_file: Optional[Path] = None
    progress_interval: float = 30.0
    #: Gateway processes (camgateway.workers): 1, or one per core for large fleets.
    workers: int = 1
    source: str = "built-in defaults"

    def allowed(self, imei: str) -> bool:
        """Whether a device may transfer files (an empty allow-list allows all)."""
        return not self.allow or imei in self.allow


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}
_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _number_with_unit(value: object, units: Mapping[str, float], key: str, what: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, f"must be {what}, not a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in units:
            raise ConfigError(key, f"must be {what}, got {value!r}")
        number = float(match.group(1)) * units[match.group(2).lower()]
    else:
        raise ConfigError(key, f"must be {what}, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ConfigError(key, f"must be {what}, got {value!r}")
    if number <= 0:
        raise ConfigError(key, f"must be positive, got {value!r}")
    return number


def parse_size(value: object, key: str = "size") -> int:
    """``1048576``, ``"200MB"``, ``"1GiB"`` -> bytes."""
    size = int(_number_with_unit(value, _UNITS, key, "a size such as 200MB"))
    if size <= 0:
        raise ConfigError(key, f"must be at least 1 byte, got {value!r}")
    return size


def parse_duration(value: object, key: str = "duration") -> float:
    """``120``, ``"10s"``, ``"7d"`` -> seconds."""
    return _number_with_unit(value, _SECONDS, key, "a duration such as 30s, 2h or 7d")


def _mapping(value: object, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
    return value


def _known(section: Mapping[str, Any], key: str, names: tuple[str, ...]) -> None:
    for name in section:
        if name not in names:
            raise ConfigError(f"{key}.{name}" if key else str(name),
                              f"unknown key (known: {', '.join(names)})")


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
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ConfigError(f"{key}[{i}]", f"must be a string, got {item!r}")
        out.append(str(item))
    return tuple(out)


def _take(section: Mapping[str, Any], name: str, key: str, convert: Callable[[Any, str], Any],
          default: Any) -> Any:
    return convert(section[name], f"{key}.{name}") if name in section else default


def parse_config(raw: object, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate a parsed YAML document into a :class:`Config`.

    Relative paths are resolved against ``base`` (the working directory).
    """
    base = base or Path.cwd()
    doc = _mapping(raw, "(top level)")
    _known(doc, "", ("listen", "workers", "storage", "sinks", "devices", "timeouts", "download", "limits",
                   "outbox", "http", "log"))
    d = Config()
    values: dict[str, Any] = {"source": source}

    if "listen" in doc:
        listen = _string_list(doc["listen"], "listen")
        if not listen:
            raise ConfigError("listen", "needs at least one endpoint, e.g. tcp:5000")
        values["listen"] = listen

    storage = _mapping(doc.get("storage"), "storage")
    _known(storage, "storage", ("spool", "partial_ttl", "checkpoint_bytes", "resume", "instance", "lease_ttl"))
    resume = storage.get("resume", "sqlite")
    if not isinstance(resume, str) or not (resume == "sqlite" or resume.startswith(("redis://", "rediss://",
                                                                                      "unix://"))):
        raise ConfigError("storage.resume", f"must be sqlite or a redis:// URL, got {resume!r}")
    values["resume"] = resume
    instance = storage.get("instance")
    if instance is not None and (not isinstance(instance, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}",
                                                                                  instance)):
        raise ConfigError("storage.instance", f"must be a short name (letters, digits, _.:-), got {instance!r}")
    values["instance"] = instance
    values["lease_ttl"] = _take(storage, "lease_ttl", "storage", parse_duration, d.lease_ttl)
    values["spool"] = _take(storage, "spool", "storage", _path(base), base / d.spool)
    values["partial_ttl"] = _take(storage, "partial_ttl", "storage", parse_duration, d.partial_ttl)
    values["checkpoint_bytes"] = _take(storage, "checkpoint_bytes", "storage", parse_size,
                                       d.checkpoint_bytes)

    if "sinks" in doc:
        values["sinks"] = _sinks(doc["sinks"], base)
    else:
        values["sinks"] = ({"type": "disk", "root": str(base / DEFAULT_DATA_DIR / "files")},)

    devices = _mapping(doc.get("devices"), "devices")
    _known(devices, "devices", ("allow",))
    allow = _take(devices, "allow", "devices", _string_list, ())
    for i, imei in enumerate(allow):
        if not (imei.isascii() and imei.isdigit()) or len(imei) > 20:
            raise ConfigError(f"devices.allow[{i}]", f"must be a decimal IMEI, got {imei!r}")
    values["allow"] = frozenset(imei.lstrip("0") or "0" for imei in allow)

    timeouts = _mapping(doc.get("timeouts"), "timeouts")
    _known(timeouts, "timeouts", ("idle", "metadata", "step"))
    values["idle_timeout"] = _take(timeouts, "idle", "timeouts", parse_duration, d.idle_timeout)
    values["metadata_timeout"] = _take(timeouts, "metadata", "timeouts", parse_duration,
                                       d.metadata_timeout)
    values["step_timeout"] = _take(timeouts, "step", "timeouts", parse_duration, d.step_timeout)

    download = _mapping(doc.get("download"), "download")
    _known(download, "download", ("mode", "metadata", "dualcam_sources", "resume_retries"))
    mode = download.get("mode", d.mode)
    if mode not in MODES:
        raise ConfigError("download.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    values["mode"] = mode
    values["metadata"] = _take(download, "metadata", "download", _bool, d.metadata)
    if "dualcam_sources" in download:
        sources = _string_list(download["dualcam_sources"], "download.dualcam_sources")
        for i, source_name in enumerate(sources):
            if source_name not in DUALCAM_SOURCES:
                raise ConfigError(f"download.dualcam_sources[{i}]",
                                  f"must be one of {', '.join(DUALCAM_SOURCES)}, got {source_name!r}")
        if len(set(sources)) != len(sources):
            raise ConfigError("download.dualcam_sources", "lists a source twice")
        values["dualcam_sources"] = sources
    values["resume_retries"] = _take(download, "resume_retries", "download", _positive_int,
                                     d.resume_retries)

    limits = _mapping(doc.get("limits"), "limits")
    _known(limits, "limits", ("max_connections", "max_file_bytes", "min_free_bytes"))
    values["max_connections"] = _take(limits, "max_connections", "limits", _positive_int,
                                      d.max_connections)
    values["max_file_bytes"] = _take(limits, "max_file_bytes", "limits", parse_size, d.max_file_bytes)
    values["min_free_bytes"] = _take(limits, "min_free_bytes", "limits", _size_or_zero,
                                     d.min_free_bytes)

    outbox = _mapping(doc.get("outbox"), "outbox")
    _known(outbox, "outbox", ("concurrency", "give_up_after", "claim_ttl"))
    values["outbox_claim_ttl"] = _take(outbox, "claim_ttl", "outbox", parse_duration, d.outbox_claim_ttl)
    values["outbox_concurrency"] = _take(outbox, "concurrency", "outbox", _positive_int, d.outbox_concurrency)
    values["outbox_give_up_after"] = _take(outbox, "give_up_after", "outbox", parse_duration,
                                           d.outbox_give_up_after)
    values.update(_http(_mapping(doc.get("http"), "http"), base))
    values.update(_log(_mapping(doc.get("log"), "log"), base, d))
    if "workers" in doc:
        values["workers"] = _workers(doc["workers"])
    config = Config(**values)
    check_workers(config)
    return config


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
    if config.workers > 1:
        if config.resume != "sqlite":
            raise ConfigError("workers", "several workers need storage.resume: sqlite (with a shared Redis"
                                         " store, run several instances instead)")
        for i, description in enumerate(config.listen):
            kind = description.split(":", 1)[0].lower()
            inner = description.split(":", 2)[1].lower() if kind == "haproxy" and ":" in description else "tcp"
            if kind not in _HANDOVER_ENDPOINTS or inner not in ("tcp", "tcp6"):
                raise ConfigError(f"listen[{i}]", f"{description!r}: with workers > 1 every camera endpoint must"
                                                  " be plain TCP (tcp:, tcp6:, haproxy:tcp:, systemd:), since a"
                                                  " connection is handed to its worker process; terminate TLS in"
                                                  " front (HAProxy) or use workers: 1")


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


def _sinks(value: object, base: Path) -> tuple[Mapping[str, Any], ...]:
    from camgateway.sinks import validate_sink_config  # sinks know their own keys

    if not isinstance(value, list) or not value:
        raise ConfigError("sinks", "must be a non-empty list of sinks, e.g. [{type: disk, root: ...}]")
    return tuple(validate_sink_config(item, f"sinks[{i}]", base) for i, item in enumerate(value))


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
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}") from None
    return parse_config(raw, str(path), base)


def _http(http: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The ``http`` section: the status web service (off unless ``listen`` is given)."""
    _known(http, "http", ("listen", "token", "token_file"))
    out: dict[str, Any] = {"http_listen": _take(http, "listen", "http", _string_list, ())}
    if "token" in http and "token_file" in http:
        raise ConfigError("http.token_file", "give either http.token or http.token_file, not both")
    if "token" in http:
        out["http_token"] = _token(http["token"], "http.token")
    elif "token_file" in http:
        text = _read_text(_path(base)(http["token_file"], "http.token_file"), "http.token_file")
        out["http_token"] = _token(text.strip(), "http.token_file")
    return out


def _token(value: object, key: str) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or value != value.strip():
        raise ConfigError(key, "must be a non-empty printable string without surrounding spaces")
    if len(value) < 16:
        raise ConfigError(key, f"is too short ({len(value)} characters): use at least 16, e.g. from"
                               " python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return value


def _log(section: Mapping[str, Any], base: Path, d: Config) -> dict[str, Any]:
    """The ``log`` section: format, an optional file, the interval of progress events."""
    _known(section, "log", ("format", "file", "progress_interval"))
    fmt = section.get("format", d.log_format)
    if fmt not in LOG_FORMATS:
        raise ConfigError("log.format", f"must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    log_file = None
    if "file" in section:
        value = section["file"]
        if not isinstance(value, str) or not value or value.endswith("/"):
            raise ConfigError("log.file", f"must be a file path, got {value!r}")
        log_file = base / os.path.expanduser(value)
    return {"log_format": fmt, "log_file": log_file,
            "progress_interval": _take(section, "progress_interval", "log", parse_duration,
                                       d.progress_interval)}
