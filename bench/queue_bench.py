"""Queue benchmark: publish throughput and end-to-end lag, for every backend that is available.

    .venv/bin/python bench/queue_bench.py [--backends sqlite,redis,kafka,sqs] [--seconds 10] [--json FILE]

For each backend (SQLite in a temp dir always; Redis with LLMTAP_TEST_REDIS_URL; Kafka with
LLMTAP_TEST_KAFKA_BOOTSTRAP; SQS, a FIFO queue, with LLMTAP_TEST_SQS_ENDPOINT — see
scripts/services.sh):

- publish: records/s from one process, batches of 500 records of ~1.5 KB, one batch awaited at
  a time (as the gateway's publisher does), on a fresh queue.
- lag: a publisher paced at `--rate` records/s (batches every 10 ms) and a consumer in another
  process that consumes, acks, and then measures publish → consumed+acked for every record;
  p50/p99/max over `--seconds`.

- for SQS also the server's own ceiling: a bare aiobotocore client sending the same records
  (SendMessageBatch of 10, 37 message groups, 16 requests in flight, no llmtap code) for as
  long as the publish run took, so llmtap's figure can be read against what the server allows.

Targets: >= 10,000 records/s publish per backend; lag p99 < 1 s at 1,000 records/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from llmtap.queue.base import Message, Queue

RECORD_BYTES = 1500


def build(backend: str, target: str, **kw: Any) -> Queue:
    if backend == "sqlite":
        from llmtap.queue.sqlite import SQLiteQueue

        return SQLiteQueue(target, 6, **kw)
    if backend == "redis":
        from llmtap.queue.redis import RedisQueue

        return RedisQueue(target, 6, "bench", **kw)
    if backend == "sqs":
        from llmtap.queue.sqs import SQSQueue

        return SQSQueue(target, 6, "bench", **kw)
    from llmtap.queue.kafka import KafkaQueue

    return KafkaQueue(target, 6, "bench", **kw)


def fresh_target(backend: str, tmp: Path) -> str:
    name = f"bench{uuid.uuid4().hex[:8]}"
    if backend == "sqlite":
        return str(tmp / f"{name}.db")
    if backend == "redis":
        url = os.environ["LLMTAP_TEST_REDIS_URL"]
        return f"{url}{'&' if '?' in url else '?'}prefix={name}"
    if backend == "sqs":
        return f"sqs://{name}.fifo?endpoint={os.environ['LLMTAP_TEST_SQS_ENDPOINT']}"
    return f"kafka://{os.environ['LLMTAP_TEST_KAFKA_BOOTSTRAP']}/{name}"


def payload(i: int, sent_at: float) -> bytes:
    """~1.5 KB of JSON like a log record: ids, numbers, and a compressed-body-like blob."""
    head = json.dumps({"v": 1, "id": str(uuid.UUID(int=i)), "t": sent_at, "model": "gpt-4o-mini"})
    blob = os.urandom((RECORD_BYTES - len(head)) * 3 // 8).hex()  # hex: incompressible-ish text
    return (head[:-1] + f', "body": "{blob}"}}').encode()[:RECORD_BYTES].ljust(RECORD_BYTES, b" ")


async def publish_throughput(backend: str, target: str, batches: int) -> float:
    q = build(backend, target)
    await q.connect("producer")
    try:
        pool = [Message(f"tenant-{i % 37}", payload(i, 0.0)) for i in range(500)]
        await q.publish(pool[:10])  # warm up: connections, metadata
        # Each batch names its records afresh: a queue that deduplicates (SQS FIFO) must not
        # take the repeated payloads for repeats.
        rounds = [[Message(m.key, m.value, f"{b}/{i}") for i, m in enumerate(pool)] for b in range(batches)]
        t0 = time.perf_counter()
        for batch in rounds:
            await q.publish(batch)
        return batches * 500 / (time.perf_counter() - t0)
    finally:
        await q.close()


async def drop_sqs(target: str) -> None:
    """Delete a bench SQS queue and its dead-letter queue: ElasticMQ slows down as messages
    pile up in its store, which would skew the runs after this one."""
    from aiobotocore.session import get_session

    name = target.removeprefix("sqs://").split("?", 1)[0]
    async with get_session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=os.environ["LLMTAP_TEST_SQS_ENDPOINT"]
    ) as c:
        for n in (name, name.replace(".fifo", "-dlq.fifo")):
            try:
                await c.delete_queue(QueueUrl=(await c.get_queue_url(QueueName=n))["QueueUrl"])
            except Exception as e:
                print(f"could not delete SQS queue {n}: {e}", file=sys.stderr)


async def sqs_bare_ceiling(seconds: float) -> float:
    """Records/s a bare aiobotocore client gets into a fresh FIFO queue on the same server."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    name = f"bench{uuid.uuid4().hex[:8]}.fifo"
    config = AioConfig(max_pool_connections=64, retries={"max_attempts": 2, "mode": "standard"})
    async with get_session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=os.environ["LLMTAP_TEST_SQS_ENDPOINT"], config=config
    ) as c:
        url = (await c.create_queue(QueueName=name, Attributes={"FifoQueue": "true"}))["QueueUrl"]
        bodies = [payload(i, 0.0).decode() for i in range(10)]
        sent = 0
        deadline = time.perf_counter() + seconds

        async def lane(lane_no: int) -> None:
            nonlocal sent
            n = 0
            while time.perf_counter() < deadline:
                entries = [
                    {
                        "Id": str(i),
                        "MessageBody": bodies[i],
                        "MessageGroupId": f"tenant-{(lane_no + i) % 37}",
                        "MessageDeduplicationId": f"{lane_no}-{n}-{i}",
                    }
                    for i in range(10)
                ]
                await c.send_message_batch(QueueUrl=url, Entries=entries)
                sent += 10
                n += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(lane(i) for i in range(16)))
        rate = sent / (time.perf_counter() - t0)
        await c.delete_queue(QueueUrl=url)
        return rate


