"""Issue 7, items 5 and 9, on every queue (SQLite, Redis, Kafka), with real worker processes.

Item 5: a record that kills the worker *process* each time it is handled (SIGKILL from a
test-only handler, `tests/kill_worker.py`) is dead-lettered after `worker_max_attempts`
deliveries with its reason, and every other record of the batches around it is stored. The
test is the supervisor: it restarts the worker each time it dies, and fails if the record
keeps coming back.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from llmtap.config import Settings
from llmtap.queue.base import DeadLetter, Message, open_queue
from llmtap.record import encode
from procs import Proc, llmtap_env
from queue_helpers import BACKENDS, skip_reason
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(600)

LAUNCHER = Path(__file__).with_name("kill_worker.py")
MAX_ATTEMPTS = 3


def _queue_url(backend: str) -> str:
    name = f"crash{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        return "sqlite"
    if backend == "redis":
        # a short session: the dead worker's partitions move to its successor within seconds
        redis = os.environ["LLMTAP_TEST_REDIS_URL"]
        return f"{redis}?prefix={name}&session_timeout_ms=2000&claim_idle_ms=300"
    return (
        f"kafka://{os.environ['LLMTAP_TEST_KAFKA_BOOTSTRAP']}/{name}"
        "?session_timeout_ms=6000&request_timeout_ms=3000"
    )


def _stored(data_dir: Path, ids: list[str]) -> int:
    path = data_dir / "store.db"
    if not path.exists():
        return 0
    marks = ",".join("?" * len(ids))
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            return int(db.execute(f"SELECT count(*) FROM requests WHERE id IN ({marks})", ids).fetchone()[0])
    except sqlite3.OperationalError:  # the worker is still creating the schema
        return 0


async def _publish(settings: Settings, batches: list[list[Any]]) -> None:
    q = open_queue(settings)
    await q.connect("producer")
    try:
        for batch in batches:
            await q.publish([Message(r.id, encode(r)) for r in batch])
    finally:
        await q.close()


async def _dead_letters(settings: Settings) -> list[DeadLetter]:
    q = open_queue(settings)
    await q.connect("producer")
    try:
        return await q.dead_letters(100)
    finally:
        await q.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_record_that_kills_the_worker_process_is_dead_lettered_after_n_deliveries(
    tmp_path: Path, backend: str
) -> None:
    if reason := skip_reason(backend):
        pytest.skip(reason)
    url = _queue_url(backend)
    kill_log = tmp_path / "kills.log"
    settings = Settings(data_dir=tmp_path, queue=url)
    batches = [[make_record(b * 100 + i) for i in range(40)] for b in range(3)]
    poison = make_record(999, model="kill-me")
    batches[1].insert(20, poison)  # in the middle of the second batch
    others = [r.id for batch in batches for r in batch if r.id != poison.id]
    asyncio.run(_publish(settings, batches))

    env = llmtap_env(tmp_path, queue=url, worker_max_attempts=MAX_ATTEMPTS, worker_batch_size=50)
    env["LLMTAP_TEST_KILL_LOG"] = str(kill_log)
    starts = 0
    proc: Proc | None = None
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline:
            if proc is None or not proc.alive():  # the supervisor: restart a dead worker
                assert starts <= MAX_ATTEMPTS + 1, (
                    f"worker started {starts} times: the record keeps killing it\n"
                    + (proc.output()[-3000:] if proc else "")
                )
                if proc is not None:
                    proc.stop()
                starts += 1
                proc = Proc([sys.executable, str(LAUNCHER)], env, tmp_path / f"worker{starts}.log")
            if _stored(tmp_path, others) == len(others) and proc.alive():
                break
            time.sleep(0.2)
        stored = _stored(tmp_path, others)
        assert stored == len(others), f"{stored} of {len(others)} stored after {starts} starts"
        dead: list[DeadLetter] = []
        while time.monotonic() < deadline:
            dead = asyncio.run(_dead_letters(settings))
            if dead:
                break
            time.sleep(0.5)
        assert proc is not None and proc.alive()
    finally:
        if proc is not None:
            proc.stop()
    kills = kill_log.read_text().split()
    assert kills == [poison.id] * MAX_ATTEMPTS  # handled exactly N times, each time fatal
    assert starts == MAX_ATTEMPTS + 1
    assert [d.key for d in dead] == [poison.id]
    assert dead[0].reason == (
        f"delivered {MAX_ATTEMPTS} times without ack: the worker died while processing it"
    )


# -- item 9: a re-run batch does not dead-letter twice --------------------------------------------


@pytest.mark.skipif(not os.environ.get("LLMTAP_TEST_REDIS_URL"), reason="needs Redis (services.sh up)")
async def test_a_broker_drop_at_the_final_ack_does_not_dead_letter_twice(tmp_path: Path) -> None:
    """Redis is really stopped right after the poison's dead letter, so the batch's final ack
    fails and the worker runs the batch again once Redis is back: still one dead letter."""
    from llmtap.errors import BackendUnavailable
    from llmtap.queue.redis import RedisQueue
    from llmtap.worker import WorkerService
    from procs import services

    events: list[str] = []
    restarts: list[asyncio.Task[None]] = []

    class DropAtAck(RedisQueue):
        async def dead_letter(self, delivery: Any, reason: str) -> None:
            await super().dead_letter(delivery, reason)
            events.append("dead_letter")
            if events.count("dead_letter") == 1:
                await asyncio.to_thread(services, "stop", "redis")  # the broker drops now

        async def ack(self, deliveries: Any) -> None:
            try:
                await super().ack(deliveries)
            except BackendUnavailable:
                events.append("ack failed")
                if not restarts:  # it is back a moment later
                    restarts.append(asyncio.create_task(asyncio.to_thread(services, "start", "redis")))
                raise
            events.append("ack")

    url = f"{os.environ['LLMTAP_TEST_REDIS_URL']}?prefix=dl{uuid.uuid4().hex[:8]}"
    settings = Settings(data_dir=tmp_path, queue=url)
    queue = DropAtAck(url, partitions=settings.partitions, group="llmtap-workers")
    records = [make_record(i) for i in range(10)]
    producer = open_queue(settings)
    await producer.connect("producer")
    await producer.publish([Message("poison", b"not a record"), *(Message(r.id, encode(r)) for r in records)])
    worker = WorkerService(settings, queue=queue)
    await worker.start()
    try:
        deadline = time.monotonic() + 120
        assert worker.store is not None
        while time.monotonic() < deadline:
            got = [await worker.store.get_request("acme", r.id) for r in records]
            if all(got) and "ack" in events:
                break
            await asyncio.sleep(0.2)
        assert all(got), events
        assert "ack failed" in events, events  # the drop really hit the final ack
        dead = await producer.dead_letters(100)
        assert [d.value for d in dead] == [b"not a record"], events
        assert events.count("dead_letter") == 1, events
    finally:
        await worker.stop()
        await producer.close()
        for t in restarts:
            await t
        await asyncio.to_thread(services, "start", "redis")
