"""The embedded SQLite queue: order, trimming, dead letters, and real consumer processes.

The multi-process tests run consumers as separate Python processes on one queue file (as
`llmtap worker` processes do), kill one with SIGKILL mid-batch, and count what went in and
what came out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from llmtap.queue import sqlite as sq
from llmtap.queue.base import Delivery, Message, partition_for
from llmtap.queue.sqlite import SQLiteQueue

LEASE = 1.0  # short leases keep the takeover tests quick


@pytest.fixture
def qpath(tmp_path: Path) -> str:
    return str(tmp_path / "queue.db")


@pytest.fixture
async def producer(qpath: str) -> AsyncIterator[SQLiteQueue]:
    q = SQLiteQueue(qpath, partitions=4)
    await q.connect("producer")
    yield q
    await q.close()


async def _consumer(qpath: str, **kw: float) -> SQLiteQueue:
    q = SQLiteQueue(qpath, partitions=4, lease_timeout=kw.get("lease", LEASE), heartbeat_interval=0.1)
    await q.connect("consumer")
    return q


async def _heartbeat_after(qpath: str, consumer_id: str, t: float, timeout: float = 10) -> float:
    """Wait for a heartbeat of this consumer later than `t` (wall clock, as the queue records it
    in its `consumers` table); returns its time."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(qpath, timeout=5) as db:
            row = db.execute("SELECT heartbeat FROM consumers WHERE id = ?", (consumer_id,)).fetchone()
        if row is not None and row[0] > t:
            return float(row[0])
        assert time.monotonic() < deadline, f"no heartbeat of {consumer_id} after {t}"
        await asyncio.sleep(0.02)


def _key_for(partition: int, partitions: int = 4, prefix: str = "k") -> str:
    i = 0
    while partition_for(f"{prefix}{i}", partitions) != partition:
        i += 1
    return f"{prefix}{i}"


def _rows(qpath: str) -> list[tuple[int, int]]:
    with sqlite3.connect(qpath) as db:
        return [(rid >> 40, rid & ((1 << 40) - 1)) for (rid,) in db.execute("SELECT id FROM messages")]


async def test_publish_consume_ack_in_order_per_partition(producer: SQLiteQueue, qpath: str) -> None:
    keys = [_key_for(p) for p in range(4)]
    msgs = [Message(key=keys[i % 4], value=f"{i}".encode()) for i in range(200)]
    for i in range(0, 200, 50):
        await producer.publish(msgs[i : i + 50])
    c = await _consumer(qpath)
    try:
        seen: dict[int, list[int]] = {p: [] for p in range(4)}
        offsets: dict[int, list[int]] = {p: [] for p in range(4)}
        while sum(map(len, seen.values())) < 200:
            batch = await c.consume(30, timeout=2)
            assert batch, "messages published but none delivered"
            # never more than one outstanding run per partition: ack before the next consume
            for d in batch:
                seen[d.partition].append(int(d.value))
                offsets[d.partition].append(d.offset)
            await c.ack(batch)
        for p in range(4):
            assert seen[p] == sorted(seen[p]), f"partition {p} out of order"
            assert [int(v) % 4 for v in seen[p]] == [keys.index(keys[p])] * 50
            assert offsets[p] == list(range(50))
        assert await c.consume(10, timeout=0.05) == []
        st = await c.status()
        assert st.lag == 0 and [p.lag for p in st.partitions] == [0, 0, 0, 0]
        assert _rows(qpath) == []  # every acked row trimmed
    finally:
        await c.close()


async def test_no_second_delivery_of_a_partition_while_one_is_outstanding(
    producer: SQLiteQueue, qpath: str
) -> None:
    key = _key_for(2)
    await producer.publish([Message(key=key, value=b"%d" % i) for i in range(10)])
    c = await _consumer(qpath)
    try:
        first = await c.consume(3, timeout=2)
        assert [d.offset for d in first] == [0, 1, 2]
        # Partition 2 has unacknowledged deliveries: nothing more of it, however often we ask.
        assert await c.consume(10, timeout=0.2) == []
        await c.ack(first[:2])
        assert await c.consume(10, timeout=0.2) == []  # offset 2 still outstanding
        await c.ack(first[2:])
        rest = await c.consume(10, timeout=2)
        assert [d.offset for d in rest] == list(range(3, 10))
        await c.ack(rest)
    finally:
        await c.close()


