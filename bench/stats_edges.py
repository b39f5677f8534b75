"""What a stats range's edge costs per row, against the raw path on the same rows (SQLite).

    .venv/bin/python bench/store_bench.py scale --store sqlite --rows 1000000 --keep   # once
    .venv/bin/python bench/stats_edges.py /tmp/llmtap-scale-1000000-....db [--hours 6] [--runs 15]

A range off the minute boundaries is answered from rollups inside and from raw rows in the
partial minute (hour, for a property) at each end (`rollup.plan`'s edges). This reads the last
`--hours` of the store's largest tenant once as one edge (`rollup.edge_reads` into
`rollup.Edges`, then `rollup.answer`) and once with `exact=true` (the raw path), for each
grouping, alternately, and prints the median CPU per row of both: an edge should cost about
what the raw path does.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmtap.store import rollup
from llmtap.store.base import StatsQuery
from llmtap.store.sqlite import DIALECT, SQLiteStore

PROPS = ("feature",)  # scale_data's rolled-up property


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", help="a SQLite store kept by store_bench.py scale --keep")
    ap.add_argument("--hours", type=float, default=6.0)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    conn = sqlite3.connect(args.db)
    tenant, newest = conn.execute(
        "SELECT tenant, max(created_at) FROM requests GROUP BY tenant ORDER BY count(*) DESC LIMIT 1"
    ).fetchone()
    a, b = newest - int(args.hours * 3_600_000_000) + 1, newest
    count = "SELECT count(*) FROM requests WHERE tenant = ? AND created_at >= ? AND created_at < ?"
    n = conn.execute(count, (tenant, a, b)).fetchone()[0]
    store = SQLiteStore(args.db, rollup_properties=PROPS)
    await store.connect()
    since, until = datetime.fromtimestamp(a / 1e6, UTC), datetime.fromtimestamp(b / 1e6, UTC)
    print(
        f"{n} rows of tenant {tenant!r}, the last {args.hours:g} h; CPU per row, median of {args.runs} runs"
    )
    try:
        for group_by in (None, "model", "property.feature"):
            for bucket in (None, "hour"):
                q = StatsQuery(since=since, until=until, group_by=group_by, bucket=bucket)  # type: ignore[arg-type]
                p = rollup.Plan(group_by, a, b, (), ((a, b),))  # the whole window as one edge
                exact = StatsQuery(since=since, until=until, group_by=group_by, bucket=bucket, exact=True)  # type: ignore[arg-type]
                edge_s, raw_s = [], []
                for _ in range(args.runs):  # alternating, so drifts of a shared machine hit both
                    t0 = time.process_time()
                    edges = rollup.Edges()
                    for kind, sql_text, params in rollup.edge_reads(DIALECT, tenant, q, p):
                        edges.add(DIALECT, q, kind, conn.execute(sql_text, params).fetchall())
                    got = rollup.answer(q, p, [], None, edges)
                    t1 = time.process_time()
                    want = await store.stats(tenant, exact)
                    edge_s.append(t1 - t0)
                    raw_s.append(time.process_time() - t1)
                assert got["overall"]["count"] == want["overall"]["count"] == n
                assert [g["key"] for g in got["groups"]] == [g["key"] for g in want["groups"]]
                edge_us, raw_us = (1e6 * statistics.median(t) / n for t in (edge_s, raw_s))
                print(
                    f"  group_by={group_by or '-':18} bucket={bucket or '-':5}"
                    f" as an edge {edge_us:6.2f} us/row, raw path {raw_us:6.2f} us/row"
                    f" ({edge_us / raw_us:.2f}x)"
                )
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
