"""The worker on real backends: SQLite queue, SQLite store, file bodies — and real processes.

Failure tests break things for real (a store that is down, records that make a handler raise,
a worker process killed with SIGKILL) and count what went in and what came out.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from llmtap import limits
from llmtap.bodies.file import FileBodyStore
from llmtap.config import Settings
from llmtap.cooperate import Foreground
from llmtap.errors import TransientError
from llmtap.handlers.base import Handler, Item
from llmtap.handlers.bodies import BodyHandler
from llmtap.handlers.chain import Abandoned, Chain, RetryPolicy, process_records, run_with_attempts
from llmtap.handlers.cost import CostHandler
from llmtap.handlers.store import StoreHandler
from llmtap.queue.base import Message
from llmtap.queue.sqlite import SQLiteQueue
from llmtap.record import Body, LogRecord, compress, decode, decompress, encode
from llmtap.store.sqlite import SQLiteStore
from llmtap.worker import WorkerService
from procs import CHAIN_WORKER, assert_processed_after_kill, blocked_batch, chain_worker_args, processings
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(120)


class FlakyStore(SQLiteStore):
    """The real SQLite store, with a switch that makes writes fail as an outage would."""

    down = False
    writes = 0

    async def write_batch(
        self, records: Sequence[LogRecord], texts: Sequence[str | None] | None = None
    ) -> int:
        self.writes += 1
        if self.down:
            raise TransientError("store unreachable (test outage)")
        return await super().write_batch(records, texts)


class Boom(Handler):
    """Raises for records marked bad (like a handler bug on odd input); fails 'reject' ones."""

    name = "boom"

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.enabled = True

    async def handle(self, items: Sequence[Item]) -> None:
        for i in items:
            self.seen[i.record.id] = self.seen.get(i.record.id, 0) + 1
        if not self.enabled:
            return
        if any(i.record.user_id == "bad" for i in items):
            raise ValueError("cannot digest this record")
        for i in items:
            if i.record.user_id == "reject":
                i.fail("boom: rejected")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.settings = Settings(
            data_dir=tmp, worker_batch_size=50, worker_max_attempts=3, shutdown_timeout=5, partitions=4
        )
        self.queue_path = str(tmp / "queue.db")
        self.store = FlakyStore(str(tmp / "store.db"))
        self.bodies = FileBodyStore(str(tmp / "bodies"))
        self.boom = Boom()
        self.producer = SQLiteQueue(self.queue_path, partitions=4)
        self.workers: list[WorkerService] = []

    def chain(self) -> Chain:
        return Chain([BodyHandler(self.bodies), CostHandler(), self.boom, StoreHandler(self.store)])

    async def worker(self, foreground: Foreground | None = None) -> WorkerService:
        q = SQLiteQueue(self.queue_path, partitions=4, lease_timeout=1.0, heartbeat_interval=0.2)
        w = WorkerService(
            self.settings,
            queue=q,
            store=self.store,
            bodies=self.bodies,
            chain=self.chain(),
            foreground=foreground,
        )
        await w.start()
        self.workers.append(w)
        return w

    async def publish(
        self, values: Sequence[bytes], key: Callable[[int], str] = lambda i: f"t{i % 7}"
    ) -> None:
        await self.producer.publish([Message(key=key(i), value=v) for i, v in enumerate(values)])

    def rows(self) -> tuple[int, int]:
        with sqlite3.connect(self.tmp / "store.db") as db:
            n, distinct = db.execute(
                "SELECT count(*), count(DISTINCT tenant || '/' || id) FROM requests"
            ).fetchone()
        return int(n), int(distinct)

    async def lag(self) -> int:
        return (await self.producer.status()).lag


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    await e.store.connect()
    await e.bodies.connect()
    await e.producer.connect("producer")
    yield e
    for w in e.workers:
        await w.stop()
    await e.producer.close()
    await e.store.close()


async def until(pred: Callable[[], Any], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or pred}")


def v99(rec: LogRecord) -> bytes:
    data = msgspec.json.decode(encode(rec))
    data["v"] = 99
    return msgspec.json.encode(data)


async def test_garbage_and_unknown_versions_are_dead_lettered_and_the_rest_flows(env: Env) -> None:
    good = [make_record(i) for i in range(6)]
    stranger = make_record(99)
    values = [encode(good[0]), b"\x00garbage", encode(good[1]), v99(stranger), *map(encode, good[2:])]
    await env.publish(values, key=lambda i: "one-partition")
    w = await env.worker()
    await until(lambda: env.rows()[0] == 6, what="the good records stored")
    await until(lambda: w.stats.dead_lettered == 2)
    dead = {d.value: d.reason for d in await env.producer.dead_letters()}
    assert dead.keys() == {b"\x00garbage", v99(stranger)}
    assert dead[b"\x00garbage"].startswith("not a JSON log record")
    assert "unknown record version 99" in dead[v99(stranger)]
    await until(lambda: _zero(env.lag()), what="everything acknowledged")
    assert env.rows() == (6, 6)
    row = await env.store.get_request("acme", good[3].id)
    assert row is not None and row["cost_usd"] is not None  # the whole chain ran


async def test_a_record_id_over_512_characters_is_dead_lettered_with_the_reason(env: Env) -> None:
    """The API reads no id over 512 characters (and list cursors embed it): a queue message with
    such an id is dead-lettered, saying why, and the records around it are stored."""
    good = [make_record(i) for i in range(4)]
    long = [make_record(90, id="R" * 513), make_record(91, id="R" * 100_000)]
    values = [encode(good[0]), encode(long[0]), encode(good[1]), encode(long[1]), *map(encode, good[2:])]
    await env.publish(values, key=lambda i: "one-partition")
    w = await env.worker()
    await until(lambda: env.rows()[0] == 4, what="the good records stored")
    await until(lambda: w.stats.dead_lettered == 2)
    dead = await env.producer.dead_letters()
    assert sorted(len(msgspec.json.decode(d.value)["id"]) for d in dead) == [513, 100_000]
    for d in dead:
        assert "Expected `str` of length <= 512 - at `$.id`" in d.reason, d.reason
    await until(lambda: _zero(env.lag()), what="everything acknowledged")
    assert env.rows() == (4, 4)
    assert await env.store.get_request("acme", good[0].id) is not None


async def test_a_record_ingest_would_refuse_is_dead_lettered_and_one_over_the_limits_is_cut(
    env: Env,
) -> None:
    """A queue message is not only a gateway's: numbers and times no store can keep are
    dead-lettered with the reason ingest gives, metadata over the limits is cut as ingest cuts
    it, and a provider's narrow count a store keeps as unknown still passes. Token counts and
    charges out of range are made unknown, not dead-lettered: a gateway adds some up (rev27:
    600e9 prompt + 600e9 completion tokens, the gateway's own record, was dead-lettered)."""
    from llmtap.record import Usage

    def usage(**kw: Any) -> Usage:
        return Usage(source="provider", **kw)

    unknown = [
        make_record(50, usage=usage(prompt_tokens=-1, completion_tokens=7)),
        make_record(51, usage=usage(prompt_tokens=3, completion_tokens=2**63)),
        make_record(56, usage=usage(total_tokens=1_200_000_000_000, billed_usd=1e12)),
    ]
    bad = {
        "status": make_record(52, status=-99999),
        "latency": make_record(53, latency_ms=-1e300),
        "year 1": make_record(54, started_at=datetime(1, 1, 1, tzinfo=UTC)),
        "year 9999": make_record(55, ended_at=datetime(9999, 6, 1, tzinfo=UTC)),
    }
    reasons = {
        "status": "status -99999 is not an HTTP status",
        "latency": "latency_ms -1e+300 is not a duration",
        "year 1": "started_at 0001-01-01 00:00:00+00:00 is not between 1970 and 9999",
        "year 9999": "ended_at 9999-06-01 00:00:00+00:00 is not between 1970 and 9999",
    }
    big = "m" * 2_000_000
    huge = make_record(
        60, model=big, user_id=big, session_id=big, properties={f"p{i}": "v" for i in range(100_000)}
    )
    narrow = make_record(61, usage=usage(prompt_tokens=5, web_search_requests=3_000_000_000))
    good = [make_record(i) for i in range(3)]
    values = [
        encode(good[0]),
        *map(encode, bad.values()),
        encode(huge),
        encode(narrow),
        *map(encode, unknown),
        *map(encode, good[1:]),
    ]
    await env.publish(values, key=lambda i: "one-partition")
    w = await env.worker()
    await until(lambda: env.rows()[0] == 8, what="the good records stored")
    await until(lambda: w.stats.dead_lettered == len(bad))
    await until(lambda: _zero(env.lag()), what="everything acknowledged")
    dead = {msgspec.json.decode(d.value)["id"]: d.reason for d in await env.producer.dead_letters()}
    for what, r in bad.items():
        assert dead[r.id].startswith("invalid record: " + reasons[what]), (what, dead[r.id])
    assert env.rows() == (8, 8)
    rows = [await env.store.get_request("acme", r.id) for r in unknown]
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows if r] == [
        (None, 7),
        (3, None),
        (None, None),
    ]
    assert rows[2] is not None and rows[2]["total_tokens"] is None
    row = await env.store.get_request("acme", huge.id)
    assert row is not None
    assert len(row["model"]) == len(row["user_id"]) == len(row["session_id"]) == 256
    assert len(row["properties"]) == 64
    assert set(row["truncated"]) >= {"model", "user_id", "session_id", "properties"}
    row = await env.store.get_request("acme", narrow.id)
    assert row is not None and row["web_search_requests"] is None  # unknown, as documented


