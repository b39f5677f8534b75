"""Helpers for end-to-end tests: real `llmtap` processes, the fake upstream, waiting on the API.

Every process binds 127.0.0.1 on a free port, logs to a file in the test's tmp dir (printed on
failure), and is killed at teardown whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "scripts" / "services.sh"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1, never one this test process handed out before. The port is
    not held until its process binds it, so two asked for in a row can be the same one: CI saw a
    gateway's /healthz answered 404 by the fake upstream started on "its" port."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port not handed out before")


def http_json(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def wait_until(pred: Callable[[], bool], timeout: float = 30, interval: float = 0.1, what: str = "") -> None:
    """Wait until `pred()` is true. An exception counts as "not yet" (a process still starting
    refuses connections), but at the deadline the last one is raised with its message: an
    `AssertionError` inside `pred` (a 500 where a 404 was allowed) must say what it saw, not
    become a bare timeout."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            if pred():
                return
            last = None
        except Exception as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    what = what or getattr(pred, "__name__", repr(pred))
    if isinstance(last, AssertionError):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}: {last}") from last
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else "")
    ) from last


def wait_http(url: str, timeout: float = 30) -> None:
    def ok() -> bool:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)

    wait_until(ok, timeout, what=url)


class Proc:
    """A child process with its log file; `stop()` sends a signal and waits."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log_path = log
        self._log = open(log, "ab")
        self.p = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.alive():
            os.kill(self.p.pid, sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self._log.close()
        return int(self.p.returncode)

    def kill(self) -> None:
        self.stop(signal.SIGKILL, timeout=5)

    # Defined after `stop`: in the class body this name shadows the `signal` module, whose
    # SIGTERM is `stop`'s default.
    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def llmtap_env(data_dir: Path, **settings: str | int | float) -> dict[str, str]:
    """A clean environment for an llmtap child: no inherited LLMTAP_* except what we pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_") or k.startswith("LLMTAP_TEST_")}
    env["LLMTAP_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in settings.items():
        env[f"LLMTAP_{k.upper()}"] = str(v)
    return env


def start_llmtap(command: str, env: dict[str, str], log: Path, *extra: str) -> Proc:
    return Proc([sys.executable, "-m", "llmtap.cli", command, *extra], env, log)


CHAIN_WORKER = Path(__file__).with_name("chain_worker.py")


def start_chain_worker(env: dict[str, str], log: Path, *args: str) -> Proc:
    """The real worker with the test handlers of `chain_worker.py` (blocking on a marker record,
    logging what went through the chain)."""
    return Proc([sys.executable, str(CHAIN_WORKER), *args], env, log)


def chain_worker_args(tmp: Path, block_on: str | None = None) -> tuple[str, ...]:
    """`--seen` under `tmp`, and the marker file for `block_on` there too."""
    args = ("--seen", str(tmp / "seen"))
    if block_on is not None:
        args += ("--block-on", block_on, "--marker", str(tmp / "blocked.json"))
    return args


def blocked_batch(tmp: Path) -> tuple[int, list[str]] | None:
    """(pid, record ids) of the batch a chain worker blocks on, once it does."""
    path = tmp / "blocked.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return int(data["pid"]), list(data["ids"])


def processings(tmp: Path) -> dict[int, Counter[str]]:
    """pid → how many times each record id went through the whole chain in that worker."""
    out: dict[int, Counter[str]] = {}
    for f in sorted((tmp / "seen").glob("*.seen")):
        out[int(f.stem)] = Counter(f.read_text().split())
    return out


def assert_processed_after_kill(seen: dict[int, Counter[str]], killed: int, ids: set[str]) -> None:
    """Every id went through a worker's chain; none twice in one worker; and twice in all only
    if the SIGKILLed worker processed it first, in a batch it had not acknowledged yet.

    The worker keeps `LLMTAP_WORKER_PIPELINE` batches in flight: besides the blocked one, another
    batch may have passed the chain (and the store) and wait for its acknowledgement when the
    kill lands; on a busy machine it does now and then. Redelivering it is the at-least-once
    guarantee at work (rows stay unique by the primary key), so it is bounded, not forbidden:
    at most the other in-flight batches' records.
    """
    from llmtap.config import Settings

    total = sum(seen.values(), Counter[str]())
    assert set(total) == ids, (len(total), len(ids), len(set(total) ^ ids))
    for pid, counts in seen.items():
        again = [i for i, c in counts.items() if c > 1]
        assert not again, f"worker {pid} processed {len(again)} records twice, e.g. {again[:3]}"
    defaults = Settings()
    in_flight = (defaults.worker_pipeline - 1) * defaults.worker_batch_size
    twice = {i for i, c in total.items() if c > 1}
    last = set(list(seen.get(killed, {}))[-in_flight:])  # its last processings, in order
    assert twice <= last, f"{len(twice - last)} records processed twice that were not in flight at the kill"


@contextmanager
def fake_upstream(tmp: Path) -> Iterator[str]:
    """Run the fake OpenAI/Anthropic upstream in its own process; yields its base URL."""
    port = free_port()
    proc = Proc(
        [sys.executable, "-m", "llmtap.cli", "fake-upstream", "--port", str(port)],
        dict(os.environ),
        tmp / "fake-upstream.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/_fake/health", 20)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()


class Up:
    """A running `llmtap up`: its ports, URLs and process."""

    def __init__(self, gw_port: int, api_port: int, proc: Proc) -> None:
        self.gw_port, self.api_port, self.proc = gw_port, api_port, proc
        self.gw = f"http://127.0.0.1:{gw_port}"
        self.api = f"http://127.0.0.1:{api_port}"


@contextmanager
def running_up(tmp: Path, timeout: float = 60, **settings: str | int | float) -> Iterator[Up]:
    """`llmtap up` on `tmp / "data"` (log `tmp / "up.log"`) with these settings, once both its
    ports answer; stopped at the end. A start that fails shows the process's output."""
    gw_port, api_port = free_port(), free_port()
    env = llmtap_env(tmp / "data", gateway_port=gw_port, server_port=api_port, **settings)
    proc = start_llmtap("up", env, tmp / "up.log")
    try:
        try:
            wait_http(f"http://127.0.0.1:{gw_port}/healthz", timeout)
            wait_http(f"http://127.0.0.1:{api_port}/healthz", timeout)
        except AssertionError:
            raise AssertionError(proc.output()) from None
        yield Up(gw_port, api_port, proc)
    finally:
        proc.stop()


def services(action: str, name: str) -> None:
    """Stop or start one real service (`kafka`, `redis`, `postgres`, `s3`) via scripts/services.sh."""
    subprocess.run([str(SERVICES), action, name], check=True, capture_output=True, timeout=180)


def stored_count(server_url: str, headers: dict[str, str] | None = None) -> int:
    status, body = http_json("GET", f"{server_url}/api/v1/stats", headers=headers)
    assert status == 200, body
    return int(body["overall"]["count"])


def get_record(
    server_url: str, request_id: str, timeout: float = 30, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """`GET /api/v1/requests/{id}` once the worker stored it (404 until then)."""
    found: dict[str, Any] = {}

    def stored() -> bool:
        status, body = http_json("GET", f"{server_url}/api/v1/requests/{request_id}", headers=headers)
        if status == 200:
            found.update(body)
            return True
        assert status == 404, (status, body)
        return False

    wait_until(stored, timeout, interval=0.05, what=f"record {request_id}")
    return found


def list_records(server_url: str, **filters: str) -> list[dict[str, Any]]:
    """Every record matching `filters` (`GET /api/v1/requests` followed page by page)."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {**filters, "limit": "1000", **({"cursor": cursor} if cursor else {})}
        url = f"{server_url}/api/v1/requests?{urllib.parse.urlencode(query)}"
        status, body = http_json("GET", url)
        assert status == 200, body
        items += body["items"]
        cursor = body["next_cursor"]
        if not cursor:
            return items


def ingest_auth(data_dir: Path) -> dict[str, str]:
    """The `Authorization` of a server's ingest: the token it keeps in its data dir (made at start)."""
    return {"Authorization": "Bearer " + (data_dir / "ingest.token").read_text().strip()}
