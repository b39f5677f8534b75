"""Dashboard benchmark: time until the requests view, the 30-day overview and the sessions list
are rendered in a real browser (Debian's chromium), over a store holding N requests.

    .venv/bin/python bench/dashboard_bench.py [--rows 1000000] [--loads 7] [--db PATH | --pg URL]

Rows are written through the store's own `write_batch` (SQLite) or COPY (PostgreSQL, reusing
`store_bench.bulk_load`), spread over the last 30 days, without bodies (list views never read
them). Each load opens a fresh page; an init script notes with the page's own clock
(`performance.now()`, from navigation start, at the first DOM change where it holds) when each
milestone is in the DOM: the table's first row; for the overview the tiles and all five charts,
then the top users (asked after the charts); the sessions and users tables' first rows.
Each load's API calls and their durations (Resource Timing) are printed with it. p50 and p95
of the loads are printed; targets from issue 8: requests < 500 ms, overview < 1 s. `--db` keeps
(and reuses) the SQLite file between runs. The load average is printed before and after: on a
shared machine, read the figures with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from playwright.async_api import TimeoutError as PlaywrightTimeout
from playwright.async_api import async_playwright

from llmtap.record import LogRecord, Usage
from llmtap.store.sqlite import SQLiteStore

MODELS = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-20250514", "o4-mini", "claude-3-5-haiku-20241022")


def records(start: int, n: int, now: datetime, rng: random.Random) -> list[LogRecord]:
    out = []
    for _ in range(n):
        at = now - timedelta(seconds=rng.uniform(1, 30 * 86400))
        latency = rng.lognormvariate(6.6, 0.5)
        out.append(
            LogRecord(
                id=str(uuid.UUID(int=rng.getrandbits(128))),
                user_id=f"user-{rng.randrange(5000)}",
                session_id=f"session-{rng.randrange(50_000)}" if rng.random() < 0.5 else None,
                properties={"feature": rng.choice(("search", "chat", "review", "checkout"))},
                provider="openai",
                target_url="https://api.openai.com/v1/chat/completions",
                method="POST",
                path="/v1/chat/completions",
                model=MODELS[min(int(rng.expovariate(0.6)), len(MODELS) - 1)],
                streamed=rng.random() < 0.4,
                started_at=at,
                ended_at=at + timedelta(milliseconds=latency),
                latency_ms=latency,
                time_to_first_token_ms=latency / 3,
                status=200 if rng.random() < 0.97 else 500,
                usage=Usage(source="provider", prompt_tokens=rng.randrange(2000), completion_tokens=300),
                cost_nanos=rng.randrange(10**7) if rng.random() < 0.95 else None,
                price_version="bench",
            )
        )
    return out


async def load_sqlite(path: Path, rows: int) -> float:
    store = SQLiteStore(path)
    await store.connect()
    t0 = time.perf_counter()
    rng = random.Random(42)
    now = datetime.now(UTC)
    try:
        for start in range(0, rows, 20_000):
            await store.write_batch(records(start, min(20_000, rows - start), now, rng))
            print(
                f"  loaded {min(rows, start + 20_000):>9} rows ({time.perf_counter() - t0:6.1f} s)",
                flush=True,
            )
    finally:
        await store.close()
    return time.perf_counter() - t0


def pcts(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return {"p50": round(statistics.median(values)), "p95": round(p95), "min": round(values[0])}


#: view -> (URL, [(milestone, JS condition that is true once the milestone is in the DOM)]).
VIEWS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "requests": (
        "/#/requests?range=30d",
        [("requests view (50 newest of 30 days)", "document.querySelector('#requests-table tbody tr')")],
    ),
    "overview": (
        "/#/overview?range=30d",
        [
            (
                "overview (30 days): tiles + 5 charts",
                "document.querySelectorAll('.chart canvas').length === 5",
            ),
            # top models and top users in (the user day rollups answer 30 whole days)
            (
                "overview (30 days): + top users",
                "document.querySelectorAll('.tops .topbox table').length >= 2",
            ),
        ],
    ),
    "sessions": (
        "/#/sessions",
        [("sessions (7 days, first page)", "document.querySelector('#sessions-table tbody tr')")],
    ),
    "users": (
        "/#/users",
        [("users (500 most recently active)", "document.querySelector('#users-table tbody tr')")],
    ),
}


#: The page's API calls as [path + group_by, start ms, duration ms] (Resource Timing).
CALLS_JS = """performance.getEntriesByType('resource').filter(e => e.name.includes('/api/')).map(e => {
  const u = new URL(e.name);
  const g = u.searchParams.get('group_by');
  return [u.pathname.replace('/api/v1/', '') + (g ? ' group_by=' + g : ''), Math.round(e.startTime),
          Math.round(e.duration)];
})"""


def marks_script(milestones: list[tuple[str, str]]) -> str:
    """An init script noting, with the page's own clock, when each milestone's condition first
    holds (checked at every DOM change). Reading `performance.now()` from Python after a wait
    would add the CDP round trips, hundreds of ms on a busy machine, to every figure."""
    conds = ", ".join(f"[{json.dumps(name)}, () => !!({cond})]" for name, cond in milestones)
    return f"""
