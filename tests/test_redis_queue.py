"""Redis Streams queue: what the conformance suite cannot see from outside.

Partition leases, trimming that never drops a pending entry (checked on the streams
themselves), a real Redis outage (scripts/services.sh stop/start redis), and start-up errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from llmtap.errors import BackendUnavailable, ConfigError
from llmtap.queue.base import Delivery, partition_for
from llmtap.queue.redis import RedisQueue
from queue_helpers import (
    SERVICES,
    ConsumerProcess,
    QueueSpec,
    check_foreign_letter,
    connect,
    keyed_records,
    make_spec,
    parse,
    publish_in_batches,
    skip_reason,
    wait_for,
)

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(120),
    pytest.mark.skipif(skip_reason("redis") is not None, reason=str(skip_reason("redis"))),
]


@pytest.fixture
def spec(tmp_path: Path) -> QueueSpec:
    return make_spec("redis", tmp_path)


@pytest.fixture
async def queues() -> AsyncIterator[list[RedisQueue]]:
    opened: list[RedisQueue] = []
    yield opened
    for q in reversed(opened):
        await q.close()


async def heartbeat_after(q: RedisQueue, consumer_id: str, score: float, timeout: float = 10) -> float:
    """Wait for a heartbeat of `consumer_id` after the one that gave `score`: its score in the
    members set is its expiry on the server's clock, so with equal session timeouts a higher
    score is a later heartbeat. Returns the new score."""
    deadline = time.monotonic() + timeout
    while True:
        now = await q.r.zscore(q._members_key, consumer_id)
        if now is not None and now > score:
            return float(now)
        assert time.monotonic() < deadline, f"no heartbeat of {consumer_id} after {score}"
        await asyncio.sleep(0.02)


async def open_(spec: QueueSpec, queues: list[RedisQueue], role: str = "both", **kw: object) -> RedisQueue:
    q = spec.build(**kw)
    assert isinstance(q, RedisQueue)
    await connect(q, role)
    queues.append(q)
    return q


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_redis_fails_fast_with_one_sentence() -> None:
    port = free_port()
    q = RedisQueue(f"redis://127.0.0.1:{port}/0", 6, "workers")
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as e:
        await q.connect("both")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert msg.startswith(f"cannot reach Redis at 127.0.0.1:{port}: ") and "\n" not in msg


@pytest.mark.parametrize(
    "url",
    [
        "redis:///0",
        "http://127.0.0.1:6379/0",
        "redis://h:1/0?claim_idle_ms=soon",
        "redis://h:1/abc",
        "redis://h:1/0/x",
    ],
)
def test_bad_urls_are_one_sentence_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^invalid setting LLMTAP_QUEUE: "):
        RedisQueue(url, 6, "workers")


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("ssl_ca_certs=/etc/ca.pem", "'ssl_ca_certs' (TLS parameters need a rediss:// URL)"),
        ("health_check_intervall=5", "'health_check_intervall'"),
    ],
)
async def test_a_url_parameter_redis_does_not_take_is_one_sentence(
    spec: QueueSpec, query: str, needle: str
) -> None:
    """redis-py hands URL parameters to its connections unchecked: a typo was a TypeError
    traceback at start (exit 1)."""
    url = spec.target + ("&" if "?" in spec.target else "?") + query
    q = RedisQueue(url, 6, "workers")
    with pytest.raises(ConfigError) as e:
        await q.connect("both")
    assert str(e.value) == f"invalid setting LLMTAP_QUEUE: Redis takes no URL parameter {needle}"


@pytest.mark.parametrize("key", ["ssl_ca_certs", "ssl_certfile", "ssl_keyfile"])
def test_a_tls_file_that_cannot_be_read_is_one_sentence(key: str, tmp_path: Path) -> None:
    """A missing CA file read as an unreachable Redis: start-up waited for ever (managed check)."""
    url = f"rediss://:s3cret@127.0.0.1:1/0?{key}={tmp_path}/nope.pem"
    with pytest.raises(ConfigError) as e:
        RedisQueue(url, 6, "workers")
    assert str(e.value) == (
        f"invalid setting LLMTAP_QUEUE: {key} of 'rediss://:***@127.0.0.1:1/0?{key}={tmp_path}/nope.pem'"
        " cannot be read: No such file or directory"
    )


async def test_a_url_parameter_value_redis_refuses_is_one_sentence(spec: QueueSpec) -> None:
    """`?socket_timeout=abc`: redis-py's ValueError was a 75-line traceback (the review)."""
    q = RedisQueue(spec.target + ("&" if "?" in spec.target else "?") + "socket_timeout=abc", 6, "workers")
    with pytest.raises(
        ConfigError, match=r"^invalid setting LLMTAP_QUEUE: Invalid value for 'socket_timeout'"
    ):
        await q.connect("producer")


