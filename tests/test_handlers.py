"""Handlers on real backends: file bodies, the SQLite store, a real HTTP webhook receiver."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from llmtap.bodies.base import body_key
from llmtap.bodies.file import FileBodyStore
from llmtap.config import Settings
from llmtap.errors import TransientError
from llmtap.handlers.base import Item, build_chain
from llmtap.handlers.bodies import BodyHandler
from llmtap.handlers.cost import CostHandler
from llmtap.handlers.store import StoreHandler
from llmtap.handlers.webhook import WebhookHandler
from llmtap.record import Body, Usage, decompress
from llmtap.store.sqlite import SQLiteStore
from worker_helpers import T0, make_record


class CountingBodies(FileBodyStore):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.calls: list[list[tuple[str, bytes]]] = []
        self.down = False

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[str]:
        if self.down:
            raise TransientError("body store down")
        self.calls.append(list(items))
        return await super().put_many(items)


@pytest.fixture
async def bodies(tmp_path: Path) -> AsyncIterator[CountingBodies]:
    b = CountingBodies(str(tmp_path / "bodies"))
    await b.connect()
    yield b
    await b.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "store.db"))
    await s.connect()
    yield s
    await s.close()


async def test_body_handler_writes_once_per_batch_and_leaves_references(bodies: CountingBodies) -> None:
    recs = [make_record(i) for i in range(5)]
    recs[1].response_body = None  # omitted by the client
    ref = body_key("acme", recs[2].id, T0, "response", b"")
    recs[2].response_body = Body(content_type="application/json", size=3, ref=ref)  # already stored
    recs[3].response_events = Body(content_type="text/event-stream", size=4, data=b"data")
    items = [Item(r) for r in recs]
    await BodyHandler(bodies).handle(items)

    assert len(bodies.calls) == 1  # one put_many for the whole batch
    assert len(bodies.calls[0]) == 5 + 3 + 1  # 5 requests, 3 inline responses, 1 events
    for i, r in enumerate(recs):
        assert r.request_body is not None
        assert r.request_body.data is None
        day = body_key("acme", r.id, T0, "request", b"").rpartition("/")[0]
        assert r.request_body.ref.startswith(day + "/")
        assert r.request_body.encoding == "zstd" and r.request_body.size == 20
        stored = await bodies.get(r.request_body.ref)
        assert stored is not None and decompress(stored) == b'{"q": %d}' % i
    assert recs[1].response_body is None
    assert recs[2].response_body is not None and recs[2].response_body.ref == ref
    assert await bodies.get(ref) is None  # it was not written by us
    assert recs[3].response_events is not None and recs[3].response_events.ref is not None
    assert await bodies.get(recs[3].response_events.ref) == b"data"
    assert recs[0].response_body is not None and recs[0].response_body.encoding == "identity"

    # Idempotent: a second pass over the same (now referenced) records writes nothing.
    await BodyHandler(bodies).handle([Item(r) for r in recs])
    assert len(bodies.calls) == 1


async def test_body_handler_outage_is_transient_and_changes_nothing(bodies: CountingBodies) -> None:
    rec = make_record()
    bodies.down = True
    with pytest.raises(TransientError):
        await BodyHandler(bodies).handle([Item(rec)])
    assert rec.request_body is not None and rec.request_body.data is not None  # still inline


async def test_body_handler_stores_bodies_of_any_request_id(bodies: CountingBodies) -> None:
    """An id that is a path (or NUL, or huge) still names a body, inside the root."""
    odd = [make_record(id=i) for i in ("../../etc/passwd", "a/b", "..", "n\0l", "x" * 50_000)]
    items = [Item(r) for r in odd]
    await BodyHandler(bodies).handle(items)
    for item, r in zip(items, odd, strict=True):
        assert item.ok and r.request_body is not None and r.request_body.ref
        assert ".." not in r.request_body.ref.split("/")
        stored = await bodies.get(r.request_body.ref)
        assert stored is not None and decompress(stored).startswith(b'{"q"')


async def test_cost_handler_fills_or_leaves_none() -> None:
    known, unknown, missing = (
        make_record(),
        make_record(model="model-nobody-sells"),
        make_record(usage=Usage()),
    )
    await CostHandler().handle([Item(known), Item(unknown), Item(missing)])
    assert known.cost_usd is not None and known.cost_usd > 0 and known.cost_nanos and known.price_version
    assert unknown.cost_usd is None and unknown.cost_nanos is None
    assert missing.cost_usd is None and missing.cost_nanos is None


async def test_store_handler_writes_one_row_per_request(store: SQLiteStore, tmp_path: Path) -> None:
    recs = [make_record(i) for i in range(10)]
    await StoreHandler(store).handle([Item(r) for r in recs])
    await StoreHandler(store).handle([Item(r) for r in recs[:5]])  # redelivered
    with sqlite3.connect(tmp_path / "store.db") as db:
        assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 10
    row = await store.get_request("acme", recs[3].id)
    assert row is not None and row["prompt_tokens"] == 103


async def test_standard_chain_end_to_end(store: SQLiteStore, bodies: CountingBodies) -> None:
    chain = build_chain(Settings(), store, bodies)
    recs = [make_record(i) for i in range(3)]
    items = [Item(r) for r in recs]
    await chain.start()
    await chain.run(items)
    await chain.close()
    assert all(i.ok for i in items)
    row = await store.get_request("acme", recs[0].id)
    assert row is not None
    assert row["cost_usd"] is not None and row["cost_usd"] > 0
    ref = row["request_body"]["ref"]
    assert ref.startswith("acme/2026/") and await bodies.get(ref) is not None


# -- webhook -----------------------------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append((dict(request.headers), json.loads(await request.read())))
        return web.Response(status=self.status)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield r, f"http://127.0.0.1:{port}/hook"
    await runner.cleanup()


async def test_webhook_posts_metadata_only_with_idempotency_key(receiver: tuple[Receiver, str]) -> None:
    r, url = receiver
    h = WebhookHandler(url)
    recs = [make_record(i, request_headers={"x-api-key": "sk-secret"}) for i in range(3)]
    await h.handle([Item(x) for x in recs])
    await h.close()
    assert sorted(hdr["Idempotency-Key"] for hdr, _ in r.posts) == sorted(x.id for x in recs)
    for hdr, body in r.posts:
        assert body["id"] == hdr["Idempotency-Key"]
        assert body["v"] == 1 and body["model"] == "gpt-4o-mini" and body["usage"]["prompt_tokens"] >= 100
        assert "request_body" not in body and "response_body" not in body and "request_headers" not in body
        assert "secret" not in json.dumps(body)


async def test_webhook_5xx_is_retried_in_the_background_and_4xx_is_dropped_not_failed(
    receiver: tuple[Receiver, str],
) -> None:
    r, url = receiver
    h = WebhookHandler(url, backoff_start=0.05)
    r.status = 503
    item = Item(make_record())
    await h.handle([item])  # returns at once: delivery is off the chain's critical path
    assert item.ok
    for _ in range(200):  # until it has been refused twice, then let the receiver recover
        if len(r.posts) >= 2:
            break
        await asyncio.sleep(0.05)
    assert len(r.posts) >= 2
    r.status = 200
    assert await h.wait_idle(30)
    assert h.delivered == 1 and not h.dropped
    r.status = 422
    item = Item(make_record())
    await h.handle([item])
    assert await h.wait_idle(30)
    assert item.ok  # the record is stored; only the webhook delivery is given up, and counted
    assert h.dropped == {"refused": 1}
    await h.close()


async def test_webhook_unreachable_never_raises_and_drops_after_retries() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    h = WebhookHandler(f"http://127.0.0.1:{port}/hook", timeout=2, max_attempts=3, backoff_start=0.01)
    items = [Item(make_record(i)) for i in range(3)]
    await h.handle(items)
    assert all(i.ok for i in items)
    assert await h.wait_idle(30)
    assert h.dropped == {"retries": 3} and h.delivered == 0
    await h.close()


async def test_webhook_buffer_overflow_drops_deliveries_not_records(caplog: pytest.LogCaptureFixture) -> None:
    hang = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await hang.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    h = WebhookHandler(f"http://127.0.0.1:{port}/hook", concurrency=2, max_pending=5, drain_timeout=0.5)
    items = [Item(make_record(i)) for i in range(20)]
    with caplog.at_level("WARNING", logger="llmtap.webhook"):
        await asyncio.wait_for(h.handle(items), 5)
        await asyncio.wait_for(h.handle([Item(make_record())]), 5)
    assert all(i.ok for i in items)
    # 2 in flight, 5 buffered, the rest dropped; 2 + 5 + dropped == 21 whatever the timing
    assert h.dropped["overflow"] >= 21 - 2 - 5
    assert len([m for m in caplog.messages if "dropped" in m]) == 1  # one line, not one per record
    await h.close()
    assert h.dropped["stopped"] + h.dropped["overflow"] == 21 and h.delivered == 0  # each counted once
    hang.set()
    await runner.cleanup()


async def test_chain_with_webhook_after_store(
    store: SQLiteStore, bodies: CountingBodies, receiver: tuple[Receiver, str]
) -> None:
    r, url = receiver
    chain = build_chain(Settings(webhook_url=url), store, bodies)
    assert [h.name for h in chain.handlers] == ["bodies", "cost", "store", "webhook"]
    rec = make_record()
    await chain.start()
    await chain.run([Item(rec)])
    await chain.close()  # drains the webhook backlog first
    assert [b["id"] for _, b in r.posts] == [rec.id]
    assert r.posts[0][1]["cost_usd"] is not None  # cost was settled before the post
