"""What the SQLite queue's page size costs per message: publish, and consume + ack.

    .venv/bin/python bench/queue_pages.py [--pages 4096,16384,32768] [--sizes 1000,2500,3200,8000]
                                          [--batch 94] [-n 9400] [--rounds 2] [SRC]

The real `SQLiteQueue` (of SRC, default this checkout's src), its file created with each page
size (`PAGE_SIZE` patched before the file exists): a producer publishes `-n` messages of each
size in batches of `--batch` (94: a 20 ms linger at ~4.7k requests/s; 2: light traffic), then
a consumer fetches and acknowledges them 500 at a time. CPU is the process's (every thread:
the queue runs on its own), per message, median over `--rounds` fresh files. A chat record's
message is ~2.5 KB, a 20-chunk stream's ~3.2 KB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--pages", default="4096,16384,32768", help="page sizes of the new file")
ap.add_argument("--sizes", default="1000,2500,3200,8000", help="message sizes in bytes")
ap.add_argument("--batch", type=int, default=94, help="messages per publish")
ap.add_argument("-n", type=int, default=9400, help="messages per figure")
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parent.parent / "src"))
args = ap.parse_args()
sys.path.insert(0, args.src)

from llmtap.queue import sqlite as sq  # noqa: E402
from llmtap.queue.base import Message  # noqa: E402


async def once(page: int, size: int) -> tuple[float, float]:
    sq.PAGE_SIZE = page  # type: ignore[attr-defined,unused-ignore]  # absent before the change
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "queue.db")
        value = os.urandom(size // 2) + b"x" * (size - size // 2)  # half compressible, as records
        msgs = [Message(f"tenant{i % 3}", value) for i in range(args.n)]
        producer = sq.SQLiteQueue(path, partitions=8)
        await producer.connect("producer")
        t0 = time.process_time()
        for i in range(0, args.n, args.batch):
            await producer.publish(msgs[i : i + args.batch])
        t1 = time.process_time()
        consumer = sq.SQLiteQueue(path, partitions=8)
        await consumer.connect("consumer")
        got = 0
        t2 = time.process_time()
        while got < args.n:
            batch = await consumer.consume(500, 1.0)
            await consumer.ack(batch)
            got += len(batch)
        t3 = time.process_time()
        await consumer.close()
        await producer.close()
    return 1e6 * (t1 - t0) / args.n, 1e6 * (t3 - t2) / args.n


async def main() -> None:
    pages = [int(x) for x in args.pages.split(",")]
    print(f"{args.src}: {args.n} messages a figure, batches of {args.batch}, median of {args.rounds}")
    print(f"{'size':>6} {'page':>6} {'publish us/msg':>15} {'consume+ack us/msg':>19}")
    for size in (int(x) for x in args.sizes.split(",")):
        for page in pages:
            runs = [await once(page, size) for _ in range(args.rounds)]
            pub = statistics.median(r[0] for r in runs)
            con = statistics.median(r[1] for r in runs)
            print(f"{size:>6} {page:>6} {pub:>15.1f} {con:>19.1f}", flush=True)


asyncio.run(main())
