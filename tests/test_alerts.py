"""Alerts on real stores with an injected clock (no sleeps): rules fire once with enough requests,
resolve once after a clear period, per group, never twice across evaluators; the API is
tenant-scoped and the CLI checks rules. The events land in the webhook outbox (their delivery and
signature: tests/test_webhooks.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from llmtap import keys
from llmtap.alerts.db import AlertDB, Outcome
from llmtap.alerts.evaluator import Evaluator
from llmtap.alerts.rules import AlertRule, Invalid, make_rule, parse_duration
from llmtap.cli import cli
from llmtap.store.base import Store
from llmtap.webhooks.db import new_endpoint_id
from llmtap.webhooks.outbox import ALERT_FIRING, ALERT_RESOLVED, REQUEST_COMPLETED, Endpoint, new_secret
from store_helpers import open_store, pg_database, rec, store_params
from test_api import Server, start_server

pytestmark = pytest.mark.timeout(300)

#: The injected "now" of the tests: a whole minute.
T = datetime(2025, 3, 30, 12, 0, tzinfo=UTC)
MIN = 60_000_000


def us(dt: datetime) -> int:
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def at(minutes: float) -> int:
    """T + minutes, in microseconds (the evaluator's clock)."""
    return us(T) + int(minutes * MIN)


def r(when: datetime, tenant: str = "acme", **kw: Any) -> Any:
    """A record at `when` with a fresh id (latency 100 ms, cost $0.000001, status 200)."""
    return rec(0, id=str(uuid.uuid4()), tenant=tenant, at=when, **kw)


@pytest.fixture(params=store_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path) as s:
        yield s


async def add_rule(store: Store, tenant: str = "acme", **kw: Any) -> AlertRule:
    return await AlertDB(store.webhooks()).add_rule(make_rule(tenant, **kw), us(T))


async def subscribe(
    store: Store, tenant: str = "acme", events: tuple[str, ...] = (ALERT_FIRING, ALERT_RESOLVED)
) -> Endpoint:
    ep = Endpoint(new_endpoint_id(), tenant, "http://example.com/hook", new_secret(), events=list(events))
    return await store.webhooks().add_endpoint(ep)


async def events(store: Store, tenant: str = "acme") -> list[tuple[str, str, dict[str, Any]]]:
    """(endpoint, event, payload) of every alert event in the tenant's outbox, oldest first."""
    async with store.webhooks().tx() as c:
        rows = await c.fetch(
            "SELECT endpoint_id, event, payload, id FROM webhook_deliveries WHERE tenant = $1"
            " AND event IN ('alert.firing', 'alert.resolved') ORDER BY created_at, id",
            tenant,
        )
    return [(row[0], row[1], json.loads(row[2])) for row in rows]


def kinds(evs: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    return [e for _, e, _ in evs]


# -- rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"metric": "latency"}, "unknown metric 'latency'"),
        ({"op": "over"}, "op must be above or below"),
        ({"threshold": "5"}, "threshold must be a finite number"),
        ({"threshold": float("nan")}, "threshold must be a finite number"),
        ({"metric": "error_rate", "threshold": 5}, "fraction between 0 and 1"),
        ({"window_s": 60}, "whole minutes from 5m to 1d"),
        ({"window_s": 90_000}, "whole minutes from 5m to 1d"),
        ({"window_s": 330}, "whole minutes from 5m to 1d"),
        ({"group_by": "session"}, "group_by must be one of"),
        ({"group_by": "property."}, "group_by must be one of"),
        ({"min_requests": -1}, "min_requests must be a whole number"),
        ({"name": "x" * 201}, "name must be text"),
    ],
)
def test_a_bad_rule_is_refused_with_one_sentence(kw: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"metric": "cost_usd", "op": "above", "threshold": 1, "window_s": 300, **kw}
    with pytest.raises(Invalid) as e:
        make_rule("acme", **fields)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_durations_and_property_groups() -> None:
    assert [parse_duration(d) for d in ("300", "300s", "5m", "1h", "1d")] == [300, 300, 300, 3600, 86400]
    with pytest.raises(Invalid):
        parse_duration("5 minutes")
    rule = make_rule(
        "acme", metric="tokens", op="above", threshold=1, window_s=300, group_by="property.Feature"
    )
    assert rule.group_by == "property.feature"  # property names are case-insensitive