async def test_records_go_to_the_partition_of_their_key(spec: QueueSpec, queues: list[RedisQueue]) -> None:
    q = await open_(spec, queues, "producer")
    messages = keyed_records(keys=20, per_key=3)
    await q.publish(messages)
    for p in range(spec.partitions):
        entries = await q.r.xrange(q.stream(p))
        assert entries, f"partition {p} got nothing"
        for _, fields in entries:
            assert partition_for(fields[b"k"].decode(), spec.partitions) == p


async def test_leases_split_partitions_and_close_hands_them_over(
    spec: QueueSpec, queues: list[RedisQueue]
) -> None:
    a = await open_(spec, queues, "consumer")
    assert a.owned_partitions() == list(range(6))
    b = await open_(spec, queues, "consumer")
    # a gives up half at its next heartbeat (it has nothing in flight), b takes them at its own.
    await wait_for(
        lambda: len(a.owned_partitions()) == 3 and len(b.owned_partitions()) == 3, 10, "a fair split"
    )
    assert set(a.owned_partitions()).isdisjoint(b.owned_partitions())
    owners = {p.partition: p.owner for p in (await a.status()).partitions}
    assert {owners[p] for p in a.owned_partitions()} == {a.consumer_id}
    await a.close()
    queues.remove(a)
    await wait_for(lambda: b.owned_partitions() == list(range(6)), 5, "b takes over after a closed")


async def test_a_partition_is_not_handed_over_while_its_deliveries_are_in_flight(
    spec: QueueSpec, queues: list[RedisQueue]
) -> None:
    producer = await open_(spec, queues, "producer")
    await producer.publish(keyed_records(keys=24, per_key=5))
    a = await open_(spec, queues, "consumer")
    held = await a.consume(1000, 2.0)
    assert {d.partition for d in held} == set(range(6))
    b = await open_(spec, queues, "consumer")
    # b is live and wants half; a has seen that (a heartbeat of a after b's first) and b has
    # tried to take its share since (two heartbeats of b after that one of a): a keeps all it
    # has not acked
    seen_b = await heartbeat_after(a, b.consumer_id, 0.0)
    seen_a = await heartbeat_after(a, a.consumer_id, seen_b)
    await heartbeat_after(a, b.consumer_id, await heartbeat_after(a, b.consumer_id, seen_a))
    assert a.owned_partitions() == list(range(6)) and b.owned_partitions() == []
    assert await b.consume(100, 0.5) == []
    await a.ack(held)
    await wait_for(lambda: len(b.owned_partitions()) == 3, 5, "the handover once acked")
    assert await b.consume(100, 0.5) == []  # nothing was left pending or redelivered


