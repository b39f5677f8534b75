"""SQS queue: what the conformance suite cannot see from outside.

Queue and dead-letter queue creation (redrive policy), SQS's limits (10 entries and the
queue's byte limit per request; a message over it refused before anything is sent), bodies SQS
would not take as text, visibility renewal while a batch is held, the redrive policy moving a
message that keeps coming back, deduplication by record id, a standard queue (best-effort order,
said in the status), a queue deleted while running (created again), a real server outage
(scripts/services.sh stop/start sqs) and start-up errors. Against ElasticMQ (scripts/services.sh),
FIFO queues unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from llmtap.errors import BackendUnavailable, ConfigError, MessageRefused
from llmtap.queue.base import Message, partition_for
from llmtap.queue.sqs import SQSQueue, group_id
from queue_helpers import (
    SERVICES,
    check_foreign_letter,
    connect,
    keyed_records,
    parse,
    record,
    skip_reason,
    sqs_url,
    take,
)

pytestmark = [pytest.mark.sqs, pytest.mark.timeout(180)]
needs_server = pytest.mark.skipif(skip_reason("sqs") is not None, reason=str(skip_reason("sqs")))


def fresh(fifo: bool = True) -> str:
    name = f"t{uuid.uuid4().hex[:10]}"
    return sqs_url(f"{name}.fifo" if fifo else name)


@pytest.fixture
async def queues() -> AsyncIterator[list[SQSQueue]]:
    opened: list[SQSQueue] = []
    yield opened
    for q in reversed(opened):
        await q.close()


async def open_(url: str, queues: list[SQSQueue], role: Any = "both", **kw: Any) -> SQSQueue:
    q = SQSQueue(url, 6, "workers", **{"visibility_timeout": 4, **kw})
    await connect(q, role)
    queues.append(q)
    return q


async def raw_attributes(name: str) -> dict[str, str]:
    """The queue's attributes as SQS itself reports them (not through llmtap)."""
    async with get_session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=os.environ["LLMTAP_TEST_SQS_ENDPOINT"]
    ) as c:
        qurl = (await c.get_queue_url(QueueName=name))["QueueUrl"]
        got = await c.get_queue_attributes(QueueUrl=qurl, AttributeNames=["All"])
        return dict(got["Attributes"])


# -- no server needed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "sqs://",
        "sqs://a/b",
        "sqs://bad.name",
        "sqs://" + "x" * 80,
        "sqs://q?visibility_timeout=0",
        "sqs://q?max_receives=x",
        "sqs://q?colour=blue",
    ],
)
def test_bad_urls_are_one_sentence_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^invalid setting LLMTAP_QUEUE: "):
        SQSQueue(url, 6)


def test_description_says_what_kind_of_queue() -> None:
    assert SQSQueue("sqs://logs.fifo?endpoint=http://h:1", 6).description == (
        "sqs://logs.fifo at http://h:1 (SQS FIFO)"
    )
    assert "order best-effort" in SQSQueue("sqs://logs?region=eu-west-1", 6).description
    assert SQSQueue("sqs://logs.fifo", 6).dlq_name == "logs-dlq.fifo"
    assert SQSQueue("sqs://logs", 6).dlq_name == "logs-dlq"


async def test_an_endpoints_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Banners, `llmtap status` and outage messages quote the endpoint: never its password."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    q = SQSQueue("sqs://logs.fifo?endpoint=http://ak:PASSWORD-1@127.0.0.1:1&region=us-east-1", 6)
    assert q.description == "sqs://logs.fifo at http://ak:***@127.0.0.1:1 (SQS FIFO)"
    with pytest.raises((ConfigError, BackendUnavailable)) as e:  # refused, or nothing answers
        await q.connect("consumer")
    assert "PASSWORD" not in str(e.value) and "127.0.0.1:1" in str(e.value)
    await q.close()