# -- firing and resolving -----------------------------------------------------------------------------


async def test_fires_once_with_enough_requests_and_resolves_once(store: Store) -> None:
    ep = await subscribe(store)
    await subscribe(store, events=(REQUEST_COMPLETED,))  # gets no alert event
    rule = await add_rule(
        store, metric="error_rate", op="above", threshold=0.5, window_s=3600, min_requests=4
    )
    ev = Evaluator(store, interval_s=60, resolve_after_s=300)
    # Three failures in the window: a 100% error rate, but fewer requests than the minimum.
    await store.write_batch([r(T - timedelta(minutes=10, seconds=i), status=500) for i in range(3)])
    assert await ev.run_once(at(0.5)) == 1
    assert kinds(await events(store)) == []
    # Another evaluation in the same interval is not this evaluator's to make (the claim).
    assert await ev.run_once(at(0.9)) == 0

    await store.write_batch([r(T - timedelta(minutes=9), status=500)])
    assert await ev.run_once(at(1.5)) == 1
    got = await events(store)
    assert [(e, k) for e, k, _ in got] == [(ep.id, ALERT_FIRING)]
    data = got[0][2]["data"]
    assert got[0][2]["type"] == ALERT_FIRING
    assert (data["alert_id"], data["value"], data["count"], data["episode"]) == (rule.id, 1.0, 4, 1)
    assert data["source"] == "rollups"  # a whole-minute window, no grouping: the minute rollups answer
    assert data["window_end"].startswith("2025-03-30T12:01:00")
    assert data["window_start"].startswith("2025-03-30T11:01:00")

    # Still above: no second event, whatever the number of evaluations.
    for m in range(2, 6):
        await ev.run_once(at(m + 0.5))
    assert len(await events(store)) == 1

    # Clear from now on (4 errors of 20 requests); it resolves only after 300 s clear.
    await store.write_batch([r(T + timedelta(minutes=5, seconds=i)) for i in range(16)])
    clear_from = 6.5
    for m in (6.5, 7.5, 8.5, 9.5, 10.5):
        await ev.run_once(at(m))
        assert kinds(await events(store)) == [ALERT_FIRING], f"resolved after only {m - clear_from} min"
    await ev.run_once(at(11.5))
    got = await events(store)
    assert kinds(got) == [ALERT_FIRING, ALERT_RESOLVED]
    resolved = got[1][2]["data"]
    assert resolved["episode"] == 1 and resolved["value"] == pytest.approx(4 / 20) and resolved["count"] == 20
    assert resolved["fired_at"].startswith("2025-03-30T12:01:30")
    for m in range(12, 20):
        await ev.run_once(at(m + 0.5))
    assert len(await events(store)) == 2
    state = (await AlertDB(store.webhooks()).states("acme"))[0]
    assert (state["state"], state["episode"]) == ("resolved", 1)


async def test_a_value_hovering_at_the_threshold_fires_once_and_resolves_once(store: Store) -> None:
    """Requests in every other minute: the 5-minute count alternates 6, 4, 6, 4 ... around the
    threshold 5 at each evaluation. One firing, no resolution while it hovers, one once it stops."""
    await subscribe(store)
    await add_rule(store, metric="requests", op="above", threshold=5, window_s=300, min_requests=0)
    ev = Evaluator(store, interval_s=60, resolve_after_s=300)
    recs = [r(T + timedelta(minutes=m, seconds=s)) for m in range(0, 30, 2) for s in (1, 2)]
    await store.write_batch(recs)
    for m in range(5, 31):
        await ev.run_once(at(m))
    assert kinds(await events(store)) == [ALERT_FIRING]
    for m in range(31, 45):  # no more requests: clear at every evaluation from minute 31 on
        await ev.run_once(at(m))
    assert kinds(await events(store)) == [ALERT_FIRING, ALERT_RESOLVED]


