"""Issue 7 item 19: replaying a large spool does no queue work on the gateway's event loop.

The gateway's replayer gets a queue factory: it opens its own queue connection on a thread of
its own and publishes there, so the encoding and IO of 20k records never run between the
proxy's requests. Checked structurally (every publish of the replay runs on another loop and
thread) on the real SQLite queue and, when available, Redis; the lag figures are in
bench/replay_lag.py.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from llmtap.gateway.sinks import SpoolReplayer, SpoolSink
from llmtap.gateway.spool import DiskSpool
from llmtap.queue.base import Message, Queue
from llmtap.queue.sqlite import SQLiteQueue
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(300)

RECORDS = 5_000


def _recording(cls: type[Any], seen: list[tuple[int, int, int]]) -> type[Any]:
    class Recording(cls):  # type: ignore[misc, valid-type]
        async def publish(self, messages: Sequence[Message]) -> None:
            seen.append((threading.get_ident(), id(asyncio.get_running_loop()), len(messages)))
            await super().publish(messages)

    return Recording


def _backends() -> list[Any]:
    params: list[Any] = ["sqlite"]
    if os.environ.get("LLMTAP_TEST_REDIS_URL"):
        params.append("redis")
    else:
        params.append(
            pytest.param("redis", marks=pytest.mark.skip(reason="LLMTAP_TEST_REDIS_URL is not set"))
        )
    return params


@pytest.mark.parametrize("backend", _backends())
async def test_spool_replay_runs_off_the_gateways_event_loop(tmp_path: Path, backend: str) -> None:
    seen: list[tuple[int, int, int]] = []
    if backend == "sqlite":
        make: Any = lambda: _recording(SQLiteQueue, seen)(str(tmp_path / "queue.db"), partitions=6)  # noqa: E731
    else:
        from llmtap.queue.redis import RedisQueue

        url = f"{os.environ['LLMTAP_TEST_REDIS_URL']}?prefix=replay{uuid.uuid4().hex[:8]}"
        make = lambda: _recording(RedisQueue, seen)(url, 6, "llmtap-workers")  # noqa: E731
    spool = DiskSpool(tmp_path / "spool", 1 << 32)
    sink = SpoolSink(spool)
    for start in range(0, RECORDS, 500):
        await sink.send([make_record(i) for i in range(start, start + 500)])
    shared: Queue = make()  # the gateway's own connection, on its loop
    await shared.connect("producer")
    replayer = SpoolReplayer(spool, shared, queue_factory=make)

    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:  # what a request on the gateway's loop would wait
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    tick = asyncio.create_task(ticker())
    try:
        n = await replayer.replay_once()
    finally:
        stop.set()
        await tick
        await replayer.stop()
    try:
        assert n == RECORDS and not spool.pending()
        status = await shared.status()
        assert status.lag == RECORDS  # all of them in the queue, once
    finally:
        await shared.close()
    main = (threading.get_ident(), id(asyncio.get_running_loop()))
    assert seen and sum(c for _, _, c in seen) == RECORDS
    assert all((t, loop) != main and t != main[0] for t, loop, _ in seen)  # none on the proxy's loop
    assert max(c for _, _, c in seen) <= 100  # small steps even there
    lags.sort()
    p50, worst = lags[len(lags) // 2] * 1000, lags[-1] * 1000
    print(f"{backend}: loop lag during replay p50 {p50:.2f} ms, max {worst:.2f} ms")
