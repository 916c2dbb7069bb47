"""A store shared by several gateway instances: partials and the outbox in Redis.

:class:`RedisStore` implements :class:`~camgateway.storage.records.IResumeStore`
and :class:`~camgateway.delivery.outbox.IOutboxStore` with the semantics of
:class:`~camgateway.storage.sqlite.SQLiteStore`, so that instances behind one
TCP load balancer act as one gateway. Every command runs on the store's own
one-thread pool (redis-py is blocking), so the reactor never waits on the
network and commands run in the order they were issued, as with SQLite.
Every step that touches more than one key is a Lua script, so it is atomic.
A standalone Redis (or one managed by Sentinel) is required: the scripts
build key names, which Redis Cluster does not allow.

Keys (``P`` is the ``prefix``, ``camgateway`` by default)::

    P:partial:<id>          hash: the Partial's fields (identifier as hex,
                            meta_timestamp absent when None) and ``identity``
    P:partials:identity     hash: "<imei>:<flow>:<identifier hex>" -> id,
                            the unique index that ``find`` and ``add`` use
    P:partials:last_seen    sorted set: id scored by last_seen (``expired``)
    P:outbox:<id>           hash: the OutboxEntry's fields (record as JSON,
                            last_error absent when None); ``missing:<instance>``
                            and ``missing_since`` while its spool file is not
                            in the spool of some instance (see below)
    P:outbox:due            sorted set: id scored by next_attempt (``due``)
    P:claim:<id>            string: the instance delivering the entry, PX claim_ttl
    P:lease:<imei>          string: the instance holding the camera's session, PX ttl
    P:takeover:<instance>   set: IMEIs another instance asks ``instance`` to let go
    P:instances             hash: instance -> JSON (its spool path, its host)
    P:instances:alive       sorted set: instance scored by when its registration
                            expires (ms, Redis's clock)
    P:file:<id>             hash: a file of the history: ``record`` (JSON), ``status``,
                            ``received_at``, ``stored_at``, ``parent`` (the camera's
                            file a sink made it from, or empty), ``places`` and
                            ``derived`` (ids of the files made from it) and ``idx``
                            (the index keys it is in), each NUL-separated
    P:files:time            sorted set: camera files' ids by received_at
    P:files:by:<f>:<value>  sorted set: the same, per value of imei, camera, kind,
                            media, source, trigger and trigger_name (the filters)
    P:cameras               hash: IMEI -> JSON of the camera's record (first and
                            last seen, files, position, last error)

Several instances: ``due`` claims what it returns for this ``instance``
(``P:claim:<id>``, expiring after ``claim_ttl``), skipping entries another
live instance has claimed, so no entry is delivered by two instances at once.
``update`` and ``replace`` release the claim; while an entry is out, the store
renews its claims every ``claim_ttl / 3``; ``close`` releases them. Claims of
an instance that dies expire and its entries go to the next instance whose
``due`` sees them. ``due`` gives an instance back the entries it has claimed
itself (unless excluded), as the other stores do, so a restarted instance
under the same name takes its entries back at once: give each instance a
stable name unique among those running (the default is unique per process).

Spool files an instance does not have: with ``spool_dir`` (the gateway gives
its spool's ``partials/``), ``due`` hands out only entries whose spool file is
there. Any other entry it claimed is released at once, not delivered, and
marked ``missing:<instance>`` (logged the first time, with the reason: the
spool is not shared); ``due`` skips the entries this instance marked for
``unreadable_after / 2``, then looks again. An instance that has the file
claims it meanwhile and delivers it, with no failed attempt counted. An entry
that every running instance (see :meth:`RedisStore.register`) has marked is,
once ``unreadable_after`` has passed since the first mark, handed out with
its reason in :attr:`RedisStore.unreadable`: the outbox makes it a dead letter
(camgateway.delivery.outbox) instead of delivering it. A delivery attempt (``update``)
clears the marks.

Durability: Redis keeps what persistence allows. For the promise the gateway
makes to cameras (a file acknowledged is never lost) the operator must enable
the append-only file: ``appendonly yes`` with ``appendfsync everysec`` (at most
about a second of writes lost on a power cut) or ``always``. The store checks
at start and logs a warning when it is off (or that it could not check, when
CONFIG is disabled). The partials and entries of the shared store name spool
files that only a shared spool makes reachable from every instance
(camgateway.runtime.shared_spool checks that it is).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, cast

from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from camgateway.storage.records import (DAY, CameraRecord, CameraSighting, FileEvent, FileQuery, IHistoryStore,
                                        IOutboxStore, IResumeStore, OutboxEntry, Partial, StoredFile, history_columns,
                                        remove_files, sweep_in_batches)

__all__ = ["RedisStore"]

log = Logger(namespace="camgateway.storage.redis")
T = TypeVar("T")

_COMMON = """
local P = ARGV[1]
local function drop_partial(id)
  local key = P .. 'partial:' .. id
  local identity = redis.call('HGET', key, 'identity')
  if identity and redis.call('HGET', P .. 'partials:identity', identity) == id then
    redis.call('HDEL', P .. 'partials:identity', identity)
  end
  redis.call('DEL', key)
  redis.call('ZREM', P .. 'partials:last_seen', id)
