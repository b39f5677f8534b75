"""The query API (`/api/v1`) and the fallback ingest endpoint.

Parameters are validated strictly before any query runs: an unknown parameter, a repeated one,
a value out of range, a malformed cursor or time — each is a 400 naming the parameter, never a
500 and never silently ignored (a typo like `?modle=x` must not return unfiltered data). Text
values are bound as SQL parameters by the stores; here they are only checked to be text a
database can hold (no NUL, valid UTF-8, bounded length).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
from aiohttp import web
from prometheus_client import Counter

from llmtap.bodies.base import BodyStore, body_key
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable, RecordError
from llmtap.handlers.base import Chain
from llmtap.record import Body, LogRecord, decode, decode_many, decompress
from llmtap.server.auth import IngestCaller
from llmtap.server.ingest import IngestQueue
from llmtap.store import sql
from llmtap.store.base import ListQuery, StatsQuery, Store

log = logging.getLogger("llmtap.server")

INGESTED = Counter("llmtap_server_ingested_records_total", "Records posted to /api/v1/ingest", ["result"])

MAX_LIMIT = 1000
MAX_TEXT = 4096
PROPERTY = "property."
_FILTERS = ("user_id", "session_id", "model", "provider", "status", "status_class",
            "min_cost_usd", "max_cost_usd", "min_latency_ms", "max_latency_ms")  # fmt: skip
LIST_PARAMS = frozenset({"limit", "cursor", "since", "until", "order", "sort", "q", *_FILTERS})
STATS_PARAMS = frozenset({"since", "until", "group_by", "bucket", "exact", *_FILTERS})
#: Longest `q=` search string (characters).
MAX_SEARCH = 200
USERS_PARAMS = frozenset({"limit"})
#: Fields left out of list items (they are in `GET /api/v1/requests/{id}`).
LIST_OMIT = ("request_body", "response_body", "response_events")
_EPOCH_RE = re.compile(r"^-?\d{1,12}(\.\d{1,9})?$")

# -- keys of the aiohttp app's state ---------------------------------------------------------------
SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BODIES = web.AppKey("bodies", BodyStore)
CHAIN = web.AppKey("chain", Chain)
INGEST = web.AppKey("ingest", IngestQueue)
TENANT = web.RequestKey("tenant", str)
INGEST_CALLER = web.RequestKey("ingest_caller", IngestCaller)


class BadParameter(Exception):
    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter[:100]
        self.message = message


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": "5"} if status == 503 else None
    return json_response({"error": {"message": message, **extra}}, status=status, headers=headers)


# -- parameter parsing ----------------------------------------------------------------------------


def _text(name: str, value: str, max_len: int = MAX_TEXT) -> str:
    if len(value) > max_len:
        raise BadParameter(name, f"invalid parameter {name!r}: longer than {max_len} characters")
    if "\x00" in value:
        raise BadParameter(name, f"invalid parameter {name!r}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadParameter(name, f"invalid parameter {name!r}: not valid UTF-8") from None
    return value


def parse_params(
    request: web.Request, allowed: Iterable[str], properties: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """(plain parameters, `property.<Name>` filters); 400 for unknown or repeated parameters."""
    allowed = frozenset(allowed)
    plain: dict[str, str] = {}
    props: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in request.query.items():
        shown = key[:100]
        try:
            _text(shown, key, 300)
        except BadParameter as e:
            raise BadParameter(
                shown, e.message.replace("invalid parameter", "invalid parameter name", 1)
            ) from None
        if key in seen:
            raise BadParameter(shown, f"invalid parameter {shown!r}: given more than once")
        seen.add(key)
        if properties and key.startswith(PROPERTY):
            name = key[len(PROPERTY) :]
            if not name:
                raise BadParameter(shown, "invalid parameter 'property.': a property name is required")
            props[name] = _text(key, value)
        elif key in allowed:
            plain[key] = _text(key, value)
        else:
            known = sorted(allowed) + ([f"{PROPERTY}<Name>"] if properties else [])
            raise BadParameter(shown, f"unknown parameter {shown!r} (known: {', '.join(known)})")
    return plain, props


def _int(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise BadParameter(
            name, f"invalid parameter {name!r}: must be an integer, got {raw[:50]!r}"
        ) from None
    if not lo <= value <= hi:
        raise BadParameter(name, f"invalid parameter {name!r}: must be between {lo} and {hi}, got {value}")
    return value


def _number(params: dict[str, str], name: str) -> float:
    raw = params[name]
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 1e12:
        raise BadParameter(name, f"invalid parameter {name!r}: must be a number >= 0, got {raw[:50]!r}")
    return value


def parse_time(name: str, raw: str) -> datetime:
    """ISO 8601 (naive means UTC) or epoch seconds."""
    try:
        if _EPOCH_RE.match(raw):
            return datetime.fromtimestamp(float(raw), UTC)
        dt = datetime.fromisoformat(raw)
    except (ValueError, OverflowError, OSError):
        raise BadParameter(
            name, f"invalid parameter {name!r}: expected ISO 8601 (2025-01-31T12:00:00Z) or epoch seconds"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadParameter(name, f"invalid parameter {name!r}: out of range") from None


def _filters(params: dict[str, str], props: dict[str, str]) -> ListQuery:
    q = ListQuery(properties=props)
    for name in ("user_id", "session_id", "model", "provider"):
        if name in params:
            setattr(q, name, params[name])
    if "status" in params:
        q.status = _int(params, "status", 0, 100, 599)
    if "status_class" in params:
        raw = params["status_class"]
        if raw not in ("1xx", "2xx", "3xx", "4xx", "5xx"):
            raise BadParameter("status_class", "invalid parameter 'status_class': must be 1xx ... 5xx")
        q.status_class = int(raw[0])
    for name in ("min_cost_usd", "max_cost_usd", "min_latency_ms", "max_latency_ms"):
        if name in params:
            setattr(q, name, _number(params, name))
    for name in ("since", "until"):
        if name in params:
            setattr(q, name, parse_time(name, params[name]))
    return q


def list_query(request: web.Request) -> ListQuery:
    params, props = parse_params(request, LIST_PARAMS, properties=True)
    q = _filters(params, props)
    q.limit = _int(params, "limit", 50, 1, MAX_LIMIT)
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadParameter("order", "invalid parameter 'order': must be 'asc' or 'desc'")
    q.order = "asc" if order == "asc" else "desc"
    sort = params.get("sort", "time")
    if sort not in ("time", "cost", "latency"):
        raise BadParameter("sort", "invalid parameter 'sort': must be time, cost or latency")
    q.sort = sort  # type: ignore[assignment]
    if "q" in params:
        if not 0 < len(params["q"]) <= MAX_SEARCH:
            raise BadParameter("q", f"invalid parameter 'q': 1 to {MAX_SEARCH} characters")
        q.q = params["q"]
    if "cursor" in params:
        try:
            sql.decode_sort_cursor(params["cursor"], sort)
        except ValueError:
            raise BadParameter(
                "cursor", "invalid parameter 'cursor': not a cursor this API returned"
            ) from None
        q.cursor = params["cursor"]
    return q


def stats_query(request: web.Request) -> StatsQuery:
    params, props = parse_params(request, STATS_PARAMS, properties=True)
    filters = _filters(params, props)
    q = StatsQuery(since=filters.since, until=filters.until, filters=filters)
    filters.since = filters.until = None
    exact = params.get("exact")
    if exact is not None:
        if exact not in ("true", "false"):
            raise BadParameter("exact", "invalid parameter 'exact': must be true or false")
        q.exact = exact == "true"
    group_by = params.get("group_by")
    if group_by is not None:
        if not (
            group_by in sql.STAT_GROUPS or (group_by.startswith(PROPERTY) and len(group_by) > len(PROPERTY))
        ):
            choices = ", ".join(sql.STAT_GROUPS)
            raise BadParameter(
                "group_by", f"invalid parameter 'group_by': must be one of {choices} or property.<Name>"
            )
        q.group_by = group_by
    bucket = params.get("bucket")
    if bucket is not None:
        if bucket not in sql.BUCKET_MICROS:
            raise BadParameter("bucket", "invalid parameter 'bucket': must be minute, hour or day")
        q.bucket = bucket  # type: ignore[assignment]
        if q.since and q.until:
            n = (sql.to_micros(q.until) - sql.to_micros(q.since)) // sql.BUCKET_MICROS[bucket]
            if n > sql.MAX_BUCKETS:
                raise BadParameter(
                    "bucket",
                    f"invalid parameter 'bucket': {n} {bucket}s is more than {sql.MAX_BUCKETS} buckets",
                )
    return q


def path_id(request: web.Request, name: str = "id") -> str:
    return _text(name, request.match_info[name], 512)


def no_params(request: web.Request) -> None:
    parse_params(request, (), properties=False)


# -- handlers -------------------------------------------------------------------------------------


def _tenant(request: web.Request) -> str:
    return request[TENANT]


#: A list page stops early (with a `next_cursor` to the rest) once its items reach this size,
#: so a page is bounded in bytes as well as in items (metadata is capped per record too).
PAGE_BYTES = 8 * 1024 * 1024


async def list_requests(request: web.Request) -> web.Response:
    q = list_query(request)
    page = await request.app[STORE].list_requests(_tenant(request), q)
    items: list[dict[str, Any]] = []
    size = 0
    next_cursor = page.next_cursor
    for row in page.items:
        item = {k: v for k, v in row.items() if k not in LIST_OMIT}
        n = len(orjson.dumps(item))
        if items and size + n > PAGE_BYTES:
            next_cursor = sql.item_cursor(items[-1], q.sort)
            break
        items.append(item)
        size += n
    return json_response({"items": items, "next_cursor": next_cursor})


async def get_request(request: web.Request) -> web.Response:
    no_params(request)
    rid = path_id(request)
    row = await request.app[STORE].get_request(_tenant(request), rid)
    if row is None:
        return error_response(404, f"no request {rid!r} (yet: records appear once the worker stored them)")
    bodies = request.app[BODIES]
    info: dict[str, Any] = {}
    parts = ("request_body", "response_body", "response_events")
    resolved = await asyncio.gather(
        *(_resolve(bodies, row[p], as_text=p == "response_events") for p in parts)
    )
    for part, value in zip(parts, resolved, strict=True):
        meta = row[part]
        info[part] = (
            None
            if meta is None
            else {k: meta.get(k) for k in ("content_type", "size")}
            | {"truncated": bool(meta.get("truncated"))}
        )
        row[part] = value
    row["bodies"] = info
    return json_response(row)


async def _resolve(bodies: BodyStore, meta: dict[str, Any] | None, *, as_text: bool) -> Any:
    """A body reference → the body: parsed JSON if it is JSON, else text; None when absent."""
    if meta is None:
        return None
    body = msgspec.convert(meta, Body)
    if body.ref is not None:
        raw = await bodies.get(body.ref)
    else:
        raw = body.data
    if raw is None:
        return None
    if body.encoding == "zstd":
        try:
            raw = decompress(raw)
        except Exception:  # a damaged body must not make the whole record unreadable
            log.warning("body %s is not valid zstd", body.ref)
            return None
    if not as_text:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return raw.decode("utf-8", "replace")


async def stats(request: web.Request) -> web.Response:
    q = stats_query(request)
    result = await request.app[STORE].stats(_tenant(request), q)
    result["group_by"] = q.group_by
    result["bucket"] = q.bucket
    result["since"] = None if q.since is None else sql.iso(sql.to_micros(q.since))
    result["until"] = None if q.until is None else sql.iso(sql.to_micros(q.until))
    return json_response(result)


async def session(request: web.Request) -> web.Response:
    no_params(request)
    sid = path_id(request)
    result = await request.app[STORE].sessions(_tenant(request), sid)
    if result is None:
        return error_response(404, f"no session {sid!r}")
    for row in result["requests"]:
        for k in LIST_OMIT:
            row.pop(k, None)
    return json_response(result)


async def users(request: web.Request) -> web.Response:
    params, _ = parse_params(request, USERS_PARAMS, properties=False)
    limit = _int(params, "limit", 100, 1, MAX_LIMIT)
    return json_response({"items": await request.app[STORE].users(_tenant(request), limit)})


# -- ingest ---------------------------------------------------------------------------------------

_BODY_PARTS = ("request_body", "response_body", "response_events")
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_INT64 = (-(2**63), 2**63 - 1)
_USAGE_INTS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def decode_ingest(raw: bytes) -> list[LogRecord]:
    """One record or a JSON array of records; raises `RecordError` naming what is wrong."""
    head = raw.lstrip()[:1]
    try:
        if head == b"[":
            return decode_many(raw)
        if head == b"{":
            return [decode(raw)]
    except RecordError:
        raise
    except RecursionError:
        raise RecordError("not a JSON log record: nested too deeply") from None
    except UnicodeError:
        raise RecordError("not a JSON log record: not valid UTF-8") from None
    except Exception as e:  # whatever else the decoder trips on is the input's fault, not ours
        raise RecordError(f"not a JSON log record: {type(e).__name__}: {e}") from None
    raise RecordError("the body must be a JSON log record or an array of them")


def tenant_dir(tenant: str) -> str:
    """The body-store folder every body key of `tenant` starts with (see `body_key`)."""
    return body_key(tenant, "x", _EPOCH, "request", b"").rsplit("/", 4)[0] + "/"


def check_ingested(record: LogRecord, caller: IngestCaller) -> str | None:
    """Why this posted record may not be stored, or None.

    Body references are trusted by the API (it serves whatever the ref names), so an ingested
    ref must lie in the record's own tenant's folder: otherwise tenant B could post a record
    pointing at tenant A's body key and read A's prompt through the API.
    """
    if caller.tenant is not None and record.tenant != caller.tenant:
        return f"tenant {record.tenant[:100]!r} is not the caller's tenant"
    if record.status is not None and not 0 <= record.status <= 999:
        return f"status {str(record.status)[:30]} is not an HTTP status"
    numbers = [("cost_nanos", record.cost_nanos)]
    numbers += [(f"usage.{f}", getattr(record.usage, f)) for f in _USAGE_INTS]
    numbers += [(f"{p}.size", b.size) for p in _BODY_PARTS if (b := getattr(record, p)) is not None]
    for name, value in numbers:
        if value is not None and not _INT64[0] <= value <= _INT64[1]:
            return f"{name} {str(value)[:30]} does not fit in 64 bits"
    own = tenant_dir(record.tenant)
    for part in _BODY_PARTS:
        body: Body | None = getattr(record, part)
        if body is None:
            continue
        if body.ref is None:  # inline: any request id names a body (`key_segment` encodes it)
            continue
        ref = body.ref
        segments = ref.split("/")
        if (
            not ref.startswith(own)
            or any(s in ("", ".", "..") for s in segments)
            or any(c in ref for c in "\\\0")
        ):
            return f"{part}.ref {ref[:200]!r} is not a body of tenant {record.tenant[:100]!r}"
    return None


async def ingest(request: web.Request) -> web.Response:
    """Append posted records to the server's durable ingest queue; 200 once they are on disk.

    The handler chain runs later, in the server's ingest drain (`server.ingest`), so a slow
    store or body store never makes the gateway time out and send the batch a second way.
    """
    no_params(request)
    caller = request[INGEST_CALLER]
    raw = await request.read()
    try:
        records = decode_ingest(raw)
    except RecordError as e:
        INGESTED.labels("rejected").inc()
        return error_response(400, str(e))
    accepted: list[LogRecord] = []
    rejected: list[dict[str, str]] = []
    for r in records:
        why = check_ingested(r, caller)
        if why is None:
            if r.route == "queue":  # the default: it came here, so it took the ingest route
                r.route = "ingest"
            accepted.append(r)
        else:
            rejected.append({"id": r.id[:200], "reason": why})
    if accepted:
        await request.app[INGEST].put(accepted)  # BackendUnavailable → 503, nothing accepted
    INGESTED.labels("accepted").inc(len(accepted))
    if rejected:
        INGESTED.labels("rejected").inc(len(rejected))
        for x in rejected:
            log.warning("ingest: record %r rejected: %s", x["id"][:100], x["reason"])
        first = rejected[0]
        return error_response(
            403 if len(rejected) == len(records) and caller.tenant is not None else 400,
            f"{len(rejected)} of {len(records)} records rejected; first: {first['id']!r}: {first['reason']}",
            accepted=len(accepted),
            rejected=rejected,
        )
    return json_response({"accepted": len(accepted)})


__all__ = [
    "BODIES",
    "CHAIN",
    "INGEST",
    "SETTINGS",
    "STORE",
    "BackendUnavailable",
    "BadParameter",
    "error_response",
    "get_request",
    "ingest",
    "json_response",
    "list_requests",
    "session",
    "stats",
    "users",
]
