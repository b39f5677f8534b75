"""The server under attack and under load, through real HTTP (issue 7 items 8, 11, 14, 16).

- item 8: ingest answers once the batch is durable, a server SIGKILLed after answering still
  stores the batch when it comes back, and the route stored is the first one that delivered;
- item 11: multi-tenant ingest is always authenticated, a tenant's key writes only its tenant,
  and a body reference into another tenant's folder is refused;
- item 14: a foreign `Host` (DNS rebinding) gets 421, a non-JSON POST 415, HTML a strict CSP;
- item 16: malformed input of any kind is a 4xx naming the problem, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
import pytest
from yarl import URL

from llmtap import keys
from llmtap.config import Settings, load_settings
from llmtap.errors import ConfigError
from llmtap.gateway.sinks import IngestSink
from llmtap.handlers.chain import process_records
from llmtap.ingest_token import ingest_token
from llmtap.record import Body, LogRecord, compress, encode, encode_many
from llmtap.server.app import ServerService
from llmtap.server.security import host_allowed
from llmtap.store.base import StatsQuery
from procs import free_port, http_json, ingest_auth, llmtap_env, start_llmtap, wait_http, wait_until
from store_helpers import pg_database, pg_url
from store_helpers import rec as _rec

pytestmark = pytest.mark.timeout(180)

JSON = {"Content-Type": "application/json"}


def rec(i: int = 0, **kw: Any) -> LogRecord:
    kw.setdefault("tenant", "default")
    kw.setdefault("id", str(uuid.uuid4()))
    return _rec(i, **kw)


def inline(obj: Any) -> Body:
    raw = orjson.dumps(obj)
    return Body(content_type="application/json", size=len(raw), encoding="zstd", data=compress(raw))


async def start(tmp_path: Path, **kw: Any) -> ServerService:
    kw.setdefault("store", f"sqlite:{tmp_path / 'store.db'}")
    settings = Settings(
        host="127.0.0.1", server_port=0, data_dir=tmp_path, bodies=f"file:{tmp_path / 'bodies'}", **kw
    )
    svc = ServerService(settings)
    await svc.start()
    return svc


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerService]:
    svc = await start(tmp_path)
    yield svc
    await svc.stop()


async def post(
    http: aiohttp.ClientSession, svc: ServerService, payload: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    auth = {"Authorization": f"Bearer {ingest_token(svc.settings)}"} if headers is None else headers
    async with http.post(
        f"http://127.0.0.1:{svc.port}/api/v1/ingest", data=payload, headers={**JSON, **auth}
    ) as r:
        raw = await r.read()
        return r.status, orjson.loads(raw) if r.content_type == "application/json" else raw.decode()


# -- item 8: ingest answers when durable --------------------------------------------------------------


async def test_ingest_sink_gets_a_fast_answer_while_the_store_stalls_and_the_route_stays(
    tmp_path: Path,
) -> None:
    """The gateway's real IngestSink with a short timeout against a server whose store is held
    locked: the send succeeds (the gateway counts `ingest`, never falls through to the spool),
    the records are stored once the store frees up, with `route: ingest`; a second delivery of
    the same records by another route (the spool's replay through a worker) changes nothing."""
    svc = await start(tmp_path, ingest_token="tok")
    try:
        records = [rec(i) for i in range(500)]
        for i, r in enumerate(records):
            r.request_body = inline({"messages": [{"role": "user", "content": f"hello {i}" * 50}]})
        blocker = sqlite3.connect(tmp_path / "store.db", isolation_level=None, timeout=30)
        blocker.execute("BEGIN IMMEDIATE")
        sink = IngestSink(f"http://127.0.0.1:{svc.port}", "tok", timeout=8.0)
        await sink.start()
        try:
            await sink.send(records)  # raises BackendUnavailable on a timeout: the old behaviour
        finally:
            await sink.close()
            blocker.execute("ROLLBACK")
            blocker.close()
        await svc.ingest.drained(timeout=120)
        for r in records[::25]:
            row = await svc.store.get_request("default", r.id)
            assert row is not None and row["route"] == "ingest", row
        # the same records arrive again through the queue/spool path: first write wins
        again = [rec(0, id=r.id) for r in records[:50]]
        for r in again:
            r.route = "spool"
        items = await process_records(svc.chain, again)
        assert all(i.ok for i in items)
        for r in records[:50]:
            row = await svc.store.get_request("default", r.id)
            assert row is not None and row["route"] == "ingest"
    finally:
        await svc.stop()


async def test_gateway_in_fallback_counts_what_the_store_says(tmp_path: Path) -> None:
    """The e2e failure of issue 7: queue down, so a real gateway's batches go to the real
    server's ingest endpoint, whose store is stalled (locked). Before, ingest answered only
    after storing: the gateway timed out, spooled the batch, and the server stored it anyway
    as `ingest`. Now every batch is answered in time: the gateway counts `ingest` for all of
    them, spools nothing, and the store says `ingest` for each record."""
    from gateway_support import MemoryQueue, running_gateway
    from gateway_support import settings_for as gateway_settings
    from llmtap.testing.fake_upstream import make_app, serve

    svc = await start(tmp_path / "server", ingest_token="tok")
    runner, upstream = await serve(make_app())
    blocker = sqlite3.connect(tmp_path / "server" / "store.db", isolation_level=None, timeout=30)
    try:
        queue = MemoryQueue()
        queue.down = True
        settings = gateway_settings(
            upstream,
            tmp_path / "gateway",
            ingest_url=f"http://127.0.0.1:{svc.port}",
            ingest_token="tok",
            publish_batch_size=100,
        )
        blocker.execute("BEGIN IMMEDIATE")
        ids: list[str] = []
        async with running_gateway(settings, queue) as (gw, base), aiohttp.ClientSession() as http:
            chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(300):
                async with http.post(
                    f"{base}/openai/v1/chat/completions", json=chat, headers={"Authorization": "Bearer sk-x"}
                ) as r:
                    assert r.status == 200
                    ids.append(r.headers["Llmtap-Request-Id"])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while gw.publisher.pending and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert gw.publisher.routes["ingest"] == 300, gw.publisher.routes
            assert gw.publisher.routes["spool"] == 0 and gw.publisher.dropped == 0
        blocker.execute("ROLLBACK")
        await svc.ingest.drained(timeout=120)
        routes = {i: (await svc.store.get_request("default", i) or {}).get("route") for i in ids}
        assert set(routes.values()) == {"ingest"}, routes
        assert not list((tmp_path / "gateway" / "spool").glob("*.spool"))
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        await runner.cleanup()
        await svc.stop()


def test_server_sigkilled_after_answering_stores_the_batch_after_restart(tmp_path: Path) -> None:
    """The real `llmtap server` process: accept a batch while the store is locked (so nothing
    can be stored yet), SIGKILL it, free the store, start it again: every record is stored,
    once, with `route: ingest`."""
    port = free_port()
    env = llmtap_env(
        tmp_path / "data",
        server_port=port,
        host="127.0.0.1",
        store=f"sqlite:{tmp_path / 'store.db'}",
        bodies=f"file:{tmp_path / 'bodies'}",
    )
    base = f"http://127.0.0.1:{port}"
    server = start_llmtap("server", env, tmp_path / "server1.log")
    try:
        wait_http(base + "/healthz", 60)
        records = [rec(i) for i in range(200)]
        for i, r in enumerate(records):
            r.response_body = inline({"choices": [{"message": {"content": f"answer {i}"}}]})
        blocker = sqlite3.connect(tmp_path / "store.db", isolation_level=None, timeout=30)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            payload = orjson.loads(encode_many(records))
            status, body = http_json("POST", base + "/api/v1/ingest", payload, ingest_auth(tmp_path / "data"))
            assert (status, body) == (200, {"accepted": 200}), server.output()
            status, stats = http_json("GET", base + "/api/v1/stats")
            assert status == 200 and stats["overall"]["count"] == 0  # accepted, not stored
            server.stop(signal.SIGKILL, timeout=10)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert stats["overall"]["count"] == 0
        server = start_llmtap("server", env, tmp_path / "server2.log")
        wait_http(base + "/healthz", 60)

        def all_stored() -> bool:
            status, stats = http_json("GET", base + "/api/v1/stats")
            return status == 200 and stats["overall"]["count"] == 200

        wait_until(all_stored, 90, what="the accepted batch stored after the restart")
        for r in records[::20]:
            status, row = http_json("GET", f"{base}/api/v1/requests/{r.id}")
            assert status == 200 and row["route"] == "ingest"
            assert row["response_body"]["choices"][0]["message"]["content"].startswith("answer")
    finally:
        server.kill()


async def test_a_stopped_server_has_stored_everything_it_accepted(tmp_path: Path) -> None:
    """SIGTERM right after a big batch was accepted: stop drains it (the store is up)."""
    from llmtap.store.sqlite import SQLiteStore

    svc = await start(tmp_path)
    records = [rec(i) for i in range(500)]
    try:
        async with aiohttp.ClientSession() as http:
            assert await post(http, svc, encode_many(records)) == (200, {"accepted": 500})
    finally:
        await svc.stop()
    store = SQLiteStore(tmp_path / "store.db")
    await store.connect()
    try:
        missing = [r.id for r in records if await store.get_request("default", r.id) is None]
        assert missing == []
    finally:
        await store.close()


async def test_ingest_sink_timeout_warning_names_the_exception() -> None:
    """A server that accepts the connection and never answers: the reason is not empty."""
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    sink = IngestSink(f"http://127.0.0.1:{port}", None, timeout=1.0)
    await sink.start()
    try:
        with pytest.raises(Exception) as info:
            await sink.send([rec(1)])
        assert "TimeoutError" in str(info.value) and "within 1s" in str(info.value), str(info.value)
    finally:
        await sink.close()
        listener.close()


# -- item 11: tenants ---------------------------------------------------------------------------------


async def test_multi_tenant_ingest_needs_credentials_even_from_loopback(tmp_path: Path) -> None:
    svc = await start(tmp_path, multi_tenant=True)
    try:
        async with aiohttp.ClientSession() as http:
            r = rec(1, tenant="tenant-a")
            status, body = await post(http, svc, encode(r), {})  # from loopback, no credentials
            assert status == 401 and "LLMTAP_INGEST_TOKEN" in body["error"]["message"], body
            status, body = await post(http, svc, encode(r), {"Authorization": "Bearer llmtap-nope"})
            assert status == 401
        assert await svc.ingest.lag() == 0
        assert await svc.store.get_request("tenant-a", r.id) is None
    finally:
        await svc.stop()


async def test_tenant_key_cannot_forge_another_tenant_or_point_at_its_bodies(tmp_path: Path) -> None:
    svc = await start(tmp_path, multi_tenant=True, ingest_token="gateway-token")
    try:
        _, key_b = await keys.create_key(svc.store, "tenant-b", None)
        async with aiohttp.ClientSession() as http:
            # tenant A's record with a large body, through the gateways' token
            a = rec(1, tenant="tenant-a")
            a.request_body = inline({"messages": [{"role": "user", "content": "A's secret prompt"}]})
            assert (await post(http, svc, encode(a), {"Authorization": "Bearer gateway-token"}))[0] == 200
            await svc.ingest.drained()
            row_a = await svc.store.get_request("tenant-a", a.id)
            assert row_a is not None
            ref_a = row_a["request_body"]["ref"]
            assert ref_a and ref_a.startswith("tenant-a/")
            b_auth = {"Authorization": f"Bearer {key_b}"}

            # 1. B's key posting a record into A's tenant
            forged = rec(2, tenant="tenant-a")
            status, body = await post(http, svc, encode(forged), b_auth)
            assert status == 403 and "not the caller's tenant" in body["error"]["message"], body

            # 2. B's own record pointing at A's body (directly, and through '..')
            for ref in (
                ref_a,
                "tenant-b/../" + ref_a,
                "/" + ref_a,
                "tenant-b/" + ref_a.replace("tenant-a/", "../tenant-a/"),
            ):
                steal = rec(3, tenant="tenant-b")
                steal.request_body = Body(content_type="application/json", size=10, encoding="zstd", ref=ref)
                status, body = await post(http, svc, encode(steal), b_auth)
                assert status == 403 and "is not a body of tenant 'tenant-b'" in body["error"]["message"], (
                    body
                )
                await svc.ingest.drained()
                assert await svc.store.get_request("tenant-b", steal.id) is None
                async with http.get(
                    f"http://127.0.0.1:{svc.port}/api/v1/requests/{steal.id}", headers=b_auth
                ) as resp:
                    assert resp.status == 404

            # 3. even the gateways' token cannot store a ref across tenants
            steal = rec(4, tenant="tenant-b")
            steal.request_body = Body(content_type="application/json", size=10, encoding="zstd", ref=ref_a)
            status, body = await post(http, svc, encode(steal), {"Authorization": "Bearer gateway-token"})
            assert status == 400 and "is not a body of tenant" in body["error"]["message"]

            # 4. what B may do: its own records, stored under its tenant
            own = rec(5, tenant="tenant-b")
            own.request_body = inline({"messages": [{"role": "user", "content": "B's prompt"}]})
            assert (await post(http, svc, encode(own), b_auth)) == (200, {"accepted": 1})
            await svc.ingest.drained()
            async with http.get(
                f"http://127.0.0.1:{svc.port}/api/v1/requests/{own.id}", headers=b_auth
            ) as resp:
                got = await resp.json()
                assert resp.status == 200 and got["request_body"]["messages"][0]["content"] == "B's prompt"

            # 5. a ref inside B's own folder that names no body (its day folder, a name no file
            # system takes): refused at the door. Accepted, its reads failed for good and the
            # ingest drain retried it for ever, every tenant's fallback records stuck behind it.
            day = ref_a.replace("tenant-a/", "tenant-b/").rsplit("/", 1)[0]
            (tmp_path / "bodies" / day).mkdir(parents=True, exist_ok=True)
            for ref in (day, day.rsplit("/", 1)[0], f"{day}/{'x' * 300}.zst", f"{day}/x.pack#1"):
                wedge = rec(6, tenant="tenant-b")
                wedge.request_body = Body(content_type="application/json", size=1, encoding="zstd", ref=ref)
                status, body = await post(http, svc, encode(wedge), b_auth)
                assert status == 403 and "is not a body reference" in body["error"]["message"], (ref, body)
            # 6. B's own body, named by a record of another day: retention deletes what a purged
            # record names, a pack whole, so a record dated 2020 naming today's pack took
            # today's bodies with it (body-store review).
            own_row = await svc.store.get_request("tenant-b", own.id)
            assert own_row is not None and "#" in own_row["request_body"]["ref"]
            own_ref = own_row["request_body"]["ref"]
            single = own_ref.rsplit("/", 1)[0] + f"/{own.id}.request.{'0' * 24}.zst"
            for i, ref in enumerate((own_ref, single)):
                old = rec(8 + i, tenant="tenant-b", at=datetime(2020, 1, 1, tzinfo=UTC))
                old.request_body = Body(content_type="application/json", size=1, encoding="zstd", ref=ref)
                status, body = await post(http, svc, encode(old), b_auth)
                assert (
                    status == 403 and "not in the folder of the record's day" in body["error"]["message"]
                ), body
            same_day = rec(10, tenant="tenant-b", at=own.started_at)  # a pack of its day: fine
            same_day.request_body = Body(
                content_type="application/json", size=1, encoding="zstd", ref=own_ref
            )
            assert (await post(http, svc, encode(same_day), b_auth)) == (200, {"accepted": 1})
            after = rec(7, tenant="tenant-a")
            assert (await post(http, svc, encode(after), {"Authorization": "Bearer gateway-token"}))[0] == 200
            await svc.ingest.drained()
            assert await svc.store.get_request("tenant-a", after.id) is not None
        assert await svc.store.get_request("tenant-a", forged.id) is None
    finally:
        await svc.stop()


def test_every_body_key_of_a_tenant_lies_in_its_tenant_dir() -> None:
    """The ref check relies on this: a tenant's keys (and the file store's packs, named by
    the key's folder) start with `tenant_dir(tenant)`, and no other tenant's do."""
    from datetime import UTC, datetime

    from llmtap.bodies.base import body_key
    from llmtap.server.api import tenant_dir

    tenants = ["default", "acme", "grp/eu", "grp_eu", "a..b", "ünï", "x" * 200, "-"]
    when = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    for t in tenants:
        for part in ("request", "response", "events"):
            key = body_key(t, "0b5e-id", when, part, b"body")
            assert key.startswith(tenant_dir(t)), (t, key)
            pack = key.rpartition("/")[0] + "/18f3a-12-1.pack#0+100"
            assert pack.startswith(tenant_dir(t))
    dirs = {t: tenant_dir(t) for t in tenants}
    for t, d in dirs.items():
        for u, e in dirs.items():
            assert t == u or d != e, f"tenants {t!r} and {u!r} share a body folder (issue 7 item 12)"


# -- item 14: Host, content type, CSP --------------------------------------------------------------


async def test_foreign_host_is_refused_everywhere_but_probes(server: ServerService) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/api/v1/requests", "/api/v1/stats", "/api/v1/openapi.json", "/static/app.js"):
            for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "10.0.0.1"):
                async with http.get(base + path, headers={"Host": host}) as r:
                    assert r.status == 421, (path, host, r.status)
                    body = await r.json()
                    assert "LLMTAP_ALLOWED_HOSTS" in body["error"]["message"]
            for host in (
                f"localhost:{server.port}",
                f"127.0.0.1:{server.port}",
                f"[::1]:{server.port}",
                "LOCALHOST",
            ):
                async with http.get(base + path, headers={"Host": host}) as r:
                    assert r.status == 200, (path, host, r.status)
        r1 = rec(1)
        async with http.post(
            base + "/api/v1/ingest", data=encode(r1), headers={**JSON, "Host": "evil.example"}
        ) as r:
            assert r.status == 421
        for path in ("/healthz", "/metrics"):
            async with http.get(base + path, headers={"Host": "10.1.2.3:8788"}) as r:
                assert r.status == 200, path
    await server.ingest.drained()
    assert await server.store.get_request("default", r1.id) is None


