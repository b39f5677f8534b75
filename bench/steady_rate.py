"""CPU per request at the steady rates real deployments run, not only at saturation (issue 15).

    .venv/bin/python bench/steady_rate.py                                # idle, 100, 500 req/s; 3 rounds
    .venv/bin/python bench/steady_rate.py --rates 0,100 --rounds 2 --env LLMTAP_WORKER_LINGER_MS=50
    .venv/bin/python bench/steady_rate.py --rates 0,10 --variants up --by-thread   # where it goes

`bench_gateway.py` measures at max throughput, where every batch is full: a batch's fixed cost
(the store's transaction with its rollup cells, the queue's fetch and ack, a body pack file, a
checkpoint) is spread over 500 records. At 100 req/s the worker's batches hold what arrived
during its linger, so that fixed cost lands on a handful of records. This script sends chat
requests at fixed rates (an aiohttp client paced by the clock, on the load core) through the
passthrough and `llmtap up` (pinned to the proxy core as in `bench_gateway.py`), and reports,
per rate, the CPU per request from the start of the load until the store holds every request
(the worker's catch-up included), the CPU as a share of one core, and for `up` the worker's
batches (from its /metrics: how many records a batch held). Rate 0 is idle: CPU over
`--seconds` with no traffic. Rounds are interleaved across the variants; medians are printed.
`--by-thread` adds, per run, each thread's CPU per request and wake-ups a second (voluntary
context switches, /proc), named by `py-spy dump` when py-spy is installed: below saturation a
wake-up costs more than the work it does (cold caches), so their count is the figure to watch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from bench_gateway import PROMPT, Bench, Variant, http_get, pick_cores, progress


async def paced(url: str, rate: float, seconds: float) -> int:
    """Send rate x seconds chat requests at even intervals (late ones go at once); all answered."""
    n = int(rate * seconds)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
    failed = 0

    async def one(s: aiohttp.ClientSession) -> None:
        nonlocal failed
        async with s.post(url, json=body, headers={"Authorization": "Bearer sk-bench"}) as r:
            await r.read()
            failed += r.status != 200

    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(s)))
        await asyncio.gather(*tasks)
    if failed:
        progress(f"  WARNING: {failed} of {n} requests failed")
    return n


def worker_batches(v: Variant) -> tuple[float, float]:
    """(batches, records processed) from the worker's Prometheus counters, 0s if none."""
    total = [0.0, 0.0]
    urls = [v.base.removesuffix("/openai") + "/metrics"]
    if v.stats_url:
        urls.append(v.stats_url.split("/api/")[0] + "/metrics")
    for url in urls:
        status, body = http_get(url, 10.0)
        if status != 200:
            continue
        text = body.decode()
        names = ("llmtap_worker_batch_seconds_count", "llmtap_worker_records_processed_total")
        for i, name in enumerate(names):
            total[i] += sum(float(x) for x in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return total[0], total[1]


def thread_stats(pid: int) -> dict[int, tuple[float, int]]:
    """tid -> (CPU seconds, voluntary context switches) of every thread of `pid`."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        switches = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
        out[int(tid)] = ((int(fields[11]) + int(fields[12])) / tick, int(switches[1]) if switches else 0)
    return out


def thread_names(pid: int) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` (empty without py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {}
    out = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=60).stdout
    return {
        int(m[1]): m[2]
        for m in re.finditer(r'^Thread (?:0x[0-9a-fA-F]+ )?\(?(\d+)\)?.*?"([^"]*)"', out, re.M)
    }


def by_thread(pid: int, before: dict[int, tuple[float, int]], n: int, wall: float) -> str:
    after, names = thread_stats(pid), thread_names(pid)
    parts = []
    for tid, (cpu, switches) in sorted(after.items()):
        c0, s0 = before.get(tid, (0.0, 0))
        if cpu > c0 or switches > s0:
            cost = f"{(cpu - c0) / n * 1e6:.0f} us/req" if n else f"{cpu - c0:.2f} s"
            parts.append(f"{names.get(tid, tid)} {cost} {(switches - s0) / wall:.0f}/s")
    return "; ".join(parts)


def measure(
    v: Variant, rate: float, seconds: float, timeout: float, threads: bool = False
) -> dict[str, float]:
    pid = next(iter(v.procs.values())).pid
    before = thread_stats(pid) if threads else {}
    b0, p0 = worker_batches(v)
    c0 = sum(v.cpu().values()) + v.drain_cpu_s
    t0 = time.monotonic()
    if rate > 0:
        n = asyncio.run(paced(f"{v.base}/v1/chat/completions", rate, seconds))
    else:
        n = 0
        time.sleep(seconds)
    if v.logs and n:
        v.expected += n
        stored, _ = v.wait_stored(n, timeout)
        if stored < n:
            raise SystemExit(f"{v.name}: only {stored} of {n} requests stored")
    wall = time.monotonic() - t0
    cpu = sum(v.cpu().values()) + v.drain_cpu_s - c0  # `gateway`: + its draining worker
    b1, p1 = worker_batches(v)
    if threads:
        first = next(iter(v.procs))
        progress(f"  {v.name} threads of {first}, CPU and wake-ups: " + by_thread(pid, before, n, wall))
    return {
        "us_per_request": cpu / n * 1e6 if n else 0.0,
        "core_pct": 100 * cpu / wall,
        "batches": b1 - b0,
        "per_batch": (p1 - p0) / (b1 - b0) if b1 > b0 else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0,100,500", help="requests per second, comma list; 0 = idle")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each load (10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--variants", default="passthrough,up", help="passthrough, up, gateway (comma list)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra env for llmtap")
    ap.add_argument("--catch-up-timeout", type=float, default=120.0)
    ap.add_argument("--by-thread", action="store_true", help="each thread's CPU and wake-ups a second")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    names = args.variants.split(",")
    proxy_cores, load_cores = pick_cores(False)
    bench_args = argparse.Namespace(env=args.env, quick=False, seconds=None, rounds=1)
    results: dict[tuple[str, float], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="llmtap-steady-") as d:
        bench = Bench(bench_args, Path(d), proxy_cores, load_cores)
        if load_cores:
            os.sched_setaffinity(0, load_cores)
        with bench.upstream_running():
            variants = [bench.start_variant(n) for n in names]
            try:
                for v in variants:  # warm-up: pools, caches, the allocator's arenas
                    measure(v, 200, 2, args.catch_up_timeout)
                time.sleep(2)
                for rnd in range(args.rounds):
                    for rate in rates:
                        order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
                        for v in order:
                            r = measure(v, rate, args.seconds, args.catch_up_timeout, args.by_thread)
                            results.setdefault((v.name, rate), []).append(r)
                            batches = f", {r['batches']:.0f} worker batches of {r['per_batch']:.0f}"
                            progress(
                                f"round {rnd + 1} {rate:5.0f} req/s {v.name:12s}"
                                f" {r['us_per_request']:7.0f} us/req {r['core_pct']:5.1f}% of a core"
                                + (batches if r["batches"] else "")
                            )
            finally:
                for v in variants:
                    for p in v.procs.values():
                        p.stop()
    env = args.env or "defaults"
    print(f"\nSteady rates: {args.rounds} rounds of {args.seconds:g} s, medians; env {env}")
    print(f"{'req/s':>6s} {'variant':12s} {'us/request':>11s} {'÷ pass':>7s} {'% core':>7s} {'batch':>6s}")
    for rate in rates:
        passed = results.get(("passthrough", rate), [{"us_per_request": 0.0}])
        base = statistics.median(r["us_per_request"] for r in passed)
        for name in names:
            rs = results[(name, rate)]
            us = statistics.median(r["us_per_request"] for r in rs)
            ratio = f"{us / base:.2f}" if base and rate else ""
            batch = statistics.median(r["per_batch"] for r in rs)
            print(
                f"{rate:6.0f} {name:12s} {us if rate else 0:11.0f} {ratio:>7s}"
                f" {statistics.median(r['core_pct'] for r in rs):7.2f} {f'{batch:.0f}' if batch else '':>6}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