async def test_a_backlog_is_handed_out_a_partition_at_a_time_in_turn(
    producer: SQLiteQueue, qpath: str
) -> None:
    """Under a backlog a batch comes from as few partitions as it takes, so a worker's next
    batch (`worker_pipeline`) finds partitions free while this one is written; the starting
    partition rotates, so every partition gets its turn and none starves."""
    await producer.publish(
        [Message(key=_key_for(p), value=b"%d-%d" % (p, i)) for i in range(40) for p in range(4)]
    )
    c = await _consumer(qpath)
    try:
        first = await c.consume(30, timeout=2)
        assert len(first) == 30 and len({d.partition for d in first}) == 1
        second = await c.consume(30, timeout=2)  # the first still outstanding: another partition
        assert len(second) == 30 and len({d.partition for d in second}) == 1
        assert second[0].partition != first[0].partition
        await c.ack(first + second)
        seen = Counter(d.partition for d in first + second)
        while sum(seen.values()) < 160:
            got = await c.consume(30, timeout=2)
            assert got, f"nothing handed out with {160 - sum(seen.values())} left"
            seen.update(d.partition for d in got)
            await c.ack(got)
        assert seen == {0: 40, 1: 40, 2: 40, 3: 40}
    finally:
        await c.close()


async def test_trimming_deletes_acked_rows_only(producer: SQLiteQueue, qpath: str) -> None:
    key = _key_for(1)
    await producer.publish([Message(key=key, value=b"x") for _ in range(10)])
    c = await _consumer(qpath)
    try:
        batch = await c.consume(10, timeout=2)
        assert len(batch) == 10
        await c.ack(batch[:4])  # 0..3
        assert _rows(qpath) == [(1, o) for o in range(4, 10)]
        await c.ack([batch[6]])  # out of order: committed stays at 4, row 6 stays
        assert _rows(qpath) == [(1, o) for o in range(4, 10)]
        st = await c.status()
        assert st.partitions[1].lag == 6
        await c.ack(batch[4:6])  # 4, 5 close the gap: committed jumps to 7
        assert _rows(qpath) == [(1, 7), (1, 8), (1, 9)]
        assert (await c.status()).partitions[1].lag == 3
        await c.ack(batch[7:])
        assert _rows(qpath) == []
    finally:
        await c.close()


async def test_dead_letter_and_replay(producer: SQLiteQueue, qpath: str) -> None:
    key = _key_for(0)
    await producer.publish([Message(key=key, value=v) for v in (b"a", b"poison", b"c")])
    c = await _consumer(qpath)
    try:
        batch = await c.consume(10, timeout=2)
        assert [d.value for d in batch] == [b"a", b"poison", b"c"]
        await c.dead_letter(batch[1], "cost: ValueError: bad usage")
        await c.ack([batch[0], batch[2]])
        st = await c.status()
        assert st.lag == 0 and st.dead_letters == 1
        dead = await c.dead_letters()
        assert len(dead) == 1
        assert (dead[0].value, dead[0].reason, dead[0].partition, dead[0].offset) == (
            b"poison",
            "cost: ValueError: bad usage",
            0,
            1,
        )
        assert abs(dead[0].failed_at - time.time()) < 60
        # Dead-lettering the same delivery again (a redelivery) does not duplicate it.
        await c.dead_letter(batch[1], "again")
        assert len(await c.dead_letters()) == 1

        assert await c.replay_dead_letters(["no-such-id"]) == 0
        assert await c.replay_dead_letters([dead[0].id]) == 1
        assert (await c.status()).dead_letters == 0
        again = await c.consume(10, timeout=2)
        assert [(d.value, d.offset) for d in again] == [(b"poison", 3)]
        await c.ack(again)
        assert (await c.status()).lag == 0
        assert await c.replay_dead_letters() == 0
    finally:
        await c.close()


async def test_file_partition_count_wins(qpath: str) -> None:
    a = SQLiteQueue(qpath, partitions=4)
    await a.connect("producer")
    b = SQLiteQueue(qpath, partitions=9)
    await b.connect("producer")
    try:
        assert b.partitions == 4
        assert len((await b.status()).partitions) == 4
    finally:
        await a.close()
        await b.close()


async def test_unopenable_path_is_one_sentence(tmp_path: Path) -> None:
    from llmtap.errors import BackendUnavailable

    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    q = SQLiteQueue(str(blocker / "queue.db"), partitions=2)
    with pytest.raises(BackendUnavailable) as e:
        await q.connect("producer")
    assert str(blocker) in str(e.value) and "\n" not in str(e.value)


async def test_cancelled_consume_does_not_block_the_partition(producer: SQLiteQueue, qpath: str) -> None:
    await producer.publish([Message(key=_key_for(3), value=b"%d" % i) for i in range(5)])
    c = await _consumer(qpath)
    try:
        task = asyncio.create_task(c.consume(5, timeout=2))
        await asyncio.sleep(0)  # the fetch is on the queue thread now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = await c.consume(5, timeout=2)
        assert [d.offset for d in got] == [0, 1, 2, 3, 4]
        await c.ack(got)
    finally:
        await c.close()


async def test_two_consumers_in_one_process_split_and_take_over(producer: SQLiteQueue, qpath: str) -> None:
    a = await _consumer(qpath)
    b = await _consumer(qpath)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            owners = Counter(p.owner for p in (await a.status()).partitions)
            if owners.get(a.consumer_id) == 2 and owners.get(b.consumer_id) == 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"partitions not shared fairly: {owners}")
        # A consumer that closes releases at once; the other takes over within a heartbeat or two.
        await b.close()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            owners = Counter(p.owner for p in (await a.status()).partitions)
            if owners.get(a.consumer_id) == 4:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no takeover after close: {owners}")
    finally:
        await a.close()
        await b.close()


