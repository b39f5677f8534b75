"""A delivery's end: an event a working receiver keeps refusing is given up (its endpoint stays
healthy), 410 Gone disables an endpoint at once, a receiver refusing everything keeps its events
pending, and finished deliveries leave the log after `LLMTAP_WEBHOOK_KEEP_DAYS` (pending never).
Real stores and receivers verifying every delivery with `standardwebhooks`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from llmtap.bodies.file import FileBodyStore
from llmtap.retention import RetentionTask, purge_deliveries
from llmtap.store.base import Store
from llmtap.store.sqlite import SQLiteStore
from llmtap.webhooks.db import WebhookDB, now_us
from llmtap.webhooks.outbox import DELIVERY_DISABLED, new_secret
from store_helpers import open_store, store_params
from test_webhooks import Receiver, add, deliverer, wait_for
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(300)

DAY_US = 86_400 * 1_000_000


@pytest.fixture(params=store_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path) as s:
        yield s


class Picky(Receiver):
    """Refuses the events in `refuse` with `code`, takes every other one; counts each arrival."""

    def __init__(self, secret: str, refuse: set[str], code: int) -> None:
        super().__init__(secret)
        self.refuse, self.code = refuse, code
        self.tries: dict[str, int] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        payload = self.verifier.verify(body, dict(request.headers))
        rid = payload["data"].get("id", "")
        self.tries[rid] = self.tries.get(rid, 0) + 1
        if rid in self.refuse:
            return web.Response(status=self.code)
        self.got.append((request.headers["webhook-id"], payload))
        return web.Response(status=200)


async def _status(db: WebhookDB, endpoint_id: str, subject: str) -> dict[str, Any] | None:
    log = await db.list_deliveries("acme", endpoint_id=endpoint_id, limit=1000)
    return next((x for x in log if x["subject"] == subject), None)


@pytest.mark.parametrize("code", [422, 404, 400])
async def test_an_event_refused_for_good_is_given_up_and_the_endpoint_stays_healthy(
    store: Store, code: int
) -> None:
    db = store.webhooks()
    secret = new_secret()
    poison = make_record(0)
    rx = Picky(secret, {poison.id}, code)
    await rx.start()
    d = deliverer(db, max_backoff=1.0, max_rejections=3, disable_after=3600.0)
    await d.start()
    stop = asyncio.Event()
    written: list[str] = []

    async def traffic() -> None:
        """Other events keep coming, as on a real endpoint, and are taken."""
        i = 1
        while not stop.is_set():
            r = make_record(i)
            await store.write_batch([r])
            written.append(r.id)
            i += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await stop.wait()

    try:
        ep = await add(db, rx.url, secret)
        await store.write_batch([poison])
        feeder = asyncio.create_task(traffic())

        async def given_up() -> bool:
            x = await _status(db, ep.id, poison.id)
            return x is not None and x["status"] == "failed"

        await wait_for(given_up, deadline=180, what="the refused event to be given up")
        entry = await _status(db, ep.id, poison.id)
        assert entry is not None
        assert entry["attempts"] == rx.tries[poison.id] >= 3
        assert entry["last_status"] == code and entry["last_error"] == f"given up: HTTP {code}"
        # After it: the poison is not sent again, the others keep arriving.
        tries, seen = rx.tries[poison.id], len(rx.got)
        await wait_for(lambda: len(rx.got) >= seen + 10, what="ten more deliveries after the give-up")
        stop.set()
        await feeder
        assert rx.tries[poison.id] == tries
        await wait_for(lambda: {p["data"]["id"] for _, p in rx.got} >= set(written), what="all the others")
        got = await db.get_endpoint("acme", ep.id)
        assert got is not None and got.disabled_at is None
        # The give-up is in the delivery log's `failed` listing; redeliver sends it once more.
        failed = await db.list_deliveries("acme", endpoint_id=ep.id, status="failed")
        assert [x["subject"] for x in failed] == [poison.id]
        assert await db.redeliver("acme", failed[0]["id"])
        await wait_for(lambda: rx.tries[poison.id] == tries + 1, what="the manual redelivery")
    finally:
        stop.set()
        await d.stop()
        await rx.stop()


async def test_a_receiver_refusing_everything_keeps_its_events_pending(store: Store) -> None:
    """404 for all: no event is given up (nothing shows the receiver takes any), the endpoint is
    backed off and, after `disable_after`, disabled; `enable` would send them all."""
    db = store.webhooks()
    secret = new_secret()
    rx = Receiver(secret)
    rx.status = 404
    await rx.start()
    d = deliverer(db, max_backoff=0.2, max_rejections=2, disable_after=3.0)
    await d.start()
    try:
        ep = await add(db, rx.url, secret)
        recs = [make_record(i) for i in range(5)]
        await store.write_batch(recs)

        async def disabled() -> bool:
            got = await db.get_endpoint("acme", ep.id)
            return got is not None and got.disabled_at is not None

        await wait_for(disabled, what="the endpoint to be disabled")
        log = await db.list_deliveries("acme", endpoint_id=ep.id, limit=100)
        assert len(log) == 5 and all(x["status"] == "pending" for x in log)
        assert sum(x["attempts"] for x in log) >= 3  # it was tried, repeatedly
    finally:
        await d.stop()
        await rx.stop()


async def test_410_gone_disables_the_endpoint_at_once(store: Store) -> None:
    db = store.webhooks()
    gone_secret, ops_secret = new_secret(), new_secret()
    gone, ops = Receiver(gone_secret), Receiver(ops_secret)
    gone.status = 410
    await gone.start()
    await ops.start()
    d = deliverer(db, disable_after=86_400.0)  # not by time: by the answer
    await d.start()
    try:
        ep = await add(db, gone.url, gone_secret)
        await add(db, ops.url, ops_secret, events=[DELIVERY_DISABLED])
        await store.write_batch([make_record(1)])

        async def disabled() -> bool:
            got = await db.get_endpoint("acme", ep.id)
            return got is not None and got.disabled_at is not None

        await wait_for(disabled, what="410 Gone to disable the endpoint")
        await wait_for(lambda: len(ops.got) == 1, what="the delivery.disabled event")
        assert "HTTP 410" in ops.got[0][1]["data"]["last_error"]
        [entry] = await db.list_deliveries("acme", endpoint_id=ep.id)
        assert entry["status"] == "pending" and entry["last_status"] == 410  # kept for `enable`
    finally:
        await d.stop()
        await gone.stop()
        await ops.stop()


async def _set(db: WebhookDB, sql: str, *args: Any) -> None:
    async with db.tx() as c:
        await c.execute(sql, *args)


async def test_purge_keeps_pending_and_recent_and_deletes_old_finished(store: Store, tmp_path: Path) -> None:
    db = store.webhooks()
    secret = new_secret()
    rx = Receiver(secret)
    await rx.start()
    d = deliverer(db)
    await d.start()
    try:
        ep = await add(db, rx.url, secret)
        delivered = [make_record(i) for i in range(12)]
        await store.write_batch(delivered)
        await wait_for(lambda: len(rx.got) == 12, what="twelve deliveries")

        async def all_landed() -> bool:
            log = await db.list_deliveries("acme", endpoint_id=ep.id, status="delivered", limit=100)
            return len(log) == 12

        await wait_for(all_landed, what="the log to say delivered")
    finally:
        await d.stop()
        await rx.stop()
    # No deliverer now: these stay pending.
    pending = [make_record(100 + i) for i in range(4)]
    await store.write_batch(pending)
    log = {x["subject"]: x for x in await db.list_deliveries("acme", limit=1000)}
    now = now_us()
    old_delivered = [log[r.id]["id"] for r in delivered[:7]]
    recent_delivered = [log[r.id]["id"] for r in delivered[7:10]]
    old_failed, recent_failed = log[delivered[10].id]["id"], log[delivered[11].id]["id"]
    for mid in old_delivered:
        await _set(db, "UPDATE webhook_deliveries SET delivered_at = $2, created_at = $2 WHERE id = $1",
                   mid, now - 8 * DAY_US)  # fmt: skip
    for mid in recent_delivered:  # created long ago, delivered recently (after an outage): kept
        await _set(db, "UPDATE webhook_deliveries SET delivered_at = $2, created_at = $3 WHERE id = $1",
                   mid, now - 6 * DAY_US, now - 30 * DAY_US)  # fmt: skip
    for mid, at in ((old_failed, now - 9 * DAY_US), (recent_failed, now - DAY_US)):
        await _set(db, "UPDATE webhook_deliveries SET status = 'failed', delivered_at = NULL, next_at = $2,"
                   " created_at = $2 WHERE id = $1", mid, at)  # fmt: skip
    old_pending = [log[r.id]["id"] for r in pending]
    for mid in old_pending:  # pending for a month (an endpoint disabled long ago): never purged
        await _set(db, "UPDATE webhook_deliveries SET created_at = $2, next_at = $2 WHERE id = $1",
                   mid, now - 30 * DAY_US)  # fmt: skip

    assert await purge_deliveries(db, 7.0, batch=3) == 8  # several batches
    left = {x["id"] for x in await db.list_deliveries("acme", limit=1000)}
    assert left == {*recent_delivered, recent_failed, *old_pending}
    assert await purge_deliveries(db, 7.0) == 0
    # The server's retention task runs it too, with or without record retention.
    await _set(db, "UPDATE webhook_deliveries SET delivered_at = $2 WHERE id = $1", recent_delivered[0],
               now - 8 * DAY_US)  # fmt: skip
    task = RetentionTask(store, FileBodyStore(str(tmp_path / "b")), None, webhook_keep_days=7.0)
    await task.run_once()
    left = {x["id"] for x in await db.list_deliveries("acme", limit=1000)}
    assert left == {*recent_delivered[1:], recent_failed, *old_pending}


async def test_a_recovered_endpoints_backlog_is_claimed_in_index_order_not_sorted(store: Store) -> None:
    """An outside check: a receiver back after an outage has its whole backlog due at one
    `next_at`; with `next_at` alone in the index every claim sorted all of it (0.4 s for 300k
    rows, inside the write lock storing needs, every 50 ms). The plan now reads the index."""
    db = store.webhooks()
    ep = await add(db, "http://127.0.0.1:9/hook", new_secret())
    now = now_us()
    n = 20_000
    await _set(
        db,
        "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < $3)"
        " INSERT INTO webhook_deliveries (id, endpoint_id, tenant, event, subject, payload, status,"
        " attempts, next_at, created_at) SELECT 'msg_' || (1000000 - i), $1, 'acme', 'request.logged',"
        " 'r' || i, '{}', 'pending', 0, CAST($2 AS bigint), CAST($2 AS bigint) - i FROM k",
        ep.id, now, n,
    )  # fmt: skip
    sql = db.claim_sql(due=True)
    async with db.tx() as c:
        if isinstance(store, SQLiteStore):
            await c.execute("ANALYZE")
            plan = " / ".join(str(r[-1]) for r in await c.fetch(f"EXPLAIN QUERY PLAN {sql}", ep.id, now, 8))
            assert "webhook_deliveries_due" in plan and "TEMP B-TREE" not in plan, plan
        else:
            await c.execute("ANALYZE webhook_deliveries")
            plan = " / ".join(str(r[0]) for r in await c.fetch(f"EXPLAIN {sql}", ep.id, now, 8))
            assert "webhook_deliveries_due" in plan and "Sort" not in plan, plan
    claimed = await db.claim({}, 8, 30.0)
    # The oldest first: created at now - n, now - n + 1, ...
    assert [d.subject for d in claimed] == [f"r{n - k}" for k in range(8)]


async def test_requests_in_flight_that_fail_together_count_as_one_failure(store: Store) -> None:
    """An outside check: the 8 requests in flight failing together counted as failures 1-8, so
    the first wait was already the longest (60 s) and a one-second blip delayed deliveries by a
    minute. Now the first failure backs off 0.5-1 s, and the next ones double from there."""
    db = store.webhooks()
    ep = await add(db, "http://127.0.0.1:9/hook", new_secret())
    await store.write_batch([make_record(i) for i in range(8)])
    claimed = await db.claim({}, 8, 30.0)
    assert len(claimed) == 8 and not any(d.probe for d in claimed)
    before = now_us()
    for d in claimed:
        await db.failed(d, 500, "HTTP 500", retry_after=None, max_backoff=60.0, disable_after=3600.0)
    async with db.tx() as c:
        ((failures, retry_at),) = await c.fetch(
            "SELECT failures, retry_at FROM webhook_endpoints WHERE id = $1", ep.id
        )
    assert failures == 1 and retry_at - before <= 1_100_000, (failures, (retry_at - before) / 1e6)


async def test_enabling_another_tenants_endpoint_reschedules_nothing_of_theirs(store: Store) -> None:
    """The tenant check guarded the endpoint's row only: with another tenant's endpoint id, a
    call made that tenant's backed-off deliveries due at once."""
    db = store.webhooks()
    theirs = await add(db, "https://example.com/hook", new_secret(), tenant="globex")
    await store.write_batch([make_record(1, tenant="globex")])
    hour = 3_600_000_000
    async with db.tx() as c:
        await c.execute("UPDATE webhook_deliveries SET next_at = next_at + $1", hour)
    (before,) = await db.list_deliveries("globex")
    assert await db.enable_endpoint("acme", theirs.id) is False
    (after,) = await db.list_deliveries("globex")
    assert after["next_at"] == before["next_at"] > now_us() + hour / 2
    assert await db.enable_endpoint("globex", theirs.id) is True  # its own tenant: due now
    (own,) = await db.list_deliveries("globex")
    assert own["next_at"] <= now_us()
