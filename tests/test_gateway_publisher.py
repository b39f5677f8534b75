"""The publisher on its own: batching, the sink chain, the memory bound, shutdown flushing.

Every test counts what went in and what came out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import orjson
import pytest

from gateway_support import DirBodyStore, MemoryQueue, wait_for
from llmtap.bodies import offload
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable
from llmtap.gateway.capture import CAPTURE_OVERHEAD, Capture
from llmtap.gateway.publisher import Publisher, QueueSink, Sink
from llmtap.queue.base import Message
from llmtap.record import LogRecord, Route, decode, encode, partition_key
from llmtap.testing.sinks import ListSink

pytestmark = pytest.mark.timeout(60)

BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
RESPONSE = b'{"id":"c1","model":"gpt-4o","usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'


def capture(i: int, tenant: str = "default") -> Capture:
    now = time.perf_counter()
    cap = Capture(
        f"00000000-0000-4000-8000-{i:012d}",
        tenant,
        "openai",
        "POST",
        "/v1/chat/completions",
        "https://api.openai.com/v1/chat/completions",
        [("Content-Type", "application/json"), ("Authorization", "Bearer sk-x")],
        [("Llmtap-User-Id", f"user-{i % 3}")],
        BODY,
        len(BODY),
        time.time(),
        now,
        4 * 1024 * 1024,
    )
    cap.status = 200
    cap.response_headers = [("Content-Type", "application/json")]
    cap.t_headers = cap.t_first = now + 0.001
    cap.add(RESPONSE)
    cap.t_end = now + 0.002
    return cap


def settings(tmp_path: Path, **over: object) -> Settings:
    base: dict[str, object] = {"data_dir": tmp_path, "publish_linger_ms": 1.0}
    base.update(over)
    return Settings(**base)  # type: ignore[arg-type]


async def test_batches_and_partition_keys(tmp_path: Path) -> None:
    q = MemoryQueue()
    s = settings(tmp_path, publish_batch_size=50, publish_linger_ms=50.0, partition_key="user_id")
    pub = Publisher(s, [QueueSink(q, s.partition_key)])
    await pub.start()
    for i in range(120):
        pub.submit(capture(i))
    await wait_for(lambda: len(q.messages) == 120)
    # a full batch does not wait for the linger: 120 = 50 + 50 + 20
    assert q.publish_calls == 3
    recs = [decode(m.value) for m in q.messages]
    assert [r.id for r in recs] == [capture(i).id for i in range(120)]
    assert all(
        m.key == partition_key(r, "user_id") == f"user-{i % 3}"
        for i, (m, r) in enumerate(zip(q.messages, recs, strict=True))
    )
    assert recs[0].usage.total_tokens == 11 and recs[0].model == "gpt-4o"
    assert "authorization" not in recs[0].request_headers
    assert pub.published == 120 and pub.routes["queue"] == 120 and pub.buffer_bytes == 0
    await pub.stop(timeout=1)


async def test_chain_falls_through_and_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llmtap")
    q = MemoryQueue()
    ingest = ListSink("ingest")
    pub = Publisher(settings(tmp_path), [QueueSink(q), ingest])
    await pub.start()
    q.down = True
    for i in range(10):
        pub.submit(capture(i))
    await wait_for(lambda: len(ingest.records) == 10)
    q.down = False
    await asyncio.sleep(1.1)  # the queue's circuit breaker stays open a moment after a failure
    for i in range(10, 15):
        pub.submit(capture(i))
    await wait_for(lambda: len(q.messages) == 5)
    assert {r.route for r in ingest.records} == {"ingest"}
    assert pub.routes == {"ingest": 10, "queue": 5}
    assert pub.failed >= 1 and pub.dropped == 0
    await pub.stop(timeout=1)
    assert ingest.closed
    # Logged: the queue down once (the warning is throttled), and once when it is back.
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("llmtap")]
    assert sum("queue unavailable" in line for line in lines) == 1, lines
    assert sum("queue works again" in line for line in lines) == 1, lines


async def test_a_body_store_outage_is_said_when_it_begins_and_when_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Records with a body above the inline limit go to the spool while the body store is
    down; the log said when it went down and never that it was back."""
    caplog.set_level(logging.WARNING, logger="llmtap")
    q = MemoryQueue()
    spool = ListSink("spool", large_bodies=True)
    store = DirBodyStore(tmp_path / "bodies")
    await store.connect()
    s = settings(tmp_path, inline_body_bytes=4096)
    pub = Publisher(s, [QueueSink(q), spool], bodies=store)
    await pub.start()

    def big(i: int) -> Capture:
        cap = capture(i)
        data = b'{"model":"gpt-4o","input":"' + os.urandom(20_000).hex().encode() + b'"}'
        cap.request_body, cap.request_size = data, len(data)
        return cap

    store.down = True
    pub.submit(big(0))
    await wait_for(lambda: len(spool.records) == 1)
    store.down = False
    await asyncio.sleep(1.1)  # the body store's breaker stays open a moment after a failure
    pub.submit(big(1))
    await wait_for(lambda: len(q.messages) == 1)
    await pub.stop(timeout=1)
    assert store.puts == 1 and pub.dropped == 0
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("llmtap")]
    assert sum("body store unavailable" in line for line in lines) == 1, lines
    assert sum("body store works again" in line for line in lines) == 1, lines


