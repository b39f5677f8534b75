"""The query API (`/api/v1`) and the fallback ingest endpoint.

Parameters are validated strictly before any query runs (by the store's query vocabulary,
`llmtap.store.query`): an unknown parameter, a repeated one, a value out of range, a malformed
cursor or time — each is a 400 naming the parameter, never a 500 and never silently ignored
(a typo like `?modle=x` must not return unfiltered data).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
from aiohttp import web
from prometheus_client import Counter

from llmtap import limits
from llmtap.bodies import offload
from llmtap.bodies.base import BodyStore, body_key, day_folder
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable, RecordError, TransientError
from llmtap.handlers.chain import Chain
from llmtap.ids import canonical_id
from llmtap.limits import MAX_ERROR_CHARS, MAX_NARROW_COUNT, NARROW_USAGE
from llmtap.record import Body, LogRecord, declared_charset, decode, decode_many
from llmtap.redact import (
    REDACTED,
    distinct_name,
    is_secret_header,
    is_secret_value,
    key_in_header_name,
    masked_name,
    masked_value,
    redact_text,
    redact_url,
)
from llmtap.server.auth import IngestCaller
from llmtap.server.ingest import IngestQueue
from llmtap.store import query
from llmtap.store.base import Store
from llmtap.store.query import ListQuery, StatsQuery

log = logging.getLogger("llmtap.server")

INGESTED = Counter("llmtap_server_ingested_records_total", "Records posted to /api/v1/ingest", ["result"])

#: Fields left out of list items (they are in `GET /api/v1/requests/{id}`).
LIST_OMIT = ("request_body", "response_body", "response_events")

# -- keys of the aiohttp app's state ---------------------------------------------------------------
SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
BODIES = web.AppKey("bodies", BodyStore)
CHAIN = web.AppKey("chain", Chain)
INGEST = web.AppKey("ingest", IngestQueue)
TENANT = web.RequestKey("tenant", str)
INGEST_CALLER = web.RequestKey("ingest_caller", IngestCaller)
#: The streamed answer of a request whose status and headers are sent (`open_stream`).
STREAM = web.RequestKey("stream", web.StreamResponse)


#: A refused query parameter (400 naming it); raised by the vocabulary's parsers too.
BadParameter = query.QueryError


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": "5"} if status == 503 else None
    return json_response({"error": {"message": message, **extra}}, status=status, headers=headers)


async def open_stream(request: web.Request, resp: web.StreamResponse) -> None:
    """Send a streamed answer's status and headers. From then on an error cannot be answered
    with its own status: the error middleware cuts the connection instead, so the client sees an
    unfinished transfer (an export cut mid-way must not look complete)."""
    request[STREAM] = resp
    await resp.prepare(request)


# -- parameter parsing ----------------------------------------------------------------------------


def list_query(request: web.Request) -> ListQuery:
    return query.parse_list(request.query.items())


def stats_query(request: web.Request) -> StatsQuery:
    return query.parse_stats(request.query.items())


def path_id(request: web.Request, name: str = "id") -> str:
    return query.text(name, request.match_info[name], 512)


def no_params(request: web.Request) -> None:
    query.split_params(request.query.items(), (), properties=False)


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
            next_cursor = query.item_cursor(items[-1], q.sort)
            break
        items.append(item)
        size += n
    return json_response({"items": items, "next_cursor": next_cursor})


async def get_request(request: web.Request) -> web.Response:
    no_params(request)
    rid = path_id(request)
    row = await request.app[STORE].get_request(_tenant(request), rid)
    if row is None and (canon := canonical_id(rid)) not in (None, rid):
        # The id as the client chose it (`01A2...`, braces): the gateway keyed it canonical.
        row = await request.app[STORE].get_request(_tenant(request), canon)
    if row is None:
        return error_response(404, f"no request {rid!r} (yet: records appear once the worker stored them)")
    bodies = request.app[BODIES]
    info: dict[str, Any] = {}
    parts = ("request_body", "response_body", "response_events")
    got = await asyncio.gather(*(_read(bodies, row[p]) for p in parts), return_exceptions=True)
    for g in got:
        if isinstance(g, BaseException) and not isinstance(g, TransientError):
            raise g
    raws: list[bytes | None] = [None if isinstance(g, BaseException) else g for g in got]
    meta_of = {p: row[p] for p in parts}
    for part, raw, outcome in zip(parts, raws, got, strict=True):
        meta = row[part]
        value, encoding = _decoded(raw, meta, as_text=part == "response_events")
        info[part] = (
            None
            if meta is None
            else {k: meta.get(k) for k in ("content_type", "size")}
            | {"truncated": bool(meta.get("truncated"))}
        )
        if isinstance(outcome, TransientError):
            # A body the store would not give now (down, S3's 503 SlowDown, or its 403 for a
            # key gone when the role may not list the bucket: for good): the record and its
            # other bodies still show, and why this one does not.
            info[part]["unavailable"] = str(outcome)
        elif meta is not None and raw is None:
            # Logged, but not in this server's body store: deleted by retention, damaged, or
            # (`LLMTAP_BODIES=file` scaled out) written to another host's disk.
            info[part]["missing"] = True
        if encoding is not None:
            info[part]["encoding"] = encoding
        row[part] = value
    row["bodies"] = info
    try:
        return json_response(row)
    except orjson.JSONEncodeError:
        # JSON nested deeper than orjson writes (254 levels; it reads 1024): the bodies as text.
        for part, raw in zip(parts, raws, strict=True):
            row[part] = _decoded(raw, meta_of[part], as_text=True)[0]
        return json_response(row)


async def _read(bodies: BodyStore, meta: dict[str, Any] | None) -> bytes | None:
    """A body reference → its bytes; None when absent or not found."""
    if meta is None:
        return None
    try:
        return await offload.read(bodies, msgspec.convert(meta, Body))
    except ValueError as e:  # a ref no store can read (a hand-made record): missing, not a 500
        log.warning("%s", e)
        return None


def _decoded(raw: bytes | None, meta: dict[str, Any] | None, *, as_text: bool) -> tuple[Any, str | None]:
    """A body's bytes as the API shows them: parsed JSON if it is JSON, else text; bytes of no
    text type that are not UTF-8 (audio, an uploaded file) in base64, so they can be had back
    exactly. The second value is "base64" then."""
    if raw is None or meta is None:
        return None, None
    ctype = (meta.get("content_type") or "").split(";", 1)[0].strip().lower()
    if not as_text and not ctype.startswith("text/"):
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            # Said to be JSON, or an object or array sent without saying (`curl -d`): JSON.
            # A bare `null` or `123` of no JSON type is text, never the null of an omitted body.
            if ctype == "application/json" or ctype.endswith("+json") or isinstance(value, dict | list):
                return value, None
    # UTF-8, else the charset the body names (one mislabelled Latin-1 is UTF-8 all the same).
    # A body cut at the size limit may end inside a character: still text.
    charset = declared_charset(meta.get("content_type"))
    for codec in ("utf-8", charset) if charset else ("utf-8",):
        for cut in range(4 if meta.get("truncated") else 1):
            try:
                return raw[: len(raw) - cut].decode(codec), None
            except (UnicodeError, LookupError):  # any codec's failure: the next try
                continue
    if as_text or ctype.startswith("text/"):  # said to be text: read as text
        return raw.decode("utf-8", "replace"), None
    return base64.b64encode(raw).decode("ascii"), "base64"


async def stats(request: web.Request) -> web.Response:
    q = stats_query(request)
    result = await request.app[STORE].stats(_tenant(request), q)
    result["group_by"] = q.group_by
    result["bucket"] = q.bucket
    # Groups and buckets each split every counted request: short of the total, some were cut
    # (`MAX_GROUPS` largest groups, `MAX_BUCKETS` earliest buckets).
    total = result["overall"]["count"]
    result["groups_truncated"] = q.group_by is not None and sum(g["count"] for g in result["groups"]) < total
    result["buckets_truncated"] = q.bucket is not None and sum(b["count"] for b in result["buckets"]) < total
    result["since"] = None if q.since is None else query.iso(query.to_micros(q.since))
    result["until"] = None if q.until is None else query.iso(query.to_micros(q.until))
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
    limit, after, sort = query.parse_users(request.query.items())
    items = await request.app[STORE].users(_tenant(request), limit + 1, after=after, sort=sort)
    more = len(items) > limit
    items = items[:limit]
    cursor = query.users_cursor(items[-1], sort) if more else None
    return json_response({"items": items, "next_cursor": cursor})


# -- ingest ---------------------------------------------------------------------------------------

_BODY_PARTS = ("request_body", "response_body", "response_events")
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def decode_ingest(raw: bytes) -> list[LogRecord]:
    """One record or a JSON array of records; raises `RecordError` naming what is wrong."""
    head = raw.lstrip()[:1]
    if head == b"[":
        return decode_many(raw)
    if head == b"{":
        return [decode(raw)]
    raise RecordError("the body must be a JSON log record or an array of them")


#: A body ref after its tenant's folder: a day folder (`<yyyy>/<mm>/<dd>/`) and one object, a
#: `.zst` body (S3, one object per body) or a span of a `.pack` file (the file store); the
#: name in ASCII and short enough for any file system.
_REF_TAIL = re.compile(r"(?:\d{4}/\d{2}/\d{2}/)?[!-.0-~]{1,200}\.(?:zst|pack#\d{1,15}\+\d{1,15})")


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
    # One request, one row: a UUID in any spelling is keyed as the gateway keys it. (Other ids
    # are no gateway's, but no UUID's spelling either: kept as posted.)
    record.id = canonical_id(record.id) or record.id
    for name in NARROW_USAGE:  # ingest refuses what a store would keep as unknown
        count = getattr(record.usage, name)
        if count is not None and not 0 <= count <= MAX_NARROW_COUNT:
            return f"usage.{name} {str(count)[:30]} is not a token count (0 to {MAX_NARROW_COUNT})"
    why = limits.check(record)
    if why is not None:
        return why
    if record.error is not None and len(record.error) > MAX_ERROR_CHARS:  # before redact_text scans it
        record.error = record.error[:MAX_ERROR_CHARS]
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
        if not _REF_TAIL.fullmatch(ref, len(own)):
            # Only what a body store writes: a day folder and one body file (a folder, or a
            # name no file system takes, would fail every read of it, for good).
            return f"{part}.ref {ref[:200]!r} is not a body reference"
        # And in the record's own UTC day: retention deletes what a purged record's refs name
        # (a pack whole), so a record dated 2020 naming today's pack took today's bodies with
        # it. Bodies of one day go together, whoever names them.
        if ref.count("/") > own.count("/") and not ref.startswith(own + day_folder(record.started_at)):
            return f"{part}.ref {ref[:200]!r} is not in the folder of the record's day"
    return None


def scrub_ingested(record: LogRecord) -> LogRecord:
    """The credential rules the gateway applies, applied again: whatever posts here (a gateway
    of another version, a script holding the ingest token) gets no credential into the store."""
    for part in ("request_headers", "response_headers"):
        headers: dict[str, str] = getattr(record, part)
        # a key as a header's name too, as the gateway drops it (rev30b)
        answer = part == "response_headers"  # its `WWW-Authenticate` is a challenge
        if any(is_secret_header(k, v, answer) or key_in_header_name(k) for k, v in headers.items()):
            kept = {
                k: v
                for k, v in headers.items()
                if not (is_secret_header(k, v, answer) or key_in_header_name(k))
            }
            setattr(record, part, kept)
    record.target_url = redact_url(record.target_url)
    record.path = redact_url(record.path)
    if record.error is not None:
        record.error = redact_text(record.error)
    # what the limits cut is masked before the cut, as the gateway does (rev28b: a key the cut
    # split kept its head); what they leave is masked below
    limits.bound(record, masked_value, masked_name)
    if record.user_id is not None:
        record.user_id = masked_value(record.user_id)
    if record.session_id is not None:
        record.session_id = masked_value(record.session_id)
    if any(is_secret_value(v) for v in record.properties.values()):
        record.properties = {k: masked_value(v) for k, v in record.properties.items()}
    if any(
        masked_name(k) != k or k.startswith(REDACTED) for k in record.properties
    ):  # a key as a name (rev29b)
        props: dict[str, str] = {}
        for k, v in record.properties.items():
            props[distinct_name(masked_name(k), props)] = v
        record.properties = props
    return record


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
            accepted.append(scrub_ingested(r))
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
