"""Shared by the store, API and tenant tests: opening real stores, synthetic records, and a plain
Python reference of what every query must return (so no expected value is hard-coded).

PostgreSQL tests need `LLMTAP_TEST_POSTGRES_URL` (from `scripts/services.sh env`); each test
gets a database of its own, created from that server and dropped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from llmtap.record import Body, LogRecord, Usage
from llmtap.store.base import Store

PG_ENV = "LLMTAP_TEST_POSTGRES_URL"
STORE_KINDS = ("sqlite", "postgresql")
T0 = datetime(2025, 3, 30, 12, 0, 0, 123456, tzinfo=UTC)


def pg_url() -> str | None:
    return os.environ.get(PG_ENV) or None


def store_params() -> list[Any]:
    """pytest params for the two stores; PostgreSQL skips only when its URL is unset."""
    skip_pg = pytest.mark.skipif(pg_url() is None, reason=f"{PG_ENV} is not set (scripts/services.sh up)")
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=[pytest.mark.postgres, skip_pg]),
    ]


def _with_db(url: str, db: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + db))


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh, empty database on the test server; dropped on exit."""
    admin = pg_url()
    assert admin is not None
    name = "llmtap_t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield _with_db(admin, name)
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def pg_write(url: str, records: Sequence[LogRecord], batch: int = 500) -> None:
    """Write `records` into the PostgreSQL store at `url` as the worker would, in batches."""
    from llmtap.store.postgres import PostgresStore

    store = PostgresStore(url)
    await store.connect()
    try:
        for i in range(0, len(records), batch):
            await store.write_batch(records[i : i + batch])
    finally:
        await store.close()


async def planned_rows(conn: asyncpg.Connection, query: str, params: Sequence[Any]) -> float:
    """The PostgreSQL planner's row estimate for `query` (what decides index or scan)."""
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *params)
    return float(json.loads(plan)[0]["Plan"]["Plan Rows"])