async def test_trimming_never_drops_a_pending_entry(queues: list[RedisQueue], tmp_path: Path) -> None:
    spec = make_spec("redis", tmp_path, trim_interval=3600.0)  # only the trims of this test
    producer = await open_(spec, queues, "producer")
    messages = keyed_records(keys=12, per_key=20)
    await publish_in_batches(producer, messages, 60)

    # A consumer process acks 2 batches, then stops mid-batch: delivered, not acked.
    proc = ConsumerProcess(spec, tmp_path / "c.log", stall_after=91, batch=45)
    try:
        await wait_for(lambda: proc.log().stalled, 30, "the consumer stalled mid-batch")
        log = proc.log()
        assert len(log.acked) == 90 and len(log.unacked) >= 1
        before = sum([await producer.r.xlen(producer.stream(p)) for p in range(6)])
        removed = sum([await producer.trim_partition(p, exact=True) for p in range(6)])
        after = sum([await producer.r.xlen(producer.stream(p)) for p in range(6)])
        # Exactly the acked entries went: not the pending ones, not the never delivered ones.
        assert removed == len(log.acked) and after == before - len(log.acked) == len(messages) - 90
        summary = [await producer.r.xpending(producer.stream(p), spec.group) for p in range(6)]
        assert sum(s["pending"] for s in summary) >= len(log.unacked)
    finally:
        proc.kill()

    # The dead consumer's pending entries are claimed by the next one and still have their data.
    heir = await open_(spec, queues, "consumer")
    got: list[Delivery] = []
    deadline = time.monotonic() + 30
    while len(got) < len(messages) - 90:
        assert time.monotonic() < deadline, f"{len(got)} of {len(messages) - 90}"
        batch = await heir.consume(100, 0.5)
        got += batch
        await heir.ack(batch)
    records = [parse(d.value) for d in got]
    assert set(log.unacked) <= set(records)
    assert set(records) | set(log.acked) == {parse(m.value) for m in messages}
    assert all(d.delivery_count >= 2 for d in got if parse(d.value) in set(log.unacked))
    assert sum([await producer.trim_partition(p, exact=True) for p in range(6)]) == len(messages) - 90
    assert (await producer.status()).lag == 0


async def test_trimming_keeps_entries_not_yet_delivered_to_every_group(
    spec: QueueSpec, queues: list[RedisQueue]
) -> None:
    fast = await open_(spec, queues, "consumer")
    slow = await open_(QueueSpec(**{**spec.__dict__, "group": "other"}), queues, "consumer")
    await fast.publish(keyed_records(keys=6, per_key=10))
    got: list[Delivery] = []
    while len(got) < 60:
        batch = await fast.consume(100, 1.0)
        got += batch
        await fast.ack(batch)
    # Every entry is acked by `workers` but `other` has not read any: nothing may go.
    assert sum([await fast.trim_partition(p, exact=True) for p in range(6)]) == 0
    assert len(await slow.consume(100, 1.0)) > 0


async def test_a_foreign_dead_letter_with_garbage_fields_is_listed_and_replayed(
    spec: QueueSpec, queues: list[RedisQueue]
) -> None:
    # Anyone can XADD to the dead-letter stream: a letter whose fields are not numbers is listed
    # with fallbacks, and neither it nor the real one beside it blocks listing or replay.
    q = await open_(spec, queues)
    garbage = {b"k": b"\xff", b"v": b"foreign", b"partition": b"-", b"entry": b"x-y", b"failed_at": b"nan"}

    async def write() -> None:
        await q.r.xadd(q.dlq_key, garbage)  # type: ignore[arg-type]

    foreign = await check_foreign_letter(q, write)
    assert (foreign.partition, foreign.offset) == (0, 0)


def services(*args: str) -> None:
    subprocess.run([str(SERVICES), *args], check=True, capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not os.access(SERVICES, os.X_OK), reason="scripts/services.sh is missing")
async def test_redis_outage_fails_fast_and_resumes_without_loss(
    spec: QueueSpec, queues: list[RedisQueue]
) -> None:
    producer = await open_(spec, queues, "producer")
    consumer = await open_(spec, queues, "consumer")
    before = keyed_records(keys=6, per_key=20)
    await producer.publish(before)
    await asyncio.to_thread(services, "stop", "redis")
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable) as e:
            await producer.publish(keyed_records(keys=6, per_key=1))
        took = time.monotonic() - t0
        print(f"publish during a Redis outage raised BackendUnavailable after {took:.3f}s: {e.value}")
        assert took < 3
        with pytest.raises(BackendUnavailable):
            await consumer.consume(10, 0.5)
    finally:
        await asyncio.to_thread(services, "start", "redis")
    after = [m for m in keyed_records(keys=6, per_key=40) if parse(m.value)[1] >= 20]
    deadline = time.monotonic() + 10
    while True:
        try:
            await producer.publish(after)
            break
        except BackendUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    wanted = {parse(m.value) for m in before + after}
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 30
    while not wanted <= seen:
        assert time.monotonic() < deadline, f"missing {len(wanted - seen)}"
        try:
            batch = await consumer.consume(100, 0.5)
            seen |= {parse(d.value) for d in batch}
            await consumer.ack(batch)
        except BackendUnavailable:
            await asyncio.sleep(0.2)


