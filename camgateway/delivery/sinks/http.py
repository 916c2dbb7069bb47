"""The HTTP sink: POST each file (multipart, with its metadata) or PUT it to a URL.

Configuration::

    - type: http
      url: "https://fleet.example.com/cameras/{imei}/{name}"
      method: POST            # POST: multipart "file" + "metadata" (the sidecar JSON)
                              # PUT: the file as the body, the sidecar in X-Camgateway-Metadata
      headers:
        Authorization: {env: FLEET_TOKEN, prefix: "Bearer "}   # or {file: /etc/camgateway/token}
        X-Fleet: plain-value
      timeout: 60             # seconds for the whole request
      ca: /etc/camgateway/ca.pem   # optional: trust this CA instead of the system's

URL placeholders: ``{imei} {name} {ext} {kind} {source} {media} {date}
{sha256} {id}`` (``kind`` is the camera kind; ``name`` is the file name the
disk sink would use; ``id`` the file's id, see below). TLS is always verified
(service-identity). Header values given as ``env``/``file`` are secrets: read
at start, never logged.

A 2xx answer is a delivery. 408, 429 and 5xx, timeouts and connection
errors are retried by the outbox; any other status is permanent (the file goes
to the dead-letter folder with the status as the reason). The reason is in
words: ``HTTP 503 Service Unavailable: <the answer's first words>``,
``timeout after 60 s``, ``connection refused``.

A file may be sent again: after a crash, or a timeout whose request did reach
the server. Every request carries the file's id (the same on every attempt)
as ``Idempotency-Key`` and in the metadata's ``id``: the receiver
de-duplicates on it.
"""

from __future__ import annotations

import json
import os
import re
import string
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlsplit

from treq.multipart import MultiPartProducer
from twisted.internet import defer, ssl, task
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, ResponseDone
from twisted.web.http import RESPONSES, PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from camgateway.base.units import ConfigError, parse_duration
from camgateway.base.internals import quiet_pool
from camgateway.base.reasons import DeliveryFailed
from camgateway.delivery.sinks import IFileSink, PermanentFailure, ReceivedFile, SinkContext
from camgateway.delivery.sinks.disk import build_stem, extension_for
from camgateway.delivery.sinks.registry import check_keys
from camgateway.wire.media import head_of

__all__ = ["HTTPSink", "validate", "make", "default_name", "RETRYABLE"]

RETRYABLE = {408, 429}
_FIELDS = {"imei", "name", "ext", "kind", "source", "media", "date", "sha256", "id"}


def _secret(value: Any, key: str, base: Path) -> Any:
    """Check a header value: a string, or {env: NAME} / {file: PATH} with an optional prefix."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and len(set(value) & {"env", "file"}) == 1 and set(value) <= {"env", "file", "prefix"}:
        if "file" in value:
            return {**value, "file": str(base / str(value["file"]))}
        return dict(value)
    raise ConfigError(key, "must be a string, {env: NAME} or {file: PATH} (optionally with prefix)")


def validate(config: Mapping[str, Any], key: str, base: Path) -> Mapping[str, Any]:
    """``{type: http, url, method, headers, timeout, ca}``."""
    check_keys(config, key, {"url", "method", "headers", "timeout", "ca"}, {"url"})
    url = config["url"]
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ConfigError(f"{key}.url", f"must be an http:// or https:// URL, got {url!r}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(url) if name}
    except ValueError as e:
        raise ConfigError(f"{key}.url", f"bad placeholder: {e}") from None
    if fields - _FIELDS:
        raise ConfigError(f"{key}.url", f"unknown placeholder(s) {sorted(fields - _FIELDS)}; known: {sorted(_FIELDS)}")
    method = str(config.get("method", "POST")).upper()
    if method not in ("POST", "PUT"):
        raise ConfigError(f"{key}.method", f"must be POST or PUT, got {config.get('method')!r}")
    headers = config.get("headers", {})
    if not isinstance(headers, Mapping):
        raise ConfigError(f"{key}.headers", "must be a mapping of header names to values")
    checked = {str(name): _secret(value, f"{key}.headers.{name}", base) for name, value in headers.items()}
    for name, value in checked.items():
        if isinstance(value, dict) and "env" in value and value["env"] not in os.environ:
            raise ConfigError(f"{key}.headers.{name}", f"environment variable {value['env']} is not set")
        if isinstance(value, dict) and "file" in value and not os.path.isfile(value["file"]):
            raise ConfigError(f"{key}.headers.{name}", f"secret file {value['file']} does not exist")
    ca = config.get("ca")
    if ca is not None and not os.path.isfile(base / str(ca)):
        raise ConfigError(f"{key}.ca", f"CA file {ca} does not exist")
    return {"type": "http", "url": url, "method": method, "headers": checked,
            "timeout": parse_duration(config.get("timeout", 60), f"{key}.timeout"),
            "ca": str(base / str(ca)) if ca is not None else None}


def default_name(config: Mapping[str, Any]) -> str:
    """The sink's name when the entry has none: ``http:`` and the server (``http:127.0.0.1:8080``)."""
    parts = urlsplit(config["url"])
    try:
        port = parts.port
    except ValueError:  # a placeholder where the port goes
        port = None
    return f"http:{parts.hostname or parts.netloc}" + (f":{port}" if port is not None else "")


