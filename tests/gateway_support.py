"""Test doubles for the gateway tests: an in-memory queue that can be switched off, and a
body store on a temp dir. Both are real implementations of the interfaces (they count, store
and fail for real), small enough to read in one go."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from llmtap.bodies.base import BodyStore
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable, TransientError
from llmtap.gateway.app import GatewayService
from llmtap.gateway.publisher import Sink
from llmtap.queue.base import DeadLetter, Delivery, Message, Queue, QueueStatus, Role
from llmtap.record import LogRecord, decode


class MemoryQueue(Queue):
    """Keeps what was published; `down = True` makes `publish` raise `BackendUnavailable`;
    `gate`, while not set, holds every publish (`holding` counts those waiting)."""

    description = "memory"

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.down = False
        self.publish_calls = 0
        self.refused = 0
        self.closed = False
        self.gate: asyncio.Event | None = None
        self.holding = 0

    async def connect(self, role: Role) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    async def publish(self, messages: Sequence[Message]) -> None:
        self.publish_calls += 1
        await asyncio.sleep(0)  # a real backend yields while it makes the batch durable
        if self.gate is not None:
            self.holding += 1
            try:
                await self.gate.wait()
            finally:
                self.holding -= 1
        if self.down:
            self.refused += 1
            raise BackendUnavailable("memory queue is down")
        self.messages.extend(messages)

    def records(self) -> list[LogRecord]:
        return [decode(m.value) for m in self.messages]

    async def consume(self, max_messages: int, timeout: float) -> list[Delivery]:
        raise NotImplementedError

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        raise NotImplementedError

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        raise NotImplementedError

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return []

    async def replay_dead_letters(self, ids: Sequence[str] | None = None, *, publish: bool = True) -> int:
        return 0

    async def status(self) -> QueueStatus:
        return QueueStatus(backend="memory")


class DirBodyStore(BodyStore):
    """Bodies as files under a directory; `down = True` makes writes fail like an outage."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.down = False
        self.puts = 0

    async def connect(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        pass

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[str]:
        if self.down:
            raise TransientError("body store is down")
        for key, data in items:
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self.puts += 1
        return [key for key, _ in items]

    async def get(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.exists() else None

    async def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                (self.root / key).unlink()


def dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_for(upstream_port: int, tmp: Path, **over: Any) -> Settings:
    base: dict[str, Any] = {
        # the fallback ingest endpoint: nothing there (never some other test's server)
        "ingest_url": f"http://127.0.0.1:{dead_port()}",
        "host": "127.0.0.1",
        "gateway_port": 0,
        "data_dir": tmp,
        "openai_base_url": f"http://127.0.0.1:{upstream_port}",
        "anthropic_base_url": f"http://127.0.0.1:{upstream_port}",
        "publish_linger_ms": 1.0,
        "shutdown_timeout": 5.0,
    }
    base.update(over)
    return Settings(**base)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings,
    queue: MemoryQueue | None = None,
    bodies: BodyStore | None = None,
    sinks: list[Sink] | None = None,
) -> AsyncIterator[tuple[GatewayService, str]]:
    svc = GatewayService(settings, queue=queue or MemoryQueue(), bodies=bodies, sinks=sinks)
    await svc.start()
    try:
        yield svc, f"http://127.0.0.1:{svc.port}"
    finally:
        await svc.stop()


async def tiny_upstream(handler: Any, **server: Any) -> tuple[web.AppRunner, int]:
    """An upstream that answers every path and method with `handler`; (runner, port).
    `server`: aiohttp's server options (`auto_decompress=False` to read bodies as sent)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, **server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def listing_upstream() -> tuple[web.AppRunner, int, list[str]]:
    """An upstream answering `{}` to everything, and the paths it was asked, in order."""
    reached: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.json_response({})

    runner, port = await tiny_upstream(handler)
    return runner, port, reached


async def wait_for(cond: Any, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def published(svc: Any, q: MemoryQueue, n: int) -> list[LogRecord]:
    """The `n` records the gateway published (and no more)."""
    await wait_for(lambda: len(q.messages) >= n, timeout=30)
    await asyncio.sleep(0.05)  # and nothing more arrives
    recs = q.records()
    assert len(recs) == n, [r.path for r in recs]
    return recs


async def fake_requests(session: aiohttp.ClientSession, upstream: str) -> list[dict[str, Any]]:
    async with session.get(f"{upstream}/_fake/requests") as r:
        data: dict[str, Any] = await r.json()
    return list(data["requests"])