async def test_requests_below_fires_on_silence(store: Store) -> None:
    await subscribe(store)
    await add_rule(store, metric="requests", op="below", threshold=1, window_s=300, min_requests=0)
    ev = Evaluator(store, interval_s=60, resolve_after_s=0)
    await store.write_batch([r(T - timedelta(minutes=2))])
    await ev.run_once(at(0))
    assert kinds(await events(store)) == []
    await ev.run_once(at(4))  # the one request left the window
    assert kinds(await events(store)) == [ALERT_FIRING]
    await store.write_batch([r(T + timedelta(minutes=4, seconds=30))])
    await ev.run_once(at(5))
    assert kinds(await events(store)) == [ALERT_FIRING, ALERT_RESOLVED]  # resolve_after 0: at once


async def test_requests_below_per_group_fires_when_a_group_goes_silent(store: Store) -> None:
    """An outside check: a group with no requests is in no stats answer, so a grouped
    `requests below 1` could never fire for the group that stopped."""
    await subscribe(store)
    await add_rule(
        store, metric="requests", op="below", threshold=1, window_s=300, group_by="model", min_requests=0
    )
    ev = Evaluator(store, interval_s=60, resolve_after_s=0)
    await store.write_batch([r(T - timedelta(minutes=2), model=m) for m in ("a", "b")])
    await ev.run_once(at(0))
    assert kinds(await events(store)) == []
    await store.write_batch([r(T + timedelta(minutes=3), model="a")])  # b stopped
    await ev.run_once(at(4))
    evs = await events(store)
    assert [(e, p["data"]["group"], p["data"]["count"]) for _, e, p in evs] == [(ALERT_FIRING, "b", 0)]
    await ev.run_once(at(9))  # b stays silent: still firing, not again; a went silent too
    assert [(e, p["data"]["group"]) for _, e, p in await events(store)] == [
        (ALERT_FIRING, "b"),
        (ALERT_FIRING, "a"),
    ]


async def test_a_group_beyond_the_largest_hundred_is_not_taken_for_a_silent_one(store: Store) -> None:
    """An outside review: a group in the window before, still sending now but ranked below the
    100 largest groups the stats answer holds, was evaluated as empty and fired."""
    await subscribe(store)
    await add_rule(
        store, metric="requests", op="below", threshold=1, window_s=300, group_by="model", min_requests=0
    )
    ev = Evaluator(store, interval_s=60, resolve_after_s=0)
    await store.write_batch([r(T - timedelta(minutes=2), model="x") for _ in range(5)])
    await ev.run_once(at(0))
    batch = [r(T + timedelta(minutes=3), model=f"m{i:03d}") for i in range(100) for _ in range(3)]
    await store.write_batch([*batch, *(r(T + timedelta(minutes=3), model="x") for _ in range(2))])
    await ev.run_once(at(4))
    assert [p["data"]["group"] for _, _, p in await events(store) if p["data"]["group"] == "x"] == []


async def test_per_group_rules_fire_per_group(store: Store) -> None:
    await subscribe(store)
    await subscribe(store, "globex")
    by_model = await add_rule(
        store, metric="error_rate", op="above", threshold=0.5, window_s=600, group_by="model", min_requests=2
    )
    by_user = await add_rule(
        store, metric="p95_latency_ms", op="above", threshold=1000, window_s=600, group_by="user_id",
        min_requests=3,
    )  # fmt: skip
    w = T - timedelta(minutes=3)
    await store.write_batch(
        [r(w + timedelta(seconds=i), model="a", status=500) for i in range(3)]  # fires
        + [r(w + timedelta(seconds=i), model="b") for i in range(3)]  # fine
        + [r(w + timedelta(seconds=i), model="c", status=429, user_id="slow") for i in range(2)]  # fires
        + [r(w + timedelta(seconds=i), model="d", status=500) for i in range(1)]  # too few
        + [r(w + timedelta(seconds=i), model="b", user_id="slow", latency_ms=3000.0) for i in range(2)]
        + [r(w + timedelta(seconds=i), model="b", user_id="fast", latency_ms=50.0) for i in range(5)]
        + [r(w, tenant="globex", model="a", status=500) for _ in range(5)]  # another tenant's
    )
    ev = Evaluator(store, interval_s=60, resolve_after_s=300)
    await ev.run_once(at(0))
    await ev.run_once(at(1))
    got = [
        (p["data"]["alert_id"], p["data"]["group"], p["data"]["source"]) for _, _, p in await events(store)
    ]
    assert sorted(got) == sorted([
        (by_model.id, "a", "rollups"), (by_model.id, "c", "rollups"),
        (by_user.id, "slow", "rollups"),  # a window inside a day: the users' sums raw, the totals rolled up
    ])  # fmt: skip
    data = {p["data"]["group"]: p["data"] for _, _, p in await events(store)}
    assert data["slow"]["count"] == 4 and data["slow"]["value"] > 1000  # 2 of 4 requests took 3 s
    assert data["a"]["count"] == 3  # not globex's 5
    assert await events(store, "globex") == []