async def test_consumer_recovers_when_redis_comes_back_without_its_streams(
    spec: QueueSpec, queues: list[RedisQueue]
) -> None:
    """A Redis restarted without persistence (or flushed) has no consumer group any more: the
    consumer must recreate it instead of failing with NOGROUP forever."""
    producer = await open_(spec, queues, "producer")
    consumer = await open_(spec, queues, "consumer")
    await producer.publish(keyed_records(keys=3, per_key=5))
    got = await consumer.consume(100, 2.0)
    await consumer.ack(got)
    for p in range(consumer.partitions):  # what a restart without an AOF/RDB leaves behind
        await consumer.r.delete(consumer.stream(p))
    fresh = [m for m in keyed_records(keys=3, per_key=10) if parse(m.value)[1] >= 5]
    await producer.publish(fresh)
    wanted = {parse(m.value) for m in fresh}
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 20
    while not wanted <= seen:
        assert time.monotonic() < deadline, f"missing {len(wanted - seen)}"
        try:
            batch = await consumer.consume(100, 0.5)
        except BackendUnavailable as e:
            assert "cannot reach" not in str(e), e  # Redis answered: it was not the network
            await asyncio.sleep(0.1)
            continue
        seen |= {parse(d.value) for d in batch}
        await consumer.ack(batch)


class _Relay:
    """A TCP relay in front of the real Redis that can turn into an echo: what a client's socket
    does when its reconnect to a dead broker on a local port lands on itself (a TCP self-connect:
    the kernel may pick the broker's port as the client's own when it is in the ephemeral range)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.echo = False
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.append(w)
        if self.echo:
            await self._pipe(r, w)
            return
        ur, uw = await asyncio.open_connection(*self.target)
        self.writers.append(uw)
        await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))

    @staticmethod
    async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    def drop_connections(self) -> None:
        for w in self.writers:
            w.close()
        self.writers.clear()

    async def close(self) -> None:
        self.drop_connections()
        self.server.close()
        await self.server.wait_closed()


async def test_a_reply_that_is_not_redis_acknowledging_the_batch_is_not_taken_for_one(
    spec: QueueSpec, queues: list[RedisQueue]
) -> None:
    """Found by a lost batch: a publish whose socket echoed the command back returned as if Redis
    had stored the batch. Only Redis's own count of the entries it added acknowledges it."""
    target = urlsplit(os.environ["LLMTAP_TEST_REDIS_URL"])
    relay = _Relay((target.hostname or "127.0.0.1", target.port or 6379))
    port = await relay.start()
    try:
        via = dataclasses.replace(spec, target=spec.target.replace(f":{target.port}/", f":{port}/", 1))
        producer = await open_(via, queues, "producer")
        consumer = await open_(spec, queues, "consumer")
        first, lost, last = (keyed_records(keys=3, per_key=30)[i::3] for i in range(3))
        await producer.publish(first)
        relay.echo = True
        relay.drop_connections()  # the broker "dies"; the client's reconnect meets an echo
        with pytest.raises(BackendUnavailable, match="not an acknowledgment"):
            await producer.publish(lost)
        relay.echo = False  # Redis is back; the echoing socket stays open until the client drops it
        deadline = time.monotonic() + 30
        while True:
            try:
                await producer.publish(last)
                break
            except BackendUnavailable:
                assert time.monotonic() < deadline, "publishing did not resume"
                await asyncio.sleep(0.2)
        wanted = {parse(m.value) for m in first + last}
        seen: set[tuple[str, int]] = set()
        deadline = time.monotonic() + 30
        while not wanted <= seen:
            assert time.monotonic() < deadline, f"missing {len(wanted - seen)}"
            batch = await consumer.consume(100, 0.5)
            seen |= {parse(d.value) for d in batch}
            await consumer.ack(batch)
        assert not seen & {parse(m.value) for m in lost}
    finally:
        await relay.close()


