"""The dashboard's server side: the export, the live tail and pipeline health.

The dashboard itself is a small ES-module app in `static/` over the JSON API (no build step,
no request to another origin: uPlot is vendored, see `static/vendor/VENDORED.md`), served by
`app.py` under the Content-Security-Policy of `security.py`. What it needs beyond the query
API lives here, in routes of its own:

- `GET /api/v1/requests/export?format=csv|jsonl&<list filters>`: every matching record without
  bodies, streamed page by page through the store's keyset pagination, so memory stays constant
  at any size.
- `GET /api/v1/requests/stream?<list filters>`: server-sent events, one `request` event per
  newly stored record matching the filters (polled from the store, which is the only place
  every worker's writes meet).
- `GET /api/v1/sessions?<list filters>&limit=&cursor=`: sessions with their totals, most
  recently active first, keyset-paginated like the list.
- `GET /api/v1/pipeline`: queue lag per partition, dead letters, spool size, this server's
  ingest backlog (`ingest.db`), newest record.
  `POST /api/v1/pipeline/dead-letters/replay`: replay dead letters. Dead letters carry records
  of every tenant, so in multi-tenant mode only their count is shown and replay is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from llmtap.errors import BackendUnavailable, ConfigError
from llmtap.queue.base import Queue
from llmtap.server import api
from llmtap.server.ingest import IngestQueue
from llmtap.store import query
from llmtap.store.query import ListQuery

log = logging.getLogger("llmtap.server")

EXPORT_PAGE = 1000
#: Columns of the CSV export, in order (the list's fields; bodies are in the detail endpoint).
EXPORT_COLUMNS = tuple(f for f in (
    "id", "created_at", "provider", "model", "method", "path", "status", "outcome", "error",
    "streamed", "latency_ms", "time_to_first_token_ms", "prompt_tokens", "completion_tokens",
    "total_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens", "usage_source",
    "cost_usd", "price_version", "user_id", "session_id", "properties", "route", "gateway",
    "cache_write_1h_tokens", "input_audio_tokens", "output_audio_tokens", "service_tier",
    "web_search_requests", "audio_seconds", "input_characters",
))  # fmt: skip
#: How often the live tail looks for new records, and how far back (late-stored records).
TAIL_POLL = 0.5
TAIL_WINDOW = timedelta(minutes=10)
#: How far past the server's clock a record's time may be and still be tailed (gateway clocks
#: differ a little; one far ahead is in the list, not the tail).
TAIL_AHEAD = timedelta(minutes=1)
TAIL_PAGE = 500
#: New records one poll sends at most (10 pages; a faster flow is sampled, not held in memory).
TAIL_MAX_ROWS = 5000
TAIL_MAX_SECONDS = 3600.0  # the client reconnects; bounds a forgotten tab's work

QUEUE = web.AppKey("dashboard_queue", dict)
CLOSING = web.AppKey("dashboard_closing", asyncio.Event)


# -- export ---------------------------------------------------------------------------------------


def _csv_cell(v: Any) -> Any:
    if isinstance(v, dict):
        return orjson.dumps(v).decode()
    if isinstance(v, bool):
        return "true" if v else "false"  # as in JSON Lines, not Python's True
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r", "'"):
        # A spreadsheet must not run a stored value as a formula; the quote it hides is doubled
        # for a value that starts with one, so `'=x` and `=x` stay apart.
        return "'" + v
    return "" if v is None else v


async def export(request: web.Request) -> web.StreamResponse:
    fmt = request.query.get("format", "jsonl")
    if fmt not in query.EXPORT_FORMATS:
        raise api.BadParameter("format", "invalid parameter 'format': must be csv or jsonl")
    if "limit" in request.query or "cursor" in request.query:
        raise api.BadParameter("limit", "the export takes the list's filters, not limit or cursor")
    q = query.parse_list(request.query.items(), query.EXPORT_PARAMS)
    q.limit = EXPORT_PAGE
    store = request.app[api.STORE]
    tenant = request[api.TENANT]
    first = await store.list_requests(tenant, q)  # errors before any byte is sent become JSON
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="llmtap-requests-{stamp}.{fmt}"',
            "Cache-Control": "no-store",
        }
    )
    await api.open_stream(request, resp)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    if fmt == "csv":
        writer.writerow(EXPORT_COLUMNS)
    page = first
    while True:
        if fmt == "csv":
            for item in page.items:
                writer.writerow([_csv_cell(item.get(c)) for c in EXPORT_COLUMNS])
            chunk = buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
        else:
            chunk = b"".join(
                orjson.dumps({k: v for k, v in item.items() if k not in api.LIST_OMIT}) + b"\n"
                for item in page.items
            )
        await resp.write(chunk)
        if page.next_cursor is None:
            break
        q.cursor = page.next_cursor
        page = await store.list_requests(tenant, q)
    await resp.write_eof()
    return resp


# -- sessions list --------------------------------------------------------------------------------


async def list_sessions(request: web.Request) -> web.Response:
    """Sessions, most recently active first, in keyset pages (the list's filters and cursor)."""
    q = query.parse_list(request.query.items(), query.SESSIONS_PARAMS, walk=True)
    page = await request.app[api.STORE].list_sessions(request[api.TENANT], q)
    return api.json_response({"items": page.items, "next_cursor": page.next_cursor})


# -- live tail ------------------------------------------------------------------------------------


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events of records stored after the stream opened, matching the filters."""
    if "cursor" in request.query or "sort" in request.query:
        raise api.BadParameter("cursor", "the live tail takes the list's filters, not cursor or sort")
    q = query.parse_list(request.query.items(), query.TAIL_PARAMS)
    store = request.app[api.STORE]
    tenant = request[api.TENANT]
    opened = datetime.now(UTC)
    user_since, user_until = q.since, q.until
    q.limit = TAIL_PAGE
    q.order = "desc"
    seen: dict[str, str] = {}

    async def fresh(first: bool = False) -> list[dict[str, Any]]:
        """The newest records, page after page until one holds a record already sent: a poll
        that met more than a page of new ones sent only the newest page. Only those stamped
        up to `TAIL_AHEAD` past now: a gateway whose clock ran hours ahead filled every page
        with its own records, and no other record reached the tail while it was ahead."""
        q.since = max(user_since, opened - TAIL_WINDOW) if user_since else opened - TAIL_WINDOW
        ahead = datetime.now(UTC) + TAIL_AHEAD
        q.until = min(user_until, ahead) if user_until else ahead
        q.cursor, rows = None, []
        try:
            while True:
                page = await store.list_requests(tenant, q)
                rows += page.items
                if (
                    page.next_cursor is None
                    or first  # the first look: only what to leave out
                    or len(rows) >= TAIL_MAX_ROWS
                    or any(row["id"] in seen for row in page.items)
                ):
                    return rows
                q.cursor = page.next_cursor
        finally:
            q.cursor = None

    seen.update((row["id"], row["created_at"]) for row in await fresh(first=True))
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await api.open_stream(request, resp)
    # `opened_at` (the server's clock) lets a client catch up on what a broken stream missed.
    ready = orjson.dumps({"opened_at": opened.isoformat()})
    await resp.write(b": llmtap live tail\nretry: 2000\n\nevent: ready\ndata: " + ready + b"\n\n")
    try:
        await _tail(request, resp, fresh, seen)
    except ConnectionResetError:  # the client went away (closed the tab, paused the view)
        pass
    return resp


async def _tail(
    request: web.Request,
    resp: web.StreamResponse,
    fresh: Callable[[], Awaitable[list[dict[str, Any]]]],
    seen: dict[str, str],
) -> None:
    closing = request.app[CLOSING]
    deadline = time.monotonic() + TAIL_MAX_SECONDS
    last_ping = time.monotonic()
    while not closing.is_set() and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), TAIL_POLL)
        try:
            rows = await fresh()
        except BackendUnavailable as e:
            await resp.write(b"event: unavailable\ndata: " + orjson.dumps({"message": str(e)}) + b"\n\n")
            continue
        new = [row for row in reversed(rows) if row["id"] not in seen]
        out = b"".join(
            b"event: request\ndata: "
            + orjson.dumps({k: v for k, v in row.items() if k not in api.LIST_OMIT})
            + b"\n\n"
            for row in new
        )
        for row in new:
            seen[row["id"]] = row["created_at"]
        if len(seen) > TAIL_MAX_ROWS:  # forget what fell out of the window (in place: `fresh` reads it)
            cutoff = min(row["created_at"] for row in rows) if rows else ""
            kept = {k: v for k, v in seen.items() if v >= cutoff}
            seen.clear()
            seen.update(kept)
        if not out and time.monotonic() - last_ping > 15:
            out = b": ping\n\n"  # keeps proxies from closing an idle stream
        if out:
            last_ping = time.monotonic()
            await resp.write(out)


# -- pipeline health ------------------------------------------------------------------------------


async def _queue(app: web.Application) -> Queue:
    holder = app[QUEUE]
    async with holder["lock"]:
        if holder.get("queue") is None:
            from llmtap.queue import open_queue

            q = open_queue(app[api.SETTINGS])
            holder["description"] = q.description  # named while it cannot be reached too
            await q.connect("producer")
            holder["queue"] = q
        queue: Queue = holder["queue"]
        return queue


async def ingest_status(ingest: IngestQueue) -> dict[str, Any]:
    """This server's ingest queue (`ingest.db`): records gateways posted that wait for the store,
    and the dead letters of its drain; `error` (and no counts) when it cannot be read, which
    means ingest answers 503 and gateways spool."""
    try:
        st = await ingest.status()
    except BackendUnavailable as e:
        return {"lag": None, "dead_letters": None, "error": str(e)}
    return {"lag": st.lag, "dead_letters": st.dead_letters, "error": None}


async def pipeline(request: web.Request) -> web.Response:
    api.no_params(request)
    from llmtap.gateway.spool import spool_size

    settings = request.app[api.SETTINGS]
    info: dict[str, Any] = {
        "queue": None,
        "reachable": True,
        "error": None,
        "multi_tenant": settings.multi_tenant,
    }
    try:
        info["spool_bytes"] = spool_size(settings)
    except OSError:
        info["spool_bytes"] = None
    newest = (await request.app[api.STORE].list_requests(request[api.TENANT], ListQuery(limit=1))).items
    info["last_request_at"] = newest[0]["created_at"] if newest else None
    info["last_request_ended_at"] = newest[0]["ended_at"] if newest else None
    try:
        q = await _queue(request.app)
        info["queue"] = q.description or "queue"
        st = await q.status()
        info["lag"] = st.lag
        info["partitions"] = [
            {"partition": p.partition, "lag": p.lag, "owner": p.owner} for p in st.partitions
        ]
        info["dead_letter_count"] = st.dead_letters
        info["dead_letters"] = (
            None
            if settings.multi_tenant
            else [
                {
                    "id": d.id,
                    "request_id": d.request_id,
                    "partition": d.partition,
                    "offset": d.offset,
                    "key": d.key,
                    "reason": d.reason,
                    "failed_at": datetime.fromtimestamp(d.failed_at, UTC).isoformat(),
                    "size": len(d.value),
                }
                for d in await q.dead_letters(100)
            ]
        )
    except (BackendUnavailable, ConfigError) as e:  # ConfigError: a password refused mid-run
        info.update(reachable=False, error=str(e), lag=None, partitions=[], dead_letter_count=None)
        info.update(queue=request.app[QUEUE].get("description") or "queue", dead_letters=None)
    info["ingest"] = await ingest_status(request.app[api.INGEST])
    if settings.multi_tenant:
        # The queue, its lag and owners, the spool and the dead letters are every tenant's:
        # a tenant learns from them how much the others send. Its own newest request stays.
        info.update(
            queue=None,
            lag=None,
            partitions=[],
            dead_letter_count=None,
            dead_letters=None,
            spool_bytes=None,
            ingest=None,
            error=None if info["reachable"] else "the queue is unreachable",
        )
    return api.json_response(info)


async def replay(request: web.Request) -> web.Response:
    api.no_params(request)
    if request.app[api.SETTINGS].multi_tenant:
        return api.error_response(
            403, "dead letters hold every tenant's records: replay them with `llmtap dlq replay`"
        )
    if request.content_type != "application/json":  # a cross-site form cannot send JSON
        return api.error_response(415, "send the body as application/json")
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise api.BadParameter("body", 'the body must be JSON: {"ids": [...]} or {"all": true}') from None
    ids = body.get("ids") if isinstance(body, dict) else None
    everything = isinstance(body, dict) and body.get("all") is True
    if everything and ids is not None:  # fuzz2: ids beside `all` were ignored, all replayed
        raise api.BadParameter("ids", 'name dead-letter ids ({"ids": [...]}) or pass {"all": true}, not both')
    if not everything and not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
        raise api.BadParameter("ids", 'name dead-letter ids ({"ids": [...]}) or pass {"all": true}')
    q = await _queue(request.app)
    n = await q.replay_dead_letters(None if everything else ids)
    return api.json_response({"replayed": n})


# -- wiring ---------------------------------------------------------------------------------------


async def _on_shutdown(app: web.Application) -> None:
    app[CLOSING].set()


async def _on_cleanup(app: web.Application) -> None:
    q = app[QUEUE].get("queue")
    if q is not None:
        with contextlib.suppress(Exception):
            await q.close()


def add_routes(app: web.Application) -> None:
    """Register before `/api/v1/requests/{id}` (its pattern would take `export` and `stream`)."""
    app[QUEUE] = {"lock": asyncio.Lock(), "queue": None}
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    r = app.router
    r.add_get("/api/v1/requests/export", export)
    r.add_get("/api/v1/requests/stream", stream)
    r.add_get("/api/v1/sessions", list_sessions)
    r.add_get("/api/v1/pipeline", pipeline)
    r.add_post("/api/v1/pipeline/dead-letters/replay", replay)
