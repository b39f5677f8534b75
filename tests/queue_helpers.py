"""Shared by the queue tests: backends by name, keyed and numbered records, a ledger that counts
every processing and checks per-key order, and a consumer that runs in its own OS process.

Run as a script it IS that consumer process:

    python tests/queue_helpers.py consume '<spec json>' OUT_FILE [--stall-after N] [--batch N]

It appends one line per event to OUT_FILE (flushed before the next step, so a SIGKILL loses
nothing written): `READY`; `P key seq partition offset time` for a record processed (before the
ack; `time` is CLOCK_MONOTONIC, the same in every process of the machine); `A` once the ack of
the records above it returned; `X key last seq` for a per-key order gap;
`STALL` when it stops before acking (to be killed there); `CLOSED` after a clean SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "scripts" / "services.sh"
if str(ROOT / "src") not in sys.path:  # when run as a script from a checkout
    sys.path.insert(0, str(ROOT / "src"))

from llmtap.errors import BackendUnavailable  # noqa: E402
from llmtap.queue.base import DeadLetter, Delivery, Message, Queue  # noqa: E402

BACKENDS = ("sqlite", "redis", "kafka", "sqs")

if os.environ.get("LLMTAP_TEST_SQS_ENDPOINT"):
    # ElasticMQ checks no signature, but botocore signs every request: any credentials do. Set
    # here (inherited by the consumer processes), only when the test server is configured.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "llmtap-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "llmtap-test")

# Short liveness timeouts so takeovers happen within a test (Kafka's broker minimum is 6 s).
FAST = {
    "sqlite": {"lease_timeout": 2.0},
    "redis": {"session_timeout": 2.0, "claim_idle": 0.3},
    "kafka": {"session_timeout": 6.0, "op_timeout": 3.0, "revoke_grace": 3.0},
    # ElasticMQ (a JVM writing to H2) beside a CPU hog once took over 10 s (the default) to answer
    # a send: these tests are about partitions and delivery, not the timeout (test_sqs_queue.py
    # sets its own where the timeout is the point).
    "sqs": {"visibility_timeout": 4, "op_timeout": 30.0},
}


def skip_reason(backend: str) -> str | None:
    """Why this backend cannot be tested here, or None."""
    if backend == "sqlite":
        if importlib.util.find_spec("llmtap.queue.sqlite") is None:
            return "llmtap.queue.sqlite (SQLiteQueue) is not written yet"
        return None
    how = "start it with scripts/services.sh up; eval $(scripts/services.sh env)"
    if backend == "redis" and not os.environ.get("LLMTAP_TEST_REDIS_URL"):
        return f"LLMTAP_TEST_REDIS_URL is not set ({how})"
    if backend == "kafka" and not os.environ.get("LLMTAP_TEST_KAFKA_BOOTSTRAP"):
        return f"LLMTAP_TEST_KAFKA_BOOTSTRAP is not set ({how})"
    if backend == "sqs" and not os.environ.get("LLMTAP_TEST_SQS_ENDPOINT"):
        return f"LLMTAP_TEST_SQS_ENDPOINT is not set ({how})"
    return None


@dataclass
class QueueSpec:
    """Everything needed to open the same queue in this or another process (JSON-able)."""

    backend: str
    target: str  # URL, or the SQLite file
    partitions: int = 6
    group: str = "workers"
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, **options: Any) -> Queue:
        opts = {**self.options, **options}
        if self.backend == "sqlite":
            from llmtap.queue.sqlite import SQLiteQueue

            return SQLiteQueue(self.target, self.partitions, **opts)
        if self.backend == "redis":
            from llmtap.queue.redis import RedisQueue

            return RedisQueue(self.target, self.partitions, self.group, **opts)
        if self.backend == "kafka":
            from llmtap.queue.kafka import KafkaQueue

            return KafkaQueue(self.target, self.partitions, self.group, **opts)
        if self.backend == "sqs":
            from llmtap.queue.sqs import SQSQueue

            return SQSQueue(self.target, self.partitions, self.group, **opts)
        raise ValueError(self.backend)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> QueueSpec:
        return cls(**json.loads(text))


def make_spec(backend: str, tmp_path: Path, partitions: int = 6, **options: Any) -> QueueSpec:
    """A fresh, empty queue of this backend (own file, Redis prefix, Kafka topic or SQS queue;
    a FIFO one, the kind that keeps the contract's order)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    opts = {**FAST[backend], **options}
    if backend == "sqlite":
        return QueueSpec(backend, str(tmp_path / f"{name}.db"), partitions, options=opts)
    if backend == "redis":
        url = os.environ["LLMTAP_TEST_REDIS_URL"]
        sep = "&" if urlsplit(url).query else "?"
        return QueueSpec(backend, f"{url}{sep}prefix={name}", partitions, options=opts)
    if backend == "kafka":
        return QueueSpec(
            backend, f"kafka://{os.environ['LLMTAP_TEST_KAFKA_BOOTSTRAP']}/{name}", partitions, options=opts
        )
    if backend == "sqs":
        return QueueSpec(backend, sqs_url(f"{name}.fifo"), partitions, options=opts)
    raise ValueError(backend)


def sqs_url(name: str) -> str:
    """`sqs://name` on the test server (scripts/services.sh)."""
    return f"sqs://{name}?endpoint={os.environ['LLMTAP_TEST_SQS_ENDPOINT']}"


# -- records ------------------------------------------------------------------------------------
def record(key: str, seq: int, size: int = 200) -> Message:
    body = {"k": key, "s": seq}
    pad = max(0, size - len(json.dumps(body)) - 10)
    return Message(key, json.dumps({**body, "p": "x" * pad}).encode())


def parse(value: bytes) -> tuple[str, int]:
    """(key, seq) of a test record; ValueError for anything else (a poison message)."""
    doc = json.loads(value)
    if not isinstance(doc, dict) or not isinstance(doc.get("k"), str) or not isinstance(doc.get("s"), int):
        raise ValueError("not a test record")
    return doc["k"], doc["s"]


def keyed_records(keys: int, per_key: int, size: int = 200) -> list[Message]:
    """`per_key` numbered records for each of `keys` keys, interleaved in publish order."""
    return [record(f"key-{k}", s, size) for s in range(per_key) for k in range(keys)]


async def publish_retrying(q: Queue, messages: Sequence[Message], timeout: float = 60) -> None:
    """Publish like the gateway does, minus its fallbacks: a broker that does not answer in time
    (a JVM starved on a busy machine) is asked again. A repeat is harmless: FIFO SQS drops it by
    its deduplication id, and the consumers' checks count records, not messages."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await q.publish(messages)
            return
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def publish_in_batches(q: Queue, messages: Sequence[Message], batch: int = 200) -> None:
    for i in range(0, len(messages), batch):
        await q.publish(messages[i : i + batch])


# -- checking -----------------------------------------------------------------------------------
class Ledger:
    """Counts how often each record was processed, and checks per-key order across consumers.

    A record processed for the first time must be the next of its key (all lower sequence
    numbers processed before): one key's records are processed in publish order, whichever
    consumer holds the partition. Processing an already processed record again is a duplicate.
    """

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()
        self.next_seq: dict[str, int] = {}
        self.violations: list[str] = []
        self.partitions: dict[str, set[int]] = {}

    def process(self, d: Delivery) -> None:
        key, seq = parse(d.value)
        rid = (key, seq)
        if self.counts[rid] == 0:
            expected = self.next_seq.get(key, 0)
            if seq != expected:
                self.violations.append(f"{key}: got seq {seq} before {expected}")
            self.next_seq[key] = max(expected, seq + 1)
        self.counts[rid] += 1
        self.partitions.setdefault(key, set()).add(d.partition)

    @property
    def distinct(self) -> int:
        return len(self.counts)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.counts.values())


async def consume_loop(q: Queue, ledger: Ledger, stop: asyncio.Event, batch: int = 100) -> None:
    """One in-process consumer: process and ack until `stop`; poison goes to the dead letters."""
    while not stop.is_set():
        deliveries = await q.consume(batch, 0.2)
        good = []
        for d in deliveries:
            try:
                ledger.process(d)
                good.append(d)
            except ValueError as e:
                await q.dead_letter(d, f"cannot decode: {e}")
        await q.ack(good)


async def take(q: Queue, n: int, timeout: float = 30, ack: bool = True, poll: float = 0.5) -> list[Delivery]:
    """Consume until `n` deliveries arrived (acking them unless told not to)."""
    out: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"got {len(out)} of {n}"
        got = await q.consume(n - len(out), poll)
        out += got
        if ack:
            await q.ack(got)
    return out


async def check_foreign_letter(q: Queue, write_foreign: Callable[[], Awaitable[None]]) -> DeadLetter:
    """A letter written by hand to the dead-letter place (`write_foreign`: value b"foreign", its
    fields not numbers) is listed beside a real one, with a plausible time, and both replay.
    Returns the foreign letter as listed, for the backend's own checks."""
    await q.publish([Message("k", b"real")])
    (real,) = await take(q, 1, ack=False)
    await q.dead_letter(real, "a real reason")
    await write_foreign()
    letters = await q.dead_letters()
    assert sorted(d.value for d in letters) == [b"foreign", b"real"]
    foreign = next(d for d in letters if d.value == b"foreign")
    assert 0 < foreign.failed_at < time.time() + 60, foreign  # its own time: not NaN, not inf
    assert await q.replay_dead_letters() == 2
    assert sorted(d.value for d in await take(q, 2)) == [b"foreign", b"real"]
    assert (await q.status()).dead_letters == 0
    return foreign


async def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def connect(q: Queue, role: Any, timeout: float = 60) -> None:
    """`q.connect(role)`, tried again while the backend says it is unavailable: a broker that an
    earlier test restarted, or one on a busy machine, may refuse a first connect (the product's
    services retry the same way, `runtime.open_when_back`). Tests of failing fast call
    `q.connect` themselves."""
    from llmtap.errors import BackendUnavailable

    deadline = time.monotonic() + timeout
    while True:
        try:
            await q.connect(role)
            return
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def group_members(spec: QueueSpec) -> int:
    """Live members of the consumer group, as the backend records them (a Kafka group counts only
    once it is stable: every member has joined and has its assignment)."""
    if spec.backend == "sqlite":
        import sqlite3

        with sqlite3.connect(spec.target, timeout=5) as db:
            now = time.time()
            row = db.execute("SELECT count(*) FROM consumers WHERE heartbeat + lease >= ?", (now,)).fetchone()
        return int(row[0])
    if spec.backend == "redis":
        from llmtap.queue.redis import RedisQueue

        q = spec.build()
        assert isinstance(q, RedisQueue)
        await q.connect("producer")
        try:
            sec, usec = await q.r.time()
            return int(await q.r.zcount(q._members_key, sec * 1000 + usec // 1000, "+inf"))
        finally:
            await q.close()
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=os.environ["LLMTAP_TEST_KAFKA_BOOTSTRAP"])
    await admin.start()
    try:
        (resp,) = await admin.describe_consumer_groups([spec.group])
        _err, _group, state, _ptype, _protocol, members, *_ = resp.groups[0]
        return len(members) if state == "Stable" else 0
    finally:
        await admin.close()


# -- consumer processes -------------------------------------------------------------------------
@dataclass
class ConsumerLog:
    """What a consumer process wrote: records it processed and acked, and those it had not."""

    acked: list[tuple[str, int]] = field(default_factory=list)
    unacked: list[tuple[str, int]] = field(default_factory=list)
    order_gaps: list[str] = field(default_factory=list)
    processed: list[tuple[float, str, int]] = field(default_factory=list)  # (time, key, seq)
    ready: bool = False
    stalled: bool = False
    closed: bool = False

    @classmethod
    def read(cls, path: Path) -> ConsumerLog:
        out = cls()
        tail: list[tuple[str, int]] = []
        text = path.read_text() if path.exists() else ""
        lines = text.split("\n")
        if not text.endswith("\n"):
            lines = lines[:-1]  # a line being written
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "P":
                tail.append((parts[1], int(parts[2])))
                out.processed.append((float(parts[5]), parts[1], int(parts[2])))
            elif parts[0] == "A":
                out.acked += tail
                tail = []
            elif parts[0] == "X":
                out.order_gaps.append(line)
            elif parts[0] == "READY":
                out.ready = True
            elif parts[0] == "STALL":
                out.stalled = True
            elif parts[0] == "CLOSED":
                out.closed = True
        out.unacked = tail
        return out


class ConsumerProcess:
    """A consumer in its own OS process (this file run as a script)."""

    def __init__(self, spec: QueueSpec, out: Path, *, stall_after: int = 0, batch: int = 50) -> None:
        self.out = out
        self.stderr = out.with_suffix(".stderr")
        args = [sys.executable, __file__, "consume", spec.to_json(), str(out), "--batch", str(batch)]
        if stall_after:
            args += ["--stall-after", str(stall_after)]
        with open(self.stderr, "wb") as err:
            self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def log(self) -> ConsumerLog:
        return ConsumerLog.read(self.out)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self, timeout: float = 20) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def errors(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""


@contextlib.contextmanager
def consumer_processes(
    spec: QueueSpec, tmp_path: Path, n: int, **kwargs: Any
) -> Iterator[list[ConsumerProcess]]:
    procs = [ConsumerProcess(spec, tmp_path / f"consumer{i}.log", **kwargs) for i in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.kill()


def check_exactly_once(
    logs: Sequence[ConsumerLog], expected: set[tuple[str, int]], killed: Sequence[ConsumerLog]
) -> None:
    """Every record processed and acked exactly once; extra processings only by killed consumers
    of records they had not acked; no per-key order gap anywhere."""
    acked = Counter(r for log in logs for r in log.acked)
    assert set(acked) == expected, (
        f"missing {len(expected - set(acked))}, unexpected {len(set(acked) - expected)}"
    )
    twice = {r: n for r, n in acked.items() if n > 1}
    assert not twice, f"{len(twice)} records acked more than once, e.g. {list(twice.items())[:5]}"
    stray = [r for log in logs if log not in killed for r in log.unacked]
    assert not stray, f"records processed but never acked by a live consumer: {stray[:5]}"
    # what a killed consumer had processed but not acked was delivered again, to a live one
    # (a queue that committed on delivery would lose exactly these)
    live_acked = Counter(r for log in logs if log not in killed for r in log.acked)
    lost = [r for log in killed for r in log.unacked if live_acked[r] != 1]
    assert not lost, f"{len(lost)} records in flight at a kill were not redelivered once, e.g. {lost[:5]}"
    gaps = [g for log in logs for g in log.order_gaps]
    assert not gaps, f"per-key order broken: {gaps[:5]}"
    # Across processes too: a key's record is first processed only after all before it were
    # (a key may move between consumers, e.g. SQS message groups; the clock orders them).
    ordered = sorted(
        (t, i, j, k, s) for i, log in enumerate(logs) for j, (t, k, s) in enumerate(log.processed)
    )
    done: dict[str, int] = {}
    for _, _, _, key, seq in ordered:
        if seq > done.get(key, -1):
            assert seq == done.get(key, -1) + 1, f"{key}: seq {seq} processed before {done.get(key, -1) + 1}"
            done[key] = seq


async def _consumer_main(spec: QueueSpec, out_path: str, stall_after: int, batch: int) -> None:
    q = spec.build()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    with open(out_path, "a", buffering=1) as out:
        await connect(q, "consumer")
        out.write("READY\n")
        last: dict[str, int] = {}
        # Partitioned queues hand one key to one consumer until a rebalance, so a key never
        # skips ahead within a consumer; an SQS message group may move between batches.
        sticky = spec.backend != "sqs"
        processed = 0
        while not stop.is_set():
            deliveries = await q.consume(batch, 0.2)
            if not deliveries:
                continue
            lines = []
            now = time.monotonic()
            for d in deliveries:
                key, seq = parse(d.value)
                # Within one consumer a key's records come in order: a redelivery may go back,
                # but never skip ahead.
                if sticky and key in last and seq > last[key] + 1:
                    lines.append(f"X {key} {last[key]} {seq}")
                last[key] = seq
                lines.append(f"P {key} {seq} {d.partition} {d.offset} {now:.6f}")
            out.write("\n".join(lines) + "\n")
            processed += len(deliveries)
            if stall_after and processed >= stall_after:
                out.write("STALL\n")
                await asyncio.Event().wait()  # until SIGKILL
            await q.ack(deliveries)
            out.write("A\n")
        await q.close()
        out.write("CLOSED\n")


def main(argv: Sequence[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["consume"])
    ap.add_argument("spec")
    ap.add_argument("out")
    ap.add_argument("--stall-after", type=int, default=0)
    ap.add_argument("--batch", type=int, default=50)
    a = ap.parse_args(argv)
    asyncio.run(_consumer_main(QueueSpec.from_json(a.spec), a.out, a.stall_after, a.batch))


if __name__ == "__main__":
    main(sys.argv[1:])