async def test_all_sinks_down_holds_then_delivers_in_order(tmp_path: Path) -> None:
    q = MemoryQueue()
    ingest = ListSink("ingest")
    q.down = ingest.down = True
    pub = Publisher(settings(tmp_path, publish_batch_size=4), [QueueSink(q), ingest])
    await pub.start()
    for i in range(20):
        pub.submit(capture(i))
    await wait_for(lambda: q.refused >= 3)
    assert pub.pending == 20 and pub.published == 0
    assert pub.buffer_bytes == sum(capture(i).nbytes for i in range(20))
    q.down = False
    await wait_for(lambda: len(q.messages) == 20)
    assert [decode(m.value).id for m in q.messages] == [capture(i).id for i in range(20)]
    assert pub.buffer_bytes == 0 and pub.dropped == 0
    await pub.stop(timeout=1)


async def test_memory_bound_drops_are_counted_not_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q = MemoryQueue()
    q.down = True
    one = capture(0).nbytes
    assert one > CAPTURE_OVERHEAD
    pub = Publisher(settings(tmp_path, publish_buffer_bytes=one * 5), [QueueSink(q)])
    await pub.start()
    for i in range(12):
        pub.submit(capture(i))
    assert pub.dropped == 7 and pub.submitted == 5
    # An outside check: one WARNING "1 dropped so far" for 30 records lost, no id, and the
    # later ones never logged. Now every one lost is named, at ERROR, within a second.
    await wait_for(lambda: any(r.levelname == "ERROR" for r in caplog.records))
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "7 records lost in the last second" in line and "7 lost since start" in line, line
    assert all(capture(i).id in line for i in range(5, 12)), line
    for i in range(12, 40):  # more than a line names: the rest are counted
        pub.submit(capture(i))
    await wait_for(lambda: sum(r.levelname == "ERROR" for r in caplog.records) == 2)
    line = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert "28 records lost" in line and " and 8 more;" in line and "35 lost since start" in line, line
    assert pub.submitted + pub.dropped_full == 40  # llmtap_gateway_captures_total: every request
    q.down = False
    await wait_for(lambda: len(q.messages) == 5)
    assert pub.published + pub.dropped == 40
    pub.buffer_bytes = pub.buffer_limit  # full again: this one is given up just before the stop
    pub.submit(capture(40))
    await pub.stop(timeout=1)  # named at the stop: its report's timer dies with the loop
    line = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert "1 records lost" in line and capture(40).id in line, line


async def test_stop_flushes_everything_pending(tmp_path: Path) -> None:
    q = MemoryQueue()
    pub = Publisher(settings(tmp_path, publish_linger_ms=10_000.0, publish_batch_size=1000), [QueueSink(q)])
    await pub.start()
    for i in range(300):
        pub.submit(capture(i))
    await asyncio.sleep(0.05)
    assert q.messages == []  # still lingering
    await pub.stop(timeout=5)
    assert len(q.messages) == 300 and pub.pending == 0


