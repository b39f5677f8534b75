"""Webhooks end to end on real stores and a real HTTP receiver verifying every delivery with the
reference `standardwebhooks` library: the outbox is written with the records, the deliverer
sends it, outages, slow and refusing receivers behave as the README says."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from aiohttp import web

from llmtap.alerts.db import AlertDB
from llmtap.alerts.evaluator import Evaluator
from llmtap.alerts.rules import make_rule
from llmtap.record import LogRecord, Usage
from llmtap.store.base import Store
from llmtap.webhooks.db import WebhookDB, new_endpoint_id
from llmtap.webhooks.deliverer import Deliverer, Refused, check_target
from llmtap.webhooks.outbox import (
    ALERT_FIRING,
    ALERT_RESOLVED,
    DELIVERY_DISABLED,
    REQUEST_COMPLETED,
    Endpoint,
    new_secret,
)
from procs import free_port
from store_helpers import micros, open_store, rec, store_params
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(300)


async def wait_for(
    cond: Callable[[], Awaitable[bool] | bool], deadline: float = 120.0, what: str = ""
) -> None:
    """Poll a condition with a generous deadline (the machine is shared and busy)."""
    end = time.monotonic() + deadline
    while True:
        got = cond()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.05)


class Receiver:
    """An HTTP receiver that verifies each delivery's signature as a real receiver would."""

    def __init__(self, secret: str, port: int | None = None) -> None:
        self.verifier = standardwebhooks.Webhook(secret)
        self.port = port or free_port()
        self.got: list[tuple[str, dict[str, Any]]] = []  # (webhook-id, payload)
        self.arrivals: list[float] = []
        self.bad: list[str] = []
        self.status = 200
        self.headers: dict[str, str] = {}
        self.gate: asyncio.Event | None = None  # when set: hold every request until it opens
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = self.verifier.verify(body, dict(request.headers))
        except standardwebhooks.webhooks.WebhookVerificationError as e:
            self.bad.append(str(e))
            return web.Response(status=400)
        if self.gate is not None:
            await self.gate.wait()
        if self.status < 300:
            self.got.append((request.headers["webhook-id"], payload))
            self.arrivals.append(time.monotonic())
        return web.Response(status=self.status, headers=self.headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture(params=store_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path) as s:
        yield s


async def add(db: WebhookDB, url: str, secret: str, tenant: str = "acme", **kw: Any) -> Endpoint:
    return await db.add_endpoint(Endpoint(new_endpoint_id(), tenant, url, secret, **kw))


def deliverer(db: WebhookDB, **kw: Any) -> Deliverer:
    kw.setdefault("allow_private", True)
    kw.setdefault("max_backoff", 1.0)
    kw.setdefault("timeout", 10.0)
    return Deliverer(db, poll=0.05, **kw)


# -- the outbox ---------------------------------------------------------------------------------


async def test_outbox_rows_exist_exactly_for_newly_stored_records(store: Store) -> None:
    db = store.webhooks()
    ep = await add(db, "http://example.com/hook", new_secret())
    only_gpt4o = await add(db, "http://example.com/b", new_secret(), filters={"model": "gpt-4o"})
    prop = await add(db, "http://example.com/c", new_secret(), filters={"property.feature": "chat"})
    none_sampled = await add(db, "http://example.com/d", new_secret(), sample=0.0)
    recs = [make_record(i) for i in range(6)]
    recs[0].model = "gpt-4o"
    recs[1].properties = {"feature": "chat"}
    other_tenant = make_record(9, tenant="globex")
    assert await store.write_batch([*recs, other_tenant]) == 7
    # Redelivery of the same records (at least once upstream) stores nothing and adds nothing.
    assert await store.write_batch(recs) == 0
    log = await db.list_deliveries("acme", limit=1000)
    by_ep: dict[str, set[str]] = {}
    for d in log:
        by_ep.setdefault(d["endpoint_id"], set()).add(d["subject"])
        assert d["status"] == "pending" and d["event"] == REQUEST_COMPLETED
    assert by_ep == {ep.id: {r.id for r in recs}, only_gpt4o.id: {recs[0].id}, prop.id: {recs[1].id}}
    assert none_sampled.id not in by_ep
    assert await db.list_deliveries("globex") == []
    assert len({d["id"] for d in log}) == len(log) == 8


async def test_erasing_a_user_takes_their_webhook_deliveries_too(store: Store) -> None:
    """A delivery's payload is the record: `llmtap erase` left a user's requests in the outbox
    and the delivery log."""
    db = store.webhooks()
    ep = await add(db, "http://example.com/hook", new_secret())
    recs = [make_record(i) for i in range(6)]
    for r in recs[:4]:
        r.user_id = "erase-me"
    other_tenant = make_record(9, tenant="globex")
    other_tenant.user_id = "erase-me"
    assert await store.write_batch([*recs, other_tenant]) == 7
    assert len(await db.list_deliveries("acme", limit=100)) == 6
    assert (await store.erase("acme", "user_id", "erase-me"))[0] == 4
    left = await db.list_deliveries("acme", endpoint_id=ep.id, limit=100)
    assert {d["subject"] for d in left} == {recs[4].id, recs[5].id}
    assert len(await db.list_deliveries("globex", limit=100)) == 0  # globex has no endpoint: none made
    assert (await store.erase("globex", "user_id", "erase-me"))[0] == 1


# -- delivery -----------------------------------------------------------------------------------


async def test_every_delivery_verifies_and_carries_metadata_only(store: Store) -> None:
    db = store.webhooks()
    secret = new_secret()
    rx = Receiver(secret)
    await rx.start()
    d = deliverer(db)
    await d.start()
    try:
        ep = await add(db, rx.url, secret)
        recs = [make_record(i) for i in range(40)]
        await store.write_batch(recs)
        await wait_for(lambda: len(rx.got) >= 40, what="40 deliveries")
        assert rx.bad == []
        subjects = {p["data"]["id"] for _, p in rx.got}
        assert subjects == {r.id for r in recs}
        for _, p in rx.got:
            assert p["type"] == REQUEST_COMPLETED
            assert "?" not in p["data"]["target_url"]
            assert not {"request_body", "response_body", "request_headers"} & set(p["data"])
            # The record without bodies: every field, at its default or None too (the contract's
            # tenant, streamed, outcome, user and session; cost once priced).
            assert set(p["data"]) == {"v", *LogRecord.__struct_fields__} - {
                "request_body",
                "response_body",
                "response_events",
                "request_headers",
                "response_headers",
            }
            assert set(p["data"]["usage"]) == set(Usage.__struct_fields__)
            assert p["data"]["streamed"] is False and p["data"]["outcome"] == "completed"
        await wait_for(lambda: _all_delivered(db, ep.id, 40), what="the delivery log to show 40 delivered")
    finally:
        await d.stop()
        await rx.stop()


async def _all_delivered(db: WebhookDB, endpoint_id: str, n: int) -> bool:
    log = await db.list_deliveries("acme", endpoint_id=endpoint_id, limit=10_000)
    return len(log) == n and all(x["status"] == "delivered" and x["attempts"] >= 1 for x in log)


async def test_rotation_signs_with_both_secrets(tmp_path: Path) -> None:
    async with open_store("sqlite", tmp_path) as store:
        db = store.webhooks()
        old = new_secret()
        new = new_secret()
        rx_old, rx_new = Receiver(old), Receiver(new, port=free_port())
        rx_new.port = rx_old.port  # the same receiver process: whichever secret it still knows
        await rx_old.start()
        ep = await add(db, rx_old.url, old)
        assert await db.rotate_secret("acme", ep.id, new)
        d = deliverer(db)
        await d.start()
        try:
            await store.write_batch([make_record(1)])
            await wait_for(lambda: len(rx_old.got) == 1, what="a delivery verified with the old secret")
        finally:
            await rx_old.stop()
        await rx_new.start()
        try:
            await store.write_batch([make_record(2)])
            await wait_for(lambda: len(rx_new.got) == 1, what="a delivery verified with the new secret")
            assert rx_old.bad == rx_new.bad == []
        finally:
            await d.stop()
            await rx_new.stop()


async def test_receiver_outage_under_load_every_event_arrives_once_after_it_returns(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "llmtap")
    db = store.webhooks()
    secret = new_secret()
    rx = Receiver(secret)
    await rx.start()
    d = deliverer(db, max_backoff=2.0)
    await d.start()
    try:
        await add(db, rx.url, secret)
        first = [make_record(i) for i in range(50)]
        await store.write_batch(first)
        await wait_for(lambda: len(rx.got) >= 50, what="deliveries before the outage")
        await rx.stop()
        # Storing goes on at full speed while the receiver is away: the worker never waits on it.
        during: list[Any] = []
        t0 = time.monotonic()
        for _ in range(20):
            batch = [make_record(i) for i in range(100)]
            assert await store.write_batch(batch) == 100
            during += batch
        write_s = time.monotonic() - t0
        await wait_for(lambda: d.failures >= 3, what="the deliverer to notice the outage")
        await asyncio.sleep(3)  # let the endpoint back off a few times
        await rx.start()
        back = time.monotonic()
        want = {r.id for r in first + during}
        await wait_for(lambda: {p["data"]["id"] for _, p in rx.got} >= want, what="the backlog")
        drained = max(rx.arrivals) - back
        print(f"\n2000 records stored in {write_s:.2f}s during the outage; backlog of 2000 delivered "
              f"{drained:.1f}s after the receiver came back")  # fmt: skip
        ids: dict[str, set[str]] = {}
        for msg_id, p in rx.got:
            ids.setdefault(p["data"]["id"], set()).add(msg_id)
        assert all(len(v) == 1 for v in ids.values()), "an event arrived under two webhook-ids"
        assert rx.bad == []
        assert drained < 120
        # The log says when the endpoint went down and came back: once each, not once per retry.
        lines = [r.getMessage() for r in caplog.records if "webhook endpoint" in r.getMessage()]
        assert len([x for x in lines if " failing: " in x]) == 1, lines
        assert len([x for x in lines if x.endswith("delivers again")]) == 1, lines
    finally:
        await d.stop()
        await rx.stop()


async def test_refusing_endpoint_is_disabled_and_announced(store: Store) -> None:
    db = store.webhooks()
    bad_secret, ops_secret = new_secret(), new_secret()
    bad, ops = Receiver(bad_secret), Receiver(ops_secret)
    bad.status = 410
    await bad.start()
    await ops.start()
    d = deliverer(db, max_backoff=0.2, disable_after=1.0)
    await d.start()
    try:
        ep = await add(db, bad.url, bad_secret)
        ops_ep = await add(db, ops.url, ops_secret, events=[DELIVERY_DISABLED])
        await store.write_batch([make_record(i) for i in range(3)])

        async def disabled() -> bool:
            got = await db.get_endpoint("acme", ep.id)
            return got is not None and got.disabled_at is not None

        await wait_for(disabled, what="the refusing endpoint to be disabled")
        await wait_for(lambda: len(ops.got) == 1, what="the delivery.disabled event")
        _, event = ops.got[0]
        assert event["type"] == DELIVERY_DISABLED and event["data"]["endpoint_id"] == ep.id
        assert "HTTP 410" in event["data"]["last_error"]

        # The three were sent at once; the first 410 disabled the endpoint, the others' answers
        # land when they land (a busy machine: after the event went out).
        async def all_answered() -> bool:
            got = await db.list_deliveries("acme", endpoint_id=ep.id)
            return len(got) == 3 and all(x["last_status"] is not None for x in got)

        await wait_for(all_answered, what="every delivery's 410 to be recorded")
        log = await db.list_deliveries("acme", endpoint_id=ep.id)
        assert log and all(x["status"] == "pending" and x["last_status"] == 410 for x in log)
        assert any(x["attempts"] >= 1 and x["last_error"] == "HTTP 410" for x in log)
        # Disabled: nothing more is sent to it.
        n = len(bad.arrivals)
        await store.write_batch([make_record(7)])
        assert await db.list_deliveries("acme", endpoint_id=ep.id, limit=100) == log
        assert len(bad.arrivals) == n
        assert ops_ep.id != ep.id
    finally:
        await d.stop()
        await bad.stop()
        await ops.stop()


async def test_a_slow_endpoint_does_not_delay_a_fast_one(store: Store) -> None:
    db = store.webhooks()
    s1, s2 = new_secret(), new_secret()
    slow, fast = Receiver(s1), Receiver(s2)
    slow.gate = asyncio.Event()  # holds every request until the end of the test
    await slow.start()
    await fast.start()
    d = deliverer(db, concurrency=4)
    await d.start()
    try:
        await add(db, slow.url, s1)
        await add(db, fast.url, s2)
        recs = [make_record(i) for i in range(60)]
        await store.write_batch(recs)
        await wait_for(lambda: len(fast.got) == 60, what="every delivery to the fast endpoint")
        assert slow.got == []  # still held: the fast one did not wait for it
        slow.gate.set()
        await wait_for(lambda: len(slow.got) == 60, what="the slow endpoint's deliveries once released")
    finally:
        if slow.gate is not None:
            slow.gate.set()
        await d.stop()
        await slow.stop()
        await fast.stop()


async def test_retry_after_is_honoured(tmp_path: Path) -> None:
    async with open_store("sqlite", tmp_path) as store:
        db = store.webhooks()
        secret = new_secret()
        rx = Receiver(secret)
        rx.status, rx.headers = 503, {"Retry-After": "3"}
        calls: list[float] = []
        inner = rx.handle

        async def counting(request: web.Request) -> web.Response:
            calls.append(time.monotonic())
            resp = await inner(request)
            rx.status, rx.headers = 200, {}
            return resp

        rx.handle = counting  # type: ignore[method-assign]
        await rx.start()
        d = deliverer(db, max_backoff=0.1)
        await d.start()
        try:
            await add(db, rx.url, secret)
            await store.write_batch([make_record(1)])
            await wait_for(lambda: len(rx.got) == 1, what="the delivery after Retry-After")
            assert len(calls) == 2 and calls[1] - calls[0] >= 2.9
        finally:
            await d.stop()
            await rx.stop()


async def test_redeliver_sends_again_under_the_same_id(tmp_path: Path) -> None:
    async with open_store("sqlite", tmp_path) as store:
        db = store.webhooks()
        secret = new_secret()
        rx = Receiver(secret)
        await rx.start()
        d = deliverer(db)
        await d.start()
        try:
            ep = await add(db, rx.url, secret)
            await store.write_batch([make_record(1)])
            await wait_for(lambda: len(rx.got) == 1, what="the first delivery")
            await wait_for(lambda: _all_delivered(db, ep.id, 1), what="the log to say delivered")
            [entry] = await db.list_deliveries("acme")
            assert not await db.redeliver("globex", entry["id"])  # another tenant's id: not found
            assert await db.redeliver("acme", entry["id"])
            await wait_for(lambda: len(rx.got) == 2, what="the redelivery")
            assert rx.got[0][0] == rx.got[1][0] == entry["id"]
        finally:
            await d.stop()
            await rx.stop()


# -- alert events -------------------------------------------------------------------------------


async def test_alert_events_arrive_signed_and_as_slack_text(store: Store) -> None:
    """`alert.firing` and `alert.resolved` reach the endpoints subscribed to them, each verified
    with `standardwebhooks`; a Slack-format endpoint gets `{"text": ...}`, signed all the same;
    an endpoint subscribed to records only gets no alert."""
    db = store.webhooks()
    secret = new_secret()
    rx, slack, records_only = Receiver(secret), Receiver(secret), Receiver(secret)
    for x in (rx, slack, records_only):
        await x.start()
    d = deliverer(db)
    await d.start()
    try:
        alerts = [ALERT_FIRING, ALERT_RESOLVED]
        await add(db, rx.url, secret, events=alerts)
        await add(db, slack.url, secret, events=alerts, format="slack")
        await add(db, records_only.url, secret, events=[REQUEST_COMPLETED])
        now = datetime(2025, 3, 30, 12, 0, tzinfo=UTC)
        rule = make_rule("acme", metric="requests", op="above", threshold=2, window_s=300, name="busy")
        await AlertDB(db).add_rule(rule, micros(now))
        await store.write_batch([rec(i, at=now - timedelta(minutes=1)) for i in range(3)])
        ev = Evaluator(store, interval_s=60, resolve_after_s=0)
        await ev.evaluate(rule, micros(now))  # 3 requests in the window: fires
        await ev.evaluate(rule, micros(now + timedelta(minutes=6)))  # none left: resolves
        await wait_for(lambda: len(rx.got) == 2 and len(slack.got) == 2, what="two alert events each")
        await wait_for(lambda: len(records_only.got) == 3, what="the records' own events")
        assert rx.bad == slack.bad == records_only.bad == []
        assert [p["type"] for _, p in rx.got] == [ALERT_FIRING, ALERT_RESOLVED]
        firing = rx.got[0][1]["data"]
        assert (firing["alert_id"], firing["name"], firing["count"]) == (rule.id, "busy", 3)
        assert rx.got[1][1]["data"]["episode"] == firing["episode"] == 1
        assert len({i for i, _ in rx.got}) == 2  # a webhook-id per event
        texts = [p["text"] for _, p in slack.got]
        assert texts[0].startswith(":rotating_light: FIRING: busy: requests is 3 (above 2)")
        assert texts[1].startswith(":white_check_mark: RESOLVED: busy: requests is 0 (no longer above 2)")
        assert {p["type"] for _, p in records_only.got} == {REQUEST_COMPLETED}

        # An older backup restored: the alert's state rewinds to before its first episode. The
        # next firing is episode 1 again, and went out under the first one's webhook-id: a
        # receiver that drops ids it has seen dropped it, and showed the alert resolved (restore
        # check). An id is never reused for another firing.
        async with db.tx() as c:
            await c.execute("DELETE FROM alert_states WHERE rule_id = $1", rule.id)
        later = now + timedelta(hours=1)
        await store.write_batch([rec(10 + i, at=later - timedelta(minutes=1)) for i in range(3)])
        await ev.evaluate(rule, micros(later))
        await wait_for(lambda: len(rx.got) == 3, what="the firing after the restore")
        again = rx.got[2]
        assert again[1]["type"] == ALERT_FIRING and again[1]["data"]["episode"] == 1
        assert again[0] not in {i for i, _ in rx.got[:2]}
    finally:
        await d.stop()
        for x in (rx, slack, records_only):
            await x.stop()


async def test_the_environment_endpoint_gets_event_types_added_since(tmp_path: Path) -> None:
    """LLMTAP_WEBHOOK_URL's endpoint receives every event type, also one added by an upgrade."""
    from llmtap.webhooks.deliverer import ENV_ENDPOINT_ID
    from llmtap.webhooks.outbox import EVENTS

    async with open_store("sqlite", tmp_path) as store:
        db = store.webhooks()
        secret = new_secret()
        url = "http://example.com/h"
        # as a version before the alert events stored it, then as this one does
        await db.put_endpoint(Endpoint(ENV_ENDPOINT_ID, "default", url, secret, [REQUEST_COMPLETED]))
        await db.put_endpoint(Endpoint(ENV_ENDPOINT_ID, "default", url, secret, list(EVENTS)))
        [ep] = await db.list_endpoints("default")
        assert ep.events == list(EVENTS) and ep.secret == secret and ep.previous_secret is None


# -- SSRF guard ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/x", "http://10.1.2.3/x", "http://169.254.169.254/latest", "http://[::1]/x",
     "http://192.168.0.1/x", "http://localhost/x", "http://[::ffff:127.0.0.1]/x", "ftp://example.com/x"],
)  # fmt: skip
async def test_private_targets_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(Refused):
        await check_target(url, allow_private=False)
    if url.startswith("http:"):
        await check_target(url, allow_private=True)