# -- real processes ----------------------------------------------------------------------------

CONSUMER = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from llmtap.errors import BackendUnavailable
    from llmtap.queue.sqlite import SQLiteQueue

    path, out, mode, lease = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

    async def main():
        q = SQLiteQueue(path, partitions=6, lease_timeout=lease, heartbeat_interval=lease / 5)
        await q.connect("consumer")
        print("READY", q.consumer_id, flush=True)
        with open(out, "a") as f:
            while True:
                try:
                    batch = await q.consume(50, timeout=0.2)
                except BackendUnavailable:  # an outage: tried again, as the worker does
                    await asyncio.sleep(0.05)
                    continue
                if batch and mode == "hold":
                    for d in batch:
                        f.write(json.dumps([d.partition, d.offset, d.value.decode()]) + "\\n")
                    f.flush()
                    print("HELD", len(batch), flush=True)
                    await asyncio.sleep(3600)  # never acks: killed with SIGKILL by the test
                if batch:
                    await asyncio.sleep(0.01)  # "processing"
                    while True:
                        try:
                            await q.ack(batch)
                            break
                        except BackendUnavailable:
                            await asyncio.sleep(0.05)
                    for d in batch:
                        f.write(json.dumps([d.partition, d.offset, d.value.decode()]) + "\\n")
                    f.flush()
                elif os.path.exists(path + ".done") and (await q.status()).lag == 0:
                    break
        await q.close()

    asyncio.run(main())
    """
)


class _Proc:
    def __init__(self, tmp: Path, name: str, qpath: str, mode: str) -> None:
        script = tmp / "consumer.py"
        script.write_text(CONSUMER)
        self.out = tmp / f"{name}.jsonl"
        self.log = open(tmp / f"{name}.log", "w+")  # closed in stop()
        self.p = subprocess.Popen(
            [sys.executable, str(script), qpath, str(self.out), mode, str(LEASE)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_for(self, word: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.log.seek(0)
            for line in self.log.read().splitlines():
                if line.startswith(word):
                    return line
            if self.p.poll() is not None:
                break
            time.sleep(0.02)
        self.log.seek(0)
        raise AssertionError(f"no {word!r} from consumer; log:\n{self.log.read()}")

    def records(self) -> list[tuple[int, int, str]]:
        if not self.out.exists():
            return []
        return [tuple(json.loads(line)) for line in self.out.read_text().splitlines()]  # type: ignore[misc]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        self.log.close()


@pytest.fixture
def procs() -> Iterator[list[_Proc]]:
    started: list[_Proc] = []
    yield started
    for p in started:
        p.stop()


async def _publish_all(qpath: str, n: int) -> list[str]:
    q = SQLiteQueue(qpath, partitions=6)
    await q.connect("producer")
    values = [f"m{i}" for i in range(n)]
    msgs = [Message(key=f"tenant-{j % 37}", value=v.encode()) for j, v in enumerate(values)]
    try:
        for i in range(0, n, 100):
            await q.publish(msgs[i : i + 100])
    finally:
        await q.close()
    return values


async def _wait_owners(qpath: str, ids: set[str], timeout: float = 10) -> None:
    q = SQLiteQueue(qpath, partitions=6)
    await q.connect("producer")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owners = {p.owner for p in (await q.status()).partitions}
            if owners == ids:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"owners {owners} != {ids}")
    finally:
        await q.close()


async def test_two_consumer_processes_share_and_consume_exactly_once(
    tmp_path: Path, procs: list[_Proc]
) -> None:
    qpath = str(tmp_path / "queue.db")
    await _publish_all(qpath, 0)  # create the file
    a = _Proc(tmp_path, "a", qpath, "ack")
    b = _Proc(tmp_path, "b", qpath, "ack")
    procs += [a, b]
    ids = {a.wait_for("READY").split()[1], b.wait_for("READY").split()[1]}
    await _wait_owners(qpath, ids)
    values = await _publish_all(qpath, 3000)
    Path(qpath + ".done").touch()
    for p in (a, b):
        p.p.wait(60)
        assert p.p.returncode == 0, p.wait_for("never")
    ra, rb = a.records(), b.records()
    assert ra and rb, "both processes must have had partitions"
    consumed = Counter(v for _, _, v in ra + rb)
    assert set(consumed) == set(values)
    assert max(consumed.values()) == 1, "a message was consumed twice although acked"
    # the two processes never held the same partition
    assert not ({p for p, _, _ in ra} & {p for p, _, _ in rb})
    # order per partition: offsets strictly increasing in each process's log
    for recs in (ra, rb):
        for part in {p for p, _, _ in recs}:
            offs = [o for p, o, _ in recs if p == part]
            assert offs == sorted(offs) and len(offs) == len(set(offs))


async def test_a_queue_file_moved_away_and_back_under_a_consumer_process_loses_and_strands_nothing(
    tmp_path: Path, procs: list[_Proc], caplog: pytest.LogCaptureFixture
) -> None:
    """The review of the reopen (rev11): queue.db moved away for 3 s and back under a gateway
    and a worker. `mv` leaves the WAL at the path: the gateway made a new file there and removed
    that WAL, which the worker still wrote through; moved back, the file was written through two
    WALs, and the worker consumed nothing more until restarted (277 records stuck). A file
    missing with its WAL still there is waited for: writes are refused meanwhile, none lost."""
    qpath = str(tmp_path / "queue.db")
    p = SQLiteQueue(qpath, partitions=6)
    await p.connect("producer")
    c = _Proc(tmp_path, "c", qpath, "ack")
    procs.append(c)
    c.wait_for("READY")

    def msgs(lo: int, hi: int) -> list[Message]:
        return [Message(key=f"tenant-{i % 37}", value=f"m{i}".encode()) for i in range(lo, hi)]

    def consumed() -> Counter[str]:
        return Counter(v for _, _, v in c.records())

    try:
        await p.publish(msgs(0, 100))
        deadline = time.monotonic() + 60
        while len(consumed()) < 100:
            assert time.monotonic() < deadline and c.p.poll() is None, c.wait_for("never")
            await asyncio.sleep(0.05)
        wal = os.stat(qpath + "-wal").st_ino
        os.rename(qpath, qpath + ".away")
        refused = []
        for _ in range(2):  # the first is committed in the moved file, the second never written
            try:
                await p.publish(msgs(100, 101))
                refused.append("taken")
            except sq.BackendUnavailable as e:
                refused.append(str(e))
        os.rename(qpath + ".away", qpath)
        with contextlib.suppress(sq.BackendUnavailable):  # (how the old code failed first)
            await p.publish(msgs(101, 200))
            refused.append("taken")
        if refused[-1] != "taken":
            await p.publish(msgs(101, 200))
        assert os.stat(qpath + "-wal").st_ino == wal  # the WAL at the path is still the file's own
        # Away again, for longer than any wait (a 30 s grace then made a new file there, which
        # lost the WAL's records and stranded the worker on the file's return: review).
        os.rename(qpath, qpath + ".away")
        for _ in range(3):
            with pytest.raises(sq.BackendUnavailable, match="missing from its path"):
                await p.publish(msgs(200, 201))
        os.rename(qpath + ".away", qpath)
        await p.publish(msgs(201, 300))
    finally:
        await p.close()
    Path(qpath + ".done").touch()
    c.p.wait(60)
    assert c.p.returncode == 0, c.wait_for("never")
    got = consumed()
    assert set(got) == {f"m{i}" for i in range(300)} and max(got.values()) <= 2, got
    assert all("missing from its path" in r for r in refused[:2]), refused
    with sqlite3.connect(qpath) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    said = [r.getMessage() for r in caplog.records if r.name == "llmtap.queue.sqlite"]
    assert any("missing from its path" in line for line in said), said
    assert any("is back at its path" in line for line in said), said
    assert not any("while open; opening" in line for line in said), said


async def test_a_queue_opened_again_keeps_no_descriptor_of_the_files_that_went(qpath: str) -> None:
    """The review (rev11): each reopen left the old poll probe open, and with it the removed
    file's descriptors and disk space (32 after 10 removals)."""
    q = SQLiteQueue(qpath, partitions=4)
    await q.connect("both")

    def deleted() -> list[str]:
        fds = Path("/proc/self/fd")
        links = [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()] if fds.exists() else []
        return [link for link in links if link.startswith(qpath) and link.endswith("(deleted)")]

    try:
        for i in range(5):
            await q.publish([Message(key="k", value=b"m%d" % i)])
            for suffix in ("", "-wal", "-shm"):
                os.unlink(qpath + suffix)
            with pytest.raises(sq.BackendUnavailable, match="removed while open; opened again"):
                await q.publish([Message(key="k", value=b"refused")])
            await asyncio.sleep(0.05)  # the old probe is closed on the event loop
        assert deleted() == []
    finally:
        await q.close()


