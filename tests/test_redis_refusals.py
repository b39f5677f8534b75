"""Redis answering no while llmtap runs: an ACL without XACK, a read-only replica, a password
changed under the gateway. Each on a redis-server of the test's own (ACLs and REPLICAOF would
disturb the shared one), with the worker's `/healthz` read over HTTP and the log lines counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from llmtap.bodies.file import FileBodyStore
from llmtap.config import Settings
from llmtap.errors import ConfigError
from llmtap.gateway.sinks import SpoolReplayer, SpoolSink
from llmtap.gateway.spool import DiskSpool
from llmtap.handlers.bodies import BodyHandler
from llmtap.handlers.chain import OUTAGE_LOG_EVERY, Chain, RetryPolicy
from llmtap.handlers.cost import CostHandler
from llmtap.handlers.store import StoreHandler
from llmtap.queue.base import Message
from llmtap.queue.redis import RedisQueue
from llmtap.record import decode, encode
from llmtap.store.sqlite import SQLiteStore
from llmtap.worker import WorkerService
from llmtap.worker.probe import WorkerProbe
from worker_helpers import make_record

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    """A redis-server of this test's own, without persistence; its admin is the default user."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


async def until(pred: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = await pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def admin(redis_port: int) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis(port=redis_port)
    yield r
    await r.aclose()


async def rejected(admin: aioredis.Redis, command: str) -> int:
    """Calls of `command` Redis refused (an ACL) or failed (READONLY) so far."""
    stats: Any = await admin.info("commandstats")
    s = stats.get(f"cmdstat_{command}", {})
    return int(s.get("rejected_calls", 0)) + int(s.get("failed_calls", 0))


async def test_a_worker_whose_acks_redis_refuses_says_so_on_healthz_and_once_in_the_log(
    tmp_path: Path, redis_port: int, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An outside check: with XACK taken from the worker's ACL user its `/healthz` said ok for
    30 s (until the stall watchdog, with a generic reason), the log had a line per retry per
    batch in flight (17 in 12 s) saying "cannot reach Redis" for Redis's NOPERM, and the reason
    stayed the first one when the cause changed."""
    await admin.execute_command("ACL", "SETUSER", "w", "on", ">pw", "~*", "&*", "+@all", "-xack")
    url = f"redis://w:pw@127.0.0.1:{redis_port}/0"
    producer = RedisQueue(url, 4, "workers")
    await producer.connect("producer")
    n = 40
    await producer.publish([Message(key=f"t{i % 8}", value=encode(make_record(i))) for i in range(n)])
    await producer.close()

    port = free_port()
    settings = Settings(
        data_dir=tmp_path, worker_batch_size=10, partitions=4, worker_port=port, shutdown_timeout=5
    )
    store = SQLiteStore(str(tmp_path / "store.db"))
    bodies = FileBodyStore(str(tmp_path / "bodies"))
    await store.connect()
    await bodies.connect()
    chain = Chain([BodyHandler(bodies), CostHandler(), StoreHandler(store)])
    caplog.set_level(logging.WARNING, "llmtap.worker")
    worker = WorkerService(
        settings,
        queue=RedisQueue(url, 4, "workers"),
        store=store,
        bodies=bodies,
        chain=chain,
        policy=RetryPolicy(backoff_start=0.05, backoff_cap=0.2),  # many retries in a few seconds
    )
    probe = WorkerProbe(settings, worker)
    await worker.start()
    await probe.start()
    http = aiohttp.ClientSession()

    async def healthz() -> tuple[int, dict[str, Any]]:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status, await resp.json()

    async def reason_has(text: str) -> bool:
        status, body = await healthz()
        return status == 503 and text in body.get("reason", "")

    def retry_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "retrying the batch" in r.getMessage()]

    try:
        # Well before the 30 s stall watchdog: the reason is Redis's answer, not "unreachable".
        await until(lambda: reason_has("refuses the command (ACL)"), 25, "/healthz naming the refused XACK")
        _, body = await healthz()
        assert "xack" in body["reason"] and "cannot reach" not in body["reason"], body

        async def tried() -> int:
            return await rejected(admin, "xack") >= 2 * OUTAGE_LOG_EVERY + 2

        await until(tried, 60, "the acks retried")
        lines = retry_lines()
        tries = await rejected(admin, "xack")
        assert 1 <= len(lines) <= 1 + tries // OUTAGE_LOG_EVERY, (tries, lines)
        assert "refuses the command (ACL)" in lines[0] and "cannot reach" not in lines[0], lines[0]

        # Another cause (a replica now: NOPERM is checked first, so no try slips through).
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        await admin.execute_command("ACL", "SETUSER", "w", "+xack")
        await until(lambda: reason_has("is read-only (a replica?)"), 30, "/healthz naming the new cause")

        await admin.execute_command("REPLICAOF", "NO", "ONE")

        async def healthy() -> bool:
            status, body = await healthz()
            return status == 200 and body["processed"] >= n

        await until(healthy, 60, "the worker healthy with every record acked")
        back = [r.getMessage() for r in caplog.records if "go through again" in r.getMessage()]
        assert len(back) == 1, back
        assert [m for m in retry_lines() if "still" not in m] == lines[:1]  # one outage, one start
    finally:
        await http.close()
        await probe.stop()
        await worker.stop()
        await store.close()
        await bodies.close()


async def test_a_password_changed_under_the_gateway_is_one_outage_for_the_spool_replayer(
    tmp_path: Path, redis_port: int, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An outside check: a Redis password changed mid-run made the replayer log a ConfigError
    ("invalid username-password pair") about every 1.3 s until it was restored. Refused after
    start-up it is an outage: one line when it begins, one when it ends."""
    await admin.execute_command("ACL", "SETUSER", "g", "on", ">pw1", "~*", "&*", "+@all")
    url = f"redis://g:pw1@127.0.0.1:{redis_port}/0"
    queue = RedisQueue(url, 4, "workers")
    await queue.connect("producer")  # the gateway's start-up: the password was right
    spool = DiskSpool(tmp_path / "spool", 10 * 1024 * 1024)
    n = 20
    await SpoolSink(spool).send([make_record(i) for i in range(n)])
    await admin.execute_command("ACL", "SETUSER", "g", "resetpass", ">pw2")
    # At start-up the same refusal is a wrong setting, one sentence, as before.
    with pytest.raises(ConfigError, match="invalid setting LLMTAP_QUEUE"):
        await RedisQueue(url, 4, "workers").connect("producer")

    caplog.set_level(logging.WARNING, "llmtap.gateway")
    replayer = SpoolReplayer(spool, queue, interval=0.05, queue_factory=lambda: RedisQueue(url, 4, "workers"))
    replayer.start()

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "spool replay" in r.getMessage()]

    async def denied() -> int:  # refused logins (Redis 7.0 has no acl_access_denied_auth)
        entries: Any = await admin.acl_log(128)
        return sum(int(e["count"]) for e in entries if e["reason"] == "auth")

    try:
        first = await denied()

        async def refused_often() -> bool:
            return await denied() >= first + 10

        await until(refused_often, 60, "ten refused connections of the replayer")
        said = lines()
        assert len(said) == 1, said
        assert "waits for the queue" in said[0] and "pw1" not in said[0], said
        await admin.execute_command("ACL", "SETUSER", "g", "resetpass", ">pw1")

        async def replayed() -> bool:
            return replayer.replayed == n and not await asyncio.to_thread(spool.pending)

        await until(replayed, 60, "the spool replayed once the password is back")
        said = lines()
        assert len(said) == 2 and "takes the spooled records again" in said[1], said
    finally:
        await replayer.stop()
        await queue.close()
        spool.close()


async def test_a_record_past_proto_max_bulk_len_is_refused_alone_and_the_spool_goes_on(
    tmp_path: Path, redis_port: int, admin: aioredis.Redis
) -> None:
    """rev18a: a value past Redis's `proto-max-bulk-len` (1 MB on some managed plans) was taken
    for an outage: the spool waited on that record for ever, and on every record after it. It
    is refused as too large now: its bodies go to the body store and every record is queued."""
    from llmtap.errors import MessageRefused
    from llmtap.record import Body

    await admin.config_set("proto-max-bulk-len", "1mb")
    url = f"redis://127.0.0.1:{redis_port}/0"
    queue = RedisQueue(url, 4, "workers")
    await queue.connect("both")
    big = make_record(0, request_body=Body(content_type="application/json", size=1_500_000,
                                           data=b"x" * 1_500_000))  # fmt: skip
    try:
        with pytest.raises(MessageRefused, match="too large"):
            await queue.publish([Message(key="k", value=encode(big))])
        await queue.publish([Message(key="k", value=encode(make_record(1)))])  # it connects anew
        spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
        sink = SpoolSink(spool, partition_by="user_id")
        small = [make_record(i) for i in range(2, 8)]
        await sink.send([small[0], big, *small[1:]])
        await sink.close()
        bodies = FileBodyStore(str(tmp_path / "bodies"))
        await bodies.connect()
        replayer = SpoolReplayer(spool, queue, bodies=bodies, inline_limit=8_000_000)
        assert await replayer.replay_once() == 7
        assert not spool.pending() and replayer.dropped == 0
        got: dict[str, Any] = {}
        while len(got) < 8:
            ds = await queue.consume(100, timeout=2)
            assert ds, f"only {len(got)} of 8 records in the queue"
            got.update((r.id, r) for r in (decode(d.value) for d in ds))
            await queue.ack(ds)
        assert big.id in got and got[big.id].request_body.ref is not None  # in the body store
        # rev19: a "Protocol error" about anything else (a proxy in front) stays an outage
        from redis.exceptions import ResponseError

        from llmtap.errors import BackendUnavailable

        async def refuses(*_: Any, **__: Any) -> Any:
            raise ResponseError("Protocol error: unexpected command (proxy)")

        queue._scripts["publish"] = refuses
        with pytest.raises(BackendUnavailable):
            await queue.publish([Message(key="k", value=encode(make_record(9)))])
    finally:
        await queue.close()


async def test_a_batch_whose_write_redis_cuts_short_is_refused_as_too_large_not_an_outage(
    redis_port: int, admin: aioredis.Redis
) -> None:
    """rev20: past `proto-max-bulk-len` Redis closes the connection while a large value is still
    being written, so the client sees a reset or a broken pipe, not the refusal: 5 MB, 20 MB
    and a batch of 1.2 MB records were taken for an outage and held the spool for ever. Such a
    batch is refused now; with Redis gone, the same batch is still an outage."""
    from llmtap.errors import BackendUnavailable, MessageRefused
    from llmtap.record import Body

    def sized(i: int, n: int) -> Message:
        body = Body(content_type="application/json", size=n, data=b"x" * n)
        return Message(key=f"k{i}", value=encode(make_record(i, request_body=body)))

    await admin.config_set("proto-max-bulk-len", "1mb")
    queue = RedisQueue(f"redis://127.0.0.1:{redis_port}/0", 4, "workers")
    await queue.connect("both")
    try:
        batch = [sized(i, 1_200_000) for i in range(6)]
        for messages in ([sized(0, 5_000_000)], [sized(0, 20_000_000)], batch):
            with pytest.raises(MessageRefused, match="too large"):
                await queue.publish(messages)
            await queue.publish([Message(key="k", value=encode(make_record(1)))])  # connects anew
        # rev21: a connection that broke for another reason (a restart, a blip) is no refusal:
        # the batch goes through on the second try; a Redis loading its data is an outage.
        from redis.exceptions import BusyLoadingError
        from redis.exceptions import ConnectionError as RedisConnectionError

        script = queue._scripts["publish"]
        breaks: list[BaseException] = []

        async def flaky(*a: Any, **kw: Any) -> Any:
            if breaks:
                raise breaks.pop()
            return await script(*a, **kw)

        queue._scripts["publish"] = flaky
        small = [Message(key=f"k{i}", value=encode(make_record(i))) for i in range(3)]
        await admin.config_set("proto-max-bulk-len", "512mb")
        breaks.append(RedisConnectionError("Connection reset by peer"))
        await queue.publish([sized(7, 1_100_000), *small])  # once more, and through
        await admin.config_set("proto-max-bulk-len", "1mb")
        breaks.append(RedisConnectionError("Connection reset by peer"))
        with pytest.raises(MessageRefused):  # once more, and Redis says why this time
            await queue.publish([sized(7, 1_100_000), *small])
        breaks.append(BusyLoadingError("Redis is loading the dataset in memory"))
        with pytest.raises(BackendUnavailable):
            await queue.publish([sized(8, 1_100_000)])
        queue._scripts["publish"] = script
        with contextlib.suppress(Exception):  # redis-py may or may not raise as the server goes
            await admin.shutdown(nosave=True)
        with pytest.raises(BackendUnavailable):
            await queue.publish(batch)
    finally:
        await queue.close()