def test_message_groups_are_the_partitions() -> None:
    assert group_id("tenant-a", 6) == f"p{partition_for('tenant-a', 6)}"
    assert {group_id(f"key-{i}", 6) for i in range(200)} == {f"p{i}" for i in range(6)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_endpoint_fails_fast_with_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    port = free_port()
    q = SQSQueue(f"sqs://llmtap.fifo?endpoint=http://127.0.0.1:{port}", 6, op_timeout=3)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as e:
        await q.connect("both")
    assert time.monotonic() - t0 < 8
    msg = str(e.value)
    assert msg.startswith(f"cannot reach SQS queue llmtap.fifo at http://127.0.0.1:{port}: ")
    assert "\n" not in msg


async def test_an_endpoint_host_the_dns_does_not_know_is_a_wrong_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It waited for ever (WAITING) where Kafka, Redis, PostgreSQL and S3 stop start-up with one
    line; a resolver that cannot answer right now (EAI_AGAIN) is still an outage."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kw: Any) -> Any:
        if host == "sqs.nowhere.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == "sqs.later.example":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    q = SQSQueue("sqs://llmtap.fifo?endpoint=http://sqs.nowhere.example:1&region=us-east-1", 6, op_timeout=3)
    with pytest.raises(
        ConfigError, match=r"^invalid setting LLMTAP_QUEUE: unknown host in SQS endpoint http://sqs"
    ):
        await q.connect("both")
    q = SQSQueue("sqs://llmtap.fifo?endpoint=http://sqs.later.example:1&region=us-east-1", 6, op_timeout=3)
    with pytest.raises(BackendUnavailable):
        await q.connect("both")
    await q.close()


# -- against the server -------------------------------------------------------------------------


@needs_server
async def test_queue_and_dead_letter_queue_are_created_with_a_redrive_policy(queues: list[SQSQueue]) -> None:
    url = fresh()
    q = await open_(url, queues, "producer", max_receives=7)
    main = await raw_attributes(q.name)
    dlq = await raw_attributes(q.dlq_name)
    assert main["FifoQueue"] == "true" and dlq["FifoQueue"] == "true"
    policy = json.loads(main["RedrivePolicy"])
    assert policy["deadLetterTargetArn"] == dlq["QueueArn"] and int(policy["maxReceiveCount"]) == 7
    # the queue's own limit, or SQS's default where the server does not say (ElasticMQ)
    assert q.max_bytes == int(main.get("MaximumMessageSize", 256 * 1024))
    # A second connect uses the existing queues as they are.
    again = await open_(url, queues, "producer", max_receives=3)
    assert json.loads((await raw_attributes(again.name))["RedrivePolicy"]) == policy


@needs_server
async def test_batches_respect_the_entry_and_byte_limits(queues: list[SQSQueue]) -> None:
    q = await open_(fresh(), queues)
    # 3 keys x 9 records of ~60 KB: 27 messages, several requests of <= 10 and <= max_bytes each
    messages = keyed_records(keys=3, per_key=9, size=60_000)
    sent: list[int] = []
    real = q._client.send_message_batch

    async def spy(**kw: Any) -> Any:
        sent.append(sum(len(e["MessageBody"]) for e in kw["Entries"]))
        assert len(kw["Entries"]) <= 10
        return await real(**kw)

    q._client.send_message_batch = spy
    await q.publish(messages)
    assert len(sent) >= 27 * 60_000 // q.max_bytes and max(sent) <= q.max_bytes
    got = await take(q, len(messages))
    assert sorted(d.value for d in got) == sorted(m.value for m in messages)
    last: dict[str, int] = {}
    for d in got:  # and per key in order, although sent in several requests
        key, seq = parse(d.value)
        assert seq == last.get(key, -1) + 1 and d.partition == partition_for(key, 6)
        last[key] = seq


@needs_server
async def test_a_message_over_the_limit_is_refused_and_nothing_of_its_batch_is_sent(
    queues: list[SQSQueue],
) -> None:
    q = await open_(fresh(), queues)
    big = Message("k", b"x" * (q.max_bytes + 1))
    with pytest.raises(MessageRefused, match=r"takes messages up to \d+ bytes; 1 record"):
        await q.publish([Message("k", b'{"small": 1}'), big])
    assert (await q.status()).lag == 0
    assert await q.consume(10, 1.0) == []


@needs_server
async def test_binary_bodies_and_any_key_round_trip(queues: list[SQSQueue]) -> None:
    q = await open_(fresh(), queues)
    values = [bytes(range(256)), b"\x00\x01 not text \xff", "ключ \ufffe".encode(), b'{"ok": true}']
    keys = ["tenant-a", "ключ", "", "with space"]
    await q.publish([Message(k, v) for k, v in zip(keys, values, strict=True)])
    got = await take(q, 4)
    assert sorted((d.key, d.value) for d in got) == sorted(zip(keys, values, strict=True))


@needs_server
async def test_visibility_is_renewed_while_a_batch_is_held(queues: list[SQSQueue]) -> None:
    holder = await open_(fresh(), queues, visibility_timeout=2)
    await holder.publish(keyed_records(keys=4, per_key=5))
    held = await take(holder, 20, ack=False)
    other = await open_(f"sqs://{holder.name}?endpoint={holder.endpoint}", queues, "consumer")
    # Five visibility timeouts later nothing has come back: the holder kept renewing.
    deadline = time.monotonic() + 5 * holder.visibility
    while time.monotonic() < deadline:
        assert await other.consume(10, 1.0) == [], "a held message became visible again"
    st = await holder.status()
    assert (st.in_flight, st.waiting) == (20, 0)
    await holder.ack(held)
    assert holder._held == {}
    assert await other.consume(10, 1.0) == []
    assert (await holder.status()).lag == 0


def fail_receive(q: SQSQueue, call: int, error: Exception) -> list[int]:
    """The `call`-th receive of `q` fails (a connection lost, a bug) without reaching SQS; the
    others are real. Returns the sizes of the receives that did reach it."""
    real, calls, sizes = q._receive, [0], []

    async def receive(url: str, n: int, wait: int, visibility: int) -> list[dict[str, Any]]:
        calls[0] += 1
        if calls[0] == call:
            await asyncio.sleep(0.05)  # the round's other receives are answered meanwhile
            raise error
        sizes.append(n)
        return await real(url, n, wait, visibility)

    q._receive = receive  # type: ignore[method-assign]
    return sizes


@needs_server
async def test_a_receive_failing_beside_others_hands_out_what_the_others_got(queues: list[SQSQueue]) -> None:
    # One consume of 40 is one receive, then three in parallel; the second of those fails (the
    # broker going away mid-round). What the other two received is held by this consumer: it
    # must reach the caller, or it stays invisible (renewed) and blocks its message group for as
    # long as the consumer lives. Seen: 23 records never stored after an outage in CI.
    q = await open_(fresh(), queues, visibility_timeout=20)  # its rounds go on for 5 s
    messages = keyed_records(keys=6, per_key=20)
    await q.publish(messages)
    fail_receive(q, call=3, error=BackendUnavailable("cannot reach SQS queue: connection reset"))
    first = await q.consume(40, 1.0)
    assert len(first) == 30  # 10 + the two receives that worked
    assert set(q._held) == {d.handle.receipt for d in first}  # held is exactly what was handed out
    await q.ack(first)
    got = first + await take(q, len(messages) - len(first), timeout=30)
    assert sorted(d.value for d in got) == sorted(m.value for m in messages)
    assert q._held == {}


@needs_server
async def test_a_consume_that_fails_gives_back_what_it_had_received(queues: list[SQSQueue]) -> None:
    # Anything else failing in a round (a bug, a cancellation) fails the consume: the messages
    # already received are made visible again at once, not after the visibility timeout.
    q = await open_(fresh(), queues, visibility_timeout=120)
    messages = keyed_records(keys=6, per_key=10)
    await q.publish(messages)
    sizes = fail_receive(q, call=2, error=RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        await q.consume(60, 1.0)
    assert sum(sizes) > 10 and q._held == {}  # received more than one round, holds nothing
    other = await open_(f"sqs://{q.name}?endpoint={q.endpoint}", queues, "consumer")
    got = await take(other, len(messages), timeout=30)  # far less than the 120 s visibility
    assert sorted(d.value for d in got) == sorted(m.value for m in messages)


@needs_server
async def test_a_consume_cancelled_mid_round_holds_nothing(queues: list[SQSQueue]) -> None:
    # A worker stopping cancels its consume: what the round's finished receives got is released
    # too (visible again at once), not left held until the queue is closed.
    q = await open_(fresh(), queues, visibility_timeout=120)
    messages = keyed_records(keys=6, per_key=10)
    await q.publish(messages)
    real, calls = q._receive, [0]

    async def receive(url: str, n: int, wait: int, visibility: int) -> list[dict[str, Any]]:
        calls[0] += 1
        if calls[0] >= 3:
            # Receives that never answer. (Only the 3rd did: on a busy machine the 4th to 6th
            # were still in flight at the cancel, done at the server but not here, and their
            # messages stayed invisible for the visibility timeout, as SQS keeps them.)
            await asyncio.Event().wait()
        return await real(url, n, wait, visibility)

    q._receive = receive  # type: ignore[method-assign]
    task = asyncio.create_task(q.consume(60, 1.0))
    deadline = time.monotonic() + 60
    while len(q._held) < 20:  # the first receive and the round's finished one are in
        assert time.monotonic() < deadline and not task.done(), len(q._held)
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert q._held == {}
    other = await open_(f"sqs://{q.name}?endpoint={q.endpoint}", queues, "consumer")
    got = await take(other, len(messages), timeout=30)  # far less than the 120 s visibility
    assert sorted(d.value for d in got) == sorted(m.value for m in messages)


@needs_server
async def test_a_foreign_message_with_a_bad_base64_body_is_handed_out_as_it_is(
    queues: list[SQSQueue],
) -> None:
    # Someone else's message, marked base64 but not: the worker gets it raw (and dead-letters
    # it as undecodable) instead of every consume failing on it.
    q = await open_(fresh(), queues)
    await q.publish([Message("k", b"\x00\xffbinary")])  # sent base64-encoded, with the marker
    async with get_session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=os.environ["LLMTAP_TEST_SQS_ENDPOINT"]
    ) as c:
        qurl = (await c.get_queue_url(QueueName=q.name))["QueueUrl"]
        attrs = {"llmtap-b64": {"DataType": "String", "StringValue": "1"}}
        await c.send_message(
            QueueUrl=qurl,
            MessageBody="not base64!",
            MessageAttributes=attrs,
            MessageGroupId="p0",
            MessageDeduplicationId=uuid.uuid4().hex,
        )
    got = await take(q, 2)
    assert sorted(d.value for d in got) == [b"\x00\xffbinary", b"not base64!"]


@needs_server
async def test_a_foreign_dead_letter_with_garbage_attributes_is_listed_and_replayed(
    queues: list[SQSQueue],
) -> None:
    # Something other than llmtap put a letter in the dead-letter queue, with attributes named
    # like llmtap's but holding any text: it is listed (with fallbacks), and neither it nor the
    # real letter beside it blocks the listing or the replay.
    q = await open_(fresh(), queues)
    garbage = {"llmtap-offset": "abc", "llmtap-failed-at": "nan", "llmtap-key": "\u00e9\ufffd"}

    async def write() -> None:
        async with get_session().create_client(
            "sqs", region_name="us-east-1", endpoint_url=os.environ["LLMTAP_TEST_SQS_ENDPOINT"]
        ) as c:
            qurl = (await c.get_queue_url(QueueName=q.dlq_name))["QueueUrl"]
            await c.send_message(
                QueueUrl=qurl,
                MessageBody="foreign",
                MessageAttributes={k: {"DataType": "String", "StringValue": v} for k, v in garbage.items()},
                MessageGroupId="g",
                MessageDeduplicationId=uuid.uuid4().hex,
            )

    foreign = await check_foreign_letter(q, write)
    assert foreign.offset >= 0 and "redrive policy" in foreign.reason


@needs_server
async def test_a_message_that_keeps_coming_back_is_moved_by_the_redrive_policy(
    queues: list[SQSQueue],
) -> None:
    url = fresh()
    producer = await open_(url, queues, "producer", max_receives=2)
    await producer.publish([Message("k", b'{"crashes": "the worker"}')])
    for _ in range(2):  # received, never acknowledged (as by a worker that dies on it)
        c = SQSQueue(url, 6, "workers", visibility_timeout=4)
        await c.connect("consumer")
        assert len(await take(c, 1, ack=False)) == 1
        await c.close()  # visible again at once
    c = await open_(url, queues, "consumer")
    deadline = time.monotonic() + 20
    while (await producer.status()).dead_letters != 1:
        assert time.monotonic() < deadline, "not moved to the dead-letter queue"
        assert await c.consume(10, 1.0) == []
    (letter,) = await producer.dead_letters()
    assert letter.value == b'{"crashes": "the worker"}' and letter.key == "k"
    assert "redrive policy" in letter.reason and "maxReceiveCount 2" in letter.reason
    assert await producer.replay_dead_letters() == 1
    assert [d.value for d in await take(c, 1)] == [letter.value]


@needs_server
async def test_a_record_published_twice_is_delivered_once(queues: list[SQSQueue]) -> None:
    q = await open_(fresh(), queues)
    rid = f"tenant/{uuid.uuid4()}"
    await q.publish([Message("tenant", b'{"first": 1}', id=rid)])
    # the same record id again (say a retried batch, re-encoded): SQS drops it
    await q.publish([Message("tenant", b'{"again": 1}', id=rid), Message("tenant", b'{"other": 1}')])
    got = await take(q, 2)
    assert [d.value for d in got] == [b'{"first": 1}', b'{"other": 1}']
    assert await q.consume(10, 1.0) == []


async def raw_delete(name: str) -> None:
    """Delete a queue behind llmtap's back, as an operator or a teardown script would."""
    async with get_session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=os.environ["LLMTAP_TEST_SQS_ENDPOINT"]
    ) as c:
        await c.delete_queue(QueueUrl=(await c.get_queue_url(QueueName=name))["QueueUrl"])