async def test_an_idle_consumer_whose_heartbeat_fails_says_so(producer: SQLiteQueue, qpath: str) -> None:
    """An idle poll writes nothing, so a worker said ok while its heartbeat (lease renewal)
    failed once a minute and its lag grew (review): a consume now says the outage."""
    await producer.publish([Message(key="k", value=b"m")])
    c = await _consumer(qpath)  # a heartbeat every 0.1 s
    try:
        first: list[Delivery] = []
        deadline = time.monotonic() + 60
        while not first:
            assert time.monotonic() < deadline
            first = await c.consume(10, timeout=0.5)
        await c.ack(first)
        os.rename(qpath, qpath + ".away")
        while True:
            assert time.monotonic() < deadline, "the consumer never said its heartbeat fails"
            try:
                assert await c.consume(10, timeout=0.2) == []
            except sq.BackendUnavailable as e:
                assert "heartbeat fails" in str(e) and "missing from its path" in str(e), e
                break
        os.rename(qpath + ".away", qpath)
        await producer.publish([Message(key="k", value=b"after")])
        got: list[bytes] = []
        while not got:
            assert time.monotonic() < deadline, "the consumer never came back"
            try:
                got = [d.value for d in await c.consume(10, timeout=0.2)]
            except sq.BackendUnavailable:
                await asyncio.sleep(0.05)  # as the worker backs off (its heartbeat runs meanwhile)
        assert got == [b"after"]
    finally:
        await c.close()