async def test_a_firing_group_that_goes_quiet_resolves(store: Store) -> None:
    await subscribe(store)
    await add_rule(store, metric="cost_usd", op="above", threshold=0, window_s=300, group_by="model")
    ev = Evaluator(store, interval_s=60, resolve_after_s=120)
    await store.write_batch([r(T - timedelta(minutes=1), model="x")])
    await ev.run_once(at(0))
    assert kinds(await events(store)) == [ALERT_FIRING]
    for m in range(5, 8):  # the request left the window at minute 5 (4 until then)
        await ev.run_once(at(m))
    assert kinds(await events(store)) == [ALERT_FIRING, ALERT_RESOLVED]


async def test_a_firing_group_outranked_by_a_hundred_others_is_still_evaluated(store: Store) -> None:
    """The alerts review: a user at 100% errors was "resolved" with no value once a hundred busier
    users filled the stats answer, its failed request still in the window. A firing group
    missing from a cut answer is asked for alone; while it holds it stays firing, and once its
    request leaves the window it resolves (the null group, which no filter selects, is left)."""
    await subscribe(store)
    await add_rule(store, metric="error_rate", op="above", threshold=0.5, window_s=600, group_by="user_id")
    ev = Evaluator(store, interval_s=60, resolve_after_s=60)
    await store.write_batch([r(T - timedelta(minutes=1), user_id="u_small", status=500)])
    await ev.run_once(at(0))
    assert kinds(await events(store)) == [ALERT_FIRING]
    busy = [r(T + timedelta(seconds=10), user_id=f"u{i:03d}") for i in range(100) for _ in range(2)]
    await store.write_batch(busy)
    for m in range(1, 6):  # u_small's failure is still in the window: no resolution
        await ev.run_once(at(m))
    assert kinds(await events(store)) == [ALERT_FIRING]
    (state,) = await AlertDB(store.webhooks()).states("acme")
    assert (state["state"], state["value"], state["count"]) == ("firing", 1.0, 1)
    for m in range(10, 13):  # it left the window (9 min after it): clear, then resolved
        await ev.run_once(at(m))
    got = await events(store)
    assert kinds(got) == [ALERT_FIRING, ALERT_RESOLVED] and got[1][2]["data"]["group"] == "u_small"


async def test_outranked_firing_groups_are_asked_for_in_turns(store: Store, monkeypatch: Any) -> None:
    """Today's second diff review: with a cap on the groups asked for alone per evaluation, the
    same first ones were asked every time and a group sorted after them never resolved."""
    from llmtap.alerts import evaluator

    monkeypatch.setattr(evaluator, "_ALONE_MAX", 2)
    await subscribe(store)
    await add_rule(store, metric="error_rate", op="above", threshold=0.5, window_s=600, group_by="user_id")
    ev = Evaluator(store, interval_s=60, resolve_after_s=60)
    small = [f"s{i}" for i in range(5)]
    await store.write_batch([r(T - timedelta(minutes=1), user_id=u, status=500) for u in small])
    await ev.run_once(at(0))
    assert len(await AlertDB(store.webhooks()).states("acme")) == 5
    busy = [r(T + timedelta(seconds=10), user_id=f"u{i:03d}") for i in range(100) for _ in range(2)]
    await store.write_batch(busy)
    asked: list[list[str]] = []
    real = ev._one_group

    async def one_group(rule: Any, since: int, until: int, key: str) -> Any:
        asked[-1].append(key)
        return await real(rule, since, until, key)

    ev._one_group = one_group  # type: ignore[method-assign]
    for m in range(1, 4):
        asked.append([])
        await ev.run_once(at(m))
    assert all(len(a) == 2 for a in asked), asked
    assert {k for a in asked for k in a} == {f"={u}" for u in small}, asked


