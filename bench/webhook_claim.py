"""How long one webhook claim takes against a recovered endpoint's backlog (SQLite store).

A receiver back from an outage has its whole backlog due at one `next_at`; each claim (every
50 ms while there is work) runs inside the store's write lock, so its time is time the worker
cannot store. Compare two trees with PYTHONPATH:

    .venv/bin/python bench/webhook_claim.py --rows 300000
    PYTHONPATH=/tmp/old/src .venv/bin/python bench/webhook_claim.py --rows 300000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from llmtap.store.sqlite import SQLiteStore
from llmtap.webhooks.db import _ALL_DUE, new_endpoint_id, now_us
from llmtap.webhooks.outbox import Endpoint, new_secret


async def main(rows: int, claims: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "store.db")
        await store.connect()
        try:
            db = store.webhooks()
            ep = Endpoint(new_endpoint_id(), "acme", "http://127.0.0.1:9/", new_secret())
            await db.add_endpoint(ep)
            now = now_us()
            t = time.perf_counter()
            async with db.tx() as c:
                await c.execute(
                    "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < $3)"
                    " INSERT INTO webhook_deliveries (id, endpoint_id, tenant, event, subject, payload,"
                    " status, attempts, next_at, created_at) SELECT 'msg_' || hex(randomblob(16)), $1,"
                    " 'acme', 'request.logged', 'r' || i, '{}', 'pending', 0, $2, $2 - i FROM k",
                    ep.id, now, rows,
                )  # fmt: skip
            print(f"backlog: {rows} deliveries due at one next_at ({time.perf_counter() - t:.1f} s to build)")
            t = time.perf_counter()
            async with db.tx() as c:  # what a probe's success does: the whole backlog due now
                await c.execute(_ALL_DUE, ep.id, now)
            print(f"the backlog made due at once (one UPDATE): {(time.perf_counter() - t) * 1000:.0f} ms")
            times = []
            for _ in range(claims):
                t = time.perf_counter()
                got = await db.claim({}, 8, 30.0)
                times.append((time.perf_counter() - t) * 1000)
                assert len(got) == 8
            med, top = statistics.median(times), max(times)
            print(f"claim of 8: median {med:.2f} ms, max {top:.2f} ms ({claims} claims)")
        finally:
            await store.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--claims", type=int, default=30)
    a = ap.parse_args()
    asyncio.run(main(a.rows, a.claims))
