"""Memory of `llmtap up`: RSS idle and after every step of a long load (issue 15: no growth).

    .venv/bin/python bench/memory_bench.py                       # 1M requests in steps of 100k
    .venv/bin/python bench/memory_bench.py --requests 20000 --step 5000   # a smoke run
    .venv/bin/python bench/memory_bench.py --requests 400000 --env LLMTAP_WORKER_DEFER_S=0

Starts the fake upstream and `llmtap up` (SQLite queue, store and body files in a fresh data
directory), samples the process's RSS idle, then sends the requests with wrk (-c64) in steps,
alternating non-streaming and streaming chat (bench_gateway.py's). After each step it waits until the
store holds every request sent so far (the worker has caught up) and samples RSS again: the
figure to compare across steps, since a step's RSS right after the load also holds whatever is
still queued. Growth is judged from the second step on (the first fills caches, pools and
the allocator's arenas): the least-squares slope of RSS after catch-up, in MB per 100k
requests, and its total over the run. Prints a table and, with --json, writes the samples.

A measurement, not a test: nothing here runs under pytest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import Bench, Variant, progress, run_wrk


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB: now and the peak so far."""
    now = peak = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return now, peak


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000, help="requests in all (1,000,000)")
    ap.add_argument("--step", type=int, default=100_000, help="requests per step (100,000)")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections (64)")
    ap.add_argument("--catch-up-timeout", type=float, default=900.0, help="seconds per step to store all")
    ap.add_argument("--json", help="write the samples here")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra env for llmtap (repeat)")
    args = ap.parse_args()
    bench_args = argparse.Namespace(env=args.env, quick=False, seconds=None, rounds=1)
    with tempfile.TemporaryDirectory(prefix="llmtap-memory-") as d:
        bench = Bench(bench_args, Path(d), None, None)
        bench.start_upstream()
        v: Variant = bench.start_variant("up")
        proxy = v.procs["proxy"]
        try:
            time.sleep(5)  # start-up's own allocations settle; the worker polls an empty queue
            idle, _ = rss_mb(proxy.pid)
            progress(f"llmtap up (pid {proxy.pid}) idle: RSS {idle:.0f} MB")
            rows: list[dict[str, Any]] = []
            sent = 0
            t_start = time.monotonic()
            while sent < args.requests:
                n = min(args.step, args.requests - sent)
                kind = "chat" if len(rows) % 2 == 0 else "stream"
                t0 = time.monotonic()
                w = run_wrk(
                    f"{v.base}/v1/chat/completions", bench.bodies[kind], args.conns, "limit", n, "/healthz"
                )
                load_s = time.monotonic() - t0
                after_load, _ = rss_mb(proxy.pid)
                sent += w.sent
                v.expected += w.sent
                got, wait_s = v.wait_stored(w.sent, args.catch_up_timeout)
                stored = sent - w.sent + got
                caught_up, peak = rss_mb(proxy.pid)
                row = {
                    "requests": sent,
                    "kind": kind,
                    "ok": w.ok,
                    "errors": w.errors(),
                    "rps": round(w.ok / load_s, 1) if load_s else 0.0,
                    "rss_after_load_mb": round(after_load, 1),
                    "rss_caught_up_mb": round(caught_up, 1),
                    "rss_peak_mb": round(peak, 1),
                    "stored": stored,
                    "catch_up_s": round(wait_s, 1),
                }
                rows.append(row)
                progress(
                    f"{sent:>9,} requests ({kind}, {row['rps']:.0f}/s, {row['errors']} errors): RSS"
                    f" {after_load:.0f} MB after the load, {caught_up:.0f} MB caught up"
                    f" ({stored:,} stored, +{wait_s:.1f} s), peak {peak:.0f} MB"
                )
                if stored < sent:
                    progress(f"only {stored:,} of {sent:,} stored within {args.catch_up_timeout:.0f} s")
                    break
            elapsed = time.monotonic() - t_start
        finally:
            for p in v.procs.values():
                p.stop()
            if bench.upstream is not None:
                bench.upstream.stop()
    later = rows[1:]
    per_100k = slope([r["requests"] / 100_000 for r in later], [r["rss_caught_up_mb"] for r in later])
    span = (later[-1]["requests"] - later[0]["requests"]) / 100_000 if later else 0.0
    summary = {
        "idle_rss_mb": round(idle, 1),
        "requests": sent,
        "stored": rows[-1]["stored"] if rows else 0,
        "errors": sum(r["errors"] for r in rows),
        "seconds": round(elapsed, 1),
        "rss_first_step_mb": rows[0]["rss_caught_up_mb"] if rows else None,
        "rss_last_step_mb": rows[-1]["rss_caught_up_mb"] if rows else None,
        "rss_peak_mb": max((r["rss_peak_mb"] for r in rows), default=None),
        "growth_mb_per_100k": round(per_100k, 2),
        "growth_over_run_mb": round(per_100k * span, 1),
    }
    print()
    print("| requests | load | req/s | RSS after load | RSS caught up | peak | stored |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['requests']:,} | {r['kind']} | {r['rps']:.0f} | {r['rss_after_load_mb']:.0f} MB"
            f" | {r['rss_caught_up_mb']:.0f} MB | {r['rss_peak_mb']:.0f} MB | {r['stored']:,} |"
        )
    print()
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "steps": rows}, indent=2))
    return 0 if rows and rows[-1]["stored"] >= sent else 1


if __name__ == "__main__":
    raise SystemExit(main())
