"""Analytics-store benchmark: write throughput of both stores, and query latency at scale on PG.

    .venv/bin/python bench/store_bench.py write [--pg URL] [--records 20000] [--batch 500]
    .venv/bin/python bench/store_bench.py scale [--pg URL] [--rows 1000000]

`write` times `Store.write_batch` (the worker's path: COPY + INSERT ... SELECT on PostgreSQL,
executemany in one transaction on SQLite) with batches of realistic records, on a fresh SQLite
file and a fresh PostgreSQL database. Target: >= 5,000 records/s per worker process.

`scale` loads N synthetic rows straight into a fresh PostgreSQL database with COPY (minutes
instead of hours through the API), then times, through `PostgresStore`, a filtered list page
(first page and a cursor page) and a 30-day stats query grouped by model. Targets at 1M rows:
list page < 50 ms, 30-day stats by model < 1 s.

--pg defaults to $LLMTAP_TEST_POSTGRES_URL (scripts/services.sh env). Results print as lines
and as JSON (append to bench/results/ if you keep them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import asyncpg

from llmtap.record import Body, LogRecord, Usage
from llmtap.store import sql
from llmtap.store.base import ListQuery, StatsQuery, Store
from llmtap.store.postgres import PostgresStore
from llmtap.store.sqlite import SQLiteStore

MODELS = [f"model-{i}" for i in range(12)] + ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "claude-haiku-4"]
TENANT = "bench"


# -- fresh databases --------------------------------------------------------------------------------


def _with_db(url: str, db: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + db))


async def create_db(admin_url: str) -> str:
    name = "llmtap_bench_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_db(admin_url, name)


async def drop_db(admin_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# -- write throughput ---------------------------------------------------------------------------------


def make_records(n: int, seed: int = 1) -> list[LogRecord]:
    """Records as a worker sees them: arriving in start order (with a little jitter, as several
    gateways publish), random UUIDs, a few properties, body references."""
    r = random.Random(seed)
    start = datetime.now(UTC) - timedelta(seconds=n / 1000)
    out = []
    for i in range(n):
        started = start + timedelta(milliseconds=i + r.uniform(-50, 50))
        latency = r.uniform(50, 4000)
        out.append(
            LogRecord(
                id=str(uuid.uuid4()),
                tenant=TENANT,
                user_id=f"user-{r.randrange(1000)}",
                session_id=f"session-{r.randrange(5000)}",
                properties={"env": r.choice(("prod", "dev")), "feature": f"f{r.randrange(20)}"},
                provider="openai",
                target_url="https://api.openai.com/v1/chat/completions",
                method="POST",
                path="/v1/chat/completions",
                model=r.choice(MODELS),
                streamed=i % 2 == 0,
                started_at=started,
                first_byte_at=started + timedelta(milliseconds=latency / 3),
                ended_at=started + timedelta(milliseconds=latency),
                latency_ms=latency,
                time_to_first_token_ms=latency / 3,
                status=200 if r.random() < 0.97 else 500,
                usage=Usage(
                    source="provider",
                    prompt_tokens=r.randrange(2000),
                    completion_tokens=r.randrange(800),
                    total_tokens=2800,
                ),
                cost_nanos=r.randrange(10**7),
                price_version="bench",
                request_headers={"content-type": "application/json", "user-agent": "OpenAI/Python 1.0"},
                response_headers={"content-type": "application/json", "x-request-id": uuid.uuid4().hex},
                request_body=Body(
                    content_type="application/json",
                    size=900,
                    encoding="zstd",
                    ref=f"{TENANT}/x/{i}.request.zst",
                ),
                response_body=Body(
                    content_type="application/json",
                    size=1500,
                    encoding="zstd",
                    ref=f"{TENANT}/x/{i}.response.zst",
                ),
                gateway="bench:1",
            )
        )
    return out


async def time_writes(store: Store, records: list[LogRecord], batch: int) -> dict[str, Any]:
    await store.write_batch(records[:batch])  # warm-up: partitions, prepared statements
    rest = records[batch:]
    t0, c0 = time.perf_counter(), time.process_time()
    inserted = 0
    for i in range(0, len(rest), batch):
        inserted += await store.write_batch(rest[i : i + batch])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    again = 0
    for i in range(0, len(rest), batch):
        again += await store.write_batch(rest[i : i + batch])  # redelivery: all duplicates
    dup_dt = time.perf_counter() - t1
    assert inserted == len(rest) and again == 0, (inserted, again)
    return {
        "records": len(rest),
        "batch": batch,
        "seconds": round(dt, 3),
        "records_per_s": round(len(rest) / dt),
        # CPU seconds of this process (all threads): on a busy machine wall time mostly measures
        # waiting for a core; this is what one worker process costs per record.
        "records_per_cpu_s": round(len(rest) / cpu) if cpu else None,
        "duplicate_records_per_s": round(len(rest) / dup_dt),
    }


async def bench_write(args: argparse.Namespace) -> dict[str, Any]:
    records = make_records(args.records + args.batch)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        store = SQLiteStore(Path(d) / "bench.db")
        await store.connect()
        try:
            results["sqlite"] = await time_writes(store, records, args.batch)
        finally:
            await store.close()
    r = results["sqlite"]
    rate, per_cpu = r["records_per_s"], r["records_per_cpu_s"]
    print(
        f"sqlite      write_batch({args.batch}): {rate:>8} records/s  ({per_cpu} per CPU-second)", flush=True
    )
    if args.pg:
        url = await create_db(args.pg)
        pg = PostgresStore(url)
        try:
            await pg.connect()
            results["postgresql"] = await time_writes(pg, records, args.batch)
        finally:
            await pg.close()
            await drop_db(args.pg, url)
        r = results["postgresql"]
        rate, per_cpu = r["records_per_s"], r["records_per_cpu_s"]
        print(
            f"postgresql  write_batch({args.batch}): {rate:>8} records/s  ({per_cpu} per client CPU-second)"
        )
    return results


# -- scale ----------------------------------------------------------------------------------------------


async def bulk_load(url: str, rows: int, days: int, chunk: int = 50_000) -> float:
    """COPY `rows` synthetic rows (and their keys and properties) over the last `days` days."""
    store = PostgresStore(url)
    await store.connect()
    now = datetime.now(UTC)
    months = set()
    d = now - timedelta(days=days + 1)
    while d <= now + timedelta(days=32):
        months.add((d.year, d.month))
        d += timedelta(days=27)
    await store._ensure_partitions(months)
    await store.close()

    r = random.Random(42)
    conn = await asyncpg.connect(url)
    t0 = time.perf_counter()
    try:
        span_us = days * 86_400_000_000
        now_us = sql.to_micros(now)
        headers = '{"content-type": "application/json"}'
        for start in range(0, rows, chunk):
            reqs, keys_, props = [], [], []
            for i in range(start, min(rows, start + chunk)):
                created = sql.from_micros(now_us - r.randrange(span_us))
                rid = str(uuid.UUID(int=r.getrandbits(128)))
                latency = r.uniform(50, 4000)
                model = MODELS[min(int(r.expovariate(0.35)), len(MODELS) - 1)]
                env = "prod" if r.random() < 0.8 else "dev"
                body = f'{{"ref": "{TENANT}/{rid}.request.zst", "size": 900, "encoding": "zstd"}}'
                reqs.append(
                    (
                        TENANT,
                        rid,
                        created,
                        "openai",
                        model,
                        "POST",
                        "/v1/chat/completions",
                        "https://api.openai.com/v1/chat/completions",
                        200 if r.random() < 0.97 else 500,
                        "completed",
                        None,
                        i % 2 == 0,
                        latency,
                        latency / 3,
                        r.randrange(2000),
                        r.randrange(800),
                        2800,
                        None,
                        None,
                        None,
                        "provider",
                        r.randrange(10**7),
                        "bench",
                        f"user-{r.randrange(10_000)}",
                        f"session-{r.randrange(100_000)}",
                        f'{{"env": "{env}"}}',
                        headers,
                        headers,
                        body,
                        None,
                        None,
                        "queue",
                        created,
                        created + timedelta(milliseconds=latency),
                        "bench:1",
                    )
                )
                keys_.append((TENANT, rid, created))
                props.append((TENANT, rid, created, "env", env))
            async with conn.transaction():
                await conn.copy_records_to_table("request_keys", records=keys_)
                await conn.copy_records_to_table("requests", records=reqs, columns=sql.COLUMNS)
                await conn.copy_records_to_table(
                    "request_properties",
                    records=props,
                    columns=("tenant", "request_id", "created_at", "name", "value"),
                )
            print(f"  loaded {start + len(reqs):>9} rows  ({time.perf_counter() - t0:6.1f} s)", flush=True)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - t0


def report(name: str, r: dict[str, float]) -> None:
    print(f"  {name:<30} median {r['median_ms']:>8.2f} ms   max {r['max_ms']:>8.2f} ms", flush=True)


async def timed(fn: Callable[[], Awaitable[Any]], runs: int) -> dict[str, float]:
    await fn()  # warm-up (plans, cache)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}


async def bench_scale(args: argparse.Namespace) -> dict[str, Any]:
    if not args.pg:
        raise SystemExit("scale needs --pg or LLMTAP_TEST_POSTGRES_URL")
    url = args.reuse or await create_db(args.pg)
    results: dict[str, Any] = {"rows": args.rows}
    try:
        if args.reuse:
            print(f"reusing the loaded database {args.reuse}", flush=True)
        else:
            print(f"loading {args.rows} rows over {args.days} days with COPY...", flush=True)
            results["load_seconds"] = round(await bulk_load(url, args.rows, args.days), 1)
        store = PostgresStore(url)
        await store.connect()
        try:
            first = await store.list_requests(TENANT, ListQuery(limit=50, model="gpt-4o"))
            assert len(first.items) == 50
            cursor = first.next_cursor
            since = datetime.now(UTC) - timedelta(days=30)
            cases: dict[str, Callable[[], Awaitable[Any]]] = {
                "list newest 50": lambda: store.list_requests(TENANT, ListQuery(limit=50)),
                "list model=X, 50": lambda: store.list_requests(TENANT, ListQuery(limit=50, model="gpt-4o")),
                "list model=X, next page": lambda: store.list_requests(
                    TENANT, ListQuery(limit=50, model="gpt-4o", cursor=cursor)
                ),
                "list user_id=X, 50": lambda: store.list_requests(
                    TENANT, ListQuery(limit=50, user_id="user-77")
                ),
                "list property env=dev, 50": lambda: store.list_requests(
                    TENANT, ListQuery(limit=50, properties={"env": "dev"})
                ),
                "list model+since 7d, 50": lambda: store.list_requests(
                    TENANT,
                    ListQuery(limit=50, model="claude-haiku-4", since=datetime.now(UTC) - timedelta(days=7)),
                ),
                "get by id": lambda: store.get_request(TENANT, first.items[7]["id"]),
            }
            for name, fn in cases.items():
                results[name] = await timed(fn, args.runs)
                report(name, results[name])
            stats_cases: dict[str, Callable[[], Awaitable[Any]]] = {
                "stats 30d group_by=model": lambda: store.stats(
                    TENANT, StatsQuery(since=since, group_by="model")
                ),
                "stats 30d model + day buckets": lambda: store.stats(
                    TENANT, StatsQuery(since=since, group_by="model", bucket="day")
                ),
                "stats 24h hour buckets": lambda: store.stats(
                    TENANT, StatsQuery(since=datetime.now(UTC) - timedelta(days=1), bucket="hour")
                ),
            }
            for name, fn in stats_cases.items():
                results[name] = await timed(fn, max(3, args.runs // 5))
                report(name, results[name])
        finally:
            await store.close()
    finally:
        if not args.keep and not args.reuse:
            await drop_db(args.pg, url)
        else:
            print(f"kept database: {url}")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("write", "scale", "all"))
    p.add_argument("--pg", default=os.environ.get("LLMTAP_TEST_POSTGRES_URL"), help="PostgreSQL server URL")
    p.add_argument("--records", type=int, default=20_000, help="records for the write benchmark")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows for the scale benchmark")
    p.add_argument("--days", type=int, default=60, help="days the scale rows are spread over")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="keep the scale database")
    p.add_argument("--reuse", help="time queries on a database a --keep run loaded (no loading)")
    args = p.parse_args()
    out: dict[str, Any] = {}
    if args.what in ("write", "all"):
        out["write"] = asyncio.run(bench_write(args))
    if args.what in ("scale", "all"):
        out["scale"] = asyncio.run(bench_scale(args))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
