"""Issue 15 spike: how much cheaper is one proxy hop on a faster HTTP core than the aiohttp floor?

A measurement, not a product change: llmtap's gateway is untouched.  In one invocation, against
the same fake upstream (`llmtap fake-upstream`) and the same wrk loads as bench_gateway.py (whose
helpers it imports), it runs minimal passthrough proxies that all relay `/openai/<path>` to the
upstream's `/<path>` byte for byte, streams chunk by chunk, with no logging at all:

  aiohttp             bench/passthrough.py as it is: the floor today (every ratio is against it)
  granian-rsgi        granian's Rust HTTP server (hyper/tokio, RSGI interface; 1 worker, a
                      single-threaded runtime, uvloop) in front of passthrough.py's own pooled
                      aiohttp ClientSession: bench/spike_granian_app.py
  granian-rsgi-rtask  the same with granian's Rust task implementation (`--task-impl rust`,
                      experimental): the coroutine is driven from Rust instead of an asyncio Task
  granian-pyreqwest   granian as above, and pyreqwest (Rust reqwest) as the upstream client:
                      both ends in Rust, only the handler's glue left in Python
  rust-hyper          no Python at all: bench/spike_hyper (hyper server + client on one tokio
                      thread), the floor of a Rust hot path; only with --hyper-bin (build it with
                      `cargo build --release` in bench/spike_hyper)

Before measuring it checks, for each proxy, that a plain and a streamed answer arrive as the
direct ones do (byte for byte but for the upstream's per-request id and timestamp), that the
request body reached the upstream unchanged, and that the stream came in several reads.  Then,
in `--rounds` interleaved rounds: latency at concurrency 1 (direct too), max throughput for
chat and streams (wrk -t1 -c64) with the whole proxy's CPU (every process of it, all threads)
per 1,000 requests.  Pinning and priority as bench_gateway.py: proxy on core 0; upstream, wrk
and this script on core 1.

    .venv/bin/python bench/spike_core.py                         # 3 rounds, 8 s loads: ~4 min
    .venv/bin/python bench/spike_core.py --rounds 1 --seconds 3  # smoke run
    .venv/bin/python bench/spike_core.py --cores aiohttp,granian-rsgi --json spike.json

granian and pyreqwest are a bench-only extra: `pip install -c constraints.txt -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import bench_gateway as bg  # bench/ is this script's directory, hence on sys.path

GRANIAN = [
    "--interface", "rsgi",
    "--workers", "1",  # one worker process (granian's own supervisor process is measured too)
    "--runtime-mode", "st",  # one tokio runtime on one thread, as aiohttp's single loop
    "--runtime-threads", "1",
    "--runtime-blocking-threads", "1",
    "--blocking-threads", "1",
    "--loop", "uvloop",
    "--http", "1",  # wrk and the providers' clients speak HTTP/1.1; no h2 detection
    "--no-ws",
    "--backlog", "4096",  # as passthrough.py's TCPSite
    "--log-level", "warning",
    "--no-access-log",
]  # fmt: skip
# name: (granian options, RSGI app in bench/spike_granian_app.py); None: bench/passthrough.py
CORES: dict[str, tuple[list[str], str] | None] = {
    "aiohttp": None,
    "granian-rsgi": (GRANIAN, "app"),
    "granian-rsgi-rtask": ([*GRANIAN, "--task-impl", "rust"], "app"),
    "granian-pyreqwest": (GRANIAN, "reqwest_app"),
}
HYPER = "rust-hyper"  # not in CORES: a binary built by hand, run when --hyper-bin names it
BASELINE = "aiohttp"
# The fake upstream's only per-request bytes: ids and timestamps, of the same length every time.
VOLATILE = re.compile(rb'"(id|created)": ?("[^"]*"|\d+)')


# -- a proxy that is a tree of processes ----------------------------------------------------------


def children_of(pids: set[int]) -> set[int]:
    """Processes whose parent is in `pids` (the kernel here has no /proc/PID/task/TID/children)."""
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid in pids:
                out.add(int(entry))
    return out


@dataclass
class TreeProc(bg.Proc):
    """A server that forks its workers (granian: a supervisor and a worker process).

    The tree is taken once the server answers and is fixed from then on: its CPU is the sum over
    every process of it, so a core that moves work into a helper process is not flattered.
    """

    tree: list[int] = field(default_factory=list)

    def take_tree(self) -> None:
        tree, frontier = {self.pid}, {self.pid}
        while frontier := children_of(frontier) - tree:
            tree |= frontier
        self.tree = sorted(tree)

    def cpu(self) -> float:
        try:
            return sum(bg.cpu_seconds(p) for p in self.tree or [self.pid])
        except OSError:
            raise SystemExit(f"a process of {self.name} died:\n{self.tail()}") from None

    def stop(self, timeout: float = 20.0, sig: signal.Signals = signal.SIGINT) -> None:
        super().stop(timeout, sig)
        for pid in self.tree:  # a worker that outlived its supervisor (killed after the timeout)
            if pid != self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def threads(self) -> dict[str, float]:
        """CPU seconds so far by process and thread: which side (Rust or the Python loop) spent it."""
        out: dict[str, float] = {}
        for i, pid in enumerate(self.tree or [self.pid]):
            with contextlib.suppress(OSError):
                for name, s in bg.thread_cpu(pid).items():
                    out[f"{'supervisor' if i == 0 and len(self.tree) > 1 else 'worker'} {name}"] = s
        return out


# -- the bench ------------------------------------------------------------------------------------


@dataclass
class SpikeBench(bg.Bench):
    @property
    def seconds(self) -> float:
        return float(self.args.seconds)

    @property
    def c1_requests(self) -> int:
        return int(self.args.c1_requests)

    @property
    def rounds(self) -> int:
        return int(self.args.rounds)

    def start_core(self, name: str) -> bg.Variant:
        if name == HYPER:
            port = bg.free_port()
            cmd = [self.args.hyper_bin, "--port", str(port), "--upstream", self.upstream_url]
            p = bg.spawn(name, cmd, self.workdir, self.proxy_cores)
            bg.wait_ready(p, f"http://127.0.0.1:{port}/healthz")
            return bg.Variant(name, f"http://127.0.0.1:{port}/openai", {"proxy": p})
        core = CORES[name]
        if core is None:
            v = self.start_variant("passthrough")
            v.name = name
            return v
        port = bg.free_port()
        opts, target = core
        cmd = [sys.executable, "-m", "granian", *opts, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--working-dir", str(bg.HERE), f"spike_granian_app:{target}"]
        env = {**os.environ, "SPIKE_UPSTREAM": self.upstream_url}
        p = bg.spawn(name, cmd, self.workdir, self.proxy_cores, env)
        proc = TreeProc(p.name, p.popen, p.log, p.core)
        bg.wait_ready(proc, f"http://127.0.0.1:{port}/healthz")
        proc.take_tree()
        bg.progress(f"{name}: processes {proc.tree} on core {proc.core}")
        return bg.Variant(name, f"http://127.0.0.1:{port}/openai", {"proxy": proc})

    def run(self, names: Sequence[str]) -> dict[str, Any]:
        assert self.upstream is not None
        direct = bg.Variant("direct", self.upstream_url)
        vs: dict[str, bg.Variant] = {}
        res: dict[str, Any] = {"direct": {"runs": {"c1": []}}}
        try:
            for n in names:
                bg.progress(f"starting {n}")
                vs[n] = self.start_core(n)
                self.bench_procs += list(vs[n].procs.values())
            res["check"] = asyncio.run(
                check_relay(self.upstream_url, {n: v.base for n, v in vs.items()}, self.bodies)
            )
            for n in names:
                res[n] = {"runs": {"warmup": [], "c1": [], "c64": [], "stream": []}}
                res[n]["runs"]["warmup"].append(self.measure_wrk(vs[n], "warm-up", "chat", 64, "seconds", 2))
            phases = bg.load_phases(self.c1_requests, self.seconds)
            for rnd in range(self.rounds):
                k = rnd % len(names)
                order = [*names[k:], *names[:k]]  # rotate so that no core always runs first
                for phase, label, body, conns, mode, value in phases:
                    targets = [*order, "direct"] if phase == "c1" else order
                    for n in targets:
                        v = direct if n == "direct" else vs[n]
                        lab = f"{label}, round {rnd + 1}/{self.rounds}"
                        res[n]["runs"][phase].append(self.measure_wrk(v, lab, body, conns, mode, value))
            for n in ("direct", *names):
                for phase, runs in res[n]["runs"].items():
                    if phase != "warmup":
                        res[n][phase] = bg.summarize(runs)
            for n in names:
                proc = vs[n].procs["proxy"]
                if isinstance(proc, TreeProc):
                    res[n]["thread_cpu_s"] = {k: round(s, 2) for k, s in proc.threads().items()}
            return res
        finally:
            for v in reversed(list(vs.values())):
                for p in v.procs.values():
                    p.stop()
            bg.progress("stopped all proxies")


async def _fetch(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes, int, str]:
    """(status, content type, body, number of reads, the upstream's sha256 of what it received)."""
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as r:
        data, reads = b"", 0
        while chunk := await r.content.readany():
            data += chunk
            reads += 1
        return r.status, r.content_type, data, reads, r.headers.get("x-fake-body-sha256", "")


async def check_relay(direct: str, proxies: dict[str, str], bodies: dict[str, Path]) -> dict[str, Any]:
    """Each proxy relays a plain and a streamed answer as the upstream sent it, or we stop here.

    The oracle is the upstream itself, asked directly with the same request: equal length and
    equal bytes once its ids and timestamps are blanked out.  The request body's sha256, as
    computed by the upstream, must be the one of the bytes we sent.  A slow stream (20 ms between
    events) must arrive in several reads, or the proxy buffered it.
    """
    out: dict[str, Any] = {}
    for kind in ("chat", "stream"):
        body = bodies[kind].read_bytes()
        headers = {"Authorization": "Bearer x", "Content-Type": "application/json"}
        headers["x-fake-echo-headers"] = "1"  # the upstream answers with the sha256 of what it got
        if kind == "stream":
            headers["x-fake-chunk-delay-ms"] = "20"
        want = await _fetch(direct + "/v1/chat/completions", body, headers)
        if want[0] != 200 or (kind == "stream") != (want[1] == "text/event-stream"):
            raise SystemExit(f"the upstream answered {want[0]} {want[1]} to the {kind} request")
        for name, base in proxies.items():
            status, ctype, data, reads, sha = await _fetch(base + "/v1/chat/completions", body, headers)
            problems = []
            if (status, ctype) != want[:2]:
                problems.append(f"status/content type {status} {ctype}, direct {want[0]} {want[1]}")
            if len(data) != len(want[2]) or VOLATILE.sub(b"", data) != VOLATILE.sub(b"", want[2]):
                problems.append(f"body differs from the direct one:\n{data[:400]!r}\n{want[2][:400]!r}")
            if sha != hashlib.sha256(body).hexdigest():
                problems.append(f"the upstream received a different request body (sha256 {sha})")
            if kind == "stream" and reads < 2:
                problems.append(f"the stream arrived in {reads} read(s): buffered")
            if problems:
                raise SystemExit(f"{name} does not relay the {kind} answer faithfully: {'; '.join(problems)}")
            out[f"{name} {kind}"] = {"bytes": len(data), "reads": reads, "direct_reads": want[3]}
            bg.progress(f"{name}: {kind} relayed faithfully ({len(data)} B in {reads} reads)")
    return out


# -- report ---------------------------------------------------------------------------------------


def spread(runs: Sequence[dict[str, Any]], key: str, nd: int) -> str:
    xs = [r[key] for r in runs]
    return f"{statistics.median(xs):.{nd}f} ({min(xs):.{nd}f}-{max(xs):.{nd}f})"


def ratios(res: dict[str, Any], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each core against aiohttp: medians, and (`best_*`) each side's best round."""
    base = res[BASELINE]
    d = res["direct"]["c1"]["p50_ms"]
    out: dict[str, dict[str, float]] = {}
    for n in names:
        x, r = res[n], dict[str, float]()
        for phase, kind in (("c64", "chat"), ("stream", "stream")):
            r[f"cpu_{kind}"] = x[phase]["cpu_s_per_1k"] / base[phase]["cpu_s_per_1k"]
            r[f"best_cpu_{kind}"] = x[phase]["cpu_s_per_1k_min"] / base[phase]["cpu_s_per_1k_min"]
            r[f"rps_{kind}"] = x[phase]["rps"] / base[phase]["rps"]
            r[f"best_rps_{kind}"] = x[phase]["rps_max"] / base[phase]["rps_max"]
        added, base_added = x["c1"]["p50_ms"] - d, base["c1"]["p50_ms"] - d
        r["added_p50_ms"] = added
        if base_added > 0:
            r["added_p50"] = added / base_added
        out[n] = {k: round(val, 3) for k, val in r.items()}
    return out


def report(results: dict[str, Any]) -> str:
    res, names = results["variants"], results["config"]["cores"]
    rat = results["ratios"]
    rows = []
    for n in names:
        r = res[n]["runs"]
        rows.append(
            [
                n,
                spread(r["c64"], "cpu_s_per_1k", 3),
                spread(r["stream"], "cpu_s_per_1k", 3),
                spread(r["c64"], "rps", 0),
                spread(r["stream"], "rps", 0),
                f"{rat[n]['added_p50_ms']:+.3f}",
                f"{res[n]['c64']['util_pct']['proxy']:.0f}/{res[n]['stream']['util_pct']['proxy']:.0f}",
                f"{res[n]['c64']['upstream_util_pct']:.0f}+{res[n]['c64']['wrk_util_pct']:.0f}",
                f"{max(res[n]['c64']['foreign_util_pct'], res[n]['stream']['foreign_util_pct']):.0f}",
            ]
        )
    out = [
        bg.table(
            "Medians (range) over rounds; CPU = whole proxy, all processes and threads; +p50 = c1 p50 "
            f"minus direct ({res['direct']['c1']['p50_ms']:.3f} ms); util = proxy % of its core, chat/stream",
            ["core", "CPU s/1k chat", "CPU s/1k stream", "rps chat", "rps stream", "+p50 c1 ms", "util",
             "upstr+wrk", "other"],
            rows,
        )
    ]  # fmt: skip

    def both(n: str, key: str) -> str:
        best = rat[n].get("best_" + key)
        return f"{rat[n][key]:.2f}" + ("" if best is None else f" ({best:.2f})")

    out.append(
        bg.table(
            f"Ratios against {BASELINE}: median rounds (best round of each side); CPU lower is better",
            ["core", "CPU chat", "CPU stream", "rps chat", "rps stream", "+p50 c1"],
            [
                [n, both(n, "cpu_chat"), both(n, "cpu_stream"), both(n, "rps_chat"), both(n, "rps_stream"),
                 f"{rat[n]['added_p50']:.2f}" if "added_p50" in rat[n] else "-"]
                for n in names
            ],
        )
    )  # fmt: skip
    for n in names:
        th = res[n].get("thread_cpu_s")
        if th:
            top = sorted(th.items(), key=lambda kv: -kv[1])
            busy = ", ".join(f"{k} {s:.1f}" for k, s in top if s >= 0.05)
            out.append(f"{n}: CPU s by thread over the whole run: {busy}")
    out.append("load average (1/5/15 min) before: {before}; after: {after}".format(**results["loadavg"]))
    return "\n\n".join(out)


# -- main -----------------------------------------------------------------------------------------


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def installed(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cores", default=",".join(CORES), help=f"comma list of {', '.join(CORES)}")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each phase")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each max-throughput run")
    ap.add_argument("--c1-requests", type=int, default=1000, help="sequential requests per c1 run")
    ap.add_argument("--hyper-bin", metavar="PATH", help=f"also run {HYPER}: its binary (bench/spike_hyper)")
    ap.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    ap.add_argument("--nice", type=int, default=-10, help="niceness for all processes (root; 0 = off)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (process logs)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, bg._interrupt)
    signal.signal(signal.SIGTERM, bg._interrupt)
    bg.preflight()
    names = [n.strip() for n in args.cores.split(",") if n.strip()]
    if args.hyper_bin and HYPER not in names:
        names.append(HYPER)
    for n in names:
        if n not in CORES and not (n == HYPER and args.hyper_bin):
            ap.error(f"unknown core {n!r}" + (f" ({n} needs --hyper-bin)" if n == HYPER else ""))
    if BASELINE not in names:
        names.insert(0, BASELINE)
    versions = {d: installed(d) for d in ("granian", "pyreqwest")}
    needed = {"granian"} if any(CORES.get(n) for n in names) else set()
    needed |= {"pyreqwest"} if "granian-pyreqwest" in names else set()
    if missing := sorted(d for d in needed if versions[d] is None):
        raise SystemExit(
            f"{' and '.join(missing)} not installed (the bench-only extra; llmtap itself never needs "
            "them): pip install -c constraints.txt -e '.[bench]'   (or pick others with --cores)"
        )
    if args.nice and os.geteuid() == 0:
        if os.environ.get(bg.SESSION_MARK) != "1":
            return bg.rerun_in_own_session()
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # see bench_gateway.main: same reasons
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(args.nice))
    proxy_cores, load_cores = bg.pick_cores(args.no_pin)
    if load_cores:
        os.sched_setaffinity(0, load_cores)
    results: dict[str, Any] = {
        "config": {
            "cores": names,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "c1_requests": args.c1_requests,
            "versions": versions,
            "granian_options": GRANIAN,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "proxy_cores": sorted(proxy_cores) if proxy_cores else None,
            "load_cores": sorted(load_cores) if load_cores else None,
        },
        "loadavg": {"before": loadavg()},
    }
    bg.progress(f"load average {results['loadavg']['before']}; {versions}; cores: {', '.join(names)}")
    t0 = time.monotonic()
    # Bench reads these from its args; the spike has no llmtap variant to wait for or configure.
    args.quick, args.env, args.catch_up_timeout = False, [], 0.0
    with bg.workdir(args.keep) as wd:
        b = SpikeBench(args, wd, proxy_cores, load_cores)
        with b.upstream_running():
            results["variants"] = b.run(names)
    results["loadavg"]["after"] = loadavg()
    results["ratios"] = ratios(results["variants"], names)
    results["wall_s"] = round(time.monotonic() - t0, 1)
    print()
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        bg.progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; every process the spike started has been stopped", file=sys.stderr)
        sys.exit(130)