async def test_allowed_hosts_setting(tmp_path: Path) -> None:
    svc = await start(tmp_path, allowed_hosts="llmtap.internal, .corp.example")
    base = f"http://127.0.0.1:{svc.port}"
    try:
        async with aiohttp.ClientSession() as http:
            for host, expected in (
                ("llmtap.internal", 200),
                ("LLMTAP.internal.:8788", 200),
                ("corp.example", 200),
                ("dash.corp.example", 200),
                ("evilcorp.example", 421),
                ("localhost", 200),  # an explicit list adds to the loopback names and bind host
            ):
                async with http.get(base + "/api/v1/requests", headers={"Host": host}) as r:
                    assert r.status == expected, host
    finally:
        await svc.stop()
    assert host_allowed("anything", frozenset({"*"}))
    assert not host_allowed(None, frozenset({"localhost"}))
    for bad in ("", "a,,b", "http://x", "x:80", "bad host", "a/b"):
        with pytest.raises(
            ConfigError, match=r"^invalid setting LLMTAP_ALLOWED_HOSTS: must be a comma-separated"
        ):
            load_settings(allowed_hosts=bad) if bad else load_settings(allowed_hosts=" ")
    assert load_settings(host="0.0.0.0").allowed_host_names >= {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
    # A gateway on the same machine posts its fallback records to the bind host: never refused.
    listed = load_settings(host="0.0.0.0", allowed_hosts="192.0.2.2,api.example")
    ingest_host = urlsplit(listed.effective_ingest_url).hostname
    assert host_allowed(ingest_host, listed.allowed_host_names)
    assert "myhost.lan" in load_settings(host="MyHost.lan").allowed_host_names


async def test_posts_must_be_json_so_cross_site_forms_fail(server: ServerService) -> None:
    base = f"http://127.0.0.1:{server.port}"
    r1 = rec(1)
    async with aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bearer {ingest_token(server.settings)}"}  # a token does not let it in
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            headers = {"Content-Type": ctype, **auth} if ctype else auth
            async with http.post(base + "/api/v1/ingest", data=encode(r1), headers=headers) as r:
                assert r.status == 415, ctype
                assert "application/json" in (await r.json())["error"]["message"]
        async with http.post(base + "/api/v1/webhooks/ep_x/test", skip_auto_headers={"Content-Type"}) as r:
            assert r.status == 415 and (await r.json())["error"]["message"].endswith("got none")
        await server.ingest.drained()
        assert await server.store.get_request("default", r1.id) is None
        async with http.post(
            base + "/api/v1/ingest",
            data=encode(r1),
            headers={"Content-Type": "application/json; charset=utf-8", **auth},
        ) as r:
            assert r.status == 200


async def test_strict_csp_and_no_inline_script(server: ServerService) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as r:
            html = await r.text()
            csp = r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        for directive in (
            "default-src 'self'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        ):
            assert directive in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        # the page needs nothing the policy forbids: no inline script, style or handler
        assert "<style" not in html
        for tag in re.findall(r"<script[^>]*>(.*?)</script>", html, re.S):
            assert tag.strip() == "", "inline script"
        assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
        assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
        for src in re.findall(r'(?:src|href)="(/[^"]*)"', html):
            async with http.get(base + src) as r:
                assert r.status == 200, src
                assert r.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(base + "/api/v1/requests") as r:
            assert r.headers["X-Content-Type-Options"] == "nosniff"


# -- item 16: bad input is a 4xx, never a 500 ----------------------------------------------------------


async def test_malformed_ingest_is_a_4xx_naming_the_problem(server: ServerService) -> None:
    good = orjson.loads(encode(rec(1)))
    deep_obj = b'{"a":' * 1000 + b"1" + b"}" * 1000
    cases: list[tuple[bytes, str]] = [
        (b"[" * 1000 + b"]" * 1000, "invalid record batch"),
        # refused at its first member now (a field no record has), before any depth is reached
        (deep_obj, "unknown field `a`"),
        (b"[" + deep_obj + b"]", "invalid record batch"),
        (b'{"v":1,"id":"x","properties":' + deep_obj + b"}", "record"),
        (orjson.dumps({**good, "status": "two hundred"}), "invalid record"),
        (encode(rec(1)).replace(b'"status":200', b'"status":1e999999'), "invalid record"),
        (
            encode(rec(1)).replace(b'"status":200', b'"status":123456789012345678901234567890'),
            "is not an HTTP status",
        ),
        (
            encode(rec(1)).replace(b'"prompt_tokens":11', b'"prompt_tokens":' + b"9" * 40),
            "is not a token count",
        ),
        (encode(rec(1)).replace(b'"size":20', b'"size":-' + b"9" * 25), "request_body.size"),
        (b'{"v":1,"id":"\xff\xfe"}', "UTF-8"),
        (b"\xff\xfe\x00{", "JSON log record"),
        (b'{"v":1,' + b'"id":"' + b"\xed\xa0\x80" + b'"}', "record"),
        (orjson.dumps({**good, "properties": {"k": ["list"]}}), "invalid record"),
        (orjson.dumps([good, 5]), "invalid record batch"),
        (orjson.dumps({**good, "tenant": None}), "invalid record"),
        (b"null", "JSON log record"),
        (b'"string"', "JSON log record"),
        # longer than GET /api/v1/requests/{id} takes: it could not be read back or paged past
        (encode(rec(1, id="R" * 513)), "Expected `str` of length <= 512 - at `$.id`"),
        (encode(rec(1, id="R" * 100_000)), "Expected `str` of length <= 512 - at `$.id`"),
    ]
    async with aiohttp.ClientSession() as http:
        for payload, fragment in cases:
            status, body = await post(http, server, payload)
            assert 400 <= status < 500, (payload[:80], status, body)
            assert fragment in body["error"]["message"], (payload[:80], body)
    assert await server.ingest.lag() == 0


async def test_oversized_ingest_is_413(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More than the server takes in one request (limit lowered to 1 MiB to spare the machine)."""
    from llmtap.server import app

    monkeypatch.setattr(app, "MAX_BODY", 1 << 20)
    svc = await start(tmp_path)
    try:

        async def huge() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b" " * (1 << 20)

        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{svc.port}/api/v1/ingest",
                data=huge(),
                headers={**JSON, "Authorization": f"Bearer {ingest_token(svc.settings)}"},
            ) as r:
                assert r.status == 413, r.status
                assert "error" in await r.json()
            assert (await post(http, svc, encode(rec(1))))[0] == 200  # the limit is not lower than that
        assert await svc.ingest.lag() in (0, 1)
    finally:
        await svc.stop()


async def test_an_undecodable_body_is_a_400_on_every_route_that_reads_one(
    server: ServerService, caplog: pytest.LogCaptureFixture
) -> None:
    """A body that is not the gzip/br/deflate its Content-Encoding says: 400 naming it, no
    traceback (aiohttp raises RequestPayloadError, which is no HTTPException, from read())."""
    import gzip

    base = f"http://127.0.0.1:{server.port}"
    auth = {"Authorization": f"Bearer {ingest_token(server.settings)}"}
    routes = [("POST", "/api/v1/alerts"), ("POST", "/api/v1/webhooks"), ("POST", "/api/v1/ingest")]
    routes.append(("PATCH", "/api/v1/alerts/x"))
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for encoding in ("gzip", "br", "deflate"):
            for method, path in routes:
                headers = {**JSON, **auth, "Content-Encoding": encoding}
                async with http.request(method, base + path, data=b'{"metric":"x"}', headers=headers) as r:
                    body = await r.json()
                    assert r.status == 400, (encoding, path, r.status, body)
                    want = f"the request body could not be decoded (Content-Encoding: {encoding})"
                    assert body["error"]["message"] == want
        # a body that is the gzip it says is still read
        record = encode(rec(1))
        headers = {**JSON, **auth, "Content-Encoding": "gzip"}
        async with http.post(base + "/api/v1/ingest", data=gzip.compress(record), headers=headers) as r:
            assert r.status == 200, await r.text()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text


async def test_a_static_name_too_long_for_any_file_is_404(
    server: ServerService, caplog: pytest.LogCaptureFixture
) -> None:
    """OSError ENAMETOOLONG from aiohttp's static resource: not found, not a 500 (whose log
    line named the install path)."""
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        for name in ("a" * 256, "a" * 5000, "a/" * 2100 + "app.js"):
            async with http.get(base + "/static/" + name) as r:
                assert r.status == 404, (len(name), r.status, await r.text())
                assert (await r.json())["error"]["message"] == "Not Found"
        async with http.get(base + "/static/app.js") as r:
            assert r.status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text


async def test_fuzzed_query_parameters_never_500(server: ServerService) -> None:
    """Seeded random names and values on every GET endpoint: 2xx or 4xx, never 5xx."""
    rnd = random.Random(7)
    alphabet = "abc_.-%+&=?#/ \\\x00\x7f\u00e9\u2028\ud800\U0001f600[]{}\"'<>0123456789"
    names = [
        "limit",
        "cursor",
        "since",
        "until",
        "order",
        "user_id",
        "session_id",
        "model",
        "provider",
        "status",
        "group_by",
        "bucket",
        "property.x",
        "property.",
        "q",
        "format",
    ]
    values = [
        "",
        "0",
        "-1",
        "1e309",
        "9" * 400,
        "nan",
        "inf",
        "2025-13-45",
        "1" * 13,
        "-" * 5,
        "9999-12-31T23:59:59+14:00",
        "0001-01-01T00:00:00-14:00",
        "%zz",
        "%ff%fe",
        "\x00",
        "property.",
        "property." + "x" * 5000,
        "minute",
        "asc",
    ]

    def text(n: int) -> str:
        return "".join(rnd.choice(alphabet) for _ in range(n))

    base = f"http://127.0.0.1:{server.port}"
    paths = ["/api/v1/requests", "/api/v1/stats", "/api/v1/users", "/api/v1/requests/x", "/api/v1/sessions/y"]
    seen: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        for n in range(600):
            parts = []
            for _ in range(rnd.randint(1, 4)):
                name = rnd.choice(names) if rnd.random() < 0.7 else text(rnd.randint(0, 12))
                value = rnd.choice(values) if rnd.random() < 0.5 else text(rnd.randint(0, 40))
                parts.append(f"{name}={value}")
            path = rnd.choice(paths)
            if path.endswith(("/x", "/y")) and rnd.random() < 0.5:
                path = path[:-1] + text(rnd.randint(1, 30)).replace("/", "").replace("?", "").replace("#", "")
            raw = path + "?" + "&".join(parts)
            async with http.get(URL(base + _encode(raw), encoded=True)) as r:
                assert r.status < 500, (n, raw, r.status, await r.text())
                seen[r.status] = seen.get(r.status, 0) + 1
    # the fuzz reached the handlers: some calls were valid, most were refused by name
    assert seen.get(200, 0) > 5 and seen.get(400, 0) > 200, seen


def _encode(raw: str) -> str:
    """Send the raw string as bytes on the request line, percent-escaping only what HTTP forbids."""
    out = []
    for ch in raw:
        b = ch.encode("utf-8", "surrogatepass")
        if len(b) == 1 and 0x21 <= b[0] < 0x7F and ch != "#":
            out.append(ch)
        else:
            out.append("".join(f"%{x:02X}" for x in b))
    return "".join(out)


async def test_stopping_waits_for_no_slow_query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM with a raw stats call in flight (seconds at 1M rows; here a query that never
    ends) stops the server at once, long before its shutdown timeout: the query is cut and its
    caller told 503. The store itself stays usable (in `llmtap up` the worker still writes)."""
    from llmtap.store.sqlite import SQLiteStore

    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"

    def slow_stats(self: SQLiteStore, tenant: str, query: Any) -> dict[str, Any]:
        self._fetch(endless, ())
        raise AssertionError("the endless query ended")

    monkeypatch.setattr(SQLiteStore, "_stats", slow_stats)
    # A call accepted as the stop begins asks for its read after the stop's first cut (an
    # outside check: such a call ran to the end, and the stop waited 30 s for it).
    stats = SQLiteStore.stats
    late = asyncio.Event()

    async def late_stats(self: SQLiteStore, tenant: str, query: Any) -> dict[str, Any]:
        if query.bucket == "day":
            late.set()
            await asyncio.sleep(1)
        return await stats(self, tenant, query)

    monkeypatch.setattr(SQLiteStore, "stats", late_stats)
    svc = await start(tmp_path, shutdown_timeout=300)
    store = svc.store
    assert isinstance(store, SQLiteStore)
    async with aiohttp.ClientSession() as http:

        async def ask(query: str = "") -> tuple[int, Any]:
            async with http.get(f"http://127.0.0.1:{svc.port}/api/v1/stats?exact=true{query}") as r:
                return r.status, await r.json()

        calls = [asyncio.ensure_future(ask()) for _ in range(2)]
        deadline = asyncio.get_running_loop().time() + 60
        while len(store._running) < 2:  # both queries are running
            assert asyncio.get_running_loop().time() < deadline, "the stats calls never started"
            await asyncio.sleep(0.02)
        calls.append(asyncio.ensure_future(ask("&bucket=day")))
        await asyncio.wait_for(late.wait(), 60)
        await asyncio.wait_for(svc.stop(), 60)  # not the 300 s shutdown timeout
        for status, body in await asyncio.gather(*calls):
            assert status == 503, body
    # Reads asked for after the cut run as usual (the store is shared with other services).
    monkeypatch.undo()
    await store.connect()
    try:
        assert (await store.stats("default", StatsQuery(exact=True)))["overall"]["count"] == 0
    finally:
        await store.close()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="needs PostgreSQL (scripts/services.sh up)")
async def test_stopping_cuts_postgresql_reads_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on SQLite: a stop with a raw stats call in flight on PostgreSQL (10-30 s at 10M rows;
    here one that never ends) ends its query on the server and answers 503 at once, and the
    store's later reads run. An outside check found the stop waited the whole shutdown timeout."""
    from llmtap.store.postgres import PostgresStore

    marker = f"llmtap-cut-{uuid.uuid4().hex[:8]}"

    async def endless_stats(self: PostgresStore, tenant: str, query: Any) -> dict[str, Any]:
        if query.bucket == "day":  # a call accepted as the stop begins: its read starts later
            late.set()
            await asyncio.sleep(1)
        await self._analytic(f"SELECT pg_sleep(3600) /* {marker} */", ())
        raise AssertionError("the endless query ended")

    async def until_sleeping(conn: asyncpg.Connection, n: int, what: str) -> None:
        q = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1"
        q += " AND pid <> pg_backend_pid()"
        deadline = asyncio.get_running_loop().time() + 60
        while (got := await conn.fetchval(q, f"%pg_sleep(3600) /* {marker}%")) != n:
            assert asyncio.get_running_loop().time() < deadline, f"{what}: {got} queries sleeping"
            await asyncio.sleep(0.05)

    late = asyncio.Event()
    async with pg_database() as url:
        stats = PostgresStore.stats
        monkeypatch.setattr(PostgresStore, "stats", endless_stats)
        svc = await start(tmp_path, store=url, shutdown_timeout=300)
        store = svc.store
        assert isinstance(store, PostgresStore)
        watcher = await asyncpg.connect(url)
        try:
            async with aiohttp.ClientSession() as http:

                async def ask(query: str = "") -> tuple[int, Any]:
                    async with http.get(f"http://127.0.0.1:{svc.port}/api/v1/stats?exact=true{query}") as r:
                        return r.status, await r.json()

                calls = [asyncio.ensure_future(ask()) for _ in range(2)]
                await until_sleeping(watcher, 2, "the stats queries never started")
                calls.append(asyncio.ensure_future(ask("&bucket=day")))
                await asyncio.wait_for(late.wait(), 60)
                await asyncio.wait_for(svc.stop(), 60)  # not the 300 s shutdown timeout
                for status, body in await asyncio.gather(*calls):
                    assert status == 503, body
            # The queries ended on the server too (asyncpg cancels them), not only in the client.
            await until_sleeping(watcher, 0, "the queries still run on the server")
        finally:
            await watcher.close()
        # Reads asked for after the cut run as usual (the store is shared with other services).
        monkeypatch.setattr(PostgresStore, "stats", stats)
        await store.connect()
        try:
            await store.cut_reads()  # nothing running: nothing to end
            assert (await store.stats("default", StatsQuery(exact=True)))["overall"]["count"] == 0
        finally:
            await store.close()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="needs PostgreSQL (scripts/services.sh up)")
