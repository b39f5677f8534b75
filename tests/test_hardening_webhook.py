"""Issue 7 item 7: a webhook receiver that is down or hangs never holds back storing.

A real worker (SQLite queue, SQLite store, file bodies) and a real deliverer with
`LLMTAP_WEBHOOK_URL` pointing at a port nobody listens on, or at a receiver that accepts and
never answers: every record published before and after is stored, promptly, and every
undelivered webhook waits in the outbox (pending, never silent, never dropped), not in the
worker's batch loop (issue 13 replaced the in-chain handler with the outbox).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from llmtap.config import Settings
from llmtap.queue.base import Message
from llmtap.queue.sqlite import SQLiteQueue
from llmtap.record import encode
from llmtap.store.base import Store
from llmtap.webhooks.deliverer import DelivererService
from llmtap.webhooks.outbox import new_secret
from llmtap.worker import WorkerService
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(180)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens here once closed


@pytest.fixture
async def hanging_url() -> AsyncIterator[str]:
    """A receiver that takes the request and never answers (until teardown)."""
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hook"
    release.set()
    await runner.cleanup()


async def _stored(store: Store, ids: list[str]) -> set[str]:
    return {i for i in ids if await store.get_request("acme", i) is not None}


async def _wait_stored(store: Store, ids: list[str], deadline: float) -> set[str]:
    got: set[str] = set()
    while time.monotonic() < deadline:
        got = await _stored(store, ids)
        if len(got) == len(ids):
            break
        await asyncio.sleep(0.1)
    return got


@pytest.mark.parametrize("receiver", ["unreachable", "hanging"])
async def test_a_down_or_hanging_webhook_receiver_never_stalls_storing(
    tmp_path: Path, receiver: str, hanging_url: str
) -> None:
    url = f"http://127.0.0.1:{_dead_port()}/hook" if receiver == "unreachable" else hanging_url
    settings = Settings(
        data_dir=tmp_path, webhook_url=url, webhook_secret=new_secret(), webhook_allow_private=True,
        webhook_timeout_s=3, default_tenant="acme", worker_batch_size=20, shutdown_timeout=10,
    )  # fmt: skip
    producer = SQLiteQueue(str(tmp_path / "queue.db"), partitions=settings.partitions)
    await producer.connect("producer")
    worker = WorkerService(settings)
    deliverer = DelivererService(settings)
    await worker.start()
    await deliverer.start()
    try:
        first = [make_record(i) for i in range(60)]
        await producer.publish([Message(r.id, encode(r)) for r in first])
        assert worker.store is not None
        got = await _wait_stored(worker.store, [r.id for r in first], time.monotonic() + 60)
        assert len(got) == len(first)
        # Sent afterwards, while deliveries of the first wave are failing or hanging: stored
        # promptly too (before issue 7, the worker retried the first batch forever).
        later = [make_record(i) for i in range(60, 120)]
        await producer.publish([Message(r.id, encode(r)) for r in later])
        got = await _wait_stored(worker.store, [r.id for r in later], time.monotonic() + 60)
        assert len(got) == len(later)
        status = await producer.status()
        assert status.lag == 0 and status.dead_letters == 0  # acked once stored, nothing dead-lettered
        # Every record has its delivery waiting in the outbox, none delivered, none lost.
        db = worker.store.webhooks()
        log = await db.list_deliveries("acme", limit=1000)
        assert sorted(d["subject"] for d in log) == sorted(r.id for r in first + later)
        assert all(d["status"] == "pending" for d in log)
        # The attempts are logged with their error (a timeout's said only "TimeoutError: ").
        says = "ClientConnectorError" if receiver == "unreachable" else "no answer within 3"
        deadline = time.monotonic() + 60
        while not any(says in (d["last_error"] or "") for d in await db.list_deliveries("acme", limit=1000)):
            assert time.monotonic() < deadline, "no failed attempt was logged"
            await asyncio.sleep(0.1)
    finally:
        t0 = time.monotonic()
        await deliverer.stop()
        await worker.stop()
        stop_seconds = time.monotonic() - t0
        await producer.close()
    assert stop_seconds < settings.shutdown_timeout  # a pending webhook backlog does not hold up stop
