"""The status web service's resources: JSON API, health, metrics, the page, stored files.

Routes (GET or HEAD, but the one POST that retries a dead letter)::

    /                  the status page (page.html, page.js, page.css)
    /api/summary       version, uptime, counters
    /api/sessions      live camera sessions
    /api/transfers     files being received, with progress
    /api/files         the history of stored files, newest first, from the store (?limit=, ?offset=,
                       ?imei=, ?camera=, ?kind=, ?media=, ?source=, ?trigger=, ?since=, ?until=;
                       header X-Total-Count); /api/files/<id> one of them
    /api/cameras       every camera seen, from the store (?q=, ?online=); /api/cameras/<imei> one
    /api/partials      interrupted transfers kept for resuming
    /api/outbox        files waiting for a sink
    /api/failures      the latest failures, with reasons
    /api/dead-letters  the files a sink refused, newest first
    /api/dead-letters/<id>/retry
                       POST: send a dead letter again to the sink that refused it
                       (with the header ``X-Camgateway: retry``)
    /api/refused       the cameras devices.allow refused, with counts
    /files/<id>        a stored file, by the id /api/files gives (never by path); Range honoured
    /files/<id>/poster a JPEG of a video's first picture (camgateway.web.media)
    /files/<id>/play   the video as H.264 and AAC in MP4, for browsers (camgateway.web.media)
    /metrics           Prometheus text format
    /healthz           200 when accepting cameras, recording files and delivering
                       them, else 503 with ``problems`` saying why (no token needed)

With ``http.token`` set, every route but ``/healthz`` wants
``Authorization: Bearer <token>`` or HTTP basic auth as user ``camgateway``
with the token as password (what a browser asks for).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import hmac
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from camgateway import __version__
from camgateway.base.reasons import reason
from camgateway.delivery.dead_letters import (DeadLetterError, NoSuchLetter, dead_letters, forget_letter,
                                              prepare_retry, valid_letter_id)
from camgateway.storage.records import FileQuery, IHistoryStore, ReceivedFile, file_name
from camgateway.web.media import BrowserMedia, MediaError, MediaFile, serve_file
from camgateway.web.metrics import CAMERA_KINDS, Metrics, dead_letter_count, outbox_state, spool_usage
from camgateway.web.progress import active_transfers, iso, session_view
from camgateway.web.merge import (WorkerPeers, merge_cameras, merge_files, merge_health, merge_list, merge_metrics,
                                  merge_summary)
from camgateway.web.views import camera_view, file_id, history_view, outbox_view, partial_view, stored_path

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
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; connect-src 'self'; "
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


def _later(request: Request, d: defer.Deferred, render: Callable[[Any], Any]) -> Any:
    """Finish ``request`` with ``render(result of d)``, unless the client went away (a ``render``
    that answers by itself returns NOT_DONE_YET). A :class:`MediaError` is answered with its code."""
    gone: list[bool] = []
    request.notifyFinish().addBoth(lambda _: gone.append(True))

    def ok(value: Any) -> None:
        if gone:
            return
        body = render(value)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()

    def failed(failure: Any) -> None:
        refused = failure.check(MediaError)
        if not refused:
            log.failure("status request {uri} failed", failure, uri=request.uri)
        if not gone:
            code, why = (failure.value.code, str(failure.value)) if refused else (500, "internal error")
            request.write(_json(request, {"error": why}, code))
            request.finish()

    d.addCallback(ok).addErrback(failed)
    return NOT_DONE_YET


#: ``limit`` of /api/files and /api/failures: at most, and by default.
LIMIT_MAX, FILES_LIMIT, FAILURES_LIMIT = 1000, 200, 50
#: ``limit`` at most when the gateway asks a worker (a page of the merged answer: offset + limit of each).
MERGE_LIMIT_MAX = 100_000
FILE_KINDS = ("photo", "video", "other")


class BadRequest(Exception):
    """A query a route cannot answer: 400, with this message."""


def _str_arg(request: Request, name: bytes) -> Optional[str]:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _whole(request: Request, name: str, default: int, low: int, high: int) -> int:
    """Query parameter ``name``: a whole number from ``low`` to ``high`` (``default`` when absent)."""
    text = _str_arg(request, name.encode())
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,12}", text) or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}, got {text[:40]!r}")
    return int(text)


def _moment(request: Request, name: str) -> Optional[float]:
    """Query parameter ``name``: an ISO 8601 time (UTC unless it says), as POSIX seconds."""
    text = _str_arg(request, name.encode())
    if text is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 time such as 2024-10-29T12:43:42Z, got {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _failures_limit(request: Request) -> int:
    """``/api/failures``'s ``?limit=``."""
    return _whole(request, "limit", FAILURES_LIMIT, 1, LIMIT_MAX)