end
local function put_entry(i)
  local id, n = ARGV[i], tonumber(ARGV[i + 2])
  local key = P .. 'outbox:' .. id
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(ARGV, i + 3, i + 2 + n))
  redis.call('ZADD', P .. 'outbox:due', ARGV[i + 1], id)
  return i + 3 + n
end
local function release(id, instance)
  local claim = P .. 'claim:' .. id
  if redis.call('GET', claim) == instance then redis.call('DEL', claim) end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# ARGV: P, id, identity, last_seen, field, value, ...
_ADD = _COMMON + """
local old = redis.call('HGET', P .. 'partials:identity', ARGV[3])
if old then drop_partial(old) end
drop_partial(ARGV[2])
redis.call('HSET', P .. 'partial:' .. ARGV[2], unpack(ARGV, 5))
redis.call('HSET', P .. 'partials:identity', ARGV[3], ARGV[2])
redis.call('ZADD', P .. 'partials:last_seen', ARGV[4], ARGV[2])
"""

# ARGV: P, identity
_FIND = _COMMON + """
local id = redis.call('HGET', P .. 'partials:identity', ARGV[2])
if not id then return false end
return redis.call('HGETALL', P .. 'partial:' .. id)
"""

# ARGV: P, id, held, boot_id, now
_CHECKPOINT = _COMMON + """
local key = P .. 'partial:' .. ARGV[2]
if redis.call('EXISTS', key) == 1 then
  redis.call('HSET', key, 'held', ARGV[3], 'boot_id', ARGV[4], 'last_seen', ARGV[5])
  redis.call('ZADD', P .. 'partials:last_seen', ARGV[5], ARGV[2])
end
"""

# ARGV: P, id
_REMOVE = _COMMON + "drop_partial(ARGV[2])"

# ARGV: P, has partial ("0"/"1"), partial id, entry
_ENQUEUE = _COMMON + """
put_entry(4)
if ARGV[2] == '1' then drop_partial(ARGV[3]) end
"""

# ARGV: P, instance, now, limit, claim ttl ms, look again at entries marked before, excluded id, ...
_DUE = _COMMON + """
local excluded = {}
for i = 7, #ARGV do excluded[ARGV[i]] = true end
local limit = tonumber(ARGV[4])
local again = tonumber(ARGV[6])
local mark = 'missing:' .. ARGV[2]
-- an entry whose spool file this instance did not find is left to the others until ``again``
local function left(id)
  if excluded[id] then return true end
  local marked = redis.call('HGET', P .. 'outbox:' .. id, mark)
  return marked and tonumber(marked) > again
end
local out = {}
local batch = limit + (#ARGV - 6) + 16
local offset = 0
while #out < limit do
  local ids = redis.call('ZRANGEBYSCORE', P .. 'outbox:due', '-inf', ARGV[3], 'LIMIT', offset, batch)
  for _, id in ipairs(ids) do
    if not left(id) then
      local claim = P .. 'claim:' .. id
      local holder = redis.call('GET', claim)
      if not holder or holder == ARGV[2] then
        redis.call('SET', claim, ARGV[2], 'PX', ARGV[5])
        out[#out + 1] = redis.call('HGETALL', P .. 'outbox:' .. id)
        if #out >= limit then break end
      end
    end
  end
  if #ids < batch then break end
  offset = offset + batch
end
return out
"""

# ARGV: P, instance, id, next_attempt, sink, attempts, has last_error ("0"/"1"), last_error
_UPDATE = _COMMON + """
local key = P .. 'outbox:' .. ARGV[3]
if redis.call('EXISTS', key) == 1 then
  redis.call('HSET', key, 'sink', ARGV[5], 'attempts', ARGV[6], 'next_attempt', ARGV[4])
  if ARGV[7] == '1' then redis.call('HSET', key, 'last_error', ARGV[8])
  else redis.call('HDEL', key, 'last_error') end
  redis.call('ZADD', P .. 'outbox:due', ARGV[4], ARGV[3])
  if redis.call('HEXISTS', key, 'missing_since') == 1 then  -- an instance had the file: forget the marks
    for _, field in ipairs(redis.call('HKEYS', key)) do
      if field == 'missing_since' or string.sub(field, 1, 8) == 'missing:' then redis.call('HDEL', key, field) end
    end
  end
end
release(ARGV[3], ARGV[2])
"""

