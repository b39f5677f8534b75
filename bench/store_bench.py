"""Analytics-store benchmark: write throughput of both stores, and query latency at scale.

    .venv/bin/python bench/store_bench.py write [--pg URL] [--records 20000] [--batch 500]
    .venv/bin/python bench/store_bench.py scale [--store sqlite|pg] [--pg URL] [--rows 1000000]
    .venv/bin/python bench/store_bench.py cardinality [--store sqlite|pg] [--rows 300000] [--days 3]
    .venv/bin/python bench/store_bench.py purge [--rows 300000] [--days 10] [--reuse store.db]

`write` times `Store.write_batch` (the worker's path: COPY + INSERT ... SELECT on PostgreSQL,
executemany in one transaction on SQLite) with batches of realistic records, on a fresh SQLite
file and a fresh PostgreSQL database. Target: >= 5,000 records/s per worker process.

`write` runs each store twice: with rollups and search indexing on (the default; every record
carries ~1.5 KB of searchable text) and off (both switched off on the store object), so the cost
of the analytics work per record shows.

`scale` loads N synthetic rows into a fresh database of either store (`--store sqlite|pg`) with
`scale_data.load` (days written in parallel in the stores' own row format, the worker's own
`rollup.contributions` for the rollups, every row with ~250 bytes of searchable text, secondary
indexes built once at the end), then times, through the store class, filtered list pages, `q=`
search first pages (a frequent, a mid, a rare word and a string in no row), and the dashboard's
overview from rollups (and from raw rows with `--raw`): 30 days of totals, day buckets and the
top models with p50/p90/p99, the same grouped by a rolled-up property, top users, 24 h by hour.
Targets (issue 11): 30-day overview < 200 ms, by property < 300 ms, `q=` first page < 500 ms.

`cardinality` loads the same N rows twice into fresh databases: as `scale` does (16 models, a
property of 20 values), and with a rolled-up property holding a value per request and 5,000
models (`scale_data.HIGH_PROPS`), then times the dashboard's grouped stats on both and prints
high / low per query: what a user pays for values that never repeat. Target: none above 1 s at
300k rows over 3 days (a value per request still costs the database a GROUP BY over every value,
so that query stays tens of times its low-cardinality time).

`purge` (SQLite) deletes the loaded rows day by day as retention does, chunk sizes taking turns
(`--chunks 10000,2000`; retention's is 10,000): rows/s and the longest transaction of each, i.e.
how long the worker's next batch and a stop wait behind the purge. `--reuse` works on a copy of
the file (the copy is deleted).

10M rows: `--rows 10000000 --keep` once (prints the database URL or file and the load time),
then `--reuse URL|PATH` for every later timing run (no loading).

--pg defaults to $LLMTAP_TEST_POSTGRES_URL (scripts/services.sh env). Results print as lines
and as JSON (append to bench/results/ if you keep them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
import scale_data

from llmtap.record import Body, LogRecord, Usage
from llmtap.store.base import ListQuery, StatsQuery, Store
from llmtap.store.postgres import PostgresStore
from llmtap.store.sqlite import SQLiteStore

PROPS = ("feature", "env")
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


WORDS = "the quick brown fox jumps over a lazy dog while llm tokens stream slowly to users".split()


def text_for(i: int) -> str:
    """~1.5 KB of searchable text (what the body handler extracts from a chat exchange)."""
    r = random.Random(i)
    return " ".join(r.choice(WORDS) for _ in range(300))[:1500]


async def time_writes(
    store: Store, records: list[LogRecord], batch: int, analytics: bool = True
) -> dict[str, Any]:
    if not analytics:  # the switches the stores set from their schema (bench only)
        store._rollups = store._search = False  # type: ignore[attr-defined]
    texts = [text_for(i) for i in range(len(records))] if analytics else None
    await store.write_batch(records[:batch], texts and texts[:batch])  # warm-up: partitions, statements
    rest = records[batch:]
    rest_texts = texts[batch:] if texts else None
    t0, c0 = time.perf_counter(), time.process_time()
    inserted = 0
    for i in range(0, len(rest), batch):
        inserted += await store.write_batch(rest[i : i + batch], rest_texts and rest_texts[i : i + batch])
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
    for analytics in (True, False):
        mode = "rollups+search on " if analytics else "rollups+search off"
        with tempfile.TemporaryDirectory() as d:
            store = SQLiteStore(Path(d) / "bench.db", rollup_properties=PROPS)
            await store.connect()
            try:
                r = results[f"sqlite {mode.strip()}"] = await time_writes(
                    store, records, args.batch, analytics
                )
            finally:
                await store.close()
        rate, per_cpu = r["records_per_s"], r["records_per_cpu_s"]
        print(f"sqlite      {mode} write_batch({args.batch}): {rate:>8} records/s  ({per_cpu} per CPU-s)")
        if args.pg:
            url = await create_db(args.pg)
            pg = PostgresStore(url, rollup_properties=PROPS)
            try:
                await pg.connect()
                r = results[f"postgresql {mode.strip()}"] = await time_writes(
                    pg, records, args.batch, analytics
                )
            finally:
                await pg.close()
                await drop_db(args.pg, url)
            rate, per_cpu = r["records_per_s"], r["records_per_cpu_s"]
            print(
                f"postgresql  {mode} write_batch({args.batch}): {rate:>8} records/s"
                f"  ({per_cpu} per client CPU-s)",
                flush=True,
            )
    return results


# -- scale ----------------------------------------------------------------------------------------------


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


def bench_store(kind: str, target: str, props: tuple[str, ...]) -> Store:
    """The store class of `kind` ("pg" or "sqlite") on a loaded database."""
    if kind == "pg":
        return PostgresStore(target, rollup_properties=props)
    return SQLiteStore(target, rollup_properties=props)


async def bench_scale(args: argparse.Namespace) -> dict[str, Any]:
    kind = args.store
    if args.reuse:
        kind = "pg" if args.reuse.startswith("postgres") else "sqlite"
    if kind == "pg" and not (args.pg or args.reuse):
        raise SystemExit("scale --store pg needs --pg or LLMTAP_TEST_POSTGRES_URL")
    if args.reuse:
        target = args.reuse
    elif kind == "pg":
        target = await create_db(args.pg)
    else:
        target = tempfile.mktemp(prefix=f"llmtap-scale-{args.rows}-", suffix=".db")
    results: dict[str, Any] = {"store": kind, "rows": args.rows}
    try:
        if args.reuse:
            print(f"reusing the loaded database {args.reuse}", flush=True)
        else:
            print(
                f"loading {args.rows:,} rows over {args.days} days into {kind} ({args.procs} processes)...",
                flush=True,
            )
            results["load_seconds"] = round(
                await scale_data.load(kind, target, args.rows, args.days, args.procs), 1
            )
        store = bench_store(kind, target, PROPS)
        await store.connect()
        try:
            if args.reuse:  # the rows a --keep run loaded, not this run's --rows
                everything = await store.stats(TENANT, StatsQuery(since=datetime(2000, 1, 1, tzinfo=UTC)))
                results["rows"] = everything["overall"]["count"]
                print(f"{results['rows']:,} rows stored", flush=True)
            first = await store.list_requests(TENANT, ListQuery(limit=50, model="gpt-4o"))
            assert len(first.items) == 50
            cursor = first.next_cursor
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
                # A value no request has: the page is empty, however many rows the range holds.
                "list property feature=none, 50": lambda: store.list_requests(
                    TENANT, ListQuery(limit=50, properties={"feature": "f-none"})
                ),
                "list property env=dev + model=X, 50": lambda: store.list_requests(
                    TENANT, ListQuery(limit=50, model="claude-haiku-4", properties={"env": "dev"})
                ),
                "list property feature=none + since 7d, 50": lambda: store.list_requests(
                    TENANT,
                    ListQuery(
                        limit=50,
                        properties={"feature": "f-none"},
                        since=datetime.now(UTC) - timedelta(days=7),
                    ),
                ),
                "list model+since 7d, 50": lambda: store.list_requests(
                    TENANT,
                    ListQuery(limit=50, model="claude-haiku-4", since=datetime.now(UTC) - timedelta(days=7)),
                ),
                "get by id": lambda: store.get_request(TENANT, first.items[7]["id"]),
            }
            for label, term in scale_data.search_terms().items():
                page = await store.list_requests(TENANT, ListQuery(limit=50, q=term))
                results[f"q= {label}: first page rows"] = len(page.items)
                cases[f"q={term!r} {label}, 50"] = partial(
                    store.list_requests, TENANT, ListQuery(limit=50, q=term)
                )
            for name, fn in cases.items():
                runs = args.runs if not name.startswith("q=") else max(3, args.runs // 4)
                results[name] = await timed(fn, runs)
                report(name, results[name])
            now = datetime.now(UTC)
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
            hour = now.replace(minute=0, second=0, microsecond=0)
            overview = {
                "30d: model groups + day buckets": StatsQuery(
                    since=midnight - timedelta(days=30), group_by="model", bucket="day"
                ),
                "30d: property.feature + day buckets": StatsQuery(
                    since=midnight - timedelta(days=30), group_by="property.feature", bucket="day"
                ),
                "30d: top users": StatsQuery(since=midnight - timedelta(days=30), group_by="user_id"),
                "24h: hour buckets": StatsQuery(since=hour - timedelta(days=1), bucket="hour"),
                # One model's cost per day (the Overview filtered by a model): its rollup rows.
                "30d: model=X, day buckets": StatsQuery(
                    since=midnight - timedelta(days=30), bucket="day", filters=ListQuery(model="model-0")
                ),
                "7d to now: property env=dev, hour buckets": StatsQuery(
                    since=now - timedelta(days=7), bucket="hour", filters=ListQuery(properties={"env": "dev"})
                ),
                # An API client's "the last N days" to the microsecond: rollups inside, raw rows
                # only in the partial minute (hour, for a property) at each end.
                "30d to now: model groups + day buckets": StatsQuery(
                    since=now - timedelta(days=30), group_by="model", bucket="day"
                ),
                "30d to now: property.feature + day buckets": StatsQuery(
                    since=now - timedelta(days=30), group_by="property.feature", bucket="day"
                ),
                "24h to now: hour buckets": StatsQuery(since=now - timedelta(days=1), bucket="hour"),
                # Whole days from the user rows, the partial days at the ends from raw rows.
                "30d to now: top users": StatsQuery(since=now - timedelta(days=30), group_by="user_id"),
            }
            for name, q in overview.items():
                for source in ("rollups", "raw") if args.raw else ("rollups",):
                    exact = source == "raw"
                    sq = replace(q, exact=exact)
                    got = await store.stats(TENANT, sq)
                    assert got["source"] == source, (name, got["source"])
                    label = f"stats {name} [{source}]"
                    runs = args.runs if source == "rollups" else 3
                    results[label] = await timed(partial(store.stats, TENANT, sq), runs)
                    report(label, results[label])
            for source in ("rollups", "raw") if args.raw else ("rollups",):  # the dashboard's Users view
                exact = source == "raw"
                label = f"users 500 [{source}]"
                runs = args.runs if source == "rollups" else 3
                results[label] = await timed(partial(store.users, TENANT, 500, exact=exact), runs)
                report(label, results[label])
        finally:
            await store.close()
    finally:
        if args.keep or args.reuse:
            print(f"kept database: {target}")
        elif kind == "pg":
            await drop_db(args.pg, target)
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(target + suffix).unlink(missing_ok=True)
    return results


async def bench_cardinality(args: argparse.Namespace) -> dict[str, Any]:
    kind = args.store
    if kind == "pg" and not args.pg:
        raise SystemExit("cardinality --store pg needs --pg or LLMTAP_TEST_POSTGRES_URL")
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    results: dict[str, Any] = {"store": kind, "rows": args.rows, "days": args.days}
    for level in ("low", "high"):
        high = level == "high"
        prop = "property.reqid" if high else "property.feature"  # the property with the most values
        queries = {
            f"{args.days}d whole days: by model": StatsQuery(
                since=midnight - timedelta(days=args.days - 1), group_by="model"
            ),
            "7d to now: by model, hour buckets (Overview)": StatsQuery(
                since=now - timedelta(days=7), group_by="model", bucket="hour"
            ),
            f"{args.days}d whole days: by busiest property": StatsQuery(
                since=midnight - timedelta(days=args.days - 1), group_by=prop
            ),
            "24h to now: by busiest property": StatsQuery(since=now - timedelta(days=1), group_by=prop),
        }
        target = (
            await create_db(args.pg) if kind == "pg" else tempfile.mktemp(prefix="llmtap-card-", suffix=".db")
        )
        try:
            print(f"loading {args.rows:,} rows, {level} cardinality, into {kind}...", flush=True)
            await scale_data.load(kind, target, args.rows, args.days, args.procs, lambda _: None, high)
            store = bench_store(kind, target, scale_data.props_for(high))
            await store.connect()
            try:
                for name, q in queries.items():
                    got = await store.stats(TENANT, q)
                    assert got["source"] == "rollups", (name, got["source"])
                    results.setdefault(name, {})[level] = r = await timed(partial(store.stats, TENANT, q), 5)
                    report(f"{level}: {name}", r)
            finally:
                await store.close()
            results[f"max RSS after {level} (MB)"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            )
        finally:
            if kind == "pg":
                await drop_db(args.pg, target)
            else:
                for suffix in ("", "-wal", "-shm"):
                    Path(target + suffix).unlink(missing_ok=True)
    print(f"\n{'query':<48} {'low ms':>9} {'high ms':>9} {'high/low':>9}")
    for name, timing in results.items():
        if isinstance(timing, dict):
            lo, hi = timing["low"]["median_ms"], timing["high"]["median_ms"]
            print(f"{name:<48} {lo:>9.1f} {hi:>9.1f} {hi / lo:>8.1f}x")
    print(*(f"{k}: {v}" for k, v in results.items() if k.startswith("max RSS")), sep="\n")
    return results


async def bench_purge(args: argparse.Namespace) -> dict[str, Any]:
    """Retention on SQLite, one day at a time, the chunk sizes taking turns (same file, same
    run): a purge's throughput against how long one transaction holds the one writer."""
    import shutil

    sizes = [int(c) for c in args.chunks.split(",")]
    target = tempfile.mktemp(prefix="llmtap-purge-", suffix=".db")
    seen: dict[int, list[tuple[int, float]]] = {c: [] for c in sizes}
    try:
        if args.reuse:
            print(f"copying {args.reuse}...", flush=True)
            shutil.copyfile(args.reuse, target)
        else:
            print(f"loading {args.rows:,} rows over {args.days} days into sqlite...", flush=True)
            await scale_data.load("sqlite", target, args.rows, args.days, args.procs)
        store = SQLiteStore(target, rollup_properties=PROPS)
        await store.connect()
        chunk = store._delete_chunk
        took: list[tuple[int, float]] = []

        def timed(cutoff_us: int, limit: int) -> tuple[list[str], int]:
            t0 = time.perf_counter()
            refs, deleted = chunk(cutoff_us, limit)
            took.append((deleted, time.perf_counter() - t0))
            return refs, deleted

        store._delete_chunk = timed  # type: ignore[method-assign]
        first = await store._read(store._fetch, "SELECT min(created_at) FROM requests", ())
        day = datetime.fromtimestamp(first[0][0] / 1e6, UTC)
        day = day.replace(hour=0, minute=0, second=0, microsecond=0)
        for i in range(args.purge_days):
            size = sizes[i % len(sizes)]
            took.clear()
            while await store.delete_older_than(day + timedelta(days=i + 1), limit=size):
                pass
            seen[size] += took
            rows = sum(d for d, _ in took)
            print(f"day {i + 1}: chunks of {size:>6,} {rows:>7,} rows, {len(took):>3} chunks,"
                  f" longest {max((t for _, t in took), default=0):.2f} s", flush=True)  # fmt: skip
        await store.close()
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(target + suffix).unlink(missing_ok=True)
    out: dict[str, Any] = {}
    print(f"\n{'chunk rows':<12} {'rows/s':>8} {'longest s':>10} {'median s':>9}")
    for size, chunks in seen.items():
        if not chunks:
            continue
        rows, secs = sum(d for d, _ in chunks), sum(t for _, t in chunks)
        longest, median = max(t for _, t in chunks), statistics.median(t for _, t in chunks)
        out[str(size)] = {"rows_per_s": round(rows / secs), "longest_s": round(longest, 2)}
        out[str(size)]["median_s"] = round(median, 2)
        print(f"{size:<12,} {rows / secs:>8,.0f} {longest:>10.2f} {median:>9.2f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("write", "scale", "cardinality", "purge", "all"))
    p.add_argument("--pg", default=os.environ.get("LLMTAP_TEST_POSTGRES_URL"), help="PostgreSQL server URL")
    p.add_argument("--records", type=int, default=20_000, help="records for the write benchmark")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--rows", type=int, help="rows for scale (1,000,000) and cardinality (300,000)")
    p.add_argument("--days", type=int, help="days the rows are spread over (scale 60, cardinality 3)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="keep the scale database")
    p.add_argument("--store", choices=("sqlite", "pg"), default="pg", help="the store the scale rows go to")
    p.add_argument("--procs", type=int, default=2, help="processes generating and writing the scale rows")
    p.add_argument("--purge-days", type=int, default=6, help="days purge deletes, chunk sizes taking turns")
    p.add_argument("--chunks", default="10000,2000", help="purge: the chunk sizes (rows) compared")
    p.add_argument("--raw", action="store_true", help="also time the stats from raw rows (slow at 10M)")
    p.add_argument(
        "--reuse",
        help="time queries on a database a --keep run loaded (PostgreSQL URL or SQLite path; no loading)",
    )
    args = p.parse_args()
    card = args.what == "cardinality"
    args.rows = args.rows or (300_000 if args.what in ("cardinality", "purge") else 1_000_000)
    args.days = args.days or (3 if card else 10 if args.what == "purge" else 60)
    out: dict[str, Any] = {}
    if args.what in ("write", "all"):
        out["write"] = asyncio.run(bench_write(args))
    if args.what in ("scale", "all"):
        out["scale"] = asyncio.run(bench_scale(args))
    if card:
        out["cardinality"] = asyncio.run(bench_cardinality(args))
    if args.what == "purge":
        out["purge"] = asyncio.run(bench_purge(args))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
