"""One row per message, or one pre-encoded blob per batch: what the SQLite queue's layout costs.

    .venv/bin/python bench/queue_blob.py [--rounds 200]

Issue 15 asked whether handing the SQLite queue one blob per batch would cut the gateway's
publish. This measures the SQLite side alone, in one thread, on the queue's own settings (WAL,
`synchronous=FULL`, one transaction per batch): `executemany` of one row per message, as
`SQLiteQueue.publish` does, against one row holding the whole batch length-prefixed. Messages
are 1.4 KB, the size of a chat record. CPU (thread time) and wall per message, for batches of
20, 100 and 500 (a 20 ms linger at 1k, 5k and 25k requests/s).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time

VALUE = os.urandom(700).hex().encode()


def table(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, key TEXT NOT NULL, value BLOB NOT NULL)")
    return db


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200, help="commits per batch size and layout")
    rounds = ap.parse_args().rounds
    print(f"{rounds} commits per figure; us per message, CPU (wall)")
    with tempfile.TemporaryDirectory() as d:
        for size in (20, 100, 500):
            rows_db, blob_db = table(f"{d}/rows{size}"), table(f"{d}/blob{size}")
            cpu = {"rows": 0.0, "blob": 0.0}
            wall = {"rows": 0.0, "blob": 0.0}
            offset = 0
            for _ in range(rounds):
                rows = [(offset + i, "default", VALUE) for i in range(size)]
                c0, w0 = time.thread_time(), time.perf_counter()
                rows_db.execute("BEGIN IMMEDIATE")
                rows_db.executemany("INSERT INTO messages VALUES (?, ?, ?)", rows)
                rows_db.execute("COMMIT")
                cpu["rows"] += time.thread_time() - c0
                wall["rows"] += time.perf_counter() - w0
                c0, w0 = time.thread_time(), time.perf_counter()
                blob = b"".join(len(v).to_bytes(4, "little") + v for _, _, v in rows)
                blob_db.execute("BEGIN IMMEDIATE")
                blob_db.execute("INSERT INTO messages VALUES (?, ?, ?)", (offset, "default", blob))
                blob_db.execute("COMMIT")
                cpu["blob"] += time.thread_time() - c0
                wall["blob"] += time.perf_counter() - w0
                offset += size
            n = rounds * size
            shown = "  ".join(f"{k} {cpu[k] / n * 1e6:5.1f} ({wall[k] / n * 1e6:5.1f})" for k in cpu)
            print(f"batch {size:3d}: {shown}")
            rows_db.close()
            blob_db.close()


if __name__ == "__main__":
    main()
