"""The status web service's resources: JSON API, health, metrics, the page, stored files.

Routes (every one read-only, GET or HEAD)::

    /                  the status page (page.html, page.js, page.css)
    /api/summary       version, uptime, counters
    /api/sessions      live camera sessions
    /api/transfers     files being received, with progress
    /api/files         the latest stored files with their metadata (?limit=, ?imei=, ?media=, ?camera=)
    /api/partials      interrupted transfers kept for resuming
    /api/outbox        files waiting for a sink
    /api/failures      the latest failures, with reasons
    /files/<id>        a stored file, by the id /api/files gives (never by path)
    /metrics           Prometheus text format
    /healthz           200 when accepting cameras, recording files and delivering
                       them, else 503 with ``problems`` saying why (no token needed)

With ``http.token`` set, every route but ``/healthz`` wants
``Authorization: Bearer <token>`` or HTTP basic auth as user ``camgateway``
with the token as password (what a browser asks for).
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import json
import mimetypes
import os
from pathlib import Path
from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from camgateway import __version__
from camgateway.web.metrics import Metrics, outbox_depth, spool_usage
from camgateway.web.progress import active_transfers, iso, session_view
from camgateway.web.merge import WorkerPeers, merge_health, merge_list, merge_metrics, merge_summary
from camgateway.web.views import file_id, file_view, outbox_view, partial_view, stored_path

__all__ = ["StatusRoot", "StatusSite", "PAGE", "CSP"]

log = Logger(namespace="camgateway.web")

HERE = Path(__file__).resolve().parent
#: Static files of the page: URL segment -> (file, content type).
PAGE = {
    b"": ("page.html", "text/html; charset=utf-8"),
    b"page.js": ("page.js", "text/javascript; charset=utf-8"),
    b"page.css": ("page.css", "text/css; charset=utf-8"),
}
#: The page loads nothing from elsewhere, and runs no inline code.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
USER = b"camgateway"


def _common_headers(request: Request, cache: str = "no-store") -> None:
    request.setHeader(b"cache-control", cache.encode())
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")


def _json(request: Request, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    _common_headers(request)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


def _later(request: Request, d: defer.Deferred, render: Callable[[Any], bytes]) -> Any:
    """Finish ``request`` with ``render(result of d)``, unless the client went away."""
    gone: list[bool] = []
    request.notifyFinish().addBoth(lambda _: gone.append(True))

    def ok(value: Any) -> None:
        body = render(value)
        if not gone:
            request.write(body)
            request.finish()

    def failed(failure: Any) -> None:
        log.failure("status request {uri} failed", failure, uri=request.uri)
        if not gone:
            request.write(_json(request, {"error": "internal error"}, 500))
            request.finish()

    d.addCallback(ok).addErrback(failed)
    return NOT_DONE_YET


def _int_arg(request: Request, name: bytes, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(request.args.get(name, [b""])[0])))
    except ValueError:
        return default


def _str_arg(request: Request, name: bytes) -> Optional[str]:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


# -- resources

class _Json(Resource):
    """A JSON route: ``fn(services, request)`` returns a value or a Deferred of one.

    With several workers, ``merge(local, answers, request)`` makes one answer of
    this process's and the other workers' (``{index: decoded JSON or None}``).
    """

    isLeaf = True

    def __init__(self, root: "StatusRoot", fn: Callable[[Any, Request], Any],
                 merge: Callable[[Any, dict[int, Any], Request], Any]) -> None:
        super().__init__()
        self.root, self.fn, self.merge = root, fn, merge

    def render_GET(self, request: Request) -> Any:
        services = self.root.gateway.services
        if services is None:
            return _json(request, {"error": "the gateway is starting"}, 503)
        result = self.fn(services, request)
        peers = self.root.peers
        if peers is not None:  # several workers: theirs too
            result = defer.maybeDeferred(lambda: result).addCallback(
                lambda local: peers.ask_all(request.uri, request).addCallback(
                    lambda answers: self.merge(local, answers, request)))
        if isinstance(result, defer.Deferred):
            return _later(request, result, lambda value: _json(request, value))
        return _json(request, result)


class _Static(Resource):
    """One file of the page."""

    isLeaf = True

    def __init__(self, name: str, content_type: str) -> None:
        super().__init__()
        self.body = (HERE / name).read_bytes()
        self.content_type = content_type.encode()

    def render_GET(self, request: Request) -> bytes:
        _common_headers(request, "no-cache")
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"content-security-policy", CSP.encode())
        return self.body


class _Message(Resource):
    isLeaf = True

    def __init__(self, code: int, message: str, headers: Optional[dict[bytes, bytes]] = None) -> None:
        super().__init__()
        self.code, self.message, self.headers = code, message, headers or {}

    def render(self, request: Request) -> bytes:
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return _json(request, {"error": self.message}, self.code)


class _StoredFile(Resource):
    """A file a sink stored, streamed without blocking the reactor on large reads."""

    isLeaf = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def render_GET(self, request: Request) -> Any:
        try:
            f = open(self.path, "rb")
        except OSError:
            return _json(request, {"error": "no such file"}, 404)
        kind = mimetypes.guess_type(self.path.name)[0] or "application/octet-stream"
        _common_headers(request, "private, max-age=86400")
        request.setHeader(b"content-type", kind.encode())
        request.setHeader(b"content-length", str(os.fstat(f.fileno()).st_size).encode())
        request.setHeader(b"content-security-policy", b"default-src 'none'; sandbox")
        request.setHeader(b"content-disposition", f'inline; filename="{self.path.name}"'.encode())
        if request.method == b"HEAD":
            f.close()
            return b""
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        def sent(_: object) -> None:
            f.close()
            if not gone:
                request.finish()

        FileSender().beginFileTransfer(f, request).addBoth(sent)
        return NOT_DONE_YET


class _WorkerFile(Resource):
    """A file another worker stored, streamed from it (404 when none has it)."""

    isLeaf = True

    def __init__(self, peers: Any) -> None:
        super().__init__()
        self.peers = peers

    def render_GET(self, request: Request) -> Any:
        def done(found: bool) -> None:
            if not found:
                request.setResponseCode(404)
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps({"error": "no such file"}).encode())
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("status: streaming a worker's file failed", failure)
            request.finish()

        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))
        _common_headers(request, "private, max-age=86400")
        self.peers.stream_file(request.uri, request).addCallbacks(
            lambda found: None if gone else done(found), lambda f: None if gone else failed(f))
        return NOT_DONE_YET


class _Files(Resource):
    """``/files/<id>``: only files from :attr:`Services.recent`, looked up by id."""

    def __init__(self, root: "StatusRoot") -> None:
        super().__init__()
        self.root = root

    def getChild(self, name: bytes, request: Request) -> Resource:
        services = self.root.gateway.services
        if services is None or request.postpath:
            return _Message(404, "no such file")
        wanted = name.decode("ascii", "replace")
        for received, places in reversed(list(services.recent)):
            if file_id(received) == wanted:
                path = stored_path(places)
                if path is not None:
                    return _StoredFile(path)
                break
        if self.root.peers is not None:
            return _WorkerFile(self.root.peers)
        return _Message(404, "no such file")

    def render_GET(self, request: Request) -> bytes:
        return _json(request, {"error": "no such file"}, 404)


def _address(address: Any) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else str(address)


def sink_problems(services: Any) -> dict[str, str]:
    """The sinks whose every delivery attempt has failed for ``outbox.degraded_after``, and why."""
    after = services.config.outbox_degraded_after
    problems = {}
    for sink in services.sinks:
        failing = services.stats.sink_failing(sink.name)
        if failing is not None and failing.last - failing.since >= after:
            problems[f"sink {sink.name}"] = (f"every delivery attempt has failed since {iso(failing.since)}"
                                             f" ({failing.last - failing.since:.0f} s), the latest: {failing.reason}")
    return problems


class _Health(Resource):
    """``/healthz``: this process's health, with several workers every worker's (camgateway.web.merge)."""

    isLeaf = True

    def __init__(self, root: "StatusRoot") -> None:
        super().__init__()
        self.root = root

    def local(self) -> tuple[dict[str, Any], int]:
        """This process's answer: (body, HTTP code)."""
        gateway = self.root.gateway
        services = gateway.services
        listening = [_address(port.getHost()) for port in gateway.ports]
        shard = getattr(services, "shard", None)
        child = shard is not None and shard.index > 0  # a worker the gateway hands cameras to: no port
        if services is None or not (listening or child):
            return {"status": "starting", "version": __version__}, 503
        if not services.accepting:
            return {"status": "stopping", "version": __version__}, 503
        body = {"status": "ok", "version": __version__, "listening": listening,
                "sessions": len(services.sessions),
                "uptime_s": round(services.clock.seconds() - self.root.started, 3)}
        # Files cannot be recorded or delivered as they should: say why, and fail the check.
        problems = services.health.problems()
        problems.update(sink_problems(services))
        warnings = services.health.warnings()
        if warnings:  # works, not as configured: said, but the check passes
            body["status"] = "degraded"
            body["warnings"] = warnings
        if problems:
            body["status"] = "degraded"
            body["problems"] = problems
            return body, 503
        return body, 200

    def render_GET(self, request: Request) -> Any:
        body, code = self.local()
        peers = self.root.peers
        if peers is None or body["status"] in ("starting", "stopping"):
            return _json(request, body, code)
        d = peers.ask_all(b"/healthz", request, codes=(200, 503)).addCallback(
            lambda answers: merge_health(body, peers.state(), answers))
        return _later(request, d, lambda merged: _json(request, merged[0], merged[1]))


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, root: "StatusRoot") -> None:
        super().__init__()
        self.root = root
        self.metrics = Metrics(root.gateway)

    def render_GET(self, request: Request) -> Any:
        def render(body: bytes) -> bytes:
            _common_headers(request)
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return body

        d = self.metrics.scrape()
        peers = self.root.peers
        if peers is not None:  # several workers: the gateway's figures are theirs (camgateway.web.merge)
            d.addCallback(lambda own: peers.ask_all_text(b"/metrics", request).addCallback(
                lambda others: merge_metrics({**others, 0: own.decode()})))
        return _later(request, d, render)


