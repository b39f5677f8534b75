"""Issue 7 item 10: `llmtap worker` and `llmtap server` start while the queue or the store is
down, say so in one banner line, and begin work once it is back; a wrong URL still stops
start-up with one sentence.

The outage is real: Redis and PostgreSQL are stopped with `scripts/services.sh stop` before the
processes start, and started again while they run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from llmtap.config import Settings
from llmtap.queue.base import Message, open_queue
from llmtap.record import encode
from procs import Proc, free_port, http_json, llmtap_env, services, start_llmtap, wait_until
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(600)

REDIS = os.environ.get("LLMTAP_TEST_REDIS_URL")
PG = os.environ.get("LLMTAP_TEST_POSTGRES_URL")


def _banner_or_exit(proc: Proc) -> Callable[[], bool]:
    return lambda: "press Ctrl-C" in proc.output() or not proc.alive()


@pytest.mark.skipif(not (REDIS and PG), reason="needs Redis and PostgreSQL (scripts/services.sh up)")
def test_worker_and_server_start_during_an_outage_and_work_once_it_ends(tmp_path: Path) -> None:
    assert REDIS and PG
    queue = f"{REDIS}?prefix=startup{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = llmtap_env(tmp_path, queue=queue, store=PG, server_port=port, default_tenant="acme")
    services("stop", "redis")
    services("stop", "postgres")
    worker = server = None
    try:
        worker = start_llmtap("worker", env, tmp_path / "worker.log")
        server = start_llmtap("server", env, tmp_path / "server.log")
        for proc, name in ((worker, "worker"), (server, "server")):
            wait_until(_banner_or_exit(proc), 60, what=f"{name} banner")
            out = proc.output()
            assert proc.alive(), out
            waiting = [line for line in out.splitlines() if "WAITING" in line]
            assert len(waiting) == 1, out  # the outage in one banner line, with its reason
            assert "cannot" in waiting[0] or "unreachable" in waiting[0].lower(), waiting
        # The API is up and says the store is not there yet.
        status, body = http_json("GET", f"http://127.0.0.1:{port}/api/v1/requests")
        assert status == 503, body
        time.sleep(3)  # a few retry rounds of both, for the log-volume check below
        services("start", "postgres")  # the store first: the worker now waits on the queue alone
        wait_until(lambda: "still waiting" in worker.output() and "Redis" in worker.output(), 120)
        services("start", "redis")
        records = [make_record(i) for i in range(30)]

        async def publish() -> None:
            q = open_queue(Settings(queue=queue, data_dir=tmp_path))
            await q.connect("producer")
            try:
                await q.publish([Message(r.id, encode(r)) for r in records])
            finally:
                await q.close()

        asyncio.run(publish())

        def all_stored() -> bool:
            for r in records:
                status, _ = http_json("GET", f"http://127.0.0.1:{port}/api/v1/requests/{r.id}")
                if status != 200:
                    return False
            return True

        wait_until(all_stored, 120, interval=0.5, what="records stored after the outage ended")
        assert worker.alive() and server.alive()
        for proc in (worker, server):
            out = proc.output()
            assert "backends are back" in out, out
            assert "Traceback" not in out, out
            # one line per change of the outage, not one per retry
            assert out.count("still waiting") <= 2, out
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.stop()
        services("start", "redis")
        services("start", "postgres")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("LLMTAP_QUEUE", "redis://:hunter2@[::1/0"),
        ("LLMTAP_QUEUE", "nats://broker:4222"),
        ("LLMTAP_STORE", "postgresql://u:hunter2@db:notaport/x"),
    ],
)
@pytest.mark.parametrize("command", ["worker", "server"])
def test_a_wrong_backend_url_still_stops_start_up_with_one_sentence(
    tmp_path: Path, command: str, setting: str, value: str
) -> None:
    env = llmtap_env(tmp_path)
    env[setting] = value
    r = subprocess.run(
        [sys.executable, "-m", "llmtap.cli", command], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llmtap: invalid setting {setting}"), r.stderr
    assert "hunter2" not in r.stderr  # the password of a mistyped URL is not echoed