async def wait_recreated(
    name: str, errors: list[BackendUnavailable], before: int, timeout: float = 60
) -> None:
    """Until the deleted queue `name` exists again, after the process under test met its absence."""
    deadline = time.monotonic() + timeout
    while True:
        if len(errors) > before:
            with contextlib.suppress(ClientError):
                await raw_attributes(name)
                return
        assert time.monotonic() < deadline, (
            f"queue {name} was not created again ({len(errors) - before} errors)"
        )
        await asyncio.sleep(0.1)


@needs_server
async def test_a_purge_behind_llmtaps_back_is_said_once_not_a_line_per_message(
    queues: list[SQSQueue], caplog: pytest.LogCaptureFixture
) -> None:
    """An audit purged the queue (PurgeQueue) under a running worker: 122 of 600 records went
    unread without a trace, and the only lines were one INFO per message in flight whose delete
    SQS refused. Those refusals are now one WARNING that says what a purge costs."""
    url = fresh()
    q = await open_(url, queues)
    await q.publish([Message(f"k{i % 6}", b"m%d" % i) for i in range(30)])
    held = await take(q, 10)
    name = q.name
    async with get_session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=os.environ["LLMTAP_TEST_SQS_ENDPOINT"]
    ) as c:
        await c.purge_queue(QueueUrl=(await c.get_queue_url(QueueName=name))["QueueUrl"])
    caplog.set_level(logging.INFO, logger="llmtap.queue.sqs")
    await q.ack(held[:5])
    await q.ack(held[5:])
    said = [r for r in caplog.records if r.name == "llmtap.queue.sqs"]
    assert len(said) == 1, [r.getMessage() for r in said]  # one line a minute at most
    assert said[0].levelname == "WARNING" and "never purge" in said[0].getMessage()
    assert (
        "10 ReceiptHandleIsInvalid" in said[0].getMessage()
        or "5 ReceiptHandleIsInvalid" in said[0].getMessage()
    )


