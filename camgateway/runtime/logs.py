"""Log output: JSON lines for production, readable text on a terminal.

Every camgateway event is a structured ``twisted.logger`` event; this module
only decides how events are written:

- :func:`json_observer` is a log observer factory for
  ``twistd --logger=camgateway.runtime.logs.json_observer``: one JSON object per line
  on standard output;
- :func:`observer_for` picks the observer that ``log.format`` and
  ``log.file`` ask for (``twistd camgateway`` installs it on the application,
  so no ``--logger`` flag is needed);
- :class:`WatchedFile` is a log file that notices when logrotate moved it
  away and reopens its path, so rotation needs no signal and loses no line;
- :class:`TurnBuffer` writes the lines of one reactor turn together.

The JSON record: ``time`` (ISO 8601 UTC, milliseconds), ``level``,
``priority`` (syslog's, for journald), ``namespace``, ``message`` (the
formatted text), ``event`` (a stable snake_case name: the one the event was
logged with, else made from its format's words), then every field the event
was logged with (a field named like one of the top ones gets a ``field_``
prefix); a logged failure adds ``error`` and ``traceback``. Twisted's own
"<Factory> starting on <port>" and "(TCP Port <port> Closed)" lines are left
out: the gateway logs what it listens on itself. Under systemd, with standard
output the journal (``JOURNAL_STREAM`` names it), each line starts with the
priority as ``<N>`` (sd-daemon(3)), so ``journalctl -p warning`` filters.
"""

from __future__ import annotations

import atexit
import datetime
import json
import math
import os
import re
import select
import sys
import threading
from pathlib import Path
from typing import IO, Any, Optional

from twisted.logger import ILogObserver, formatEvent, textFileLogObserver
from zope.interface import implementer

__all__ = ["AtomicLines", "JSONLineObserver", "TurnBuffer", "WatchedFile", "event_record", "json_observer",
           "observer_for", "PRIORITY", "to_journal"]

_TOP = frozenset({"time", "level", "priority", "namespace", "message", "error", "traceback"})
#: syslog's priority of each level (sd-daemon(3): ``<N>`` before a line journald reads).
PRIORITY = {"critical": 2, "error": 3, "warn": 4, "info": 6, "debug": 7}
#: Keys of legacy (twisted.python.log) events that are not fields.
_LEGACY = {"message", "isError", "system", "time", "format", "why", "failure", "printed", "logLevel"}


