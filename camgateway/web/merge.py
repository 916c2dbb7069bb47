"""With ``workers: N``: the status API and metrics of every worker, answered as one gateway.

Each child worker serves the same status site on a UNIX socket of its own
(in a private folder the gateway makes, see
:class:`~camgateway.runtime.workers.Workers`); the gateway's site asks every worker
the same request (with the caller's ``Authorization``) and merges the
answers with its own: lists are joined and sorted as each route sorts them,
the summary's counters and gauges are added up, ``/files/<id>`` is streamed
from the worker that stored the file. In ``/metrics`` every counter (and
histogram, and the ``process_*`` figures) is one series per worker, labelled
``worker``, so that a worker restarted with its counters at 0 is a counter
reset of its own series for Prometheus, never a total that goes down; the
gauges are added up (or merged as :data:`GAUGES_MERGED_BY` says).
``/healthz`` names each worker's problems. A worker that does not answer
within :data:`TIMEOUT` is left out and named in ``/api/summary`` and
``/healthz``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

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

from camgateway.base.internals import quiet_pool

__all__ = ["WorkerPeers", "merge_list", "merge_files", "merge_cameras", "merge_summary", "merge_metrics",
           "merge_health", "TIMEOUT", "LIST_ROUTES", "GAUGES_MERGED_BY"]

#: Seconds a worker has to answer the gateway's status site.
TIMEOUT = 5.0

#: The list routes: the key each sorts by (newest or longest first), None to keep the order.
LIST_ROUTES: dict[str, Optional[str]] = {
    "sessions": "connected_s", "transfers": None, "partials": "last_seen",
    "outbox": None, "failures": "time", "refused": "last_at",
}
#: Added up over workers; ``refused`` too, since a camera always reaches the same worker. (``dead_letters``
#: is not: every worker's go to one folder.)
_SUMMED = ("connections_open", "sessions", "transfers", "outbox_depth", "spool_files", "spool_bytes", "refused")

#: The gauges of ``/metrics`` that are not added up across workers, and how they are merged.
GAUGES_MERGED_BY: dict[str, Callable[[float, float], float]] = {
    "camgateway_spool_free_bytes": min,  # the workers' spools are folders of one spool: one filesystem
    "camgateway_dead_letters": max,  # every worker's dead letters go to the one dead-letter folder
    "camgateway_outbox_oldest_age_seconds": max,
    "camgateway_last_file_received_timestamp_seconds": max,
    "camgateway_build_info": max,  # always 1: one gateway, one version
}


def merge_list(route: str, lists: list[list[Any]], limit: Optional[int] = None) -> list[Any]:
    """Every worker's answer to list ``route`` as one list, sorted as the route sorts."""
    merged = [item for items in lists for item in items]
    key = LIST_ROUTES.get(route)
    if key is not None:
        merged.sort(key=lambda item: (item.get(key) is not None, item.get(key) or 0), reverse=True)
    return merged[:limit] if limit is not None else merged


def merge_files(answers: list[tuple[list[dict[str, Any]], Optional[int]]], offset: int,
                limit: int) -> tuple[list[dict[str, Any]], int]:
    """The page ``offset``, ``limit`` of ``/api/files`` from each worker's first ``offset + limit`` files
    and its count (``X-Total-Count``): ``(files, total)``, newest first, each file once.

    Only with a store per worker (SQLite): a shared store is asked once, not merged.
    """
    seen: dict[str, dict[str, Any]] = {}
    for files, _ in answers:
        for f in files:
            seen.setdefault(str(f.get("id")), f)
    merged = sorted(seen.values(), key=lambda f: (f.get("received_at") or "", f.get("id") or ""), reverse=True)
    return merged[offset:offset + limit], sum(total or 0 for _, total in answers)


def _latest(a: Optional[str], b: Optional[str]) -> Optional[str]:
    return max((t for t in (a, b) if t is not None), default=None)