async def test_a_rule_given_another_grouping_starts_afresh(store: Store) -> None:
    """The alerts review: `requests below 100` firing ungrouped, then PATCHed to group by model:
    its ungrouped state was scored on an empty window at every evaluation, firing for ever."""
    await subscribe(store)
    rule = await add_rule(store, metric="requests", op="below", threshold=100, window_s=300, min_requests=0)
    ev = Evaluator(store, interval_s=60, resolve_after_s=60)
    await store.write_batch([r(T - timedelta(minutes=1), model="a") for _ in range(12)])
    await ev.run_once(at(0))
    assert kinds(await events(store)) == [ALERT_FIRING]
    db = AlertDB(store.webhooks())
    rule.group_by, rule.threshold = "model", 5
    assert await db.update_rule(rule)
    assert await db.states("acme") == []  # the ungrouped state went with the old grouping
    for m in range(1, 4):
        await ev.run_once(at(m))
    assert kinds(await events(store)) == [ALERT_FIRING]  # model a has 12 >= 5: nothing fires
    rule.threshold = 50  # the same grouping: states kept, the next evaluation judges anew
    assert await db.update_rule(rule)
    await ev.run_once(at(4))
    got = await events(store)
    assert kinds(got) == [ALERT_FIRING, ALERT_FIRING] and got[1][2]["data"]["group"] == "a"
    assert [s["group_key"] for s in await db.states("acme")] == ["=a"]


async def test_a_rule_removed_during_its_evaluation_fires_nothing(store: Store) -> None:
    """The alerts review: removed while its stats were read, the rule still wrote a firing
    state (orphaned: no rule) and an `alert.firing` for it."""
    await subscribe(store)
    rule = await add_rule(store, metric="error_rate", op="above", threshold=0.5, window_s=300)
    await store.write_batch([r(T - timedelta(minutes=1), status=500)])
    db = AlertDB(store.webhooks())
    ev = Evaluator(store, interval_s=60)
    real_stats = store.stats

    async def stats(*args: Any, **kw: Any) -> Any:
        out = await real_stats(*args, **kw)
        assert await db.remove_rule("acme", rule.id)  # after the stats were read, before the states
        return out

    store.stats = stats  # type: ignore[method-assign]
    try:
        await ev.evaluate(rule, at(0))
    finally:
        store.stats = real_stats  # type: ignore[method-assign]
    assert await db.states("acme") == [] and await events(store) == []


# -- several evaluators -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_stores(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database, as two `llmtap server` processes have."""
    if kind == "sqlite":
        from llmtap.store.sqlite import SQLiteStore

        path = tmp_path / "shared.db"
        a, b = SQLiteStore(path), SQLiteStore(path)
        await a.connect()
        await b.connect()
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()
        return
    from llmtap.store.postgres import PostgresStore

    async with pg_database() as url:
        a, b = PostgresStore(url), PostgresStore(url)
        await a.connect()
        await b.connect()
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()


