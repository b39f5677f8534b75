"""Rollups answer `stats` like raw rows do: counts, sums, first/last and group order exactly,
percentiles within the sketches' 1% bound, on random data, through redelivery and retention.
Per-user totals (`rollup.USER_DIM`: group_by=user_id, `GET /api/v1/users`) likewise, exactly,
tenant by tenant, and only for ranges their migration covers.

The raw path is itself checked against a plain-Python reference in test_store.py; here the
overall answers are checked against that reference too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import random
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from ddsketch import DDSketch

from llmtap.record import LogRecord
from llmtap.store import rollup
from llmtap.store.base import ListQuery, StatsQuery, Store
from llmtap.store.query import from_micros, to_micros
from llmtap.store.sketch import RELATIVE_ACCURACY, Sketch
from store_helpers import (
    T0,
    assert_totals,
    dataset,
    percentile_cont,
    pg_database,
    pg_url,
    pg_write,
    planned_rows,
    rec,
    ref_filter,
    store_params,
)

pytestmark = pytest.mark.timeout(600)
PROPS = ("env", "Team")  # names are case-insensitive: "Team" rolls up property "team"
PROPS_STORED = ("env", "team")  # as the stores pass them to `rollup.contributions`
#: Ends of ranges off the minute (and hour) boundaries, as an API client sends "the last N hours".
OFF_A = T0 - timedelta(days=2, minutes=30, seconds=20, microseconds=500_000)
OFF_B = T0 - timedelta(hours=5, seconds=41, microseconds=7)


@contextlib.asynccontextmanager
async def rollup_store(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    async with contextlib.AsyncExitStack() as stack:
        if kind == "sqlite":
            where = str(tmp_path / f"r-{uuid.uuid4().hex[:6]}.db")
        else:
            where = await stack.enter_async_context(pg_database())
        yield await stack.enter_async_context(opened_store(kind, where, PROPS))


def records() -> list[LogRecord]:
    out = dataset(1200, seed=23)
    r = random.Random(5)
    for i, x in enumerate(out):
        if i % 7 == 0:
            x.properties["team"] = r.choice(("red", "blue", "grün", "红"))
        if i % 53 == 0:
            x.latency_ms = 0.0  # the sketch's zero bucket
        if i % 61 == 0:
            x.user_id = "u" * 3000  # longer than a PostgreSQL B-tree entry: keys go by hash
        if i % 29 == 0:
            x.status = None  # no response: NULL status key
        if i % 43 == 0:
            x.user_id = ""  # a user id, not NULL: its own group
    # Rows just inside and just outside the ends of the ranges off the grains' boundaries
    # (`OFF_A`, `OFF_B`): the partial minutes (hours for properties) there are read from raw rows.
    offsets = (-1, 0, 1, 30, 1200, -1200, -30, 0.5)
    for i, (anchor, off) in enumerate((a, o) for a in (OFF_A, OFF_B) for o in offsets for _ in range(3)):
        x = out[1 + 7 * i]
        shift = anchor + timedelta(seconds=off) - x.started_at
        x.started_at += shift
        x.first_byte_at = None if x.first_byte_at is None else x.first_byte_at + shift
        x.ended_at += shift
    # Users last active at one instant, more than a page of `compare_users`: a page ends among them.
    tied = T0 - timedelta(hours=2, seconds=13)
    for tenant in ("acme", "globex"):
        out += [
            rec(40_000 + i, id=f"tie-{tenant}-{i}", tenant=tenant, at=tied, user_id=f"tie-{i:02d}")
            for i in range(10)
        ]
    return out


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= RELATIVE_ACCURACY * abs(b) + 1e-9


def assert_same(rolled: dict[str, Any], raw: dict[str, Any], what: Any) -> None:
    assert rolled["source"] == "rollups" and rolled["percentile_relative_error"] == RELATIVE_ACCURACY, what
    assert raw["source"] == "raw" and raw["percentile_relative_error"] == 0.0, what
    pairs = [(rolled["overall"], raw["overall"])]
    assert [g["key"] for g in rolled["groups"]] == [g["key"] for g in raw["groups"]], what
    assert [b["start"] for b in rolled["buckets"]] == [b["start"] for b in raw["buckets"]], what
    pairs += list(zip(rolled["groups"], raw["groups"], strict=True))
    pairs += list(zip(rolled["buckets"], raw["buckets"], strict=True))
    for a, b in pairs:
        pct = ("latency_ms", "time_to_first_token_ms")
        assert {k: v for k, v in a.items() if k not in pct} == {k: v for k, v in b.items() if k not in pct}, (
            what
        )
        for k in pct:
            for p in ("p50", "p90", "p99"):
                assert close(a[k][p], b[k][p]), (what, k, p, a[k][p], b[k][p])


def queries() -> list[StatsQuery]:
    day = timedelta(days=1)
    midnight = T0.replace(hour=0, minute=0, second=0, microsecond=0)
    hour = T0.replace(minute=0, second=0, microsecond=0)
    minute = T0.replace(second=0, microsecond=0)
    ranges: list[tuple[datetime | None, datetime | None]] = [
        (None, None),
        (midnight - 30 * day, midnight),  # a 30-day overview: day rollups
        (hour - timedelta(hours=200), hour - timedelta(hours=3)),  # hour rollups
        (minute - timedelta(days=9, minutes=7), minute + timedelta(minutes=1)),  # minute rollups
        (midnight - 40 * day, None),
        # Whole days crossing months (T0 is March 30th): per-user sums read month rows less the
        # days outside the range where that is fewer rows (`rollup.user_parts`), day rows else.
        (datetime(2025, 1, 25, tzinfo=UTC), datetime(2025, 2, 20, tzinfo=UTC)),
        (datetime(2025, 1, 3, tzinfo=UTC), None),
        (datetime(2025, 2, 2, tzinfo=UTC), datetime(2025, 2, 27, tzinfo=UTC)),
        # Off the grains' boundaries: days, hours and minutes inside from rollups, the partial
        # minutes (hours for properties) at the ends from raw rows; users need whole days.
        (OFF_A, OFF_B),
        (OFF_A, None),
        (None, OFF_B),
        (OFF_B - timedelta(minutes=40, seconds=5), OFF_B - timedelta(minutes=20)),  # no whole hour
        (OFF_A, OFF_A + timedelta(seconds=30)),  # no whole minute: raw rows only
        (midnight, midnight),  # empty, on the boundaries
        (OFF_A, OFF_A),  # empty, off them
    ]
    out = []
    for since, until in ranges:
        for group_by in (None, "model", "provider", "status", "user_id", "property.env", "property.TEAM"):
            for bucket in (None, "day", "hour"):
                out.append(StatsQuery(since=since, until=until, group_by=group_by, bucket=bucket))  # type: ignore[arg-type]
        out.append(StatsQuery(since=since, until=until, bucket="minute", group_by="model"))
    return out


async def compare_all(store: Store, written: list[LogRecord], cutoff: datetime | None = None) -> int:
    """Every query twice (rollups, raw): same answers. Returns how many were answered by rollups."""
    rolled_count = 0
    for q in queries():
        for tenant in ("acme", "globex"):
            got = await store.stats(tenant, q)
            exact = StatsQuery(since=q.since, until=q.until, group_by=q.group_by, bucket=q.bucket, exact=True)
            want = await store.stats(tenant, exact)
            if got["source"] == "raw":
                assert got == want
                continue
            rolled_count += 1
            assert_same(got, want, (tenant, q))
            if q.group_by == "user_id":  # totals rolled up, percentiles from the raw rows: exact
                assert got["groups"] == want["groups"], (tenant, q)
            rows = ref_filter(written, tenant, since=q.since, until=q.until)
            if cutoff is not None:
                rows = [r for r in rows if r.started_at >= cutoff]
            assert_totals(got["overall"], rows, RELATIVE_ACCURACY)
    return rolled_count


@pytest.fixture
def users_sql_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Tenants whose `users` the user rollups answered (a spy on `rollup.users_sql`)."""
    calls: list[str] = []
    real = rollup.users_sql

    def spy(d: Any, tenant: str, limit: int, start: int = 0, after: Any = None, sort: str = "time") -> Any:
        calls.append(tenant)
        return real(d, tenant, limit, start, after, sort)

    monkeypatch.setattr(rollup, "users_sql", spy)
    return calls


