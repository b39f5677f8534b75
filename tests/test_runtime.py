"""Issue 9: one process, one set of backends; services start in order and stop in reverse.

`llmtap up` runs worker, server (with its ingest drain), webhook deliverer and gateway in one
process. They share one store, one body store and one handler chain (`runtime.SharedBackends`):
counted here on a real `llmtap up` as the process's file handles on the store's SQLite file,
against what one store holds, and as the backends' own debug lines. `run_services` stops what
it started in reverse order, also when a later service fails to start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from llmtap.config import Settings
from llmtap.errors import BackendUnavailable
from llmtap.queue.base import Message, open_queue
from llmtap.record import encode, encode_many
from llmtap.runtime import Service, SharedBackends, banner, notes, run_services
from llmtap.server.app import ServerService
from llmtap.store.sqlite import SQLiteStore
from llmtap.worker.worker import WorkerService
from procs import Proc, free_port, http_json, ingest_auth, llmtap_env, start_llmtap, wait_until
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(180)


def handles_on(path: Path, pid: int | str = "self") -> int:
    """How many file descriptors of process `pid` are open on `path` (one per SQLite connection)."""
    n = 0
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            n += os.readlink(fd) == str(path)
        except OSError:  # closed meanwhile
            continue
    return n


async def one_store_handles(path: Path) -> int:
    """What a single SQLite store holds once the worker and the deliverer both used it."""
    store = SQLiteStore(str(path))
    await store.connect()
    try:
        await store.webhooks().claim({}, 8, 60.0)  # the outbox's connection, as the deliverer's
        return handles_on(path)
    finally:
        await store.close()


def test_up_opens_one_store_one_body_store_one_chain(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server_port = free_port()
    env = llmtap_env(
        data, gateway_port=free_port(), server_port=server_port, log_level="debug", default_tenant="acme"
    )
    proc = start_llmtap("up", env, tmp_path / "up.log")
    try:
        wait_until(lambda: "press Ctrl-C" in proc.output() or not proc.alive(), 60, what="banner")
        assert proc.alive(), proc.output()
        # Records through both users of the chain: the worker (queue) and the ingest drain.
        queued = [make_record(i) for i in range(5)]
        posted = [make_record(i) for i in range(5, 10)]

        async def publish() -> None:
            q = open_queue(Settings(data_dir=data))
            await q.connect("producer")
            try:
                await q.publish([Message(r.id, encode(r)) for r in queued])
            finally:
                await q.close()

        asyncio.run(publish())
        base = f"http://127.0.0.1:{server_port}"
        req = urllib.request.Request(
            f"{base}/api/v1/ingest",
            data=encode_many(posted),
            headers={"content-type": "application/json", **ingest_auth(data)},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200

        def all_stored() -> bool:
            return all(http_json("GET", f"{base}/api/v1/requests/{r.id}")[0] == 200 for r in queued + posted)

        wait_until(all_stored, 60, interval=0.2, what="records stored by the worker and the ingest drain")
        # Webhook deliverer polls the outbox: by now it has used its connection too.
        held = handles_on(data / "store.db", proc.pid)
        expected = asyncio.run(one_store_handles(tmp_path / "oracle.db"))
        assert expected >= 2  # the writer and the reader at least: the count is meaningful
        assert held == expected, f"{held} handles on store.db, one store holds {expected}"
    finally:
        code = proc.stop()
    out = proc.output()
    assert code == 0, out
    assert "Traceback" not in out, out
    lines = out.splitlines()
    for what in ("store", "body store", "handler chain"):
        assert sum(f"backends: {what} ready" in line for line in lines) == 1, out
        assert sum(f"backends: {what} closed" in line for line in lines) == 1, out
    # The shared backends go last, after every service stopped; the chain before its stores.
    closed = [i for i, line in enumerate(lines) if "backends:" in line and line.endswith("closed")]
    order = [lines[i].rsplit("backends: ", 1)[1] for i in closed]
    assert order == ["handler chain closed", "body store closed", "store closed"], order
    stopping = next(i for i, line in enumerate(lines) if "llmtap: stopping" in line)
    assert stopping < closed[0] and lines[-1] == "llmtap: stopped", out


# -- run_services ----------------------------------------------------------------------------------


class Fake:
    """A service that records its start and stop; `fail` makes its start raise that error."""

    def __init__(self, name: str, events: list[str], fail: Exception | None = None) -> None:
        self.name = name
        self.events = events
        self.fail = fail
        self.stop_error: Exception | None = None

    async def start(self) -> list[str]:
        self.events.append(f"start {self.name}")
        if self.fail is not None:
            raise self.fail
        return [f"{self.name} ready"]

    async def stop(self) -> None:
        self.events.append(f"stop {self.name}")
        if self.stop_error is not None:
            raise self.stop_error


class SignalsWhenStarted(Fake):
    """The last service: once it is up, the process gets SIGTERM (as from `kill`)."""

    async def start(self) -> list[str]:
        lines = await super().start()
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
        return lines


async def test_a_service_that_fails_to_start_stops_the_ones_started_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events: list[str] = []
    services: list[Service] = [
        Fake("a", events),
        Fake("b", events),
        Fake("c", events, fail=BackendUnavailable("c's backend is down")),
        Fake("d", events),
    ]
    assert await run_services(Settings(data_dir=tmp_path), "test", services) == 2
    assert events == ["start a", "start b", "start c", "stop b", "stop a"]
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["llmtap: c's backend is down"], err


async def test_services_stop_in_reverse_start_order_and_a_failed_stop_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    a, b, c = Fake("a", events), Fake("b", events), SignalsWhenStarted("c", events)
    b.stop_error = RuntimeError("b could not flush")
    code = await asyncio.wait_for(run_services(Settings(data_dir=tmp_path), "test", [a, b, c]), 60)
    assert code == 1  # b's failure is reported ...
    assert events == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]  # ... a still stops
    assert "stopping b failed: b could not flush" in caplog.text
    out = capsys.readouterr()
    assert "a ready" in out.out and "c ready" in out.out
    # The signal handlers were the run's only: SIGTERM is the default again afterwards.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_what_start_up_made_is_kept_out_of_the_collector_while_serving(tmp_path: Path) -> None:
    """Full collections walked the whole start-up heap, stalling the event loop for up to
    ~50 ms each: it is frozen once every service started, and thawed when they stopped."""
    import gc

    events: list[str] = []
    frozen: list[int] = []

    class Counts(Fake):
        async def stop(self) -> None:
            frozen.append(gc.get_freeze_count())
            await super().stop()

    assert gc.get_freeze_count() == 0
    services: list[Service] = [Counts("a", events), SignalsWhenStarted("b", events)]
    code = await asyncio.wait_for(run_services(Settings(data_dir=tmp_path), "test", services), 60)
    assert code == 0 and events == ["start a", "start b", "stop b", "stop a"]
    assert frozen and frozen[0] > 1000  # the interpreter's and the test's own objects, at least
    assert gc.get_freeze_count() == 0


async def test_real_services_started_before_a_failing_one_are_closed(tmp_path: Path) -> None:
    """`up` with the server's port taken: the worker and the shared store, started before it,
    are closed (no handle on the store's file is left in this process)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = Settings(data_dir=tmp_path, server_port=busy.getsockname()[1])
        shared = SharedBackends(settings)
        worker = WorkerService(settings, backends=shared)
        opened: list[int] = []
        original = worker.start

        async def start_and_count() -> list[str]:
            lines = await original()
            opened.append(handles_on(tmp_path / "store.db"))
            return lines

        worker.start = start_and_count  # type: ignore[method-assign]
        server = ServerService(settings, backends=shared)
        code = await run_services(settings, "up", [shared, worker, server])
    assert code == 2
    assert opened and opened[0] >= 2  # the worker had the store open ...
    assert handles_on(tmp_path / "store.db") == 0  # ... and it is closed again
    assert handles_on(tmp_path / "queue.db") == 0  # so is the worker's queue
    assert handles_on(tmp_path / "ingest.db") == 0  # and the server's ingest queue, opened before it failed


# -- SharedBackends --------------------------------------------------------------------------------


async def test_backends_connect_each_once_for_concurrent_callers_and_retry_after_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    connects: list[str] = []
    real_connect = SQLiteStore.connect

    async def counting_connect(self: SQLiteStore) -> None:
        connects.append(str(self.path))
        await asyncio.sleep(0.05)  # let the other callers pile up behind this one
        await real_connect(self)

    monkeypatch.setattr(SQLiteStore, "connect", counting_connect)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the body store's directory should be")
    settings = Settings(data_dir=tmp_path, bodies=f"file:{blocker / 'bodies'}")
    shared = SharedBackends(settings)
    caplog.set_level(logging.DEBUG, logger="llmtap")
    try:
        # Worker, server and deliverer waiting out one outage all ask at once: one connect.
        results = await asyncio.gather(*(shared.start_chain() for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, BackendUnavailable) for r in results), results
        assert len(connects) == 1  # the store connected once, and stays connected
        blocker.unlink()  # the outage ends
        chains = await asyncio.gather(*(shared.start_chain() for _ in range(3)))
        assert chains[0] is chains[1] is chains[2] is shared.chain
        assert len(connects) == 1
        assert handles_on(tmp_path / "store.db") >= 2
    finally:
        await shared.stop()
    assert handles_on(tmp_path / "store.db") == 0
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backends:")]
    assert ready == [
        f"backends: store ready (sqlite {tmp_path / 'store.db'})",
        f"backends: body store ready (files in {blocker / 'bodies'})",
        "backends: handler chain ready",
        "backends: handler chain closed",
        "backends: body store closed",
        "backends: store closed",
    ], ready


async def test_backends_never_connect_or_close_what_they_were_given(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "given.db"))
    await store.connect()
    try:
        shared = SharedBackends(Settings(data_dir=tmp_path), store=store)
        assert await shared.connect_store() is store
        await shared.start_chain()  # connects its own body store, starts its own chain
        await shared.stop()
        assert await store.write_batch([make_record(1)]) == 1  # still open: the caller's
        assert not (tmp_path / "store.db").exists()  # and no store of its own was made
    finally:
        await store.close()


