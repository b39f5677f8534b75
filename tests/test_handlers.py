"""Handlers on real backends: file bodies, the SQLite store, the webhook outbox."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from llmtap.bodies.base import body_key
from llmtap.bodies.file import FileBodyStore
from llmtap.config import Settings
from llmtap.errors import TransientError
from llmtap.handlers.base import Item
from llmtap.handlers.bodies import BodyHandler
from llmtap.handlers.chain import build_chain
from llmtap.handlers.cost import CostHandler
from llmtap.handlers.store import StoreHandler
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


# -- webhooks (the outbox; delivery itself is in test_webhooks.py) ------------------------------


async def test_chain_writes_the_env_endpoints_outbox_with_the_record(
    store: SQLiteStore, bodies: CountingBodies
) -> None:
    from llmtap.webhooks.outbox import new_secret

    url = "https://hooks.example.com/llmtap"
    chain = build_chain(Settings(webhook_url=url, webhook_secret=new_secret()), store, bodies)
    # No handler talks to the receiver: nothing it does can hold back storing.
    assert [h.name for h in chain.handlers] == ["streams", "bodies", "cost", "store"]
    rec = make_record()
    await chain.start()
    await chain.run([Item(rec)])
    await chain.close()
    [ep] = await store.webhooks().list_endpoints("default")
    assert ep.url == url
    rec2 = make_record(tenant="default")
    await chain.run([Item(rec2)])
    [d] = await store.webhooks().list_deliveries("default")
    assert d["subject"] == rec2.id and d["endpoint_id"] == ep.id
    payload = json.loads(
        sqlite3.connect(store.path).execute("SELECT payload FROM webhook_deliveries").fetchone()[0]
    )
    assert payload["data"]["cost_usd"] is not None  # cost was settled before the row was written
    assert "secret" not in json.dumps(payload)  # the target URL's query string is not sent


def test_env_webhook_needs_a_secret() -> None:
    from llmtap.errors import ConfigError
    from llmtap.webhooks.deliverer import env_endpoint

    with pytest.raises(ConfigError, match="LLMTAP_WEBHOOK_SECRET"):
        env_endpoint(Settings(webhook_url="https://hooks.example.com/x"))
    with pytest.raises(ConfigError, match="whsec_"):
        env_endpoint(Settings(webhook_url="https://hooks.example.com/x", webhook_secret="plain"))