@contextlib.asynccontextmanager
async def open_store(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A connected, empty store of this kind."""
    store: Store
    if kind == "sqlite":
        from llmtap.store.sqlite import SQLiteStore

        store = SQLiteStore(tmp_path / f"store-{uuid.uuid4().hex[:6]}.db")
        await store.connect()
        try:
            yield store
        finally:
            await store.close()
        return
    from llmtap.store.postgres import PostgresStore

    async with pg_database() as url:
        store = PostgresStore(url)
        await store.connect()
        try:
            yield store
        finally:
            await store.close()


# -- records ---------------------------------------------------------------------------------------


def rec(
    i: int = 0,
    *,
    id: str | None = None,
    tenant: str = "acme",
    at: datetime | None = None,
    **kw: Any,
) -> LogRecord:
    """A plausible record; any field can be overridden."""
    started = at or (T0 + timedelta(seconds=i))
    latency = kw.pop("latency_ms", 100.0 + i)
    usage = kw.pop(
        "usage", Usage(source="provider", prompt_tokens=10 + i, completion_tokens=i, total_tokens=10 + 2 * i)
    )
    fields: dict[str, Any] = {
        "id": id or str(uuid.UUID(int=i + 1)),
        "tenant": tenant,
        "provider": "openai",
        "target_url": "https://api.openai.com/v1/chat/completions",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "started_at": started,
        "first_byte_at": started + timedelta(milliseconds=latency / 2),
        "ended_at": started + timedelta(milliseconds=latency),
        "latency_ms": latency,
        "time_to_first_token_ms": latency / 2,
        "status": 200,
        "usage": usage,
        "cost_nanos": 1_000 * (i + 1),
        "price_version": "test-1",
        "request_body": Body(
            content_type="application/json", size=20, encoding="zstd", ref=f"{tenant}/{i}.request.zst"
        ),
        "response_body": Body(
            content_type="application/json", size=30, encoding="zstd", ref=f"{tenant}/{i}.response.zst"
        ),
        "gateway": "host:1",
    }
    fields.update(kw)
    return LogRecord(**fields)


MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4", None)
USERS = ("alice", "bob", "carol", "d'ave; DROP TABLE requests;--", None)
SESSIONS = ("s1", "s2", "s3", None)
ENVS = ("prod", "dev", "100%_off")


def dataset(n: int, *, seed: int = 7, tenants: Sequence[str] = ("acme", "globex")) -> list[LogRecord]:
    """`n` varied records over three calendar months, with ties in created_at."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        # Spread over ~70 days before T0 (three months, so several PG partitions), with ties.
        at = T0 - timedelta(microseconds=r.randrange(0, 70 * 86_400_000_000)) if i % 10 else T0
        if i % 17 == 0:
            at = out[-1].started_at if out else at
        status = r.choice((200, 200, 200, 200, 201, 400, 429, 500))
        outcome = "completed" if r.random() < 0.9 else r.choice(("client_disconnected", "upstream_cut"))
        props: dict[str, str] = {}
        if r.random() < 0.7:
            props["env"] = r.choice(ENVS)
        if r.random() < 0.3:
            props["team"] = r.choice(("red", "blue"))
        usage = Usage(
            source="provider",
            prompt_tokens=r.randrange(0, 5000),
            completion_tokens=r.randrange(0, 2000),
            cached_tokens=r.choice((None, r.randrange(0, 100))),
            reasoning_tokens=r.choice((None, r.randrange(0, 50))),
        )
        usage.total_tokens = (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
        out.append(
            rec(
                i,
                id=str(uuid.UUID(int=r.getrandbits(128))),
                tenant=tenants[i % len(tenants)],
                at=at,
                model=r.choice(MODELS),
                provider=r.choice(("openai", "anthropic")),
                user_id=r.choice(USERS),
                session_id=r.choice(SESSIONS),
                properties=props,
                status=status,
                outcome=outcome,
                streamed=r.random() < 0.5,
                latency_ms=round(r.uniform(5, 5000), 3),
                time_to_first_token_ms=r.choice((None, round(r.uniform(1, 800), 3))),
                usage=usage,
                cost_nanos=r.choice((None, r.randrange(0, 10**9))),
            )
        )
    return out


# -- reference ------------------------------------------------------------------------------------


def micros(dt: datetime) -> int:
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def ref_filter(records: Iterable[LogRecord], tenant: str, **f: Any) -> list[LogRecord]:
    """Rows a filter selects, newest first (created_at, then id, descending)."""
    props: dict[str, str] = f.pop("properties", {})
    since, until = f.pop("since", None), f.pop("until", None)
    out = []
    for r in records:
        if r.tenant != tenant:
            continue
        if any(getattr(r, k) != v for k, v in f.items() if v is not None):
            continue
        if since is not None and r.started_at < since:
            continue
        if until is not None and r.started_at >= until:
            continue
        if any(r.properties.get(k) != v for k, v in props.items()):
            continue
        out.append(r)
    out.sort(key=lambda r: (micros(r.started_at), r.id), reverse=True)
    return out


def first_per_key(records: Iterable[LogRecord]) -> list[LogRecord]:
    seen: set[tuple[str, str]] = set()
    out = []
    for r in records:
        if (r.tenant, r.id) not in seen:
            seen.add((r.tenant, r.id))
            out.append(r)
    return out


def percentile_cont(values: Sequence[float], frac: float) -> float | None:
    """The textbook linear-interpolation percentile (what PostgreSQL's percentile_cont is)."""
    if not values:
        return None
    v = sorted(values)
    pos = frac * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def is_error(r: LogRecord) -> bool:
    return (r.status is not None and r.status >= 400) or r.outcome != "completed"


PCTS = (0.5, 0.9, 0.95, 0.99)


def ref_totals(rows: Sequence[LogRecord]) -> dict[str, Any]:
    n = len(rows)
    errors = sum(1 for r in rows if is_error(r))
    lat = [r.latency_ms for r in rows]
    ttft = [r.time_to_first_token_ms for r in rows if r.time_to_first_token_ms is not None]
    return {
        "count": n,
        "error_count": errors,
        "error_rate": errors / n if n else 0.0,
        "prompt_tokens": sum(r.usage.prompt_tokens or 0 for r in rows),
        "completion_tokens": sum(r.usage.completion_tokens or 0 for r in rows),
        "total_tokens": sum(r.usage.total_tokens or 0 for r in rows),
        "cached_tokens": sum(r.usage.cached_tokens or 0 for r in rows),
        "reasoning_tokens": sum(r.usage.reasoning_tokens or 0 for r in rows),
        "cost_usd": sum(r.cost_nanos or 0 for r in rows) / 1e9,
        "unpriced_count": sum(1 for r in rows if r.cost_nanos is None and r.cost_usd is None),
        "latency_ms": {f"p{round(p * 100)}": percentile_cont(lat, p) for p in PCTS},
        "time_to_first_token_ms": {f"p{round(p * 100)}": percentile_cont(ttft, p) for p in PCTS},
    }


def assert_totals(got: dict[str, Any], rows: Sequence[LogRecord], rel: float = 0.0) -> None:
    """Counts, sums and first/last exactly; percentiles exactly (raw rows), or within `rel`
    relative error (rollups' sketches)."""
    want = ref_totals(rows)
    for k in (
        "count",
        "error_count",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost_usd",
        "unpriced_count",
    ):
        assert got[k] == want[k], (k, got[k], want[k])
    assert got["error_rate"] == pytest.approx(want["error_rate"], rel=1e-12)
    for k in ("latency_ms", "time_to_first_token_ms"):
        for p, v in want[k].items():
            want_v = None if v is None else pytest.approx(v, rel=max(rel, 1e-12), abs=1e-9)
            assert got[k][p] == want_v, (k, p, got[k][p], v)
