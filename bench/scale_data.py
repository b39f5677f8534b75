"""Synthetic requests at scale for `store_bench.py scale`: N rows over D days, on either store.

Loading 10M rows through `write_batch` would take hours on a small machine, so this writes the
tables directly, in the stores' own row format (`sql.record_values` order, `rollup.Cell.row`):

- one job per UTC day, run by a pool of processes: a day's rows are generated (seeded by their
  position, so a load is reproducible), written in one transaction, and their rollup cells built
  with the worker's own `rollup.contributions`. Minute, hour and day cells are complete within
  the day, so they are written there; the per-user month cells span days and are merged in the
  parent and written at the end;
- the secondary indexes are dropped first and built once at the end (one sort each instead of
  10M B-tree inserts each); unique and primary keys stay;
- each row carries ~250 bytes of searchable text (words of a Zipf-weighted vocabulary, as
  prompts repeat words), indexed like the worker indexes bodies (FTS5 trigram / `pg_trgm`).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import accumulate, pairwise
from typing import Any

import asyncpg
import orjson

from llmtap.store import rollup, sql
from llmtap.store.postgres import PostgresStore
from llmtap.store.query import from_micros, to_micros
from llmtap.store.sqlite import _INSERT as SQLITE_INSERT_REQUEST
from llmtap.store.sqlite import SQLiteStore

PROPS = ("feature", "env")
#: `--cardinality high`: also a rolled-up property with a value per request (a request id, a
#: client bug or an attack) and 5,000 models (fine-tunes), against the same rows otherwise.
HIGH_PROPS = (*PROPS, "reqid")
HIGH_MODELS = 5000


def props_for(high: bool) -> tuple[str, ...]:
    return HIGH_PROPS if high else PROPS


MODELS = [f"model-{i}" for i in range(12)] + ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "claude-haiku-4"]
TENANT = "bench"
USERS = 10_000
SESSIONS = 100_000
DAY_US = 86_400_000_000
WORDS_PER_ROW = 32

_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["ar", "en", "is", "on", "ul", "ex"]


def _vocabulary(n: int = 6000) -> list[str]:
    r = random.Random(7)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(r.choice(_SYLLABLES) for _ in range(r.randint(2, 5)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


VOCAB = _vocabulary()
_CUM = list(accumulate(1.0 / (rank + 1) for rank in range(len(VOCAB))))


def _probability(rank: int) -> float:
    """Chance that a row's text holds the word of this rank at least once."""
    p = (1.0 / (rank + 1)) / _CUM[-1]
    return 1 - (1 - p) ** WORDS_PER_ROW


def search_terms() -> dict[str, str]:
    """6-character `q=` strings: the start of a frequent, a mid and a rare word, and one in no row."""
    out = {}
    for label, rank in (("frequent", 30), ("mid", 600), ("rare", 5500)):
        i = next(i for i in range(rank, len(VOCAB)) if len(VOCAB[i]) >= 6)
        out[f"{label} (word rank {i}, ~{_probability(i) * 100:.2g}% of rows)"] = VOCAB[i][:6]
    out["in no row"] = "qxqxqx"
    return out


# -- one day's rows -----------------------------------------------------------------------------


