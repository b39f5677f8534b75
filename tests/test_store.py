"""The analytics stores, SQLite and PostgreSQL, against one suite and a Python reference.

Every test runs on both stores (PostgreSQL skips only without LLMTAP_TEST_POSTGRES_URL);
`test_both_stores_give_identical_answers` loads the same data into both and compares every
query's answer for equality.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from llmtap import keys
from llmtap.errors import BackendUnavailable, ConfigError, TransientError
from llmtap.record import Body, LogRecord, Usage
from llmtap.store.base import ListQuery, StatsQuery, Store
from llmtap.store.query import decode_cursor, decode_walk_cursor, encode_cursor, parse_users, users_cursor
from store_helpers import (
    ENVS,
    MODELS,
    SESSIONS,
    T0,
    USERS,
    assert_totals,
    dataset,
    first_per_key,
    open_store,
    pg_database,
    pg_url,
    pg_write,
    planned_rows,
    rec,
    ref_filter,
    store_params,
)
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=store_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async with open_store(request.param, tmp_path) as s:
        yield s


async def all_pages(store: Store, tenant: str, limit: int = 7, **f: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await store.list_requests(tenant, ListQuery(limit=limit, cursor=cursor, **f))
        assert len(page.items) <= limit
        out += page.items
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


# -- writes ---------------------------------------------------------------------------------------


async def test_round_trip_of_every_field(store: Store) -> None:
    r = rec(
        3,
        user_id="u-1",
        session_id="sess-1",
        properties={"env": "prod", "Feature Flag": "a=b&c"},
        request_headers={"content-type": "application/json", "user-agent": "sdk/1"},
        response_headers={"x-request-id": "abc"},
        streamed=True,
        status=429,
        outcome="completed",
        error=None,
        usage=Usage(
            source="estimated",
            prompt_tokens=11,
            completion_tokens=7,
            total_tokens=18,
            cached_tokens=5,
            cache_write_tokens=2,
            cache_write_1h_tokens=1,
            reasoning_tokens=3,
            input_audio_tokens=4,
            output_audio_tokens=6,
            service_tier="flex",
            web_search_requests=2,
            audio_seconds=9,
            input_characters=13,
        ),
        cost_nanos=123_456_789,
        response_events=Body(
            content_type="text/event-stream", size=99, encoding="zstd", ref="acme/3.events.zst"
        ),
        route="ingest",
        at=T0 + timedelta(microseconds=7),
    )
    assert await store.write_batch([r]) == 1
    row = await store.get_request("acme", r.id)
    assert row is not None
    assert row["created_at"] == "2025-03-30T12:00:00.123463Z"  # microseconds kept exactly
    assert row["first_byte_at"] == (r.first_byte_at or T0).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert row["ended_at"] == r.ended_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    expect = {
        "id": r.id,
        "tenant": "acme",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "method": "POST",
        "path": r.path,
        "target_url": r.target_url,
        "status": 429,
        "outcome": "completed",
        "error": None,
        "streamed": True,
        "latency_ms": r.latency_ms,
        "time_to_first_token_ms": r.time_to_first_token_ms,
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
        "cached_tokens": 5,
        "cache_write_tokens": 2,
        "reasoning_tokens": 3,
        "usage_source": "estimated",
        "cost_usd": 0.123456789,
        "price_version": "test-1",
        "user_id": "u-1",
        "session_id": "sess-1",
        "properties": {"env": "prod", "feature flag": "a=b&c"},  # names: case-insensitive, stored lowercase
        "request_headers": {"content-type": "application/json", "user-agent": "sdk/1"},
        "response_headers": {"x-request-id": "abc"},
        "request_body": {
            "content_type": "application/json",
            "size": 20,
            "encoding": "zstd",
            "ref": "acme/3.request.zst",
        },
        "response_body": {
            "content_type": "application/json",
            "size": 30,
            "encoding": "zstd",
            "ref": "acme/3.response.zst",
        },
        "response_events": {
            "content_type": "text/event-stream",
            "size": 99,
            "encoding": "zstd",
            "ref": "acme/3.events.zst",
        },
        "route": "ingest",
        "gateway": "host:1",
        "cache_write_1h_tokens": 1,
        "input_audio_tokens": 4,
        "output_audio_tokens": 6,
        "service_tier": "flex",
        "web_search_requests": 2,
        "audio_seconds": 9,
        "input_characters": 13,
    }
    for k, v in expect.items():
        assert row[k] == v, k
    from llmtap.store.base import ROW_FIELDS

    assert list(row) == list(ROW_FIELDS)


async def test_a_count_too_large_for_a_32_bit_column_is_stored_as_unknown(store: Store) -> None:
    """An outside check posted input_audio_tokens = 3e9 (ingest took up to 1e12, as a gateway
    does from a provider): PostgreSQL's integer column overflowed and the record was dead-
    lettered. Both stores keep the record, with that count unknown, the others as they were."""
    from llmtap.limits import MAX_NARROW_COUNT

    big = Usage(
        source="provider",
        prompt_tokens=3_000_000_000,
        input_audio_tokens=3_000_000_000,
        output_audio_tokens=MAX_NARROW_COUNT,
        cache_write_1h_tokens=MAX_NARROW_COUNT + 1,
        web_search_requests=10**12,
    )
    assert await store.write_batch([rec(1, usage=big)]) == 1
    row = await store.get_request("acme", rec(1).id)
    assert row is not None
    assert row["prompt_tokens"] == 3_000_000_000 and row["output_audio_tokens"] == MAX_NARROW_COUNT
    assert row["input_audio_tokens"] is row["cache_write_1h_tokens"] is row["web_search_requests"] is None


async def test_omitted_bodies_and_missing_values_are_null(store: Store) -> None:
    r = rec(
        1,
        request_body=None,
        response_body=None,
        model=None,
        status=None,
        outcome="upstream_unreachable",
        usage=Usage(),
        cost_nanos=None,
        time_to_first_token_ms=None,
        first_byte_at=None,
    )
    await store.write_batch([r])
    row = await store.get_request("acme", r.id)
    assert row is not None
    for k in (
        "request_body",
        "response_body",
        "response_events",
        "model",
        "status",
        "prompt_tokens",
        "cost_usd",
        "time_to_first_token_ms",
        "first_byte_at",
    ):
        assert row[k] is None, k
    assert row["usage_source"] == "missing"


async def test_sqlite_stores_every_missing_value_as_sql_null(tmp_path: Path) -> None:
    """The SQLite store binds a row's missing values as NaN, which SQLite stores as NULL
    (`store.sqlite._NULL`): every column the record leaves empty is NULL in the file, of type
    null, found by `IS NULL` and counted by no aggregate; and a real value beside them is kept."""
    from llmtap.store import sql
    from llmtap.store.sqlite import SQLiteStore

    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    await store.connect()
    r = rec(1, request_body=None, response_body=None, model=None, status=None, usage=Usage(),
            cost_nanos=None, time_to_first_token_ms=None, first_byte_at=None, user_id=None,
            session_id=None, error=None, outcome="upstream_unreachable")  # fmt: skip
    try:
        assert await store.write_batch([r, rec(2, user_id="u-2")]) == 2
    finally:
        await store.close()
    missing = [c for c, v in zip(sql.COLUMNS, sql.record_values(r), strict=True) if v is None]
    assert {"model", "status", "user_id", "prompt_tokens", "cost_nanos", "ttft_ms"} <= set(missing)
    with contextlib.closing(sqlite3.connect(path)) as db:
        types = db.execute(
            f"SELECT {', '.join(f'typeof({c})' for c in missing)} FROM requests WHERE id = ?", (r.id,)
        ).fetchone()
        assert dict(zip(missing, types, strict=True)) == dict.fromkeys(missing, "null")
        assert db.execute("SELECT count(*) FROM requests WHERE user_id IS NULL").fetchone()[0] == 1
        assert db.execute("SELECT count(prompt_tokens), count(user_id) FROM requests").fetchone() == (1, 1)


async def test_cost_usd_without_nanos_is_kept_exactly_to_the_nano(store: Store) -> None:
    r = rec(1, cost_nanos=None, cost_usd=0.000123456)
    await store.write_batch([r])
    row = await store.get_request("acme", r.id)
    assert row is not None and row["cost_usd"] == 0.000123456


async def test_sums_past_64_bits_saturate_and_every_record_is_stored(store: Store) -> None:
    """An outside check: 13 records of 10^12 prompt and completion tokens each (the most a count
    may be) at o1-pro's price, $750M a record, took a day's cost sum past 2^63 nanodollars: the
    store refused the batch and the records were dead-lettered (SQLite 1 of 13, PostgreSQL, whose
    user-month row overflowed, all 12 of the next day's too), and SQLite's exact stats for the
    range answered 503 for good. Every record is stored now; sums that large saturate."""
    big = Usage(source="provider", prompt_tokens=10**12, completion_tokens=10**12, total_tokens=2 * 10**12)
    day = datetime(2026, 10, 5, tzinfo=UTC)

    def whale(i: int, at: datetime) -> LogRecord:
        return rec(i, at=at + timedelta(minutes=i), model="o1-pro", user_id="whale", usage=big,
                   cost_nanos=750_000_000 * 10**9, cost_usd=750_000_000.0)  # fmt: skip

    first = [whale(i, day) for i in range(13)]
    second = [whale(100 + i, day + timedelta(days=1)) for i in range(12)]
    for r in first:  # one by one: the sums grow row by row, as a worker's batches do
        assert await store.write_batch([r]) == 1
    assert await store.write_batch(second) == 12
    for exact in (False, True):
        got = await store.stats("acme", StatsQuery(since=day, until=day + timedelta(days=2), exact=exact))
        assert got["overall"]["count"] == 25, got["overall"]
        assert got["overall"]["prompt_tokens"] == 25 * 10**12  # far below 2^63: exact
    rows = await all_pages(store, "acme", limit=1000, user_id="whale")
    assert len(rows) == 25
    # per user too (the review of this fix: SQLite summed the user rows with `sum`: a 503 for good)
    span = {"since": day, "until": day + timedelta(days=2)}
    for exact in (False, True):
        got = await store.stats("acme", StatsQuery(**span, group_by="user_id", exact=exact))
        (whale,) = got["groups"]
        assert whale["count"] == 25 and whale["prompt_tokens"] == 25 * 10**12, whale
    got = await store.stats("acme", StatsQuery(group_by="user_id"))
    assert got["groups"][0]["count"] == 25
    for exact in (False, True):
        (user,) = await store.users("acme", exact=exact)
        assert user["user_id"] == "whale" and user["count"] == 25, user


async def test_same_batch_twice_gives_one_row_each(store: Store) -> None:
    batch = [rec(i) for i in range(50)]
    assert await store.write_batch(batch) == 50
    assert await store.write_batch(batch) == 0
    # duplicates inside one batch, and a mix of old and new
    assert await store.write_batch([rec(0), rec(50), rec(50), rec(1), rec(51)]) == 2
    rows = await all_pages(store, "acme", limit=1000)
    assert len(rows) == 52
    assert len({r["id"] for r in rows}) == 52
    stats = await store.stats("acme", StatsQuery())
    assert stats["overall"]["count"] == 52


async def test_reused_id_keeps_the_first_request_only(store: Store) -> None:
    """A client re-using a request id later (another start time) must not create a second row,
    nor graft its properties onto the first."""
    first = rec(1, id="dup-id", properties={"env": "prod"})
    later = rec(1, id="dup-id", at=T0 + timedelta(days=40), properties={"env": "dev", "extra": "x"})
    assert await store.write_batch([first]) == 1
    assert await store.write_batch([later]) == 0
    rows = await all_pages(store, "acme")
    assert [r["created_at"] for r in rows] == ["2025-03-30T12:00:01.123456Z"]
    assert await all_pages(store, "acme", properties={"env": "dev"}) == []
    assert await all_pages(store, "acme", properties={"extra": "x"}) == []
    assert len(await all_pages(store, "acme", properties={"env": "prod"})) == 1
    # the same tenant-local id in another tenant is another request
    assert await store.write_batch([rec(1, id="dup-id", tenant="other")]) == 1


async def test_concurrent_writers_of_overlapping_batches(store: Store) -> None:
    records = [rec(i) for i in range(300)]
    batches = [records[i : i + 100] for i in range(0, 300, 50)]  # every record in two batches
    counts = await asyncio.gather(*(store.write_batch(b) for b in batches))
    assert sum(counts) == 300
    assert len(await all_pages(store, "acme", limit=1000)) == 300


async def test_nul_and_metacharacters_are_stored_and_matched_literally(store: Store) -> None:
    nasty = [
        "'; DROP TABLE requests; --",
        '"quoted"',
        "back\\slash",
        "100%",
        "under_score",
        "ünïcødé ✓",
        "a\x00b",
    ]
    batch = [
        rec(i, user_id=v, session_id=v, model=v, properties={v: v, "k": v}, request_headers={v: v})
        for i, v in enumerate(nasty)
    ]
    assert await store.write_batch(batch) == len(nasty)
    for i, v in enumerate(nasty):
        stored = v.replace("\x00", "\ufffd")
        for f in (
            {"user_id": stored},
            {"session_id": stored},
            {"model": stored},
            {"properties": {stored: stored}},
            {"properties": {"k": stored}},
        ):
            rows = await all_pages(store, "acme", **f)
            assert [r["id"] for r in rows] == [batch[i].id], (v, f)
        row = await store.get_request("acme", batch[i].id)
        assert (
            row is not None
            and row["user_id"] == stored
            and row["properties"] == {stored.lower(): stored, "k": stored}
        )
    # LIKE wildcards mean nothing: "100%" does not match "100", "_" is not a joker
    assert await all_pages(store, "acme", user_id="100") == []
    assert await all_pages(store, "acme", user_id="under-score") == []
    # a property *name* full of SQL is a plain name in group_by too
    stats = await store.stats("acme", StatsQuery(group_by="property.'; DROP TABLE requests; --"))
    keyed = {g["key"]: g["count"] for g in stats["groups"]}
    assert keyed == {"'; DROP TABLE requests; --": 1, None: len(nasty) - 1}
    assert (await store.stats("acme", StatsQuery()))["overall"]["count"] == len(nasty)


def _long(n: int, seed: int, tail: str = "") -> str:
    """n characters of incompressible text (random code points across planes) ending in `tail`."""
    import random

    r = random.Random(seed)
    ranges = ((0x21, 0x7F), (0xA0, 0xD7FF), (0x10000, 0x1FFFF))
    chars = [chr(r.randrange(*r.choice(ranges))) for _ in range(n - len(tail))]
    return "".join(chars) + tail


async def test_values_of_any_length_are_stored_and_matched_exactly(store: Store) -> None:
    """3 KB and 100 KB ids, user/session ids, models, property names and values: stored, found by
    exact match only (two values differing in their last character are told apart), paginated,
    grouped, and a redelivery is still a no-op. PostgreSQL used to refuse them (a B-tree entry
    is at most ~2.7 KB), sending the record to the dead-letter queue for good."""
    values = [_long(n * 1024, n, end) for n in (3, 100) for end in "ab"]
    batch = [
        rec(i, id=v, user_id=v, session_id=v, model=v, properties={"k": v, v[-5000:]: "long name"},
            request_headers={"x-long": v})
        for i, v in enumerate(values)
    ]  # fmt: skip
    assert await store.write_batch(batch) == len(values)
    assert await store.write_batch(batch) == 0  # redelivery: uniqueness holds on long ids
    for i, v in enumerate(values):
        row = await store.get_request("acme", v)
        assert row is not None and row["id"] == v and row["user_id"] == v and row["model"] == v
        assert row["properties"] == {"k": v, v[-5000:].lower(): "long name"}
        for f in (
            {"user_id": v},
            {"session_id": v},
            {"model": v},
            {"properties": {"k": v}},
            {"properties": {v[-5000:]: "long name"}},
        ):
            assert [r["id"] for r in await all_pages(store, "acme", **f)] == [v], (i, list(f))
        assert await all_pages(store, "acme", user_id=v[:-1]) == []  # a prefix is not a match
    assert await store.get_request("acme", values[0][:-1] + "c") is None
    assert [r["id"] for r in await all_pages(store, "acme", limit=1)] == values[::-1]
    stats = await store.stats("acme", StatsQuery(group_by="property.k"))
    assert sorted((g["key"], g["count"]) for g in stats["groups"]) == sorted((v, 1) for v in values)
    users = await store.users("acme")
    assert sorted(u["user_id"] for u in users) == sorted(values)


async def test_any_unicode_is_stored_nul_and_lone_surrogates_replaced(store: Store) -> None:
    """What a header decoded with surrogateescape (or a JSON `\ud800` escape) carries must not
    make a record unstorable: lone surrogates become U+FFFD like NUL; a split pair is joined."""
    odd = ["lone \udc80 byte", "pair \ud83d\ude00 split", "nul \x00 and \udfff"]
    batch = [
        rec(i, user_id=v, session_id=v, model=v, properties={v: v}, request_headers={v: v}, error=v,
            request_body=Body(content_type=v, size=1, encoding="identity", data=b"x"))
        for i, v in enumerate(odd)
    ]  # fmt: skip
    assert await store.write_batch(batch) == len(odd)
    expected = ["lone \ufffd byte", "pair \U0001f600 split", "nul \ufffd and \ufffd"]
    for i, want in enumerate(expected):
        row = await store.get_request("acme", batch[i].id)
        assert row is not None
        assert row["user_id"] == row["model"] == row["error"] == want
        assert row["properties"] == {want: want} and row["request_headers"] == {want: want}
        assert row["request_body"]["content_type"] == want
        assert [r["id"] for r in await all_pages(store, "acme", user_id=want)] == [batch[i].id]


async def test_property_names_are_case_insensitive(store: Store) -> None:
    """`property.Feature=search` finds what the gateway stored as `feature` (and records ingested
    with another case); group_by too."""
    batch = [
        rec(0, properties={"feature": "search"}),
        rec(1, properties={"Feature": "search", "FEATURE": "ignored: the first name wins"}),
        rec(2, properties={"feature": "chat"}),
    ]
    assert await store.write_batch(batch) == 3
    for name in ("feature", "Feature", "FEATURE", "fEaTuRe"):
        got = await all_pages(store, "acme", properties={name: "search"})
        assert sorted(r["id"] for r in got) == sorted([batch[0].id, batch[1].id]), name
        stats = await store.stats("acme", StatsQuery(group_by=f"property.{name}"))
        assert {g["key"]: g["count"] for g in stats["groups"]} == {"search": 2, "chat": 1}, name
    row = await store.get_request("acme", batch[1].id)
    assert row is not None and row["properties"] == {"feature": "search"}
    # the value stays case-sensitive
    assert await all_pages(store, "acme", properties={"feature": "Search"}) == []


# -- reads: lists, filters, cursors ------------------------------------------------------------------


async def test_list_filters_match_the_reference(store: Store) -> None:
    records = dataset(400)
    for i in range(0, 400, 100):
        await store.write_batch(records[i : i + 100])
    since, until = T0 - timedelta(days=40), T0 - timedelta(days=10)
    filters: list[dict[str, Any]] = [
        {},
        *({"model": m} for m in MODELS if m),
        *({"user_id": u} for u in USERS if u),
        *({"session_id": s} for s in SESSIONS if s),
        {"provider": "anthropic"},
        {"status": 429},
        {"since": since},
        {"until": until},
        {"since": since, "until": until},
        *({"properties": {"env": e}} for e in ENVS),
        {"properties": {"env": "prod", "team": "red"}},
        {"model": "gpt-4o", "user_id": "alice", "properties": {"env": "prod"}, "since": since},
        {"user_id": "nobody"},
        # A page of a property filter walks that property's rows (SQLite, `sql.property_walk`).
        {"properties": {"env": "nope"}},
        {"properties": {"env": "prod"}, "since": since, "until": until},
        {"properties": {"env": "dev"}, "model": "gpt-4o"},
        {"properties": {"env": "prod"}, "session_id": "s1"},
        {"properties": {"env": "dev", "team": "red"}, "status": 200},
        {"properties": {"team": "nope", "env": "prod"}, "user_id": "bob"},
    ]
    for tenant in ("acme", "globex", "initech"):
        for f in filters:
            want = [r.id for r in ref_filter(records, tenant, **f)]
            got = await all_pages(store, tenant, limit=13, **f)
            assert [r["id"] for r in got] == want, (tenant, f)
    # oldest first is the exact reverse
    got = await all_pages(store, "acme", limit=50, order="asc")
    assert [r["id"] for r in got] == [r.id for r in reversed(ref_filter(records, "acme"))]
    got = await all_pages(store, "acme", limit=9, order="asc", properties={"env": "prod"}, until=until)
    want = ref_filter(records, "acme", properties={"env": "prod"}, until=until)
    assert [r["id"] for r in got] == [r.id for r in reversed(want)]


async def test_cursor_is_stable_while_rows_arrive(store: Store) -> None:
    base = [rec(i, at=T0 + timedelta(seconds=i // 3)) for i in range(90)]  # ties of three
    await store.write_batch(base)
    seen: list[str] = []
    cursor = None
    step = 0
    while True:
        page = await store.list_requests("acme", ListQuery(limit=8, cursor=cursor))
        seen += [r["id"] for r in page.items]
        # newer rows and rows in the same second arrive between pages
        step += 1
        await store.write_batch([rec(1000 + step, at=T0 + timedelta(hours=1, seconds=step))])
        await store.write_batch([rec(2000 + step, at=T0 + timedelta(seconds=30 - step))])
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    base_ids = [r.id for r in ref_filter(base, "acme")]
    assert len(seen) == len(set(seen)), "a row was listed twice"
    assert [i for i in seen if i in set(base_ids)] == base_ids, "a row was skipped or reordered"


@pytest.mark.parametrize(
    "cursor",
    ["x", "!!!!", "bm90IGpzb24", encode_cursor(1, "a")[:-3], "WzEsMiwzXQ", "WyJhIiwiYiJd", "bnVsbA", "W10"],
)
async def test_malformed_cursor_is_a_value_error(store: Store, cursor: str) -> None:
    with pytest.raises(ValueError):
        await store.list_requests("acme", ListQuery(cursor=cursor))


def test_cursor_round_trip() -> None:
    for us, rid in ((0, "a"), (1_743_336_000_123_456, "0b3f-..."), (-5, "ü'\"")):
        assert decode_cursor(encode_cursor(us, rid)) == (us, rid)


# -- reads: aggregates ------------------------------------------------------------------------------


async def test_stats_match_the_reference(store: Store) -> None:
    records = dataset(500, seed=11)
    await store.write_batch(records)
    acme = ref_filter(records, "acme")
    stats = await store.stats("acme", StatsQuery(exact=True))
    assert_totals(stats["overall"], acme)
    assert stats["groups"] == [] and stats["buckets"] == []

    for group_by, attr in (
        ("model", "model"),
        ("user_id", "user_id"),
        ("session_id", "session_id"),
        ("provider", "provider"),
        ("status", "status"),
        ("property.env", None),
    ):
        stats = await store.stats("acme", StatsQuery(group_by=group_by, exact=True))
        expected: dict[Any, list[Any]] = {}
        for r in acme:
            key = r.properties.get("env") if attr is None else getattr(r, attr)
            expected.setdefault(key, []).append(r)
        assert {g["key"] for g in stats["groups"]} == set(expected), group_by
        counts = [g["count"] for g in stats["groups"]]
        assert counts == sorted(counts, reverse=True)
        for g in stats["groups"]:
            assert_totals(g, expected[g["key"]])

    since, until = T0 - timedelta(days=20), T0 - timedelta(days=5)
    q = StatsQuery(since=since, until=until, bucket="day", group_by="model", exact=True)
    stats = await store.stats("acme", q)
    window = ref_filter(records, "acme", since=since, until=until)
    assert_totals(stats["overall"], window)
    by_day: dict[str, list[Any]] = {}
    for r in window:
        by_day.setdefault(r.started_at.strftime("%Y-%m-%dT00:00:00.000000Z"), []).append(r)
    assert [b["start"] for b in stats["buckets"]] == sorted(by_day)
    for b in stats["buckets"]:
        assert_totals(b, by_day[b["start"]])

    # stats honour the list filters too
    stats = await store.stats(
        "acme", StatsQuery(filters=ListQuery(user_id="alice", properties={"env": "prod"}))
    )
    assert_totals(stats["overall"], ref_filter(records, "acme", user_id="alice", properties={"env": "prod"}))
    # Read through a property's rows on SQLite (`sql.property_walk`), the range's edges too.
    for f in (
        {"properties": {"env": "dev"}},
        {"properties": {"env": "nope"}},
        {"properties": {"env": "prod", "team": "red"}},
        {"properties": {"team": "blue"}, "model": "gpt-4o"},
        {"properties": {"env": "prod"}, "session_id": "s2", "status": 200},
        {"properties": {"env": "prod"}, "since": since + timedelta(days=3)},
    ):
        q = StatsQuery(
            since=since, until=until, bucket="day", group_by="model", exact=True, filters=ListQuery(**f)
        )
        stats = await store.stats("acme", q)
        f_since = max(since, f.get("since", since))
        window = ref_filter(records, "acme", **{**f, "since": f_since, "until": until})
        assert_totals(stats["overall"], window)
        by_model: dict[Any, list[Any]] = {}
        by_day = {}
        for r in window:
            by_model.setdefault(r.model, []).append(r)
            by_day.setdefault(r.started_at.strftime("%Y-%m-%dT00:00:00.000000Z"), []).append(r)
        assert {g["key"] for g in stats["groups"]} == set(by_model), f
        for g in stats["groups"]:
            assert_totals(g, by_model[g["key"]])
        assert [b["start"] for b in stats["buckets"]] == sorted(by_day), f
        for b in stats["buckets"]:
            assert_totals(b, by_day[b["start"]])


async def test_hour_and_minute_buckets(store: Store) -> None:
    records = [rec(i, at=T0 + timedelta(seconds=37 * i)) for i in range(200)]
    await store.write_batch(records)
    for bucket, fmt in (("hour", "%Y-%m-%dT%H:00:00.000000Z"), ("minute", "%Y-%m-%dT%H:%M:00.000000Z")):
        stats = await store.stats("acme", StatsQuery(bucket=bucket, exact=True))  # type: ignore[arg-type]
        want: dict[str, list[Any]] = {}
        for r in records:
            want.setdefault(r.started_at.strftime(fmt), []).append(r)
        assert [b["start"] for b in stats["buckets"]] == sorted(want)
        for b in stats["buckets"]:
            assert_totals(b, want[b["start"]])


async def test_percentiles_interpolate_like_percentile_cont(store: Store) -> None:
    # 1..10 ms: p50 = 5.5, p90 = 9.1, p95 = 9.55, p99 = 9.91 by linear interpolation (n-1 ranks)
    await store.write_batch(
        [rec(i, latency_ms=float(10 - i), time_to_first_token_ms=None) for i in range(10)]
    )
    lat = (await store.stats("acme", StatsQuery(exact=True)))["overall"]["latency_ms"]
    assert lat == {
        "p50": 5.5,
        "p90": 9.1,
        "p95": pytest.approx(9.55, abs=1e-12),
        "p99": pytest.approx(9.91, abs=1e-12),
    }
    ttft = (await store.stats("acme", StatsQuery(exact=True)))["overall"]["time_to_first_token_ms"]
    assert ttft == {"p50": None, "p90": None, "p95": None, "p99": None}
    one = await store.stats("acme", StatsQuery(group_by="model", filters=ListQuery(status=200)))
    assert one["groups"][0]["latency_ms"]["p50"] == 5.5


async def test_empty_tenant_stats(store: Store) -> None:
    await store.write_batch([rec(1)])
    stats = await store.stats("nobody", StatsQuery(group_by="model", bucket="hour"))
    assert stats["overall"]["count"] == 0 and stats["overall"]["error_rate"] == 0.0
    assert stats["overall"]["latency_ms"]["p50"] is None
    assert stats["groups"] == [] and stats["buckets"] == []


async def test_bad_group_by_is_a_value_error(store: Store) -> None:
    for g in ("tenant", "latency_ms; DROP TABLE requests", "property.", "cost_usd"):
        with pytest.raises(ValueError):
            await store.stats("acme", StatsQuery(group_by=g))
    with pytest.raises(ValueError):
        await store.stats("acme", StatsQuery(bucket="week"))  # type: ignore[arg-type]


async def test_sessions_and_users(store: Store) -> None:
    records = dataset(300, seed=3)
    await store.write_batch(records)
    for sid in ("s1", "s2", "nope"):
        got = await store.sessions("acme", sid)
        want = ref_filter(records, "acme", session_id=sid)
        if not want:
            assert got is None
            continue
        assert got is not None
        assert [r["id"] for r in got["requests"]] == [r.id for r in reversed(want)]  # oldest first
        assert_totals(got["totals"], want)
        assert got["truncated"] is False
    users = await store.users("acme")
    acme = ref_filter(records, "acme")
    want_users = {r.user_id for r in acme if r.user_id is not None}
    assert {u["user_id"] for u in users} == want_users
    for u in users:
        mine = [r for r in acme if r.user_id == u["user_id"]]
        assert u["count"] == len(mine)
        assert u["total_tokens"] == sum(r.usage.total_tokens or 0 for r in mine)
        assert u["cost_usd"] == sum(r.cost_nanos or 0 for r in mine) / 1e9
        assert u["error_count"] == sum(1 for r in mine if (r.status or 0) >= 400 or r.outcome != "completed")
    last = [u["last_at"] for u in users]
    assert last == sorted(last, reverse=True)
    assert len(await store.users("acme", limit=2)) == 2


async def test_a_sessions_walk_sees_the_list_as_its_first_page_did(store: Store) -> None:
    """An outside check: sessions active again while the list was paged left their place below
    the cursor for one above it and no page showed them (7 of 100 skipped under traffic)."""
    await store.write_batch([rec(i, session_id=f"s{i}") for i in range(10)])
    first = await store.list_sessions("acme", ListQuery(limit=3))
    seen = [g["session_id"] for g in first.items]
    assert seen == ["s9", "s8", "s7"]
    # The oldest sessions get new requests, newer than any the first page saw.
    await store.write_batch([rec(100 + i, session_id=f"s{i}") for i in (0, 2, 5)])
    cursor, counts = first.next_cursor, {}
    while cursor is not None:
        page = await store.list_sessions("acme", ListQuery(limit=3, cursor=cursor))
        seen += [g["session_id"] for g in page.items]
        counts.update({g["session_id"]: g["count"] for g in page.items})
        cursor = page.next_cursor
    assert seen == [f"s{i}" for i in range(9, -1, -1)]  # each once, in the first page's order
    assert counts["s2"] == counts["s5"] == 1  # totals as of the walk's start too
    # A new walk sees them at the top, with their new requests.
    fresh = await store.list_sessions("acme", ListQuery(limit=3))
    assert [(g["session_id"], g["count"]) for g in fresh.items] == [("s5", 2), ("s2", 2), ("s0", 2)]
    # A cursor made before walks were bounded still pages (a dashboard open across an upgrade).
    assert first.next_cursor is not None
    us, rid, held = decode_walk_cursor(first.next_cursor)
    assert held is not None and held > us
    old = await store.list_sessions("acme", ListQuery(limit=3, cursor=encode_cursor(us, rid)))
    assert [g["session_id"] for g in old.items] == ["s6", "s4", "s3"]  # unbounded: s5 has moved up


async def test_a_sessions_walk_pages_past_a_session_at_the_last_microsecond(tmp_path: Path) -> None:
    """A walk's bound is the newest time its first page saw: 9999-12-31T23:59:59.999999Z is one
    (the page's own cursor was refused as "not a cursor this API returned"). SQLite only: such a
    row is one an older worker stored; PostgreSQL has no partition for it."""
    last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    async with open_store("sqlite", tmp_path) as store:
        await store.write_batch([rec(1, session_id="late", at=last, latency_ms=0.0), rec(2, session_id="s2")])
        first = await store.list_sessions("acme", ListQuery(limit=1))
        assert [g["session_id"] for g in first.items] == ["late"] and first.next_cursor is not None
        rest = await store.list_sessions("acme", ListQuery(limit=1, cursor=first.next_cursor))
        assert [g["session_id"] for g in rest.items] == ["s2"] and rest.next_cursor is None


@pytest.mark.parametrize("nanos", [8_968_725_613_810_762, 8_427_068_202_505_595])
async def test_users_by_cost_page_on_exact_nanodollars_past_millions(store: Store, nanos: int) -> None:
    # Two users of equal cost above ~$4.5M, where cost_usd as a float no longer gives back its
    # nanodollars: a cursor made from it repeated the first user (first value) or skipped the
    # second (second value) on the next page.
    assert round(nanos / 1e9 * 1e9) != nanos
    await store.write_batch([rec(i, user_id=u, cost_nanos=nanos) for i, u in enumerate("ab")])
    for exact in (False, True):
        (first,) = await store.users("acme", limit=1, exact=exact, sort="cost")
        assert first["user_id"] == "a"
        _, after, _ = parse_users([("sort", "cost"), ("cursor", users_cursor(first, "cost"))])
        rest = await store.users("acme", limit=5, exact=exact, after=after, sort="cost")
        assert [u["user_id"] for u in rest] == ["b"], exact


async def test_users_by_cost_page_past_a_user_whose_total_passes_2_62_nanodollars(store: Store) -> None:
    # The review: a user's total is a sum, and its cursor was held to a request's bound (2**62,
    # ~$4.6B): the page after such a user was refused, and every user after it unreachable.
    big = 2_500_000_000_000_000_000  # two of them: 5e18 > 2**62
    await store.write_batch(
        [rec(0, user_id="a", cost_nanos=big), rec(1, user_id="a", cost_nanos=big), rec(2, user_id="b")]
    )
    for exact in (False, True):
        (first,) = await store.users("acme", limit=1, exact=exact, sort="cost")
        assert first["user_id"] == "a" and first.cost_nanos > 2**62
        _, after, _ = parse_users([("sort", "cost"), ("cursor", users_cursor(first, "cost"))])
        rest = await store.users("acme", limit=5, exact=exact, after=after, sort="cost")
        assert [u["user_id"] for u in rest] == ["b"], exact


async def test_tenants_never_see_each_other(store: Store) -> None:
    a = [rec(i, tenant="a", user_id="u", session_id="s", properties={"p": "v"}) for i in range(5)]
    b = [rec(i, tenant="b", user_id="u", session_id="s", properties={"p": "v"}) for i in range(5, 8)]
    await store.write_batch(a + b)
    assert await store.get_request("b", a[0].id) is None
    assert (await store.get_request("a", a[0].id) or {})["tenant"] == "a"
    assert {r["id"] for r in await all_pages(store, "b", properties={"p": "v"})} == {r.id for r in b}
    assert (await store.stats("b", StatsQuery(group_by="property.p")))["overall"]["count"] == 3
    assert (await store.sessions("b", "s") or {})["totals"]["count"] == 3
    assert [u["count"] for u in await store.users("b")] == [3]
    # a cursor from tenant a's list leaks nothing when replayed as tenant b
    page = await store.list_requests("a", ListQuery(limit=2))
    other = await store.list_requests("b", ListQuery(limit=50, cursor=page.next_cursor))
    assert {r["tenant"] for r in other.items} <= {"b"}


# -- retention --------------------------------------------------------------------------------------


async def test_delete_older_than_returns_body_refs(store: Store) -> None:
    # three months before the cutoff's month, the cutoff's month on both sides, and newer rows
    times = [T0 - timedelta(days=d) for d in (95, 80, 62, 50, 33, 31, 29, 2, 1)]
    times += [T0 + timedelta(hours=h) for h in range(3)]
    records = [
        rec(i, at=t, request_body=None if i == 3 else rec(i).request_body) for i, t in enumerate(times)
    ]
    await store.write_batch(records)
    cutoff = T0 - timedelta(days=30)
    refs: list[str] = []
    while True:
        got = await store.delete_older_than(cutoff, limit=2)
        if not got:
            break
        refs += got
    old = [r for r in records if r.started_at < cutoff]
    want = sorted(
        ref
        for r in old
        for b in (r.request_body, r.response_body)
        if b is not None and b.ref
        for ref in [b.ref]
    )
    assert sorted(refs) == want
    remaining = await all_pages(store, "acme", limit=100)
    assert [r["id"] for r in remaining] == [r.id for r in ref_filter(records, "acme", since=cutoff)]
    for r in old:
        assert await store.get_request("acme", r.id) is None
    assert (await store.stats("acme", StatsQuery()))["overall"]["count"] == len(records) - len(old)
    # a late record for an expired month can still be written (its partition is made again)
    late = rec(99, at=T0 - timedelta(days=90))
    assert await store.write_batch([late]) == 1
    assert await store.get_request("acme", late.id) is not None
    assert await store.delete_older_than(cutoff) == [late.request_body.ref, late.response_body.ref]  # type: ignore[union-attr]
    assert await store.delete_older_than(cutoff) == []


# -- API keys -------------------------------------------------------------------------------------------


async def test_api_keys_lifecycle(store: Store) -> None:
    key, plain = await keys.create_key(store, "acme", "ci")
    assert plain.startswith("lt_") and len(plain) >= 40 and key.prefix == plain[:11]
    assert await keys.resolve_tenant(store, f"Bearer {plain}") == "acme"
    assert await keys.resolve_tenant(store, f"bearer   {plain}  ") == "acme"
    for bad in (
        None,
        "",
        "Bearer",
        f"Basic {plain}",
        f"Bearer {plain}x",
        "Bearer lt_' OR 1=1 --",
        "Bearer " + "lt_" * 500,
    ):
        assert await keys.resolve_tenant(store, bad) is None, bad
    other, other_plain = await keys.create_key(store, "globex", None)
    assert [k.id for k in await keys.list_keys(store, "acme")] == [key.id]
    assert {k.id for k in await keys.list_keys(store)} == {key.id, other.id}
    # the stored form is a hash, never the key
    assert await store.key_by_hash(plain) is None
    assert await store.key_by_hash(keys.hash_key(plain)) is not None
    # revocation is immediate in this process, despite the cache
    assert await keys.revoke_key(store, key.id) is True
    assert await keys.resolve_tenant(store, f"Bearer {plain}") is None
    assert await keys.revoke_key(store, key.id) is False
    assert (await keys.list_keys(store, "acme"))[0].revoked_at is not None
    assert await keys.resolve_tenant(store, f"Bearer {other_plain}") == "globex"


async def test_revocation_reaches_other_processes_within_the_cache_ttl(store: Store, tmp_path: Path) -> None:
    """Another store object stands for another process: it sees the revocation after the TTL."""
    key, plain = await keys.create_key(store, "acme", None)
    if isinstance(store, _sqlite_cls()):
        from llmtap.store.sqlite import SQLiteStore

        other: Store = SQLiteStore(store.path)  # type: ignore[attr-defined]
    else:
        from llmtap.store.postgres import PostgresStore

        other = PostgresStore(store.url)  # type: ignore[attr-defined]
    await other.connect()
    try:
        assert await keys.resolve_tenant(other, f"Bearer {plain}") == "acme"
        await store.revoke_key(key.id)  # as another process would: no local cache to clear
        deadline = asyncio.get_running_loop().time() + keys.CACHE_TTL + 2
        while await keys.resolve_tenant(other, f"Bearer {plain}") is not None:
            assert asyncio.get_running_loop().time() < deadline, "revocation never reached the other process"
            await asyncio.sleep(0.1)
    finally:
        await other.close()


def _sqlite_cls() -> type:
    from llmtap.store.sqlite import SQLiteStore

    return SQLiteStore


# -- outages ---------------------------------------------------------------------------------------------


async def test_sqlite_lock_held_too_long_is_transient(tmp_path: Path) -> None:
    from llmtap.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "s.db", busy_timeout=0.2)
    await store.connect()
    try:
        blocker = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(TransientError):
            await store.write_batch([rec(1)])
        blocker.execute("ROLLBACK")
        blocker.close()
        assert await store.write_batch([rec(1)]) == 1
        assert await store.write_batch([rec(1)]) == 0
    finally:
        await store.close()


async def test_sqlite_batches_reach_the_database_file_from_the_checkpoint_thread(tmp_path: Path) -> None:
    """Checkpoints run beside the writer, kicked after each batch: the rows reach the database
    file itself, not only the WAL, with the writer's own checkpoint thousands of pages away and
    the store still open. The WAL is read by nobody here: the file is opened `immutable`."""
    from llmtap.store.sqlite import SQLiteStore

    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    await store.connect()

    def rows_in_the_file() -> int:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
                return int(db.execute("SELECT count(*) FROM requests").fetchone()[0])
        except sqlite3.Error:  # caught mid-copy: look again
            return -1

    try:
        for b in range(3):
            assert await store.write_batch([rec(i, id=f"r{b}-{i}") for i in range(20)]) == 20
        deadline = time.monotonic() + 30
        while (n := rows_in_the_file()) != 60:
            assert time.monotonic() < deadline, f"{n} of 60 rows in the database file"
            await asyncio.sleep(0.05)
        # Writes go on while and after the checkpoints run.
        assert await store.write_batch([rec(i, id=f"r3-{i}") for i in range(20)]) == 20
    finally:
        await store.close()
    assert rows_in_the_file() == 80  # closing checkpoints the rest


async def test_sqlite_reads_go_on_while_others_are_slow(tmp_path: Path) -> None:
    """A slow read (stats over raw rows: seconds at 1M rows) does not hold the others: the
    Requests list and a stats call are answered while all reader threads but one are busy."""
    from llmtap.store import sqlite as lite

    store = lite.SQLiteStore(tmp_path / "s.db")
    await store.connect()
    release = threading.Event()
    held = threading.Semaphore(0)

    def slow() -> None:
        held.release()
        release.wait(120)

    loop = asyncio.get_running_loop()
    blockers = [asyncio.ensure_future(store._read(slow)) for _ in range(lite.READERS - 1)]
    try:
        assert await store.write_batch([rec(i) for i in range(5)]) == 5
        for _ in blockers:
            assert await loop.run_in_executor(None, held.acquire, True, 60)
        page = await asyncio.wait_for(store.list_requests("acme", ListQuery(limit=3)), 60)
        assert len(page.items) == 3
        totals = await asyncio.wait_for(store.stats("acme", StatsQuery(exact=True)), 60)
        assert totals["overall"]["count"] == 5
    finally:
        release.set()
        await asyncio.gather(*blockers)
        await store.close()
    assert store._rconns == []  # every reader's connection closed


async def test_sqlite_a_property_filter_walks_that_propertys_rows_not_the_range(tmp_path: Path) -> None:
    """A page of a property value few requests have (or none) walks that value's rows, not
    every request of the range: at 1M rows a value no request has took 0.8 s, seconds with a
    second filter. Measured in SQLite VM steps of the queries the store really ran (no clock),
    against the same page walking the time index."""
    from llmtap.store import sql as store_sql
    from llmtap.store import sqlite as lite

    path = tmp_path / "s.db"
    store = lite.SQLiteStore(path)
    await store.connect()
    ran: list[tuple[str, Sequence[Any]]] = []
    fetch = store._fetch

    def recording(query: str, params: Sequence[Any]) -> list[Any]:
        ran.append((query, params))
        return fetch(query, params)

    store._fetch = recording  # type: ignore[method-assign]
    rare = {17, 5000, 9999}
    try:
        records = [
            rec(
                i,
                session_id=f"s{i % 50}",
                properties={"env": "prod", **({"team": "rare"} if i in rare else {})},
            )
            for i in range(10_000)
        ]
        for i in range(0, 10_000, 1000):
            assert await store.write_batch(records[i : i + 1000]) == 1000
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

        def steps(queries: list[tuple[str, Sequence[Any]]]) -> int:
            n = [0]

            def tick() -> int:
                n[0] += 1
                return 0

            db.set_progress_handler(tick, 100)
            for q, params in queries:
                db.execute(q, params).fetchall()
            db.set_progress_handler(None, 0)
            return n[0]

        for f in (
            {"properties": {"team": "nobody"}},
            {"properties": {"team": "rare"}},
            {"properties": {"team": "nobody"}, "min_cost_usd": 0.5},
            {"properties": {"env": "prod", "team": "rare"}},
            {"properties": {"team": "rare"}, "model": "gpt-4o-mini"},
        ):
            q = ListQuery(limit=50, **f)
            ran.clear()
            page = await store.list_requests("acme", q)
            want = [
                r.id for r in reversed(records) if r.properties.get("team") == f["properties"].get("team")
            ]
            assert [r["id"] for r in page.items] == want, f
            walked = steps([store_sql.list_sql(lite.DIALECT, "acme", q)])
            assert steps(ran) * 10 < walked, (f, steps(ran), walked)
            # The Sessions list likewise (its newest matching request per session).
            ran.clear()
            sessions = await store.list_sessions("acme", q)
            listed = [records[k].session_id for k in sorted(rare, reverse=True) if records[k].id in want]
            assert [x["session_id"] for x in sessions.items] == listed, f
            if q.model is None:  # (with it, both check a session's newer rows through the model's index)
                walked = steps([store_sql.sessions_sql(lite.DIALECT, "acme", q)])
                found = [x for x in ran if "GROUP BY r.session_id" not in x[0]]  # not the listed ones' totals
                assert steps(found) * 10 < walked, (f, steps(found), walked)
            # Stats from raw rows (exact, or a filter rollups cannot answer) likewise.
            sq = StatsQuery(filters=q, bucket="hour", exact=True)
            ran.clear()
            stats = await store.stats("acme", sq)
            assert stats["overall"]["count"] == len(want)
            walked = steps(
                [
                    store_sql.aggregate_sql(lite.DIALECT, "acme", sq, kind, percentiles=False)
                    for kind in ("overall", "bucket")
                ]
            )
            assert steps(ran) * 10 < walked, (f, steps(ran), walked)
        db.close()
    finally:
        await store.close()


async def test_sqlite_property_walk_chooses_the_walk_with_the_fewest_steps(tmp_path: Path) -> None:
    """Two common values are told apart by their shares of the rows a page walks first (both
    reach the count's cap); a value on a third of the requests or more is left to the time
    walk when a filter on the request's own columns can be checked first (an outside check
    measured the property walk 2x slower there); an index of fewer rows keeps its walk."""
    from llmtap.store import sql as store_sql
    from llmtap.store import sqlite as lite

    path = tmp_path / "s.db"
    store = lite.SQLiteStore(path)
    await store.connect()
    try:
        records = [
            rec(
                i,
                user_id=f"u{i % 500}",
                status=504 if i % 97 == 0 else 200,
                properties={
                    "env": "prod",
                    **({"team": "t3"} if i % 10 == 0 else {}),
                    **({"early": "y"} if i < 400 else {}),
                },
            )
            for i in range(6000)
        ]
        for i in range(0, 6000, 1000):
            assert await store.write_batch(records[i : i + 1000]) == 1000
    finally:
        await store.close()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def walk(**f: Any) -> str | None:
        return store_sql.property_walk(
            lite.DIALECT, "acme", ListQuery(**f), lambda q, p: db.execute(q, p).fetchall()
        )

    assert walk(properties={"env": "prod"}) == "env"  # nothing to weigh it against
    assert walk(properties={"env": "prod", "team": "t3"}) == "team"  # 6,000 and 600: both past the cap
    assert walk(properties={"team": "t3", "env": "prod"}, order="asc") == "team"
    assert walk(properties={"env": "prod"}, status=504) is None
    assert walk(properties={"env": "prod"}, min_cost_usd=0.001) is None
    assert walk(properties={"team": "t3"}, status=504) == "team"  # a tenth of the rows
    assert walk(properties={"env": "prod", "team": "nobody"}, provider="openai") == "team"
    assert walk(properties={"team": "t3"}, user_id="u7") is None  # 12 requests against 600
    assert walk(properties={"early": "y"}, user_id="u7") is None  # 12 against 400: the index
    assert walk(properties={"early": "nobody"}, user_id="u7") == "early"
    # The oldest requests a page of the oldest first walks have "early"; the newest do not.
    assert walk(properties={"env": "prod", "early": "y"}, order="asc") == "early"
    assert walk(properties={"early": "y"}, status=504, order="asc") is None
    assert walk(properties={"early": "y"}, status=504) == "early"
    assert walk(properties={"env": "prod"}, q="word") is None  # the search walk (search_scan_sql)
    assert walk(properties={"env": "prod"}, sort="cost") is None  # the sort key's index
    db.close()


async def test_sqlite_close_interrupts_a_read_that_would_never_end(tmp_path: Path) -> None:
    """Closing (a SIGTERM) waits for no query: one still running, and the ones queued behind
    it, are interrupted and their callers told the store is unavailable."""
    from llmtap.store import sqlite as lite

    store = lite.SQLiteStore(tmp_path / "s.db")
    await store.connect()
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    reads = [asyncio.ensure_future(store._read(store._fetch, endless, ())) for _ in range(lite.READERS + 2)]
    await asyncio.sleep(0.3)  # they are running (and two are queued)
    assert not any(r.done() for r in reads)
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)  # it has begun
    # A read asked for while the store closes is told so (it was a RuntimeError: a 500).
    with pytest.raises(TransientError, match="not open"):
        await store.stats("acme", StatsQuery(exact=True))
    await asyncio.wait_for(closing, 60)
    for r in reads:
        with pytest.raises(TransientError, match="interrupted"):
            await r


async def test_sqlite_unopenable_path_is_one_sentence(tmp_path: Path) -> None:
    from llmtap.store.sqlite import SQLiteStore

    (tmp_path / "file").write_text("x")
    with pytest.raises(BackendUnavailable, match="SQLite store") as e:
        await SQLiteStore(tmp_path / "file" / "store.db").connect()
    assert "\n" not in str(e.value)


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_unreachable_is_one_sentence() -> None:
    import socket

    from llmtap.store.postgres import PostgresStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendUnavailable) as e:
        await PostgresStore(f"postgresql://u:secret@127.0.0.1:{port}/db").connect()
    assert str(e.value) == f"cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused"
    # The server answers that the database is not there: a setting to fix, not an outage.
    with pytest.raises(ConfigError, match=r"^invalid setting LLMTAP_STORE: PostgreSQL at .*does not exist"):
        url = pg_url() or ""
        await PostgresStore(url.rsplit("/", 1)[0] + "/no_such_db_" + uuid.uuid4().hex[:6]).connect()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_url_with_several_hosts_is_taken(tmp_path: Path) -> None:
    """`postgresql://u:pw@h1:1,h2:2/db` (asyncpg tries each host in turn) crashed start-up with
    urllib's "Port could not be cast to integer value"; messages name the hosts as written."""
    import socket
    from urllib.parse import urlsplit

    from llmtap.store.postgres import PostgresStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendUnavailable) as e:
        await PostgresStore(f"postgresql://u:PW70secret@127.0.0.1:{port},127.0.0.1:{port}/db").connect()
    assert str(e.value).startswith(f"cannot connect to PostgreSQL at 127.0.0.1:{port},127.0.0.1:{port}: ")
    assert "PW70secret" not in str(e.value) and "\n" not in str(e.value)
    async with pg_database() as url:  # the first host refuses, the second is the server
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{port},{parts.hostname}:{parts.port or 5432}"
        store = PostgresStore(parts._replace(netloc=netloc).geturl())
        await store.connect()
        try:
            await store.write_batch([rec(1)])
            assert (await store.get_request("acme", rec(1).id) or {}).get("id") == rec(1).id
        finally:
            await store.close()


async def _write_when_back(store: Store, batch: list[LogRecord], timeout: float = 30) -> int:
    """`write_batch` once the store is back: the pool recovers by itself, and a retry may
    still meet a dead connection (TransientError) for a while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await store.write_batch(batch)
        except TransientError:
            if time.monotonic() > deadline:
                raise AssertionError("the store never recovered") from None
            await asyncio.sleep(0.1)


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_a_database_refusing_connections_is_an_outage_not_bad_records() -> None:
    """`ALTER DATABASE ... ALLOW_CONNECTIONS false` (maintenance) makes new connections fail
    with "database is not currently accepting connections" (SQLSTATE 55000). That was no known
    outage: a worker's batch needing a new connection bisected and dead-lettered every record
    (an outside check saw the webhook deliverer log a traceback per round)."""
    from llmtap.store.postgres import PostgresStore

    async with pg_database() as url:
        name = url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(pg_url())
        store = PostgresStore(url, min_size=1, max_size=1)
        await store.connect()
        try:
            assert await store.write_batch([rec(i) for i in range(5)]) == 5
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )  # the pool must connect again
            batch = [rec(i) for i in range(5, 15)]
            said = []
            for _ in range(4):  # the first may meet the terminated connection
                with pytest.raises(TransientError) as e:
                    await store.write_batch(batch)
                said.append(str(e.value))
            assert "not currently accepting connections" in said[-1], said
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            assert await _write_when_back(store, batch) == 10
            assert len(await all_pages(store, "acme", limit=100)) == 15
        finally:
            await store.close()
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_outage_is_transient_then_recovers_exactly_once() -> None:
    from urllib.parse import urlsplit, urlunsplit

    from llmtap.store.postgres import PostgresStore

    async with pg_database() as url:
        parts = urlsplit(url)
        proxy = TcpProxy(parts.port or 5432)
        await proxy.start()
        via = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        store = PostgresStore(via, min_size=2, max_size=2)
        await store.connect()
        try:
            assert await store.write_batch([rec(i) for i in range(10)]) == 10
            await proxy.stop()  # PostgreSQL "goes away": live connections die, new ones are refused
            batch = [rec(i) for i in range(5, 20)]
            for _ in range(3):
                with pytest.raises(TransientError, match=r"PostgreSQL at 127\.0\.0\.1"):
                    await store.write_batch(batch)
            with pytest.raises(TransientError):
                await store.list_requests("acme", ListQuery())
            await proxy.start()  # back, same address
            assert await _write_when_back(store, batch) == 10
            assert len(await all_pages(store, "acme", limit=100)) == 20
        finally:
            await store.close()
            await proxy.stop()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_commits_are_synchronous_whatever_the_servers_default() -> None:
    """A worker acknowledges records once their batch commits: with the server's
    `synchronous_commit = off` (the test server's, for speed), a crash lost acknowledged ones."""
    from llmtap.store.postgres import PostgresStore

    async with pg_database() as url:
        admin = await asyncpg.connect(url)
        try:
            assert await admin.fetchval("SHOW synchronous_commit") == "off"  # this server's default
        finally:
            await admin.close()
        store = PostgresStore(url)
        await store.connect()
        try:
            assert [r[0] for r in await store._fetch("SHOW synchronous_commit")] == ["on"]
            assert await store.write_batch([rec(1)]) == 1
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def _store_of_its_own_role(
    role: str | None = None,
) -> AsyncIterator[tuple[Any, asyncpg.Connection, str]]:
    """A PostgreSQL store connected as a role of its own that owns its database (a superuser
    passes every privilege check), five records written; an admin connection beside it."""
    from urllib.parse import urlsplit, urlunsplit

    from llmtap.store.postgres import PostgresStore

    role = role or "llmtap_r_" + uuid.uuid4().hex[:8]
    async with pg_database() as url:
        parts = urlsplit(url)
        db = parts.path.lstrip("/")
        admin = await asyncpg.connect(url)
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'ALTER DATABASE "{db}" OWNER TO "{role}"')
        store = PostgresStore(urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}")))
        try:
            await store.connect()
            assert await store.write_batch([rec(i) for i in range(5)]) == 5
            yield store, admin, role
        finally:
            await store.close()
            await admin.execute(f'ALTER DATABASE "{db}" OWNER TO CURRENT_USER')
            await admin.execute(f'DROP OWNED BY "{role}"')
            await admin.close()
    await _drop_role(role)


async def _drop_role(role: str) -> None:
    """Drop a role a test made (after the database it owned objects in is gone)."""
    admin = await asyncpg.connect(pg_url())
    try:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        await admin.close()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_settings_no_wait_cures_stop_start_up_with_one_sentence() -> None:
    """`sslmode=bogus`, a CA file that is not there, a misspelt parameter: waited out as outages
    (for ever); a role that may not create tables: a traceback. Each is one sentence now."""
    from urllib.parse import urlsplit, urlunsplit

    from llmtap.store.postgres import PostgresStore

    role = "llmtap_r_" + uuid.uuid4().hex[:8]
    async with pg_database() as url:
        for query, needle in [
            ("sslmode=bogus", "`sslmode` parameter must be one of"),
            ("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", "cannot be read"),
            ("sslrootcrt=/x", 'unrecognized configuration parameter "sslrootcrt"'),
            # SQLSTATE 55P02, in class 55 that is otherwise a passing state (an outage)
            ("shared_buffers=1MB", '"shared_buffers" cannot be changed without restarting the server'),
        ]:
            with pytest.raises(ConfigError) as e:
                await PostgresStore(f"{url}?{query}").connect()
            assert str(e.value).startswith("invalid setting LLMTAP_STORE: ") and needle in str(e.value), (
                e.value
            )
        parts = urlsplit(url)
        admin = await asyncpg.connect(url)
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        try:
            weak = PostgresStore(urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}")))
            with pytest.raises(
                ConfigError, match=r"its role cannot make llmtap.s tables .*permission denied"
            ):
                await weak.connect()
            await admin.execute("REVOKE USAGE ON SCHEMA public FROM PUBLIC")  # was a traceback
            with pytest.raises(ConfigError, match=r"tables \(no schema has been selected to create in\)"):
                await weak.connect()
        finally:
            await admin.close()
    await _drop_role(role)


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_refusing_the_role_mid_run_is_an_outage_not_the_records_fault() -> None:
    """A password rotated under a running worker (a managed database's rotation) made every
    write raise InvalidPasswordError, counted as the record's fault: all dead-lettered within
    5 s. Refused logins are an outage once connected (at start they stay a wrong setting).
    Reproduced with NOLOGIN, as the test server trusts every password."""
    async with _store_of_its_own_role() as (store, admin, role):
        await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
        await admin.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        )
        said = []
        for _ in range(3):  # the first may meet the connection just terminated
            with pytest.raises(TransientError) as e:
                await store.write_batch([rec(i) for i in range(5, 10)])
            said.append(str(e.value))
        assert "not permitted to log in" in said[-1], said
        await admin.execute(f'ALTER ROLE "{role}" LOGIN')
        assert await store.write_batch([rec(i) for i in range(5, 10)]) == 5


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_privileges_revoked_a_column_renamed_or_a_month_detached_is_an_outage() -> None:
    """An operator's mistakes under a running worker: INSERT revoked from its role, a column
    renamed, a month's partition detached. Each made every write the record's fault, and an
    outside check counted every record of the batches in flight dead-lettered. Records travel
    as COPY data, so none of these can be a record's: they are outages now, with a reason that
    says what to fix, and writes go on once it is fixed."""
    role = "llmtap_r_" + uuid.uuid4().hex[:8]
    cases = [
        (
            f'REVOKE INSERT, UPDATE ON ALL TABLES IN SCHEMA public FROM "{role}"',
            f'GRANT INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO "{role}"',
            "permission denied",
        ),
        (
            "ALTER TABLE requests RENAME COLUMN gateway TO gateway_x",
            "ALTER TABLE requests RENAME COLUMN gateway_x TO gateway",
            "gateway",
        ),
        (
            "ALTER TABLE requests DETACH PARTITION requests_p202503",  # T0's month
            "ALTER TABLE requests ATTACH PARTITION requests_p202503"
            " FOR VALUES FROM ('2025-03-01 00:00:00+00') TO ('2025-04-01 00:00:00+00')",
            "detached",
        ),
    ]
    async with _store_of_its_own_role(role) as (store, admin, _):
        for n, (breaks, mends, said) in enumerate(cases, 1):
            batch = [rec(10 * n + i) for i in range(5)]
            await admin.execute(breaks)
            with pytest.raises(TransientError) as e:
                await store.write_batch(batch)
            with pytest.raises(TransientError) as e:  # the first try's cache refreshed: same
                await store.write_batch(batch)
            assert said in str(e.value), (breaks, e.value)
            await admin.execute(mends)
            assert await _write_when_back(store, batch) == 5, breaks
        assert (await store.stats("acme", StatsQuery()))["overall"]["count"] == 20