async def compare_users(
    store: Store, written: list[LogRecord], calls: list[str], cutoff: datetime | None = None
) -> None:
    """`users` from the user rollups equals raw rows', and a plain-Python reference, per tenant."""
    for tenant in ("acme", "globex"):
        del calls[:]
        got = await store.users(tenant, limit=1000)
        assert calls == [tenant]
        assert got == await store.users(tenant, limit=1000, exact=True)
        assert await store.users(tenant, limit=3) == got[:3]
        for exact in (False, True):  # pages of 7, each after the last of the one before
            pages: list[dict[str, Any]] = []
            while True:
                after = None if not pages else (to_micros(_iso(pages[-1]["last_at"])), pages[-1]["user_id"])
                page = await store.users(tenant, limit=7, exact=exact, after=after)
                pages += page
                if len(page) < 7:
                    break
            assert pages == got, (tenant, exact)
        # Highest cost first (unpriced counts as 0), then by user id; paged the same way.
        by_cost = await store.users(tenant, limit=1000, sort="cost")
        assert by_cost == await store.users(tenant, limit=1000, exact=True, sort="cost")
        assert by_cost == sorted(got, key=lambda u: (-round((u["cost_usd"] or 0) * 1e9), u["user_id"]))
        for exact in (False, True):
            pages = []
            while True:
                last = pages[-1] if pages else None
                after = None if last is None else (round((last["cost_usd"] or 0) * 1e9), last["user_id"])
                page = await store.users(tenant, limit=7, exact=exact, after=after, sort="cost")
                pages += page
                if len(page) < 7:
                    break
            assert pages == by_cost, (tenant, exact)
        ref: dict[str, list[LogRecord]] = {}
        for r in ref_filter(written, tenant):
            if r.user_id is not None and (cutoff is None or r.started_at >= cutoff):
                ref.setdefault(r.user_id, []).append(r)
        assert {u["user_id"]: u["count"] for u in got} == {k: len(v) for k, v in ref.items()}
        for u in got:
            last = max(r.started_at for r in ref[u["user_id"]])
            assert u["last_at"] == last.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            assert u["cost_usd"] == sum(r.cost_nanos or 0 for r in ref[u["user_id"]]) / 1e9


def _iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize("kind", store_params())
async def test_rollups_equal_raw_through_redelivery_and_retention(
    kind: str, tmp_path: Path, users_sql_calls: list[str]
) -> None:
    data = records()
    async with rollup_store(kind, tmp_path) as store:
        batches = [data[i : i + 150] for i in range(0, len(data), 150)]
        inserted = 0
        for b in batches:
            inserted += await store.write_batch(b)
        assert inserted == len(data)
        # Redelivery: every batch again, and a mix of old and one new record; nothing counts twice.
        for b in batches:
            assert await store.write_batch(b) == 0
        extra = rec(9999, id="late-one", at=T0 - timedelta(days=3, seconds=11), properties={"env": "dev"})
        assert await store.write_batch([*data[:40], extra, *data[500:520]]) == 1
        # A reused id with another start time is a different request: the first one stays.
        reused = rec(1, id=data[3].id, tenant=data[3].tenant, at=T0 - timedelta(days=1))
        assert await store.write_batch([reused]) == 0
        written = [*data, extra]
        # 330 queries a tenant, 280 from rollups (user_id off whole days and with hour buckets too:
        # whole days from the user rows, the rest raw); raw rows answer properties over a range
        # without a whole hour (6), a range without a whole minute (22) and the empty range off
        # the boundaries (22)
        assert await compare_all(store, written) == 2 * 280
        await compare_users(store, written, users_sql_calls)

        # Fallbacks: a filter, a range without a whole minute, a dimension not rolled up.
        assert (await store.stats("acme", StatsQuery(since=T0)))["source"] == "rollups"
        for q in (
            StatsQuery(filters=ListQuery(user_id="alice")),
            StatsQuery(since=T0, until=T0 + timedelta(seconds=50)),
            StatsQuery(group_by="session_id"),
            StatsQuery(group_by="property.other"),
        ):
            assert (await store.stats("acme", q))["source"] == "raw"

        # Retention at a cutoff inside a minute, in small chunks, then the same checks again.
        cutoff = T0 - timedelta(days=33, minutes=17, seconds=3, microseconds=5)
        while await store.delete_older_than(cutoff, limit=137):
            pass
        assert (await store.stats("acme", StatsQuery(exact=True, until=cutoff)))["overall"]["count"] == 0
        gone = await store.stats("acme", StatsQuery(until=cutoff.replace(minute=0, second=0, microsecond=0)))
        assert gone["source"] == "rollups" and gone["overall"]["count"] == 0
        assert await compare_all(store, written, cutoff) == 2 * 280
        await compare_users(store, written, users_sql_calls, cutoff)
        # After retention, records keep adding up (the partly deleted buckets included).
        late = [rec(20_000 + i, id=f"after-{i}", at=cutoff + timedelta(seconds=i)) for i in range(30)]
        assert await store.write_batch(late) == 30
        assert await compare_all(store, [*written, *late], cutoff) == 2 * 280
        await compare_users(store, [*written, *late], users_sql_calls, cutoff)