async def _refused_delivery(tmp_path: Path, host: str) -> None:
    """One record for an endpoint on a live local receiver named by `host`, the SSRF guard on:
    the delivery log says "private address" and the receiver got nothing."""
    async with open_store("sqlite", tmp_path) as store:
        db = store.webhooks()
        secret = new_secret()
        rx = Receiver(secret)
        await rx.start()
        d = deliverer(db, allow_private=False)
        await d.start()
        try:
            ep = await add(db, rx.url.replace("127.0.0.1", host), secret)
            await store.write_batch([make_record(1)])

            async def refused() -> bool:
                log = await db.list_deliveries("acme", endpoint_id=ep.id)
                return bool(log) and "private address" in (log[0]["last_error"] or "")

            await wait_for(refused, what="the SSRF refusal in the delivery log")
            assert rx.got == [] and rx.arrivals == []
        finally:
            await d.stop()
            await rx.stop()


async def test_refused_target_is_logged_not_sent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "llmtap")
    await _refused_delivery(tmp_path, "127.0.0.1")
    said = [r.getMessage() for r in caplog.records if "failing" in r.getMessage()]
    assert len(said) == 1 and "LLMTAP_WEBHOOK_ALLOW_PRIVATE=true" in said[0], said


async def test_a_name_that_rebinds_to_a_private_address_after_the_check_reaches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outside check (by reading): `check_target` resolved the name, then the session resolved
    it again to connect, so a name answering a public address first and a private one next (DNS
    rebinding) reached an internal service. The session connects only to public addresses now:
    here the first lookup is made to pass, and `localhost` still reaches nothing."""
    from llmtap.webhooks import deliverer as deliverer_module

    async def passes(url: str, allow_private: bool) -> None:
        return None  # as if the first lookup had answered a public address

    monkeypatch.setattr(deliverer_module, "check_target", passes)
    await _refused_delivery(tmp_path, "localhost")


async def test_the_public_only_resolver_keeps_public_addresses() -> None:
    from aiohttp.abc import AbstractResolver

    from llmtap.webhooks.deliverer import PublicOnly

    class Answers(AbstractResolver):
        def __init__(self, *hosts: str) -> None:
            self.hosts = hosts

        async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[Any]:
            return [{"hostname": host, "host": h, "port": port, "family": family, "proto": 0, "flags": 0}
                    for h in self.hosts]  # fmt: skip

        async def close(self) -> None:
            return None

    got = await PublicOnly(Answers("93.184.215.14", "10.0.0.7", "::ffff:127.0.0.1")).resolve("x.example", 443)
    assert [r["host"] for r in got] == ["93.184.215.14"]
    with pytest.raises(OSError, match="private address"):
        await PublicOnly(Answers("169.254.169.254", "fe80::1%eth0")).resolve("x.example", 443)


def test_payload_example_is_json() -> None:
    from llmtap.webhooks.outbox import envelope, record_data

    data = record_data(make_record(1), False)
    body = json.loads(envelope(REQUEST_COMPLETED, "2026-01-01T00:00:00+00:00", data))
    assert body["type"] == REQUEST_COMPLETED and body["data"]["model"] == "gpt-4o-mini"


def test_slack_text_rounds_the_latency() -> None:
    """`status 200 in 1.8745400000170775 ms` (unicode check)."""
    from llmtap.webhooks.outbox import slack_text

    env = {
        "type": "request.completed",
        "data": {
            "provider": "openai",
            "model": "m",
            "status": 200,
            "latency_ms": 1.8745400000170775,
            "id": "r1",
        },
    }
    text = json.loads(slack_text(json.dumps(env).encode()))["text"]
    assert text == "request.completed: openai m status 200 in 1.87 ms (request r1)"