def _consumer_proc(backend: str, target: str, expected: int, seconds: float, out: Any) -> None:
    async def run() -> list[float]:
        q = build(backend, target)
        await q.connect("consumer")
        lags: list[float] = []
        deadline = time.time() + seconds + 30
        try:
            while len(lags) < expected and time.time() < deadline:
                got = await q.consume(500, 0.1)
                if not got:
                    continue
                await q.ack(got)
                now = time.time()
                lags += [now - json.loads(d.value[: d.value.index(b', "body"')] + b"}")["t"] for d in got]
        finally:
            await q.close()
        return lags

    out.put(asyncio.run(run()))


async def end_to_end_lag(backend: str, target: str, rate: int, seconds: float) -> dict[str, float]:
    q = build(backend, target)
    await q.connect("producer")
    every = 0.01
    per_batch = max(1, int(rate * every))
    batches = int(seconds / every)
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    proc = ctx.Process(target=_consumer_proc, args=(backend, target, batches * per_batch, seconds, results))
    proc.start()
    try:
        await asyncio.sleep(3.0)  # let the consumer connect (and join its group)
        start = time.perf_counter()
        n = 0
        for b in range(batches):
            now = time.time()
            await q.publish(
                [Message(f"tenant-{(n + i) % 37}", payload(n + i, now)) for i in range(per_batch)]
            )
            n += per_batch
            delay = start + (b + 1) * every - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        achieved = n / (time.perf_counter() - start)
        lags: list[float] = await asyncio.to_thread(results.get, True, seconds + 60)
    finally:
        await q.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    lags.sort()
    return {
        "rate": achieved,
        "records": len(lags),
        "expected": n,
        "p50_ms": 1000 * statistics.median(lags),
        "p99_ms": 1000 * lags[int(len(lags) * 0.99) - 1],
        "max_ms": 1000 * lags[-1],
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="sqlite,redis,kafka,sqs")
    ap.add_argument("--batches", type=int, default=60, help="publish batches of 500 for the throughput run")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    wanted = a.backends.split(",")
    available = [
        b
        for b in wanted
        if b == "sqlite"
        or (b == "redis" and os.environ.get("LLMTAP_TEST_REDIS_URL"))
        or (b == "kafka" and os.environ.get("LLMTAP_TEST_KAFKA_BOOTSTRAP"))
        or (b == "sqs" and os.environ.get("LLMTAP_TEST_SQS_ENDPOINT"))
    ]
    if "sqs" in available:  # ElasticMQ checks no signature; botocore wants something to sign with
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "llmtap-bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "llmtap-bench")
    for b in set(wanted) - set(available):
        print(
            f"{b}: skipped (its LLMTAP_TEST_* variable is not set; see scripts/services.sh)", file=sys.stderr
        )
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in available:
            t0 = time.perf_counter()
            target = fresh_target(b, Path(tmp))
            tput = await publish_throughput(b, target, a.batches)
            if b == "sqs":
                await drop_sqs(target)
                bare = await sqs_bare_ceiling(max(3.0, time.perf_counter() - t0))
                report["sqs-bare-client"] = {"publish_records_per_s": round(bare)}
                print(
                    f"sqs     server ceiling: a bare aiobotocore client publishes {bare:9,.0f} records/s "
                    "(batches of 10, 16 requests in flight)",
                    flush=True,
                )
            target = fresh_target(b, Path(tmp))
            lag = await end_to_end_lag(b, target, a.rate, a.seconds)
            if b == "sqs":
                await drop_sqs(target)
            report[b] = {"publish_records_per_s": round(tput), **{k: round(v, 1) for k, v in lag.items()}}
            print(
                f"{b:7s} publish {tput:9,.0f} records/s (500 x {RECORD_BYTES} B batches) | "
                f"lag at {lag['rate']:,.0f}/s: p50 {lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms, "
                f"max {lag['max_ms']:.1f} ms ({lag['records']}/{lag['expected']} records)",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