# What llmtap sets on a queue it creates (ElasticMQ does not report the retention period).
_KEPT = ("FifoQueue", "ContentBasedDeduplication", "VisibilityTimeout", "RedrivePolicy")


@needs_server
async def test_a_queue_deleted_while_running_is_created_again_and_records_flow_on(
    queues: list[SQSQueue],
) -> None:
    """The queue is deleted under a running producer and consumer (by hand, a teardown script):
    whichever meets its absence creates it again as at start (same attributes, redrive policy),
    and every record published after that is consumed. Seen: the gateway sent every record to its
    fallback and the worker reported "waiting" for good, until restarted. While the queue is gone
    a publish fails as an outage (the gateway's fallback takes the batch), never as a refusal."""
    url = fresh()
    producer = await open_(url, queues, "producer")
    consumer = await open_(url, queues, "consumer")
    made = {k: v for k, v in (await raw_attributes(producer.name)).items() if k in _KEPT}
    assert set(made) == set(_KEPT)
    acked: list[tuple[float, Message]] = []  # (when its publish began, the record) once published
    publish_errors: list[BackendUnavailable] = []
    consume_errors: list[BackendUnavailable] = []
    seen: set[tuple[str, int]] = set()
    publishing, consuming = asyncio.Lock(), asyncio.Lock()  # held by the test: that loop pauses
    stop = asyncio.Event()

    async def publish_loop() -> None:
        seq = 0
        while not stop.is_set():
            async with publishing:
                batch = [record(f"key-{k}", seq) for k in range(3)]
                began = time.monotonic()
                try:
                    await producer.publish(batch)  # MessageRefused or anything else fails the test
                except BackendUnavailable as e:
                    publish_errors.append(e)
                else:
                    acked.extend((began, m) for m in batch)
                    seq += 1
            await asyncio.sleep(0.02)

    async def consume_loop() -> None:
        while not stop.is_set():
            async with consuming:
                try:
                    batch = await consumer.consume(50, 0.5)
                    seen.update(parse(d.value) for d in batch)
                    await consumer.ack(batch)
                except BackendUnavailable as e:
                    consume_errors.append(e)
            await asyncio.sleep(0.02)

    async def flowing(since: float, n: int = 30) -> None:
        """Until `n` records published after `since` arrived, and every one of them."""
        deadline = time.monotonic() + 60
        while True:
            wanted = {parse(m.value) for began, m in acked if began > since}
            if len(wanted) >= n and wanted <= seen:
                return
            missing = len(wanted - seen)
            assert time.monotonic() < deadline, (
                f"{len(wanted)} published since, {missing} of them not consumed"
            )
            assert not loops.done(), "a loop failed"
            await asyncio.sleep(0.1)

    async def delete_main() -> float:
        await raw_delete(producer.name)
        return time.monotonic()  # anything published from now on went to a new queue

    loops = asyncio.gather(publish_loop(), consume_loop())
    try:
        await flowing(0)
        # Both running: deleted under them.
        await flowing(await delete_main())
        # The producer alone meets the missing queue (the consumer paused).
        async with consuming:
            n = len(publish_errors)
            gone = await delete_main()
            await wait_recreated(producer.name, publish_errors, n)
        await flowing(gone)
        # The consumer alone (the producer paused).
        async with publishing:
            n = len(consume_errors)
            gone = await delete_main()
            await wait_recreated(producer.name, consume_errors, n)
        await flowing(gone)
    finally:
        stop.set()
        await loops
    assert {k: v for k, v in (await raw_attributes(producer.name)).items() if k in _KEPT} == made
    assert publish_errors and consume_errors
    assert all("does not exist" in str(e) for e in publish_errors), publish_errors[0]
    assert await consumer.dead_letters() == []