# ARGV: P, instance, now, unreadable after, id, ...  -> {id, "first"|"again"|"unreadable"|"gone", missing_since}
_MISSING = _COMMON + """
local now, after = tonumber(ARGV[3]), tonumber(ARGV[4])
local running = redis.call('ZRANGEBYSCORE', P .. 'instances:alive', '(' .. now_ms(), '+inf')
local out = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local key = P .. 'outbox:' .. id
  if redis.call('EXISTS', key) == 0 then
    release(id, ARGV[2])
    out[#out + 1] = {id, 'gone', ''}
  else
    local first = redis.call('HSET', key, 'missing:' .. ARGV[2], ARGV[3])
    redis.call('HSETNX', key, 'missing_since', ARGV[3])
    local since = redis.call('HGET', key, 'missing_since')
    local everyone = true
    for _, name in ipairs(running) do
      if redis.call('HEXISTS', key, 'missing:' .. name) == 0 then everyone = false break end
    end
    if everyone and now - tonumber(since) >= after then
      out[#out + 1] = {id, 'unreadable', since}  -- the claim stays: this instance dead-letters it
    else
      release(id, ARGV[2])
      out[#out + 1] = {id, first == 1 and 'first' or 'again', since}
    end
  end
end
return out
"""

# ARGV: P, instance, ttl ms, JSON
_REGISTER = _COMMON + """
redis.call('ZADD', P .. 'instances:alive', now_ms() + tonumber(ARGV[3]), ARGV[2])
redis.call('HSET', P .. 'instances', ARGV[2], ARGV[4])
"""

# ARGV: P  -> the running instances' hash (those whose registration expired are forgotten)
_INSTANCES = _COMMON + """
for _, name in ipairs(redis.call('ZRANGEBYSCORE', P .. 'instances:alive', '-inf', now_ms())) do
  redis.call('ZREM', P .. 'instances:alive', name)
  redis.call('HDEL', P .. 'instances', name)
end
return redis.call('HGETALL', P .. 'instances')
"""

# ARGV: P, instance
_UNREGISTER = _COMMON + """
redis.call('ZREM', P .. 'instances:alive', ARGV[2])
redis.call('HDEL', P .. 'instances', ARGV[2])
"""

# ARGV: P, instance, old id, number of entries, entry, ...
_REPLACE = _COMMON + """
redis.call('DEL', P .. 'outbox:' .. ARGV[3])
redis.call('ZREM', P .. 'outbox:due', ARGV[3])
release(ARGV[3], ARGV[2])
local i = 5
for _ = 1, tonumber(ARGV[4]) do i = put_entry(i) end
"""

# ARGV: P, instance, claim ttl ms, id, ...  -> ids claimed by another instance, ids gone
_RENEW = _COMMON + """
local lost, gone = {}, {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local claim = P .. 'claim:' .. id
  local holder = redis.call('GET', claim)
  if redis.call('EXISTS', P .. 'outbox:' .. id) == 0 then
    gone[#gone + 1] = id
    if holder == ARGV[2] then redis.call('DEL', claim) end
  elseif holder == ARGV[2] or not holder then
    redis.call('SET', claim, ARGV[2], 'PX', ARGV[3])
  else
    lost[#lost + 1] = id
  end
end
return {lost, gone}
"""

# ARGV: P, instance, id, ...
_RELEASE = _COMMON + "for i = 3, #ARGV do release(ARGV[i], ARGV[2]) end"

_HISTORY = _COMMON + """
local function has(list, item)
  for x in string.gmatch(list, '[^%z]+') do if x == item then return true end end
  return false
end
local function append(list, item)
  if has(list, item) then return list end
  if list == '' then return item end
  return list .. '\\0' .. item
end
-- a camera's news (a CameraRecord of what one file or one session tells, as JSON) taken into its record
local function merge(news)
  local d = cjson.decode(news)
  local raw = redis.call('HGET', P .. 'cameras', d.imei)
  local c = raw and cjson.decode(raw) or {imei = d.imei, files_total = 0}
  c.files_total = (c.files_total or 0) + d.files_total
  if d.first_seen and (not c.first_seen or d.first_seen < c.first_seen) then c.first_seen = d.first_seen end
  for _, k in ipairs({'last_seen', 'last_file_at'}) do
    if d[k] and (not c[k] or d[k] > c[k]) then c[k] = d[k] end
  end
  for _, k in ipairs({'camera', 'peer', 'last_error', 'last_error_at'}) do
    if d[k] then c[k] = d[k] end
  end
  if d.position_at and (not c.position_at or d.position_at >= c.position_at) then
    c.latitude, c.longitude, c.position_at = d.latitude, d.longitude, d.position_at
  end
  redis.call('HSET', P .. 'cameras', c.imei, cjson.encode(c))
end
"""

