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
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
from aiohttp import web
from prometheus_client import Counter

from llmtap.bodies.base import BodyStore
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable, RecordError
from llmtap.handlers.base import Chain, Item
from llmtap.record import Body, LogRecord, decode, decode_many, decompress
from llmtap.store import sql
from llmtap.store.base import ListQuery, StatsQuery, Store

log = logging.getLogger("llmtap.server")

INGESTED = Counter("llmtap_server_ingested_records_total", "Records posted to /api/v1/ingest", ["result"])

MAX_LIMIT = 1000
MAX_TEXT = 4096
PROPERTY = "property."
_FILTERS = ("user_id", "session_id", "model", "provider", "status")
LIST_PARAMS = frozenset({"limit", "cursor", "since", "until", "order", *_FILTERS})
STATS_PARAMS = frozenset({"since", "until", "group_by", "bucket", *_FILTERS})
USERS_PARAMS = frozenset({"limit"})
#: Fields left out of list items (they are in `GET /api/v1/requests/{id}`).
LIST_OMIT = ("request_body", "response_body", "response_events")
_EPOCH_RE = re.compile(r"^-?\d{1,12}(\.\d{1,9})?$")

# -- keys of the aiohttp app's state ---------------------------------------------------------------
SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BODIES = web.AppKey("bodies", BodyStore)
CHAIN = web.AppKey("chain", Chain)
TENANT = web.RequestKey("tenant", str)


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
    if "cursor" in params:
        try:
            sql.decode_cursor(params["cursor"])
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


async def list_requests(request: web.Request) -> web.Response:
    q = list_query(request)
    page = await request.app[STORE].list_requests(_tenant(request), q)
    items = [{k: v for k, v in row.items() if k not in LIST_OMIT} for row in page.items]
    return json_response({"items": items, "next_cursor": page.next_cursor})


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


def decode_ingest(raw: bytes) -> list[LogRecord]:
    """One record or a JSON array of records; raises `RecordError`."""
    head = raw.lstrip()[:1]
    if head == b"[":
        return decode_many(raw)
    if head == b"{":
        return [decode(raw)]
    raise RecordError("the body must be a JSON log record or an array of them")


async def ingest(request: web.Request) -> web.Response:
    """Run posted records through the worker's chain; 200 only once they are in the store."""
    no_params(request)
    raw = await request.read()
    try:
        records = decode_ingest(raw)
    except RecordError as e:
        INGESTED.labels("rejected").inc()
        return error_response(400, str(e))
    for r in records:
        r.route = "ingest"
    settings = request.app[SETTINGS]
    items = await _process(request.app[CHAIN], records, settings.worker_max_attempts)
    failed = [i for i in items if not i.ok]
    INGESTED.labels("accepted").inc(len(items) - len(failed))
    if failed:
        INGESTED.labels("rejected").inc(len(failed))
        for i in failed:
            log.warning("ingest: record %s rejected: %s", i.record.id, i.error)
        rejected = [{"id": i.record.id, "reason": i.error} for i in failed]
        first = failed[0]
        return error_response(
            400,
            f"{len(failed)} of {len(items)} records rejected; first: {first.record.id}: {first.error}",
            accepted=len(items) - len(failed),
            rejected=rejected,
        )
    return json_response({"accepted": len(items)})


async def _process(chain: Chain, records: list[LogRecord], attempts: int) -> list[Item]:
    """The worker's `process_records`, retrying records that fail like the worker does.

    `TransientError` propagates (the caller answers 503 and the client retries later).
    """
    from llmtap.worker.worker import process_records

    items = await process_records(chain, records)
    delay = 0.05
    for _ in range(attempts - 1):
        failed = [n for n, i in enumerate(items) if not i.ok]
        if not failed:
            break
        await asyncio.sleep(delay)
        delay *= 2
        again = await process_records(chain, [items[n].record for n in failed])
        for n, item in zip(failed, again, strict=True):
            items[n] = item
    return items


__all__ = [
    "BODIES",
    "CHAIN",
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