@needs_server
async def test_a_dead_letter_queue_deleted_while_running_is_created_again(queues: list[SQSQueue]) -> None:
    q = await open_(fresh(), queues)
    await q.publish([Message("k", b'{"bad": 1}'), Message("k", b'{"bad": 2}')])
    first, second = await take(q, 2, ack=False)
    await raw_delete(q.dlq_name)
    with pytest.raises(BackendUnavailable, match="does not exist"):
        await q.dead_letter(first, "a record that cannot be stored")  # an outage: retried, kept
    await q.dead_letter(first, "a record that cannot be stored")
    await q.dead_letter(second, "another")
    assert sorted(x.reason for x in await q.dead_letters()) == ["a record that cannot be stored", "another"]
    policy = json.loads((await raw_attributes(q.name))["RedrivePolicy"])
    assert policy["deadLetterTargetArn"] == (await raw_attributes(q.dlq_name))["QueueArn"]


@needs_server
async def test_standard_queue_delivers_everything_and_says_order_is_best_effort(
    queues: list[SQSQueue], tmp_path: Path
) -> None:
    url = fresh(fifo=False)
    q = await open_(url, queues)
    messages = keyed_records(keys=5, per_key=40)
    await q.publish(messages)
    seen: set[bytes] = set()
    deadline = time.monotonic() + 60
    while len(seen) < len(messages):
        assert time.monotonic() < deadline
        got = await q.consume(100, 1.0)
        seen |= {d.value for d in got}
        await q.ack(got)
    assert seen == {m.value for m in messages}
    st = await q.status()
    assert st.lag == 0 and any("best-effort" in n for n in st.notes)

    # and the operator's view says so
    env = {**os.environ, "LLMTAP_QUEUE": url, "LLMTAP_DATA_DIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "llmtap.cli", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "order best-effort" in r.stdout and "in flight 0" in r.stdout, r.stdout


def services(*args: str) -> None:
    subprocess.run([str(SERVICES), *args], check=True, capture_output=True, timeout=180)


@needs_server
@pytest.mark.slow
@pytest.mark.skipif(not os.access(SERVICES, os.X_OK), reason="scripts/services.sh is missing")
async def test_server_outage_fails_fast_and_resumes_without_loss(queues: list[SQSQueue]) -> None:
    url = fresh()
    producer = await open_(url, queues, "producer", op_timeout=3)
    consumer = await open_(url, queues, "consumer", op_timeout=3)
    before = keyed_records(keys=6, per_key=20)
    await producer.publish(before)
    await asyncio.to_thread(services, "stop", "sqs")
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable) as e:
            await producer.publish(keyed_records(keys=6, per_key=1))
        took = time.monotonic() - t0
        print(f"publish during an SQS outage raised BackendUnavailable after {took:.3f}s: {e.value}")
        assert took < 8
        with pytest.raises(BackendUnavailable):
            await consumer.consume(10, 0.5)
    finally:
        await asyncio.to_thread(services, "start", "sqs")
    after = [m for m in keyed_records(keys=6, per_key=40) if parse(m.value)[1] >= 20]
    deadline = time.monotonic() + 60
    while True:
        try:
            await producer.publish(after)
            break
        except BackendUnavailable:
            assert time.monotonic() < deadline, "publishing did not resume"
            await asyncio.sleep(0.5)
    wanted = {parse(m.value) for m in before + after}
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 60
    while not wanted <= seen:
        assert time.monotonic() < deadline, f"missing {len(wanted - seen)} of {len(wanted)}"
        try:
            batch = await consumer.consume(200, 0.5)
            seen |= {parse(d.value) for d in batch}
            await consumer.ack(batch)
        except BackendUnavailable:
            await asyncio.sleep(0.5)


