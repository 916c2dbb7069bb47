"""The command sink: run a program for each file.

Configuration::

    - type: command
      command: [/usr/local/bin/ingest, --fleet, north]   # the file's path is appended
      timeout: 300                                       # seconds, then the program is killed

The program gets the file's path as its last argument, the sidecar JSON on
its standard input and the file's id in ``CAMGATEWAY_FILE_ID`` (the
sidecar's ``id``). Exit status 0 means delivered; 100 means "never retry"
(the file goes to the dead-letter folder); anything else, a signal or the
timeout is retried by the outbox. The program runs without blocking the
gateway (``spawnProcess``); the last line of its stderr is the reason of a
failure ("program exited with status 3: archive unreachable").

A program may be given the same file again, with the same id: after a crash
of the gateway, or a timeout that killed a program that had done its work.
It de-duplicates on the id.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from twisted.internet import defer, protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from camgateway.base.units import ConfigError, parse_duration
from camgateway.base.reasons import DeliveryFailed, last_line, program_ended
from camgateway.delivery.sinks import IFileSink, PermanentFailure, ReceivedFile, SinkContext
from camgateway.delivery.sinks.registry import check_keys

__all__ = ["CommandSink", "validate", "make", "default_name", "run_program", "PERMANENT_EXIT", "FILE_ID"]

PERMANENT_EXIT = 100

#: The environment variable that holds the file's id.
FILE_ID = "CAMGATEWAY_FILE_ID"


def validate(config: Mapping[str, Any], key: str, base: Path) -> Mapping[str, Any]:
    """``{type: command, command: [program, args...], timeout}``."""
    check_keys(config, key, {"command", "timeout"}, {"command"})
    command = config["command"]
    if isinstance(command, str):
        command = [command]
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise ConfigError(f"{key}.command", "must be a program and its arguments, e.g. [/usr/local/bin/ingest, -v]")
    program = command[0] if os.sep in command[0] else shutil.which(command[0])
    if program is None or not os.access(base / program, os.X_OK):
        raise ConfigError(f"{key}.command", f"{command[0]} is not an executable program")
    return {"type": "command", "command": [str(base / program)] + command[1:],
            "timeout": parse_duration(config.get("timeout", 300), f"{key}.timeout")}


def default_name(config: Mapping[str, Any]) -> str:
    """The sink's name when the entry has none: ``command:`` and the program's file name."""
    return f"command:{os.path.basename(config['command'][0])}"


def make(config: Mapping[str, Any], context: SinkContext) -> "CommandSink":
    """A CommandSink from a validated entry."""
    return CommandSink(config["command"], config["timeout"], context.reactor)


class _Run(protocol.ProcessProtocol):
    """A child process: ``stdin`` written to it and closed, the end of its stderr kept, its end told."""

    def __init__(self, stdin: bytes, done: defer.Deferred) -> None:
        self.stdin = stdin
        self.done = done
        self.stderr = bytearray()

    def connectionMade(self) -> None:
        self.transport.write(self.stdin)  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        if len(self.stderr) > 4096:  # its end says why
            del self.stderr[:-4096]

    def processEnded(self, reason: Failure) -> None:
        self.done.callback(reason.value)


@defer.inlineCallbacks
def run_program(reactor: Any, argv: list[str], env: Mapping[str, str], timeout: float, stdin: bytes = b"") -> Any:
    """Run ``argv`` as a child process, given ``stdin``, killed once it outlives ``timeout`` seconds.

    Fires with ``(exit code, signal, the end of its stderr, whether it was
    killed for the timeout)``; the code is None when a signal ended it.
    """
    done: defer.Deferred = defer.Deferred()
    run = _Run(stdin, done)
    process = reactor.spawnProcess(run, argv[0], argv, env=env)
    killer = reactor.callLater(timeout, _kill, process)
    ended = yield done
    timed_out = not killer.active()
    if not timed_out:
        killer.cancel()
    return getattr(ended, "exitCode", None), getattr(ended, "signal", None), bytes(run.stderr), timed_out


@implementer(IFileSink)
class CommandSink:
    """Runs a program per file."""

    def __init__(self, command: list[str], timeout: float, reactor: Any) -> None:
        self.command = command
        self.timeout = timeout
        self.reactor = reactor
        self.name = default_name({"command": command})

    @defer.inlineCallbacks
    def deliver(self, received: ReceivedFile) -> Any:
        """Run the program (the file's id in ``CAMGATEWAY_FILE_ID``); fire when it exits 0."""
        env = dict(os.environ)
        if received.id:
            env[FILE_ID] = received.id
        else:  # a file no outbox recorded: no id, rather than one inherited from the gateway's environment
            env.pop(FILE_ID, None)
        code, signal_number, stderr, timed_out = yield run_program(
            self.reactor, self.command + [str(received.path)], env, self.timeout,
            json.dumps(received.sidecar()).encode() + b"\n")
        if code == 0 and not timed_out:
            return f"{self.name} exit 0"
        if timed_out:
            said = last_line(stderr)
            raise DeliveryFailed(f"timeout after {self.timeout:g} s (program killed)" + (f": {said}" if said else ""))
        message = program_ended("program", code, signal_number, stderr)
        if code == PERMANENT_EXIT:
            raise PermanentFailure(message)
        raise DeliveryFailed(message)


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except Exception:
        pass