@pytest.mark.parametrize("kind", store_params())
async def test_one_equality_on_a_rolled_up_dimension_is_answered_from_its_rollups(
    kind: str, tmp_path: Path
) -> None:
    """`model=`, `provider=`, `status=` or a rolled-up property's value: the totals and buckets
    are that value's rollup rows (the cost of one model per day, the Overview of one feature),
    grouped by that same dimension too; anything else filtered still reads raw rows."""
    data = records()
    midnight = T0.replace(hour=0, minute=0, second=0, microsecond=0)
    rolled: list[tuple[ListQuery, str]] = [
        (ListQuery(model="gpt-4o"), "model"),
        (ListQuery(provider="anthropic"), "provider"),
        (ListQuery(status=200), "status"),
        (ListQuery(status=499), "status"),  # no such request: empty, from rollups all the same
        (ListQuery(properties={"env": "prod"}), "property.env"),
        (ListQuery(properties={"TEAM": "红"}), "property.team"),  # names are case-insensitive
        (ListQuery(properties={"env": ""}), "property.env"),
    ]
    raw: list[tuple[ListQuery, str]] = [
        (ListQuery(model="gpt-4o", provider="openai"), "model"),  # two filters
        (ListQuery(properties={"other": "x"}), "property.other"),  # not rolled up
        (ListQuery(status_class=2), "status"),
        (ListQuery(user_id="alice"), "user_id"),
    ]
    ranges = ((None, None), (midnight - timedelta(days=30), midnight), (OFF_A, OFF_B))
    async with rollup_store(kind, tmp_path) as store:
        assert await store.write_batch(data) == len(data)
        answered = Counter[bool]()
        for (f, dim), rolls in [*((c, True) for c in rolled), *((c, False) for c in raw)]:
            other = "provider" if dim == "model" else "model"
            for (since, until), group_by, bucket in itertools.product(
                ranges, (None, dim, other), (None, "hour", "day")
            ):
                q = StatsQuery(since=since, until=until, group_by=group_by, bucket=bucket, filters=f)  # type: ignore[arg-type]
                got = await store.stats("acme", q)
                want = await store.stats("acme", replace(q, exact=True))
                assert got["source"] == ("rollups" if rolls and group_by != other else "raw"), (f, q)
                if got["source"] == "raw":
                    assert got == want, (f, q)
                    continue
                assert_same(got, want, (f, q))
                answered[bool(got["overall"]["count"])] += 1
        assert answered[True] >= 80, answered  # of 126 (status=499 and env="" match nothing)


#: A range off the minute and the hour: its first partial minute (hour, for a property) is raw.
SURGE_SINCE = T0 - timedelta(days=3, minutes=17, seconds=23, microseconds=500_000)


def many_groups() -> list[LogRecord]:
    """More models, statuses and property values than an answer lists (`MAX_GROUPS`), counts
    tied around the cut, and for each dimension keys whose rows sit mostly in `SURGE_SINCE`'s
    raw edge: few in the rollups, the most of all in the range that starts there."""
    r = random.Random(11)
    span = int(timedelta(days=4).total_seconds())
    out: list[LogRecord] = []

    def add(n: int, at: datetime | None = None, tenant: str = "acme", **kw: Any) -> None:
        for _ in range(n):
            when = at or T0 - timedelta(seconds=r.randrange(span), microseconds=r.randrange(10**6))
            out.append(rec(len(out), id=f"g-{len(out)}", tenant=tenant, at=when, **kw))

    models = [f"m-{i:03d}{'é' if i % 9 == 0 else ''}" for i in range(140)]
    statuses = [*range(0, 15), *range(90, 110), *range(195, 300), *range(990, 1000)]
    envs = [f"e{i % 7}-{i}" if i % 11 else f"红-{i}" for i in range(150)]
    for _ in range(700):  # ~5 rows a key: many ties around the cut
        add(1, model=r.choice(models), status=r.choice(statuses), properties={"env": r.choice(envs)})
    edge = SURGE_SINCE + timedelta(seconds=10)  # inside its partial minute and partial hour
    add(1, model="surge", status=7, properties={"env": "surge"})  # in the rollups: below the cut
    add(19, at=edge, model="surge", status=7, properties={"env": "surge"})
    add(16, at=edge, model="edge-only", status=8, properties={"env": "edge-only"})
    add(300, tenant="globex", model="theirs", status=555, properties={"env": "theirs"})
    return out


