"""Event-loop lag of the gateway while its spool is replayed into a queue (issue 7 item 19).

    .venv/bin/python bench/replay_lag.py [--records 20000] [--backend redis|sqlite|kafka]

Spools `--records` real encoded records (~1.5 KB each) with the gateway's `SpoolSink`, then
runs `SpoolReplayer.replay_once` into the queue while a ticker on the same loop measures how
late each 1 ms sleep wakes up (the lag every request handled by the gateway would see).
Prints records/s and lag p50/p99/max. Redis needs LLMTAP_TEST_REDIS_URL, Kafka
LLMTAP_TEST_KAFKA_BOOTSTRAP (scripts/services.sh env).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from llmtap.gateway.sinks import SpoolReplayer, SpoolSink  # noqa: E402
from llmtap.gateway.spool import DiskSpool  # noqa: E402
from llmtap.queue.base import Queue  # noqa: E402
from worker_helpers import make_record  # noqa: E402


def open_backend(backend: str, tmp: Path) -> Queue:
    name = f"replay{uuid.uuid4().hex[:8]}"
    if backend == "sqlite":
        from llmtap.queue.sqlite import SQLiteQueue

        return SQLiteQueue(str(tmp / "queue.db"), partitions=6)
    if backend == "redis":
        from llmtap.queue.redis import RedisQueue

        return RedisQueue(f"{os.environ['LLMTAP_TEST_REDIS_URL']}?prefix={name}", 6, "bench")
    from llmtap.queue.kafka import KafkaQueue

    return KafkaQueue(f"kafka://{os.environ['LLMTAP_TEST_KAFKA_BOOTSTRAP']}/{name}", 6, "bench")


def _same(backend: str, name: str, tmp: Path) -> Queue:
    if backend == "redis":
        from llmtap.queue.redis import RedisQueue

        return RedisQueue(f"{os.environ['LLMTAP_TEST_REDIS_URL']}?prefix={name}", 6, "bench")
    from llmtap.queue.kafka import KafkaQueue

    return KafkaQueue(f"kafka://{os.environ['LLMTAP_TEST_KAFKA_BOOTSTRAP']}/{name}", 6, "bench")


async def measure(backend: str, records: int, mode: str = "thread") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        spool = DiskSpool(tmp / "spool", 1 << 34)
        sink = SpoolSink(spool)
        pad = "x" * 1000  # ~1.5 KB encoded, like a small chat completion's metadata + body
        for start in range(0, records, 500):
            await sink.send([make_record(i, user_id=pad) for i in range(start, min(records, start + 500))])
        spool.close()
        queue = open_backend(backend, tmp)
        await queue.connect("producer")
        # "thread": as the gateway runs it (its own queue connection on its own thread);
        # "loop": on the caller's loop with the shared queue, paced in chunks.
        factory = (lambda: open_backend(backend, tmp)) if mode == "thread" else None
        if backend != "sqlite" and factory is not None:
            name = queue.prefix if backend == "redis" else queue.topic  # type: ignore[attr-defined]
            factory = lambda: _same(backend, name, tmp)  # noqa: E731
        replayer = SpoolReplayer(spool, queue, queue_factory=factory)
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(2.0)  # the idle baseline: what the (shared, busy) machine adds alone
        idle = sorted(lags)
        lags.clear()
        t0 = time.perf_counter()
        n = await replayer.replay_once()
        seconds = time.perf_counter() - t0
        stop.set()
        await tick
        await replayer.stop()
        await queue.close()
    lags.sort()
    return {
        "idle_p99_ms": idle[int(len(idle) * 0.99)] * 1000,
        "idle_max_ms": idle[-1] * 1000,
        "records": n,
        "seconds": seconds,
        "records_per_s": n / seconds,
        "lag_p50_ms": lags[len(lags) // 2] * 1000,
        "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1000,
        "lag_max_ms": lags[-1] * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--backend", default="redis")
    ap.add_argument("--mode", choices=("thread", "loop"), default="thread")
    args = ap.parse_args()
    r = asyncio.run(measure(args.backend, args.records, args.mode))
    print(
        f"{args.backend} ({args.mode}): replayed {r['records']} records in {r['seconds']:.2f}s "
        f"({r['records_per_s']:.0f}/s); loop lag p50 {r['lag_p50_ms']:.2f} ms, "
        f"p99 {r['lag_p99_ms']:.2f} ms, max {r['lag_max_ms']:.2f} ms "
        f"(idle baseline p99 {r['idle_p99_ms']:.2f} ms, max {r['idle_max_ms']:.2f} ms)"
    )


if __name__ == "__main__":
    main()