def _choice(request: Request, name: str, choices: tuple[str, ...]) -> Optional[str]:
    text = _str_arg(request, name.encode())
    if text is not None and text not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}, got {text[:40]!r}")
    return text


def _online(s: Any, camera: Any) -> bool:
    """Whether a camera of the history is online: as the store says, else whether it has a session here."""
    return camera.online if camera.online is not None else camera.imei in s.sessions


def _from_gateway(request: Request) -> bool:
    """The request came over a worker's status socket: the gateway asks for its merged answer."""
    return isinstance(request.getHost(), UNIXAddress)


def file_query(request: Request) -> FileQuery:
    """``/api/files``'s query (:class:`BadRequest` saying which parameter is wrong)."""
    trigger: Optional[int | str] = _str_arg(request, b"trigger")
    if isinstance(trigger, str) and re.fullmatch(r"[0-9]{1,9}", trigger):
        trigger = int(trigger)
    query = FileQuery(
        limit=_whole(request, "limit", FILES_LIMIT, 1, MERGE_LIMIT_MAX if _from_gateway(request) else LIMIT_MAX),
        offset=_whole(request, "offset", 0, 0, 10 ** 9), imei=_str_arg(request, b"imei"),
        camera=_choice(request, "camera", CAMERA_KINDS), kind=_choice(request, "kind", FILE_KINDS),
        media=_str_arg(request, b"media"), source=_str_arg(request, b"source"), trigger=trigger,
        since=_moment(request, "since"), until=_moment(request, "until"))
    return query


# -- resources

class _Json(Resource):
    """A JSON route: ``fn(services, request)`` returns a value or a Deferred of one (a
    :class:`BadRequest` is a 400).

    With several workers, ``merge(local, answers, request)`` makes one answer of
    this process's and the other workers' (``{index: decoded JSON or None}``);
    without ``merge`` the answer is this process's alone (what every worker shares).
    """

    isLeaf = True

    def __init__(self, root: "StatusRoot", fn: Callable[[Any, Request], Any],
                 merge: Optional[Callable[[Any, dict[int, Any], Request], Any]] = None) -> None:
        super().__init__()
        self.root, self.fn, self.merge = root, fn, merge

    def render_GET(self, request: Request) -> Any:
        services = self.root.gateway.services
        if services is None:
            return _json(request, {"error": "the gateway is starting"}, 503)
        try:
            result: Any = self.fn(services, request)
        except BadRequest as e:
            return _json(request, {"error": str(e)}, 400)
        peers, merge = self.root.peers, self.merge
        if peers is not None and merge is not None:  # several workers: theirs too
            mine = result if isinstance(result, defer.Deferred) else defer.succeed(result)
            result = mine.addCallback(lambda local: peers.ask_all(request.uri, request).addCallback(
                lambda answers: merge(local, answers, request)))
        if isinstance(result, defer.Deferred):
            return _later(request, result, lambda value: self.body(request, value))
        return self.body(request, result)

    def body(self, request: Request, value: Any) -> bytes:
        """The answer to ``request`` of ``value``."""
        return _json(request, value)


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


def _from_worker(peers: WorkerPeers, request: Request) -> Any:
    """Answer ``request`` with a file another worker stored, streamed from it (404 when none has it)."""
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
    peers.stream_file(request.uri, request).addCallbacks(
        lambda found: None if gone else done(found), lambda f: None if gone else failed(f))
    return NOT_DONE_YET


def find_file(services: Any, wanted: str) -> defer.Deferred:
    """The stored file of id ``wanted`` on this machine, as the file routes serve it (a Deferred of a
    :class:`~camgateway.web.media.MediaFile`, None when it is unknown or not stored here).

    ``/files/<id>``, ``/files/<id>/poster`` and ``/files/<id>/play`` all find files here.
    """
    store = services.store
    if not IHistoryStore.providedBy(store):
        return defer.succeed(None)

    def found(f: Any) -> Optional[MediaFile]:
        if f is None:
            return None
        derived = {d.made_as: path for d in f.derived for path in [stored_path(d.places)]
                   if path is not None and d.made_as}
        path = stored_path(f.places) or derived.get("mp4") or derived.get("h264")  # (its camera's file not kept)
        if path is None:
            return None
        return MediaFile(f.id, path, f.record.get("media") or "unknown", dict(f.record.get("metadata") or {}),
                         derived)

    return store.file(wanted).addCallback(found)