@needs_server
@pytest.mark.slow
@pytest.mark.skipif(not os.access(SERVICES, os.X_OK), reason="scripts/services.sh is missing")
async def test_acknowledged_sends_survive_a_broker_stop_with_sends_in_flight(queues: list[SQSQueue]) -> None:
    """A publish that returned is durable, even when the broker stops while others are in flight.

    This is the contract the gateway relies on (it forgets a batch once `publish` returned), so it
    also checks the test server: ElasticMQ's H2 store kept the last ~500 ms of acknowledged sends
    in memory (H2's write delay) and lost them on stop, 40-73 of ~2,000 here, until
    `scripts/services.sh` set `WRITE_DELAY=0`."""
    url = fresh()
    producer = await open_(url, queues, "producer", op_timeout=3)
    acked: list[Message] = []
    stopping = False

    async def lane(k: int) -> None:
        s = 0
        while not stopping:
            batch = [record(f"lane-{k}", s + i) for i in range(10)]
            s += 10
            try:
                await producer.publish(batch)
            except BackendUnavailable:
                await asyncio.sleep(0.05)  # the broker is stopping: that batch was never acknowledged
                continue
            acked.extend(batch)

    lanes = [asyncio.create_task(lane(k)) for k in range(8)]
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 300:  # sends are flowing (a busy machine may take its time)
            assert time.monotonic() < deadline, f"only {len(acked)} acknowledged"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(services, "stop", "sqs")
    finally:
        stopping = True
        await asyncio.gather(*lanes)
        await asyncio.to_thread(services, "start", "sqs")
    consumer = await open_(url, queues, "consumer", op_timeout=3)
    wanted = {parse(m.value) for m in acked}
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 90
    while not wanted <= seen:
        if time.monotonic() > deadline:
            lost = sorted(wanted - seen)
            raise AssertionError(f"{len(lost)} of {len(wanted)} acknowledged records lost: {lost[:10]}")
        try:
            batch = await consumer.consume(200, 0.5)
            seen |= {parse(d.value) for d in batch}
            await consumer.ack(batch)
        except BackendUnavailable:
            await asyncio.sleep(0.5)
    print(f"{len(wanted)} acknowledged before and while the broker stopped: all there after its start")


