"""With ``workers: N``: the status API and metrics of every worker, answered as one gateway.

Each child worker serves the same status site on a UNIX socket of its own
(in a private folder the gateway makes, see
:class:`~camgateway.workers.Workers`); the gateway's site asks every worker
the same request (with the caller's ``Authorization``) and merges the
answers with its own: lists are joined and sorted as each route sorts them,
counters and gauges are added up, ``/files/<id>`` is streamed from the
worker that stored the file. A worker that does not answer within
:data:`TIMEOUT` is left out and named in ``/api/summary`` and ``/healthz``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

__all__ = ["WorkerPeers", "merge_list", "merge_summary", "merge_metrics", "TIMEOUT", "LIST_ROUTES"]

#: Seconds a worker has to answer the gateway's status site.
TIMEOUT = 5.0

#: The list routes: the key each sorts by (newest or longest first), None to keep the order.
LIST_ROUTES: dict[str, Optional[str]] = {
    "sessions": "connected_s", "transfers": None, "files": "received_at", "partials": "last_seen",
    "outbox": None, "failures": "time",
}
_SUMMED = ("connections_open", "sessions", "transfers", "outbox_depth", "spool_files", "spool_bytes")


def merge_list(route: str, lists: list[list[Any]], limit: Optional[int] = None) -> list[Any]:
    """Every worker's answer to list ``route`` as one list, sorted as the route sorts."""
    merged = [item for items in lists for item in items]
    key = LIST_ROUTES.get(route)
    if key is not None:
        merged.sort(key=lambda item: (item.get(key) is not None, item.get(key) or 0), reverse=True)
    return merged[:limit] if limit is not None else merged


def merge_summary(local: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway's summary with the workers' counters added in."""
    out = dict(local, stats=dict(local.get("stats", {})))
    for other in others:
        for key in _SUMMED:
            out[key] = out.get(key, 0) + other.get(key, 0)
        for name, value in other.get("stats", {}).items():
            mine = out["stats"].get(name)
            if isinstance(value, dict):
                combined = dict(mine or {})
                for k, v in value.items():
                    combined[k] = combined.get(k, 0) + v
                out["stats"][name] = combined
            elif isinstance(value, (int, float)):
                out["stats"][name] = (mine or 0) + value
    return out


def merge_metrics(texts: list[str]) -> bytes:
    """Prometheus texts of every worker (the gateway's first) as one: samples with the same
    name and labels added up, except the build info, the start time (the earliest) and the
    descriptor limit (the gateway's)."""
    families: dict[str, Any] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, family)  # the first of a name gives its type and help
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif family.type == "info" or sample.name == "process_max_fds":
                    pass
                elif sample.name == "process_start_time_seconds":
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value

    class _Merged:
        def collect(self) -> Any:
            for name, family in families.items():
                family.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(registry)


@implementer(IAgentEndpointFactory)
class _SocketEndpoints:
    def __init__(self, reactor: Any, paths: dict[int, str]) -> None:
        self.reactor, self.paths = reactor, paths

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        index = int(uri.host.decode().split("-", 1)[1])
        return UNIXClientEndpoint(self.reactor, self.paths[index], timeout=TIMEOUT)


class _Stream(Protocol):
    """A worker's answer body, written on to the caller's request as it comes."""

    def __init__(self, request: Any, done: defer.Deferred) -> None:
        self.request, self.done = request, done

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


class WorkerPeers:
    """The gateway's view of its workers' status sites."""

    def __init__(self, reactor: Any, workers: Any) -> None:
        self.reactor = reactor
        self.workers = workers
        self.agent = Agent.usingEndpointFactory(reactor, _SocketEndpoints(reactor, workers.status_sockets))

    def _request(self, index: int, path: bytes, request: Any, method: bytes = b"GET") -> defer.Deferred:
        headers = Headers()
        auth = request.getHeader(b"authorization")
        if auth:
            headers.setRawHeaders(b"authorization", [auth])
        d = self.agent.request(method, b"http://worker-%d%s" % (index, path), headers)
        timer = self.reactor.callLater(TIMEOUT, d.cancel)
        d.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return d

    def indexes(self) -> list[int]:
        """The workers that serve a status site (every child; a draining one too)."""
        return sorted(self.workers.status_sockets)

    @defer.inlineCallbacks
    def _bodies(self, path: bytes, request: Any) -> Any:
        """``{index: body}`` of every worker that answered ``path`` with a 200."""
        bodies: dict[int, bytes] = {}

        @defer.inlineCallbacks
        def ask(index: int) -> Any:
            try:
                response = yield self._request(index, path, request)
                body = yield readBody(response)
            except Exception:
                return
            if response.code == 200:
                bodies[index] = body

        yield defer.DeferredList([ask(i) for i in self.indexes()])
        return bodies

    def ask_all(self, path: bytes, request: Any) -> defer.Deferred:
        """``{index: decoded JSON or None}`` of every worker's answer to ``path``."""
        def decode(bodies: dict[int, bytes]) -> dict[int, Any]:
            answers: dict[int, Any] = {}
            for index in self.indexes():
                try:
                    answers[index] = json.loads(bodies[index]) if index in bodies else None
                except ValueError:
                    answers[index] = None
            return answers

        return self._bodies(path, request).addCallback(decode)

    def ask_all_text(self, path: bytes, request: Any) -> defer.Deferred:
        """Every answering worker's body (text) for ``path``, in worker order."""
        return self._bodies(path, request).addCallback(
            lambda bodies: [bodies[i].decode() for i in sorted(bodies)])

    @defer.inlineCallbacks
    def stream_file(self, path: bytes, request: Any) -> Any:
        """Stream ``/files/<id>`` from the worker that has it; False if none has."""
        for index in self.indexes():
            try:
                response = yield self._request(index, path, request, request.method)
            except Exception:
                continue
            if response.code != 200:
                yield readBody(response).addErrback(lambda _: None)
                continue
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() in (b"content-type", b"content-length", b"cache-control", b"content-disposition",
                                    b"content-security-policy", b"x-content-type-options"):
                    request.responseHeaders.setRawHeaders(name, values)
            done: defer.Deferred = defer.Deferred()
            response.deliverBody(_Stream(request, done))
            yield done
            return True
        return False

    def state(self) -> list[dict[str, Any]]:
        """Each worker process: index, pid, whether it is ready (and draining)."""
        return self.workers.state()