class _FileRoute(Resource):
    """``/files/<id>`` (``what`` None), ``/files/<id>/poster`` or ``/files/<id>/play``."""

    isLeaf = True

    def __init__(self, root: "StatusRoot", wanted: str, what: Optional[str]) -> None:
        super().__init__()
        self.root, self.wanted, self.what = root, wanted, what

    def render_GET(self, request: Request) -> Any:
        services = self.root.gateway.services
        if services is None:
            return _json(request, {"error": "the gateway is starting"}, 503)

        def found(f: Optional[MediaFile]) -> Any:
            if f is None:
                return None
            if self.what is None:
                return f.path
            media = self.root.browser_media(services)
            return media.poster(f) if self.what == "poster" else media.play(f)

        def serve(path: Optional[Path]) -> Any:
            if path is not None:
                name = path.name if self.what is None else f"{self.wanted}.{'jpg' if self.what == 'poster' else 'mp4'}"
                serve_file(request, path, name)
                return NOT_DONE_YET
            if self.root.peers is not None:  # another worker's, maybe
                return _from_worker(self.root.peers, request)
            return _json(request, {"error": "no such file"}, 404)

        return _later(request, find_file(services, self.wanted).addCallback(found), serve)


class _Files(Resource):
    """``/files/<id>``, ``/files/<id>/poster``, ``/files/<id>/play``: files looked up by id (:func:`find_file`)."""

    def __init__(self, root: "StatusRoot") -> None:
        super().__init__()
        self.root = root

    def getChild(self, name: bytes, request: Request) -> Resource:
        rest = request.postpath or []
        if not name or len(rest) > 1 or (rest and rest[0] not in (b"poster", b"play")):
            return _Message(404, "no such file")
        return _FileRoute(self.root, name.decode("ascii", "replace"), rest[0].decode() if rest else None)

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


#: The header a dead letter's retry must carry: a cross-site form cannot send it.
RETRY_HEADER = (b"x-camgateway", b"retry")
#: How many retried dead letters each process remembers (a second retry of one is a 409).
RETRIED_KEPT = 1000


def letter_view(info: dict[str, Any]) -> dict[str, Any]:
    """A dead letter for the API (from its ``dead-letter.json``, see camgateway.delivery.dead_letters)."""
    entry = info.get("entry") or {}
    record = entry.get("record") or {}
    try:
        fid = file_id(ReceivedFile.from_record(record, Path(".")))
    except (KeyError, TypeError, ValueError):  # a record too old or too damaged to name the file
        fid = str(record.get("id") or entry.get("id") or "")
    name = file_name(record)
    return {"id": info["id"], "file_id": fid, "imei": record.get("imei"), "file": name,
            "source": record.get("source"), "sink": info.get("sink_name", info.get("sink")),
            "reason": info.get("reason"), "time": info.get("time"), "size": record.get("size"),
            "sha256": record.get("sha256"), "attempts": info.get("attempts")}


class _Retry(Resource):
    """``POST /api/dead-letters/<id>/retry``: the letter back into the outbox, for the sink that refused it."""

    isLeaf = True

    def __init__(self, root: "StatusRoot", letter_id: str) -> None:
        super().__init__()
        self.root, self.letter_id = root, letter_id

    def render(self, request: Request) -> Any:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return _json(request, {"error": "retry a dead letter with POST"}, 405)
        if (request.getHeader(RETRY_HEADER[0]) or b"").strip().lower() != RETRY_HEADER[1]:
            return _json(request, {"error": "send the header X-Camgateway: retry to retry a dead letter"}, 403)
        services = self.root.gateway.services
        if services is None:
            return _json(request, {"error": "the gateway is starting"}, 503)

        def retried(_: object) -> bytes:
            log.info("dead letter {id} retried from the status API", id=self.letter_id, event="dead_letter_retried")
            return _json(request, {"retried": self.letter_id})

        def refused(failure: Failure) -> bytes:
            if failure.check(NoSuchLetter):
                return _json(request, {"error": str(failure.value)}, 404)
            if failure.check(DeadLetterError):
                return _json(request, {"error": f"cannot retry {self.letter_id}: {failure.value}"}, 409)
            log.failure("status: retrying dead letter {id} failed", failure, id=self.letter_id)
            return _json(request, {"error": f"cannot retry {self.letter_id}: {reason(failure)}"}, 500)

        d = self.root.retry_letter(services, self.letter_id).addCallbacks(retried, refused)
        return _later(request, d, lambda body: body)


