"""``twistd camgateway``: command-line options and the service they make.

A gateway that cannot start says why in one line naming the key at fault,
and the process exits 1. What can be checked before the reactor runs is
checked while the options are parsed (:meth:`Options.postOptions`): twistd
then prints ``twistd camgateway: error: <key>: <why>`` and exits. What fails
once it runs (a port another process holds, a spool it may not write) is
logged by the gateway as ``camgateway cannot start: <key>: <why>``; the
reactor stops, every service stops as on SIGTERM, and the process exits 1
(:class:`ExitStatus`).
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import yaml
from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from camgateway.runtime.config import (DEFAULT_CONFIG_PATH, Config, ConfigError, check_endpoint_strings, check_workers,
                               effective, load_config)
from camgateway.perf.process import tune_process
from camgateway.runtime.logs import AtomicLines, observer_for
from camgateway.runtime.service import make_gateway
from camgateway.runtime.workers import children_needed

__all__ = ["Options", "makeService", "check_endpoints", "check_log_file", "check_config", "config_report",
           "ExitStatus"]


def check_endpoints(config: Config) -> None:
    """Parse every endpoint string (and load TLS keys) without listening; ConfigError names each key."""
    from twisted.internet.endpoints import serverFromString

    errors = []
    for key, descriptions in (("listen", config.listen), ("http.listen", config.http_listen)):
        for i, description in enumerate(descriptions):
            if description.split(":", 1)[0].lower() == "systemd" and "LISTEN_FDS" not in os.environ:
                continue  # the sockets systemd passes exist only in the process it starts
            try:
                serverFromString(None, description)  # the reactor is needed only to listen
            except Exception as e:
                errors.append(ConfigError(f"{key}[{i}]", f"{description!r} is not a usable endpoint: {e}"))
    if errors:
        raise ConfigError.several(errors)


def check_log_file(config: Config) -> list[ConfigError]:
    """``log.file`` must be a file in an existing folder (the gateway does not make the folder)."""
    path = config.log_file
    if path is None:
        return []
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        return [ConfigError("log.file", f"{path}: the folder {path.parent} {what}")]
    if path.is_dir():
        return [ConfigError("log.file", f"{path} is a folder, not a file")]
    return []


def check_config(config: Config) -> None:
    """What is checked beyond the file's values before the gateway starts, and by check-config.

    The endpoints (again, after ``--listen`` replaced them; then parsed by
    Twisted, TLS keys loaded), what ``workers`` needs, ``log.file``'s folder.
    One ConfigError carries every error found.
    """
    errors = check_endpoint_strings(config)
    for check in (check_workers, check_endpoints):
        try:
            check(config)
        except ConfigError as e:
            errors.extend(e.errors)
    errors.extend(check_log_file(config))
    if errors:
        raise ConfigError.several(errors)


def config_report(config: Config) -> list[str]:
    """What ``--check`` and ``camgateway check-config`` print: the configuration in effect, as YAML.

    Every key with the value the gateway would run on (defaults filled in),
    secrets shown as ``***`` (:func:`camgateway.runtime.config.effective`); the
    lines are one YAML document. Raises ConfigError if :func:`check_config`
    finds anything.
    """
    check_config(config)
    return _report(config)


def _report(config: Config) -> list[str]:
    text = yaml.safe_dump(effective(config), sort_keys=False, allow_unicode=True, width=100)
    return [f"# configuration OK ({config.source})",
            "# the configuration in effect: defaults filled in, secrets shown as ***", *text.splitlines()]


def _usage_error(error: ConfigError) -> usage.UsageError:
    """A UsageError of one line per error (each ``key: why``)."""
    return usage.UsageError("\n".join(str(each) for each in error.errors))


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

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        """Parse ``options``. Under twistd an error is printed as one line and the process exits 1.

        ``twistd camgateway: error: <key>: <why> (see twistd camgateway --help)``,
        a line per error, on standard error (twistd itself would print its
        whole usage text first, on standard output). Used on its own (no
        ``parent``), the UsageError is raised as usual.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            lines = str(e).splitlines() or ["invalid options"]
            lines[-1] += " (see twistd camgateway --help)"
            sys.stderr.write("".join(f"twistd camgateway: error: {line}\n" for line in lines))
            sys.stderr.flush()
            raise SystemExit(1) from None

    def postOptions(self) -> None:
        """Read and check the configuration (:func:`check_config`); with ``--check``, print it and exit."""
        explicit = self["config"] is not None
        path = Path(self["config"]) if explicit else DEFAULT_CONFIG_PATH
        try:
            config = load_config(path, explicit=explicit)
        except ConfigError as e:
            raise _usage_error(e) from None
        if self["listen"]:
            config = replace(config, listen=tuple(self["listen"]))
        try:
            check_config(config)
        except ConfigError as e:
            raise _usage_error(e) from None
        self["parsed"] = config
        if self["check"]:
            print("\n".join(_report(config)))
            sys.exit(0)