# ARGV: P, id, parent, at, place, status, retried, then a file: record, received_at, idx, its camera's news,
# then any number of files made from it: id, record, received_at, idx
_NOTE_FILE = _HISTORY + """
local function insert(id, parent, record, received, idx, news)
  local key = P .. 'file:' .. id
  if redis.call('EXISTS', key) == 1 then return end
  if parent ~= '' and redis.call('EXISTS', P .. 'file:' .. parent) == 0 then return end  -- its original is swept
  redis.call('HSET', key, 'id', id, 'record', record, 'status', 'delivering', 'places', '', 'received_at', received,
             'parent', parent, 'derived', '', 'idx', idx)
  if parent ~= '' then
    local pkey = P .. 'file:' .. parent
    redis.call('HSET', pkey, 'derived', append(redis.call('HGET', pkey, 'derived') or '', id))
    return
  end
  redis.call('ZADD', P .. 'files:time', received, id)
  for k in string.gmatch(idx, '[^%z]+') do redis.call('ZADD', P .. k, received, id) end
  merge(news)
end
local function set_status(id, status, retried, at, place)
  local key = P .. 'file:' .. id
  if redis.call('EXISTS', key) == 0 then return end
  local current = redis.call('HGET', key, 'status')
  local new = current
  if status ~= '' and status ~= current and not (status == 'stored' and current == 'dead-letter' and retried ~= '1') then
    new = status
  end
  if new ~= current then redis.call('HSET', key, 'status', new) end
  if new ~= 'delivering' and redis.call('HEXISTS', key, 'stored_at') == 0 then redis.call('HSET', key, 'stored_at', at) end
  if place ~= '' then redis.call('HSET', key, 'places', append(redis.call('HGET', key, 'places'), place)) end
end
local id, parent, at = ARGV[2], ARGV[3], ARGV[4]
insert(id, parent, ARGV[8], ARGV[9], ARGV[10], ARGV[11])
set_status(id, ARGV[6], ARGV[7], at, ARGV[5])
if parent ~= '' and ARGV[6] ~= '' then set_status(parent, ARGV[6], ARGV[7], at, '') end
local root = parent ~= '' and parent or id
for i = 12, #ARGV, 4 do insert(ARGV[i], root, ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]) end
"""

# ARGV: P, the camera's news
_NOTE_CAMERA = _HISTORY + "merge(ARGV[2])"

# ARGV: P, since, until, offset, limit, scratch key, index key, ...  -> {total, {file hash, {derived hash, ...}}, ...}
_FILES = _HISTORY + """
local key = P .. 'files:time'
local n = #ARGV - 6
if n == 1 then key = P .. ARGV[7] end
if n > 1 then
  key = P .. ARGV[6]
  local args = {key, n}
  for i = 7, #ARGV do args[#args + 1] = P .. ARGV[i] end
  args[#args + 1] = 'AGGREGATE'
  args[#args + 1] = 'MAX'
  redis.call('ZINTERSTORE', unpack(args))
end
local total = redis.call('ZCOUNT', key, ARGV[2], ARGV[3])
local ids = redis.call('ZREVRANGEBYSCORE', key, ARGV[3], ARGV[2], 'LIMIT', ARGV[4], ARGV[5])
if n > 1 then redis.call('DEL', key) end
local out = {total}
for _, id in ipairs(ids) do
  local f = redis.call('HGETALL', P .. 'file:' .. id)
  local made = {}
  for child in string.gmatch(redis.call('HGET', P .. 'file:' .. id, 'derived') or '', '[^%z]+') do
    made[#made + 1] = redis.call('HGETALL', P .. 'file:' .. child)
  end
  out[#out + 1] = {id, f, made}
end
return out
"""

# ARGV: P, id  -> {id, file hash, {derived hash, ...}} or false
_FILE = _HISTORY + """
local f = redis.call('HGETALL', P .. 'file:' .. ARGV[2])
if #f == 0 then return false end
local made = {}
for child in string.gmatch(redis.call('HGET', P .. 'file:' .. ARGV[2], 'derived') or '', '[^%z]+') do
  made[#made + 1] = redis.call('HGETALL', P .. 'file:' .. child)
end
return {ARGV[2], f, made}
"""

# ARGV: P, before (exclusive), batch  -> how many camera files were forgotten
_SWEEP_HISTORY = _HISTORY + """
local ids = redis.call('ZRANGEBYSCORE', P .. 'files:time', '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local key = P .. 'file:' .. id
  for k in string.gmatch(redis.call('HGET', key, 'idx') or '', '[^%z]+') do redis.call('ZREM', P .. k, id) end
  for child in string.gmatch(redis.call('HGET', key, 'derived') or '', '[^%z]+') do
    redis.call('DEL', P .. 'file:' .. child)
  end
  redis.call('DEL', key)
  redis.call('ZREM', P .. 'files:time', id)
end
return #ids
"""


def _num(value: float) -> str:
    """A number as Redis and Python both read back exactly."""
    return repr(float(value))


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


def _hash(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2]))


def _identity(imei: str, flow: str, identifier: bytes) -> str:
    return f"{imei}:{flow}:{identifier.hex()}"


