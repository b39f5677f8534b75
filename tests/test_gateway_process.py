"""`llmtap gateway` as a real process on the real SQLite queue and file body store: a SIGTERM
while requests are in flight loses neither a response nor a record."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from llmtap.queue.sqlite import SQLiteQueue
from llmtap.record import decode
from procs import free_port

pytestmark = pytest.mark.timeout(90)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello from a process test"}]}


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


@contextmanager
def process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that is killed at the end whatever happened."""
    with open(log, "wb") as out:
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield p
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


async def drain(path: Path, partitions: int, expect: int) -> list[bytes]:
    q = SQLiteQueue(str(path), partitions=partitions)
    await q.connect("consumer")
    out: list[bytes] = []
    try:
        for _ in range(100):
            got = await q.consume(500, timeout=0.2)
            if got:
                out += [d.value for d in got]
                await q.ack(got)
            elif len(out) >= expect:
                break
    finally:
        await q.close()
    return out


async def waiting_upstream(http: aiohttp.ClientSession, upstream: str) -> int:
    """How many slow requests have reached the fake upstream (it records them before waiting)."""
    async with http.get(f"{upstream}/_fake/requests") as r:
        data = await r.json()
    return sum(any(k.lower() == "x-fake-delay-ms" for k, _ in q["headers"]) for q in data["requests"])


async def slow_calls(
    gw: str, upstream: str, n: int, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM
) -> list[tuple[int, bytes]]:
    """5 quick requests, then `n` slow ones; signal the gateway while the slow ones wait."""
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT) as r:
                assert r.status in (200, 401)

        async def slow(i: int) -> tuple[int, bytes]:
            h = {"Authorization": "Bearer sk-x", "x-fake-delay-ms": "800"}
            body = {**CHAT, "stream": i % 2 == 0}
            async with http.post(f"{gw}/openai/v1/chat/completions", json=body, headers=h) as r:
                return r.status, await r.read()

        calls = [asyncio.create_task(slow(i)) for i in range(n)]
        deadline = time.monotonic() + 20
        while await waiting_upstream(http, upstream) < n:  # all of them wait on the upstream now
            assert time.monotonic() < deadline, "the slow requests never reached the upstream"
            await asyncio.sleep(0.02)
        proc.send_signal(sig)
        return await asyncio.gather(*calls)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_sigterm_finishes_in_flight_requests_and_publishes_them(tmp_path: Path, sig: int) -> None:
    """SIGHUP too: it killed the process at once, and the records of answers sent (deploy audit)."""
    port, up_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")}
    env.update(
        LLMTAP_DATA_DIR=str(tmp_path / "data"),
        LLMTAP_GATEWAY_PORT=str(port),
        LLMTAP_OPENAI_BASE_URL=upstream,
        LLMTAP_ANTHROPIC_BASE_URL=upstream,
        LLMTAP_PUBLISH_LINGER_MS="3000",  # finished requests still wait in memory at SIGTERM time
    )
    log = tmp_path / "gateway.log"
    fake = [sys.executable, "-m", "llmtap.cli", "fake-upstream", "--port", str(up_port)]
    gateway = [sys.executable, "-m", "llmtap.cli", "gateway"]
    with process(fake, tmp_path / "fake.log"), process(gateway, log, env) as proc:
        wait_http(f"{upstream}/_fake/health")
        wait_http(f"http://127.0.0.1:{port}/healthz")
        results = await slow_calls(f"http://127.0.0.1:{port}", upstream, 16, proc, sig)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()
    assert [status for status, _ in results] == [200] * 16
    for i, (_, body) in enumerate(results):
        assert (b"data: [DONE]" in body) if i % 2 == 0 else (b"echo: hello from a process test" in body)
    out = log.read_text()
    assert "Traceback" not in out, out
    assert ("SIGHUP: stopping as on SIGTERM" in out) == (sig == signal.SIGHUP), out

    values = await drain(tmp_path / "data" / "queue.db", 6, 21)
    records = [decode(v) for v in values]
    assert len(records) == 21 and len({r.id for r in records}) == 21
    slow_records = [r for r in records if r.latency_ms > 700]
    assert len(slow_records) == 16
    assert {r.streamed for r in slow_records} == {True, False}
    assert all(r.outcome == "completed" and r.status == 200 for r in slow_records)
