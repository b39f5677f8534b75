"""Write cost and lookup time of the SQLite search index (FTS5 trigram) against `automerge`.

    .venv/bin/python bench/search_index.py                      # 1M documents, automerge 4, 8, 16
    N=200000 AM=4,16 .venv/bin/python bench/search_index.py     # shorter
    WORDS=4200 N=4000 AM=16 .venv/bin/python bench/search_index.py  # 32 KiB documents

The worker adds one batch of documents per transaction, so the index grows by one segment per
batch and FTS5 merges segments as it goes (`automerge` of them per level). This builds an index
the same way: N answer-sized documents (150 words of `scale_data`'s Zipf vocabulary, ~900 bytes,
every one different: the cost is per distinct trigram of a document), batches of 500, the table
as migration 6 creates it. It prints the CPU per document of the inserts and commits (all of
them, and the last tenth), the index's pages, and the median of 5 lookups of `scale_data`'s
6-character frequent / mid / rare strings and one found nowhere (number of documents found in
brackets). A lookup as the store runs it for a rare string: every matching rowid via GLOB.
"""

from __future__ import annotations

import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scale_data import _CUM, VOCAB, search_terms

N = int(os.environ.get("N", "1000000"))
AM = [int(x) for x in os.environ.get("AM", "4,8,16").split(",")]
BATCH = 500
WORDS = int(os.environ.get("WORDS", "150"))


def documents(seed: int) -> Iterator[str]:
    r = random.Random(seed)
    while True:
        yield " ".join(r.choices(VOCAB, cum_weights=_CUM, k=WORDS))


def run(automerge: int, d: str) -> str:
    path = os.path.join(d, f"am{automerge}.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(
        "CREATE VIRTUAL TABLE request_text USING fts5(text,"
        " tokenize = 'trigram case_sensitive 1', detail = none)"
    )
    db.execute("INSERT INTO request_text (request_text, rank) VALUES ('automerge', ?)", (automerge,))
    docs, top, cpu = documents(1), 0, []
    while top < N:
        batch = [(top + i, next(docs)) for i in range(1, BATCH + 1)]
        t0 = time.process_time()
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO request_text (rowid, text) VALUES (?, ?)", batch)
        db.execute("COMMIT")
        cpu.append(time.process_time() - t0)
        top += BATCH
        if len(cpu) % 200 == 0:
            print(f"  automerge {automerge}: {top:,} documents", file=sys.stderr, flush=True)
    tenth = max(len(cpu) // 10, 1)
    pages = db.execute("SELECT count(*) FROM request_text_data").fetchone()[0]
    line = (
        f"automerge {automerge:2}: write {sum(cpu) / top * 1e6:.1f} us/doc"
        f" (last tenth {sum(cpu[-tenth:]) / (tenth * BATCH) * 1e6:.1f}), {pages:,} index pages;"
    )
    for label, q in search_terms().items():
        times, found = [], 0
        for _ in range(5):
            t0 = time.perf_counter()
            rows = db.execute("SELECT rowid FROM request_text WHERE text GLOB ?", (f"*{q}*",))
            found = len(rows.fetchall())
            times.append(time.perf_counter() - t0)
        line += f" {label.split()[0]} ({found:,}) {statistics.median(times) * 1000:.0f} ms"
    db.close()
    os.remove(path)
    return line


def main() -> None:
    sample = documents(2)
    size = sum(len(next(sample)) for _ in range(20)) / 20 / 1024
    print(f"{N:,} documents of {WORDS} words (~{size:.1f} KiB) in batches of {BATCH};", end=" ")
    print(f"SQLite {sqlite3.sqlite_version}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        for am in AM:
            print(run(am, d), flush=True)


if __name__ == "__main__":
    main()