def _partial_fields(p: Partial) -> list[str]:
    fields = {"id": p.id, "imei": p.imei, "flow": p.flow, "identifier": p.identifier.hex(),
              "total": str(p.total), "start_crc": str(p.start_crc), "held": str(p.held), "boot_id": p.boot_id,
              "spool_name": p.spool_name, "first_seen": _num(p.first_seen), "last_seen": _num(p.last_seen),
              "identity": _identity(p.imei, p.flow, p.identifier)}
    if p.meta_timestamp is not None:
        fields["meta_timestamp"] = p.meta_timestamp
    return [x for item in fields.items() for x in item]


def _partial(h: dict[str, str]) -> Partial:
    return Partial(h["id"], h["imei"], h["flow"], bytes.fromhex(h["identifier"]), int(h["total"]),
                   int(h["start_crc"]), h.get("meta_timestamp"), int(h["held"]), h["boot_id"], h["spool_name"],
                   float(h["first_seen"]), float(h["last_seen"]))


def _entry_args(e: OutboxEntry) -> list[str]:
    fields = {"id": e.id, "spool_name": e.spool_name, "sink": str(e.sink), "attempts": str(e.attempts),
              "next_attempt": _num(e.next_attempt), "record": json.dumps(e.record), "created": _num(e.created)}
    if e.last_error is not None:
        fields["last_error"] = e.last_error
    flat = [x for item in fields.items() for x in item]
    return [e.id, _num(e.next_attempt), str(len(flat))] + flat


def _entry(h: dict[str, str]) -> OutboxEntry:
    return OutboxEntry(h["id"], h["spool_name"], int(h["sink"]), int(h["attempts"]), float(h["next_attempt"]),
                       h.get("last_error"), json.loads(h["record"]), float(h["created"]))


#: Files a step of the history sweep forgets at most (one script: Redis serves nothing else meanwhile).
_SWEEP_BATCH = 500


def _index_key(name: str, value: Any) -> str:
    """The sorted set of the camera files whose ``name`` (a filter) is ``value``, under the prefix."""
    return f"files:by:{name}:{value}"


def _history_file(record: Any) -> list[str]:
    """A file's arguments of the note_file script: record, received_at, its index keys."""
    idx = "\0".join(_index_key(name, value) for name, value in history_columns(record).items() if value is not None)
    return [json.dumps(record), _num(float(record.get("received_at") or 0.0)), idx]


def _news(imei: str, tell: Callable[[CameraRecord, Any], None], what: Any) -> str:
    """What a file (``tell``: :meth:`CameraRecord.count_file`) or a sighting (:meth:`CameraRecord.saw`) tells
    of camera ``imei``, as the history scripts ``merge`` it into its record: the fields it sets."""
    news = CameraRecord(imei)
    tell(news, what)
    return json.dumps({k: v for k, v in news.stored_fields().items() if v is not None})


def _stored(file_id: str, flat: list[str], made: list[list[str]]) -> StoredFile:
    h = _hash(flat)
    stored_at = h.get("stored_at")
    f = StoredFile(file_id, json.loads(h["record"]), h["status"], [p for p in h.get("places", "").split("\0") if p],
                   float(h["received_at"]), float(stored_at) if stored_at else None, h.get("parent") or None)
    for child in made:
        if child:
            c = _hash(child)
            f.derived.append(_stored(c["id"], child, []))
    return f


def _camera(text: str) -> CameraRecord:
    values = json.loads(text)
    known = {f.name for f in dataclasses.fields(CameraRecord)}
    camera = CameraRecord(**{k: v for k, v in values.items() if k in known})
    camera.files_total = int(camera.files_total)
    return camera