@pytest.mark.parametrize("kind", store_params())
async def test_two_evaluators_do_not_double_fire(kind: str, tmp_path: Path) -> None:
    async with two_stores(kind, tmp_path) as (a, b):
        await subscribe(a)
        await subscribe(a)  # two endpoints: one event each
        rule = await add_rule(a, metric="error_rate", op="above", threshold=0.5, window_s=600, min_requests=1)
        await a.write_batch([r(T - timedelta(minutes=2), status=500) for _ in range(3)])
        one = Evaluator(a, interval_s=60, resolve_after_s=60)
        two = Evaluator(b, interval_s=60, resolve_after_s=60)
        # Racing evaluations without claims (clocks apart, a claim lapsed): the state row decides.
        await asyncio.gather(*(e.evaluate(rule, at(0)) for _ in range(4) for e in (one, two)))
        assert kinds(await events(a)) == [ALERT_FIRING, ALERT_FIRING]
        assert one.fired + two.fired == 1
        # With claims, evaluators at the same moment evaluate the rule once in all.
        done = await asyncio.gather(one.run_once(at(1)), two.run_once(at(1)))
        assert sorted(done) == [0, 1]
        assert kinds(await events(a)) == [ALERT_FIRING, ALERT_FIRING]
        # Clear, then both race to resolve: one resolution per endpoint.
        await a.write_batch([r(T + timedelta(seconds=i)) for i in range(20)])
        await asyncio.gather(one.evaluate(rule, at(2)), two.evaluate(rule, at(2)))
        await asyncio.gather(*(e.evaluate(rule, at(3.5)) for _ in range(4) for e in (one, two)))
        got = await events(a)
        assert kinds(got) == [ALERT_FIRING, ALERT_FIRING, ALERT_RESOLVED, ALERT_RESOLVED]
        assert one.resolved + two.resolved == 1
        assert len({p["data"]["episode"] for _, _, p in got}) == 1
        # It can fire again later: a new episode, new events.
        await a.write_batch([r(T + timedelta(minutes=3, seconds=i), status=500) for i in range(40)])
        await asyncio.gather(one.evaluate(rule, at(4)), two.evaluate(rule, at(4)))
        got = await events(a)
        assert kinds(got)[4:] == [ALERT_FIRING, ALERT_FIRING]
        assert {p["data"]["episode"] for _, k, p in got[4:]} == {2}


@pytest.mark.parametrize("kind", store_params())
async def test_of_concurrent_state_changes_in_the_store_one_wins(kind: str, tmp_path: Path) -> None:
    """The store's conditional updates themselves, without the evaluator's own reading of the
    state first: of many concurrent fires of one group one wins, and of many resolutions."""
    async with two_stores(kind, tmp_path) as (a, b):
        ep = await subscribe(a)
        rule = await add_rule(a, metric="requests", op="above", threshold=0, window_s=300)
        dbs = [AlertDB(s.webhooks()) for s in (a, b)]
        won = await asyncio.gather(
            *(db.fire(rule, Outcome("=x", True, 1.0, 1, False), at(0)) for _ in range(5) for db in dbs)
        )
        assert sorted(won, key=str) == [1] + [None] * 9
        clear = Outcome("=x", False, 0.0, 0, True)
        done = await asyncio.gather(*(db.clear(rule, clear, at(1), MIN) for _ in range(5) for db in dbs))
        assert done == [None] * 10  # clear for 0 s of the 60 required
        done = await asyncio.gather(*(db.clear(rule, clear, at(2), MIN) for _ in range(5) for db in dbs))
        assert sorted(done, key=str) == [1] + [None] * 9
        assert [(e, k) for e, k, _ in await events(a)] == [(ep.id, ALERT_FIRING), (ep.id, ALERT_RESOLVED)]


# -- API and CLI ----------------------------------------------------------------------------------