class _DeadLetters(Resource):
    """``/api/dead-letters`` and ``/api/dead-letters/<id>/retry``."""

    def __init__(self, root: "StatusRoot") -> None:
        super().__init__()
        self.root = root
        self.listing = _Json(root, root.dead_letters)  # one folder for every worker: asked once

    def getChild(self, name: bytes, request: Request) -> Resource:
        if not name:
            return self.listing
        if request.postpath != [b"retry"]:
            return _Message(404, "no such API route")
        return _Retry(self.root, name.decode("ascii", "replace"))

    def render_GET(self, request: Request) -> Any:
        return self.listing.render_GET(request)


class _History(_Json):
    """A route of the history: ``fn(services, request)`` gives a Deferred of ``(value, total)``:
    ``value`` None is a 404, ``total`` (None: none) is sent as ``X-Total-Count``."""

    def body(self, request: Request, answer: Any) -> bytes:
        value, total = answer
        if value is None:
            return _json(request, {"error": "not found"}, 404)
        if total is not None:
            request.setHeader(b"x-total-count", str(total).encode())
        return _json(request, value)


class _HistoryRoute(Resource):
    """``/api/<list>`` (``listing``) and ``/api/<list>/<key>`` (``one``)."""

    def __init__(self, root: "StatusRoot", listing: Callable[[Any, Request], defer.Deferred],
                 one: Callable[[Any, str, Request], defer.Deferred]) -> None:
        super().__init__()
        self.root, self.listing, self.one = root, _History(root, listing), one

    def getChild(self, name: bytes, request: Request) -> Resource:
        if not name and not request.postpath:
            return self.listing
        if request.postpath or not re.fullmatch(rb"[A-Za-z0-9_-]{1,64}", name):
            return _Message(404, "not found")
        key = name.decode("ascii")
        return _History(self.root, lambda services, request: self.one(services, key, request))

    def render_GET(self, request: Request) -> Any:
        return self.listing.render_GET(request)


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
        api.putChild(b"files", _HistoryRoute(self, self.files, self.file))
        api.putChild(b"cameras", _HistoryRoute(self, self.cameras, self.camera))
        for name, fn in (("sessions", self.sessions), ("transfers", self.transfers),
                         ("partials", self.partials), ("outbox", self.outbox), ("failures", self.failures),
                         ("refused", self.refused)):
            api.putChild(name.encode(), _Json(self, fn, functools.partial(self._all_lists, name)))
        api.putChild(b"dead-letters", _DeadLetters(self))
        #: Posters and browser-playable videos (made when the gateway's services exist).
        self.media: Optional[BrowserMedia] = None
        #: The dead letters this process retried: id -> when (a second retry is refused with 409).
        self.retried: collections.OrderedDict[str, float] = collections.OrderedDict()
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
        rest = request.postpath or []
        if request.method not in (b"GET", b"HEAD") and not (
                request.method == b"POST" and path == b"api" and len(rest) == 3
                and rest[0] == b"dead-letters" and rest[2] == b"retry"):
            return _Message(405, "only GET and HEAD (and POST to /api/dead-letters/<id>/retry)",
                            {b"allow": b"GET, HEAD"})
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
        services = self.gateway.services
        if services is not None and services.own_store:  # each worker's cameras in its own store
            for key in ("cameras", "cameras_online"):
                values = [local.get(key)] + [a.get(key) for a in answers.values() if isinstance(a, dict)]
                merged[key] = sum(v for v in values if isinstance(v, int)) if local.get(key) is not None else None
        if isinstance(local.get("health"), dict):
            health, _ = merge_health(local["health"], self.peers.state(), {
                i: a.get("health") if isinstance(a, dict) else None for i, a in answers.items()})
            warnings = {f"worker 0 {part}": why for part, why in local["health"].get("warnings", {}).items()}
            for i, a in sorted(answers.items()):
                if isinstance(a, dict) and isinstance(a.get("health"), dict):
                    warnings.update({f"worker {i} {part}": why for part, why in a["health"].get("warnings", {}).items()})
            merged["health"] = {"status": health["status"], "problems": health.get("problems", {}),
                                "warnings": warnings}
        return merged

    def _all_lists(self, name: str, local: list[Any], answers: dict[int, Any], request: Request) -> list[Any]:
        lists = [local] + [a for a in answers.values() if isinstance(a, list)]
        return merge_list(name, lists, _failures_limit(request) if name == "failures" else None)

    def summary(self, s: Any, request: Request) -> defer.Deferred:
        """Version, uptime and every counter."""
        stats = {f.name: (dict(v) if isinstance(v, dict) else v)
                 for f in dataclasses.fields(s.stats) if f.metadata.get("summary", True)
                 for v in [getattr(s.stats, f.name)]}
        factory = self.gateway.factory
        files, size = spool_usage(s.spool)
        letters = dead_letter_count(s.spool)

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
                "dead_letters": letters,
                "refused": len(s.refused),
            }

        # (None: the store did not answer, see "problems" in /healthz)
        return outbox_state(s).addCallbacks(lambda state: state[0], lambda f: None).addCallback(build).addCallback(
            self._with_history, s)

    def sessions(self, s: Any, request: Request) -> list[dict[str, Any]]:
        """Live camera sessions, longest connected first."""
        now = s.clock.seconds()
        views = [session_view(session, now) for session in list(s.sessions.values())]
        return sorted(views, key=lambda v: v["connected_s"], reverse=True)

    def transfers(self, s: Any, request: Request) -> list[dict[str, Any]]:
        """Files being received, with progress."""
        return active_transfers(s)

    # -- the history (files and cameras, from the store)

    def _asks_workers(self, s: Any, request: Request) -> bool:
        """Whether the workers' answers are needed: each has a store of its own (with a shared one,
        the history is the same in every worker and this process's answer is the whole one), and
        this is not the gateway asking a worker."""
        return self.peers is not None and s.own_store and not _from_gateway(request)

    def files(self, s: Any, request: Request) -> defer.Deferred:
        """One page of the history's files, newest first, and how many match (``X-Total-Count``)."""
        query = file_query(request)
        if not IHistoryStore.providedBy(s.store):
            return defer.succeed(([], 0))
        asks = self._asks_workers(s, request)
        # Each worker's store: the first offset + limit of each, merged, then the page.
        wide = dataclasses.replace(query, offset=0, limit=query.offset + query.limit) if asks else query
        local = s.store.files(wide).addCallback(lambda found: ([history_view(f) for f in found[0]], found[1]))
        if not asks:
            return local
        args = [(k, v) for k, values in request.args.items() if k not in (b"offset", b"limit") for v in values]
        path = b"/api/files?" + urllib.parse.urlencode(args + [(b"limit", str(wide.limit).encode())]).encode()
        return local.addCallback(lambda mine: self.peers.ask_all_counted(path, request).addCallback(
            lambda answers: merge_files([mine, *answers.values()], query.offset, query.limit)))

    def file(self, s: Any, wanted: str, request: Request) -> defer.Deferred:
        """One file of the history (a camera's, or one a sink made), None if unknown."""
        if not IHistoryStore.providedBy(s.store):
            return defer.succeed((None, None))

        def found(f: Any) -> Any:
            if f is not None:
                return history_view(f), None
            if not self._asks_workers(s, request):
                return None, None
            return self.peers.ask_all(f"/api/files/{wanted}".encode(), request).addCallback(
                lambda answers: (next((a for a in answers.values() if isinstance(a, dict)), None), None))

        return s.store.file(wanted).addCallback(found)

    def _camera_views(self, s: Any, cameras: list[Any]) -> list[dict[str, Any]]:
        return [camera_view(c, _online(s, c)) for c in cameras]

    def cameras(self, s: Any, request: Request) -> defer.Deferred:
        """Every camera seen (``?q=`` part of the IMEI, ``?online=true|false``), the latest seen first."""
        q = _str_arg(request, b"q")
        online = _choice(request, "online", ("true", "false"))
        if not IHistoryStore.providedBy(s.store):
            return defer.succeed(([], None))
        d = s.store.cameras(s.clock.seconds()).addCallback(lambda found: self._camera_views(s, found))
        if self._asks_workers(s, request):
            d.addCallback(lambda mine: self.peers.ask_all(b"/api/cameras", request).addCallback(
                lambda answers: merge_cameras([mine, *(a for a in answers.values() if isinstance(a, list))])))

        def pick(views: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], None]:
            views = [v for v in views if (not q or q in v["imei"])
                     and (online is None or v["online"] == (online == "true"))]
            views.sort(key=lambda v: (v["last_seen"] is not None, v["last_seen"] or "", v["imei"]), reverse=True)
            return views, None

        return d.addCallback(pick)

    def camera(self, s: Any, imei: str, request: Request) -> defer.Deferred:
        """One camera of the history, None if never seen."""
        if not IHistoryStore.providedBy(s.store):
            return defer.succeed((None, None))
        d = s.store.camera(imei, s.clock.seconds()).addCallback(
            lambda c: self._camera_views(s, [c]) if c is not None else [])
        if self._asks_workers(s, request):
            d.addCallback(lambda mine: self.peers.ask_all(f"/api/cameras/{imei}".encode(), request).addCallback(
                lambda answers: merge_cameras([mine, [a for a in answers.values() if isinstance(a, dict)]])))
        return d.addCallback(lambda views: (views[0] if views else None, None))

    def _with_history(self, summary: dict[str, Any], s: Any) -> Any:
        """The summary with the cameras seen and online, and the health as /healthz says."""
        body, _ = self.children[b"healthz"].local()
        summary["health"] = {"status": body["status"], "problems": body.get("problems", {}),
                             "warnings": body.get("warnings", {})}
        summary["cameras"] = summary["cameras_online"] = None  # (None: the store did not answer)
        if not IHistoryStore.providedBy(s.store):
            summary["cameras"] = summary["cameras_online"] = 0
            return summary

        def count(cameras: list[Any]) -> dict[str, Any]:
            summary["cameras"], summary["cameras_online"] = len(cameras), sum(1 for c in cameras if _online(s, c))
            return summary

        return s.store.cameras(s.clock.seconds()).addCallbacks(count, lambda f: summary)

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
        if s.outbox is None:
            return []
        in_flight = s.outbox.in_flight
        return defer.maybeDeferred(s.store.pending).addCallback(
            lambda entries: [outbox_view(e, s.sinks, in_flight) for e in entries])

    def refused(self, s: Any, request: Request) -> list[dict[str, Any]]:
        """The cameras ``devices.allow`` refused, the most recently refused first."""
        return [dict(item, last_at=iso(item["last_at"])) for item in reversed(list(s.refused))]

    def dead_letters(self, s: Any, request: Request) -> defer.Deferred:
        """The files a sink refused (every worker's: one folder), newest first."""
        return s.run_in_thread(dead_letters, s.spool).addCallback(
            lambda letters: [letter_view(info) for info in reversed(letters)])

    @defer.inlineCallbacks
    def retry_letter(self, s: Any, letter_id: str) -> Any:
        """Put dead letter ``letter_id`` back into the outbox for the sink that refused it, as
        ``camgateway dead-letters --retry`` does; :class:`NoSuchLetter`, or :class:`DeadLetterError` saying why not."""
        if not valid_letter_id(letter_id):
            raise NoSuchLetter(f"no dead letter {letter_id!r}")
        if letter_id in self.retried:
            raise DeadLetterError(f"it was retried at {iso(self.retried[letter_id])} and is back in the outbox")
        now = s.clock.seconds()
        self.retried[letter_id] = now  # (a second request meanwhile is refused)
        try:
            entry = yield s.run_in_thread(prepare_retry, s.spool, letter_id, now, [sink.name for sink in s.sinks])
            yield s.store.enqueue(entry, None)
        except BaseException:
            del self.retried[letter_id]
            raise
        while len(self.retried) > RETRIED_KEPT:
            self.retried.popitem(last=False)
        yield s.run_in_thread(forget_letter, s.spool, letter_id)
        if s.outbox is not None:
            s.outbox.kick()
        return letter_id

    def browser_media(self, s: Any) -> BrowserMedia:
        """What makes posters and browser-playable videos (camgateway.web.media), in ``<spool>/cache``."""
        if self.media is None:
            from twisted.internet import reactor

            ffmpeg = next((sink.ffmpeg for sink in s.sinks if isinstance(getattr(sink, "ffmpeg", None), str)), None)
            self.media = BrowserMedia(s.spool.root / "cache", s.run_in_thread,
                                      getattr(self.gateway, "reactor", None) or reactor, ffmpeg)
        return self.media

    def failures(self, s: Any, request: Request) -> list[dict[str, Any]]:
        """The latest failures, newest first (``?limit=``, 1 to 1000, default 50)."""
        limit = _failures_limit(request)
        return [dict(f, time=iso(f.get("time"))) for f in list(reversed(s.failures))[:limit]]


class StatusSite(Site):
    """The status site: no access log (the page polls every 2 s)."""

    noisy = False

    def log(self, request: Any) -> None:
        """Requests are not logged."""