def default_instance() -> str:
    """A name unique to this process: ``host-pid-random``."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@implementer(IResumeStore, IOutboxStore, IHistoryStore)
class RedisStore:
    """Partials and the outbox in a Redis shared by several instances (see the module)."""

    #: IOutboxStore.shared
    shared = True

    def __init__(self, url: str, reactor: Any = None, prefix: str = "camgateway", instance: Optional[str] = None,
                 claim_ttl: float = 300.0, spool_dir: Optional[Path] = None,
                 unreadable_after: Optional[float] = None) -> None:
        """``spool_dir``: the folder of this instance's spool files, for ``due`` to hand out only
        entries whose file is there; ``unreadable_after`` (default ``claim_ttl``): how long an
        entry no running instance can read waits before it is given up (see the module)."""
        import redis  # only for those who use this store

        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if claim_ttl <= 0:
            raise ValueError("claim_ttl must be positive")
        self._reactor = reactor
        self.prefix = prefix
        self.instance = instance or default_instance()
        self.claim_ttl = claim_ttl
        self.spool_dir = None if spool_dir is None else str(spool_dir)
        self.unreadable_after = claim_ttl if unreadable_after is None else unreadable_after
        #: Entries claimed by this instance whose spool file no running instance has: id -> the
        #: reason. The outbox makes them dead letters instead of delivering them.
        self.unreadable: dict[str, str] = {}
        # URL options (?socket_timeout=...) override these defaults.
        self.client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10.0,
                                           socket_connect_timeout=5.0, health_check_interval=30)
        self._scripts = {name: self.client.register_script(src) for name, src in (
            ("add", _ADD), ("find", _FIND), ("checkpoint", _CHECKPOINT), ("remove", _REMOVE),
            ("enqueue", _ENQUEUE), ("due", _DUE), ("update", _UPDATE), ("replace", _REPLACE),
            ("renew", _RENEW), ("release", _RELEASE), ("missing", _MISSING), ("register", _REGISTER),
            ("instances", _INSTANCES), ("unregister", _UNREGISTER), ("note_file", _NOTE_FILE),
            ("note_camera", _NOTE_CAMERA), ("files", _FILES), ("file", _FILE), ("sweep_history", _SWEEP_HISTORY))}
        self._claimed: set[str] = set()  # entries this instance claimed and has not released
        self._closed = False
        self._pool = ThreadPool(1, 1, name="camgateway-redis-store")
        self._pool.start()
        self._renewal = task.LoopingCall(self.renew_claims)
        self._renewal.clock = reactor
        self._renewal.start(claim_ttl / 3, now=False)
        self.persistence = self.check_persistence()

    def key(self, *parts: str) -> str:
        """A key under this store's prefix."""
        return ":".join((self.prefix,) + parts)

    def _run(self, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        if self._closed:
            return fail(RuntimeError("the Redis store is closed"))
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def _call(self, name: str, *args: Any) -> Any:
        """Run script ``name`` with ``args`` after the prefix (store thread)."""
        return self._scripts[name](args=[self.prefix + ":", *args])

    def _script(self, name: str, *args: Any) -> "Deferred[Any]":
        return self._run(self._call, name, *args)

    # -- start-up check

    def check_persistence(self) -> "Deferred[str]":
        """Log whether Redis keeps writes across a restart: "aof", "no-aof", "fsync-off" or "unknown"."""
        def ask() -> tuple[str, str]:
            try:
                config = self.client.config_get("append*")
            except Exception as e:  # CONFIG renamed, forbidden by ACL, or Redis unreachable
                return "unknown", f"{type(e).__name__}: {e}"
            if config.get("appendonly") != "yes":
                return "no-aof", ""
            if config.get("appendfsync") not in ("always", "everysec"):
                return "fsync-off", str(config.get("appendfsync") or "")
            return "aof", str(config.get("appendfsync") or "")

        def report(result: tuple[str, str]) -> str:
            state, detail = result
            if state == "unknown":
                log.warn("could not check the persistence of Redis ({detail}): enable 'appendonly yes' with"
                         " 'appendfsync everysec' or 'always', or acknowledged files may be lost", detail=detail)
            elif state == "no-aof":
                log.warn("Redis has 'appendonly no': partials and the outbox are lost if Redis restarts;"
                         " set 'appendonly yes' with 'appendfsync everysec' or 'always'")
            elif state == "fsync-off":
                log.warn("Redis has 'appendfsync {detail}': set 'everysec' or 'always' so that a power cut"
                         " loses at most a second of the outbox", detail=detail)
            else:
                log.info("Redis store ready (append-only file, appendfsync {detail}), instance {instance}",
                         detail=detail, instance=self.instance)
            return state

        return self._run(ask).addCallback(report)

    # -- IResumeStore

    def find(self, imei: str, flow: str, identifier: bytes) -> "Deferred[Optional[Partial]]":
        d = self._script("find", _identity(imei, flow, identifier))
        return d.addCallback(lambda flat: _partial(_hash(flat)) if flat else None)

    def add(self, partial: Partial) -> "Deferred[None]":
        identity = _identity(partial.imei, partial.flow, partial.identifier)
        d = self._script("add", partial.id, identity, _num(partial.last_seen), *_partial_fields(partial))
        return d.addCallback(lambda _: None)

    def checkpoint(self, partial_id: str, held: int, boot_id: str, now: float) -> "Deferred[None]":
        return self._script("checkpoint", partial_id, str(held), boot_id, _num(now)).addCallback(lambda _: None)

    def remove(self, partial_id: str) -> "Deferred[None]":
        return self._script("remove", partial_id).addCallback(lambda _: None)

    def _hashes(self, index: str, high: str, kind: str) -> list[dict[str, str]]:
        """The hashes of the ids in sorted set ``index`` scored up to ``high``, read in chunks."""
        ids = self.client.zrangebyscore(self.key(index), "-inf", high)
        found: list[dict[str, str]] = []
        for start in range(0, len(ids), 500):
            pipe = self.client.pipeline(transaction=False)
            for i in ids[start:start + 500]:
                pipe.hgetall(self.key(kind, cast(str, i)))  # (the client decodes responses)
            found.extend(h for h in pipe.execute() if h)  # skip those removed meanwhile
        return found

    def all(self) -> "Deferred[list[Partial]]":
        d = self._run(self._hashes, "partials:last_seen", "+inf", "partial")
        return d.addCallback(lambda hs: sorted(map(_partial, hs), key=lambda p: p.first_seen))

    def expired(self, before: float) -> "Deferred[list[Partial]]":
        d = self._run(self._hashes, "partials:last_seen", "(" + _num(before), "partial")
        return d.addCallback(lambda hs: sorted((p for p in map(_partial, hs) if p.last_seen < before),
                                               key=lambda p: p.last_seen))

    def close(self) -> "Deferred[None]":
        """Release this instance's claims, disconnect and stop the thread."""
        if self._closed:
            return succeed(None)
        if self._renewal.running:
            self._renewal.stop()
        claimed, self._claimed = sorted(self._claimed), set()

        def shut() -> None:
            try:
                if claimed:
                    self._call("release", self.instance, *claimed)
            except Exception as e:
                log.warn("could not release outbox claims on close (they expire): {e}", e=e)
            finally:
                self.client.close()

        d = self._run(shut)
        self._closed = True
        def stop_thread(result: object) -> object:
            self._pool.stop()
            return result

        d.addBoth(stop_thread)
        return d

    # -- IOutboxStore

    def enqueue(self, entry: OutboxEntry, partial_id: Optional[str]) -> "Deferred[None]":
        flag = "0" if partial_id is None else "1"
        return self._script("enqueue", flag, partial_id or "", *_entry_args(entry)).addCallback(lambda _: None)

    def due(self, now: float, limit: int, exclude: frozenset) -> "Deferred[list[OutboxEntry]]":
        if limit <= 0:
            return succeed([])

        def claimed(result: tuple[list[OutboxEntry], list[tuple[OutboxEntry, str, str]]]) -> list[OutboxEntry]:
            entries, missing = result
            for e, verdict, since in missing:
                if verdict == "unreadable":
                    entries.append(e)
                    self.unreadable[e.id] = (
                        f"spool file {e.spool_name} is in the spool of no running instance (looked for since"
                        f" {now - float(since):.0f} s): is the spool shared?")
                elif verdict == "first":
                    log.warn("outbox entry {id} (camera {imei} {source}): spool file {name} is not in this"
                             " instance's spool: is the spool shared? Left to the instance that has it",
                             id=e.id, imei=e.record.get("imei"), source=e.record.get("source"), name=e.spool_name,
                             folder=self.spool_dir, event="spool_file_not_here")
            self._claimed.update(e.id for e in entries)
            return entries

        return self._run(self._due, now, limit, exclude).addCallback(claimed)

    def _due(self, now: float, limit: int,
             exclude: frozenset) -> tuple[list[OutboxEntry], list[tuple[OutboxEntry, str, str]]]:
        """Claim due entries; sort out those whose spool file is not here (store thread)."""
        entries: list[OutboxEntry] = []
        missing: list[tuple[OutboxEntry, str, str]] = []
        skip = set(exclude)
        for _ in range(4):  # those missing here are released and skipped from now on: claim others instead
            wanted = limit - len(entries)
            rows = self._call("due", self.instance, _num(now), str(wanted), str(_ms(self.claim_ttl)),
                              _num(now - self.unreadable_after / 2), *sorted(skip))
            got = [_entry(_hash(row)) for row in rows if row]
            if self.spool_dir is None:
                return got, missing
            absent = {e.id: e for e in got if not os.path.exists(os.path.join(self.spool_dir, e.spool_name))}
            entries.extend(e for e in got if e.id not in absent)
            if not absent:
                break
            verdicts = self._call("missing", self.instance, _num(now), _num(self.unreadable_after), *absent)
            missing.extend((absent[entry_id], verdict, since) for entry_id, verdict, since in verdicts
                           if verdict != "gone")
            if len(got) < wanted:
                break
            skip.update(e.id for e in got)
        return entries, missing

    def update(self, entry: OutboxEntry) -> "Deferred[None]":
        self._claimed.discard(entry.id)
        has_error = "0" if entry.last_error is None else "1"
        return self._script("update", self.instance, entry.id, _num(entry.next_attempt), str(entry.sink),
                            str(entry.attempts), has_error, entry.last_error or "").addCallback(lambda _: None)

    def replace(self, entry_id: str, entries: list[OutboxEntry],
                remove: Sequence[str] = ()) -> "Deferred[list[tuple[str, str]]]":
        self._claimed.discard(entry_id)
        args = [x for e in entries for x in _entry_args(e)]
        d = self._script("replace", self.instance, entry_id, str(len(entries)), *args)
        return d.addCallback(lambda _: self._run(remove_files, list(remove)) if remove else [])

    def pending(self) -> "Deferred[list[OutboxEntry]]":
        d = self._run(self._hashes, "outbox:due", "+inf", "outbox")
        return d.addCallback(lambda hs: sorted(map(_entry, hs), key=lambda e: e.created))

    # -- IHistoryStore

    def note_file(self, event: FileEvent) -> "Deferred[None]":
        args = [event.file_id, event.parent or "", _num(event.at), event.place or "", event.status or "",
                "1" if event.retried else "0", *_history_file(event.record),
                _news(str(event.record.get("imei")), CameraRecord.count_file, event.record)]
        for made_id, record in event.made:
            args += [made_id, *_history_file(record)]
        return self._script("note_file", *args).addCallback(lambda _: None)

    def files(self, query: FileQuery) -> "Deferred[tuple[list[StoredFile], int]]":
        since = "-inf" if query.since is None else _num(query.since)
        until = "+inf" if query.until is None else "(" + _num(query.until)
        keys = [_index_key(name, value) for name, value in query.filters().items()]
        scratch = f"scratch:{uuid.uuid4().hex}"
        d = self._script("files", since, until, str(query.offset), str(query.limit), scratch, *keys)
        return d.addCallback(lambda out: ([_stored(*item) for item in out[1:]], int(out[0])))

    def file(self, file_id: str) -> "Deferred[Optional[StoredFile]]":
        return self._script("file", file_id).addCallback(lambda out: _stored(*out) if out else None)

    def note_camera(self, sighting: CameraSighting) -> "Deferred[None]":
        return self._script("note_camera", _news(sighting.imei, CameraRecord.saw, sighting)).addCallback(lambda _: None)

    def _cameras(self, imeis: Optional[list[str]], now: float) -> list[CameraRecord]:
        """The cameras (every one, or those of ``imeis``) with files_24h and online from the leases (store thread)."""
        if imeis is None:
            raw = self.client.hgetall(self.key("cameras"))
        else:
            raw = dict(zip(imeis, self.client.hmget(self.key("cameras"), imeis)))  # type: ignore[arg-type]
        cameras = [_camera(cast(str, text)) for text in raw.values() if text]
        pipe = self.client.pipeline(transaction=False)
        for c in cameras:
            pipe.zcount(self.key(_index_key("imei", c.imei)), _num(now - DAY), "+inf")
            pipe.exists(self.key("lease", c.imei))
        counts = pipe.execute()
        for i, c in enumerate(cameras):
            c.files_24h, c.online = int(counts[2 * i]), bool(counts[2 * i + 1])
        return cameras

    def cameras(self, now: float) -> "Deferred[list[CameraRecord]]":
        return self._run(self._cameras, None, now)

    def camera(self, imei: str, now: float) -> "Deferred[Optional[CameraRecord]]":
        return self._run(self._cameras, [imei], now).addCallback(lambda found: found[0] if found else None)

    def sweep_history(self, before: float) -> "Deferred[int]":
        return sweep_in_batches(lambda: self._script("sweep_history", _num(before), str(_SWEEP_BATCH)), _SWEEP_BATCH)

    # -- running instances

    def register(self, info: dict[str, str], ttl: float) -> "Deferred[None]":
        """Say that this instance runs, for ``ttl`` seconds (Redis's clock), with ``info`` (its spool...)."""
        d = self._script("register", self.instance, str(_ms(ttl)), json.dumps(info, sort_keys=True))
        return d.addCallback(lambda _: None)

    def instances(self) -> "Deferred[dict[str, dict[str, str]]]":
        """The instances whose registration is live, with their ``info``: ``{name: info}``."""
        d = self._script("instances")
        return d.addCallback(lambda flat: {name: json.loads(info) for name, info in _hash(flat).items()})

    def unregister(self) -> "Deferred[None]":
        """Say that this instance stops (before :meth:`close`)."""
        return self._script("unregister", self.instance).addCallback(lambda _: None)

    # -- claims

    def renew_claims(self) -> "Optional[Deferred[None]]":
        """Extend this instance's claims on the entries it is delivering (every claim_ttl / 3)."""
        if not self._claimed or self._closed:
            return None
        ids = sorted(self._claimed)

        def renewed(result: list[list[str]]) -> None:
            lost, gone = result
            self._claimed.difference_update(lost)
            self._claimed.difference_update(gone)
            for entry_id in lost:
                log.warn("outbox entry {id}: another instance took it after this one's claim expired (Redis"
                         " unreachable or the reactor stalled for claim_ttl); it may be delivered twice",
                         id=entry_id)

        d = self._script("renew", self.instance, str(_ms(self.claim_ttl)), *ids)
        d.addCallback(renewed)
        d.addErrback(lambda f: log.warn("could not renew outbox claims: {why}", why=f.getErrorMessage()))
        return d