class _Api(Resource):
    def getChild(self, name: bytes, request: Request) -> Resource:
        return _Message(404, "no such API route")

    def render_GET(self, request: Request) -> bytes:
        return _json(request, sorted(name.decode() for name in self.children))


class StatusRoot(Resource):
    """The root of the status site; checks the token before any route but ``/healthz``."""

    def __init__(self, gateway: Any, token: Optional[str] = None, clock: Any = None) -> None:
        super().__init__()
        self.gateway = gateway
        self.token = token.encode() if token else None
        workers = getattr(gateway, "workers", None)
        #: The other workers' status sites (camgateway.web.merge), None with one process.
        self.peers: Any = None
        if workers is not None and workers.status_sockets:
            self.peers = WorkerPeers(gateway.reactor, workers)
        clock = clock or (gateway.services.clock if gateway.services is not None else None)
        self.started = clock.seconds() if clock is not None else 0.0
        api = _Api()
        api.putChild(b"summary", _Json(self, self.summary, self._all_summaries))
        for name, fn in (("sessions", self.sessions), ("transfers", self.transfers), ("files", self.files),
                         ("partials", self.partials), ("outbox", self.outbox), ("failures", self.failures)):
            api.putChild(name.encode(), _Json(self, fn, functools.partial(self._all_lists, name)))
        self.children = {b"api": api, b"files": _Files(self), b"healthz": _Health(self), b"metrics": _Metrics(self)}
        for segment, (name, content_type) in PAGE.items():
            self.children[segment] = _Static(name, content_type)

    # -- access

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the token (always, without one)."""
        if self.token is None:
            return True
        header = request.getHeader(b"authorization") or b""
        if header[:7].lower() == b"bearer ":
            return hmac.compare_digest(header[7:].strip(), self.token)
        if header[:6].lower() == b"basic ":
            return hmac.compare_digest(request.getUser(), USER) & hmac.compare_digest(request.getPassword(),
                                                                                      self.token)
        return False

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if request.method not in (b"GET", b"HEAD"):
            return _Message(405, "only GET and HEAD", {b"allow": b"GET, HEAD"})
        if path != b"healthz" and not self.authorized(request):
            return _Message(401, "unauthorized: send the http.token as a Bearer token, or as the password"
                                 " of user camgateway", {b"www-authenticate": b'Basic realm="camgateway", charset="UTF-8"'})
        child = self.children.get(path)
        return child if child is not None else _Message(404, "not found")

    # -- the JSON routes, and each one's answers of several workers as one

    def _all_summaries(self, local: dict[str, Any], answers: dict[int, Any], request: Request) -> dict[str, Any]:
        merged = merge_summary(local, [a for a in answers.values() if isinstance(a, dict)])
        merged["workers"] = [{"index": 0, "pid": os.getpid(), "ready": True, "drain": False, "answered": True}] + [
            dict(state, answered=answers.get(state["index"]) is not None) for state in self.peers.state()]
        return merged

    def _all_lists(self, name: str, local: list[Any], answers: dict[int, Any], request: Request) -> list[Any]:
        lists = [local] + [a for a in answers.values() if isinstance(a, list)]
        return merge_list(name, lists, _int_arg(request, b"limit", 50, 1, 1000) if name == "files" else None)

    def summary(self, s: Any, request: Request) -> defer.Deferred:
        """Version, uptime and every counter."""
        stats = {f.name: (dict(v) if isinstance(v, dict) else v)
                 for f in dataclasses.fields(s.stats) if f.metadata.get("summary", True)
                 for v in [getattr(s.stats, f.name)]}
        factory = self.gateway.factory
        files, size = spool_usage(s.spool)

        def build(depth: Optional[int]) -> dict[str, Any]:
            return {
                "version": __version__,
                "started_at": iso(self.started),
                "uptime_s": round(s.clock.seconds() - self.started, 3),
                "accepting": s.accepting,
                "connections_open": len(factory.protocols) if factory is not None else 0,
                "sessions": len(s.sessions),
                "transfers": sum(1 for session in s.sessions.values() if session.transfer is not None),
                "outbox_depth": depth,
                "spool_files": files,
                "spool_bytes": size,
                "sinks": [sink.name for sink in s.sinks],
                "stats": stats,
            }

        # (None: the store did not answer, see "problems" in /healthz)
        return outbox_depth(s).addErrback(lambda f: None).addCallback(build)

    def sessions(self, s: Any, request: Request) -> list[dict[str, Any]]:
        """Live camera sessions, longest connected first."""
        now = s.clock.seconds()
        views = [session_view(session, now) for session in list(s.sessions.values())]
        return sorted(views, key=lambda v: v["connected_s"], reverse=True)

    def transfers(self, s: Any, request: Request) -> list[dict[str, Any]]:
        """Files being received, with progress."""
        return active_transfers(s)

    def files(self, s: Any, request: Request) -> list[dict[str, Any]]:
        """The latest stored files, newest first."""
        limit = _int_arg(request, b"limit", 50, 1, 1000)
        wanted = {key: _str_arg(request, key.encode()) for key in ("imei", "media", "camera")}
        out = []
        for received, places in reversed(list(s.recent)):
            if any(value is not None and getattr(received, key) != value for key, value in wanted.items()):
                continue
            out.append(file_view(received, places))
            if len(out) >= limit:
                break
        return out

    def partials(self, s: Any, request: Request) -> defer.Deferred:
        """Interrupted transfers kept for resuming, most recently seen first."""
        receiving = {session.transfer.partial.id for session in list(s.sessions.values())
                     if session.transfer is not None}

        def build(partials: list[Any]) -> list[dict[str, Any]]:
            views = [partial_view(p, receiving) for p in partials]
            return sorted(views, key=lambda v: v["last_seen"] or "", reverse=True)

        return defer.maybeDeferred(s.store.all).addCallback(build)

    def outbox(self, s: Any, request: Request) -> Any:
        """Files waiting for a sink (empty without an outbox)."""
        outbox = getattr(s, "outbox", None)
        if outbox is None:
            return []
        snapshot = getattr(outbox, "snapshot", None)
        if callable(snapshot):
            return defer.maybeDeferred(snapshot)
        pending = getattr(s.store, "pending", None)
        if not callable(pending):
            return []
        in_flight = getattr(outbox, "in_flight", None)
        return defer.maybeDeferred(pending).addCallback(
            lambda entries: [outbox_view(e, s.sinks, in_flight) for e in entries])

    def failures(self, s: Any, request: Request) -> list[dict[str, Any]]:
        """The latest failures, newest first."""
        return [dict(f, time=iso(f.get("time"))) for f in reversed(list(s.failures))]


class StatusSite(Site):
    """The status site: no access log (the page polls every 2 s)."""

    noisy = False

    def log(self, request: Request) -> None:
        """Requests are not logged."""
