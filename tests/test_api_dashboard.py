"""The API endpoints and parameters the dashboard added, over both stores, through HTTP.

Sorting by cost and latency, the status-class and range filters, the streamed export, the live
tail (SSE) and pipeline health. Expected orders and selections are computed here in Python from
the records (or, for values the server derives such as cost, from the plain time-ordered list).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llmtap import keys
from llmtap.record import Body, encode_many
from llmtap.store.query import encode_cursor
from llmtap.testing import dashboard_data as dd
from store_helpers import dataset, store_params
from test_api import Server, rec, start_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=store_params())
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    async for s in start_server(request.param, tmp_path):
        yield s


async def _all(server: Server, query: str, limit: int = 7) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        status, page = await server.get(f"/api/v1/requests?limit={limit}{query}{cursor}")
        assert status == 200, page
        items += page["items"]
        if not page["next_cursor"]:
            return items
        cursor = "&cursor=" + page["next_cursor"]


async def _load(server: Server, n: int = 120) -> None:
    records = dataset(n, seed=5, tenants=("default", "other"))
    status, body, _ = await server.ingest(encode_many(records))
    assert status == 200, body


async def test_sort_by_cost_and_latency_pages_in_keyset_order(server: Server) -> None:
    await _load(server)
    rows = await _all(server, "", limit=1000)  # time order: the set to sort
    assert any(r["cost_usd"] is None for r in rows) and any(r["cost_usd"] is not None for r in rows)

    def key(field: str) -> Any:
        def k(r: dict[str, Any]) -> tuple[float, str, str]:
            v = r[field]
            return (-1.0 if v is None else float(v), r["created_at"], r["id"])

        return k

    for field, sort in (("cost_usd", "cost"), ("latency_ms", "latency")):
        for order in ("desc", "asc"):
            got = await _all(server, f"&sort={sort}&order={order}")
            want = sorted(rows, key=key(field), reverse=order == "desc")
            assert [r["id"] for r in got] == [r["id"] for r in want], (sort, order)
    # Unpriced requests sort below every priced one (never as $0 among them).
    by_cost = await _all(server, "&sort=cost")
    first_none = next(i for i, r in enumerate(by_cost) if r["cost_usd"] is None)
    assert all(r["cost_usd"] is None for r in by_cost[first_none:])
    # A cursor belongs to its sort.
    status, page = await server.get("/api/v1/requests?limit=3&sort=cost")
    status, body = await server.get("/api/v1/requests?limit=3&sort=latency&cursor=" + page["next_cursor"])
    assert status == 400 and body["error"]["parameter"] == "cursor"
    status, body = await server.get("/api/v1/requests?sort=price")
    assert status == 400 and body["error"]["parameter"] == "sort"


async def test_sorted_pages_of_a_time_range_either_plan(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite walks the sort key's index for a range of many rows and sorts a range of few
    (`SORT_INDEX_MIN_ROWS`); both plans page through the same rows in the same order."""
    from llmtap.store import sqlite

    await _load(server)
    rows = await _all(server, "", limit=1000)
    since = sorted(r["created_at"] for r in rows)[len(rows) // 3]
    in_range = [r for r in rows if r["created_at"] >= since]
    assert 10 < len(in_range) < len(rows)
    for field, sort in (("cost_usd", "cost"), ("latency_ms", "latency")):
        want = sorted(
            in_range,
            key=lambda r: (-1.0 if r[field] is None else float(r[field]), r["created_at"], r["id"]),
            reverse=True,
        )
        for bound in (1, 10**9):  # every range "large" (index walk), every range "small" (sort)
            monkeypatch.setattr(sqlite, "SORT_INDEX_MIN_ROWS", bound)
            got = await _all(server, f"&sort={sort}&since={since.replace('+', '%2B')}", limit=4)
            assert [r["id"] for r in got] == [r["id"] for r in want], (sort, bound)


async def test_sessions_list_pages_most_recent_first_with_totals(server: Server) -> None:
    records = dataset(150, seed=9, tenants=("default", "other"))
    status, body, _ = await server.ingest(encode_many(records))
    assert status == 200, body
    mine = [r for r in records if r.tenant == "default" and r.session_id]

    def expected(rs: list[Any]) -> list[tuple[str, int, int, int | None]]:
        by: dict[str, list[Any]] = {}
        for r in rs:
            by.setdefault(r.session_id, []).append(r)
        out = []
        for sid, group in by.items():
            newest = max(group, key=lambda r: (r.started_at, r.id))
            errors = sum(1 for r in group if r.status >= 400 or r.outcome != "completed")
            tokens = sum(r.usage.total_tokens or 0 for r in group)
            out.append((sid, len(group), errors, tokens, (newest.started_at, newest.id)))
        # most recently active first: by the newest request (its id breaks a tie)
        out.sort(key=lambda x: x[4], reverse=True)
        return [x[:4] for x in out]

    async def pages(query: str, limit: int) -> list[tuple[str, int, int, int]]:
        got: list[dict[str, Any]] = []
        cursor = ""
        while True:
            status, page = await server.get(f"/api/v1/sessions?limit={limit}{query}{cursor}")
            assert status == 200, page
            assert len(page["items"]) <= limit
            got += page["items"]
            if not page["next_cursor"]:
                break
            cursor = "&cursor=" + page["next_cursor"]
        return [(x["session_id"], x["count"], x["error_count"], x["total_tokens"]) for x in got]

    want = expected(mine)
    assert len(want) == 3
    assert await pages("", 1) == want  # the other tenant's sessions never appear
    assert await pages("", 1000) == want
    # Filters select the requests a session's totals cover (and so which sessions are listed).
    gpt = [r for r in mine if r.model == "gpt-4o"]
    assert gpt and len(gpt) < len(mine)
    assert await pages("&model=gpt-4o", 2) == expected(gpt)
    env = mine[0].properties.get("env") or "prod"
    with_env = [r for r in mine if r.properties.get("env") == env]
    assert with_env and await pages("&property.env=" + env, 2) == expected(with_env)
    # SQLite walks a filter property's rows (`sql.property_walk`); the answers are the same.
    assert await pages("&property.env=nope", 2) == []
    both = [r for r in with_env if r.model == "gpt-4o"]
    assert await pages(f"&property.env={env}&model=gpt-4o", 1) == expected(both)
    red = [r for r in with_env if r.properties.get("team") == "red"]
    assert await pages(f"&property.env={env}&property.team=red", 1) == expected(red)
    status, body = await server.get("/api/v1/sessions?sort=cost")
    assert status == 400 and body["error"]["parameter"] == "sort"
    status, body = await server.get("/api/v1/sessions?cursor=nope")
    assert status == 400 and body["error"]["parameter"] == "cursor"
    # A walk's cursor carries its bound (`encode_walk_cursor`); a tampered bound is refused,
    # a cursor of the requests list (no bound) still pages.
    for bad in ([1, "a", "x"], [1, "a", 1.5], [1, "a", 2**62], [1, "a", 2, 3]):
        raw = base64.urlsafe_b64encode(orjson.dumps(bad)).decode().rstrip("=")
        status, body = await server.get("/api/v1/sessions?cursor=" + raw)
        assert status == 400 and body["error"]["parameter"] == "cursor", bad
    status, _ = await server.get("/api/v1/sessions?cursor=" + encode_cursor(2**40, "z"))
    assert status == 200


async def test_status_class_and_range_filters(server: Server) -> None:
    await _load(server)
    rows = await _all(server, "", limit=1000)
    costs = sorted(r["cost_usd"] for r in rows if r["cost_usd"] is not None)
    lats = sorted(r["latency_ms"] for r in rows)
    c1, c3 = costs[len(costs) // 4], costs[3 * len(costs) // 4]
    l1, l3 = lats[len(lats) // 4], lats[3 * len(lats) // 4]

    def priced(r: dict[str, Any], lo: float, hi: float) -> bool:
        return r["cost_usd"] is not None and lo <= r["cost_usd"] <= hi

    cases: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
        ("&status_class=4xx", lambda r: r["status"] is not None and 400 <= r["status"] < 500),
        ("&status_class=2xx", lambda r: r["status"] is not None and 200 <= r["status"] < 300),
        (f"&min_cost_usd={c3!r}", lambda r: priced(r, c3, 1e12)),
        (f"&min_cost_usd={c1!r}&max_cost_usd={c3!r}", lambda r: priced(r, c1, c3)),
        (f"&max_latency_ms={l1!r}", lambda r: r["latency_ms"] <= l1),
        (f"&min_latency_ms={l3!r}&status_class=5xx", lambda r: r["latency_ms"] >= l3 and r["status"] == 500),
        # Errors a status class cannot find (a 200 cut mid-stream, a client gone): what error_count counts.
        ("&outcome=upstream_cut", lambda r: r["outcome"] == "upstream_cut"),
        ("&error=true", lambda r: (r["status"] or 0) >= 400 or r["outcome"] != "completed"),
        (
            "&error=false&provider=openai",
            lambda r: (r["status"] or 0) < 400 and r["outcome"] == "completed" and r["provider"] == "openai",
        ),
        (
            "&error=true&status_class=2xx",
            lambda r: r["outcome"] != "completed" and 200 <= (r["status"] or 0) < 300,
        ),
    ]
    for query, pred in cases:
        want = [r["id"] for r in rows if pred(r)]
        got = [r["id"] for r in await _all(server, query)]
        assert want and got == want, query
        # stats take the same filters
        status, st = await server.get("/api/v1/stats?" + query.lstrip("&"))
        assert status == 200 and st["overall"]["count"] == len(want), query
    status, st = await server.get("/api/v1/stats")
    assert st["overall"]["error_count"] == len(await _all(server, "&error=true"))  # one definition
    bad_ones = ("status_class=6xx", "min_cost_usd=-1", "max_latency_ms=nan", "min_cost_usd=abc", "outcome=x")
    for bad in (*bad_ones, "error=yes"):
        status, body = await server.get("/api/v1/requests?" + bad)
        assert status == 400 and body["error"]["parameter"] == bad.split("=")[0], bad


async def test_export_streams_every_matching_row(server: Server) -> None:
    await _load(server, 300)
    evil = rec(9999, id="formula", user_id='=HYPERLINK("http://x")', properties={"a": "b"})
    status, body, _ = await server.ingest(encode_many([evil]))
    assert status == 200, body
    tables = {}
    for query in ("", "&provider=openai&status_class=2xx", "&property.env=prod"):
        listed = await _all(server, query, limit=1000)
        async with server.http.get(f"{server.base}/api/v1/requests/export?format=jsonl{query}") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
            assert "attachment" in r.headers["Content-Disposition"]
            lines = (await r.read()).splitlines()
        assert [orjson.loads(x) for x in lines] == listed, query
        async with server.http.get(f"{server.base}/api/v1/requests/export?format=csv{query}") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
            tables[query] = list(csv.DictReader(io.StringIO(await r.text())))
        assert [t["id"] for t in tables[query]] == [x["id"] for x in listed], query
    row = next(t for t in tables[""] if t["id"] == "formula")
    assert row["user_id"] == '\'=HYPERLINK("http://x")'  # no formula for a spreadsheet to run
    for bad, param in (
        ("format=xml", "format"),
        ("format=csv&limit=5", "limit"),
        ("format=csv&modle=x", "modle"),
    ):
        status, body = await server.get("/api/v1/requests/export?" + bad)
        assert status == 400 and body["error"]["parameter"] == param, bad


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_an_export_cut_mid_way_ends_unfinished_not_with_a_second_answer(
    server: Server, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """An outside check: a store read failing after the first page (a stop cutting reads, an
    outage) had a whole 503 response written into the 200's chunked body. curl kept a cut CSV
    after a framing error; an aiohttp client waited for ever. The connection now ends without
    the last chunk: every client sees an unfinished transfer, and the rows sent stay whole."""
    from llmtap.errors import TransientError
    from llmtap.server import dashboard
    from llmtap.server.app import API_REQUESTS

    await _load(server, 300)
    monkeypatch.setattr(dashboard, "EXPORT_PAGE", 50)
    store = server.svc.store
    read = store.list_requests
    pages = 0

    async def cut_after_two(tenant: str, q: Any) -> Any:
        nonlocal pages
        pages += 1
        if pages > 2:
            raise TransientError("the server is stopping")
        return await read(tenant, q)

    monkeypatch.setattr(store, "list_requests", cut_after_two)
    cut = API_REQUESTS.labels("/api/v1/requests/export", "503")
    counted = cut._value.get()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.svc.port)
    writer.write(f"GET /api/v1/requests/export?format={fmt} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 60)  # to the end: the server closes
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and raw.count(b"HTTP/1.1 ") == 1, raw[-300:]
    assert b"Transfer-Encoding: chunked" in head and not body.endswith(b"0\r\n\r\n"), raw[-300:]
    rows = b""  # the chunks sent: two pages, whole
    while body:
        size, _, rest = body.partition(b"\r\n")
        rows, body = rows + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
    lines = rows.decode().splitlines()
    assert len(lines) == 100 + (fmt == "csv"), lines[-3:]
    assert cut._value.get() == counted + 1  # in the metrics as what it would have answered
    pages = 0
    async with server.http.get(f"{server.base}/api/v1/requests/export?format={fmt}") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), 60)
    pages = -1000  # the store answers again: the export is whole
    async with server.http.get(f"{server.base}/api/v1/requests/export?format=jsonl") as r:
        assert len((await r.read()).splitlines()) == len(await _all(server, "", limit=1000))


async def _events(server: Server, query: str, want: int, send: Callable[[], Awaitable[None]]) -> list[Any]:
    """The first `want` request events of a live tail opened before `send()` runs."""
    out: list[Any] = []
    ready = asyncio.Event()
    async with server.http.get(f"{server.base}/api/v1/requests/stream?{query}") as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"

        async def read() -> None:
            event = None
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "ready":
                    ready.set()
                elif line.startswith("data: ") and event == "request":
                    out.append(orjson.loads(line[6:]))
                    if len(out) >= want:
                        return

        task = asyncio.create_task(read())
        await asyncio.wait_for(ready.wait(), 30)
        await send()
        await asyncio.wait_for(task, 30)
    return out


async def test_live_tail_sends_new_matching_records_only(server: Server) -> None:
    await _load(server, 20)  # stored before the stream opened: never sent
    now = datetime.now(UTC)
    new = [rec(5000 + i, id=f"new-{i}", at=now, model="gpt-4o" if i % 2 else "gpt-4o-mini") for i in range(6)]

    async def send() -> None:
        status, body, _ = await server.ingest(encode_many(new))
        assert status == 200, body

    got = await _events(server, "model=gpt-4o", 3, send)
    assert sorted(r["id"] for r in got) == ["new-1", "new-3", "new-5"]
    assert all("request_body" not in r for r in got)


async def test_a_gateway_clock_hours_ahead_does_not_hide_the_others_from_the_tail(server: Server) -> None:
    """The clock audit: 510 records stamped 3 h ahead (a gateway whose clock ran ahead) filled
    every poll's page of the newest records, and no other record reached the tail."""
    ahead = datetime.now(UTC) + timedelta(hours=3)
    future = [rec(7000 + i, id=f"ahead-{i}", at=ahead) for i in range(510)]
    status, body, _ = await server.ingest(encode_many(future))
    assert status == 200, body
    now = datetime.now(UTC)
    new = [rec(7600 + i, id=f"now-{i}", at=now) for i in range(5)]

    async def send() -> None:
        status, body, _ = await server.ingest(encode_many(new))
        assert status == 200, body

    got = await _events(server, "", 5, send)
    assert sorted(r["id"] for r in got) == [f"now-{i}" for i in range(5)]


async def test_more_new_records_than_a_page_in_one_poll_all_reach_the_live_tail(server: Server) -> None:
    """A poll read the newest 500 records only: a burst of more between two polls (half a
    second) sent its newest 500 and never the rest."""
    now = datetime.now(UTC)
    new = [rec(8000 + i, id=f"burst-{i:04d}", at=now + timedelta(microseconds=i)) for i in range(1300)]

    async def send() -> None:
        status, body, _ = await server.ingest(encode_many(new))
        assert status == 200, body

    got = await _events(server, "", 1300, send)
    assert sorted(r["id"] for r in got) == [r.id for r in new]


async def test_live_tail_takes_the_body_search(server: Server) -> None:
    """`q=` narrows the tail like the list: the dashboard's search box applies to both."""

    def body(text: str) -> Body:
        raw = orjson.dumps({"messages": [{"role": "user", "content": text}]})
        return Body(content_type="application/json", size=len(raw), encoding="identity", data=raw)

    now = datetime.now(UTC)
    new = [
        rec(6000 + i, id=f"q-{i}", at=now, request_body=body("a Haystack" if i % 2 else "plain hay"))
        for i in range(6)
    ]

    async def send() -> None:
        status, got, _ = await server.ingest(encode_many(new))
        assert status == 200, got

    got = await _events(server, "q=HAYSTACK", 3, send)
    assert sorted(r["id"] for r in got) == ["q-1", "q-3", "q-5"]
    assert (await server.get("/api/v1/requests/stream?q="))[0] == 400


async def test_pipeline_health_and_replay_rules(server: Server, tmp_path: Path) -> None:
    status, health = await server.get("/api/v1/pipeline")
    assert status == 200 and health["reachable"] and health["dead_letters"] == []
    assert len(health["partitions"]) == server.svc.settings.partitions
    assert health["last_request_at"] is None
    await server.ingest(encode_many([rec(1)]))
    status, health = await server.get("/api/v1/pipeline")
    assert health["last_request_at"] is not None
    async with server.http.post(f"{server.base}/api/v1/pipeline/dead-letters/replay", data=b"ids=1") as r:
        assert r.status == 415  # a cross-site form cannot trigger it
    async with server.http.post(f"{server.base}/api/v1/pipeline/dead-letters/replay", json={}) as r:
        assert r.status == 400
    both = {"all": True, "ids": ["x"]}  # fuzz2: the ids were ignored and everything replayed
    async with server.http.post(f"{server.base}/api/v1/pipeline/dead-letters/replay", json=both) as r:
        assert r.status == 400 and "not both" in (await r.json())["error"]["message"]
    async with server.http.post(
        f"{server.base}/api/v1/pipeline/dead-letters/replay", json={"all": True}
    ) as r:
        assert r.status == 200 and (await r.json()) == {"replayed": 0}


async def test_multi_tenant_pipeline_hides_dead_letters_and_export_is_scoped(tmp_path: Path) -> None:
    async for s in start_server("sqlite", tmp_path, multi_tenant=True, ingest_token="gw-token"):
        s.ingest_headers = {"Authorization": "Bearer gw-token"}
        a = dd.dataset(15, tenant="tenant-a", seed=1)
        b = dd.dataset(15, tenant="tenant-b", seed=2)
        status, body, _ = await s.ingest(encode_many(a + b))
        assert status == 200, body
        _, key = await keys.create_key(s.svc.store, "tenant-a", None)
        auth = {"Authorization": f"Bearer {key}"}
        status, _ = await s.get("/api/v1/requests/export?format=jsonl")
        assert status == 401
        status, _ = await s.get("/api/v1/pipeline")
        assert status == 401
        status, text = await s.get("/api/v1/requests/export?format=jsonl", headers=auth)
        assert status == 200
        assert sorted(orjson.loads(x)["id"] for x in text.splitlines()) == sorted(r.id for r in a)
        status, health = await s.get("/api/v1/pipeline", headers=auth)
        assert status == 200 and health["dead_letters"] is None
        # Queue-wide figures tell one tenant how much the others send: not shown to tenants.
        hidden = ("queue", "lag", "dead_letter_count", "spool_bytes")
        assert [health[k] for k in hidden] == [None] * 4 and health["partitions"] == [], health
        assert health["last_request_at"] == max(r.started_at for r in a).isoformat().replace("+00:00", "Z")
        async with s.http.post(
            f"{s.base}/api/v1/pipeline/dead-letters/replay", json={"all": True}, headers=auth
        ) as r:
            assert r.status == 403


async def test_pipeline_names_a_queue_it_cannot_reach_without_its_password(tmp_path: Path) -> None:
    """The Pipeline page said "UNREACHABLE" under an empty queue name: which queue was not said."""
    import socket

    from llmtap.config import Settings
    from llmtap.server.app import ServerService

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    settings = Settings(
        data_dir=tmp_path, server_port=0, store=f"sqlite:{tmp_path / 'store.db'}",
        bodies=f"file:{tmp_path / 'bodies'}", queue=f"redis://:s3cret-pw@127.0.0.1:{port}/0",
    )  # fmt: skip
    svc = ServerService(settings)
    await svc.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{svc.port}/api/v1/pipeline") as r:
                assert r.status == 200
                info = await r.json()
    finally:
        await svc.stop()
    assert info["reachable"] is False and info["error"], info
    assert info["queue"] == f"redis://:***@127.0.0.1:{port}/0 (Redis Streams)", info
    assert "s3cret" not in str(info)