@pytest.fixture(params=store_params())
async def mt(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    async for s in start_server(request.param, tmp_path, multi_tenant=True):
        yield s


async def call(srv: Server, method: str, path: str, key: str | None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None if body is None else json.dumps(body)
    if method in ("POST", "PATCH"):
        headers["Content-Type"] = "application/json"
    async with srv.http.request(method, srv.base + path, headers=headers, data=data) as resp:
        raw = await resp.read()
        return resp.status, (json.loads(raw) if raw else None)


async def test_alerts_api_is_authenticated_and_tenant_scoped(mt: Server) -> None:
    _, key_a = await keys.create_key(mt.svc.store, "tenant-a", None)
    _, key_b = await keys.create_key(mt.svc.store, "tenant-b", None)
    for method, path in (("GET", "/api/v1/alerts"), ("POST", "/api/v1/alerts"), ("GET", "/api/v1/alerts/x"),
                         ("PATCH", "/api/v1/alerts/x"), ("DELETE", "/api/v1/alerts/x")):  # fmt: skip
        assert (await call(mt, method, path, None, {}))[0] == 401, (method, path)

    rule = {"metric": "error_rate", "op": "above", "threshold": 0.1, "window_s": 600, "group_by": "model",
            "min_requests": 10, "name": "errors"}  # fmt: skip
    status, created = await call(mt, "POST", "/api/v1/alerts", key_a, rule)
    assert status == 201, created
    assert created["tenant"] == "tenant-a" and created["id"].startswith("al_")
    assert {k: created[k] for k in rule} == rule
    status, listed = await call(mt, "GET", "/api/v1/alerts", key_a)
    assert status == 200 and [x["id"] for x in listed["items"]] == [created["id"]]
    assert listed["items"][0]["firing"] == 0 and listed["items"][0]["states"] == []
    assert (await call(mt, "GET", "/api/v1/alerts", key_b))[1] == {"items": []}
    rid = created["id"]
    for method in ("GET", "PATCH", "DELETE"):
        assert (await call(mt, method, f"/api/v1/alerts/{rid}", key_b, {"threshold": 0.2}))[0] == 404, method

    status, patched = await call(mt, "PATCH", f"/api/v1/alerts/{rid}", key_a, {"threshold": 0.2})
    assert status == 200 and patched["threshold"] == 0.2 and patched["group_by"] == "model"
    status, err = await call(mt, "PATCH", f"/api/v1/alerts/{rid}", key_a, {"threshold": 2})
    assert status == 400 and "fraction" in err["error"]["message"]
    assert (await call(mt, "GET", f"/api/v1/alerts/{rid}", key_a))[1]["threshold"] == 0.2

    base = {"metric": "cost_usd", "op": "above", "threshold": 1, "window_s": 300}
    for bad, says in (({**base, "metric": "nope"}, "unknown metric"), ({**base, "window_s": 30}, "5m to 1d"),
                      ({**base, "extra": 1}, "unknown field 'extra'"),
                      ({"metric": "cost_usd"}, "missing field 'op'"),
                      ({**base, "group_by": "bogus"}, "group_by must be"),
                      ({**base, "threshold": -1}, "threshold must be 0 or more"),  # always fired
                      ({**base, "metric": []}, "unknown metric"),  # unhashable: a 500 before
                      ({**base, "metric": {"a": 1}}, "unknown metric")):  # fmt: skip
        status, err = await call(mt, "POST", "/api/v1/alerts", key_a, bad)
        assert status == 400 and says in err["error"]["message"], (bad, err)
    status, err = await call(mt, "PATCH", f"/api/v1/alerts/{rid}", key_a, {"metric": {"a": 1}})
    assert status == 400 and "unknown metric" in err["error"]["message"], err

    assert (await call(mt, "DELETE", f"/api/v1/alerts/{rid}", key_a))[0] == 204
    assert (await call(mt, "GET", "/api/v1/alerts", key_a))[1] == {"items": []}
    assert (await call(mt, "GET", f"/api/v1/alerts/{rid}", key_a))[0] == 404


def test_cli_manages_rules(tmp_path: Path) -> None:
    env = {"LLMTAP_DATA_DIR": str(tmp_path), "LLMTAP_STORE": f"sqlite:{tmp_path / 'store.db'}"}
    runner = CliRunner()
    from llmtap.alerts.rules import METRICS
    from llmtap.cli import alerts_add

    metric = next(p for p in alerts_add.params if p.name == "metric")
    assert isinstance(metric.type, click.Choice) and list(metric.type.choices) == list(METRICS)
    res = runner.invoke(cli, ["alerts", "--help"], env=env)
    assert res.exit_code == 0 and "Examples:" in res.stdout and "--group-by model" in res.stdout
    res = runner.invoke(cli, ["alerts", "list"], env=env)
    assert res.exit_code == 0 and "no alert rules" in res.output
    # nothing there yet (a mistyped data dir looks the same): the answer says where it looked
    assert f"no store at '{tmp_path / 'store.db'}' yet" in res.stderr
    for args, says in (
        (["--metric", "error_rate", "--above", "5", "--window", "5m"], "fraction between 0 and 1"),
        (["--metric", "cost_usd", "--above", "5", "--window", "2m"], "whole minutes from 5m to 1d"),
        (["--metric", "cost_usd", "--above", "5", "--below", "1", "--window", "5m"], "exactly one of"),
        (["--metric", "cost_usd", "--above", "5", "--window", "five"], "is not a duration"),
    ):
        res = runner.invoke(cli, ["alerts", "add", *args], env=env)
        assert res.exit_code == 2 and says in res.output and res.output.count("\n") == 1, res.output
    res = runner.invoke(
        cli,
        ["alerts", "add", "--metric", "error_rate", "--above", "0.05", "--window", "1h",
         "--group-by", "model", "--min-requests", "20", "--tenant", "acme", "--name", "errors"],
        env=env,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rule_id = res.stdout.strip()
    assert rule_id.startswith("al_")
    res = runner.invoke(cli, ["alerts", "list"], env=env)
    assert res.exit_code == 0 and rule_id in res.stdout
    assert "error_rate above 0.05 over 1h per model (min 20 requests)" in res.stdout
    assert "tenant=acme" in res.stdout
    # not the default tenant's
    assert runner.invoke(cli, ["alerts", "remove", rule_id], env=env).exit_code == 1
    assert runner.invoke(cli, ["alerts", "remove", rule_id, "--tenant", "acme"], env=env).exit_code == 0
    assert "no alert rules" in runner.invoke(cli, ["alerts", "list"], env=env).output


async def test_the_server_runs_the_evaluator(tmp_path: Path) -> None:
    from llmtap.alerts.evaluator import AlertService
    from llmtap.config import Settings
    from llmtap.runtime import SharedBackends

    settings = Settings(data_dir=tmp_path, store=f"sqlite:{tmp_path / 'store.db'}", alert_interval_s=1)
    shared = SharedBackends(settings)
    svc = AlertService(settings, backends=shared)
    lines = await svc.start()
    try:
        assert lines == ["alerts    evaluated every 1 s"]
        store = await shared.connect_store()
        rule = await add_rule(store, metric="requests", op="above", threshold=100, window_s=300)
        deadline = asyncio.get_running_loop().time() + 120

        async def evaluated() -> bool:
            got = await AlertDB(store.webhooks()).get_rule("acme", rule.id)
            return got is not None and got.evaluated_at is not None

        while not await evaluated():  # the service's own loop claims and evaluates it
            assert asyncio.get_running_loop().time() < deadline, "the rule was never evaluated"
            await asyncio.sleep(0.1)
    finally:
        await svc.stop()
        await shared.stop()


async def test_an_outage_is_one_line_when_it_begins_and_one_when_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The evaluator logged "store unavailable" every round of an outage (a line a minute at the
    default interval, an outside audit counted them): now once, and once when it is back."""
    from llmtap.alerts.evaluator import AlertService, Evaluator
    from llmtap.config import Settings
    from llmtap.errors import TransientError
    from llmtap.runtime import SharedBackends

    settings = Settings(data_dir=tmp_path, store=f"sqlite:{tmp_path / 'store.db'}")
    settings = settings.model_copy(update={"alert_interval_s": 0.01})  # below the setting's floor
    shared = SharedBackends(settings)
    svc = AlertService(settings, backends=shared)
    rounds = {"n": 0}
    real = Evaluator.run_once

    async def run_once(self: Evaluator) -> Any:
        rounds["n"] += 1
        if 3 <= rounds["n"] <= 12:
            raise TransientError("database is locked")
        return await real(self)

    caplog.set_level(logging.INFO, logger="llmtap.alerts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Evaluator, "run_once", run_once)
        await svc.start()
        try:
            deadline = asyncio.get_running_loop().time() + 120
            while rounds["n"] < 20:
                assert asyncio.get_running_loop().time() < deadline, rounds
                await asyncio.sleep(0.05)
        finally:
            await svc.stop()
            await shared.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "llmtap.alerts"]
    assert [m.split(":")[1].strip() for m in said] == [
        "store unavailable, evaluating again later",
        "store available again, evaluating",
    ], said