window.__marks = {{}};
const conds = [{conds}];
const check = () => {{
  for (const [name, cond] of conds) {{
    if (!(name in window.__marks) && cond()) window.__marks[name] = performance.now();
  }}
}};
new MutationObserver(check).observe(document, {{ childList: true, subtree: true }});
"""


async def measure(base: str, loads: int, timeout: float, views: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        for view in views:
            url, milestones = VIEWS[view]
            ctx = await browser.new_context(viewport={"width": 1440, "height": 900})
            await ctx.add_init_script(marks_script(milestones))
            times: dict[str, list[float]] = {name: [] for name, _ in milestones}
            for i in range(loads + 1):  # the first load warms the caches and is not counted
                page = await ctx.new_page()
                await page.goto(base + url, wait_until="commit")
                try:
                    await page.wait_for_function(
                        "n => Object.keys(window.__marks || {}).length === n",
                        arg=len(milestones),
                        timeout=timeout * 1000,
                    )
                except PlaywrightTimeout:
                    print(f"{view}: not rendered within {timeout} s; giving up on this view", flush=True)
                    await page.close()
                    break
                got = [(name, float(ms)) for name, ms in (await page.evaluate("window.__marks")).items()]
                # What the page asked the API, and how long each call took (Resource Timing).
                calls = await page.evaluate(CALLS_JS)
                await page.close()
                for name, ms in got:
                    if i:
                        times[name].append(ms)
                shown = ", ".join(f"{n.split(': ')[-1]} {ms:.0f} ms" for n, ms in got)
                api = "; ".join(f"{c[0]} at {c[1]} took {c[2]} ms" for c in calls)
                print(f"  {view}: load {i}: {shown}  [API: {api}]", flush=True)
            await ctx.close()
            for name, _ in milestones:
                if not times[name]:
                    out[name] = {"timed_out_s": timeout}
                    continue
                out[name] = pcts(times[name])
                print(
                    f"{name:<44} p50 {out[name]['p50']:>6} ms  p95 {out[name]['p95']:>6} ms"
                    f"  ({len(times[name])} loads)",
                    flush=True,
                )
        await browser.close()
    return out


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=120, help="seconds one load may take before giving up")
    ap.add_argument("--db", type=Path, help="SQLite file to load (or reuse when it exists)")
    ap.add_argument("--pg", help="PostgreSQL URL of a database loaded by `store_bench.py scale --keep`")
    ap.add_argument("--tenant", default="default", help="tenant to show (store_bench.py loads 'bench')")
    ap.add_argument(
        "--views", default="requests,overview,sessions,users", help="comma-separated: " + ",".join(VIEWS)
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmtap-dash-"))
    try:
        if args.pg:
            store = args.pg
        else:
            db = args.db or tmp / "store.db"
            if not db.exists():
                print(f"loading {args.rows} rows into {db} ...", flush=True)
                print(f"load: {await load_sqlite(db, args.rows):.1f} s", flush=True)
            store = f"sqlite:{db}"
        # `llmtap server` in a process of its own, as users run it (in this process it would
        # share its event loop with Playwright's, and the page's API calls would wait on both).
        port = free_port()
        env = {
            **os.environ,
            "LLMTAP_DATA_DIR": str(tmp),
            "LLMTAP_SERVER_PORT": str(port),
            "LLMTAP_STORE": store,
            "LLMTAP_BODIES": f"file:{tmp / 'bodies'}",
            "LLMTAP_QUEUE": f"sqlite:{tmp / 'q.db'}",
            "LLMTAP_DEFAULT_TENANT": args.tenant,
        }
        log = (tmp / "server.log").open("wb")
        llmtap = str(Path(sys.executable).with_name("llmtap"))
        proc = subprocess.Popen([llmtap, "server"], env=env, stdout=log, stderr=log)
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_healthy(base, proc, 120)
            print(f"store: {store if not args.pg else 'postgresql'}; chromium {shutil.which('chromium')}")
            print(f"load average before: {load_average()}", flush=True)
            results: dict[str, Any] = await measure(base, args.loads, args.timeout, args.views.split(","))
            print(f"load average after: {load_average()}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        print(results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llmtap server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"llmtap server not healthy within {timeout:g} s")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