@needs_server
async def test_gateway_sends_a_batch_sqs_refuses_to_the_next_sink_not_the_floor(
    queues: list[SQSQueue], tmp_path: Path
) -> None:
    """A record too big for SQS (here: an inline limit raised to 1 MB, so a 400 KB body travels
    inline) goes with its batch to the ingest endpoint; the next batches go to SQS again.
    Nothing is dropped."""
    from llmtap.config import Settings
    from llmtap.gateway.capture import Capture
    from llmtap.gateway.publisher import Publisher, QueueSink, Sink
    from llmtap.record import LogRecord, decode

    class Ingest(Sink):
        route = "ingest"

        def __init__(self) -> None:
            self.records: list[LogRecord] = []

        async def send(self, records: Any) -> None:
            self.records.extend(records)

    def capture(i: int, body: bytes) -> Capture:
        now = time.perf_counter()
        cap = Capture(
            str(uuid.UUID(int=i + 1)), "default", "openai", "POST", "/v1/chat/completions",
            "https://api.openai.com/v1/chat/completions", [("Content-Type", "application/json")], [],
            body, len(body), time.time(), now, 4 * 1024 * 1024,
        )  # fmt: skip
        cap.status = 200
        cap.response_headers = [("Content-Type", "application/json")]
        cap.t_headers = cap.t_first = now + 0.001
        cap.add(b'{"id":"c1","usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
        cap.t_end = now + 0.002
        return cap

    q = await open_(fresh(), queues)
    ingest = Ingest()
    s = Settings(data_dir=tmp_path, publish_linger_ms=1.0, inline_body_bytes=1 << 20)  # type: ignore[call-arg]
    pub = Publisher(s, [QueueSink(q), ingest])
    await pub.start()
    try:
        big = json.dumps({"model": "m", "prompt": os.urandom(200_000).hex()}).encode()
        pub.submit(capture(0, big))
        pub.submit(capture(1, b'{"model": "m"}'))
        await pub.flush()
        deadline = time.monotonic() + 10
        while pub.published < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # past the breaker's first pause, though a refusal opens none
        pub.submit(capture(2, b'{"model": "m"}'))
        await pub.flush()
    finally:
        await pub.stop(timeout=5)
    assert pub.dropped == 0 and pub.published == 3
    assert str(uuid.UUID(int=1)) in {r.id for r in ingest.records}
    via_sqs = {decode(d.value).id for d in await take(q, 3 - len(ingest.records))}
    assert str(uuid.UUID(int=3)) in via_sqs
    assert via_sqs | {r.id for r in ingest.records} == {str(uuid.UUID(int=i)) for i in (1, 2, 3)}


@needs_server
async def test_a_letter_too_large_for_the_dead_letter_queue_is_shortened_not_retried_forever(
    queues: list[SQSQueue], tmp_path: Path
) -> None:
    """A message that fits the queue need not fit its letter (the reason and offsets travel as
    attributes): refused on every try, the batch was retried forever and the records after it
    in its group were never stored. Now the letter holds the message's head, and they are."""
    import sqlite3

    from llmtap.config import Settings
    from llmtap.handlers.chain import Chain
    from llmtap.handlers.store import StoreHandler
    from llmtap.record import encode
    from llmtap.store.sqlite import SQLiteStore
    from llmtap.worker.worker import LETTER_HEAD, WorkerService
    from store_helpers import rec

    url = fresh()
    q = await open_(url, queues, "producer")
    poison = b'{"not": "a record", "pad": "' + b"x" * (q.max_bytes - 100) + b'"}'
    good = rec(1, id="after-the-poison")
    await q.publish([Message("acme", poison, id="poison"), Message("acme", encode(good), id="good")])
    store = SQLiteStore(str(tmp_path / "store.db"))
    await store.connect()
    settings = Settings(data_dir=tmp_path, worker_batch_size=1, worker_linger_ms=0, shutdown_timeout=5)
    worker = WorkerService(
        settings,
        queue=SQSQueue(url, 6, "workers", visibility_timeout=4),
        store=store,
        chain=Chain([StoreHandler(store)]),
    )
    await worker.start()

    def stored() -> bool:
        with sqlite3.connect(tmp_path / "store.db") as db:
            return db.execute("SELECT count(*) FROM requests WHERE id = ?", (good.id,)).fetchone()[0] == 1

    try:
        deadline = time.monotonic() + 90
        while not stored():
            assert time.monotonic() < deadline, (
                f"the record after the poison was never stored: {worker.stats}"
            )
            await asyncio.sleep(0.2)
    finally:
        await worker.stop()
        await store.close()
    assert worker.stats.dead_lettered == 1
    (letter,) = await q.dead_letters()
    assert letter.value == poison[:LETTER_HEAD]
    assert f"the letter holds the first {LETTER_HEAD} of its {len(poison)} bytes" in letter.reason