def merge_cameras(lists: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every worker's ``/api/cameras`` as one: a camera in several workers' stores (``workers`` changed)
    once, its files added up, online if a session is live on any, the latest of the rest."""
    out: dict[str, dict[str, Any]] = {}
    for views in lists:
        for view in views:
            mine = out.get(view["imei"])
            if mine is None:
                out[view["imei"]] = dict(view)
                continue
            newer = (view.get("last_seen") or "") > (mine.get("last_seen") or "")
            combined = dict(view if newer else mine)
            combined["online"] = bool(view.get("online") or mine.get("online"))
            for key in ("files_total", "files_24h"):
                combined[key] = (view.get(key) or 0) + (mine.get(key) or 0)
            combined["first_seen"] = min((t for t in (view.get("first_seen"), mine.get("first_seen")) if t),
                                         default=None)
            combined["last_file_at"] = _latest(view.get("last_file_at"), mine.get("last_file_at"))
            for when, keys in (("position_at", ("latitude", "longitude")), ("last_error_at", ("last_error",))):
                source = view if (view.get(when) or "") > (mine.get(when) or "") else mine
                for key in (when, *keys):
                    combined[key] = source.get(key)
            out[view["imei"]] = combined
    return list(out.values())


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


def _per_worker(family: Any) -> bool:
    """Counters, histograms and a process's own figures: one series per worker, never added up."""
    return family.type in ("counter", "histogram", "summary") or family.name.startswith("process_")


def merge_metrics(texts: dict[int, str]) -> bytes:
    """Prometheus texts of every worker, by worker index (the gateway is 0), as one.

    Each sample of a counter, a histogram or a ``process_*`` family gets the
    label ``worker`` (unless it has one): one series per worker. The other
    samples with the same name and labels are added up, except the gauges of
    :data:`GAUGES_MERGED_BY`.
    """
    families: dict[str, Any] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, family)  # the first of a name gives its type and help
            samples = values.setdefault(family.name, {})
            per_worker, combine = _per_worker(family), GAUGES_MERGED_BY.get(family.name)
            for sample in family.samples:
                labels = sample.labels
                if per_worker and "worker" not in labels:
                    labels = dict(labels, worker=str(index))
                key = (sample.name, tuple(sorted(labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif combine is not None:
                    samples[key] = combine(samples[key], sample.value)
                else:
                    samples[key] += sample.value

    class _Merged:
        def collect(self) -> Any:
            for name, family in families.items():
                family.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def merge_health(local: dict[str, Any], states: list[dict[str, Any]],
                 answers: dict[int, Optional[dict[str, Any]]]) -> tuple[dict[str, Any], int]:
    """The gateway's ``/healthz`` answer (body, HTTP code) for every worker.

    ``local`` is this process's (worker 0's) answer, ``states`` each child
    as :meth:`WorkerPeers.state` says, ``answers`` each child's ``/healthz``
    body (None: no answer). Every problem is named for its worker
    (``"worker 1 store"``); a child that takes cameras and did not answer is
    a problem too. 503 while there is one; a child restarting is ``degraded``
    but not a problem (its cameras wait, the others are served).
    """
    body = dict(local)
    problems = {f"worker 0 {part}": why for part, why in local.get("problems", {}).items()}
    workers = [{"index": 0, "pid": os.getpid(), "ready": True, "drain": False, "restarts": 0,
                "status": local.get("status"), "problems": local.get("problems", {})}]
    for state in states:
        answer = answers.get(state["index"])
        if not isinstance(answer, dict):
            answer = None
        mine = answer.get("problems", {}) if answer is not None else {}
        workers.append(dict(state, status=answer.get("status") if answer is not None else None, problems=mine))
        for part, why in mine.items():
            problems[f"worker {state['index']} {part}"] = why
        if answer is not None:
            body["sessions"] = body.get("sessions", 0) + answer.get("sessions", 0)
        elif state["ready"]:
            problems[f"worker {state['index']}"] = f"its status site did not answer within {TIMEOUT:.0f} s"
    body["workers"] = workers
    body.pop("problems", None)
    if problems:
        body["problems"] = problems
    if problems or not all(w["ready"] for w in workers if not w["drain"]):
        body["status"] = "degraded"
    return body, 503 if problems else 200


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
        self.agent = Agent.usingEndpointFactory(reactor, _SocketEndpoints(reactor, workers.status_sockets),
                                                pool=quiet_pool(reactor, persistent=False))

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
    def _bodies(self, path: bytes, request: Any, codes: tuple[int, ...] = (200,)) -> Any:
        """``{index: (response, body)}`` of every worker that answered ``path`` with one of ``codes``."""
        bodies: dict[int, tuple[Any, bytes]] = {}

        @defer.inlineCallbacks
        def ask(index: int) -> Any:
            try:
                response = yield self._request(index, path, request)
                body = yield readBody(response)
            except Exception:
                return
            if response.code in codes:
                bodies[index] = response, body

        yield defer.DeferredList([ask(i) for i in self.indexes()])
        return bodies

    def ask_all(self, path: bytes, request: Any, codes: tuple[int, ...] = (200,)) -> defer.Deferred:
        """``{index: decoded JSON or None}`` of every worker's answer to ``path`` (with one of ``codes``)."""
        def decode(bodies: dict[int, tuple[Any, bytes]]) -> dict[int, Any]:
            answers: dict[int, Any] = {}
            for index in self.indexes():
                try:
                    answers[index] = json.loads(bodies[index][1]) if index in bodies else None
                except ValueError:
                    answers[index] = None
            return answers

        return self._bodies(path, request, codes).addCallback(decode)

    def ask_all_counted(self, path: bytes, request: Any) -> defer.Deferred:
        """``{index: (list, X-Total-Count)}`` of every worker that answered ``path`` with a list (others left out)."""
        def counted(bodies: dict[int, tuple[Any, bytes]]) -> dict[int, tuple[list[Any], Optional[int]]]:
            answers = {}
            for index, (response, body) in bodies.items():
                try:
                    value = json.loads(body)
                except ValueError:
                    continue
                if isinstance(value, list):
                    total = response.headers.getRawHeaders(b"x-total-count", [b""])[0]
                    answers[index] = (value, int(total) if total.isdigit() else None)
            return answers

        return self._bodies(path, request).addCallback(counted)

    def ask_all_text(self, path: bytes, request: Any) -> defer.Deferred:
        """``{index: body text}`` of every worker that answered ``path``."""
        return self._bodies(path, request).addCallback(
            lambda bodies: {i: body.decode() for i, (_, body) in bodies.items()})

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