async def _zero(v: Any) -> bool:
    return (await v) == 0


async def test_a_big_batch_gives_the_event_loop_a_turn_every_slice_records(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In `llmtap up` the gateway's requests share the worker's event loop: a batch's Python
    work per record (decode, search text, body keys, cost) must not run for the whole batch
    without letting them in. Counted, not timed: the most per-record calls made between two
    turns of a ticker task that runs whenever the loop is free."""
    import llmtap.bodies.offload as offload
    import llmtap.handlers.bodies as bodies
    import llmtap.handlers.cost as cost
    import llmtap.worker.worker as worker
    from llmtap.cooperate import SLICE

    calls = 0

    def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            return fn(*a, **kw)

        return call

    for module, name in [(worker, "decode"), (bodies, "record_text"), (offload, "key"), (cost, "apply_cost")]:
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    n = 20 * SLICE
    env.settings = env.settings.model_copy(update={"worker_batch_size": n, "worker_pipeline": 1})
    await env.publish([encode(make_record(i)) for i in range(n)], key=lambda i: "one-partition")
    stretches: list[int] = []

    async def ticker() -> None:
        last = calls
        while True:
            await asyncio.sleep(0)
            stretches.append(calls - last)
            last = calls

    tick = asyncio.create_task(ticker())
    try:
        await env.worker()
        await until(lambda: env.rows()[0] == n, what="the batch stored")
    finally:
        tick.cancel()
    assert calls >= 4 * n  # decode, text, cost, and a key per body: all of them were counted
    # A stage yields after every SLICE records (a record has two bodies: two keys each); the
    # end of one stage and the start of the next may run together. Without the turns, one
    # stretch held a whole stage (n calls or more).
    assert max(stretches) <= 3 * SLICE, max(stretches)


class Gateway:
    """What a worker in `llmtap up` sees of the gateway: a count that moves with each request
    (it always has here), and the loop's thread on the CPU for `share` of the time. The time is
    scripted (each reading of the clock advances it 25 ms), so a busy test machine cannot make
    the loop look idle."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.requests = 0
        self.probed = 0
        self.t = 0.0

    def activity(self) -> int:
        self.requests += 1
        return self.requests

    def clock(self) -> float:
        self.t += 0.025
        return self.t

    def cpu(self) -> float:
        self.probed += 1
        return self.t * self.share

    def foreground(self, max_wait: float) -> Foreground:
        return Foreground(self.activity, max_wait, cpu=self.cpu, clock=self.clock)


async def test_the_worker_takes_no_batch_while_the_gateway_keeps_the_loop_busy(env: Env) -> None:
    """`llmtap up`: records wait in the queue while requests keep the loop busy, and are all
    stored once they leave it time. Counted in probes of the loop, not timed."""
    gw = Gateway(share=1.0)
    fg = gw.foreground(3600)
    await env.publish([encode(make_record(i)) for i in range(120)])
    await env.worker(fg)
    await until(lambda: gw.probed >= 20, what="the worker probing the busy loop")
    assert env.rows() == (0, 0) and await env.lag() == 120
    gw.share = 0.0  # the burst is over
    await until(lambda: env.rows() == (120, 120), what="every record stored")
    await until(lambda: _zero(env.lag()), what="everything acknowledged")
    assert fg.ran_out == 0 and fg.waited > 0


async def test_a_gateway_busy_for_ever_delays_the_records_by_the_bound_only(env: Env) -> None:
    """The wait is bounded (`LLMTAP_WORKER_DEFER_S`): under a load that never ends, the worker
    stops waiting and stores everything, as it would without a gateway beside it."""
    gw = Gateway(share=1.0)
    fg = gw.foreground(0.3)  # about 6 probes of the scripted clock
    await env.publish([encode(make_record(i)) for i in range(400)])
    await env.worker(fg)
    await until(lambda: env.rows() == (400, 400), what="every record stored, the loop busy throughout")
    await until(lambda: _zero(env.lag()), what="everything acknowledged")
    assert fg.ran_out >= 1


async def test_store_outage_acks_nothing_then_stores_everything_once(env: Env) -> None:
    env.store.down = True
    recs = [make_record(i) for i in range(120)]
    await env.publish([encode(r) for r in recs])
    w = await env.worker()
    await until(lambda: w.stats.transient_retries >= 3, what="retries during the outage")
    await asyncio.sleep(1.5)  # longer than the queue lease: the heartbeat must keep it
    assert env.rows() == (0, 0)
    assert await env.lag() == 120, "something was acknowledged during the outage"
    st = await env.producer.status()
    assert {p.owner for p in st.partitions} == {w.queue.consumer_id}  # type: ignore[attr-defined]
    env.store.down = False
    await until(lambda: env.rows()[0] == 120, what="all stored after recovery")
    await until(lambda: _zero(env.lag()))
    assert env.rows() == (120, 120)
    assert w.stats.dead_lettered == 0 and w.stats.processed == 120


async def test_a_store_that_hangs_is_reported_while_it_lasts(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A frozen PostgreSQL (SIGSTOP) raised nothing for 75 s and the worker said nothing: now a
    batch still running after `STALL_WARN_EVERY` is reported, again each period, and no more
    once it is through."""
    from llmtap.worker import worker as worker_module

    monkeypatch.setattr(worker_module, "STALL_WARN_EVERY", 0.3)
    caplog.set_level(logging.WARNING, "llmtap")
    release = asyncio.Event()
    real = env.store.write_batch

    async def hangs(records: Sequence[LogRecord], texts: Sequence[str | None] | None = None) -> int:
        await release.wait()
        return await real(records, texts)

    monkeypatch.setattr(env.store, "write_batch", hangs)
    await env.publish([encode(make_record(i)) for i in range(5)])
    w = await env.worker()

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "has been running for" in r.getMessage()]

    try:
        await until(lambda: len(said()) >= 2, what="two reports of the hanging batch")
        assert "a batch of 5 records" in said()[0]
        # `/healthz` reads `waiting`: it answered "ok" for as long as the batch hung
        assert w.waiting is not None and "a batch of 5 records has been running for" in w.waiting
    finally:
        release.set()  # a failed check must not leave the worker's stop waiting on the hang
    await until(lambda: env.rows()[0] == 5, what="the batch stored once the store answers")
    await until(lambda: w.waiting is None, what="healthy again once the batch is through")
    n = len(said())
    await asyncio.sleep(1.0)  # three periods: the report stopped with the batch
    assert len(said()) == n
    assert w.waiting is None


async def test_a_record_that_breaks_a_handler_is_retried_then_dead_lettered(env: Env) -> None:
    recs = [make_record(i) for i in range(40)]
    recs[7].user_id = "bad"
    recs[23].user_id = "reject"
    await env.publish([encode(r) for r in recs], key=lambda i: f"t{i % 2}")
    w = await env.worker()
    await until(lambda: w.stats.dead_lettered == 2, what="two dead letters")
    await until(lambda: _zero(env.lag()))
    assert env.rows() == (38, 38)
    assert await env.store.get_request("acme", recs[7].id) is None
    dead = {msgspec.json.decode(d.value)["id"]: d.reason for d in await env.producer.dead_letters()}
    assert dead[recs[7].id] == "boom: ValueError: cannot digest this record"
    assert dead[recs[23].id] == "boom: rejected"
    # each went through the chain at least max_attempts times (bisection adds batch runs),
    # and the worker counted max_attempts - 1 retries for each
    assert env.boom.seen[recs[7].id] >= env.settings.worker_max_attempts
    assert env.boom.seen[recs[23].id] >= env.settings.worker_max_attempts
    assert w.stats.record_retries == 2 * (env.settings.worker_max_attempts - 1)
    assert env.boom.seen[recs[0].id] < env.boom.seen[recs[7].id]  # the good ones were not retried
    # once the handler is fixed, replayed dead letters go through
    env.boom.enabled = False
    assert await env.producer.replay_dead_letters() == 2
    await until(lambda: env.rows()[0] == 40, what="the replayed records stored")
    assert env.rows() == (40, 40)
    assert (await env.producer.status()).dead_letters == 0


async def test_same_batch_delivered_twice_gives_one_row_each(env: Env) -> None:
    recs = [make_record(i) for i in range(30)]
    values = [encode(r) for r in recs]
    await env.publish(values + values[:10])  # a gateway retry, a replay
    w = await env.worker()
    await until(lambda: w.stats.processed == 40)
    await env.publish(values)  # the whole batch once more
    await until(lambda: w.stats.processed == 70)
    assert env.rows() == (30, 30)
    for r in recs:  # each row's bodies are readable through the refs it holds
        row = await env.store.get_request(r.tenant, r.id)
        assert row is not None
        for part in ("request_body", "response_body"):
            assert await env.bodies.get(row[part]["ref"]) is not None


async def test_stop_during_an_outage_leaves_the_batch_for_redelivery(env: Env) -> None:
    env.store.down = True
    recs = [make_record(i) for i in range(20)]
    await env.publish([encode(r) for r in recs])
    w = await env.worker()
    await until(lambda: w.stats.transient_retries >= 1)
    t0 = time.monotonic()
    env.workers.remove(w)
    await w.stop()
    assert time.monotonic() - t0 < 3  # abandoned, not waiting out the deadline
    assert await env.lag() == 20
    env.store.down = False
    await env.worker()  # the partitions were released at once: no lease to wait for
    await until(lambda: env.rows()[0] == 20)
    assert env.rows() == (20, 20)


async def test_a_redelivered_batch_runs_with_no_other_batch_in_flight(env: Env) -> None:
    """`worker_pipeline` > 1, but a batch holding a redelivered message (it may be what killed the
    last worker process) runs alone: were another batch in flight when it kills the process, that
    batch's records would be redelivered too, counted as suspects, and dead-lettered with it.

    A consumer takes three messages and goes away without an ack, so they come back with
    `delivery_count` 2 beside first deliveries on the other partitions. Every batch waits
    (bounded) for another to join it, so any overlap the worker allows is seen."""
    recs = [make_record(i) for i in range(32)]
    await env.publish([encode(r) for r in recs], key=lambda i: f"t{i % 8}")
    first = SQLiteQueue(env.queue_path, partitions=4, lease_timeout=1.0, heartbeat_interval=0.2)
    await first.connect("consumer")
    taken = await first.consume(3, timeout=5)
    await first.close()  # no ack: the three are redelivered
    again = {decode(d.value).id for d in taken}
    assert len(again) == 3

    class Call:
        def __init__(self, ids: set[str]) -> None:
            self.ids, self.overlapped = ids, False

    class Watcher(Handler):
        """Marks every handler call that another batch's call was inside the chain beside."""

        name = "watcher"

        def __init__(self) -> None:
            self.live: list[Call] = []
            self.calls: list[Call] = []

        async def handle(self, items: Sequence[Item]) -> None:
            me = Call({i.record.id for i in items})
            for other in self.live:
                other.overlapped = me.overlapped = True
            self.live.append(me)
            self.calls.append(me)
            try:
                deadline = time.monotonic() + 3
                while len(self.live) < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                self.live.remove(me)

    watcher = Watcher()
    settings = Settings(
        data_dir=env.tmp, worker_batch_size=4, worker_pipeline=4, worker_linger_ms=0, partitions=4
    )
    q = SQLiteQueue(env.queue_path, partitions=4, lease_timeout=1.0, heartbeat_interval=0.2)
    w = WorkerService(settings, queue=q, store=env.store, chain=Chain([watcher, StoreHandler(env.store)]))
    await w.start()
    env.workers.append(w)
    await until(lambda: env.rows()[0] == len(recs), 60, "every record stored")
    assert env.rows() == (len(recs), len(recs))
    beside = [sorted(c.ids) for c in watcher.calls if c.ids & again and c.overlapped]
    assert beside == [], "a redelivered message was handled while another batch was in flight"
    assert any(c.overlapped for c in watcher.calls), "batches never overlapped: the pipeline is off"


async def test_process_records_for_the_ingest_endpoint(env: Env) -> None:
    recs = [make_record(i) for i in range(10)]
    recs[4].user_id = "bad"
    items = await process_records(env.chain(), recs)
    assert [i.ok for i in items] == [i != 4 for i in range(10)]
    assert items[4].error == "boom: ValueError: cannot digest this record"
    assert env.rows() == (9, 9)
    env.store.down = True
    with pytest.raises(TransientError):
        await process_records(env.chain(), [make_record()])


async def test_run_with_attempts_is_the_one_retry_policy() -> None:
    """Issue 9: the policy the worker and the ingest drain share, without any queue around it.
    An outage costs no attempt; a record failing once goes through on its retry; a record that
    always raises (among others: bisected to it) is given up after `max_attempts` tries with
    its reason; the others go through; the waits follow `RetryPolicy.delay`."""

    class Flaky(Handler):
        name = "flaky"

        def __init__(self) -> None:
            self.outages = 2

        async def handle(self, items: Sequence[Item]) -> None:
            if self.outages:
                self.outages -= 1
                raise TransientError("store down")
            if any(i.record.model == "always" for i in items):
                raise ValueError("bad record")  # several items: the chain bisects to it
            for i in items:
                if i.record.model == "once" and not i.record.properties:
                    i.record.properties = {"seen": "1"}
                    i.fail("flaky: once")

    recs = [make_record(model=m) for m in ("gpt-4o", "always", "once", "gpt-4o")]
    policy = RetryPolicy(max_attempts=3, backoff_start=0.01, backoff_cap=0.04)
    given: list[tuple[int, str]] = []
    retries: list[tuple[str, int]] = []
    waits: list[float] = []

    async def give_up(idx: int, reason: str) -> None:
        given.append((idx, reason))

    async def pause(seconds: float) -> None:
        waits.append(seconds)

    ok = await run_with_attempts(
        Chain([Flaky()]),
        recs,
        policy,
        give_up=give_up,
        pause=pause,
        retried=lambda k, n: retries.append((k, n)),
    )
    assert ok == [0, 2, 3]
    assert given == [(1, "flaky: ValueError: bad record")]
    # two outages (all four records), then two record retries before the third try gives up
    assert retries == [("transient", 4), ("transient", 4), ("record", 2), ("record", 1)]
    assert len(waits) == 4 and all(0.005 <= w <= 0.04 for w in waits)

    # stopping while a record waits for its retry: nothing given up, Abandoned for redelivery
    with pytest.raises(Abandoned):
        await run_with_attempts(
            Chain([Flaky()]), [make_record(model="always")], policy, give_up=give_up, stopping=lambda: True
        )
    assert len(given) == 1


async def test_an_outage_is_reported_once_when_it_begins_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outside check: a worker logged every retry of an outage (20-37 lines a minute, 50,000
    a day), and its `/healthz` said ok all along (it said "waiting" only at start-up)."""
    from llmtap.handlers.chain import OUTAGE_LOG_EVERY

    class Down(Handler):
        name = "down"

        def __init__(self, tries: int) -> None:
            self.tries = tries

        async def handle(self, items: Sequence[Item]) -> None:
            if self.tries:
                self.tries -= 1
                raise TransientError("the store is down" if self.tries > 5 else "the store is full")

    seen: list[str | None] = []

    async def pause(seconds: float) -> None:
        pass

    async def give_up(idx: int, reason: str) -> None:
        raise AssertionError(reason)

    tries = 3 * OUTAGE_LOG_EVERY + 1
    with caplog.at_level(logging.WARNING, logger="llmtap.worker"):
        ok = await run_with_attempts(
            Chain([Down(tries)]), [make_record()], RetryPolicy(), give_up=give_up, pause=pause,
            outage=seen.append,
        )  # fmt: skip
    assert ok == [0]
    # What /healthz says between: the cause of the moment (it kept the first one), then ok.
    assert [k for k, _ in itertools.groupby(seen)] == ["the store is down", "the store is full", None]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 + 3 + 1, lines  # the start, about one a minute, the end
    assert "still, after" in lines[1] and f"works again after {tries} tries" in lines[-1], lines


def test_retry_policy_bounds() -> None:
    p = RetryPolicy(max_attempts=5, backoff_start=0.1, backoff_cap=5.0)
    assert all(0.05 <= p.delay(1) <= 0.1 for _ in range(50))
    assert all(2.5 <= p.delay(n) <= 5.0 for n in (7, 100, 10**6))  # capped, never overflows
    assert not p.gives_up(4) and p.gives_up(5)
    assert p.crash_reason(4) is None
    assert p.crash_reason(5) == "delivered 5 times without ack: the worker died while processing it"


async def test_banner_line(env: Env) -> None:
    q = SQLiteQueue(env.queue_path, partitions=4)
    w = WorkerService(env.settings, queue=q, store=env.store, bodies=env.bodies, chain=env.chain())
    lines = await w.start()
    await w.stop()
    assert lines == [f"worker    consuming sqlite {env.queue_path} → sqlite {env.tmp / 'store.db'}"]
    off = WorkerService(
        env.settings.model_copy(update={"search_bytes": 0}),
        queue=SQLiteQueue(env.queue_path, partitions=4),
        store=env.store,
        bodies=env.bodies,
        chain=env.chain(),
    )
    lines = await off.start()
    await off.stop()
    assert [line.strip() for line in lines[1:]] == [
        "search off (LLMTAP_SEARCH_BYTES=0): records stored now are not found by q="
    ]
    by_turn = WorkerService(
        env.settings.model_copy(update={"search_scope": "turn"}),
        queue=SQLiteQueue(env.queue_path, partitions=4),
        store=env.store,
        bodies=env.bodies,
        chain=env.chain(),
    )
    lines = await by_turn.start()
    await by_turn.stop()
    assert [line.strip() for line in lines[1:]] == [
        "search by turn (LLMTAP_SEARCH_SCOPE=turn): q= finds a message in the request that added it"
        " to its conversation"
    ]


# -- real processes ----------------------------------------------------------------------------

PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys, time, uuid
    from datetime import UTC, datetime
    from llmtap.queue.base import Message
    from llmtap.queue.sqlite import SQLiteQueue
    from llmtap.record import Body, LogRecord, Usage, compress, encode

    path, n, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    async def main():
        q = SQLiteQueue(path, partitions=4)
        await q.connect("producer")
        now = datetime.now(UTC)
        for start in range(0, n, 100):
            batch = []
            for i in range(start, min(n, start + 100)):
                rid = marker if i == n // 2 else str(uuid.uuid4())
                rec = LogRecord(
                    id=rid, tenant=f"t{i % 3}", provider="openai", model="gpt-4o",
                    target_url="https://api.openai.com/v1/chat/completions", method="POST",
                    path="/v1/chat/completions", started_at=now, ended_at=now, latency_ms=5.0,
                    status=200, usage=Usage(source="provider", prompt_tokens=10, completion_tokens=i),
                    request_body=Body(size=30, encoding="zstd", data=compress(b'{"i": %d}' % i)),
                )
                batch.append(Message(key=rec.tenant, value=encode(rec)))
            await q.publish(batch)
            await asyncio.sleep(0.03)
        await q.close()
        print("PUBLISHED", n, flush=True)

    asyncio.run(main())
    """
)


def _spawn(tmp: Path, name: str, script: str | Path, *args: str) -> subprocess.Popen[bytes]:
    """Run a script given as text, or a script file, with the data dir under `tmp`."""
    if isinstance(script, str):
        path = tmp / f"{name}.py"
        path.write_text(script)
    else:
        path = script
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")}
    env["LLMTAP_DATA_DIR"] = str(tmp / "data")
    env["LLMTAP_QUEUE"] = f"sqlite://{tmp / 'queue.db'}"
    env["LLMTAP_PARTITIONS"] = "4"
    env["LLMTAP_WORKER_BATCH_SIZE"] = "100"
    log = open(tmp / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, str(path), *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def _count(db: Path) -> tuple[int, int]:
    if not db.exists():
        return 0, 0
    try:
        with sqlite3.connect(db, timeout=5) as c:
            n, d = c.execute("SELECT count(*), count(DISTINCT tenant || '/' || id) FROM requests").fetchone()
            return int(n), int(d)
    except sqlite3.OperationalError:  # the table is not created yet
        return 0, 0


async def test_worker_process_killed_mid_batch_and_restarted_stores_exactly_n(tmp_path: Path) -> None:
    """The real worker (tests/chain_worker.py: the standard chain from settings) blocks inside
    its chain on the batch holding a marker record, so the SIGKILL lands mid-batch for sure; the
    next worker must process that batch again, and every record once in all (but for what the
    killed worker had processed and not yet acknowledged: `assert_processed_after_kill`)."""
    n = 4000
    qpath = str(tmp_path / "queue.db")
    store_db = tmp_path / "data" / "store.db"
    marker = str(uuid.uuid4())
    args = (*chain_worker_args(tmp_path, block_on=marker), "--sqlite-lease", "1.0")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        publisher = _spawn(tmp_path, "publisher", PUBLISHER, qpath, str(n), marker)
        procs.append(publisher)
        await until(lambda: Path(qpath).exists(), what="the queue file")
        worker = _spawn(tmp_path, "worker1", CHAIN_WORKER, *args)
        procs.append(worker)
        await until(lambda: blocked_batch(tmp_path) is not None, timeout=60, what="the worker blocking")
        pid, batch = blocked_batch(tmp_path) or (0, [])
        assert pid == worker.pid and marker in batch, (pid, worker.pid, batch)
        killed_at = _count(store_db)[0]
        worker.send_signal(signal.SIGKILL)
        worker.wait(5)
        worker2 = _spawn(tmp_path, "worker2", CHAIN_WORKER, *args)
        procs.append(worker2)
        assert publisher.wait(60) == 0, (tmp_path / "publisher.log").read_text()
        await until(lambda: _count(store_db)[0] >= n, timeout=60, what=f"{n} rows")
        q = SQLiteQueue(qpath, partitions=4)
        await q.connect("producer")
        try:
            await until(lambda: _lag_zero(q), what="lag 0")
            st = await q.status()
            assert st.dead_letters == 0
        finally:
            await q.close()
        assert _count(store_db) == (n, n)
        # Rows are unique by the primary key whatever happens; processings are what can show a
        # lost ack or a duplicate delivery.
        seen = processings(tmp_path)
        assert set(seen) == {worker.pid, worker2.pid}, seen.keys()
        assert not set(batch) & set(seen[worker.pid]), "the killed worker finished its batch"
        assert set(batch) <= set(seen[worker2.pid]), "the blocked batch was not redelivered"
        with sqlite3.connect(store_db) as c:
            stored = {rid for (rid,) in c.execute("SELECT id FROM requests")}
        assert len(stored) == n
        assert_processed_after_kill(seen, worker.pid, stored)
        print(f"worker SIGKILLed inside the chain on a batch of {len(batch)} ({killed_at} rows then)")
        # Every stored row's body is whole and readable: a SIGKILL mid-write never leaves half a
        # body under a ref that a row holds (packs are renamed into place only once written).
        with sqlite3.connect(store_db) as c:
            refs = [json.loads(b)["ref"] for (b,) in c.execute("SELECT request_body FROM requests")]
        assert len(refs) == n
        files = FileBodyStore(str(tmp_path / "data" / "bodies"))
        for ref in refs:
            data = await files.get(ref)
            assert data is not None and decompress(data).startswith(b'{"i": ')
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


async def _lag_zero(q: SQLiteQueue) -> bool:
    return (await q.status()).lag == 0


@pytest.mark.postgres
@pytest.mark.skipif(
    not os.environ.get("LLMTAP_TEST_POSTGRES_URL"), reason="LLMTAP_TEST_POSTGRES_URL is not set"
)
async def test_long_values_and_a_reused_id_through_the_worker_into_postgres(tmp_path: Path) -> None:
    """Through the worker into the real PostgreSQL: ids of 512 characters (1.5 KB), 3 KB and
    100 KB user/session ids, models and properties are stored the first time, cut to the
    documented limits (they used to be dead-lettered, and failed again on replay), and a request
    id reused with another body keeps the first request's row *and* body."""
    import random

    from llmtap.store.postgres import PostgresStore
    from store_helpers import pg_database

    def long(n: int, seed: int) -> str:
        r = random.Random(seed)
        return "".join(chr(r.randrange(0x4E00, 0x9FFF)) for _ in range(n))

    async with pg_database() as url:
        store = PostgresStore(url)
        await store.connect()
        bodies = FileBodyStore(str(tmp_path / "bodies"))
        queue_path = str(tmp_path / "queue.db")
        producer = SQLiteQueue(queue_path, partitions=1)
        await producer.connect("producer")
        settings = Settings(data_dir=tmp_path, worker_batch_size=50, worker_max_attempts=2, partitions=1)
        chain = Chain([BodyHandler(bodies), CostHandler(), StoreHandler(store)])
        w = WorkerService(
            settings, queue=SQLiteQueue(queue_path, partitions=1), store=store, bodies=bodies, chain=chain
        )
        await w.start()
        try:
            values = [long(1024, 1), long(34 * 1024, 2)]  # 3 KB and 100 KB in UTF-8
            recs = [
                make_record(i, id=v[:512], user_id=v, session_id=v, model=v, properties={"k": v, v: "name"})
                for i, v in enumerate(values)
            ]
            reused = str(uuid.uuid4())
            first = make_record(
                10,
                id=reused,
                user_id="first",
                request_body=Body(
                    content_type="application/json",
                    size=9,
                    encoding="zstd",
                    data=compress(b'{"n": 1}' * 40_000),
                ),
            )
            second = make_record(
                11,
                id=reused,
                user_id="second",
                request_body=Body(
                    content_type="application/json",
                    size=9,
                    encoding="zstd",
                    data=compress(b'{"n": 2}' * 40_000),
                ),
            )
            await producer.publish([Message(key="k", value=encode(r)) for r in [*recs, first]])
            await until(lambda: w.stats.processed == 3, what="the first three records handled")
            await producer.publish([Message(key="k", value=encode(second))])
            await until(lambda: w.stats.processed == 4, what="the second request with the same id")
            assert w.stats.dead_lettered == 0 and (await producer.status()).dead_letters == 0
            for v in values:
                row = await store.get_request("acme", v[:512])
                short = limits.cut(v, limits.MAX_ID_BYTES)
                assert row is not None and row["user_id"] == row["session_id"] == short
                assert row["model"] == limits.cut(v, limits.MAX_MODEL_BYTES)
                name, value = limits.cut(v, 128), limits.cut(v, 1024)
                assert row["properties"] == {"k": value, name: "name"}
            row = await store.get_request("acme", reused)
            assert row is not None and row["user_id"] == "first"
            data = await bodies.get(row["request_body"]["ref"])
            assert data is not None and decompress(data) == b'{"n": 1}' * 40_000
        finally:
            await w.stop()
            await producer.close()
            await store.close()


def test_a_worker_alone_serves_healthz_and_metrics_on_its_port(tmp_path: Path) -> None:
    """Scaled out, a worker's counters lived in a process nothing could scrape (the ops check
    read `llmtap_worker_records_processed_total 0` on the server while 1,500 were stored).
    `LLMTAP_WORKER_PORT` serves them, and /healthz says when the worker waits for a backend."""
    import urllib.request

    from procs import free_port, http_json, llmtap_env, start_llmtap, wait_until

    port = free_port()
    env = llmtap_env(tmp_path / "data", worker_port=port)
    settings = Settings(data_dir=tmp_path / "data")
    n = 25
    records = [make_record(i) for i in range(n)]

    async def publish() -> None:
        q = SQLiteQueue(str(tmp_path / "data" / "queue.db"), settings.partitions)
        await q.connect("producer")
        try:
            await q.publish([Message("k", encode(r)) for r in records])
        finally:
            await q.close()

    (tmp_path / "data").mkdir()
    asyncio.run(publish())
    worker = start_llmtap("worker", env, tmp_path / "worker.log")
    try:
        wait_until(lambda: "press Ctrl-C" in worker.output() or not worker.alive(), 60)
        assert f"/healthz, /livez and /metrics on http://127.0.0.1:{port}" in worker.output(), worker.output()

        def metric(name: str) -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

        wait_until(lambda: metric("llmtap_worker_records_processed_total") == n, 60, what="records counted")
        assert http_json("GET", f"http://127.0.0.1:{port}/healthz") == (
            200, {"status": "ok", "processed": n, "rows_written": n},
        )  # fmt: skip
        # The same records again (a redelivery, a spool replay): processed again, no new row.
        # The "stored" count said 2n, while the store held n.
        asyncio.run(publish())
        wait_until(lambda: metric("llmtap_worker_records_processed_total") == 2 * n, 60, what="counted again")
        assert metric("llmtap_store_rows_written_total") == n
        assert http_json("GET", f"http://127.0.0.1:{port}/healthz") == (
            200, {"status": "ok", "processed": 2 * n, "rows_written": n},
        )  # fmt: skip
    finally:
        assert worker.stop() == 0, worker.output()

    # A worker waiting for its store is up but not ready: 503 with the reason.
    env = llmtap_env(tmp_path / "data", worker_port=port, store=f"postgresql://u@127.0.0.1:{free_port()}/x")
    worker = start_llmtap("worker", env, tmp_path / "waiting.log")
    try:
        wait_until(lambda: "press Ctrl-C" in worker.output() or not worker.alive(), 60)
        status, body = http_json("GET", f"http://127.0.0.1:{port}/healthz")
        assert status == 503 and body["status"] == "waiting" and "PostgreSQL" in body["reason"], body
    finally:
        assert worker.stop() == 0, worker.output()


def test_smaller_letters_keep_a_records_numbers_first_and_a_messages_head() -> None:
    """What the worker dead-letters when the dead-letter place refuses the whole message: first
    the record without bodies and headers (its model, tokens, cost and user survive a replay),
    then its plain fields, then the first bytes, then nothing but the reason."""
    from datetime import UTC, datetime

    from llmtap.record import Usage
    from llmtap.worker.worker import LETTER_HEAD, smaller_letters

    body = Body(size=200_000, data=os.urandom(200_000))
    full = LogRecord(
        id="r-1", tenant="acme", provider="openai", target_url="http://u/v1/chat/completions", method="POST",
        path="/v1/chat/completions", model="gpt-4o-mini", user_id="u-1", status=200, request_body=body,
        started_at=datetime.now(UTC), ended_at=datetime.now(UTC), latency_ms=1.0,
        properties={"feature": "search"},
        usage=Usage(source="provider", prompt_tokens=120, completion_tokens=4, total_tokens=124),
        request_headers={"x-big": "y" * 50_000}, error="upstream said no",
    )  # fmt: skip
    letters = list(smaller_letters(encode(full), "handler: boom"))
    sizes = [len(v) for v, _ in letters]
    assert sizes == sorted(sizes, reverse=True) and len(letters) == 3 and sizes[0] < 3_000
    light = decode(letters[0][0])
    assert (light.model, light.user_id, light.properties, light.usage) == (
        "gpt-4o-mini", "u-1", {"feature": "search"}, full.usage
    )  # fmt: skip
    assert light.request_body is None and light.request_headers == {}
    assert (
        light.error is not None
        and light.error.startswith("upstream said no | ")
        and "handler: boom" in light.error
    )
    plain = decode(letters[1][0])
    assert (plain.id, plain.tenant, plain.status, plain.model) == ("r-1", "acme", 200, None)
    junk = os.urandom(3 * LETTER_HEAD)
    assert [v for v, _ in smaller_letters(junk, "x")] == [junk[:LETTER_HEAD], b""]


def test_two_outages_at_once_each_end_on_their_own() -> None:
    """The review of `/healthz` in an outage: one slot for the queue's and the store's outages,
    so the store coming back first cleared the queue's, still going on (`/healthz` said ok)."""
    from llmtap.worker.worker import WorkerService

    w = WorkerService.__new__(WorkerService)
    w._starting, w._outages = None, {}
    w._outage("queue", "queue: Redis refused the connection")
    w._outage("chain", "the store is down")
    w._outage("chain", None)
    assert w.waiting == "queue: Redis refused the connection"
    w._outage("queue", None)
    assert w.waiting is None


class Hang(Handler):
    """A store that takes no write (a locked table, a frozen database) until `release` is set."""

    name = "hang"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, items: Sequence[Item]) -> None:
        self.entered.set()
        await self.release.wait()


async def test_restarts_while_the_store_hangs_never_dead_letter_a_good_record(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the retry check: a worker stopped (SIGTERM) five times while the store hung on a
    lock dead-lettered a good record as "delivered 5 times without ack: the worker died while
    processing it". A stop cancelling the handling is not the message killing the worker."""
    hang = Hang()
    env.settings = env.settings.model_copy(update={"shutdown_timeout": 0.5})
    chain = env.chain
    monkeypatch.setattr(env, "chain", lambda: Chain([hang, *chain().handlers]))
    await env.publish([encode(make_record(1))])
    for _ in range(env.settings.worker_max_attempts + 2):  # stops at the stop deadline, cancelled
        hang.entered.clear()
        w = await env.worker()
        await until(hang.entered.is_set, 60, what="the record handed to the chain")
        await w.stop()
        env.workers.remove(w)

    hang.entered.clear()
    w = await env.worker()
    await until(hang.entered.is_set, 60, what="the record handed to the chain again")
    hang.release.set()
    await until(lambda: env.rows()[0] == 1, 60, what="the record stored")
    assert (await env.producer.status()).dead_letters == 0 and w.stats.dead_lettered == 0


def test_a_lone_surrogate_escape_is_named_as_such_not_as_truncated_input() -> None:
    """msgspec says "Input data was truncated" for `"\\ud800"` at a string's end: a dead letter's
    reason sent its reader looking for a cut message (unicode check)."""
    from llmtap.record import RecordError, decode

    with pytest.raises(RecordError) as e:
        decode(b'{"v":1,"error":"err\\u0000\\ud800"}')
    assert str(e.value) == (
        "not a JSON log record: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
    )
    with pytest.raises(RecordError, match=r"^not a JSON log record: Input data was truncated$"):
        decode(b'{"v":1,"error":"cut')
