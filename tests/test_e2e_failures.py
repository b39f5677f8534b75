"""Failure end to end: `llmtap gateway`, `llmtap worker` and `llmtap server` as separate real
processes sharing one data dir (SQLite queue, SQLite store, file bodies), broken for real.

Each test counts what went in (every request id the client chose and got an answer for) and
what came out (rows in the store, read through the query API): a SIGKILLed worker, a gateway
SIGTERMed under load and two workers racing on one queue must all end with exactly one row per
answered request; a corrupt queue message must be dead-lettered without stalling the others;
and a user's configuration mistake must end start-up with one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmtap.queue.base import Message, partition_for
from llmtap.queue.sqlite import SQLiteQueue
from llmtap.record import LogRecord, encode
from procs import (
    Proc,
    assert_processed_after_kill,
    blocked_batch,
    chain_worker_args,
    fake_upstream,
    free_port,
    http_json,
    list_records,
    llmtap_env,
    processings,
    start_chain_worker,
    start_llmtap,
    stored_count,
    wait_http,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

PARTITIONS = 6
LOAD_ID = "x-load-id"  # the request id again, in a header that goes upstream
AUTH = {"Authorization": "Bearer sk-failure-test", "x-api-key": "sk-ant-failure-test"}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fake_upstream(tmp_path_factory.mktemp("fake")) as url:
        yield url


def _ready(proc: Proc) -> bool:
    return "press Ctrl-C" in proc.output()


@dataclass
class Split:
    """gateway / worker(s) / server as separate processes over one data dir."""

    tmp: Path
    fake: str
    gw_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    worker_args: tuple[str, ...] = ()  # of "chain-worker" processes (tests/chain_worker.py)

    @property
    def data(self) -> Path:
        return self.tmp / "data"

    @property
    def gw(self) -> str:
        return f"http://127.0.0.1:{self.gw_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self, **settings: str | int) -> dict[str, str]:
        base: dict[str, str | int] = {
            "gateway_port": self.gw_port,
            "server_port": self.api_port,
            "openai_base_url": self.fake,
            "anthropic_base_url": self.fake,
            "partitions": PARTITIONS,
        }
        return llmtap_env(self.data, **{**base, **settings})

    def start(self, command: str, name: str, **settings: str | int) -> Proc:
        return self.start_all((command, name, settings))[0]

    def start_all(self, *specs: tuple[str, str, dict[str, str | int]]) -> list[Proc]:
        """Launch processes together (start-up is mostly Python imports), then wait for each."""
        procs = []
        for command, name, settings in specs:
            env, log = self.env(**settings), self.tmp / f"{name}.log"
            if command == "chain-worker":
                procs.append(start_chain_worker(env, log, *self.worker_args))
            else:
                procs.append(start_llmtap(command, env, log))
            self.procs.append(procs[-1])
        for (command, name, _), proc in zip(specs, procs, strict=True):
            try:
                if command == "gateway":
                    wait_http(f"{self.gw}/healthz")
                elif command == "server":
                    wait_http(f"{self.api}/healthz")
                else:  # the banner is printed once the service is ready
                    wait_until(partial(_ready, proc), 30, what=f"{name} ready")
            except AssertionError:
                raise AssertionError(f"{name} did not start:\n{proc.output()}") from None
        return procs

    def count(self) -> int:
        return stored_count(self.api)

    def wait_count(self, n: int, timeout: float = 45) -> None:
        wait_until(lambda: self.count() >= n, timeout, interval=0.1, what=f"{n} stored records")

    def stored_ids(self) -> list[str]:
        return [r["id"] for r in list_records(self.api)]

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.signal(signal.SIGTERM)
        for p in reversed(self.procs):
            p.stop(timeout=20)

    def logs_without_traceback(self) -> None:
        for p in self.procs:
            out = p.output()
            assert "Traceback" not in out, f"{p.args}:\n{out}"


@pytest.fixture
def split(tmp_path: Path, fake: str) -> Iterator[Split]:
    s = Split(tmp_path, fake)
    try:
        yield s
    finally:
        s.stop_all()


# -- load ------------------------------------------------------------------------------------------


@dataclass
class Outcomes:
    ok: list[str] = field(default_factory=list)  # 2xx: each must be stored
    refused: list[str] = field(default_factory=list)  # no connection: never reached the gateway
    dropped: list[str] = field(default_factory=list)  # connection broke: stored iff it went upstream
    other: list[tuple[str, int]] = field(default_factory=list)  # non-2xx answers


def _request(i: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    """Request `i` of a load: a mix of OpenAI stream / non-stream and Anthropic calls."""
    text = f"load request number {i}"
    kind = i % 3
    if kind == 2:
        body: dict[str, Any] = {
            "model": "claude-haiku-4-5",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": text}],
        }
        return "/anthropic/v1/messages", body, {"anthropic-version": "2023-06-01"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    if kind == 0:
        body["stream"] = True
    return "/openai/v1/chat/completions", body, {}


async def run_load(
    gw: str,
    n: int,
    concurrency: int = 32,
    *,
    stop: asyncio.Event | None = None,
    extra_headers: dict[str, str] | None = None,
    progress: list[int] | None = None,
    ids: dict[int, str] | None = None,
) -> Outcomes:
    """Send up to `n` requests, `concurrency` at a time, each with an id the client chose
    (`ids[i]` for request `i`, if given)."""
    out = Outcomes()
    counter = iter(range(n))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def one(i: int) -> None:
            rid = (ids or {}).get(i) or str(uuid.uuid4())
            path, body, headers = _request(i)
            headers = {**AUTH, **headers, **(extra_headers or {}), "Llmtap-Request-Id": rid, LOAD_ID: rid}
            try:
                async with http.post(gw + path, json=body, headers=headers) as r:
                    data = await r.read()
                    if 200 <= r.status < 300:
                        assert r.headers["Llmtap-Request-Id"] == rid
                        assert b"number" in data, data[:300]  # the echoed prompt, whole
                        assert not body.get("stream") or data.endswith(b"data: [DONE]\n\n"), data[-200:]
                        out.ok.append(rid)
                    else:
                        out.other.append((rid, r.status))
            except aiohttp.ClientConnectorError:
                out.refused.append(rid)
                await asyncio.sleep(0.05)  # knock, don't hammer: the CPU is for the stopping gateway
            except (aiohttp.ClientError, OSError):
                out.dropped.append(rid)
            if progress is not None:
                progress[0] += 1

        async def lane() -> None:
            for i in counter:
                if stop is not None and stop.is_set():
                    return
                await one(i)

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return out


async def poll_count(split: Split) -> int:
    return await asyncio.to_thread(split.count)


def assert_exactly(split: Split, ids: list[str]) -> None:
    """The store holds these ids, each once, and nothing else."""
    stored = split.stored_ids()
    assert len(stored) == len(set(stored)), "duplicate rows"
    assert set(stored) == set(ids), (len(stored), len(ids), len(set(stored) ^ set(ids)))
    assert split.count() == len(ids)


def _lag(split: Split) -> int:
    async def read() -> int:
        q = SQLiteQueue(str(split.data / "queue.db"), partitions=PARTITIONS)
        await q.connect("producer")
        try:
            return (await q.status()).lag
        finally:
            await q.close()

    return asyncio.run(read())


async def drained(split: Split, timeout: float = 45) -> None:
    """Wait until the queue holds nothing unacknowledged: from then on nothing can be delivered
    again, so counting processings is final (no sleep "for a duplicate to land")."""
    await asyncio.to_thread(wait_until, lambda: _lag(split) == 0, timeout, 0.1, "queue lag 0")


def processed_once(split: Split, ids: list[str]) -> None:
    """Every id went through the chain of the workers exactly once, and nothing else did. Rows
    cannot show a duplicate (the store's primary key); a second processing can."""
    total = sum(processings(split.tmp).values(), Counter[str]())
    assert set(total) == set(ids), (len(total), len(ids), len(set(total) ^ set(ids)))
    twice = {i: c for i, c in total.items() if c > 1}
    assert not twice, f"{len(twice)} records processed more than once, e.g. {list(twice.items())[:3]}"


# -- (1) worker SIGKILL ----------------------------------------------------------------------------


async def test_worker_sigkill_mid_batch_loses_and_duplicates_nothing(split: Split) -> None:
    """The worker is the real one with a step before the store that blocks on the batch holding
    a marker request (tests/chain_worker.py), so the SIGKILL certainly lands inside the handler
    chain: that batch consumed, not stored, not acknowledged. The next worker must get it again.
    Rows cannot show a duplicate (the primary key), so processings are counted: every record
    goes through the chain once, the blocked batch's in the second worker (twice only what the
    killed worker had processed and not yet acknowledged: `assert_processed_after_kill`)."""
    n = 600
    marker = str(uuid.uuid4())
    split.worker_args = chain_worker_args(split.tmp, block_on=marker)
    _, worker, _ = split.start_all(
        ("server", "server", {}),
        ("chain-worker", "worker-1", {"partition_key": "id"}),
        ("gateway", "gateway", {"partition_key": "id"}),
    )

    load = asyncio.create_task(run_load(split.gw, n, ids={n // 2: marker}))
    blocking = "the worker blocking on the marker"
    await asyncio.to_thread(wait_until, lambda: blocked_batch(split.tmp) is not None, 60, 0.05, blocking)
    pid, batch = blocked_batch(split.tmp) or (0, [])
    assert pid == worker.pid and marker in batch, (pid, worker.pid, batch)
    stored_then = set(await asyncio.to_thread(split.stored_ids))
    assert not set(batch) & stored_then, "the blocked batch is stored already"
    worker.signal(signal.SIGKILL)
    worker.p.wait(5)
    worker2 = split.start("chain-worker", "worker-2", partition_key="id")

    out = await load
    assert len(out.ok) == n, (len(out.ok), len(out.refused), len(out.dropped), out.other[:3])
    await asyncio.to_thread(split.wait_count, n, 60)
    await drained(split)
    assert_exactly(split, out.ok)
    seen = processings(split.tmp)
    assert set(seen) <= {worker.pid, worker2.pid}, seen.keys()
    assert not set(batch) & set(seen.get(worker.pid, {})), "the killed worker finished its batch"
    assert set(batch) <= set(seen[worker2.pid]), "the blocked batch was not redelivered"
    assert_processed_after_kill(seen, worker.pid, set(out.ok))
    for rid in out.ok[:: n // 50]:  # and each is retrievable by its id
        status, rec = http_json("GET", f"{split.api}/api/v1/requests/{rid}")
        assert status == 200 and rec["id"] == rid and rec["status"] == 200
    print(
        f"worker SIGKILLed inside the chain on a batch of {len(batch)} ({len(stored_then)} rows then); "
        f"the next worker processed that batch again; {split.count()} rows"
    )
    split.logs_without_traceback()


# -- (2) gateway SIGTERM under load ----------------------------------------------------------------


@pytest.mark.timeout(300)  # its own bounded waits add up to more than the module's 120 s
async def test_gateway_sigterm_under_load_stores_every_answered_request(split: Split) -> None:
    # records wait up to 300 ms in the gateway's memory: SIGTERM must flush them, not drop them
    split.worker_args = chain_worker_args(split.tmp)  # counts processings: a record flushed twice shows
    *_, gateway = split.start_all(
        ("server", "server", {}),
        ("chain-worker", "worker", {}),
        ("gateway", "gateway", {"publish_linger_ms": 300, "shutdown_timeout": 10}),
    )

    stop = asyncio.Event()
    progress = [0]
    # some requests are slow upstream, so there are always some in flight when SIGTERM lands
    load = asyncio.create_task(
        run_load(split.gw, 20_000, stop=stop, progress=progress, extra_headers={"x-fake-delay-ms": "40"})
    )
    t0 = time.monotonic()
    while progress[0] < 600:
        assert time.monotonic() - t0 < 40 and not load.done(), progress
        await asyncio.sleep(0.01)
    gateway.signal(signal.SIGTERM)
    t_term = time.monotonic()
    code = await asyncio.to_thread(gateway.p.wait, 20)
    took = time.monotonic() - t_term
    assert code == 0, gateway.output()
    assert took < 10 + 15, took  # LLMTAP_SHUTDOWN_TIMEOUT, and slack for a busy machine (a hang shows)
    at_exit = progress[0]
    while progress[0] < at_exit + 64:  # keep knocking on the closed door for a moment
        await asyncio.sleep(0.01)
    stop.set()
    out = await load

    assert len(out.ok) >= 600 and len(out.refused) >= 32, (len(out.ok), len(out.refused))
    assert not out.other, out.other[:5]
    await asyncio.to_thread(split.wait_count, len(out.ok), 45)
    await drained(split)
    stored_set = set(split.stored_ids())
    assert set(out.ok) <= stored_set, f"{len(set(out.ok) - stored_set)} answered requests not stored"
    assert not stored_set & set(out.refused), "a refused request was stored"
    assert stored_set <= set(out.ok) | set(out.dropped), "stored ids nobody sent"
    # A connection that broke (a request sent on a kept-alive connection as the gateway closed
    # it): logged exactly when the gateway had forwarded it. The fake keeps the last 256
    # requests, and nothing reached it after these.
    status, seen = http_json("GET", f"{split.fake}/_fake/requests")
    assert status == 200
    upstream = {v for r in seen["requests"] for k, v in r["headers"] if k.lower() == LOAD_ID}
    assert not upstream & set(out.refused)
    assert len(out.dropped) < 200
    for rid in out.dropped:
        assert (rid in stored_set) == (rid in upstream), rid
    processed_once(split, sorted(stored_set))
    print(
        f"gateway stopped in {took:.2f}s: {len(out.ok)} answered (all stored), {len(out.refused)} refused "
        f"(none stored), {len(out.dropped)} dropped on closing connections "
        f"({len(stored_set & set(out.dropped))} had gone upstream, and were stored)"
    )
    if took > 2:
        print(gateway.output())
    split.logs_without_traceback()


# -- (3) two workers on one queue ------------------------------------------------------------------


def _owners(path: Path) -> set[str]:
    async def read() -> set[str]:
        q = SQLiteQueue(str(path), partitions=PARTITIONS)
        await q.connect("producer")
        try:
            st = await q.status()
        finally:
            await q.close()
        return {p.owner for p in st.partitions if p.owner}

    return asyncio.run(read())


async def test_two_workers_share_the_queue_and_store_each_record_once(split: Split) -> None:
    n = 1200
    split.worker_args = chain_worker_args(split.tmp)  # counts processings per worker
    _, w1, w2, _ = split.start_all(
        ("server", "server", {}),
        ("chain-worker", "worker-1", {}),
        ("chain-worker", "worker-2", {}),
        ("gateway", "gateway", {"partition_key": "id"}),  # records spread over all partitions
    )

    # both workers hold partitions (an owner is host:pid:nonce)
    pids = {str(w1.pid), str(w2.pid)}

    def both_own() -> bool:
        return {o.rsplit(":", 2)[1] for o in _owners(split.data / "queue.db")} == pids

    await asyncio.to_thread(wait_until, both_own, 20, 0.2, "both workers owning partitions")

    out = await run_load(split.gw, n)
    assert len(out.ok) == n, (len(out.ok), len(out.refused), len(out.dropped), out.other[:3])
    await asyncio.to_thread(split.wait_count, n, 45)
    await drained(split)
    assert_exactly(split, out.ok)
    processed_once(split, out.ok)  # no record handed to both workers, none redelivered
    seen = processings(split.tmp)
    assert set(seen) == {w1.pid, w2.pid} and all(seen.values()), {p: len(c) for p, c in seen.items()}
    assert w1.alive() and w2.alive()
    assert await asyncio.to_thread(both_own)  # still shared at the end
    split.logs_without_traceback()


# -- (4) corrupt messages --------------------------------------------------------------------------


def _llmtap_cli(split: Split, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmtap.cli", *args],
        env=split.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_corrupt_messages_are_dead_lettered_and_do_not_stall_the_rest(split: Split) -> None:
    split.start_all(
        ("server", "server", {}),
        ("worker", "worker", {}),
        ("gateway", "gateway", {"partition_key": "tenant"}),  # everything in one ordered partition
    )

    first = await run_load(split.gw, 6, concurrency=1)
    now = datetime.now(UTC)
    future_id = str(uuid.uuid4())
    # a well-formed record from a future version: v1's encoding with "v" changed
    current = json.loads(
        encode(
            LogRecord(
                id=future_id,
                provider="openai",
                target_url="http://127.0.0.1:1/v1/chat/completions",
                method="POST",
                path="/v1/chat/completions",
                started_at=now,
                ended_at=now,
                latency_ms=1.0,
            )
        )
    )
    assert current["v"] == 1
    future = json.dumps({**current, "v": 99}).encode()
    assert json.loads(future)["v"] == 99
    q = SQLiteQueue(str(split.data / "queue.db"), partitions=PARTITIONS)
    await q.connect("producer")
    try:
        await q.publish([Message(key="default", value=b"\x00garbage"), Message(key="default", value=future)])
    finally:
        await q.close()
    second = await run_load(split.gw, 6, concurrency=1)
    good = first.ok + second.ok
    assert len(good) == 12

    await asyncio.to_thread(split.wait_count, 12, 30)  # the ones after the bad ones too
    await drained(split, 30)
    assert_exactly(split, good)
    assert http_json("GET", f"{split.api}/api/v1/requests/{future_id}")[0] == 404

    dlq = await asyncio.to_thread(_llmtap_cli, split, "dlq", "list")
    assert dlq.returncode == 0, dlq.stderr
    lines = dlq.stdout.strip().splitlines()
    assert len(lines) == 2, dlq.stdout
    part = partition_for("default", PARTITIONS)
    assert all(f"partition={part}" in line for line in lines), lines
    reasons = " | ".join(lines)
    assert "not a JSON log record" in reasons and "unknown record version 99" in reasons, reasons
    # The letter that names a request says which: what the client got in `Llmtap-Request-Id`.
    assert sum(f"request={future_id}" in line for line in lines) == 1, lines

    status = await asyncio.to_thread(_llmtap_cli, split, "status", "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["dead_letters"] == 2 and info["lag"] == 0, info
    table = await asyncio.to_thread(_llmtap_cli, split, "status")
    assert table.returncode == 0 and "dead letters  2" in table.stdout, table.stdout + table.stderr
    split.logs_without_traceback()


# -- (5) start-up mistakes -------------------------------------------------------------------------


def _start_fails(tmp: Path, command: str, **settings: str | int) -> str:
    """Run `llmtap <command>`; it must exit non-zero with one `llmtap:` line and no traceback."""
    env = llmtap_env(tmp / "data", **{"gateway_port": free_port(), "server_port": free_port(), **settings})
    r = subprocess.run(
        [sys.executable, "-m", "llmtap.cli", command], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0, r
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmtap: "), r.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("command", "settings", "named"),
    [
        ("up", {"gateway_port": "abc"}, "LLMTAP_GATEWAY_PORT"),
        ("gateway", {"queue": "nonsense://x"}, "LLMTAP_QUEUE"),
        # (an unreachable store is an outage the worker waits out: tests/test_hardening_startup.py)
        ("worker", {"store": "postgresql://u@127.0.0.1:notaport/db"}, "LLMTAP_STORE"),
        ("server", {"bodies": "ftp://x"}, "LLMTAP_BODIES"),
    ],
)
def test_startup_mistake_is_one_line(
    tmp_path: Path, command: str, settings: dict[str, str], named: str
) -> None:
    line = _start_fails(tmp_path, command, **settings)
    assert named in line, line


@pytest.mark.parametrize("command", ["gateway", "server", "up"])
def test_port_in_use_is_one_line(tmp_path: Path, command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        key = "server_port" if command == "server" else "gateway_port"
        line = _start_fails(tmp_path, command, **{key: port})
    assert str(port) in line and "in use" in line, line


def _reached_upstream(split: Split, rid: str) -> bool:
    """The fake upstream has received the request carrying `rid` in its load-id header."""
    status, seen = http_json("GET", f"{split.fake}/_fake/requests")
    assert status == 200, seen
    return any(k.lower() == LOAD_ID and v == rid for r in seen["requests"] for k, v in r["headers"])


async def test_responses_finished_while_draining_close_their_connection(split: Split) -> None:
    """A client (or load balancer) must learn that a connection is going away from the response
    itself; otherwise it reuses it and its next POST breaks mid-send, where a refused connection
    would have been retried against another gateway safely."""
    gateway = split.start("gateway", "gateway", shutdown_timeout=90)
    async with aiohttp.ClientSession() as http:
        path, body, _ = _request(1)
        rid = str(uuid.uuid4())
        # The upstream holds the answer until the gateway says it is stopping (it prints that
        # right as it starts draining): the SIGTERM surely lands while the request is in flight.
        # (A 10 s delay stood for that; a machine slow enough could still end it first.)
        slow = {**AUTH, "x-fake-hold-first": rid, LOAD_ID: rid}
        call = asyncio.create_task(http.post(split.gw + path, json=body, headers=slow))
        await asyncio.to_thread(wait_until, partial(_reached_upstream, split, rid), 60, 0.02, "the upstream")
        gateway.signal(signal.SIGTERM)  # while the request waits on the upstream
        await asyncio.to_thread(
            wait_until, lambda: "llmtap: stopping" in gateway.output(), 60, 0.02, "the gateway draining"
        )
        assert not call.done(), "the upstream answered before the gateway began draining"
        assert http_json("POST", f"{split.fake}/_fake/release/{rid}")[1] == {"was_holding": True}
        async with await call as r:
            assert r.status == 200 and b"number" in await r.read()
            connection = r.headers.get("Connection", "")
    assert await asyncio.to_thread(gateway.p.wait, 20) == 0
    assert connection.lower() == "close", r.headers
