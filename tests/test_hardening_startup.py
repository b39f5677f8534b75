"""Issue 7 item 10: `llmtap worker` and `llmtap server` start while the queue or the store is
down, say so in one banner line, and begin work once it is back; a wrong URL still stops
start-up with one sentence.

The outage is real: Redis and PostgreSQL are stopped with `scripts/services.sh stop` before the
processes start, and started again while they run.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from llmtap.config import Settings
from llmtap.queue.base import Message, open_queue
from llmtap.record import encode, encode_many
from procs import Proc, free_port, http_json, ingest_auth, llmtap_env, services, start_llmtap, wait_until
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
            if name == "server":
                assert "the API answers 503 until it is back" in waiting[0], waiting
        # The API is up and says the store is not there yet; so does /healthz (it said ok).
        status, body = http_json("GET", f"http://127.0.0.1:{port}/api/v1/requests")
        assert status == 503, body
        status, body = http_json("GET", f"http://127.0.0.1:{port}/healthz")
        assert status == 503 and body["status"] == "waiting" and "PostgreSQL" in body["reason"], body
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
        assert http_json("GET", f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})
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


@pytest.mark.skipif(not PG, reason="needs PostgreSQL (scripts/services.sh up)")
def test_server_healthz_says_when_its_store_goes_away_and_comes_back(tmp_path: Path) -> None:
    """The review of /healthz: it said "waiting" only while the store had never connected; a
    store that went away later left it at ok while the API answered 503."""
    assert PG
    port = free_port()
    server = start_llmtap("server", llmtap_env(tmp_path, store=PG, server_port=port), tmp_path / "server.log")
    health = f"http://127.0.0.1:{port}/healthz"
    try:
        wait_until(lambda: http_json("GET", health)[0] == 200 if server.alive() else True, 60, what="ready")
        assert server.alive(), server.output()
        services("stop", "postgres")
        try:
            wait_until(lambda: http_json("GET", health)[0] == 503, 60, what="503 while the store is away")
            status, body = http_json("GET", health)
            assert status == 503 and body["status"] == "waiting" and body["reason"].startswith("store: "), (
                body
            )
        finally:
            services("start", "postgres")
        wait_until(lambda: http_json("GET", health)[0] == 200, 120, interval=0.5, what="ok once it is back")
    finally:
        server.stop()


def test_server_with_its_body_store_down_says_it_serves_records(tmp_path: Path) -> None:
    """The store is there, the body store is not: the banner said "the API answers 503" while
    the API listed records (each body says it is unavailable, and why)."""
    pytest.importorskip("aiobotocore")
    port = free_port()
    env = llmtap_env(
        tmp_path, server_port=port, bodies="s3://bucket/x", s3_endpoint=f"http://127.0.0.1:{free_port()}",
        s3_access_key_id="a", s3_secret_access_key="b",
    )  # fmt: skip
    server = start_llmtap("server", env, tmp_path / "server.log")
    try:
        wait_until(_banner_or_exit(server), 60, what="server banner")
        out = server.output()
        waiting = [line for line in out.splitlines() if "WAITING" in line]
        assert len(waiting) == 1 and "cannot reach S3" in waiting[0], out
        assert "records are served; their bodies read as unavailable until it is back" in waiting[0]
        status, body = http_json("GET", f"http://127.0.0.1:{port}/api/v1/requests")
        assert status == 200 and body == {"items": [], "next_cursor": None}, body
    finally:
        server.stop()


@pytest.mark.skipif(not PG, reason="needs PostgreSQL (scripts/services.sh up)")
def test_up_started_during_a_store_outage_connects_the_shared_store_once_it_is_back(tmp_path: Path) -> None:
    """Issue 9: in `llmtap up` worker, server, ingest drain and deliverer all wait on one shared
    store; once it is back it is connected once, and the records taken meanwhile are stored."""
    assert PG
    server_port = free_port()
    env = llmtap_env(
        tmp_path, store=PG, server_port=server_port, gateway_port=free_port(),
        default_tenant="acme", log_level="debug",
    )  # fmt: skip
    services("stop", "postgres")
    up = None
    try:
        up = start_llmtap("up", env, tmp_path / "up.log")
        wait_until(_banner_or_exit(up), 60, what="up banner")
        out = up.output()
        assert up.alive(), out
        assert [line for line in out.splitlines() if "WAITING" in line and "worker" in line], out
        assert [line for line in out.splitlines() if "WAITING" in line and "server" in line], out
        assert "gateway   http://" in out, out  # the gateway serves (it needs no store)
        records = [make_record(i) for i in range(20)]

        async def publish() -> None:  # into the embedded queue the worker consumes
            q = open_queue(Settings(data_dir=tmp_path))
            await q.connect("producer")
            try:
                await q.publish([Message(r.id, encode(r)) for r in records[:10]])
            finally:
                await q.close()

        asyncio.run(publish())
        base = f"http://127.0.0.1:{server_port}"
        # Taken while the store is down: the ingest queue holds it.
        headers = {"content-type": "application/json", **ingest_auth(tmp_path)}
        req = urllib.request.Request(f"{base}/api/v1/ingest", data=encode_many(records[10:]), headers=headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        time.sleep(2)  # a few retry rounds of every waiting service
        services("start", "postgres")

        def all_stored() -> bool:
            return all(http_json("GET", f"{base}/api/v1/requests/{r.id}")[0] == 200 for r in records)

        wait_until(all_stored, 120, interval=0.5, what="records stored after the outage ended")
        out = up.output()
        assert "Traceback" not in out, out
        assert out.count("backends: store ready") == 1, out
        assert out.count("backends: handler chain ready") == 1, out
    finally:
        if up is not None:
            assert up.stop() == 0, up.output()
        services("start", "postgres")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("LLMTAP_QUEUE", "redis://:hunter2@[::1/0"),
        ("LLMTAP_QUEUE", "nats://broker:4222"),
        ("LLMTAP_STORE", "postgresql://u:hunter2@db:notaport/x"),
        ("LLMTAP_DATA_DIR", "/proc/llmtap-nowhere"),  # no directory can be made there
        ("LLMTAP_DATA_DIR", "/dev/null/llmtap"),  # a file is in the way
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


def _with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


S3 = os.environ.get("LLMTAP_TEST_S3_ENDPOINT")


def _s3(bucket: str, secret: str | None = None) -> dict[str, str]:
    return {
        "LLMTAP_BODIES": f"s3://{bucket}/startup",
        "LLMTAP_S3_ENDPOINT": S3 or "",
        "AWS_ACCESS_KEY_ID": os.environ.get("LLMTAP_TEST_S3_ACCESS_KEY", ""),
        "AWS_SECRET_ACCESS_KEY": secret or os.environ.get("LLMTAP_TEST_S3_SECRET_KEY", ""),
        "AWS_REGION": os.environ.get("LLMTAP_TEST_S3_REGION", "us-east-1"),
    }


@pytest.mark.skipif(
    not (REDIS and PG and S3), reason="needs Redis, PostgreSQL and S3 (scripts/services.sh up)"
)
@pytest.mark.parametrize(
    ("setting", "wrong", "said"),
    [
        (
            "LLMTAP_STORE",
            lambda: {"LLMTAP_STORE": _with_path(PG or "", "/llmtap_no_such_db")},
            'database "llmtap_no_such_db" does not exist',
        ),
        (
            "LLMTAP_STORE",
            lambda: {"LLMTAP_STORE": (PG or "").replace("//postgres@", "//llmtap_no_such_role:hunter2@")},
            "role",
        ),
        (
            "LLMTAP_QUEUE",
            lambda: {"LLMTAP_QUEUE": _with_path(REDIS or "", "/9999")},
            "DB index is out of range",
        ),
        ("LLMTAP_BODIES", lambda: _s3("llmtap-no-such-bucket"), "no such bucket"),
        (
            "LLMTAP_BODIES",
            lambda: _s3(os.environ.get("LLMTAP_TEST_S3_BUCKET", ""), secret="hunter2"),
            "access denied",
        ),
    ],
)
def test_a_backend_that_answers_the_url_is_wrong_stops_start_up_with_one_sentence(
    tmp_path: Path, setting: str, wrong: Callable[[], dict[str, str]], said: str
) -> None:
    """The server is up and says the database, role, Redis database or bucket is not there (or
    the key is wrong): no outage to wait out (a worker would say WAITING for ever), but a
    setting to fix. Checked for every command that opens that backend."""
    env = llmtap_env(tmp_path) | wrong()
    for command in OPENS[setting]:
        argv = [sys.executable, "-m", "llmtap.cli", command]
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (command, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, (command, r.stderr)
        assert lines[0].startswith(f"llmtap: invalid setting {setting}"), (command, r.stderr)
        assert said in lines[0] and "hunter2" not in r.stderr, command


#: The commands that open each backend at start-up (the server keeps its own ingest queue).
OPENS = {
    "LLMTAP_STORE": ("worker", "server"),
    "LLMTAP_QUEUE": ("worker", "gateway"),
    "LLMTAP_BODIES": ("worker", "server", "gateway"),
}


def test_a_host_the_dns_does_not_know_is_a_wrong_setting_and_a_slow_resolver_an_outage() -> None:
    import socket

    from llmtap.errors import unknown_host

    def chained(errno: int) -> Exception:
        try:
            try:
                raise socket.gaierror(errno, "resolver")
            except socket.gaierror as e:
                raise OSError("Error connecting to db.internl:5432") from e
        except OSError as outer:
            return outer

    assert unknown_host(chained(socket.EAI_NONAME))
    assert not unknown_host(chained(socket.EAI_AGAIN))  # "temporary failure": wait for it
    assert not unknown_host(ConnectionRefusedError())


@pytest.mark.skipif(not S3, reason="needs S3 (scripts/services.sh up)")
async def test_a_gateway_starts_while_the_body_store_is_down_and_uses_it_once_back(tmp_path: Path) -> None:
    """`llmtap gateway` exited when S3 refused connections at start, so a gateway restarted or
    added during an S3 outage proxied nothing. The body store only takes bodies above the
    inline limit: the gateway now starts, spools those records, and uses S3 once it answers."""
    from llmtap.queue.sqlite import SQLiteQueue
    from llmtap.record import decode
    from procs import fake_upstream
    from tcp_proxy import TcpProxy

    s3 = urlsplit(S3 or "")
    proxy = TcpProxy(s3.port or 80)
    proxy.refuse = True  # S3 "down": connections reset at once
    await proxy.start()
    gport = free_port()
    bucket = os.environ.get("LLMTAP_TEST_S3_BUCKET", "llmtap-test")
    env = llmtap_env(tmp_path / "data", gateway_port=gport, inline_body_bytes=1024) | _s3(bucket)
    env["LLMTAP_BODIES"] = f"s3://{bucket}/gw-later-{uuid.uuid4().hex[:8]}"
    env["LLMTAP_S3_ENDPOINT"] = f"http://127.0.0.1:{proxy.port}"
    big = os.urandom(4000).hex()  # 8 KB that zstd cannot bring under the 1 KiB inline limit

    def chat(n: int) -> int:
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{n} {big}"}]})
        req = urllib.request.Request(
            f"http://127.0.0.1:{gport}/openai/v1/chat/completions",
            data=body.encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)

    with fake_upstream(tmp_path) as fake:
        env["LLMTAP_OPENAI_BASE_URL"] = fake
        gw = start_llmtap("gateway", env, tmp_path / "gateway.log")
        try:
            await asyncio.to_thread(wait_until, _banner_or_exit(gw), 60)
            assert gw.alive(), gw.output()
            assert "FALLBACK  body store unreachable at start" in gw.output(), gw.output()
            assert await asyncio.to_thread(chat, 1) == 200  # proxied while S3 is down
            proxy.refuse = False  # S3 back, same address
            await asyncio.to_thread(
                wait_until, lambda: "reachable: spooled bodies go there" in gw.output(), 90
            )
            assert await asyncio.to_thread(chat, 2) == 200
            q = SQLiteQueue(str(tmp_path / "data" / "queue.db"), partitions=Settings().partitions)
            await q.connect("consumer")
            got: list[Any] = []
            try:
                deadline = time.monotonic() + 90  # the spooled one is replayed within seconds
                while len(got) < 2 and time.monotonic() < deadline:
                    ds = await q.consume(10, timeout=1.0)
                    got += [decode(d.value) for d in ds]
                    if ds:
                        await q.ack(ds)
            finally:
                await q.close()
            assert len(got) == 2, gw.output()
            for r in got:  # both with their request body in S3, referenced, not inline
                assert r.request_body is not None and r.request_body.ref and r.request_body.data is None, r
            assert sorted(r.route for r in got) == ["queue", "spool"], [r.route for r in got]
        finally:
            assert gw.stop() == 0, gw.output()
            await proxy.stop()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("LLMTAP_OPENAI_BASE_URL", "http://127.0.0.1:{port}/openai"),
        ("LLMTAP_ANTHROPIC_BASE_URL", "http://localhost:{port}"),
        ("LLMTAP_UPSTREAMS", "groq=http://127.0.0.1:{port}/openai"),
    ],
)
@pytest.mark.parametrize("command", ["gateway", "up"])
def test_an_upstream_that_is_the_gateway_itself_stops_start_up(
    tmp_path: Path, command: str, setting: str, value: str
) -> None:
    """An outside check pointed LLMTAP_OPENAI_BASE_URL at the gateway's own /openai: one curl
    call became 1,467 nested requests and as many error records in 10 s."""
    port = free_port()
    env = llmtap_env(tmp_path / "data", gateway_port=port, server_port=free_port())
    env[setting] = value.format(port=port)
    r = subprocess.run(
        [sys.executable, "-m", "llmtap.cli", command], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llmtap: {setting} ("), r.stderr
    assert f"is this gateway itself (port {port})" in lines[0]
    # Another port on this host is another server (a local vLLM, the fake upstream): fine.
    from llmtap.gateway.app import self_loop
    from llmtap.providers import routes

    other = Settings(gateway_port=port, openai_base_url=f"http://127.0.0.1:{port + 1}")
    assert self_loop(other, routes(other)) is None


@pytest.mark.parametrize("command", ["up", "worker", "gateway", "server"])
def test_a_data_dir_that_cannot_be_written_stops_start_up_with_one_sentence(
    tmp_path: Path, command: str
) -> None:
    """A read-only data dir logged "retrying until they are back", then `unable to open database
    file` (an outside check). /sys takes no files, even from root; a read-only mount is alike."""
    env = llmtap_env(Path("/sys"), gateway_port=free_port(), server_port=free_port())
    r = subprocess.run(
        [sys.executable, "-m", "llmtap.cli", command], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "llmtap: invalid setting LLMTAP_DATA_DIR: cannot write in '/sys'"
    )