async def test_a_redis_that_evicts_keys_is_refused_at_start_and_named_by_status(
    spec: QueueSpec,
    queues: list[RedisQueue],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis run as a cache (`allkeys-lru`) took every publish and then evicted the streams:
    2,039 of 3,000 records gone without an error (the queue review). `noeviction` refuses the
    writes instead, and the gateway falls back; `volatile-*` never takes keys without a TTL.
    Switched to `allkeys-*` under a running gateway (1,003 of 1,200 lost: an outside check), the
    next publish is refused (the gateway falls back) with an ERROR."""
    from llmtap.queue import redis as redis_module

    monkeypatch.setattr(redis_module, "POLICY_EVERY", 0.0)
    producer = await open_(spec, queues, "producer")
    await producer.publish(keyed_records(keys=2, per_key=2))
    before = await producer.r.config_get("maxmemory*")
    try:
        await producer.r.config_set("maxmemory", "0")
        await producer.r.config_set("maxmemory-policy", "allkeys-lru")
        await open_(spec, queues, "producer")  # without a memory limit nothing is evicted
        await producer.r.config_set("maxmemory", "2gb")
        with caplog.at_level("WARNING", logger="llmtap.queue"), pytest.raises(BackendUnavailable) as refused:
            await producer.publish(keyed_records(keys=1, per_key=1))  # connected before the switch
        assert "evicts keys when full (maxmemory-policy allkeys-lru): not publishing" in str(refused.value)
        assert any(r.levelname == "ERROR" and "now evicts keys" in r.getMessage() for r in caplog.records)
        for role in ("producer", "consumer"):
            q = spec.build()
            with pytest.raises(ConfigError) as e:
                await connect(q, role)
            assert "evicts keys when full (maxmemory-policy allkeys-lru)" in str(e.value), str(e.value)
            assert "set maxmemory-policy noeviction" in str(e.value)
        st = await producer.status()
        assert any("maxmemory-policy allkeys-lru" in n for n in st.notes), st.notes
        await producer.r.config_set("maxmemory-policy", "volatile-lru")  # safe for us: accepted
        await open_(spec, queues, "producer")
        await producer.publish(keyed_records(keys=1, per_key=1))  # and the running one publishes again
        assert any("no longer evicts keys" in r.getMessage() for r in caplog.records)
    finally:
        await producer.r.config_set("maxmemory-policy", before["maxmemory-policy"])
        await producer.r.config_set("maxmemory", before["maxmemory"])
    # A stream gone (evicted, deleted by hand) is named by status, not called an outage.
    await producer.r.delete(producer.stream(0), producer.stream(1))
    st = await producer.status()
    assert sum("is missing (evicted or deleted?)" in n for n in st.notes) == 2, st.notes
    assert not any("maxmemory-policy" in n for n in st.notes)


async def test_an_outage_is_logged_when_it_begins_and_ends_not_at_every_heartbeat(
    spec: QueueSpec, queues: list[RedisQueue], caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the self-observability check: through a Redis outage every worker warned at
    every heartbeat (a third of the session timeout: every 3 s by default, ~1,000 lines an hour)."""
    from tcp_proxy import TcpProxy

    target = urlsplit(os.environ["LLMTAP_TEST_REDIS_URL"])
    proxy = TcpProxy(target.port or 6379)
    await proxy.start()
    via = dataclasses.replace(spec, target=spec.target.replace(f":{target.port}/", f":{proxy.port}/", 1))
    consumer = await open_(via, queues, "consumer", session_timeout=0.3)  # a heartbeat every 0.1 s
    caplog.set_level("WARNING", logger="llmtap")
    proxy.refuse = True
    for w in list(proxy._writers):
        w.transport.abort()
    deadline = time.monotonic() + 30
    while consumer._heartbeat_error is None:  # the first failed heartbeat
        assert time.monotonic() < deadline, "no heartbeat failed through the outage"
        await asyncio.sleep(0.05)
    failed = proxy.refused
    while proxy.refused < failed + 10:  # ten more heartbeats meet the outage
        assert time.monotonic() < deadline, f"only {proxy.refused - failed} more heartbeats"
        await asyncio.sleep(0.05)
    proxy.refuse = False
    while consumer._heartbeat_error is not None:
        assert time.monotonic() < deadline, "the heartbeat did not recover"
        await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
    await proxy.stop()
    assert len(lines) == 2, lines
    assert "failed" in lines[0] and f"127.0.0.1:{proxy.port}" in lines[0]
    assert "works again" in lines[1]


async def test_a_full_redis_is_named_full_not_unreachable(spec: QueueSpec, queues: list[RedisQueue]) -> None:
    """Past its `maxmemory` Redis answers every write with OOM: the worker said "cannot reach
    Redis" while it answered, and could not start (an outside check)."""
    producer = await open_(spec, queues, "producer")
    before = await producer.r.config_get("maxmemory*")
    try:
        await producer.r.config_set("maxmemory-policy", "noeviction")
        await producer.r.config_set("maxmemory", "1")  # below what it holds: full at once
        with pytest.raises(BackendUnavailable) as e:
            await spec.build().connect("consumer")  # not `connect`: it waits out outages
        assert "is full (used memory above its maxmemory): raise maxmemory" in str(e.value), str(e.value)
        with pytest.raises(BackendUnavailable, match="refused the batch: command not allowed"):
            await producer.publish(keyed_records(keys=1, per_key=1))  # the gateway falls back
    finally:
        await producer.r.config_set("maxmemory", before["maxmemory"])
        await producer.r.config_set("maxmemory-policy", before["maxmemory-policy"])


async def test_entries_trimmed_before_any_worker_read_them_are_said_lost_once(
    tmp_path: Path, queues: list[RedisQueue], caplog: pytest.LogCaptureFixture
) -> None:
    """An outside check trimmed the streams by length (`XTRIM MAXLEN 0`) while the worker was
    stopped: 30 of 30 records were lost with no line and no count, and `llmtap status` showed
    "lag 30" for good. Now the owner says it (one ERROR line, the loss counter) and the lag is
    what is left."""
    from llmtap.queue.base import LOST, Message

    spec = make_spec("redis", tmp_path, partitions=1, trim_interval=0.05)
    q = await open_(spec, queues, "both", session_timeout=0.3)
    await q.publish([Message(key="k", value=b"read-%d" % i) for i in range(5)])
    got = await _take(q, 5)
    await q.ack(got)
    before = LOST.labels("redis")._value.get()
    with caplog.at_level("ERROR", logger="llmtap.queue.redis"):
        await q.publish([Message(key="k", value=b"lost-%d" % i) for i in range(30)])
        await q.r.xtrim(q.stream(0), maxlen=0, approximate=False)  # by hand, before any read
        deadline = time.monotonic() + 30
        while LOST.labels("redis")._value.get() - before < 30:
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.05)
        assert (await q.status()).lag == 0
        await q.publish([Message(key="k", value=b"after-%d" % i) for i in range(3)])
        later = await _take(q, 3)
        assert [d.value for d in later] == [b"after-0", b"after-1", b"after-2"]
        await q.ack(later)
        await asyncio.sleep(0.3)  # trims of the heartbeat: a hole is said once
    lines = [r.getMessage() for r in caplog.records if "were removed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("redis queue: 30 record(s) of"), lines
    assert LOST.labels("redis")._value.get() - before == 30


async def _take(q: RedisQueue, n: int, timeout: float = 30) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} delivered"
        got += await q.consume(n - len(got), timeout=0.5)
    return got
