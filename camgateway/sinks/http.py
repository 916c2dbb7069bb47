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
to the dead-letter folder with the status as the reason).

A file may be sent again: after a crash, or a timeout whose request did reach
the server. Every request carries the file's id (the same on every attempt)
as ``Idempotency-Key`` and in the metadata's ``id``: the receiver
de-duplicates on it.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from twisted.internet import defer, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

from camgateway.config import ConfigError, parse_duration
from camgateway.sinks import IFileSink, PermanentFailure, ReceivedFile
from camgateway.sinks.disk import build_stem, extension_for
from camgateway.sinks.registry import check_keys

__all__ = ["HTTPSink", "validate", "make", "RETRYABLE"]

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


def make(config: Mapping[str, Any], services: Any) -> "HTTPSink":
    """An HTTPSink from a validated entry."""
    import treq.client

    from twisted.internet import reactor

    policy: Any = BrowserLikePolicyForHTTPS()
    if config.get("ca"):
        with open(config["ca"], "rb") as f:
            policy = _TrustPolicy(f.read())
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, contextFactory=policy, pool=pool)
    headers = {name: _read_secret(value) for name, value in config["headers"].items()}
    sink = HTTPSink(treq.client.HTTPClient(agent), config["url"], config["method"], headers, config["timeout"])
    sink.pool = pool
    return sink


@implementer(IFileSink)
class HTTPSink:
    """Sends each file to an HTTP endpoint."""

    def __init__(self, client: Any, url: str, method: str, headers: Mapping[str, str], timeout: float) -> None:
        self.client = client
        self.url = url
        self.method = method
        self.headers = dict(headers)
        self.timeout = timeout
        parts = urlsplit(url)
        self.name = f"http:{urlunsplit((parts.scheme, parts.hostname or '', parts.path, '', ''))}"

    pool: Any = None

    def close(self) -> Any:
        """Drop kept-alive connections (the gateway is stopping)."""
        return self.pool.closeCachedConnections() if self.pool is not None else None

    def url_for(self, received: ReceivedFile) -> str:
        """The URL template filled in for ``received`` (each value URL-quoted)."""
        with open(received.path, "rb") as f:
            head = f.read(16)
        date, stem = build_stem(received)
        ext = extension_for(received, head)
        values = {"imei": received.imei, "name": f"{stem}.{ext}", "ext": ext, "kind": received.camera,
                  "source": received.source, "media": received.media, "date": date, "sha256": received.sha256,
                  "id": received.id}
        return self.url.format(**{k: quote(str(v), safe="") for k, v in values.items()})

    @defer.inlineCallbacks
    def deliver(self, received: ReceivedFile) -> Any:
        """Send the file, keyed by its id (``Idempotency-Key``); fire with the URL on a 2xx answer."""
        url = self.url_for(received)
        sidecar = json.dumps(received.sidecar(), separators=(",", ":"))
        headers = {k: [v] for k, v in self.headers.items()}
        if received.id:
            headers["Idempotency-Key"] = [received.id]
        with open(received.path, "rb") as body:
            name = url.rsplit("/", 1)[-1] or "file"
            if self.method == "PUT":
                headers["X-Camgateway-Metadata"] = [sidecar]
                headers["Content-Type"] = ["application/octet-stream"]
                request = self.client.request("PUT", url, data=body, headers=headers, timeout=self.timeout)
            else:
                request = self.client.request(
                    "POST", url, headers=headers, timeout=self.timeout,
                    files={"file": (name, "application/octet-stream", body)}, data={"metadata": sidecar})
            response = yield request
            content = yield response.content()
        code = response.code
        if 200 <= code < 300:
            return url
        message = f"HTTP {code} from {self.name}: {content[:200]!r}"
        if code in RETRYABLE or code >= 500:
            raise RuntimeError(message)
        raise PermanentFailure(message)