def day_jobs(rows: int, days: int, now_us: int) -> list[tuple[int, int, int, int]]:
    """(first row, end row, start_us, span_us) per UTC day; row i is created at
    start + i * span // rows, so rows stay in time order across days."""
    span = days * DAY_US
    start = now_us - span
    bounds = [start]
    b = (start // DAY_US + 1) * DAY_US
    while b < now_us:
        bounds.append(b)
        b += DAY_US
    firsts = [-(-(x - start) * rows // span) for x in bounds] + [rows]
    return [(lo, hi, start, span) for lo, hi in pairwise(firsts) if hi > lo]


def _rows(
    lo: int, hi: int, start: int, span: int, total: int, high: bool = False
) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(`sql.record_values`-shaped row, searchable text) for rows lo..hi-1 (`high`: see `HIGH_PROPS`)."""
    r = random.Random(lo)
    headers = '{"content-type": "application/json"}'
    n_models = len(MODELS)
    for i in range(lo, hi):
        created = start + i * span // total
        rid = str(uuid.UUID(int=r.getrandbits(128)))
        latency = r.uniform(50, 4000)
        model = MODELS[min(int(r.expovariate(0.35)), n_models - 1)]
        if high:
            model = f"ft:gpt-4o-mini:acme:{r.randrange(HIGH_MODELS)}"
        status = 200 if r.random() < 0.97 else 500
        prompt, completion = r.randrange(2000), r.randrange(800)
        prop = {"env": "prod" if r.random() < 0.8 else "dev", "feature": f"f{r.randrange(20)}"}
        props = orjson.dumps({**prop, "reqid": rid} if high else prop)
        body = f'{{"ref": "{TENANT}/{rid}.request.zst", "size": 900, "encoding": "zstd"}}'
        row = (
            TENANT, rid, created, "openai", model, "POST", "/v1/chat/completions",
            "https://api.openai.com/v1/chat/completions", status,
            "completed", None, i % 2 == 0, latency, latency / 3, prompt, completion, prompt + completion,
            None, None, None, "provider", r.randrange(10**7), "bench", f"user-{r.randrange(USERS)}",
            f"session-{r.randrange(SESSIONS)}", props.decode(), headers, headers, body, None, None, "queue",
            created + int(latency * 333), created + int(latency * 1000), "bench:1",
            *(None,) * (len(sql.COLUMNS) - 35),  # the usage dimensions of schema version 6
        )  # fmt: skip
        yield row, " ".join(r.choices(VOCAB, cum_weights=_CUM, k=WORDS_PER_ROW))


def _cells(
    rows: list[tuple[Any, ...]], props: tuple[str, ...]
) -> tuple[list[tuple[Any, ...]], dict[rollup.RollupKey, rollup.Cell]]:
    """A day's finished rollup rows, and its per-user month cells (merged across days)."""
    deltas = rollup.contributions((rollup.source_values(row) for row in rows), props)
    months = {k: deltas.pop(k) for k in [k for k in deltas if k[1] == "month"]}
    return [cell.row(k) for k, cell in deltas.items()], months


def _pg_row(row: tuple[Any, ...], text: str) -> tuple[Any, ...]:
    v = list(row)
    for i in sql.TS_POSITIONS:
        v[i] = from_micros(v[i])
    v.append(text)
    return tuple(v)


async def _pg_write(
    url: str, rows: list[tuple[Any, ...]], texts: list[str], cells: list[tuple[Any, ...]]
) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET synchronous_commit = off")
        async with conn.transaction():
            await conn.copy_records_to_table(
                "request_keys", records=[(r[0], r[1], from_micros(r[2])) for r in rows]
            )
            await conn.copy_records_to_table(
                "requests",
                records=[_pg_row(r, t) for r, t in zip(rows, texts, strict=True)],
                columns=(*sql.COLUMNS, "search_text"),
            )
            await conn.copy_records_to_table(
                "request_properties",
                records=[
                    (p[0], p[1], from_micros(p[2]), p[3], p[4]) for r in rows for p in sql.property_rows(r)
                ],
                columns=("tenant", "request_id", "created_at", "name", "value"),
            )
            await conn.copy_records_to_table("rollups", records=cells, columns=rollup.COLUMNS)
    finally:
        await conn.close()


_ROLLUP_INSERT = (
    f"INSERT INTO rollups ({', '.join(rollup.COLUMNS)}) VALUES ({', '.join('?' * len(rollup.COLUMNS))})"
)


def _sqlite_write(
    path: str, rows: list[tuple[Any, ...]], texts: list[str], cells: list[tuple[Any, ...]], lo: int
) -> None:
    conn = sqlite3.connect(path, timeout=3600, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(SQLITE_INSERT_REQUEST, rows)
        conn.executemany(
            "INSERT INTO request_properties (tenant, request_id, created_at, name, value)"
            " VALUES (?, ?, ?, ?, ?)",
            (p for r in rows for p in sql.property_rows(r)),
        )
        # docids from the rows' positions: unique across the pool's processes
        conn.executemany(
            "INSERT INTO request_search (docid, tenant, id) VALUES (?, ?, ?)",
            ((lo + k + 1, r[0], r[1]) for k, r in enumerate(rows)),
        )
        conn.executemany(
            "INSERT INTO request_text (rowid, text) VALUES (?, ?)",
            ((lo + k + 1, t) for k, t in enumerate(texts)),
        )
        conn.executemany(_ROLLUP_INSERT, cells)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _day(
    job: tuple[str, str, int, int, int, int, int, bool],
) -> tuple[int, dict[rollup.RollupKey, rollup.Cell]]:
    kind, target, lo, hi, start, span, total, high = job
    pairs = list(_rows(lo, hi, start, span, total, high))
    rows = [p[0] for p in pairs]
    texts = [p[1] for p in pairs]
    cells, months = _cells(rows, props_for(high))
    if kind == "pg":
        asyncio.run(_pg_write(target, rows, texts, cells))
    else:
        _sqlite_write(target, rows, texts, cells, lo)
    return len(rows), months


# -- the secondary indexes ------------------------------------------------------------------------

_TABLES = ("requests", "request_properties", "request_keys", "rollups")


async def _pg_drop_indexes(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetch(
            "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x"
            " JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
            " WHERE t.relname = ANY($1::text[]) AND NOT x.indisunique AND NOT x.indisprimary",
            list(_TABLES),
        )
        for name, _ in found:
            await conn.execute(f'DROP INDEX "{name}"')
        return [d.replace(" ON ONLY ", " ON ") for _, d in found]
    finally:
        await conn.close()


async def _pg_build_indexes(url: str, defs: list[str], say: Callable[[str], None]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute("SET max_parallel_maintenance_workers = 2")
        for d in defs:
            t0 = time.perf_counter()
            await conn.execute(d)
            say(f"  built {d.split(' ON ')[0].split()[-1]} ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        await conn.execute("VACUUM ANALYZE")
        say(f"  VACUUM ANALYZE ({time.perf_counter() - t0:.1f} s)")
    finally:
        await conn.close()


def _sqlite_drop_indexes(path: str) -> list[str]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        marks = ", ".join("?" * len(_TABLES))
        found = conn.execute(
            "SELECT name, sql FROM sqlite_master"
            f" WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN ({marks})",
            _TABLES,
        ).fetchall()
        for name, _ in found:
            conn.execute(f'DROP INDEX "{name}"')
        return [d for _, d in found]
    finally:
        conn.close()


def _sqlite_journal(path: str, mode: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA journal_mode = {mode}")
    finally:
        conn.close()


def _sqlite_build_indexes(path: str, defs: list[str], say: Callable[[str], None]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size = -1048576")
        for d in defs:
            t0 = time.perf_counter()
            conn.execute(d)
            say(f"  built {d.split(' ON ')[0].split()[-1]} ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        conn.execute("ANALYZE")
        conn.execute("PRAGMA journal_mode = WAL")  # the store's own mode again
        say(f"  ANALYZE ({time.perf_counter() - t0:.1f} s)")
    finally:
        conn.close()


# -- the load -------------------------------------------------------------------------------------


def months_between(lo: datetime, hi: datetime) -> set[tuple[int, int]]:
    out, d = set(), lo
    while d <= hi + timedelta(days=32):
        out.add((d.year, d.month))
        d += timedelta(days=27)
    return out


async def load(
    kind: str,
    target: str,
    rows: int,
    days: int,
    procs: int = 2,
    say: Callable[[str], None] = print,
    high: bool = False,
) -> float:
    """Load `rows` rows over the last `days` days into an empty database; returns the seconds.
    `high`: with a property of a value per request and 5,000 models (`HIGH_PROPS`)."""
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    # the store's own migrations, on an empty database: every dimension is rolled up from the start
    if kind == "pg":
        pg = PostgresStore(target, rollup_properties=props_for(high))
        await pg.connect()
        await pg._ensure_partitions(months_between(now - timedelta(days=days + 1), now))
        await pg.close()
        defs = await _pg_drop_indexes(target)
    else:
        lite = SQLiteStore(target, rollup_properties=props_for(high))
        await lite.connect()
        await lite.close()
        defs = _sqlite_drop_indexes(target)
        # A rollback journal while the pool writes: with two processes appending in turn, WAL
        # checkpoints never catch up, and the WAL grew past the disk's 37 GB at 5.6M rows.
        _sqlite_journal(target, "DELETE")
    jobs = [
        (kind, target, lo, hi, start, span, rows, high)
        for lo, hi, start, span in day_jobs(rows, days, to_micros(now))
    ]
    months: dict[rollup.RollupKey, rollup.Cell] = {}
    done = 0
    ctx = multiprocessing.get_context("spawn")  # no inherited event loop or connections
    with ctx.Pool(procs) as pool:
        for n, cells in pool.imap_unordered(_day, jobs):
            done += n
            for k, c in cells.items():
                if k in months:
                    months[k].merge(c)
                else:
                    months[k] = c
            say(f"  {done:>10,} / {rows:,} rows  ({time.perf_counter() - t0:6.1f} s)")
    month_rows = [c.row(k) for k, c in months.items()]
    if kind == "pg":
        conn = await asyncpg.connect(target)
        try:
            await conn.copy_records_to_table("rollups", records=month_rows, columns=rollup.COLUMNS)
        finally:
            await conn.close()
        say(f"  rows in {time.perf_counter() - t0:.1f} s; building {len(defs)} indexes")
        await _pg_build_indexes(target, defs, say)
    else:
        conn2 = sqlite3.connect(target, isolation_level=None)
        try:
            conn2.execute("BEGIN")
            conn2.executemany(_ROLLUP_INSERT, month_rows)
            conn2.execute("COMMIT")
        finally:
            conn2.close()
        say(f"  rows in {time.perf_counter() - t0:.1f} s; building {len(defs)} indexes")
        _sqlite_build_indexes(target, defs, say)
    return time.perf_counter() - t0
