"""``twistd camgateway``: command-line options and the service they make."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from camgateway.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from camgateway.service import make_gateway

__all__ = ["Options", "makeService"]


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
        self["parsed"] = config
        if self["check"]:
            print(f"configuration OK ({config.source})")
            for field in ("listen", "spool", "sinks", "allow", "mode", "metadata", "dualcam_sources"):
                print(f"  {field}: {getattr(config, field)}")
            sys.exit(0)


def makeService(options: Options) -> IService:
    """The gateway service for ``options``."""
    config: Any = options["parsed"]
    return make_gateway(config)