def _jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < 4:
        if isinstance(value, dict):
            return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _message(event: dict[str, Any]) -> str:
    """The event's text: ``str.format_map`` (C) when that can do it, else Twisted's formatter.

    ``formatEvent`` parses the format string in Python on every event, which
    was a quarter of a log line's cost; it is still what formats events
    using its call syntax (``{f()}``), legacy events, and events it would
    report as unformattable.
    """
    fmt = event.get("log_format")
    if type(fmt) is str and "()" not in fmt:
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _time(t: float) -> str:
    """ISO 8601 UTC with milliseconds, as ``datetime.isoformat`` gives it; the date and
    time are formatted once per second."""
    global _second
    fraction, seconds = math.modf(t)  # rounded as datetime.fromtimestamp rounds
    micros = round(fraction * 1e6)
    whole = int(seconds)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    cached = _second  # one read: another thread may replace it
    if cached[0] != whole:
        cached = _second = (whole, datetime.datetime.fromtimestamp(whole, datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{micros // 1000:03d}Z"


_PLAIN = frozenset({str, int, bool, type(None)})

_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_WORD = re.compile(r"[a-z][a-z0-9]*")
#: Event names made from formats, by (namespace, format): formats are few and fixed.
_NAMES: dict[tuple[str, str], str] = {}
#: The lines a listening port logs (twisted.python.log) when it starts and stops.
_PORT_NOISE = re.compile(r"\S.* starting on \S.*|\((?:TCP |UDP |UNIX |SSL )?Port .* Closed\)", re.DOTALL)


def _name(words: list[str], fallback: str) -> str:
    return "_".join(words[:5]) or fallback


def _event_name(event: dict[str, Any], namespace: str, legacy: bool) -> str:
    """A stable snake_case name for an event logged without ``event``: its format's first words."""
    fmt = event.get("log_format")
    if legacy or type(fmt) is not str:  # the text of a twisted.python.log line: its words that are words
        text = str(event.get("log_text") or "")[:200].lower()
        return _name(_WORD.findall(text.split("\n", 1)[0]), "twisted_error" if event.get("isError") else "twisted")
    key = (namespace, fmt)
    name = _NAMES.get(key)
    if name is None:
        name = _name(_WORD.findall(_PLACEHOLDER.sub(" ", fmt).lower()), "_".join(_WORD.findall(namespace.lower())))
        if len(_NAMES) < 4096:
            _NAMES[key] = name
    return name


def _is_port_noise(event: dict[str, Any]) -> bool:
    """Whether ``event`` is a listening port's "starting on"/"Closed" line (twisted.python.log)."""
    return (event.get("log_namespace") == "log_legacy" and not event.get("isError")
            and _PORT_NOISE.fullmatch(str(event.get("log_text", ""))) is not None)


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready record of a ``twisted.logger`` event."""
    level = getattr(event.get("log_level"), "name", "info")
    legacy = "isError" in event and "message" in event  # from twisted.python.log
    namespace = event.get("log_namespace", "?")
    if namespace == "log_legacy":
        namespace = "twisted"
    record: dict[str, Any] = {
        "time": _time(event.get("log_time") or 0.0),
        "level": level,
        "priority": PRIORITY.get(level, 6),
        "namespace": namespace,
        "message": _message(event),
        "event": None,
    }
    isfinite = math.isfinite
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY):
            continue
        kind = type(value)
        if kind not in _PLAIN and not (kind is float and isfinite(value)):
            value = _jsonable(value)
        record["field_" + key if key in _TOP else key] = value
    name = record["event"]
    if type(name) is not str or not name:
        record["event"] = _event_name(event, namespace, legacy)
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = f"{getattr(failure.type, '__name__', failure.type)}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    return record


class TurnBuffer:
    """A text stream whose writes reach it once per reactor turn.

    A log line written and flushed per event (after a ``stat`` for
    :class:`WatchedFile`) is several system calls per event on the reactor
    thread, each giving up the GIL and waiting to win it back: under photo
    load (two lines per file) writing a turn's lines together gives 5-14 %
    more photos a second. Lines written during
    a turn are kept, then written and flushed together at its end
    (``callLater(0)``; ``callFromThread`` from another thread). When the
    reactor is not running (start-up, shutdown) every line goes out at once,
    after those still waiting, so the order never changes; lines still
    waiting when the reactor shuts down or the interpreter exits are written
    then. Only a ``kill -9`` can lose the lines of the turn it interrupts.

    A signal handler runs on the thread it interrupts, between two bytecodes,
    and Twisted's logs "Received SIGTERM": it may log while that thread is
    inside :meth:`write` or :meth:`flush_now`. So the lock is re-entrant, and
    a line written while this thread is writing the kept lines out is kept
    too and written by that same flush, after them (a second write to the
    stream from inside the first would fail or interleave).
    """

    def __init__(self, out: IO[str], reactor: Any = None) -> None:
        self.out = out
        self._reactor = reactor
        self._lock = threading.RLock()
        self._lines: list[str] = []
        self._scheduled = False
        self._writing = False  # this thread is in flush_now's write (others wait for the lock)
        self._thread = threading.get_ident()  # the reactor's (observers are made before it runs)
        atexit.register(self.flush_now)
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = self._reactor = default_reactor
        if hasattr(reactor, "addSystemEventTrigger"):
            reactor.addSystemEventTrigger("after", "shutdown", self.flush_now)

    def write(self, text: str) -> None:
        """Keep ``text`` for the end of this turn."""
        reactor = self._reactor
        running = reactor.running
        with self._lock:
            self._lines.append(text)
            if self._writing:
                return  # logged by a signal handler during this thread's flush: that flush writes it
            if running:
                if self._scheduled:
                    return
                self._scheduled = True
        if not running:
            self.flush_now()
        elif threading.get_ident() == self._thread:
            reactor.callLater(0, self.flush_now)
        else:
            reactor.callFromThread(self.flush_now)

    def flush(self) -> None:
        """Nothing to do now: the turn's lines are flushed together."""

    def flush_now(self) -> None:
        """Write and flush every line kept (and those kept meanwhile, see above)."""
        with self._lock:
            if self._writing:
                return  # a signal handler's, inside this thread's flush: that flush goes on
            self._writing = True
            try:
                while self._lines:
                    lines, self._lines = self._lines, []
                    self._scheduled = False
                    try:
                        self.out.write("".join(lines))
                        self.out.flush()
                    except (OSError, ValueError):  # a log line must never take the gateway down
                        pass
            finally:
                self._writing = False


class AtomicLines:
    """A text stream over a descriptor shared by several processes (``workers``).

    Each write reaches the descriptor in whole lines, at most ``PIPE_BUF``
    bytes per ``write(2)`` (a longer line alone), so that lines from several
    processes on one pipe or socket (journald) never interleave within a line,
    which a buffered ``sys.stdout`` writing 8 KiB at a time would allow.
    """

    def __init__(self, fd: int, limit: int = select.PIPE_BUF) -> None:
        self.fd = fd
        self.limit = limit

    def write(self, text: str) -> None:
        """Write ``text`` (whole lines) now."""
        data = text.encode("utf-8", "backslashreplace")
        limit = self.limit
        while data:
            if len(data) <= limit:
                cut = len(data)
            else:
                cut = data.rfind(b"\n", 0, limit) + 1 or data.find(b"\n", limit) + 1 or len(data)
            self._write_all(data[:cut])
            data = data[cut:]

    def _write_all(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view):]

    def flush(self) -> None:
        """Nothing is buffered."""

    def fileno(self) -> int:
        """The descriptor."""
        return self.fd

    def isatty(self) -> bool:
        """Whether the descriptor is a terminal."""
        return os.isatty(self.fd)


#: json.dumps(..., ensure_ascii=False, separators=(",", ":")) without making an
#: encoder per line (a third of the encoding's time).
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes one JSON object per event and line to a text stream, flushed each time.

    ``journal``: start each line with its priority as ``<N>`` (for journald,
    which then records the line's JSON at that priority).
    """

    def __init__(self, out: IO[str], journal: bool = False) -> None:
        self.out = out
        self.journal = journal

    def __call__(self, event: dict[str, Any]) -> None:
        if "isError" in event and _is_port_noise(event):
            return
        try:
            record = event_record(event)
            line = _encode(record)
        except Exception as e:  # a log line must never take the gateway down
            record = {"time": None, "level": "error", "priority": 3, "namespace": "camgateway.runtime.logs",
                      "message": f"unloggable event: {e!r}", "event": "unloggable_event"}
            line = json.dumps(record)
        if self.journal:
            line = f"<{record['priority']}>{line}"
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass


def json_observer() -> JSONLineObserver:
    """The observer factory of ``twistd --logger=camgateway.runtime.logs.json_observer`` (standard output)."""
    return JSONLineObserver(TurnBuffer(sys.stdout), to_journal(sys.stdout))  # type: ignore[arg-type]


def to_journal(stream: Any, environ: Optional[dict[str, str]] = None) -> bool:
    """Whether ``stream`` is the journal's stream that systemd gave this process.

    systemd sets ``JOURNAL_STREAM`` to the device and inode of the stream it
    connected standard output (and error) to; a process whose standard output
    was redirected elsewhere since, a terminal or a file, inherits the variable
    but not the stream, so both are compared (sd-daemon(3), systemd.exec(5)).
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, AttributeError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class WatchedFile:
    """An append-only log file that reopens its path after logrotate moved it.

    Before each write it compares the path's inode with the open file's (one
    ``stat``, per event, never per frame); when they differ, or the path is
    gone, it opens the path again. So logrotate's default ``create`` mode
    works without ``copytruncate`` and without signalling the gateway.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = self._open()

    def _open(self) -> IO[str]:
        f = open(self.path, "a", encoding="utf-8")
        st = os.fstat(f.fileno())
        self._identity = (st.st_dev, st.st_ino)
        return f

    def _check(self) -> None:
        try:
            st = os.stat(self.path)
            current = (st.st_dev, st.st_ino)
        except OSError:
            current = None
        if current != self._identity:
            try:
                fresh = self._open()
            except OSError:
                return  # keep writing where we can
            old, self._file = self._file, fresh
            old.close()

    def write(self, text: str) -> None:
        """Append ``text`` (to a fresh file if the old one was rotated away)."""
        self._check()
        self._file.write(text)

    def flush(self) -> None:
        """Flush to the kernel."""
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def observer_for(fmt: str, log_file: Optional[Path], twistd_logfile: Optional[str],
                 stdout: IO[str]) -> Optional[ILogObserver]:
    """The observer ``log.format``/``log.file`` ask for; None means twistd's own text log.

    ``twistd_logfile`` is where twistd itself would log (its ``--logfile``, or
    ``twistd.log`` when daemonised; None or ``"-"`` for standard output).
    ``auto`` writes text to a terminal and to twistd's ``--logfile``, and JSON
    lines to anything else (journald, a pipe, ``log.file``). JSON lines to a
    standard output that is the journal start with their priority
    (:func:`to_journal`); in a file, never.
    """
    to_stdout = twistd_logfile in (None, "", "-")
    if log_file is not None:
        out: IO[str] = TurnBuffer(WatchedFile(log_file))  # type: ignore[assignment, arg-type]  # IO's write and flush
        return textFileLogObserver(out) if fmt == "text" else JSONLineObserver(out)
    if fmt == "text":
        return None
    if fmt == "auto" and (not to_stdout or _isatty(stdout)):
        return None
    if not to_stdout:
        return JSONLineObserver(TurnBuffer(WatchedFile(Path(twistd_logfile))))  # type: ignore[arg-type]
    return JSONLineObserver(TurnBuffer(stdout), to_journal(stdout))  # type: ignore[arg-type]


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
