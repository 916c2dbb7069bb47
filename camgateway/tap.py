"""``twistd camgateway``: command-line options and the service they make."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from camgateway.config import DEFAULT_CONFIG_PATH, Config, ConfigError, check_workers, load_config
from camgateway.logs import AtomicLines, observer_for
from camgateway.service import make_gateway
from camgateway.workers import children_needed

__all__ = ["Options", "makeService", "check_endpoints", "config_report"]


def check_endpoints(config: Config) -> None:
    """Parse every endpoint string (and load TLS keys) without listening; ConfigError names the key."""
    from twisted.internet.endpoints import serverFromString

    for key, descriptions in (("listen", config.listen), ("http.listen", config.http_listen)):
        for i, description in enumerate(descriptions):
            try:
                serverFromString(None, description)  # the reactor is needed only to listen
            except Exception as e:
                raise ConfigError(f"{key}[{i}]", f"{description!r} is not a usable endpoint: {e}") from None


def config_report(config: Config) -> list[str]:
    """What ``--check`` and ``camgateway check-config`` print (after :func:`check_endpoints`)."""
    check_endpoints(config)
    lines = [f"configuration OK ({config.source})"]
    for field in ("listen", "workers", "spool", "sinks", "allow", "mode", "metadata", "dualcam_sources",
                  "http_listen", "log_format", "log_file", "progress_interval"):
        lines.append(f"  {field}: {getattr(config, field)}")
    lines.append(f"  http_token: {'set' if config.http_token else 'none'}")
    return lines


class Options(usage.Options):
    """Options of ``twistd camgateway``."""

    synopsis = "[--config PATH] [--listen ENDPOINT ...] [--check]"
    longdesc = (
        "Receives photos and videos from Teltonika cameras. Without --config, "
        f"{DEFAULT_CONFIG_PATH} is read if it exists, else built-in defaults apply "
        "(listen on tcp:5000, files under ./camgateway-data)."
    )
    optParameters = [
        ["config", "c", None, f"YAML configuration file (default: {DEFAULT_CONFIG_PATH} if present)"],
    ]
    optFlags = [
        ["check", None, "Validate the configuration, print it and exit."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this endpoint instead of the configured ones (repeatable),
        e.g. tcp:5000 or ssl:5001:privateKey=key.pem:certKey=cert.pem"""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        explicit = self["config"] is not None
        path = Path(self["config"]) if explicit else DEFAULT_CONFIG_PATH
        try:
            config = load_config(path, explicit=explicit)
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None
        if self["listen"]:
            from dataclasses import replace

            config = replace(config, listen=tuple(self["listen"]))
        try:
            check_workers(config)
            check_endpoints(config)
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None
        self["parsed"] = config
        if self["check"]:
            try:
                print("\n".join(config_report(config)))
            except ConfigError as e:
                raise usage.UsageError(f"configuration error: {e}") from None
            sys.exit(0)


class _LoggedGateway(MultiService):
    """The gateway, handing twistd the log observer that ``log.format``/``log.file`` ask for.

    twistd asks its application for an ILogObserver before it starts logging
    (a ``--logger`` on the command line still wins); the application is the
    parent this service is added to.
    """

    def __init__(self, gateway: MultiService, observer: Any) -> None:
        super().__init__()
        self.observer = observer
        gateway.setServiceParent(self)
        self.gateway = gateway

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver, None) is None:
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def makeService(options: Options) -> IService:
    """The gateway service for ``options``, with the log output its configuration asks for."""
    config: Any = options["parsed"]
    twistd = getattr(options, "parent", None) or {}
    logfile = twistd.get("logfile") or (None if twistd.get("nodaemon", True) else "twistd.log")
    several = children_needed(config)
    stdout: Any = sys.stdout
    if several:  # the workers share standard output: whole lines per write (camgateway.logs.AtomicLines)
        try:
            stdout = AtomicLines(sys.stdout.fileno())
        except (AttributeError, ValueError, OSError):  # not a real descriptor (tests)
            pass
    observer = None if twistd.get("syslog") else observer_for(config.log_format, config.log_file, logfile,
                                                                stdout)
    # twistd's own log (a file it alone writes, or syslog): the workers send it their events.
    forward = several and observer is None and (bool(twistd.get("syslog")) or logfile not in (None, "", "-"))
    gateway = make_gateway(config, twistd_logfile=logfile, forward_logs=forward)
    return gateway if observer is None else _LoggedGateway(gateway, observer)