async def test_a_lone_capture_after_a_quiet_spell_does_not_wait_for_the_linger(tmp_path: Path) -> None:
    """Light traffic: lingering batches nothing and only adds a wake-up (and delay before the
    record is durable). A capture alone after no batch was sent for a linger goes at once;
    one that follows closely, or a burst, still waits to fill a batch."""
    q = MemoryQueue()
    s = settings(tmp_path, publish_linger_ms=3_600_000.0, publish_batch_size=1000)
    pub = Publisher(s, [QueueSink(q)])
    await pub.start()
    try:
        pub.submit(capture(0))
        await wait_for(lambda: len(q.messages) == 1, timeout=60)  # not an hour later
        pub.submit(capture(1))  # a batch was sent just now: this one lingers
        await asyncio.sleep(0.05)
        assert len(q.messages) == 1 and pub.pending == 1
    finally:
        await pub.stop(timeout=5)
    assert [decode(m.value).id for m in q.messages] == [capture(i).id for i in range(2)]
    assert pub.published == 2 and pub.pending == 0


async def test_stop_deadline_with_queue_down_counts_the_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q = MemoryQueue()
    q.down = True
    pub = Publisher(settings(tmp_path), [QueueSink(q)])
    await pub.start()
    for i in range(7):
        pub.submit(capture(i))
    t0 = time.monotonic()
    await pub.stop(timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    assert pub.dropped == 7 and q.messages == []
    # Named, as any other record given up (the audit found only the count).
    (line,) = [r.getMessage() for r in caplog.records if "shutdown deadline" in r.getMessage()]
    assert "7 records could not be published" in line and all(capture(i).id in line for i in range(7)), line


async def test_a_capture_finished_as_or_after_the_publisher_stops_is_spooled_or_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """rev23a: a request recorded during the stop (an orphan) finished after the publisher's
    loop had looked for the last time: its record sat in memory, unseen, and was gone."""
    q, spool = MemoryQueue(), ListSink("spool")
    pub = Publisher(settings(tmp_path), [QueueSink(q)], overflow=spool)
    await pub.start()
    pub.submit(capture(0))
    pub._stopping = True  # the loop's last look, as `stop` makes it: it publishes and returns
    pub._wake.set()
    assert pub._task is not None
    await pub._task
    pub.submit(capture(1))  # after that look, before the stop is over
    await pub.stop(timeout=5)
    assert [decode(m.value).id for m in q.messages] == [capture(0).id]
    assert [r.id for r in spool.records] == [capture(1).id] and pub.dropped == 0
    pub.submit(capture(2))  # once it stopped: counted and named at once
    assert pub.dropped == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(capture(2).id in line for line in errors), errors


async def test_poison_batch_is_given_up(tmp_path: Path) -> None:
    class Broken(Sink):
        calls = 0

        async def send(self, records: Sequence[LogRecord]) -> None:
            Broken.calls += 1
            raise RuntimeError("message too large")

    pub = Publisher(settings(tmp_path), [Broken()])
    await pub.start()
    pub.submit(capture(1))
    await wait_for(lambda: pub.dropped == 1, timeout=10)
    # 5 rounds in full, then 2 of its bare form; counted and logged, never silent.
    assert Broken.calls == 5 + 2 and pub.pending == 0 and pub.poisoned == 1
    await pub.stop(timeout=1)


async def test_one_refused_record_costs_only_itself_not_its_batch(tmp_path: Path) -> None:
    """Issue 7: the publisher used to give up the whole batch (hundreds of other clients'
    records) when the queue refused one record or one record could not be encoded."""

    class SizeLimitedQueue(QueueSink):
        """Refuses a batch holding a message over 3000 bytes, like Kafka over its message size
        (`MessageSizeTooLarge`); a normal record here is about 1000."""

        async def send(self, records: Sequence[LogRecord]) -> None:
            if any(len(encode(r)) > 3000 for r in records):
                raise ValueError("MessageSizeTooLargeError: the message is too large")
            await super().send(records)

    q = MemoryQueue()
    pub = Publisher(settings(tmp_path), [SizeLimitedQueue(q)])
    caps = [capture(i) for i in range(1, 8)]
    caps[2].request_headers = [("x-odd", "caf\udcff")]  # a header byte that was not UTF-8
    caps[4].request_headers = [("x-huge", "z" * 4000)]  # within the header limits
    for cap in caps:
        pub.submit(cap)  # before start: one batch
    await pub.start()
    await wait_for(lambda: len(q.messages) == 7, timeout=20)
    got = [decode(m.value) for m in q.messages]
    assert [r.id for r in got] == [c.id for c in caps]  # all of them, in order
    assert got[2].request_headers["x-odd"] == "caf\\xff" and got[2].error is None
    assert got[4].request_headers == {} and got[4].error and "MessageSizeTooLarge" in got[4].error
    assert got[4].status == 200 and got[4].tenant == "default"
    assert [r.error for i, r in enumerate(got) if i != 4] == [None] * 6
    assert pub.poisoned == 1 and pub.dropped == 0
    await pub.stop(timeout=1)


async def test_build_error_still_publishes_a_bare_record(tmp_path: Path) -> None:
    q = MemoryQueue()
    pub = Publisher(settings(tmp_path), [QueueSink(q)])
    await pub.start()
    cap = capture(1)
    cap.llmtap = [("Llmtap-User-Id", None)]  # type: ignore[list-item]  # garbage a bug could leave
    cap.request_headers = 42  # type: ignore[assignment]
    pub.submit(cap)
    pub.submit(capture(2))
    await wait_for(lambda: len(q.messages) == 2)
    bare, ok = (decode(m.value) for m in q.messages)
    assert bare.id == cap.id and bare.error and "could not build" in bare.error
    assert ok.error is None and pub.build_errors == 1
    await pub.stop(timeout=1)


def test_capture_cap_keeps_head_and_a_bounded_tail_and_usage_survives() -> None:
    from llmtap.gateway.capture import TAIL_BYTES, RecordBuilder
    from llmtap.record import body_bytes

    def ev(obj: dict[str, object]) -> bytes:
        return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [],
            "usage": {"input_tokens": 11, "output_tokens": 1},
        },
    }
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * 500}}
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4321}}
    stream = ev(start) + ev(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    )
    stream += (
        ev(delta) * 600
        + ev({"type": "content_block_stop", "index": 0})
        + ev(end)
        + ev({"type": "message_stop"})
    )
    cap = capture(7)
    cap.provider = "anthropic"
    cap.max_bytes = 64 * 1024
    cap.chunks, cap.response_size = [], 0
    cap.streamed = True
    for i in range(0, len(stream), 1000):  # network-sized reads, boundaries anywhere
        cap.add(stream[i : i + 1000])
    assert cap.truncated and cap.response_size == len(stream) > 4 * cap.max_bytes
    assert sum(len(c) for c in cap.chunks) == cap.max_bytes
    assert cap.tail is not None and TAIL_BYTES - 1000 < cap.tail_size <= TAIL_BYTES
    assert stream.endswith(b"".join(cap.tail))
    assert cap.nbytes < 2 * cap.max_bytes + 2 * TAIL_BYTES

    rec = RecordBuilder(inline_body_bytes=1 << 20, gateway="t").build(cap)
    assert offload.fits(rec, 1 << 20)  # all inline: nothing for the body store
    assert rec.usage.prompt_tokens == 11 and rec.usage.completion_tokens == 4321  # from the tail
    assert rec.response_events is not None and rec.response_events.truncated
    assert rec.response_events.size == len(stream)
    assert body_bytes(rec.response_events) == stream[: cap.max_bytes]


