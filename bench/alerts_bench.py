"""Alert evaluation cost: one rule's evaluation (its stats query, state updates and outbox rows)
on both stores, with the last hour holding N requests.

    .venv/bin/python bench/alerts_bench.py [--pg URL] [--records 100000] [--runs 5]

Records are written through `Store.write_batch` (rollups built as the worker builds them),
spread evenly over the hour before now. Each rule is evaluated `--runs` times at the same moment
(the first fires, the rest find it firing); the median is printed with the path that answered
(`rollups` or `raw`). --pg defaults to $LLMTAP_TEST_POSTGRES_URL (scripts/services.sh env).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_bench import TENANT, create_db, drop_db, make_records

from llmtap.alerts.db import AlertDB
from llmtap.alerts.evaluator import Evaluator, window_of
from llmtap.alerts.rules import make_rule
from llmtap.store.base import StatsQuery, Store
from llmtap.store.postgres import PostgresStore
from llmtap.store.query import from_micros, to_micros
from llmtap.store.sqlite import SQLiteStore
from llmtap.webhooks.db import new_endpoint_id
from llmtap.webhooks.outbox import ALERT_FIRING, ALERT_RESOLVED, Endpoint, new_secret

RULES: list[dict[str, Any]] = [
    {"metric": "error_rate", "op": "above", "threshold": 0.01, "window_s": 300},
    {"metric": "error_rate", "op": "above", "threshold": 0.01, "window_s": 3600, "group_by": "model"},
    {"metric": "tokens", "op": "above", "threshold": 1e6, "window_s": 86400},
    {"metric": "p95_latency_ms", "op": "above", "threshold": 3000, "window_s": 3600, "group_by": "user_id"},
    {"metric": "cost_usd", "op": "above", "threshold": 1, "window_s": 3600, "group_by": "property.feature"},
]


async def bench(store: Store, n: int, runs: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    records = make_records(n)
    for i, r in enumerate(records):  # evenly over the last hour
        shift = now - timedelta(seconds=3600 * (1 - i / n)) - r.started_at
        r.started_at += shift
        r.first_byte_at = None if r.first_byte_at is None else r.first_byte_at + shift
        r.ended_at += shift
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        await store.write_batch(records[i : i + 1000])
    print(f"  {n} records written in {time.perf_counter() - t0:.1f} s")
    hooks = store.webhooks()
    events = [ALERT_FIRING, ALERT_RESOLVED]
    await hooks.add_endpoint(Endpoint(new_endpoint_id(), TENANT, "http://x.example/h", new_secret(), events))
    ev = Evaluator(store, interval_s=60, resolve_after_s=300)
    at = to_micros(now)
    out = []
    for spec in RULES:
        rule = await AlertDB(hooks).add_rule(make_rule(TENANT, **spec), at)
        took = []
        for _ in range(runs):
            t = time.perf_counter()
            await ev.evaluate(rule, at)
            took.append((time.perf_counter() - t) * 1000)
        states = await AlertDB(hooks).states(TENANT, rule.id)
        since, until = window_of(rule, at)
        q = StatsQuery(since=from_micros(since), until=from_micros(until), group_by=rule.group_by)
        result = {"rule": rule.describe(), "median_ms": round(statistics.median(took), 1),
                  "source": (await store.stats(TENANT, q))["source"],
                  "firing_groups": sum(s["state"] == "firing" for s in states)}  # fmt: skip
        print(
            f"  {result['median_ms']:8.1f} ms  {result['rule']}  from {result['source']}"
            f" ({result['firing_groups']} firing)"
        )
        out.append(result)
    return out


async def main() -> None:
    logging.getLogger("llmtap.alerts").setLevel(logging.ERROR)  # one "alert firing" line per group
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg", default=os.environ.get("LLMTAP_TEST_POSTGRES_URL"))
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("sqlite")
        lite = SQLiteStore(Path(tmp) / "alerts.db")
        await lite.connect()
        try:
            results["sqlite"] = await bench(lite, args.records, args.runs)
        finally:
            await lite.close()
    if args.pg:
        print("postgresql")
        url = await create_db(args.pg)
        pg = PostgresStore(url)
        try:
            await pg.connect()
            results["postgresql"] = await bench(pg, args.records, args.runs)
        finally:
            await pg.close()
            await drop_db(args.pg, url)
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
