"""Fallback sinks: ingest through a real `llmtap server`, the disk spool, and replay into a queue.

Counts what went in and what came out, and the route each record took.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmtap.config import Settings
from llmtap.errors import BackendUnavailable
from llmtap.gateway.sinks import REPLAY_CHUNK, IngestSink, SpoolReplayer, SpoolSink
from llmtap.gateway.spool import DiskSpool
from llmtap.queue.sqlite import SQLiteQueue
from llmtap.record import LogRecord, Usage, decode
from llmtap.server.app import ServerService
from llmtap.store import StatsQuery


def _record(i: int, tenant: str = "default") -> LogRecord:
    now = datetime.now(UTC)
    return LogRecord(
        id=str(uuid.uuid4()),
        tenant=tenant,
        provider="openai",
        target_url="http://upstream/v1/chat/completions",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        started_at=now,
        ended_at=now,
        latency_ms=1.0 + i,
        status=200,
        usage=Usage(source="provider", prompt_tokens=10, completion_tokens=i, total_tokens=10 + i),
        user_id=f"u{i % 3}",
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerService]:
    settings = Settings(host="127.0.0.1", server_port=0, data_dir=tmp_path / "data", ingest_token="s3cret")
    svc = ServerService(settings)
    await svc.start()
    yield svc
    await svc.stop()


async def test_ingest_sink_stores_through_the_server_with_route_ingest(server: ServerService) -> None:
    sink = IngestSink(f"http://127.0.0.1:{server.port}", "s3cret")
    await sink.start()
    records = [_record(i) for i in range(25)]
    await sink.send(records)
    await sink.close()
    await server.ingest.drained()  # the answer means durable on the server; stored right after
    for r in records:
        row = await server.store.get_request("default", r.id)
        assert row is not None and row["route"] == "ingest"
    stats = await server.store.stats("default", StatsQuery())
    assert stats["overall"]["count"] == 25


async def test_ingest_sink_wrong_token_or_dead_server_is_an_outage(server: ServerService) -> None:
    bad = IngestSink(f"http://127.0.0.1:{server.port}", "wrong")
    await bad.start()
    with pytest.raises(BackendUnavailable, match="401"):
        await bad.send([_record(1)])
    await bad.close()
    dead = IngestSink("http://127.0.0.1:1", "s3cret", timeout=2)
    await dead.start()
    with pytest.raises(BackendUnavailable, match="unreachable"):
        await dead.send([_record(1)])
    await dead.close()


async def test_spool_then_replay_into_a_real_queue_keeps_every_record_and_key(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
    sink = SpoolSink(spool, partition_by="user_id")
    records = [_record(i, tenant="acme") for i in range(1200)]
    for i in range(0, 1200, 300):
        await sink.send(records[i : i + 300])
    await sink.close()
    assert spool.pending()

    q = SQLiteQueue(str(tmp_path / "queue.db"), partitions=4)
    await q.connect("both")
    try:
        replayer = SpoolReplayer(DiskSpool(tmp_path / "spool", max_bytes=50_000_000), q)
        assert await replayer.replay_once() == 1200
        assert not spool.pending()
        got: list[LogRecord] = []
        keys: dict[str, str] = {}
        while len(got) < 1200:
            ds = await q.consume(500, timeout=1)
            assert ds, "queue ran dry early"
            for d in ds:
                r = decode(d.value)
                got.append(r)
                keys[r.id] = d.key
            await q.ack(ds)
        assert sorted(r.id for r in got) == sorted(r.id for r in records)
        assert all(r.route == "spool" for r in got)
        assert all(keys[r.id] == r.user_id for r in got)  # partition key preserved
    finally:
        await q.close()


class _FlakyQueue(SQLiteQueue):
    fail_after: int | None = None
    published = 0

    async def publish(self, messages):  # type: ignore[no-untyped-def]
        if self.fail_after is not None and self.published >= self.fail_after:
            raise BackendUnavailable("broker went away")
        await super().publish(messages)
        self.published += 1


async def test_replay_cut_short_by_an_outage_keeps_the_segment_and_loses_nothing(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
    sink = SpoolSink(spool)
    records = [_record(i) for i in range(1100)]  # replays in chunks of REPLAY_CHUNK (100)
    await sink.send(records)
    await sink.close()
    q = _FlakyQueue(str(tmp_path / "queue.db"), partitions=2)
    await q.connect("both")
    try:
        q.fail_after = 1
        replayer = SpoolReplayer(spool, q)
        with pytest.raises(BackendUnavailable):
            await replayer.replay_once()
        assert spool.pending()  # the segment stays until every batch went through
        q.fail_after = None
        assert await replayer.replay_once() == 1100
        assert not spool.pending()
        ids: list[str] = []
        while True:
            ds = await q.consume(1000, timeout=0.5)
            if not ds:
                break
            ids += [decode(d.value).id for d in ds]
            await q.ack(ds)
        # at least once: the first batch twice, every record present
        assert set(ids) == {r.id for r in records}
        assert len(ids) == 1100 + REPLAY_CHUNK
    finally:
        await q.close()


class _SizeLimitedQueue(SQLiteQueue):
    """Refuses a batch holding a message over 64 KiB, as Kafka does (MessageSizeTooLarge)."""

    async def publish(self, messages):  # type: ignore[no-untyped-def]
        if any(len(m.value) > 65536 for m in messages):
            raise ValueError("MessageSizeTooLargeError: the message is too large")
        await super().publish(messages)


async def test_one_bad_record_costs_the_spool_only_itself(tmp_path: Path) -> None:
    """Issue 7: a record with a header byte that was not UTF-8 could not be spooled (the whole
    batch failed), and a spooled record the queue refuses blocked its segment's replay forever."""
    spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
    sink = SpoolSink(spool, partition_by="user_id")
    records = [_record(i) for i in range(20)]
    records[3].request_headers = {"x-odd": "caf\udcff"}
    records[4].user_id = "u\udcfe"  # also the partition key
    records[11].request_headers = {"x-huge": "z" * 100_000}
    await sink.send(records)
    await sink.close()
    q = _SizeLimitedQueue(str(tmp_path / "queue.db"), partitions=2)
    await q.connect("both")
    try:
        replayer = SpoolReplayer(spool, q)
        assert await replayer.replay_once() == 20
        assert not spool.pending() and replayer.dropped == 0
        got: dict[str, LogRecord] = {}
        while True:
            ds = await q.consume(1000, timeout=0.5)
            if not ds:
                break
            got.update((r.id, r) for r in (decode(d.value) for d in ds))
            await q.ack(ds)
        assert set(got) == {r.id for r in records}
        assert got[records[3].id].request_headers == {"x-odd": "caf\\xff"}
        assert got[records[4].id].user_id == "u\\xfe"
        bare = got[records[11].id]
        assert bare.request_headers == {} and bare.error and "MessageSizeTooLarge" in bare.error
    finally:
        await q.close()