async def test_a_failed_part_of_postgresql_stats_ends_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw stats run overall, groups and buckets as three queries at once. When one failed (cut
    by a stop as it began), `asyncio.gather` answered at once and left the others running: a
    query no one awaited held its connection, and the stop's pool close waited for it. (The
    others now run a query that never ends; the overall part fails once they are under way.)"""
    from llmtap.store import sql
    from llmtap.store.postgres import PostgresStore

    marker = f"llmtap-sibling-{uuid.uuid4().hex[:8]}"

    def aggregate_sql(d: Any, tenant: str, query: Any, kind: str, **kw: Any) -> tuple[str, list[Any]]:
        if kind == "overall":  # fails once the others are under way
            return "SELECT pg_sleep(0.5), 1 / 0", []
        return f"SELECT pg_sleep(3600) /* {marker} */", []

    monkeypatch.setattr(sql, "aggregate_sql", aggregate_sql)
    async with pg_database() as url:
        store = PostgresStore(url)
        await store.connect()
        watcher = await asyncpg.connect(url)
        try:
            with pytest.raises(asyncpg.DivisionByZeroError):
                await asyncio.wait_for(store.stats("default", StatsQuery(exact=True, group_by="model")), 60)
            q = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1"
            q += " AND pid <> pg_backend_pid()"
            deadline = asyncio.get_running_loop().time() + 20  # the pool's close would wait 3600 s
            while running := await watcher.fetchval(q, f"%pg_sleep(3600) /* {marker}%"):
                assert asyncio.get_running_loop().time() < deadline, f"{running} queries left running"
                await asyncio.sleep(0.05)
        finally:
            await watcher.close()
            await asyncio.wait_for(store.close(), 60)