async def test_a_queue_file_missing_with_its_wal_left_is_never_replaced_until_the_wal_goes(
    producer: SQLiteQueue, qpath: str
) -> None:
    """A file gone from its path for good (`rm` of the file alone, or moved for minutes): after
    a 30 s grace a new file was made at the path and the WAL left there removed. Moved back
    after that, the file had lost what that WAL held (4 records) and a worker, tied through
    another connection to the removed WAL, consumed nothing more (review). Now writes are
    refused as long as the WAL is there (the gateway falls back, the log says what to do);
    once the operator removes it, a new, empty queue is made."""
    await producer.publish([Message(key="k", value=b"old")])
    os.rename(qpath, qpath + ".away")
    for _ in range(3):
        with pytest.raises(sq.BackendUnavailable, match="missing from its path"):
            await producer.publish([Message(key="k", value=b"refused")])
    assert not os.path.exists(qpath)  # nothing made in its place
    for suffix in ("-wal", "-shm"):  # what the log line tells the operator to do
        os.unlink(qpath + suffix)
    with pytest.raises(sq.BackendUnavailable, match="removed while open; opened again"):
        await producer.publish([Message(key="k", value=b"refused")])
    await producer.publish([Message(key="k", value=b"new")])
    c = await _consumer(qpath)
    try:
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while not got:
            assert time.monotonic() < deadline
            got = [d.value for d in await c.consume(10, timeout=1)]
        assert got == [b"new"]
    finally:
        await c.close()
    with sqlite3.connect(qpath) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


async def test_sigkilled_consumer_mid_batch_is_taken_over(tmp_path: Path, procs: list[_Proc]) -> None:
    qpath = str(tmp_path / "queue.db")
    await _publish_all(qpath, 0)
    victim = _Proc(tmp_path, "victim", qpath, "hold")
    survivor = _Proc(tmp_path, "survivor", qpath, "ack")
    procs += [victim, survivor]
    ids = {victim.wait_for("READY").split()[1], survivor.wait_for("READY").split()[1]}
    await _wait_owners(qpath, ids)
    values = await _publish_all(qpath, 2000)
    victim.wait_for("HELD")
    held = victim.records()
    assert held
    os.kill(victim.p.pid, signal.SIGKILL)
    victim.p.wait(5)
    Path(qpath + ".done").touch()
    survivor.p.wait(60)
    assert survivor.p.returncode == 0, survivor.wait_for("never")
    done = survivor.records()
    consumed = Counter(v for _, _, v in done)
    # at least once: everything, including what the victim held unacked, reached the survivor
    assert set(consumed) == set(values)
    assert {v for _, _, v in held} <= set(consumed)
    # the committed count equals what was published, and nothing is left in the file
    q = SQLiteQueue(qpath, partitions=6)
    await q.connect("producer")
    try:
        st = await q.status()
    finally:
        await q.close()
    assert st.lag == 0
    with sqlite3.connect(qpath) as db:
        committed = db.execute("SELECT sum(committed), sum(next_offset) FROM partitions").fetchone()
    assert committed == (len(values), len(values))
    assert _rows(qpath) == []


async def test_rebalance_waits_for_outstanding_deliveries(producer: SQLiteQueue, qpath: str) -> None:
    """A joining consumer gets its share only after the old owner acknowledged what it had out."""
    await producer.publish([Message(key=_key_for(p), value=b"%d" % p) for p in range(4) for _ in range(4)])
    a = await _consumer(qpath)
    b: SQLiteQueue | None = None
    try:
        held = await a.consume(100, timeout=2)
        assert len(held) == 16
        b = await _consumer(qpath)
        # b is live and wants two partitions; a has seen that (a heartbeat of a after b's first)
        # and b has tried to take them since (two heartbeats of b after that one of a)
        hb_b = await _heartbeat_after(qpath, b.consumer_id, 0.0)
        hb_a = await _heartbeat_after(qpath, a.consumer_id, hb_b)
        await _heartbeat_after(qpath, b.consumer_id, await _heartbeat_after(qpath, b.consumer_id, hb_a))
        assert await b.consume(100, timeout=0.3) == []
        assert {p.owner for p in (await b.status()).partitions} == {a.consumer_id}
        await a.ack(held)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            owners = Counter(p.owner for p in (await b.status()).partitions)
            if owners.get(b.consumer_id) == 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"b never got its share: {owners}")
        await producer.publish([Message(key=_key_for(p), value=b"new") for p in range(4)])
        got_a = await a.consume(100, timeout=2)
        got_b = await b.consume(100, timeout=2)
        assert sorted(d.partition for d in got_a + got_b) == [0, 1, 2, 3]
        assert {d.offset for d in got_a + got_b} == {4}  # nothing acked came back
        assert not {d.partition for d in got_a} & {d.partition for d in got_b}
    finally:
        await a.close()
        if b is not None:
            await b.close()