def _read_secret(value: Any) -> str:
    if isinstance(value, str):
        return value
    if "env" in value:
        secret = os.environ.get(value["env"], "")
    else:
        with open(value["file"], encoding="utf-8") as f:
            secret = f.read().strip()
    return str(value.get("prefix", "")) + secret


class _TrustPolicy:
    """Verify servers against one CA (for ``ca:``)."""

    def __init__(self, pem: bytes) -> None:
        self._root = ssl.Certificate.loadPEM(pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


def make(config: Mapping[str, Any], context: SinkContext) -> "HTTPSink":
    """An HTTPSink from a validated entry."""
    import treq.client

    reactor = context.reactor
    policy: Any = BrowserLikePolicyForHTTPS()
    if config.get("ca"):
        with open(config["ca"], "rb") as f:
            policy = _TrustPolicy(f.read())
    pool = quiet_pool(reactor, persistent=True)
    agent = Agent(reactor, contextFactory=policy, pool=pool)
    headers = {name: _read_secret(value) for name, value in config["headers"].items()}
    sink = HTTPSink(treq.client.HTTPClient(agent), config["url"], config["method"], headers, config["timeout"],
                    reactor)
    sink.pool = pool
    return sink


@implementer(IFileSink)
class HTTPSink:
    """Sends each file to an HTTP endpoint."""

    def __init__(self, client: Any, url: str, method: str, headers: Mapping[str, str], timeout: float,
                 reactor: Any) -> None:
        self.client = client
        self.url = url
        self.method = method
        self.headers = dict(headers)
        self.timeout = timeout
        self.reactor = reactor
        self.name = default_name({"url": url})

    pool: Any = None

    def close(self) -> Any:
        """Drop kept-alive connections (the gateway is stopping)."""
        return self.pool.closeCachedConnections() if self.pool is not None else None

    def url_for(self, received: ReceivedFile) -> str:
        """The URL template filled in for ``received`` (each value URL-quoted)."""
        date, stem = build_stem(received)
        ext = extension_for(received, head_of(str(received.path)))
        values = {"imei": received.imei, "name": f"{stem}.{ext}", "ext": ext, "kind": received.camera,
                  "source": received.source, "media": received.media, "date": date, "sha256": received.sha256,
                  "id": received.id}
        return self.url.format(**{k: quote(str(v), safe="") for k, v in values.items()})

    @defer.inlineCallbacks
    def deliver(self, received: ReceivedFile) -> Any:
        """Send the file, keyed by its id (``Idempotency-Key``); fire with the URL on a 2xx answer.

        ``timeout`` bounds the whole exchange, the answer's body included.
        Failures say why in words (:class:`~camgateway.base.reasons.DeliveryFailed`
        for a timeout or a status; connection errors are worded by the outbox).
        """
        url = self.url_for(received)
        sidecar = json.dumps(received.sidecar(), separators=(",", ":"))
        headers = {k: [v] for k, v in self.headers.items()}
        if received.id:
            headers["Idempotency-Key"] = [received.id]
        f = open(received.path, "rb")
        if self.method == "PUT":
            headers["X-Camgateway-Metadata"] = [sidecar]
            headers["Content-Type"] = ["application/octet-stream"]
            body = _Body(FileBodyProducer(f), f.close)
        else:
            name = url.rsplit("/", 1)[-1] or "file"
            boundary = uuid.uuid4().hex
            headers["Content-Type"] = [f"multipart/form-data; boundary={boundary}"]
            body = _Body(MultiPartProducer([("metadata", sidecar),
                                            ("file", (name, "application/octet-stream", FileBodyProducer(f)))],
                                           boundary=boundary), f.close)
        waiting = self.client.request(self.method, url, data=body, headers=headers, unbuffered=True)
        timer = self.reactor.callLater(self.timeout, lambda: waiting.cancel())
        try:
            response = yield waiting
            waiting = _read_answer(response)
            content = yield waiting
        except Exception:
            if not timer.active():  # it fired: no (whole) answer in time
                raise DeliveryFailed(f"timeout after {self.timeout:g} s") from None
            raise
        finally:
            if timer.active():
                timer.cancel()
            body.release()
        code = response.code
        if 200 <= code < 300:
            return url
        phrase = response.phrase.decode("latin-1") if response.phrase else RESPONSES.get(code, b"").decode()
        said = _excerpt(content)
        message = f"HTTP {code} {phrase}".rstrip() + (f": {said}" if said else "")
        if code in RETRYABLE or code >= 500:
            raise DeliveryFailed(message)
        raise PermanentFailure(message)


#: Bytes of an answer's body kept for the reason of a failure (the rest is read and dropped).
_KEEP = 1024


def _excerpt(content: bytes) -> str:
    """An answer's body as words for a log line: text, tags dropped, on one line, at most 200 characters."""
    text = " ".join(re.sub(r"<[^>]*>", " ", content.decode("utf-8", "replace")).split())
    return text if len(text) <= 200 else text[:199] + "…"


class _Answer(Protocol):
    """Reads an answer's body, keeping its first :data:`_KEEP` bytes."""

    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.kept = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if len(self.kept) < _KEEP:
            self.kept += data[: _KEEP - len(self.kept)]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(bytes(self.kept))
        else:
            self.done.errback(reason)


def _read_answer(response: Any) -> defer.Deferred:
    """The first bytes of ``response``'s body; cancelling it drops the connection."""
    def cancel(_: defer.Deferred) -> None:
        if answer.transport is not None:
            answer.transport.loseConnection()

    done: defer.Deferred = defer.Deferred(cancel)
    answer = _Answer(done)
    response.deliverBody(answer)
    return done


@implementer(IBodyProducer)
class _Body:
    """A request body read from a file, closed once the request is over and the body is not being sent.

    A receiver may answer before the whole file was sent: the body goes on
    being sent after the answer, so the file stays open until then. Twisted's
    HTTP client may stop, pause or resume a body whose producing task has just
    ended (such a receiver then resetting the connection): that is no error,
    so it is not one here.
    """

    def __init__(self, producer: Any, close: Callable[[], None]) -> None:
        self.producer = producer
        self.length = producer.length
        self._close = close
        self._sending = False
        self._over = False

    def startProducing(self, consumer: Any) -> defer.Deferred:
        self._sending = True
        return self.producer.startProducing(consumer).addBoth(self._sent)

    def _sent(self, result: Any) -> Any:
        self._sending = False
        if self._over:
            self._close()
        return result

    def stopProducing(self) -> None:
        try:
            self.producer.stopProducing()
        except task.TaskFinished:
            pass
        self._sent(None)

    def pauseProducing(self) -> None:
        try:
            self.producer.pauseProducing()
        except task.TaskFinished:
            pass

    def resumeProducing(self) -> None:
        try:
            self.producer.resumeProducing()
        except task.TaskFinished:
            pass

    def release(self) -> None:
        """The request is over (answered, failed or timed out): close the file unless it is still being sent."""
        self._over = True
        if not self._sending:
            self._close()