class ExitStatus:
    """The status the twistd process exits with: 1 once the gateway could not start.

    twistd has no way for a service to set it (twisted/twisted#11335): once
    its reactor has stopped, ``twistd`` returns and the process exits 0. So
    a start that fails stops the reactor (every service stops as on SIGTERM,
    twistd removes its pidfile and logs its last line, as usual) and
    :meth:`failed` records the status. Python fixes the exit status before
    it runs ``atexit`` handlers and cannot change it there, so the handler
    :meth:`install` registers ends the process with ``os._exit`` after
    flushing standard output and error, as twistd's own daemonising parent
    ends itself. Registered before the log observers are made, it runs
    after their handlers (which write the lines still kept); it does nothing
    when nothing failed.
    """

    def __init__(self) -> None:
        self.code = 0
        self._installed = False

    def install(self) -> None:
        """Register the ``atexit`` handler (once)."""
        if not self._installed:
            self._installed = True
            atexit.register(self._exit)

    def failed(self, failure: Failure) -> None:
        """The gateway could not start (it has logged why and stops the reactor): exit 1."""
        self.code = 1

    def _exit(self) -> None:
        if not self.code:
            return
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:  # a closed or broken stream: nothing more to say there
                pass
        os._exit(self.code)


#: This process's (:func:`makeService` installs it).
EXIT_STATUS = ExitStatus()


class _TwistdGateway(MultiService):
    """The gateway as twistd runs it: with the log observer the configuration asks for, if any, and a
    start that fails (``gateway.ready`` fails) making the process exit 1 (:class:`ExitStatus`).

    twistd asks its application for an ILogObserver before it starts logging
    (a ``--logger`` on the command line still wins); the application is the
    parent this service is added to.
    """

    def __init__(self, gateway: MultiService, observer: Any, exit_status: ExitStatus) -> None:
        super().__init__()
        self.observer = observer
        self.exit_status = exit_status
        gateway.setServiceParent(self)
        self.gateway = gateway

    def setServiceParent(self, parent: Any) -> None:
        if (self.observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver, None) is None):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        self.gateway.gateway.ready.addErrback(self.exit_status.failed)  # type: ignore[attr-defined]


def makeService(options: Options) -> IService:
    """The gateway service for ``options``, with the log output its configuration asks for.

    This process runs the gateway: the process-wide tuning that
    ``performance:`` leaves on (allocator, collector, GIL switch interval)
    is applied here (:func:`camgateway.perf.process.tune_process`).
    """
    config: Any = options["parsed"]
    twistd = getattr(options, "parent", None) or {}
    logfile = twistd.get("logfile") or (None if twistd.get("nodaemon", True) else "twistd.log")
    several = children_needed(config)
    stdout: Any = sys.stdout
    if several:  # the workers share standard output: whole lines per write (camgateway.runtime.logs.AtomicLines)
        try:
            stdout = AtomicLines(sys.stdout.fileno())
        except (AttributeError, ValueError, OSError):  # not a real descriptor (tests)
            pass
    EXIT_STATUS.install()  # before the observers: its atexit handler runs after theirs
    try:
        observer = None if twistd.get("syslog") else observer_for(config.log_format, config.log_file, logfile,
                                                                    stdout)
    except OSError as e:  # (twistd has not redirected standard error yet)
        key = "log.file" if config.log_file is not None else "--logfile"
        raise SystemExit(f"twistd camgateway: error: {key}: cannot open {e.filename}: {e.strerror or e}") from None
    # twistd's own log (a file it alone writes, or syslog): the workers send it their events.
    forward = several and observer is None and (bool(twistd.get("syslog")) or logfile not in (None, "", "-"))
    gateway = make_gateway(config, twistd_logfile=logfile, forward_logs=forward)
    # twistd's process is the gateway's: the process-wide tuning is applied here, once
    # what lives as long as the process is loaded (camgateway.perf.process).
    tune_process(config.performance, config.workers)
    return _TwistdGateway(gateway, observer, EXIT_STATUS)