async def test_sqlite_a_damaged_file_is_an_outage_not_the_records_fault(tmp_path: Path) -> None:
    """A corrupted page of an index ("database disk image is malformed") made every write the
    record's fault: an outside check counted 20 of 20 dead-lettered. No record causes it; the
    records wait in the queue for an operator to repair the file."""
    from llmtap.store.sqlite import SQLiteStore

    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    await store.connect()
    await store.write_batch([rec(i) for i in range(50)])
    await store.close()
    conn = sqlite3.connect(path)
    (root,) = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests' LIMIT 1"
    ).fetchone()
    (size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xa5" * size)
    store = SQLiteStore(path)
    try:
        await store.connect()
        with pytest.raises(TransientError, match="malformed"):
            await store.write_batch([rec(i) for i in range(100, 110)])
    finally:
        await store.close()


async def test_sqlite_a_folder_that_cannot_be_searched_any_more_is_no_lost_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's folder made unsearchable (chmod 600) under a running worker: the check that
    the file is still there raised PermissionError after the commit, and the records, stored,
    were dead-lettered too (outside check; reproduced here without root's immunity)."""
    import llmtap.sqlitefile
    import llmtap.store.sqlite as sqlite_store

    store = sqlite_store.SQLiteStore(tmp_path / "s.db")
    await store.connect()
    try:

        def refused(path: Any) -> tuple[int, int]:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(llmtap.sqlitefile, "identity", refused)
        assert await store.write_batch([rec(i) for i in range(5)]) == 5
        assert len((await store.list_requests("acme", ListQuery())).items) == 5
    finally:
        monkeypatch.undo()
        await store.close()


async def test_sqlite_a_file_moved_away_and_back_keeps_its_wal_and_every_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`mv store.db` leaves its WAL at the path: the store took the file for removed, made a new
    one there and removed that WAL, so what the moved file held there was lost when it came
    back (the review of the queue's reopen). Now batches are refused while it is away (the
    worker writes them again) and the file is used again once back."""
    from llmtap.store.sqlite import SQLiteStore

    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    await store.connect()
    try:
        assert await store.write_batch([rec(i) for i in range(5)]) == 5
        os.rename(path, tmp_path / "away.db")
        for _ in range(2):
            with pytest.raises(TransientError, match="missing from its path"):
                await store.write_batch([rec(i) for i in range(5, 8)])
        with pytest.raises(TransientError, match="missing from its path"):
            await store.list_requests("acme", ListQuery())
        os.rename(tmp_path / "away.db", path)
        assert await store.write_batch([rec(i) for i in range(5, 8)]) in (0, 3)  # (the retry)
        assert (await store.stats("acme", StatsQuery()))["overall"]["count"] == 8
    finally:
        await store.close()
    said = [r.getMessage() for r in caplog.records if r.name == "llmtap.store.sqlite"]
    assert not any("while open; opening" in line for line in said), said
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    again = SQLiteStore(path)  # the restart
    await again.connect()
    try:
        got = await again.list_requests("acme", ListQuery(limit=50))
        assert {x["id"] for x in got.items} == {rec(i).id for i in range(8)}
    finally:
        await again.close()


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_sqlite_a_file_removed_or_replaced_while_open_is_opened_again_and_nothing_written_since_lost(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An outside check deleted store.db (and its WAL) under `llmtap up`: every batch after that
    was acknowledged and shown while the process ran, and none was there after its restart. The
    batch (or read) that finds its file gone is refused (the worker writes it again) and the
    store opens the file at its path again: what was written since is in the file a restart
    opens. A backup moved over the file, the old WAL left beside it, is opened without that WAL:
    replayed onto the copy, it broke every index (second check)."""
    from llmtap.store.sqlite import SQLiteStore

    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    await store.connect()
    try:
        assert await store.write_batch([rec(i) for i in range(5)]) == 5
        if how == "removed":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            with pytest.raises(TransientError, match="removed"):  # a read finds it first
                await store.list_requests("acme", ListQuery())
            assert (await store.list_requests("acme", ListQuery())).items == []
        else:  # a backup with one record of its own, moved over the file
            backup = SQLiteStore(tmp_path / "backup.db")
            await backup.connect()
            assert await backup.write_batch([rec(100)]) == 1
            await backup.close()
            assert await store.write_batch([rec(i) for i in range(5, 9)]) == 4  # in the WAL
            os.replace(tmp_path / "backup.db", path)
        late = [rec(i) for i in range(10, 15)]
        if how == "replaced":
            with pytest.raises(TransientError, match="replaced"):
                await store.write_batch(late)
        assert await store.write_batch(late) == 5  # (the worker's retry)
        assert await store.write_batch([rec(20)]) == 1
        assert (await store.stats("acme", StatsQuery()))["overall"]["count"] == 6 + (how == "replaced")
    finally:
        await store.close()
    said = [r.getMessage() for r in caplog.records if r.name == "llmtap.store.sqlite"]
    assert len(said) == 1 and f"its file was {how} while open; opening" in said[0], said
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    again = SQLiteStore(path)  # the restart
    await again.connect()
    try:
        got = await again.list_requests("acme", ListQuery(limit=50))
        want = {r.id for r in [*late, rec(20)]} | ({rec(100).id} if how == "replaced" else set())
        assert {x["id"] for x in got.items} == want
    finally:
        await again.close()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_made_again_empty_is_an_outage_and_the_store_migrates_it() -> None:
    """The database dropped and created again under a running worker: every write met
    `relation "requests" does not exist`, which was the record's fault (five tries, then a
    dead letter: an outside check counted 367) until someone restarted the worker. It is an
    outage now, and the next write makes the tables again and stores the batch."""
    from urllib.parse import urlsplit

    from llmtap.store.postgres import PostgresStore

    admin = pg_url()
    assert admin is not None
    async with pg_database() as url:
        name = urlsplit(url).path.lstrip("/")
        store = PostgresStore(url, min_size=2, max_size=2)
        await store.connect()
        try:
            assert await store.write_batch([rec(i) for i in range(10)]) == 10
            conn = await asyncpg.connect(admin)
            try:
                await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                # While it is gone (a re-check found records dead-lettered in a 5 s gap):
                # `database ... does not exist` from a running store is an outage too.
                for _ in range(2):
                    with pytest.raises(TransientError):
                        await store.write_batch([rec(99)])
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()
            batch = [rec(i) for i in range(10, 20)]
            outages = 0
            deadline = time.monotonic() + 60
            while True:  # as the worker retries a batch: TransientError means "again later"
                try:
                    assert await store.write_batch(batch) == 10
                    break
                except TransientError:
                    outages += 1
                    assert time.monotonic() < deadline, "the store never made its tables again"
                    await asyncio.sleep(0.1)
            assert outages >= 1  # the first write met the empty database
            assert {r["id"] for r in await all_pages(store, "acme", limit=100)} == {r.id for r in batch}
            assert (await store.stats("acme", StatsQuery()))["overall"]["count"] == 10
        finally:
            await store.close()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_outage_logs_one_line_down_and_one_back(caplog: pytest.LogCaptureFixture) -> None:
    """asyncpg retries the pool's floor during an outage and logged each failure with a full
    traceback (1 s, 2 s, 4 s ... apart, in every process). Now: one line when it goes, one when
    it is back, nothing from asyncpg and no traceback."""
    import logging
    from urllib.parse import urlsplit, urlunsplit

    from llmtap.store.postgres import PostgresStore

    caplog.set_level(logging.DEBUG)
    async with pg_database() as url:
        parts = urlsplit(url)
        proxy = TcpProxy(parts.port or 5432)
        await proxy.start()
        via = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        store = PostgresStore(via, min_size=2, max_size=2)
        await store.connect()
        try:
            assert await store.write_batch([rec(0)]) == 1
            proxy.refuse = True
            await proxy.stop()  # live connections die; the pool starts restoring its floor
            await proxy.start()  # listening again, but every connection is reset
            deadline = asyncio.get_running_loop().time() + 60
            while proxy.refused < 4:  # asyncpg's floor retries (1 s, 2 s, 4 s apart)
                assert asyncio.get_running_loop().time() < deadline, proxy.refused
                await asyncio.sleep(0.1)
            for _ in range(2):  # a lost connection's first failure alone is not said an outage
                with pytest.raises(TransientError):
                    await store.write_batch([rec(1)])
            proxy.refuse = False
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                try:
                    assert await store.write_batch([rec(1)]) == 1
                    break
                except TransientError:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.2)
        finally:
            await store.close()
            await proxy.stop()
    flood = [r for r in caplog.records if r.name.startswith("asyncpg") or r.exc_info]
    assert not flood, f"{len(flood)} asyncpg or traceback records, e.g. {flood[0].getMessage()!r}"
    mine = [r.getMessage() for r in caplog.records if r.name == "llmtap.store.postgres"]
    assert len(mine) == 2 and "is unavailable" in mine[0] and "is available again" in mine[1], mine


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_connections_killed_one_by_one_are_no_outage_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The review: each stats query killed by `pg_terminate_backend` (an operator, an idle
    timeout) logged "unavailable" and then "available again": 46 pairs in 40 s. One lost
    connection whose next call works is no outage; a second failure in a row is."""
    import logging

    import asyncpg

    from llmtap.store.postgres import PostgresStore

    caplog.set_level(logging.DEBUG)
    async with pg_database() as url:
        store = PostgresStore(url, min_size=1, max_size=1)
        await store.connect()
        admin = await asyncpg.connect(url)
        try:
            assert await store.write_batch([rec(0)]) == 1
            for i in range(5):
                pid = await admin.fetchval(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                with contextlib.suppress(TransientError):  # the killed connection's call
                    await store.write_batch([rec(1 + i)])
                assert await store.write_batch([rec(1 + i)]) in (0, 1)  # the next one works
            assert (await store.stats("acme", StatsQuery(exact=True)))["overall"]["count"] == 6
        finally:
            await admin.close()
            await store.close()
    mine = [r for r in caplog.records if r.name == "llmtap.store.postgres"]
    assert not [r for r in mine if r.levelno >= logging.WARNING], [r.getMessage() for r in mine]


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_migration_2_upgrades_a_version_1_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """A database made by version 1 (values indexed as they are) refuses a 3 KB user id; after
    migration 2 it stores it, its old rows are still found, and a property name ingested in
    upper case answers a lowercase filter."""
    import asyncpg

    import llmtap.store.postgres as pg
    from llmtap.store.migrations import POSTGRES

    long_user = _long(3 * 1024, 3)
    async with pg_database() as url:
        monkeypatch.setattr(pg, "MIGRATIONS", POSTGRES[:1])
        old = pg.PostgresStore(url)
        await old.connect()
        try:
            assert await old.write_batch([rec(0), rec(1, properties={"feature": "search"})]) == 2
            with pytest.raises(asyncpg.exceptions.ProgramLimitExceededError):
                await old.write_batch([rec(2, user_id=long_user)])  # the defect, on the old schema
        finally:
            await old.close()
        conn = await asyncpg.connect(url)
        try:  # a record ingested with an upper-case name before names were case-insensitive
            await conn.execute("UPDATE request_properties SET name = 'Feature'")
            await conn.execute(
                """UPDATE requests SET properties = '{"Feature": "search"}' WHERE id = $1""", rec(1).id
            )
        finally:
            await conn.close()
        monkeypatch.setattr(pg, "MIGRATIONS", POSTGRES)
        new = pg.PostgresStore(url)
        await new.connect()
        try:
            assert await new.write_batch([rec(2, user_id=long_user)]) == 1
            assert [r["id"] for r in await all_pages(new, "acme", user_id=long_user)] == [rec(2).id]
            assert await new.get_request("acme", rec(0).id) is not None
            got = await all_pages(new, "acme", properties={"FEATURE": "search"})
            assert [r["id"] for r in got] == [rec(1).id]
            assert got[0]["properties"] == {"feature": "search"}
            assert await new.write_batch([rec(0), rec(1), rec(2)]) == 0  # uniqueness kept
        finally:
            await new.close()
        conn = await asyncpg.connect(url)
        try:
            versions = [r[0] for r in await conn.fetch("SELECT version FROM llmtap_migrations ORDER BY 1")]
            assert versions == [v for v, _, _ in POSTGRES]
        finally:
            await conn.close()


async def test_sqlite_migration_3_lowercases_property_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmtap.store.sqlite as lite
    from llmtap.store.migrations import SQLITE

    path = tmp_path / "old.db"
    monkeypatch.setattr(lite, "MIGRATIONS", SQLITE[:2])
    old = lite.SQLiteStore(path)
    await old.connect()
    assert await old.write_batch([rec(0, properties={"feature": "search", "env": "prod"}), rec(1)]) == 2
    await old.close()
    with sqlite3.connect(path) as db:  # as a record ingested with upper-case names was stored
        db.execute("UPDATE request_properties SET name = upper(name)")
        db.execute("""UPDATE requests SET properties = '{"FEATURE": "search", "Env": "prod"}' WHERE id = ?""",
                   (rec(0).id,))  # fmt: skip
    monkeypatch.setattr(lite, "MIGRATIONS", SQLITE)
    new = lite.SQLiteStore(path)
    await new.connect()
    try:
        got = await all_pages(new, "acme", properties={"Feature": "search", "env": "prod"})
        assert [r["id"] for r in got] == [rec(0).id]
        assert got[0]["properties"] == {"feature": "search", "env": "prod"}
        stats = await new.stats("acme", StatsQuery(group_by="property.ENV"))
        assert {g["key"]: g["count"] for g in stats["groups"]} == {"prod": 1, None: 1}
    finally:
        await new.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SQLITE[-1][0]  # the highest version


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_two_workers_migrate_and_partition_at_once() -> None:
    from llmtap.store.postgres import PostgresStore

    async with pg_database() as url:
        stores = [PostgresStore(url) for _ in range(4)]
        await asyncio.gather(*(s.connect() for s in stores))
        try:
            # all four write into months nobody created yet, at the same time
            months = [rec(i, at=T0 + timedelta(days=31 * (i % 6) + 200)) for i in range(60)]
            counts = await asyncio.gather(*(s.write_batch(months) for s in stores))
            assert sum(counts) == 60
            import asyncpg

            conn = await asyncpg.connect(url)
            try:
                from llmtap.store.migrations import POSTGRES

                assert await conn.fetchval("SELECT count(*) FROM llmtap_migrations") == len(POSTGRES)
                assert await conn.fetchval("SELECT count(*) FROM requests") == 60
                parts = await conn.fetchval(
                    "SELECT count(*) FROM pg_inherits WHERE inhparent = 'requests'::regclass"
                )
                assert parts >= 6
            finally:
                await conn.close()
        finally:
            for s in stores:
                await s.close()


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_estimates_a_property_filter_from_the_value_not_twice() -> None:
    """A property filter compares hash and value; the planner must know the value decides the
    hash, or it multiplies both selectivities and, at 10M rows, plans a list page as "collect
    every match, then sort" (29 s instead of 35 ms, bench/README.md). Every month partition
    gets the statistics: those the writer creates, and those migration 11 finds."""
    import asyncpg

    from llmtap.store import sql as store_sql
    from llmtap.store.migrations import POSTGRES
    from llmtap.store.postgres import DIALECT, PostgresStore

    async def estimate_and_count(conn: asyncpg.Connection, value: str) -> tuple[float, int]:
        p = store_sql.Params(DIALECT)
        where = (
            f"rp.tenant = {p('acme')} AND {store_sql.equals(DIALECT, 'rp.name', p('env'))}"
            f" AND {store_sql.equals(DIALECT, 'rp.value', p(value))}"
        )
        query = f"SELECT 1 FROM request_properties rp WHERE {where}"
        return await planned_rows(conn, query, p.values), len(await conn.fetch(query, *p.values))

    async with pg_database() as url:
        at = T0 + timedelta(days=400)  # a month no partition exists for yet
        await pg_write(
            url,
            [
                rec(
                    i,
                    at=at + timedelta(seconds=i),
                    properties={"env": "dev" if i % 5 == 0 else "prod", "feature": f"f{i % 7}"},
                )
                for i in range(3000)
            ],
        )
        conn = await asyncpg.connect(url)
        try:
            part = f"request_properties_p{at.year:04d}{at.month:02d}"
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_statistic_ext WHERE stxname = $1", part + "_deps"
            )
            await conn.execute(f"ANALYZE {part}")
            estimated, actual = await estimate_and_count(conn, "dev")
            assert actual == 600
            assert actual / 2 <= estimated <= actual * 2, (estimated, actual)
            # a database from before version 11: its partitions get them when it migrates
            await conn.execute(f"DROP STATISTICS {part}_deps")
            await conn.execute("DELETE FROM llmtap_migrations WHERE version = 11")
            assert POSTGRES[-1][0] >= 11
        finally:
            await conn.close()
        again = PostgresStore(url)
        await again.connect()
        await again.close()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_statistic_ext WHERE stxname = $1", part + "_deps"
            )
            estimated, actual = await estimate_and_count(conn, "dev")
            assert actual / 2 <= estimated <= actual * 2, (estimated, actual)
        finally:
            await conn.close()


# -- the two stores agree -----------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_both_stores_give_identical_answers(tmp_path: Path) -> None:
    records = dataset(600, seed=5)
    async with open_store("sqlite", tmp_path) as lite, open_store("postgresql", tmp_path) as pg:
        for s in (lite, pg):
            for i in range(0, len(records), 150):
                await s.write_batch(records[i : i + 150])

        async def both(fn: Any) -> None:
            a, b = await fn(lite), await fn(pg)
            assert a == b

        for r in records[::37]:
            await both(lambda s, r=r: s.get_request(r.tenant, r.id))
        lists: list[dict[str, Any]] = [
            {},
            {"model": "gpt-4o"},
            {"user_id": "d'ave; DROP TABLE requests;--"},
            {"properties": {"env": "100%_off"}},
            {"since": T0 - timedelta(days=33), "until": T0 - timedelta(days=2)},
            {"status": 500},
            {"order": "asc"},
        ]
        for f in lists:
            for tenant in ("acme", "globex"):
                await both(lambda s, f=f, t=tenant: all_pages(s, t, limit=11, **f))
                # the cursors themselves are the same bytes
                await both(lambda s, f=f, t=tenant: s.list_requests(t, ListQuery(limit=5, **f)))
        for group_by in (
            None,
            "model",
            "user_id",
            "session_id",
            "provider",
            "status",
            "property.env",
            "property.team",
        ):
            for bucket in (None, "day", "hour"):
                await both(lambda s, g=group_by, b=bucket: s.stats("acme", StatsQuery(group_by=g, bucket=b)))
        await both(lambda s: s.stats("globex", StatsQuery(since=T0 - timedelta(days=9), bucket="minute")))
        for sid in SESSIONS:
            if sid:
                await both(lambda s, sid=sid: s.sessions("acme", sid))
        await both(lambda s: s.users("acme"))
        await both(lambda s: s.users("globex", limit=2))
        cutoff = T0 - timedelta(days=45)
        got = [sorted(await s.delete_older_than(cutoff, limit=100000)) for s in (lite, pg)]
        assert got[0] == got[1] and got[0]
        await both(lambda s: all_pages(s, "acme", limit=500))


def test_dataset_is_what_the_suite_assumes() -> None:
    records = dataset(400)
    assert len({(r.tenant, r.id) for r in first_per_key(records)}) == 400
    assert len({r.started_at.month for r in records}) >= 3
    assert len({r.started_at for r in records}) < 400  # there are ties


async def test_sqlite_migrates_a_version_1_file(tmp_path: Path) -> None:
    """A store file written by the first schema keeps its rows and properties after upgrade."""
    from llmtap.store.migrations import SQLITE
    from llmtap.store.sql import COLUMNS, property_rows, record_values, written_columns
    from llmtap.store.sqlite import SQLiteStore, _insert

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for stmt in SQLITE[0][2].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    r = rec(1, properties={"env": "prod"})
    values = record_values(r)
    v1 = written_columns({str(c[1]) for c in conn.execute("PRAGMA table_info(requests)")})
    assert v1 is not None  # version 1 had fewer columns than today
    conn.execute(_insert(v1), [values[COLUMNS.index(c)] for c in v1])
    conn.executemany(
        "INSERT INTO request_properties (tenant, request_id, created_at, name, value) VALUES (?, ?, ?, ?, ?)",
        property_rows(values),
    )
    conn.close()
    store = SQLiteStore(path)
    await store.connect()
    try:
        assert [x["id"] for x in await all_pages(store, "acme", properties={"env": "prod"})] == [r.id]
        assert await store.write_batch([rec(2, properties={"env": "prod"}), r]) == 1
        assert len(await all_pages(store, "acme", properties={"env": "prod"})) == 2
    finally:
        await store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SQLITE[-1][0]


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_writer_recreates_a_month_another_process_dropped() -> None:
    from llmtap.store.postgres import PostgresStore

    async with pg_database() as url:
        writer, janitor = PostgresStore(url), PostgresStore(url)
        await writer.connect()
        await janitor.connect()
        try:
            old = T0 - timedelta(days=100)
            assert await writer.write_batch([rec(1, at=old)]) == 1  # the writer now caches that month
            refs = await janitor.delete_older_than(T0 - timedelta(days=60))
            assert len(refs) == 2 and await janitor.delete_older_than(T0 - timedelta(days=60)) == []
            assert await writer.write_batch([rec(2, at=old)]) == 1  # month gone under its feet
            assert await writer.get_request("acme", rec(2).id) is not None
            assert await writer.get_request("acme", rec(1).id) is None
        finally:
            await writer.close()
            await janitor.close()


def test_migrations_are_the_sql_files_of_each_database() -> None:
    """Every `NNNN_name.sql` file is a migration, versions unique from 1 up (gaps allowed: see
    tests/test_migrations.py), SQL only (notes dropped)."""
    from importlib.resources import files

    from llmtap.store.migrations import POSTGRES, SQLITE

    for database, loaded in (("sqlite", SQLITE), ("postgres", POSTGRES)):
        folder = files("llmtap.store.migrations").joinpath(database)
        names = sorted(e.name for e in folder.iterdir() if e.name.endswith(".sql"))
        versions = [v for v, _, _ in loaded]
        assert [int(n[:4]) for n in names] == versions == sorted(set(versions)) and versions[0] == 1
        for version, description, sql in loaded:
            assert description and not description.startswith("-"), (database, version)
            assert not any(line.lstrip().startswith("--") for line in sql.splitlines()), (database, version)
            assert any(w in sql for w in ("CREATE", "ALTER", "UPDATE", "INSERT")), (database, version)


async def test_a_query_sqlite_cannot_parse_is_a_bug_not_an_outage(tmp_path: Path) -> None:
    """A malformed query (the stats of an empty range once read `FROM ()`) was answered 503
    'temporarily unavailable', as if the store were down; a locked database still is."""
    from llmtap.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "s.db")
    await store.connect()
    try:
        with pytest.raises(sqlite3.OperationalError, match="syntax error"):
            await store._read(lambda: store._r().execute("SELECT * FROM ()"))
        with pytest.raises(TransientError):
            await store._read(lambda: store._r().execute("SELECT * FROM no_such_table_here"))
    finally:
        await store.close()


async def test_a_full_disk_is_named_not_hidden_by_a_failed_rollback(tmp_path: Path) -> None:
    """Found by the disk check: on a full disk the worker logged "cannot rollback - no transaction
    is active": SQLite had rolled back already, and our ROLLBACK's error replaced the real one."""
    from llmtap.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "store.db")
    await store.connect()
    try:
        await store.write_batch([rec(i) for i in range(5)])

        def cap() -> None:  # a file that may grow by two pages only: a disk that is full
            conn = store._w()
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages + 2}").fetchall()

        await store._write(cap)
        with pytest.raises(TransientError, match="database or disk is full"):  # retried, not dead-lettered
            for b in range(50):
                await store.write_batch([rec(1000 + b * 50 + i) for i in range(50)])
        assert (await store.get_request(rec(1).tenant, rec(1).id)) is not None  # what was stored stays
    finally:
        await store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("pool", [3, 5])
async def test_postgres_raw_stats_under_a_busy_small_pool_never_wait_on_each_other(pool: int) -> None:
    """A raw stats answer takes a connection per part, sharing one snapshot. Many at once on a
    small pool, beside writes and a purge (which holds a connection while it waits for
    another), all finish and agree; a pool too small for a set reads the parts in turn."""
    from llmtap.store.postgres import PostgresStore

    async with pg_database() as url:
        store = PostgresStore(url, max_size=pool)
        await store.connect()
        try:
            await store.write_batch(dataset(300, seed=9))
            q = StatsQuery(group_by="model", bucket="day", exact=True)
            want = await store.stats("acme", q)

            async def churn() -> None:
                for i in range(5):
                    await store.write_batch([rec(1000 + i, tenant="other")])
                    await store.delete_older_than(datetime(2000, 1, 1, tzinfo=UTC))

            got = await asyncio.wait_for(
                asyncio.gather(*(store.stats("acme", q) for _ in range(16)), churn()), timeout=90
            )
            assert got[:16] == [want] * 16
        finally:
            await store.close()