def test_a_wrong_setting_in_a_shared_backend_still_stops_up_with_one_sentence(tmp_path: Path) -> None:
    """The chain is built when a service first needs it: its `ConfigError` still stops start-up."""
    env = llmtap_env(tmp_path, gateway_port=free_port(), server_port=free_port())
    env["LLMTAP_WEBHOOK_URL"] = "https://example.com/hook"  # without LLMTAP_WEBHOOK_SECRET
    r = subprocess.run(
        [sys.executable, "-m", "llmtap.cli", "up"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "llmtap: LLMTAP_WEBHOOK_URL needs LLMTAP_WEBHOOK_SECRET (a whsec_... signing secret)"
    ], r.stderr


def test_scaled_out_parts_with_file_bodies_are_told_to_share_the_directory(tmp_path: Path) -> None:
    """An outside check ran gateway, worker and server with data dirs of their own and the
    default file bodies: every body read `null` in the API, and nothing said why."""
    scaled = Settings(data_dir=tmp_path, queue="redis://127.0.0.1:6379/0", store="postgresql://db/x")
    for part in ("gateway", "worker", "server"):
        (note,) = notes(scaled, part)
        assert str(tmp_path / "bodies") in note and "LLMTAP_BODIES=s3://" in note
        assert f"  note: {note}" in banner(scaled, part, [])
    assert notes(scaled, "up") == []  # one process: it reads what it wrote
    assert notes(Settings(data_dir=tmp_path), "worker") == []  # embedded queue: one host
    assert notes(Settings(data_dir=tmp_path, queue="redis://h:1/0", bodies="s3://b/p"), "worker") == []


def test_the_banner_says_what_the_settings_leave_to_the_operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway banner listed a store it never uses; none said multi-tenant or OpenTelemetry, and
    `LLMTAP_HOST=0.0.0.0` printed a URL whose dashboard answered 421 from another machine."""
    plain = Settings(data_dir=tmp_path, store="postgresql://db/x")
    assert "store=" not in banner(plain, "gateway", []) and "store=postgresql" in banner(plain, "worker", [])
    mt = Settings(data_dir=tmp_path, store="postgresql://db/x", multi_tenant=True)
    text = banner(mt, "gateway", [])
    assert "store=postgresql" in text and "tenants: multi-tenant" in text  # keys live in the store
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert "spans: every stored record to http://collector:4318" in banner(plain, "up", [])
    assert "spans:" not in banner(plain, "gateway", [])
    everywhere = Settings(data_dir=tmp_path, host="0.0.0.0")
    assert "LLMTAP_ALLOWED_HOSTS" in banner(everywhere, "up", []) and not notes(everywhere, "gateway")


def test_a_gateway_raises_its_open_file_limit_and_says_when_it_stays_low(tmp_path: Path) -> None:
    """At 256 open files, 300 clients left no descriptor for any upstream connection: every
    request failed with 502 'Too many open files', and nothing at start-up said why."""
    script = (
        "import resource; from llmtap.runtime import raise_fd_limit;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]));"
        "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    now, soft = map(int, out.stdout.split())
    assert now == soft and soft > 256  # raised to the hard limit
    from llmtap.runtime import FEW_FDS, fd_note

    assert fd_note(FEW_FDS) is None
    note = fd_note(256)
    assert note is not None and "only 256 files" in note and "ulimit -n" in note
    script = (
        "import resource, sys; from llmtap.config import Settings;"
        "from llmtap.runtime import banner, raise_fd_limit;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); raise_fd_limit();"
        "print(banner(Settings(data_dir=sys.argv[1]), sys.argv[2], []))"
    )
    for part, said in (("up", True), ("gateway", True), ("worker", False)):
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path), part], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert ("note: this process may open only 256 files" in out.stdout) == said, out.stdout


@pytest.mark.skipif(not os.environ.get("LLMTAP_TEST_POSTGRES_URL"), reason="needs PostgreSQL")
async def test_a_worker_starting_behind_a_locked_table_says_it_waits_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """Found by the retry check: a worker started while `requests` was locked (a long ALTER, a
    VACUUM FULL) printed nothing and ignored SIGTERM and SIGINT: only SIGKILL ended it."""
    import asyncpg

    from llmtap.store.postgres import PostgresStore
    from store_helpers import pg_database

    async with pg_database() as url:
        store = PostgresStore(url)
        await store.connect()  # the schema, as a running deployment has it
        await store.close()
        locker = await asyncpg.connect(url)
        try:
            await locker.execute("BEGIN; LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")
            env = llmtap_env(tmp_path / "data", store=url)
            first = start_llmtap("worker", env, tmp_path / "worker1.log")
            try:  # the lock's timeout: it says what it waits for, and keeps trying
                wait_until(lambda: "lock timeout" in first.output() or not first.alive(), 60, what="a word")
                assert first.alive() and "started without its backends" in first.output(), first.output()
            finally:
                assert first.stop(signal.SIGTERM, timeout=30) == 0, first.output()
            second = start_llmtap("worker", env, tmp_path / "worker2.log")
            deadline = asyncio.get_running_loop().time() + 60
            watcher = await asyncpg.connect(url)  # not the locker's: its transaction sees one snapshot
            try:
                while not await watcher.fetchval(  # inside its start-up, waiting on the lock
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                ):
                    assert asyncio.get_running_loop().time() < deadline and second.alive(), second.output()
                    await asyncio.sleep(0.1)
                t0 = asyncio.get_running_loop().time()
                assert second.stop(signal.SIGTERM, timeout=30) == 0, second.output()
                # Before the lock's 10 s timeout would have ended the start-up anyway.
                assert asyncio.get_running_loop().time() - t0 < 8, second.output()
                assert "stopped while starting" in second.output(), second.output()
            finally:
                await watcher.close()
                second.kill()  # a no-op once it stopped
        finally:
            await locker.close()


def test_json_log_lines_parse_and_carry_no_credential() -> None:
    """`LLMTAP_LOG_FORMAT=json`: one object a line for log collectors, through the same
    credential filter as the text lines (message and traceback)."""
    import json
    import subprocess
    import sys

    key = "sk-proj-" + "a1B2c3D4" * 4
    code = f"""
import logging
from llmtap.runtime import setup_logging
setup_logging("info", "json")
log = logging.getLogger("llmtap.test")
log.warning("upstream said: Incorrect API key provided: Bearer {key}")
try:
    raise ValueError("api_key={key}")
except ValueError:
    log.exception("a batch failed")
log.debug("not shown at info")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert key not in out.stderr and "a1B2c3D4" not in out.stderr, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [(r["level"], r["logger"]) for r in lines] == [
        ("warning", "llmtap.test"),
        ("error", "llmtap.test"),
    ]
    assert lines[0]["message"].startswith("upstream said: Incorrect API key provided: Bearer ")
    assert "ValueError: api_key=" in lines[1]["exception"] and lines[1]["message"] == "a batch failed"
    assert lines[0]["time"].endswith("+00:00") and isinstance(lines[0]["pid"], int)


async def test_requests_left_in_the_data_dirs_store_are_named_when_another_store_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Switched to another store (PostgreSQL, another file), the data directory's store.db still
    holds the requests stored before, which llmtap does not move: start-up says so, once."""
    left = SQLiteStore(tmp_path / "store.db")
    await left.connect()
    await left.close()
    caplog.set_level(logging.WARNING, logger="llmtap")

    async def warnings(store: str) -> list[str]:
        caplog.clear()
        shared = SharedBackends(Settings(data_dir=tmp_path, store=store))
        try:
            await asyncio.gather(shared.connect_store(), shared.connect_store())
            await shared.connect_store()
        finally:
            await shared.stop()
        return [r.getMessage() for r in caplog.records if "holds requests" in r.getMessage()]

    elsewhere = f"sqlite:{tmp_path / 'elsewhere.db'}"
    assert await warnings(elsewhere) == []  # store.db is there, but empty
    await left.connect()
    assert await left.write_batch([make_record(1)]) == 1
    await left.close()
    said = await warnings(elsewhere)
    assert len(said) == 1 and str(tmp_path / "store.db") in said[0] and "elsewhere.db" in said[0], said
    assert await warnings("sqlite") == []  # the data directory's own store: nothing left behind
    # ... however it is named (an outside check saw the warning for the store in use).
    assert await warnings(f"sqlite:{tmp_path / 'store.db'}") == []
    (tmp_path / "alias.db").symlink_to(tmp_path / "store.db")
    assert await warnings(f"sqlite:{tmp_path / 'alias.db'}") == []
    monkeypatch.chdir(tmp_path.parent)
    assert await warnings(f"sqlite:./{tmp_path.name}/store.db") == []
    assert await warnings(f"sqlite:{tmp_path.name}//store.db") == []


def test_livez_answers_on_every_port_while_healthz_says_the_store_is_away(tmp_path: Path) -> None:
    """The deploy audit: with one probe, a liveness check on `/healthz` restarted every worker
    and server through a database outage. `/livez` is 200 while the process answers."""
    pytest.importorskip("asyncpg")
    store = f"postgresql://llmtap@127.0.0.1:{free_port()}/nowhere"  # nothing listens there
    gateway, server, worker = free_port(), free_port(), free_port()
    env = llmtap_env(tmp_path / "up", store=store, gateway_port=gateway, server_port=server)
    up = start_llmtap("up", env, tmp_path / "up.log")
    env = llmtap_env(tmp_path / "w", store=store, worker_port=worker)
    alone = start_llmtap("worker", env, tmp_path / "w.log")

    def banner_or_exit(proc: Proc) -> Callable[[], bool]:
        return lambda: not proc.alive() or "press Ctrl-C" in proc.output()

    try:
        for proc in (up, alone):
            wait_until(banner_or_exit(proc), 60, what="the banner")
            assert proc.alive(), proc.output()
        for port in (server, worker):
            status, body = http_json("GET", f"http://127.0.0.1:{port}/healthz")
            assert status == 503 and body["status"] == "waiting", (port, status, body)
        for port in (gateway, server, worker):
            assert http_json("GET", f"http://127.0.0.1:{port}/livez") == (200, {"status": "alive"}), port
    finally:
        up.stop()
        alone.stop()


def test_a_sighup_stops_even_when_stderr_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """rev18a: a hung-up terminal's stderr raised in the handler before the stop was set, so the
    SIGHUP of a closed terminal was swallowed and the process kept running."""
    from llmtap import runtime

    class Gone:
        def write(self, _: str) -> int:
            raise OSError(5, "Input/output error")

        def flush(self) -> None:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(sys, "stderr", Gone())
    stop = asyncio.Event()
    runtime._stopping(signal.SIGHUP, stop)
    assert stop.is_set()