@pytest.mark.parametrize("kind", store_params())
async def test_more_groups_than_an_answer_lists_are_ranked_in_sql_and_only_those_listed_read(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dimension with a value per request has as many rollup rows as requests: the database
    counts per key and only the listed groups' rows (with their sketches) are read. The groups
    are the raw path's, in its order, ties at the cut and keys that rank by their raw edge rows
    included."""
    listed: list[Any] = []
    real = rollup.read_sql

    def spy(d: Any, tenant: str, p: rollup.Plan, keys: Any = None) -> Any:
        listed.append(keys)
        return real(d, tenant, p, keys)

    monkeypatch.setattr(rollup, "read_sql", spy)
    data = many_groups()
    midnight = T0.replace(hour=0, minute=0, second=0, microsecond=0)
    async with rollup_store(kind, tmp_path) as store:
        assert await store.write_batch(data) == len(data)
        for since, until in ((None, None), (midnight - timedelta(days=3), midnight), (SURGE_SINCE, None)):
            for group_by in ("model", "status", "property.env"):
                for bucket in (None, "hour"):
                    q = StatsQuery(since=since, until=until, group_by=group_by, bucket=bucket)  # type: ignore[arg-type]
                    del listed[:]
                    got = await store.stats("acme", q)
                    exact = StatsQuery(since=since, until=until, group_by=group_by, bucket=bucket, exact=True)  # type: ignore[arg-type]
                    want = await store.stats("acme", exact)
                    assert_same(got, want, q)
                    assert len(got["groups"]) == rollup.MAX_GROUPS, q
                    assert listed and all(k is not None and len(k) == rollup.MAX_GROUPS for k in listed), q
                    keys = [g["key"] for g in got["groups"]]
                    assert "theirs" not in keys and 555 not in keys
                    if since == SURGE_SINCE:  # the edge's rows rank these first
                        surge = {"model": "surge", "status": 7, "property.env": "surge"}[group_by]
                        assert keys[:2] == [surge, "edge-only" if group_by != "status" else 8], q
        # Fewer keys than an answer lists: all of them, no list of keys.
        q = StatsQuery(group_by="provider")
        del listed[:]
        assert [g["key"] for g in (await store.stats("acme", q))["groups"]] == ["openai"]
        assert listed == [None]


async def _erase_all(store: Store, tenant: str, by: str, value: str) -> tuple[int, list[str]]:
    rows, refs = 0, []
    while True:
        n, keys = await store.erase(tenant, by, value, limit=97)
        rows, refs = rows + n, refs + keys
        if n == 0:
            return rows, refs


def _refs(r: LogRecord) -> list[str]:
    return [b.ref for b in (r.request_body, r.response_body, r.response_events) if b is not None and b.ref]


@pytest.mark.parametrize("kind", store_params())
async def test_erasing_a_user_a_session_or_a_request_leaves_no_trace_and_rollups_equal_raw(
    kind: str, tmp_path: Path, users_sql_calls: list[str]
) -> None:
    """`llmtap erase` (GDPR art. 17): the rows, their search text, properties and bodies' refs
    go, the totals stay those of what is left (rollups equal raw rows after it), and the
    user's own rollup rows go with the last of their requests."""
    data = records()
    async with contextlib.AsyncExitStack() as stack:
        where = str(tmp_path / "e.db") if kind == "sqlite" else await stack.enter_async_context(pg_database())
        store = await stack.enter_async_context(opened_store(kind, where, PROPS))
        for i in range(0, len(data), 300):
            await store.write_batch(data[i : i + 300])
        registered = dict(store._covered)  # type: ignore[attr-defined]
        assert any(d.startswith("property.") for d in registered)
        # `llmtap erase` connects as a command does, without the services' LLMTAP_ROLLUP_PROPERTIES:
        # it took the user out of no property rollup and unregistered the server's dimensions.
        admin = await stack.enter_async_context(opened_store(kind, where, None))
        gone = [r for r in data if r.tenant == "acme" and r.user_id == "alice"]
        assert len(gone) > 50
        rows, refs = await _erase_all(admin, "acme", "user_id", "alice")
        assert rows == len(gone) and sorted(refs) == sorted(x for r in gone for x in _refs(r))
        left = [r for r in data if r not in gone]
        assert any(
            r.tenant == "globex" and r.user_id == "alice" for r in left
        )  # another tenant's alice stays
        assert all(u["user_id"] != "alice" for u in await store.users("acme"))
        assert any(u["user_id"] == "alice" for u in await store.users("globex"))
        assert await store.get_request("acme", gone[0].id) is None
        page = await store.list_requests("acme", ListQuery(user_id="alice", limit=10))
        assert page.items == []
        session = next(r.session_id for r in left if r.tenant == "acme" and r.session_id)
        in_session = [r for r in left if r.tenant == "acme" and r.session_id == session]
        assert (await _erase_all(admin, "acme", "session_id", session))[0] == len(in_session)
        left = [r for r in left if r not in in_session]
        one = next(r for r in left if r.tenant == "globex")
        assert (await _erase_all(admin, "acme", "id", one.id))[0] == 0  # not acme's to erase
        assert (await _erase_all(admin, "globex", "id", one.id))[0] == 1
        left.remove(one)
        assert await compare_all(store, left) > 0
        await compare_users(store, left, users_sql_calls)
        with pytest.raises(ValueError):
            await store.erase("acme", "model; DROP TABLE requests", "x")
        again = await stack.enter_async_context(opened_store(kind, where, PROPS))
        assert again._covered == registered  # type: ignore[attr-defined]  # no dimension dropped or restarted


@contextlib.asynccontextmanager
async def opened_store(kind: str, where: str, props: tuple[str, ...] | None) -> AsyncIterator[Store]:
    store: Store
    if kind == "sqlite":
        from llmtap.store.sqlite import SQLiteStore

        store = SQLiteStore(Path(where), rollup_properties=props)
    else:
        from llmtap.store.postgres import PostgresStore

        store = PostgresStore(where, rollup_properties=props)
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("kind", store_params())
async def test_a_property_added_covers_no_row_stored_before_it_whatever_its_clock(
    kind: str, tmp_path: Path
) -> None:
    """Rows already stored but stamped after now (a gateway clock minutes or a year ahead of the
    worker's) are not in a property's rollups registered now: its coverage starts after them.
    It started at the next minute by the worker's clock and answered no group for them."""
    async with contextlib.AsyncExitStack() as stack:
        where = str(tmp_path / "s.db") if kind == "sqlite" else await stack.enter_async_context(pg_database())
        now = datetime.now(UTC)
        ahead = [
            *[rec(i, at=now + timedelta(minutes=3, seconds=i), properties={"feat": "a"}) for i in range(10)],
            *[
                rec(100 + i, at=now + timedelta(days=365, seconds=i), properties={"feat": "a"})
                for i in range(5)
            ],
        ]
        async with opened_store(kind, where, ("Team",)) as before:
            assert await before.write_batch(ahead) == 15
        async with opened_store(kind, where, ("Team", "feat")) as store:
            hour = now.replace(minute=0, second=0, microsecond=0)
            later = [rec(200 + i, at=now + timedelta(days=400), properties={"feat": "b"}) for i in range(2)]
            await store.write_batch(later)
            for since, until in (
                (hour, hour + timedelta(hours=2)),
                (hour, hour + timedelta(days=500)),
                (hour + timedelta(days=365), hour + timedelta(days=366)),
            ):
                q = StatsQuery(since=since, until=until, group_by="property.feat")
                got, exact = await store.stats("acme", q), await store.stats("acme", replace(q, exact=True))
                pairs = [(g["key"], g["count"]) for g in got["groups"]]
                assert pairs == [(g["key"], g["count"]) for g in exact["groups"]], (
                    since,
                    until,
                    got["source"],
                )
                assert pairs, (since, until)


@pytest.mark.parametrize("kind", store_params())
async def test_a_property_taken_out_of_the_rollups_and_put_back_claims_nothing_it_missed(
    kind: str, tmp_path: Path
) -> None:
    """Records stored while `env` was not rolled up are not in its rollups: put back, `env`
    covers only what it sees from then on, and a process that still lists it (a server started
    before a worker without it) stops answering from its rollups at once."""

    opened = functools.partial(opened_store, kind)
    async with contextlib.AsyncExitStack() as stack:
        where = str(tmp_path / "s.db") if kind == "sqlite" else await stack.enter_async_context(pg_database())
        now = datetime.now(UTC)
        gap = [rec(i, at=now - timedelta(hours=1, seconds=i), properties={"env": "gap"}) for i in range(30)]
        q = StatsQuery(
            since=now - timedelta(hours=3), until=now + timedelta(hours=1), group_by="property.env"
        )
        want = [("gap", 30)]
        async with opened(where, PROPS) as server:  # registers `env` on an empty store: since 0
            async with opened(where, ("Team",)) as worker:  # without `env`
                assert await worker.write_batch(gap) == 30
            got = await server.stats("acme", q)
            assert [(g["key"], g["count"]) for g in got["groups"]] == want, got["source"]
        async with opened(where, PROPS) as again:  # `env` put back
            got = await again.stats("acme", q)
            assert [(g["key"], g["count"]) for g in got["groups"]] == want, got["source"]
            hour = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
            at = hour + timedelta(minutes=30)
            later = [rec(100 + i, at=at, properties={"env": "back"}) for i in range(3)]
            await again.write_batch(later)
            # A range of whole hours after it was put back (property rollups are hourly): rollups
            q = StatsQuery(since=hour, until=hour + timedelta(hours=2), group_by="property.env")
            got = await again.stats("acme", q)
            assert got["source"] == "rollups"
            assert [(g["key"], g["count"]) for g in got["groups"]] == [("back", 3)]


def rollup_rows(path: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT * FROM rollups ORDER BY tenant, grain, dim, bucket, key").fetchall()


async def test_sqlite_keeps_a_batchs_rollup_cells_only_while_nobody_else_changed_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite writer keeps the cells its last batch wrote instead of reading them back; any
    other write to the file (another connection, retention on its own, a failed batch) must make
    it read them again, or a count is lost. The rollups must end as one batch of the survivors
    writes them into a fresh store."""
    from llmtap.errors import TransientError
    from llmtap.store.sqlite import SQLiteStore

    reads: list[int] = []
    real_from_row = rollup.Cell.from_row
    monkeypatch.setattr(rollup.Cell, "from_row", lambda row: (reads.append(1), real_from_row(row))[1])
    recs = [
        rec(i, at=T0 + timedelta(milliseconds=500 * i), properties={"env": ("prod", "dev")[i % 2]})
        for i in range(70)
    ]  # all in one minute: every batch adds to the same cells
    async with rollup_store("sqlite", tmp_path) as store:
        assert isinstance(store, SQLiteStore)
        await store.write_batch(recs[:10])
        del reads[:]
        await store.write_batch(recs[10:20])
        assert reads == []  # kept from the batch before, not read back

        other = SQLiteStore(store.path, rollup_properties=PROPS)  # a second worker on the file
        await other.connect()
        try:
            await other.write_batch(recs[20:30])
        finally:
            await other.close()
        await store.write_batch(recs[30:40])
        assert reads  # read again: the other connection changed them

        while await store.delete_older_than(recs[5].started_at, limit=3):  # on the writer's connection
            pass
        del reads[:]
        await store.write_batch(recs[40:50])
        assert reads

        real_apply = store._apply_rollups

        def apply_then_fail(*args: Any) -> Any:
            real_apply(*args)  # the cells are changed in memory, then the transaction fails
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store, "_apply_rollups", apply_then_fail)
        with pytest.raises(TransientError):
            await store.write_batch(recs[50:60])
        monkeypatch.setattr(store, "_apply_rollups", real_apply)
        await store.write_batch(recs[50:70])
        got = rollup_rows(store.path)
    async with rollup_store("sqlite", tmp_path) as ref:
        assert await ref.write_batch(recs[5:]) == 65
        assert isinstance(ref, SQLiteStore)
        want = rollup_rows(ref.path)
    assert got == want
    assert [r[5] for r in got if r[1] == "minute" and r[3] == ""] == [65]  # the minute of all requests


def test_sketch_roundtrip_merge_and_bound() -> None:
    r = random.Random(1)
    values = [r.lognormvariate(5, 2) for _ in range(5000)] + [0.0] * 50
    a, b, lib = Sketch(), Sketch(), DDSketch(RELATIVE_ACCURACY)
    for i, v in enumerate(values):
        (a if i % 2 else b).add(v)
        lib.add(v)
    a.merge(Sketch.decode(b.encode()))
    assert Sketch.decode(a.encode()).bins == a.bins and a.count == len(values)
    assert len(a.encode()) == 8 + 8 * len(a.bins)
    for q in (0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 1.0):
        got = a.quantiles([q])[0]
        assert close(got, percentile_cont(values, q)), q
        # at a whole rank there is no interpolation: the library's own reading
        if (q * (len(values) - 1)).is_integer():
            assert got == pytest.approx(lib.get_quantile_value(q), rel=1e-12), q
    # subtracting everything leaves an empty sketch
    for v in values:
        a.add(v, -1)
    assert a.count == 0 and a.bins == {} and a.quantiles([0.5]) == [None]


@pytest.mark.parametrize("n", [0, 1, 63, 64, 5000])
def test_add_all_bins_like_one_add_per_value(n: int) -> None:
    """`Sketch.add_all` (sort, then bin ends found by probing) counts what `add` does per value:
    zeros, repeats, values on and beside bin boundaries, one huge bin and many small ones."""
    from llmtap.store.sketch import MAPPING

    r = random.Random(n)
    edges = [MAPPING.value(k) for k in range(-5, 900, 7)]  # bins' representative values
    pool = [r.lognormvariate(5, 2) for _ in range(n)] + [0.0] * (n // 20) + [1e-320] * (n // 50)
    pool += [r.choice(edges) * f for f in (1.0, 1 + 1e-12, 1 - 1e-12) for _ in range(n // 10)]
    pool += [123.456] * (n // 3)  # one bin holding a third of them
    values = pool[:n] if n < 64 else pool
    one, many = Sketch(), Sketch()
    many.add(7.0)  # into a sketch that already holds something
    one.add(7.0)
    for v in values:
        one.add(v)
    many.add_all(list(values))
    assert (many.bins, many.zeros) == (one.bins, one.zeros)


@pytest.mark.parametrize("sign", [1, -1])
def test_a_batch_contributes_to_each_cell_what_its_rows_do(sign: int) -> None:
    """`contributions` sums rows alike in every dimension before it touches the cells: the
    grouping must be invisible. Checked against a row-by-row reference on the finest cells
    (coarser ones are merged from those), rows packed into a few minutes so that most share a
    group and some differ in one dimension only (model, status, a property, the user, the tenant).
    """
    from llmtap.store import sql

    rows = dataset(600, seed=11)
    r = random.Random(3)
    for i, x in enumerate(rows):
        x.started_at = T0 - timedelta(seconds=r.randrange(0, 240))
        x.model = r.choice(("gpt-4o-mini", "gpt-4o", None))
        x.user_id = r.choice(("u1", "u2", None, ""))
        x.time_to_first_token_ms = None if i % 3 else x.latency_ms / 3
    got = rollup.contributions([rollup.source_values(sql.record_values(x)) for x in rows], PROPS_STORED, sign)

    def enc(v: str | None) -> str:
        return "" if v is None else "=" + v

    minute, hour, day = 60_000_000, 3_600_000_000, 86_400_000_000
    want: dict[rollup.RollupKey, rollup.Cell] = {}
    for x in rows:
        at = to_micros(x.started_at)
        m, t, h = at // minute * minute, x.tenant, at // hour * hour
        keys = [
            (t, "minute", m, "", ""),
            (t, "minute", m, "model", enc(x.model)),
            (t, "minute", m, "provider", enc(x.provider)),
            (t, "minute", m, "status", enc(str(x.status))),
        ]
        keys += [(t, "hour", h, f"property.{p}", enc(x.properties.get(p))) for p in PROPS_STORED]
        user = (t, "day", at // day * day, rollup.USER_DIM, enc(x.user_id))
        error = x.status >= 400 or x.outcome != "completed"
        u = x.usage
        sums = [u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.cache_write_tokens,
                u.reasoning_tokens]  # fmt: skip
        for k in [*keys, user]:
            c = want.setdefault(k, rollup.Cell())
            c.count += sign
            c.error_count += sign * error
            c.sums = [a + sign * (b or 0) for a, b in zip(c.sums, sums, strict=True)]
            c.cost_nanos += sign * (x.cost_nanos or 0)
            c.unpriced_count += sign * (x.cost_nanos is None)
            if sign > 0:
                c.first_at = min(at, c.first_at or at)
                c.last_at = max(at, c.last_at or at)
            if k is not user:
                c.latency.add(x.latency_ms, sign)
                if x.time_to_first_token_ms is not None:
                    c.ttft.add(x.time_to_first_token_ms, sign)

    def values(c: rollup.Cell) -> tuple[Any, ...]:
        return (c.count, c.error_count, c.sums, c.cost_nanos, c.unpriced_count, c.first_at, c.last_at,
                c.latency.bins, c.latency.zeros, c.ttft.bins, c.ttft.zeros)  # fmt: skip

    def fine(k: rollup.RollupKey) -> bool:
        if k[3] == rollup.USER_DIM:
            return k[1] == "day"
        return k[1] == ("hour" if k[3].startswith("property.") else "minute")

    finest = {k: values(c) for k, c in got.items() if fine(k)}
    assert finest == {k: values(c) for k, c in want.items()}
    assert sum(1 for k in got if k[1] == "minute" and k[3] == "") <= 10  # grouped: few minutes


@pytest.mark.parametrize("kind", store_params())
async def test_user_rollups_answer_from_their_migration_on(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, users_sql_calls: list[str]
) -> None:
    """A store upgraded with requests in it: the user rollups cover only what is written from
    the upgrade on (the next minute); older ranges and the all-time users list read raw rows."""
    import llmtap.store.postgres as pg
    import llmtap.store.sqlite as lite
    from llmtap.store.migrations import POSTGRES, SQLITE

    module: Any = lite if kind == "sqlite" else pg
    full = SQLITE if kind == "sqlite" else POSTGRES
    # the versions before the user rollups' migration (later ones, e.g. the alert tables, are
    # applied with it at the upgrade)
    ix = next(i for i, m in enumerate(full) if m[1].startswith("per-user day totals"))
    old_data = records()[:300]
    for x in old_data[:4]:  # in the day the upgrade happens: deleted (never added) by retention
        x.started_at = datetime.now(UTC) - timedelta(minutes=2)
    async with contextlib.AsyncExitStack() as stack:
        if kind == "sqlite":
            where: Any = tmp_path / "upgraded.db"
        else:
            where = await stack.enter_async_context(pg_database())

        def make() -> Store:
            return module.SQLiteStore(where) if kind == "sqlite" else module.PostgresStore(where)

        monkeypatch.setattr(module, "MIGRATIONS", full[:ix])
        old = make()
        await old.connect()
        try:
            assert await old.write_batch(old_data) == len(old_data)
        finally:
            await old.close()
        # The previous version wrote no user rows (this code does, whatever the schema's version).
        if kind == "sqlite":
            with sqlite3.connect(where) as db:
                assert db.execute("DELETE FROM rollups WHERE dim = 'user_id'").rowcount > 0
        else:
            conn = await asyncpg.connect(where)
            try:
                assert await conn.execute("DELETE FROM rollups WHERE dim = 'user_id'") != "DELETE 0"
            finally:
                await conn.close()

        monkeypatch.setattr(module, "MIGRATIONS", full)
        before = datetime.now(UTC)
        store = make()
        await store.connect()
        try:
            after = datetime.now(UTC)
            since = store._covered[rollup.USER_DIM]  # type: ignore[attr-defined]
            minute = 60_000_000
            assert to_micros(before) // minute * minute < since <= (to_micros(after) // minute + 1) * minute
            midnight = T0.replace(hour=0, minute=0, second=0, microsecond=0)
            for q in (
                StatsQuery(group_by="user_id"),
                StatsQuery(since=midnight - timedelta(days=30), until=midnight, group_by="user_id"),
            ):
                got = await store.stats("acme", q)
                assert got["source"] == "raw"
                assert got["groups"] and got["groups"][0]["count"] > 1
            got_users = await store.users("acme")
            assert users_sql_calls == [] and got_users == await store.users("acme", exact=True)
            named = {r.user_id for r in ref_filter(old_data, "acme") if r.user_id is not None}
            assert {u["user_id"] for u in got_users} == named and "" in named

            # Written after the upgrade (and after the start of coverage): the user rollups answer.
            # The day is the coverage's, not the clock's: midnight may pass while this runs.
            day_us = 86_400_000_000
            today = from_micros((since - 1) // day_us * day_us)
            new = records()[300:700]
            for i, x in enumerate(new):
                x.id = f"new-{i}"
                x.started_at = today + timedelta(days=1, seconds=400 * i)
            assert await store.write_batch(new) == len(new)
            assert await store.write_batch(new[:50]) == 0  # redelivered: counted once
            for tenant in ("acme", "globex"):
                for bucket in (None, "day"):
                    q = StatsQuery(since=today + timedelta(days=1), group_by="user_id", bucket=bucket)  # type: ignore[arg-type]
                    got = await store.stats(tenant, q)
                    want = await store.stats(tenant, StatsQuery(since=q.since, group_by="user_id",
                                                                bucket=q.bucket, exact=True))  # fmt: skip
                    assert_same(got, want, (tenant, q))
                    assert got["groups"] == want["groups"]
                    counts = {g["key"]: g["count"] for g in got["groups"]}
                    ref: dict[Any, int] = {}
                    for r in ref_filter(new, tenant):
                        ref[r.user_id] = ref.get(r.user_id, 0) + 1
                    assert counts == ref
                # a range starting before the coverage still reads raw rows
                q = StatsQuery(since=today, group_by="user_id")
                assert (await store.stats(tenant, q))["source"] == "raw"
            # The all-time users list: raw rows while requests older than the coverage remain,
            # the user rollups once retention has removed them.
            assert await store.users("globex") == await store.users("globex", exact=True)
            assert users_sql_calls == []
            while await store.delete_older_than(today + timedelta(days=1)):
                pass
            await compare_users(store, new, users_sql_calls)
        finally:
            await store.close()


def test_user_parts_sum_to_the_range_whatever_the_months() -> None:
    """The signed day and month parts of every whole-day range over 14 months add up to exactly
    that range's days, each once, and never read more rows than the range has days."""
    day = 86_400_000_000
    start = to_micros(datetime(2024, 1, 1, tzinfo=UTC))
    days = [start + i * day for i in range(430)]
    r = random.Random(5)
    ranges = [(r.choice(days), None) for _ in range(100)] + [(None, r.choice(days)) for _ in range(30)]
    for _ in range(600):
        a, b = sorted(r.sample(days, 2))
        ranges.append((a, b))
    ranges += [(None, None), (days[0], days[31]), (days[31], days[60])]  # Jan; Feb of a leap year
    for since, until in ranges:
        for subtract in (True, False):
            parts = rollup.user_parts(since, until, subtract)
            count: dict[int, int] = {}
            for d in days:
                month = rollup.month_start(d)
                for grain, lo, hi, sign in parts:
                    b = d if grain == "day" else month
                    if (lo is None or b >= lo) and (hi is None or b < hi):
                        count[d] = count.get(d, 0) + sign
            want = {d for d in days if (since is None or d >= since) and (until is None or d < until)}
            assert {d for d, c in count.items() if c} == want, (since, until, subtract, parts)
            assert all(c == 1 for c in count.values() if c), (since, until, parts)
            if not subtract:
                assert all(sign == 1 for *_, sign in parts)
            elif since is not None and until is not None:
                n_days = (until - since) // day
                rows = sum(1 if g == "month" else ((hi or 0) - (lo or 0)) // day for g, lo, hi, _ in parts)
                assert rows <= n_days, (since, until, parts)


@pytest.mark.parametrize("kind", store_params())
async def test_user_month_rows_are_built_from_the_day_rows_at_the_upgrade(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store upgraded with user day rows in it gets month rows that are exactly their sums,
    so ranges that read a month less some days answer as raw rows do."""
    import llmtap.store.postgres as pg
    import llmtap.store.sqlite as lite
    from llmtap.store.migrations import POSTGRES, SQLITE

    module: Any = lite if kind == "sqlite" else pg
    full = SQLITE if kind == "sqlite" else POSTGRES
    ix = next(i for i, m in enumerate(full) if m[1].startswith("per-user month totals"))
    data = records()
    cols = "tenant, grain, bucket, key, count, cost_nanos, prompt_tokens"
    read = f"SELECT {cols} FROM rollups WHERE dim = 'user_id' AND grain = 'month' ORDER BY 1, 3, 4"
    async with contextlib.AsyncExitStack() as stack:
        if kind == "sqlite":
            where: Any = tmp_path / "upgraded.db"
        else:
            where = await stack.enter_async_context(pg_database())

        async def sql(q: str) -> list[tuple[Any, ...]]:
            if kind == "sqlite":
                with sqlite3.connect(where) as db:
                    return [tuple(r) for r in db.execute(q).fetchall()]
            conn = await asyncpg.connect(where)
            try:
                return [tuple(r) for r in await conn.fetch(q)]
            finally:
                await conn.close()

        def make() -> Store:
            if kind == "sqlite":
                return module.SQLiteStore(where, rollup_properties=PROPS)  # type: ignore[no-any-return]
            return module.PostgresStore(where, rollup_properties=PROPS)  # type: ignore[no-any-return]

        monkeypatch.setattr(module, "MIGRATIONS", full[:ix])
        old = make()
        await old.connect()
        try:
            for i in range(0, len(data), 200):
                await old.write_batch(data[i : i + 200])
        finally:
            await old.close()
        written = await sql(read)  # what this code's writer adds (the previous one did not)
        assert len({r[2] for r in written}) == 3  # January to March
        await sql("DELETE FROM rollups WHERE grain = 'month'")

        monkeypatch.setattr(module, "MIGRATIONS", full)
        store = make()
        await store.connect()
        try:
            assert await sql(read) == written
            for since, until in (
                (datetime(2025, 2, 2, tzinfo=UTC), datetime(2025, 2, 27, tzinfo=UTC)),
                (datetime(2025, 1, 3, tzinfo=UTC), None),
            ):
                for tenant in ("acme", "globex"):
                    q = StatsQuery(since=since, until=until, group_by="user_id")
                    got = await store.stats(tenant, q)
                    assert got["source"] == "rollups"
                    exact = StatsQuery(since=since, until=until, group_by="user_id", exact=True)
                    assert got["groups"] == (await store.stats(tenant, exact))["groups"]
        finally:
            await store.close()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_estimates_a_rollup_read_from_its_grain_and_dimension_together() -> None:
    """Day rows are mostly per-user ones and `model` rows mostly per-minute ones, so a planner
    that multiplies the two conditions as if independent estimates the overview's few day rows
    of `''` and `model` by the thousand; at 10M requests it then scanned the whole table (330-830
    ms instead of 8 ms, bench/README.md). Migration 12's statistics know the pairs."""
    from llmtap.store.postgres import DIALECT

    since = T0.replace(hour=0, minute=0, second=0, microsecond=0)
    async with pg_database() as url:
        await pg_write(  # one request a minute for ~3 days, 2000 users, 2 models
            url,
            [
                rec(i, at=since + timedelta(minutes=i), user_id=f"u{i % 2000}", model=f"m{i % 2}")
                for i in range(4000)
            ],
        )
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("ANALYZE rollups")
            covered = {d: 0 for d in rollup.dims_for(())}
            p = rollup.plan(StatsQuery(since=since, group_by="model"), (), covered)
            assert p is not None and p.spans == (("day", to_micros(since), None),) and not p.edges
            q, params = rollup.read_sql(DIALECT, "acme", p)
            estimated = await planned_rows(conn, q, params)
            actual = len(await conn.fetch(q, *params))
            total = await conn.fetchval("SELECT count(*) FROM rollups")
        finally:
            await conn.close()
    assert actual == 3 * 3 and total > 20_000  # 3 days x ('', m0, m1) among everything else
    assert estimated <= 10 * actual, (estimated, actual, total)


@pytest.mark.parametrize("seed", range(40))
def test_a_range_off_the_boundaries_is_tiled_by_rollup_spans_and_two_raw_edges(seed: int) -> None:
    """Spans and edges cover [since, until) once each; spans on their grain's boundaries, each
    edge inside one bucket of the finest grain, so raw rows are read for two such buckets at most."""
    r = random.Random(seed)
    base = to_micros(T0) // 86_400_000_000 * 86_400_000_000
    since = base - r.randrange(0, 40 * 86_400_000_000) if r.random() < 0.9 else None
    until = base + r.randrange(-3 * 86_400_000_000, 5 * 86_400_000_000) if r.random() < 0.9 else None
    if since is not None and until is not None and since >= until:
        since, until = until - r.randrange(1, 3 * 3_600_000_000), until
    group_by = r.choice((None, "model", "property.env"))
    bucket = r.choice((None, "minute", "hour", "day"))
    q = StatsQuery(
        since=None if since is None else from_micros(since),
        until=None if until is None else from_micros(until),
        group_by=group_by,  # type: ignore[arg-type]
        bucket=bucket,  # type: ignore[arg-type]
    )
    p = rollup.plan(q, PROPS_STORED, {d: 0 for d in rollup.dims_for(PROPS_STORED)})
    finest = rollup.BUCKET_MICROS["hour" if group_by == "property.env" else "minute"]
    if p is None:  # properties have no minute rows; no whole bucket inside: raw rows answer
        no_whole = since is not None and until is not None and -(-since // finest) >= until // finest
        assert (group_by == "property.env" and bucket == "minute") or no_whole, (since, until, group_by)
        return
    pieces: list[tuple[int | None, int | None]] = []
    for grain, a, b in p.spans:
        w = rollup.BUCKET_MICROS[grain]
        assert rollup.rolled(grain, p.dim or "") and w <= rollup.BUCKET_MICROS[bucket or "day"]
        assert (a is None or a % w == 0) and (b is None or b % w == 0)
        pieces.append((a, b))
    for a, b in p.edges:
        assert a < b and b - a < finest and (a // finest == (b - 1) // finest)
        pieces.append((a, b))
    assert len(p.edges) <= 2 and len(p.spans) <= 5
    assert_tiles(pieces, since, until)
    # The group's rows: the same range at the coarsest grains it has, whatever the bucket.
    assert bool(p.group_spans) == (group_by is not None)
    if group_by is None:
        return
    pieces = list(p.edges)
    for grain, a, b in p.group_spans:
        w = rollup.BUCKET_MICROS[grain]
        assert rollup.rolled(grain, p.dim or "") and (a is None or a % w == 0) and (b is None or b % w == 0)
        pieces.append((a, b))
    assert_tiles(pieces, since, until)
    assert len(p.group_spans) <= 5


def assert_tiles(pieces: list[tuple[int | None, int | None]], since: int | None, until: int | None) -> None:
    pieces.sort(key=lambda ab: -1 if ab[0] is None else ab[0])
    assert pieces[0][0] == since and pieces[-1][1] == until
    for (_, b), (a, _) in itertools.pairwise(pieces):
        assert b == a  # no gap, no overlap


class _CountingConnection:
    """A SQLite reader connection that calls `hook` before each statement."""

    def __init__(self, conn: sqlite3.Connection, hook: Any) -> None:
        self._conn, self._hook = conn, hook

    def execute(self, *args: Any) -> sqlite3.Cursor:
        self._hook()
        return self._conn.execute(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _same(a: Any, b: Any) -> bool:
    """Equal, sums of floats within rounding (rows may be summed in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


@pytest.mark.parametrize("kind", store_params())
async def test_a_stats_answer_sees_one_snapshot_whatever_is_written_during_it(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch written between two statements of one stats call (the top groups and their rows,
    the edges and the rollups, SQLite's sums and its latencies, PostgreSQL's raw parts run at
    once on their own connections) counts in all of them or in none: the answer equals the
    one before the write or the one after it."""
    midnight = T0.replace(hour=0, minute=0, second=0, microsecond=0)
    asked = [
        StatsQuery(since=midnight - timedelta(days=30), until=midnight, group_by="model", bucket="day"),
        StatsQuery(since=OFF_A, until=OFF_B, group_by="model", bucket="hour"),
        StatsQuery(since=midnight - timedelta(days=30), until=midnight, group_by="user_id"),
    ]
    asked.append(StatsQuery(since=OFF_A, until=OFF_B, group_by="property.env", bucket="hour", exact=True))
    async with rollup_store(kind, tmp_path) as store:
        await store.write_batch(records())
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {"at": -1, "seen": 0, "batch": [], "busy": False}
        serial = itertools.count(1)

        def batch() -> list[LogRecord]:
            n = next(serial)
            at = [OFF_A + timedelta(seconds=5), OFF_A + timedelta(hours=3)]
            at.append(midnight - timedelta(days=2, hours=n))
            return [
                rec(
                    n,
                    id=f"late-{n}-{i}",
                    at=t,
                    model="late-model",
                    user_id=f"late-user-{n}",
                    latency_ms=9000.0 + i,
                    properties={"env": "late"},
                )
                for i, t in enumerate(at * 4)
            ]

        if kind == "sqlite":

            def hook() -> None:  # on the reader's thread; the event loop waits for it
                state["seen"] += 1
                if state["seen"] == state["at"]:
                    asyncio.run_coroutine_threadsafe(store.write_batch(state["batch"]), loop).result(60)

            real_r = store._r  # type: ignore[attr-defined]
            monkeypatch.setattr(store, "_r", lambda: _CountingConnection(real_r(), hook))
        else:
            real_fetch = asyncpg.connection.Connection.fetch

            async def fetch(self: Any, *args: Any, **kw: Any) -> Any:
                if not state["busy"]:
                    state["seen"] += 1
                    if state["seen"] == state["at"]:
                        state["busy"] = True
                        try:
                            await store.write_batch(state["batch"])
                        finally:
                            state["busy"] = False
                return await real_fetch(self, *args, **kw)

            monkeypatch.setattr(asyncpg.connection.Connection, "fetch", fetch)

        for q in asked:
            state["at"] = -1
            state["seen"] = 0
            await store.stats("acme", q)
            statements = state["seen"]
            assert statements >= 2, (q, statements)  # else there is nothing between to write in
            for at in range(1, statements + 1):
                before = await store.stats("acme", q)
                state["batch"], state["seen"], state["at"] = batch(), 0, at
                got = await store.stats("acme", q)
                state["at"] = -1
                after = await store.stats("acme", q)
                assert not _same(before, after), (q, at)  # the write shows
                assert _same(got, before) or _same(got, after), (kind, q, at, got, before, after)