def test_capture_head_and_tail_do_not_overlap() -> None:
    cap = capture(8)
    cap.max_bytes = 10
    cap.chunks, cap.response_size = [], 0
    for piece in (b"aaaa", b"bbbbbbbb", b"cccc"):
        cap.add(piece)
    assert b"".join(cap.chunks) == b"aaaabbbbbb"
    assert cap.tail is not None and b"".join(cap.tail) == b"bbcccc"
    assert cap.response_size == 16 and cap.truncated


class SlowQueue(MemoryQueue):
    """A queue that takes its time: publish waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def publish(self, messages: Sequence[Message]) -> None:
        await self.release.wait()
        await super().publish(messages)


async def test_overflow_goes_to_the_overflow_sink_while_the_queue_is_slow(tmp_path: Path) -> None:
    q = SlowQueue()
    spool = ListSink("spool")
    one = capture(0).nbytes
    s = settings(tmp_path, publish_buffer_bytes=one * 10, publish_batch_size=4)
    pub = Publisher(s, [QueueSink(q), spool], overflow=spool)
    await pub.start()
    for i in range(30):
        pub.submit(capture(i))
        # Traffic over time: the overflow path keeps up. (Paced by 2 ms sleeps, a loaded CI
        # machine let 10 captures pile up on it, and the next was dropped.)
        await wait_for(lambda: pub.spill_bytes == 0)
    await wait_for(lambda: len(spool.records) == 20)  # 10 fit the buffer, 20 overflow at once
    assert q.messages == [] and pub.dropped == 0 and pub.spilled == 20
    q.release.set()
    # The counters move once the publish call has returned, after the queue holds the messages.
    await wait_for(lambda: len(q.messages) == 10 and pub.published == 30)
    ids = {decode(m.value).id for m in q.messages} | {r.id for r in spool.records}
    assert ids == {capture(i).id for i in range(30)}
    assert {r.route for r in spool.records} == {"spool"}
    assert pub.published == 30 and pub.routes == {"queue": 10, "spool": 20}
    await pub.stop(timeout=1)
    assert pub.spill_bytes == 0 and pub.buffer_bytes == 0


async def stuck_queue_and_spool_down(tmp_path: Path) -> tuple[SlowQueue, ListSink, Publisher]:
    """A queue that takes nothing until released, room for 3 captures in the buffer and 3 on
    the overflow path, and an overflow sink (the spool) that is down."""
    q = SlowQueue()
    spool = ListSink("spool")
    spool.down = True
    one = capture(0).nbytes
    pub = Publisher(settings(tmp_path, publish_buffer_bytes=one * 3), [QueueSink(q)], overflow=spool)
    await pub.start()
    return q, spool, pub


async def test_overflow_path_full_or_failing_counts_drops(tmp_path: Path) -> None:
    q, _, pub = await stuck_queue_and_spool_down(tmp_path)
    for i in range(10):
        pub.submit(capture(i))
    assert pub.dropped == 4  # 3 in the buffer, 3 on the overflow path, the rest over both bounds
    await wait_for(lambda: pub.failed >= 3)  # the overflow sink failing: its 3 are tried again...
    assert pub.dropped == 4 and pub.pending == 6
    q.release.set()
    await pub.stop(timeout=2)  # ...until the stop deadline, when the spool still refuses them
    assert len(q.messages) == 3 and pub.dropped == 7 and pub.published + pub.dropped == 10


async def test_an_overflow_sink_that_fails_for_a_while_loses_nothing(tmp_path: Path) -> None:
    """A write to the disk spool can fail for a moment (found live: a segment the replayer
    deleted between the spool's listing and its size check). The records on the overflow path
    are only in memory: they are kept and written once it works again, not dropped."""
    q, spool, pub = await stuck_queue_and_spool_down(tmp_path)
    for i in range(6):  # 3 fit the buffer (the queue is stuck), 3 take the overflow path
        pub.submit(capture(i))
    await wait_for(lambda: pub.failed >= 3)
    assert pub.dropped == 0 and spool.records == []
    spool.down = False
    await wait_for(lambda: len(spool.records) == 3)
    q.release.set()
    await pub.stop(timeout=5)
    ids = {decode(m.value).id for m in q.messages} | {r.id for r in spool.records}
    assert ids == {capture(i).id for i in range(6)}
    assert pub.dropped == 0 and pub.spilled == 3 and pub.spill_bytes == 0


async def test_breaker_sends_batches_straight_on_during_an_outage(tmp_path: Path) -> None:
    """While the queue is down, later batches skip it instead of each waiting for it to fail."""
    q = MemoryQueue()
    ingest = ListSink("ingest")
    pub = Publisher(settings(tmp_path, publish_batch_size=2), [QueueSink(q), ingest])
    await pub.start()
    q.down = True
    for i in range(20):
        pub.submit(capture(i))
    await wait_for(lambda: len(ingest.records) == 20)
    assert q.refused < 5  # 10 batches, but the breaker let only the first attempts through
    await pub.stop(timeout=1)


async def test_shutdown_deadline_spools_what_is_left_instead_of_dropping(tmp_path: Path) -> None:
    from llmtap.gateway.sinks import SpoolSink
    from llmtap.gateway.spool import DiskSpool

    q = MemoryQueue()
    q.down = True
    spool = DiskSpool(tmp_path / "spool", 1 << 30)
    stuck = ListSink("ingest")
    stuck.down = True
    pub = Publisher(
        settings(tmp_path, publish_batch_size=5), [QueueSink(q), stuck], overflow=SpoolSink(spool)
    )
    await pub.start()
    for i in range(40):
        pub.submit(capture(i))
    await asyncio.sleep(0.2)
    await pub.stop(timeout=0.3)  # every sink of the chain refuses: the deadline passes
    assert pub.dropped == 0
    got = [v for seg in spool.segments_for_replay() for batch in spool.replay(seg) for v in batch]
    assert len(got) == 40


class FirstSendHangs(ListSink):
    """An overflow sink whose first write hangs (a disk stalled on fsync); later writes work."""

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.entered = asyncio.Event()
        self.calls = 0

    async def send(self, records: Sequence[LogRecord]) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            await asyncio.Event().wait()
        await super().send(records)


async def test_a_spill_batch_on_its_way_counts_as_pending_and_is_rescued_at_the_deadline(
    tmp_path: Path,
) -> None:
    """Captures taken off the overflow path are still only in memory until the spool has them:
    /healthz's `pending_records` must count them (a gateway once said 0 with 270 in flight) and
    the shutdown deadline must write them, not forget them."""
    q = SlowQueue()
    spool = FirstSendHangs("spool")
    one = capture(0).nbytes
    pub = Publisher(settings(tmp_path, publish_buffer_bytes=one * 3), [QueueSink(q)], overflow=spool)
    await pub.start()
    for i in range(6):  # 3 fit the buffer (stuck on the queue), 3 take the overflow path
        pub.submit(capture(i))
    await asyncio.wait_for(spool.entered.wait(), 10)
    assert pub.published == 0 and pub.dropped == 0
    assert pub.pending == 6
    await pub.stop(timeout=0.3)
    assert pub.dropped == 0, pub.dropped
    assert sorted(r.id for r in spool.records) == sorted(capture(i).id for i in range(6))
    assert pub.pending == 0


@pytest.mark.parametrize(
    ("values", "cut"),
    [
        (["ü" * 1024], False),  # at the fast path's edge: 2 KB, nothing to cut
        (["𝄞" * 1024], False),  # 4-byte characters: exactly the 4096-byte value limit
        (["𝄞" * 1025], True),  # one character more: cut
        (["a" * 600, "𝄞" * 600], False),  # past the edge, every value and the total fit
        (["x" * 4000] * 9, True),  # each fits, all together exceed 32 KB
        # short, but a query to mask (a key's shape anywhere in a value drops it whole: rev23)
        (["https://h/p?api_key=hunter2-secret"], False),
    ],
)
def test_recorded_headers_hold_their_limits_and_mask_queries(values: list[str], cut: bool) -> None:
    from llmtap import limits
    from llmtap.gateway.capture import RecordBuilder

    cap = capture(1)
    cap.request_headers = [
        ("Content-Type", "application/json"),
        *((f"X-H{i}", v) for i, v in enumerate(values)),
    ]
    rec = RecordBuilder(inline_body_bytes=1 << 20, gateway="t").build(cap)
    kept = {k: v for k, v in rec.request_headers.items() if k.startswith("x-h")}
    sizes = [len(v.encode("utf-8", "surrogatepass")) for v in kept.values()]
    assert all(s <= limits.MAX_HEADER_VALUE_BYTES for s in sizes)
    assert sum(sizes) <= limits.MAX_HEADER_BYTES
    assert ("request_headers" in rec.truncated) is cut
    if not cut:
        for i, v in enumerate(values):
            assert kept[f"x-h{i}"] == (v if "?" not in v else "https://h/p?api_key=***")
    assert "hunter2-secret" not in orjson.dumps(rec.request_headers).decode()


class HungQueue(MemoryQueue):
    """A broker that takes the connection and never answers (frozen, not refusing)."""

    def __init__(self, fails: bool = False) -> None:
        super().__init__()
        self.calls = 0
        self.release = asyncio.Event()
        self.fails = fails  # at its client's timeout, as a frozen broker's publish does

    async def publish(self, messages: Sequence[Message]) -> None:
        self.calls += 1
        await self.release.wait()
        if self.fails:
            raise BackendUnavailable("no answer within 5s")
        await super().publish(messages)


@pytest.mark.parametrize("fails", [False, True], ids=["queue-wakes-up", "publish-times-out"])
async def test_a_hung_queue_does_not_keep_records_in_memory_only(tmp_path: Path, fails: bool) -> None:
    """An outside check froze Kafka (SIGSTOP) and then killed the gateway: the 3 s of records
    waiting on the 5 s publish timeout were in memory only, and all 150 were lost. A batch the
    queue has not taken in `publish_spool_after_ms` now goes to the fsynced spool too; the
    next batches skip the hung queue (its breaker) and go there at once. A record the queue
    also takes later is stored once (one row per id)."""
    from llmtap.gateway.sinks import SpoolSink, _unframe
    from llmtap.gateway.spool import DiskSpool

    q = HungQueue(fails)
    spool = DiskSpool(tmp_path / "spool", 1 << 30)
    s = settings(tmp_path, publish_batch_size=10, publish_spool_after_ms=200.0)
    pub = Publisher(s, [QueueSink(q), SpoolSink(spool)])
    await pub.start()
    try:
        for i in range(30):
            pub.submit(capture(i))

        await wait_for(lambda: pub.published == 30, timeout=30)
        assert pub.hedged == 10 and pub.pending == 0 and q.messages == []
        # What a gateway killed now leaves behind: its spool segments, read as at a restart
        # (the kernel closes a dead process's files; closing ours releases the segment's lock).
        spool.close()
        reader = DiskSpool(tmp_path / "spool", 1 << 30)
        segments = reader.segments_for_replay()
        frames = [v for seg in segments for batch in reader.replay(seg) for v in batch]
        got = sorted(decode(_unframe(v).value).id for v in frames)
        assert got == sorted(capture(i).id for i in range(30))
        assert q.calls == 1  # one batch waited on the queue; the others went straight on
        assert pub.failed == 0  # not yet: the hung publish has not failed
        q.release.set()
        if fails:  # a failed attempt, counted once it fails (the records are safe either way)
            await wait_for(lambda: pub.failed == 1, timeout=30)
        else:  # the broker wakes up: its batch arrives too (the store keeps one row)
            await wait_for(lambda: len(q.messages) == 10, timeout=30)
            assert pub.failed == 0
    finally:
        await pub.stop(timeout=5)


def test_records_spread_over_partitions_where_workers_scale_out() -> None:
    """`LLMTAP_PARTITION_KEY=auto`: one tenant was one partition on every queue, so a second
    worker on Kafka, Redis or SQS sat idle. There a session keeps its order and a record
    without one is keyed by its own id; the embedded SQLite queue (one worker) keeps `tenant`."""
    from llmtap.queue.base import partition_for

    sessionless = [capture(i).id for i in range(60)]
    for queue, by in (
        ("kafka://127.0.0.1:9092/llmtap", "session_id"),
        ("redis://127.0.0.1:6379/0", "session_id"),
        ("sqs://llmtap.fifo", "session_id"),
        ("sqlite", "tenant"),
    ):
        s = Settings(queue=queue)
        assert s.partition_by == by, queue
    assert Settings(queue="kafka://h:1/t", partition_key="tenant").partition_by == "tenant"
    recs = [
        LogRecord(
            id=rid,
            provider="openai",
            target_url="https://api.openai.com/v1/chat/completions",
            method="POST",
            path="/v1/chat/completions",
            started_at=datetime.now(UTC),
            ended_at=datetime.now(UTC),
            latency_ms=1.0,
        )
        for rid in sessionless
    ]
    spread = {partition_for(partition_key(r, "session_id"), 6) for r in recs}
    assert spread == set(range(6))  # every partition has work
    session = [msgspec.structs.replace(r, session_id="conv-1") for r in recs]
    assert len({partition_for(partition_key(r, "session_id"), 6) for r in session}) == 1  # in order