async def test_batches_of_1kb_records_take_one_transaction_each_not_one_per_record(qpath: str) -> None:
    """The embedded queue keeps up with a busy gateway because a batch is one transaction (one
    fsync). Counted, not timed (speed lives in bench/queue_bench.py: 40-70k records/s publish
    and 40-65k/s consume+ack on the idle 2-core machine): a regression to per-record
    transactions or fsyncs (hundreds per second) shows as thousands of transactions here."""
    q = SQLiteQueue(qpath, partitions=6)  # synchronous=FULL: every batch fsynced
    await q.connect("both")
    n, size = 20_000, 500
    payload = os.urandom(512).hex().encode()
    msgs = [Message(key=f"tenant-{i % 50}", value=payload) for i in range(n)]
    statements: list[str] = []
    db = q._conn
    assert db is not None
    # Set and unset on the queue's own thread: from this one, waiting for SQLite's mutex while
    # the queue's thread (a heartbeat) was in a statement whose trace wanted the GIL held here,
    # it deadlocked the whole test run (pytest-timeout's alarm cannot fire in C code).
    await q._call(db.set_trace_callback, statements.append)  # called on the queue's thread

    def transactions() -> int:
        return sum(1 for s in statements if s.lstrip().upper().startswith("BEGIN"))

    try:
        for i in range(0, n, size):
            await q.publish(msgs[i : i + size])
        published = transactions()
        got = 0
        while got < n:
            batch = await q.consume(size, timeout=5)
            assert batch
            await q.ack(batch)
            got += len(batch)
        consumed = transactions() - published
        assert got == n and (await q.status()).lag == 0
        # 40 batches each way; heartbeats and lease renewals may add a few transactions
        assert published <= n // size + 10, published
        assert consumed <= 3 * (n // size) + 10, consumed
    finally:
        await q._call(db.set_trace_callback, None)
        await q.close()


@pytest.mark.parametrize("page_size", [4096, sq.PAGE_SIZE], ids=["4k-file-from-before", "new-file"])
async def test_drained_backlog_gives_disk_space_back(
    qpath: str, page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also for a file made before the queue's page size grew: the thresholds are in bytes."""
    monkeypatch.setattr(sq, "PAGE_SIZE", page_size)  # only a new file takes it
    q = SQLiteQueue(qpath, partitions=2, heartbeat_interval=0.05)
    await q.connect("both")
    payload = os.urandom(1024)
    try:
        for _ in range(40):
            await q.publish([Message(key=f"k{j}", value=payload) for j in range(500)])
        full = os.path.getsize(qpath) + os.path.getsize(qpath + "-wal")
        while batch := await q.consume(500, timeout=0.5):
            await q.ack(batch)
        assert (await q.status()).lag == 0

        def size() -> int:
            with sqlite3.connect(qpath) as db:
                assert db.execute("PRAGMA page_size").fetchone()[0] == page_size
                return int(db.execute("PRAGMA page_count").fetchone()[0]) * page_size

        deadline = time.monotonic() + 10
        while size() > full / 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert size() <= full / 2, "trimmed pages were never given back"
    finally:
        await q.close()


async def test_a_new_file_gets_large_pages_and_an_old_one_keeps_its_own(
    qpath: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two 2.5 KB messages share no 4 KB page; a 16 KB one holds six, so each message costs a
    fraction of a page to write, checkpoint and read. A file written by an earlier version keeps
    its 4 KB pages (WAL mode cannot change them) and its messages."""
    q = SQLiteQueue(qpath, partitions=2)
    await q.connect("producer")
    await q.close()
    with sqlite3.connect(qpath) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == sq.PAGE_SIZE == 16384

    old = qpath + ".old"
    monkeypatch.setattr(sq, "PAGE_SIZE", 4096)
    q = SQLiteQueue(old, partitions=2)
    await q.connect("producer")
    await q.publish([Message(key=f"k{j}", value=os.urandom(2500)) for j in range(40)])
    await q.close()
    monkeypatch.undo()
    q = SQLiteQueue(old, partitions=2)
    await q.connect("both")
    try:
        await q.publish([Message(key=f"k{j}", value=os.urandom(2500)) for j in range(40, 60)])
        got: list[Delivery] = []
        while batch := await q.consume(100, timeout=0.5):
            got += batch
            await q.ack(batch)
        assert len(got) == 60
        assert q._page_size == 4096
    finally:
        await q.close()
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096


async def test_the_file_is_not_shrunk_while_a_backlog_is_being_drained(qpath: str) -> None:
    """The vacuum moves pages on the queue's one thread, where fetches and acks wait: it waits
    until the backlog is drained, however much of the file is already free."""
    q = SQLiteQueue(qpath, partitions=2, heartbeat_interval=0.05)
    await q.connect("both")
    payload = os.urandom(2048)  # 40 MB: past the 16 MB the queue keeps free for the next burst

    def pages() -> tuple[int, int]:
        with sqlite3.connect(qpath) as db:
            return (
                int(db.execute("PRAGMA page_count").fetchone()[0]),
                int(db.execute("PRAGMA freelist_count").fetchone()[0]),
            )

    try:
        for _ in range(40):
            await q.publish([Message(key=f"k{j}", value=payload) for j in range(500)])
        full = pages()[0]
        while (await q.status()).lag > 5000:  # three quarters drained: most of the file is free
            await q.ack(await q.consume(500, timeout=0.5))
        total, free = pages()
        assert free * 2 >= total, (total, free)  # what used to start the vacuum
        t = time.time()
        for _ in range(5):  # five heartbeats, each of which may shrink the file
            t = await _heartbeat_after(qpath, q.consumer_id, t)
        assert pages()[0] == total == full, "the file was shrunk while the backlog was being drained"
        while batch := await q.consume(500, timeout=0.5):
            await q.ack(batch)
        deadline = time.monotonic() + 30
        while pages()[0] * 2 > full and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pages()[0] * 2 <= full, "the drained queue's pages were never given back"
    finally:
        await q.close()


async def test_an_idle_consumer_keeps_its_poll_back_off_across_calls(
    producer: SQLiteQueue, qpath: str
) -> None:
    """A worker calls `consume` every half second while the queue is empty: a back-off that
    restarted at its shortest pause each call polled twice as often as meant (an idle `llmtap up`
    woke 170 times a second, ~100 with it kept). Messages bring the shortest pause back."""
    from llmtap.queue import sqlite as sq

    q = await _consumer(qpath)
    try:
        deadline = time.monotonic() + 30
        while q._poll_pause == sq._POLL_MIN:  # one empty poll and one pause at least
            assert await q.consume(10, timeout=0.3) == []
            assert time.monotonic() < deadline
        grown = q._poll_pause
        assert await q.consume(10, timeout=0.3) == []
        assert q._poll_pause >= grown  # not restarted by the new call
        await producer.publish([Message("k", b"v")])
        got: list[object] = []
        while not got:
            got = list(await q.consume(10, timeout=0.5))
            assert time.monotonic() < deadline + 30
        assert q._poll_pause == sq._POLL_MIN
    finally:
        await q.close()


async def test_an_idle_consumer_fetches_only_once_the_file_changed(
    producer: SQLiteQueue, qpath: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll of an empty queue was a hop to the queue thread and a query, 25 a second in an
    idle `llmtap up` (its worker and the server's ingest drainer): most of its idle CPU. It now
    reads `PRAGMA data_version` on the event loop and fetches only when a connection committed
    since its last empty fetch; a probe that cannot be read makes every poll fetch."""
    from llmtap.queue import sqlite as sq

    monkeypatch.setattr(sq, "_REFETCH", 3600.0)
    q = SQLiteQueue(qpath, partitions=4, lease_timeout=3600.0)  # no heartbeat commit in the test
    await q.connect("consumer")
    fetches = 0
    real_fetch = q._fetch

    def counting(n: int) -> list[Delivery]:
        nonlocal fetches
        fetches += 1
        return real_fetch(n)

    monkeypatch.setattr(q, "_fetch", counting)
    try:
        for _ in range(20):
            assert await q.consume(10, timeout=0) == []
        assert fetches == 1  # the first poll; nothing committed since

        await producer.publish([Message("k", b"v")])  # another connection commits
        got = await q.consume(10, timeout=0)
        assert [d.value for d in got] == [b"v"] and fetches == 2
        await q.ack(got)  # our own queue thread's commit counts too
        assert await q.consume(10, timeout=0) == [] and fetches == 3
        assert await q.consume(10, timeout=0) == [] and fetches == 3

        assert q._probe is not None
        q._probe.close()  # unreadable: back to fetching on every poll
        for i in range(3):
            assert await q.consume(10, timeout=0) == []
            assert fetches == 4 + i
    finally:
        await q.close()


async def test_closing_gives_up_a_call_stuck_on_a_file_another_process_locked(qpath: str) -> None:
    """The concurrency review: a gateway stopping while another process held the queue file
    locked waited for the lock (each of 20 tries waits busy_timeout: minutes), then exited 1.
    Closing now ends the stuck call after its current try and returns; the lock is held
    throughout, so nothing here waits for it to go."""
    from llmtap.errors import BackendUnavailable

    q = SQLiteQueue(qpath, partitions=1, busy_timeout_ms=2000)
    await q.connect("producer")
    holder = sqlite3.connect(qpath, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        publish = asyncio.ensure_future(q.publish([Message("k", b"v")]))
        await asyncio.sleep(0)  # on the queue's thread, waiting for the lock
        await asyncio.wait_for(q.close(), 30)
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(publish, 30)  # 20 tries of 2 s would be 40 s
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_a_file_another_process_keeps_locked_is_an_outage_after_one_busy_timeout(qpath: str) -> None:
    """rev13: `BEGIN IMMEDIATE` held by hand for 40 s; each call retried 20 times, each try
    waiting busy_timeout again, so a worker stood for up to ~200 s with `/healthz` ok and no
    line. One whole busy_timeout is an outage now (the worker says it and tries again later);
    the lock gone, the same queue goes on."""
    from llmtap.errors import BackendUnavailable

    q = SQLiteQueue(qpath, partitions=1, busy_timeout_ms=1000)
    await q.connect("both")
    holder = sqlite3.connect(qpath, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match="locked by another process"):
            await asyncio.wait_for(q.publish([Message("k", b"v")]), 60)
        # One busy_timeout (1 s), not 20 of them (20 s and more): bounded generously.
        assert time.monotonic() - t0 < 12
        # An idle consumer says it too (its heartbeat cannot write): what a worker's /healthz shows.
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the idle consumer never said the queue is locked"
            try:
                await q.consume(10, timeout=0.2)
            except BackendUnavailable as e:
                assert "locked by another process" in str(e), e
                break
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    try:
        await q.publish([Message("k", b"v")])
        got: list[Delivery] = []
        deadline = time.monotonic() + 60
        while not got:  # once its heartbeat has written again
            assert time.monotonic() < deadline, "the queue never came back"
            try:
                got = await q.consume(10, timeout=0.5)
            except BackendUnavailable:
                await asyncio.sleep(0.1)  # as a worker backs off (its heartbeat runs meanwhile)
        assert [d.value for d in got] == [b"v"]
    finally:
        await q.close()


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_queue_file_removed_or_replaced_while_open_is_opened_again_and_nothing_published_since_lost(
    producer: SQLiteQueue, qpath: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An outside check deleted queue.db (and its WAL) under a running stack: the gateway went on
    publishing into the deleted file, every record since was lost, and nothing was logged. The
    publish that finds its file gone is refused (the gateway falls back), the queue opens the
    path again, and the consumer follows at its next write; deliveries it had out from the old
    file are never acknowledged in the new one, whose offsets start again."""
    keys = [_key_for(p) for p in range(4)]
    await producer.publish([Message(key=keys[i % 4], value=b"old-%d" % i) for i in range(8)])
    c = await _consumer(qpath)
    try:
        out: list[Delivery] = []
        while len(out) < 8:
            out += await c.consume(8, timeout=5)
        await c.ack(out[:4])  # the rest outstanding when the file goes
        old = out[4:]
        if how == "removed":
            for suffix in ("", "-wal", "-shm"):
                os.unlink(qpath + suffix)
        else:
            copy = qpath + ".copy"
            with sqlite3.connect(qpath) as src, sqlite3.connect(copy) as dst:
                src.backup(dst)
            os.replace(copy, qpath)
        with pytest.raises(sq.BackendUnavailable, match=f"its file was {how} while open; opened again"):
            await producer.publish([Message(key=keys[0], value=b"refused")])
        assert f"SQLite queue {qpath}: its file was {how} while open" in caplog.text
        new = [Message(key=keys[i % 4], value=b"new-%d" % i) for i in range(12)]
        await producer.publish(new)
        # Old deliveries acked late (the worker's retry after the refusal included): nothing of
        # the new file is taken for them.
        for _ in range(2):
            with contextlib.suppress(sq.BackendUnavailable):
                await c.ack(old)
        got: list[bytes] = []
        deadline = time.monotonic() + 60
        while sum(v.startswith(b"new-") for v in got) < 12:
            assert time.monotonic() < deadline, f"new records not all delivered: {got}"
            try:
                batch = await c.consume(20, timeout=1)
            except sq.BackendUnavailable:
                continue  # the consumer finding the file gone: it opened the path again
            got += [d.value for d in batch]
            await c.ack(batch)
        assert sorted(v for v in got if v.startswith(b"new-")) == sorted(m.value for m in new)
        assert b"refused" not in got  # published into the file that went: the gateway fell back
        assert not [v for v, n in Counter(got).items() if n > 1]  # none twice
        assert await c.consume(20, timeout=0.3) == []
    finally:
        await c.close()
