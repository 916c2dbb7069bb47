"""Why a delivery failed, in words an operator can act on.

A sink fails a delivery with an exception; the outbox logs it, records it as
the entry's last error, and writes it into a dead letter. This module turns
that exception into one short line ("connection refused", "HTTP 503 Service
Unavailable: busy", "disk full (No space left on device): /srv/files/x.jpg",
"program exited with status 3: no route to archive"), never a ``Failure``
repr, an exception's class name or a bytes repr, and tells the ordinary
failures of the world outside (a network, a receiver, a disk, a program)
from bugs, which alone deserve a traceback.

A sink that knows more than the exception says (a timeout's length, an HTTP
status, a program's exit status and stderr) raises :class:`DeliveryFailed`
with its own words; :func:`reason` and :func:`is_bug` handle everything else.
"""

from __future__ import annotations

import errno
import signal
from typing import Any, Optional, Union

from twisted.internet import defer, error
from twisted.python.failure import Failure

__all__ = ["DeliveryFailed", "PermanentFailure", "StartError", "reason", "is_bug", "program_ended", "last_line",
           "listen_error"]


class PermanentFailure(Exception):
    """A delivery that retrying cannot fix (the file goes to the dead-letter folder)."""


class StartError(Exception):
    """The gateway cannot start: ``key`` names the configuration at fault (``listen[0]``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def listen_error(failure: Exception) -> str:
    """Why an endpoint could not listen, in a few words (``Address already in use``)."""
    if isinstance(failure, error.CannotListenError):
        why = failure.socketError
        return str(getattr(why, "strerror", None) or why)
    return str(failure) or type(failure).__name__


class DeliveryFailed(RuntimeError):
    """A delivery that failed for the reason given in words; the outbox retries it."""


#: Exceptions that are mistakes in code (ours or a plugin's), not failures of the world outside.
_BUGS = (ArithmeticError, AssertionError, AttributeError, ImportError, LookupError, NameError, NotImplementedError,
         RecursionError, ReferenceError, SyntaxError, SystemError, TypeError, ValueError)

#: Words for the errno values a sink meets; the system's own text follows in parentheses.
_ERRNO = {
    errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.ENOENT: "not found",
    errno.EIO: "input/output error", errno.EMFILE: "too many open files", errno.ENFILE: "too many open files",
    errno.ENOMEM: "out of memory", errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by the receiver", errno.ETIMEDOUT: "connection timed out",
    errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable", errno.EPIPE: "broken pipe",
}

_Error = Union[Failure, BaseException]


def _value(failure: _Error) -> BaseException:
    return failure.value if isinstance(failure, Failure) else failure  # type: ignore[return-value]


def is_bug(failure: _Error) -> bool:
    """Whether ``failure`` is a mistake in code (log its traceback) rather than an ordinary failure."""
    from camgateway.base.internals import http_wrappers

    value = _value(failure)
    if isinstance(value, http_wrappers()):  # an HTTP request failed because of what?
        return any(is_bug(r) for r in getattr(value, "reasons", ()) if isinstance(r, (Failure, BaseException)))
    return isinstance(value, _BUGS)


def reason(failure: _Error) -> str:
    """``failure`` (a Failure or an exception) in words, on one line."""
    return _words(_value(failure), 0)


def _words(value: Any, depth: int) -> str:
    if isinstance(value, (DeliveryFailed, PermanentFailure)):
        return _text(value) or type(value).__name__
    if isinstance(value, defer.CancelledError):
        return "cancelled"
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, (error.TimeoutError, error.TCPTimedOutError)):
        return "connection timed out"
    if isinstance(value, (error.DNSLookupError, error.UnknownHostError)):
        return f"host name not found ({_text(value).rstrip('.')})"
    if isinstance(value, error.NoRouteError):
        return "no route to host"
    if isinstance(value, error.ConnectError):
        detail = value.osError or (value.args[0] if value.args else "")
        return f"cannot connect ({detail})" if detail else "cannot connect"
    if isinstance(value, error.ProcessTerminated):
        return program_ended("program", value.exitCode, value.signal, b"")
    if isinstance(value, error.ConnectionDone):
        return "connection closed by the receiver"
    if isinstance(value, error.ConnectionLost):
        return "connection reset by the receiver"
    wrapped = _wrapped(value, depth)
    if wrapped is not None:
        return wrapped
    tls = _tls(value)
    if tls is not None:
        return tls
    if isinstance(value, OSError):
        return _os_error(value)
    if is_bug(value):
        return f"internal error: {type(value).__name__}: {_text(value)}".rstrip(": ")
    return _text(value) or type(value).__name__


def _wrapped(value: Any, depth: int) -> Any:
    """Twisted's HTTP client wraps the cause of a failed request: say what it was doing when it failed."""
    from twisted.web import client

    from camgateway.base.internals import http_wrappers

    if not isinstance(value, http_wrappers()) or depth > 3:
        return None
    causes = [_words(_value(r), depth + 1) for r in getattr(value, "reasons", ())
              if isinstance(r, (Failure, BaseException))]
    causes = [c for c in dict.fromkeys(causes) if c != "connection closed by the receiver"] or causes
    cause = "; ".join(causes) or "no reason given"
    if isinstance(value, client.ResponseNeverReceived):
        return f"{cause} before answering"
    if isinstance(value, client.ResponseFailed):
        return f"{cause} in the middle of the answer"
    if isinstance(value, client.RequestTransmissionFailed):
        return f"{cause} while the file was being sent"
    return f"{cause} while the request was being made"


def _tls(value: Any) -> Any:
    """A TLS failure (OpenSSL's error queue, or a certificate for another name)."""
    try:
        from OpenSSL import SSL
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - both come with Twisted's tls extra
        return None
    if isinstance(value, VerificationError):
        return f"TLS certificate is not for this host ({_text(value)})"
    if isinstance(value, SSL.Error):
        queue = value.args[0] if value.args and isinstance(value.args[0], list) else []
        said = [str(entry[-1]) for entry in queue if isinstance(entry, tuple) and entry]
        return "TLS handshake failed: " + ("; ".join(said) or _text(value) or "no reason given")
    return None


def _os_error(value: OSError) -> str:
    said = value.strerror or _text(value)
    words = _ERRNO.get(value.errno) if value.errno is not None else None
    text = f"{words} ({said})" if words and said and words.lower() != said.lower() else (words or said)
    if value.filename is not None:
        text += f": {value.filename}"
    return text or type(value).__name__


def _text(value: BaseException) -> str:
    """An exception's message on one line, printable (bytes decoded, never their repr)."""
    if len(value.args) == 1 and isinstance(value.args[0], bytes):
        text = value.args[0].decode("utf-8", "replace")
    else:
        text = str(value)
    return " ".join(text.split())


def last_line(output: bytes, limit: int = 300) -> str:
    """The last non-empty line of a program's output, printable, at most ``limit`` characters."""
    for line in reversed(output.decode("utf-8", "replace").splitlines()):
        text = " ".join(line.split())
        if text:
            return text if len(text) <= limit else text[: limit - 1] + "…"
    return ""


def program_ended(program: str, code: Optional[int], signal_number: Optional[int], stderr: bytes) -> str:
    """How a program that did not succeed ended, with the last line of its stderr."""
    if code is not None:
        text = f"{program} exited with status {code}"
    elif signal_number is not None:
        try:
            name = f" ({signal.Signals(signal_number).name})"
        except ValueError:
            name = ""
        text = f"{program} killed by signal {signal_number}{name}"
    else:
        text = f"{program} ended for an unknown reason"
    said = last_line(stderr)
    return f"{text}: {said}" if said else text
