"""Tenants through the HTTP API: keys required in multi-tenant mode, and every endpoint, filter
and request id scoped to the key's tenant (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llmtap import keys
from llmtap.record import encode_many
from store_helpers import rec, store_params
from test_api import Server, start_server

pytestmark = pytest.mark.timeout(120)

ENDPOINTS = (
    "/api/v1/requests",
    "/api/v1/requests/{id}",
    "/api/v1/stats?group_by=property.team",
    "/api/v1/sessions/shared",
    "/api/v1/users",
)


@pytest.fixture(params=store_params())
async def mt(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    # Multi-tenant ingest is always authenticated (issue 7 item 11): the gateways' token.
    async for s in start_server(request.param, tmp_path, multi_tenant=True, ingest_token="gw-token"):
        s.ingest_headers = {"Authorization": "Bearer gw-token"}
        yield s


async def call(srv: Server, path: str, key: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with srv.http.get(srv.base + path, headers=headers) as r:
        return r.status, orjson.loads(await r.read())


def records_of(tenant: str, n: int, offset: int) -> list[Any]:
    return [
        rec(
            offset + i,
            tenant=tenant,
            user_id=f"{tenant}-user",
            session_id="shared",
            properties={"team": tenant},
            model=f"model-{tenant}",
        )
        for i in range(n)
    ]


async def test_every_endpoint_needs_a_valid_key(mt: Server) -> None:
    a = records_of("tenant-a", 3, 0)
    assert (await mt.ingest(encode_many(a)))[0] == 200  # ingest is a service path, not a tenant's
    _, key_a = await keys.create_key(mt.svc.store, "tenant-a", "test")
    for path in ENDPOINTS:
        path = path.format(id=a[0].id)
        for key in (None, "lt_" + "x" * 43, "not-a-key", key_a + "x"):
            status, body = await call(mt, path, key)
            assert status == 401, (path, key, status)
            assert "API key" in body["error"]["message"]
        status, _ = await call(mt, path, key_a)
        assert status == 200, path
    # public routes stay public
    async with mt.http.get(mt.base + "/healthz") as r:
        assert r.status == 200
    async with mt.http.get(mt.base + "/api/v1/openapi.json") as r:
        assert r.status == 200


async def test_each_key_sees_its_tenant_only(mt: Server) -> None:
    a = records_of("tenant-a", 5, 0)
    b = records_of("tenant-b", 3, 100)
    assert (await mt.ingest(encode_many(a + b)))[0] == 200
    _, key_a = await keys.create_key(mt.svc.store, "tenant-a", None)
    _, key_b = await keys.create_key(mt.svc.store, "tenant-b", None)

    for key, mine, theirs in ((key_a, a, b), (key_b, b, a)):
        tenant = mine[0].tenant
        other = theirs[0].tenant
        status, page = await call(mt, "/api/v1/requests?limit=1000", key)
        assert {i["id"] for i in page["items"]} == {r.id for r in mine}
        assert {i["tenant"] for i in page["items"]} == {tenant}
        # filters naming the other tenant's values find nothing
        for q in (f"user_id={other}-user", f"model=model-{other}", f"property.team={other}"):
            status, page = await call(mt, f"/api/v1/requests?{q}", key)
            assert (status, page["items"]) == (200, []), q
            status, s = await call(mt, f"/api/v1/stats?{q}", key)
            assert s["overall"]["count"] == 0, q
        # their request ids are unknown here
        for r in theirs:
            status, _ = await call(mt, f"/api/v1/requests/{r.id}", key)
            assert status == 404
        status, got = await call(mt, f"/api/v1/requests/{mine[0].id}", key)
        assert status == 200 and got["tenant"] == tenant
        # aggregates
        status, s = await call(mt, "/api/v1/stats?group_by=property.team&bucket=hour", key)
        assert s["overall"]["count"] == len(mine)
        assert [g["key"] for g in s["groups"]] == [tenant]
        assert sum(bk["count"] for bk in s["buckets"]) == len(mine)
        status, sess = await call(mt, "/api/v1/sessions/shared", key)
        assert sess["totals"]["count"] == len(mine)
        assert {r["id"] for r in sess["requests"]} == {r.id for r in mine}
        status, users = await call(mt, "/api/v1/users", key)
        assert [u["user_id"] for u in users["items"]] == [f"{tenant}-user"]
    # the same id in two tenants is two requests, each visible to its own tenant only
    same_a = rec(7, id="same-id", tenant="tenant-a", latency_ms=1.0)
    same_b = rec(7, id="same-id", tenant="tenant-b", latency_ms=2.0)
    assert (await mt.ingest(encode_many([same_a, same_b])))[0] == 200
    assert (await call(mt, "/api/v1/requests/same-id", key_a))[1]["latency_ms"] == 1.0
    assert (await call(mt, "/api/v1/requests/same-id", key_b))[1]["latency_ms"] == 2.0
    # a cursor from one tenant's pages, replayed with the other's key, yields only the other's rows
    _, page = await call(mt, "/api/v1/requests?limit=2", key_a)
    _, page_b = await call(mt, f"/api/v1/requests?limit=100&cursor={page['next_cursor']}", key_b)
    assert {i["tenant"] for i in page_b["items"]} <= {"tenant-b"}


async def test_revoked_key_stops_at_once_here_and_within_the_ttl_elsewhere(mt: Server) -> None:
    key, plain = await keys.create_key(mt.svc.store, "tenant-a", None)
    assert (await call(mt, "/api/v1/requests", plain))[0] == 200
    assert await keys.revoke_key(mt.svc.store, key.id)
    assert (await call(mt, "/api/v1/requests", plain))[0] == 401  # same process: immediately
    # revoked by another process (a `llmtap keys revoke` CLI run): stops within the cache TTL
    key2, plain2 = await keys.create_key(mt.svc.store, "tenant-a", None)
    assert (await call(mt, "/api/v1/requests", plain2))[0] == 200
    await mt.svc.store.revoke_key(key2.id)  # straight to the store: this process's cache is not told
    loop = asyncio.get_running_loop()
    deadline = loop.time() + keys.CACHE_TTL + 3
    while (await call(mt, "/api/v1/requests", plain2))[0] == 200:
        assert loop.time() < deadline
        await asyncio.sleep(0.2)
    assert (await call(mt, "/api/v1/requests", plain2))[0] == 401


@pytest.mark.parametrize("kind", store_params())
async def test_single_tenant_mode_needs_no_key_and_sees_the_default_tenant(kind: str, tmp_path: Path) -> None:
    async for srv in start_server(kind, tmp_path, default_tenant="solo"):
        mine = records_of("solo", 2, 0)
        other = records_of("someone-else", 2, 10)
        assert (await srv.ingest(encode_many(mine + other)))[0] == 200
        status, page = await call(srv, "/api/v1/requests", None)
        assert status == 200 and {i["id"] for i in page["items"]} == {r.id for r in mine}
        # a key of another tenant changes nothing in single-tenant mode
        _, plain = await keys.create_key(srv.svc.store, "someone-else", None)
        status, page = await call(srv, "/api/v1/requests", plain)
        assert {i["id"] for i in page["items"]} == {r.id for r in mine}


async def test_dashboard_page_is_served_without_a_key(mt: Server) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(mt.base + "/") as r:
            assert r.status == 200 and "static/app.js" in await r.text()
        async with http.get(mt.base + "/static/app.js") as r:  # the app sends the key it is given
            assert r.status == 200 and "Authorization" in await r.text()
