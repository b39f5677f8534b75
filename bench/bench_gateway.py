"""Gateway benchmark: what does llmtap cost on top of one plain Python proxy hop?

One run measures, in this invocation and on this machine, four ways of reaching the same fake
upstream (`llmtap fake-upstream`):

  direct       the client talks to the upstream itself (the latency floor)
  passthrough  bench/passthrough.py: a minimal aiohttp proxy with no logging (the floor for a hop)
  up           `llmtap up`: gateway + worker + API in one process, every request logged and stored
  split        `llmtap gateway`, `llmtap worker` and `llmtap server` as three processes
  gateway      `llmtap gateway` with its core to itself, as in a scaled-out deployment: its worker
               runs only between loads (started after each one, stopped once all is stored), so
               its CPU and its heap are not on the gateway's core while the gateway is measured

For each it reports latency at concurrency 1 and 64 (wrk), max throughput for non-streaming and
streaming chat (wrk -t1 -c64), time to first byte of a slow stream (an aiohttp client), and CPU
seconds per 1,000 requests of the proxy process(es) from /proc/<pid>/stat, including the time the
worker needs afterwards to store everything (deferred logging is not free logging).  It then
prints llmtap's ratios against the passthrough and checks that every request was stored.

    python bench/bench_gateway.py            # full run, about 4 minutes
    python bench/bench_gateway.py --quick    # smoke run, about 1.5 minutes
    python bench/bench_gateway.py --json out.json --profile

See bench/README.md for what each number means and the caveats of a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LUA = HERE / "wrk" / "chat.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROMPT = "hello from the benchmark"
#: The fake upstream answers "echo:" and the prompt's words, one content delta each when
#: streaming: this prompt's 19 words make the 20-chunk stream of issue 15's targets.
STREAM_PROMPT = (
    "hello from the benchmark: nineteen words, so that the echoed answer"
    " streams in twenty chunks, one for each word"
)
VARIANTS = ("direct", "passthrough", "up", "split", "gateway")

# `python -m cProfile` times functions by wall clock, so every moment the event loop is
# preempted (by the store's threads, by the upstream) is billed to whatever made the syscall.
# Timing by the main thread's own CPU clock bills each function only for CPU it used.
# SIGUSR1/SIGUSR2 switch the profiler on and off, so that start-up (imports, migrations) and
# shutdown stay out of the profile and it covers the loads and the storage catch-up only.
PROFILE_BOOT = """
import cProfile, signal, sys, time
out = sys.argv[1]
sys.argv = ["llmtap", *sys.argv[2:]]
prof = cProfile.Profile(time.thread_time)
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
signal.signal(signal.SIGUSR2, lambda *_: prof.disable())
try:
    from llmtap.cli import main
    main()
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats(out)
"""
T0 = time.monotonic()

# Issue 15's targets (the design's first ones were 1.5x the CPU and 2/3 of the rps of a bare hop):
# `llmtap up` <= 1.25x the passthrough's CPU per 1k chat requests, <= 1.3x on streams, >= 0.8x
# its max rps; `llmtap gateway` alone <= 1.10x its CPU.
CPU_RATIO_TARGET = 1.25
STREAM_CPU_RATIO_TARGET = 1.3
GATEWAY_CPU_TARGET = 1.10
RPS_RATIO_TARGET = 0.80


def load_phases(c1_requests: int, seconds: float) -> tuple[tuple[str, str, str, int, str, float], ...]:
    """(phase, label, body, connections, mode, value) of each measured load, in order."""
    return (
        ("c1", "latency at concurrency 1", "chat", 1, "limit", c1_requests),
        ("c64", "non-stream max throughput", "chat", 64, "seconds", seconds),
        ("stream", "stream max throughput", "stream", 64, "seconds", seconds),
    )


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def system_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread (`main` is the event loop; the rest are executor/driver threads)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        name = "main" if int(tid) == pid else f"{comm}:{tid}"
        out[name] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    core: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, timeout: float = 20.0, sig: signal.Signals = signal.SIGINT) -> None:
        if not self.alive():
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            progress(f"{self.name} did not stop within {timeout:.0f}s of {sig.name}; killing it")
            self.popen.kill()
            self.popen.wait()


def spawn(
    name: str, cmd: Sequence[str], logdir: Path, cores: set[int] | None, env: dict[str, str] | None = None
) -> Proc:
    log = logdir / f"{name}.log"
    with open(log, "wb") as logf:
        popen = subprocess.Popen(
            list(cmd),
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            # Own process group: a Ctrl-C in the terminal reaches only us and we stop them in order.
            # Same session on purpose: with sched_autogroup the session is the scheduling group
            # whose priority main() raises.
            process_group=0,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
    return Proc(name, popen, log, ",".join(map(str, sorted(cores))) if cores else "any")


def dir_usage(path: Path) -> dict[str, int]:
    files = size = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                size += os.stat(os.path.join(root, name)).st_blocks * 512
                files += 1
    return {"files": files, "bytes_on_disk": size}


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def wait_ready(proc: Proc, url: str, timeout: float = 60.0) -> None:
    """Poll `url` until it answers at all (any status) or the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(f"{proc.name} exited with {proc.popen.returncode} at start:\n{proc.tail()}")
        with contextlib.suppress(OSError):
            http_get(url, 1.0)
            return
        time.sleep(0.1)
    raise SystemExit(f"{proc.name} not ready after {timeout:.0f}s ({url}):\n{proc.tail()}")


# -- load generators --------------------------------------------------------------------------


@dataclass
class WrkResult:
    raw: dict[str, Any]
    client_cpu: float  # wrk's own CPU seconds

    @property
    def sent(self) -> int:
        return int(self.raw["chat_sent"])

    @property
    def ok(self) -> int:
        return int(self.raw["chat_ok"])

    @property
    def seconds(self) -> float:
        return float(self.raw["chat_us"]) / 1e6

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def errors(self) -> int:
        r = self.raw
        return int(r["chat_fail"] + r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"])


def run_wrk(url: str, body: Path, conns: int, mode: str, value: float, filler: str) -> WrkResult:
    """One wrk run (see bench/wrk/chat.lua): exactly `value` chat requests or about `value` seconds."""
    cap = int(value) + 60 if mode == "seconds" else 600
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{cap}s", "--timeout", "30s", "-s", str(LUA), url]
    cmd += ["--", str(body), mode, str(value), filler]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    lines: list[str] = []
    try:
        for line in p.stdout:
            lines.append(line)
            if line.startswith("BENCH_STOPPED"):
                # wrk's main thread sleeps through all of -d; SIGINT ends the sleep and prints the summary.
                p.send_signal(signal.SIGINT)
        p.wait()
    finally:
        if p.poll() is None:  # interrupted: do not leave wrk hammering for the rest of -d
            p.kill()
            p.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    for line in lines:
        if line.startswith("BENCH_JSON "):
            return WrkResult(json.loads(line[len("BENCH_JSON ") :]), client_cpu)
    raise SystemExit("wrk gave no result:\n" + "".join(lines[-20:]))


async def _ttfb(url: str, body: bytes, n: int, delay_ms: int, chunks: int) -> dict[str, Any]:
    import aiohttp

    headers = {
        "Authorization": "Bearer x",
        "Content-Type": "application/json",
        "x-fake-chunk-delay-ms": str(delay_ms),
        "x-fake-chunks": str(chunks),
    }
    ttfb: list[float] = []
    total: list[float] = []
    reads: list[int] = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            t0 = time.perf_counter()
            async with s.post(url, data=body, headers=headers) as r:
                if r.status != 200:
                    raise SystemExit(f"TTFB request to {url} answered {r.status}: {await r.text()}")
                first = await r.content.readany()
                t1 = time.perf_counter()
                data, k = first, 1
                while chunk := await r.content.readany():
                    data += chunk
                    k += 1
                t2 = time.perf_counter()
            if b"[DONE]" not in data:
                raise SystemExit(f"stream from {url} ended without [DONE]")
            ttfb.append((t1 - t0) * 1000)
            total.append((t2 - t0) * 1000)
            reads.append(k)
    return {
        "n": n,
        "ttfb_p50_ms": pct(ttfb, 50),
        "ttfb_p99_ms": pct(ttfb, 99),
        "total_p50_ms": pct(total, 50),
        "reads_p50": statistics.median(reads),
    }


def pct(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


# -- variants ---------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    base: str  # URL prefix that maps to the upstream root (".../openai" for proxies)
    procs: dict[str, Proc] = field(default_factory=dict)  # measured processes (CPU)
    stats_url: str | None = None  # llmtap's /api/v1/stats, to verify and await storage
    expected: int = 0  # chat requests sent so far; all must be stored
    logdir: Path | None = None
    #: Starts a worker that stores what the last load left in the queue (variant `gateway`:
    #: none runs during loads); it is stopped once the store holds everything.
    drain: Callable[[], Proc] | None = None
    drain_cpu_s: float = 0.0  # CPU of those workers, all loads so far

    @property
    def logs(self) -> bool:
        return self.stats_url is not None

    def stored(self) -> int:
        """Rows in the store (its rollups answer: milliseconds whatever its size)."""
        assert self.stats_url is not None
        url = self.stats_url
        status, body = http_get(url, 30.0)
        if status != 200:
            raise SystemExit(f"{url} answered {status}: {body[:300]!r}")
        return int(json.loads(body)["overall"]["count"])

    def wait_stored(self, expected: int, timeout: float) -> tuple[int, float]:
        """Block until the store holds every request sent to this variant so far
        (`self.expected`, the `expected` of this run included); return this run's share of what
        is stored, and the wait.

        It polls the count of the whole store, which the stats API answers from its rollups in a
        few milliseconds. A count of the run's own rows (`since=` its start) is answered from raw
        rows: ~115 ms of `llmtap up`'s CPU per poll at 45k rows, ten polls a second, billed to
        `up` and slowing the very catch-up it waited for.
        """
        t0 = time.monotonic()
        before = self.expected - expected
        worker = self.drain() if self.drain is not None else None
        try:
            n = self.stored()
            while n < self.expected and time.monotonic() - t0 < timeout:
                for p in [*self.procs.values(), *([worker] if worker else [])]:
                    if not p.alive():
                        raise SystemExit(f"{p.name} died:\n{p.tail()}")
                time.sleep(0.1)
                n = self.stored()
        finally:
            if worker is not None:
                cpu = worker.cpu()
                worker.stop()
                self.drain_cpu_s += cpu
        return n - before, time.monotonic() - t0

    def cpu(self) -> dict[str, float]:
        return {k: p.cpu() for k, p in self.procs.items()}


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    proxy_cores: set[int] | None
    load_cores: set[int] | None
    upstream: Proc | None = None
    upstream_url: str = ""
    bodies: dict[str, Path] = field(default_factory=dict)
    bench_procs: list[Proc] = field(default_factory=list)  # every process we run, for foreign CPU

    # sizes ----------------------------------------------------------------------------------
    @property
    def seconds(self) -> float:
        return float(self.args.seconds or (3.0 if self.args.quick else 8.0))

    @property
    def c1_requests(self) -> int:
        return 300 if self.args.quick else 1000

    @property
    def rounds(self) -> int:
        return int(self.args.rounds or (1 if self.args.quick else 3))

    @property
    def ttfb_requests(self) -> int:
        return 20 if self.args.quick else 100

    # setup ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def upstream_running(self) -> Iterator[None]:
        """The fake upstream for the duration of the block (stateless: stopped without a drain)."""
        try:
            self.start_upstream()
            yield
        finally:
            if self.upstream is not None:
                self.upstream.stop(5.0, signal.SIGTERM)

    def start_upstream(self) -> None:
        port = free_port()
        self.upstream = spawn(
            "upstream",
            [
                sys.executable,
                "-m",
                "llmtap.cli",
                "fake-upstream",
                "--port",
                str(port),
                "--record-limit",
                "0",
            ],
            self.workdir,
            self.load_cores,
        )
        self.upstream_url = f"http://127.0.0.1:{port}"
        wait_ready(self.upstream, self.upstream_url + "/healthz")
        self.bench_procs.append(self.upstream)
        progress(f"fake upstream on {self.upstream_url} (pid {self.upstream.pid}, core {self.upstream.core})")
        for name, stream in (("chat", False), ("stream", True)):
            prompt = STREAM_PROMPT if stream else PROMPT
            body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
            if stream:
                body["stream"] = True
            path = self.workdir / f"{name}.json"
            path.write_bytes(json.dumps(body, separators=(",", ":")).encode())
            self.bodies[name] = path

    def llmtap_env(self, data_dir: Path, gw_port: int, srv_port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")}
        env.update(
            LLMTAP_HOST="127.0.0.1",
            LLMTAP_GATEWAY_PORT=str(gw_port),
            LLMTAP_SERVER_PORT=str(srv_port),
            LLMTAP_DATA_DIR=str(data_dir),
            LLMTAP_OPENAI_BASE_URL=self.upstream_url,
            LLMTAP_ANTHROPIC_BASE_URL=self.upstream_url,
        )
        for kv in self.args.env:
            k, _, v = kv.partition("=")
            env[k] = v
        return env

    def start_variant(self, name: str, profile_to: Path | None = None) -> Variant:
        py = sys.executable
        if name == "direct":
            assert self.upstream is not None
            return Variant(name, self.upstream_url)
        if name == "passthrough":
            port = free_port()
            p = spawn(
                "passthrough",
                [py, str(HERE / "passthrough.py"), "--port", str(port), "--upstream", self.upstream_url],
                self.workdir,
                self.proxy_cores,
            )
            wait_ready(p, f"http://127.0.0.1:{port}/healthz")
            return Variant(name, f"http://127.0.0.1:{port}/openai", {"proxy": p})
        data = Path(tempfile.mkdtemp(prefix=f"data-{name}-", dir=self.workdir))
        gw, srv = free_port(), free_port()
        env = self.llmtap_env(data, gw, srv)
        cli = [py, "-m", "llmtap.cli"]
        if profile_to is not None:
            cli = [py, "-c", PROFILE_BOOT, str(profile_to)]
        v = Variant(name, f"http://127.0.0.1:{gw}/openai", stats_url=f"http://127.0.0.1:{srv}/api/v1/stats")
        v.logdir = data
        if name in ("up", "profile"):
            p = spawn(f"llmtap-{name}", [*cli, "up"], self.workdir, self.proxy_cores, env)
            v.procs["proxy"] = p
            wait_ready(p, f"http://127.0.0.1:{gw}/healthz")
            wait_ready(p, f"http://127.0.0.1:{srv}/healthz")
        elif name == "gateway":
            v.procs["gateway"] = spawn(
                "llmtap-gateway-alone", [*cli, "gateway"], self.workdir, self.proxy_cores, env
            )
            v.procs["server"] = spawn(
                "llmtap-server-alone", [*cli, "server"], self.workdir, self.proxy_cores, env
            )
            wait_ready(v.procs["server"], f"http://127.0.0.1:{srv}/healthz")
            wait_ready(v.procs["gateway"], f"http://127.0.0.1:{gw}/healthz")
            v.drain = lambda: spawn(
                "llmtap-worker-drain", [*cli, "worker"], self.workdir, self.proxy_cores, env
            )
        elif name == "split":
            # Order as `llmtap up` starts them: consumer and API first, the gateway last.
            for part in ("worker", "server", "gateway"):
                v.procs[part] = spawn(f"llmtap-{part}", [*cli, part], self.workdir, self.proxy_cores, env)
                if part == "worker":
                    time.sleep(0.5)
                    if not v.procs[part].alive():
                        raise SystemExit(f"llmtap worker exited at start:\n{v.procs[part].tail()}")
            wait_ready(v.procs["server"], f"http://127.0.0.1:{srv}/healthz")
            wait_ready(v.procs["gateway"], f"http://127.0.0.1:{gw}/healthz")
        else:
            raise ValueError(name)
        return v

    # measurement ----------------------------------------------------------------------------
    def measure_wrk(
        self, v: Variant, label: str, body: str, conns: int, mode: str, value: float
    ) -> dict[str, Any]:
        assert self.upstream is not None
        what = f"{value:g} s" if mode == "seconds" else f"{int(value)} requests"
        progress(f"{v.name}: {label} (wrk -c{conns}, {what})")
        url = f"{v.base}/v1/chat/completions"
        others = [p for p in self.bench_procs if p not in v.procs.values() and p is not self.upstream]
        sys0, me0, oth0 = system_cpu(), self_cpu(), sum(p.cpu() for p in others)
        cpu0, up0, t0 = v.cpu(), self.upstream.cpu(), time.monotonic()
        w = run_wrk(url, self.bodies[body], conns, mode, value, "/healthz")
        wall = time.monotonic() - t0
        cpu1, up1 = v.cpu(), self.upstream.cpu()
        sys1, me1, oth1 = system_cpu(), self_cpu(), sum(p.cpu() for p in others)
        ours = sum(cpu1[k] - cpu0[k] for k in cpu0) + (up1 - up0) + w.client_cpu + (me1 - me0)
        ours += oth1 - oth0  # the idle variants (e.g. a worker's polling) are ours, not foreign
        # CPU used on this machine by anything but the benchmark (other jobs, kernel threads): with
        # 2 cores, a few tens of percent of it already moves throughput numbers.
        foreign = max(0.0, (sys1[0] - sys0[0]) - ours)
        steal = sys1[1] - sys0[1]
        v.expected += w.sent
        out: dict[str, Any] = {
            "sent": w.sent,
            "ok": w.ok,
            "errors": w.errors(),
            "fillers": int(w.raw["fillers"]),
            "seconds": round(w.seconds, 3),
            "rps": round(w.rps, 1),
            "p50_ms": w.raw["lat_p50_us"] / 1000,
            "p90_ms": w.raw["lat_p90_us"] / 1000,
            "p99_ms": w.raw["lat_p99_us"] / 1000,
            "max_ms": w.raw["lat_max_us"] / 1000,
            # Where the CPU went during the load (share of one core each): shows which side saturated.
            "util_pct": {k: round(100 * (cpu1[k] - cpu0[k]) / wall, 1) for k in cpu0},
            "upstream_util_pct": round(100 * (up1 - up0) / wall, 1),
            "wrk_util_pct": round(100 * w.client_cpu / wall, 1),
            "foreign_util_pct": round(100 * foreign / wall, 1),
            "steal_pct": round(100 * steal / wall, 1),
        }
        if out["foreign_util_pct"] > 10 or out["steal_pct"] > 5:
            progress(
                f"  NOTE: other work used {out['foreign_util_pct']:.0f}% of a core during this run "
                f"(steal {out['steal_pct']:.0f}%); throughput and latency are disturbed"
            )
        if w.errors():
            progress(f"  WARNING: {w.errors()} failed chat requests in this run: {w.raw}")
        catch_up = 0.0
        if v.logs:
            stored, catch_up = v.wait_stored(w.sent, self.args.catch_up_timeout)
            out["stored"] = stored
            if stored != w.sent:
                progress(f"  WARNING: stored {stored} of {w.sent} after {catch_up:.0f}s")
        cpu2 = v.cpu()
        out["catch_up_s"] = round(catch_up, 2)
        if cpu2:
            per_proc = {k: (cpu2[k] - cpu0[k]) for k in cpu2}
            out["cpu_s"] = {k: round(x, 3) for k, x in per_proc.items()}
            out["cpu_s_per_1k"] = round(1000 * sum(per_proc.values()) / max(w.sent, 1), 3)
            out["cpu_s_per_1k_by_proc"] = {
                k: round(1000 * x / max(w.sent, 1), 3) for k, x in per_proc.items()
            }
            out["catch_up_cpu_s"] = round(sum(cpu2[k] - cpu1[k] for k in cpu2), 3)
        msg = f"  {w.rps:8.0f} rps  p50 {out['p50_ms']:.2f} ms  p99 {out['p99_ms']:.2f} ms"
        if "cpu_s_per_1k" in out:
            msg += f"  cpu {out['cpu_s_per_1k']:.3f} s/1k"
        if v.logs:
            msg += f"  stored {out['stored']}/{w.sent} (caught up in {catch_up:.1f}s)"
        progress(msg)
        return out

    def measure_ttfb(self, v: Variant) -> dict[str, Any]:
        n, delay, chunks = self.ttfb_requests, self.args.chunk_delay_ms, 2
        progress(f"{v.name}: streaming time to first byte ({n} sequential slow streams, {delay} ms/event)")
        body = self.bodies["stream"].read_bytes()
        res = asyncio.run(_ttfb(f"{v.base}/v1/chat/completions", body, n, delay, chunks))
        v.expected += n
        if v.logs:
            res["stored"], res["catch_up_s"] = v.wait_stored(n, self.args.catch_up_timeout)
        progress(f"  ttfb p50 {res['ttfb_p50_ms']:.2f} ms  p99 {res['ttfb_p99_ms']:.2f} ms")
        return res

    def run_all(self, names: Sequence[str]) -> dict[str, Any]:
        """Start every variant at once, then run each phase on each variant in turn, `rounds` times.

        Interleaving (rather than variant after variant) spreads any background load on the
        machine evenly over the variants; medians over the rounds are what the report shows.
        """
        vs: dict[str, Variant] = {}
        # Rough plan: loads, ~1.5 s per c1 run, ~0.1 s per slow stream, ~1 s catch-up per llmtap run.
        eta = len(names) * (
            (1 if self.args.quick else 2)
            + self.rounds * (2 * self.seconds + 1.5 + 2)
            + self.ttfb_requests * 0.1
        )
        progress(
            f"plan: {len(names)} variants x {self.rounds} round(s) of c1 ({self.c1_requests} requests), "
            f"chat and stream ({self.seconds:g} s each), then {self.ttfb_requests} slow streams each; "
            f"about {eta / 60:.0f} min"
        )
        try:
            for n in names:
                progress(f"starting {n}")
                vs[n] = self.start_variant(n)
                self.bench_procs += list(vs[n].procs.values())
            res: dict[str, Any] = {
                n: {
                    "processes": {k: {"pid": p.pid, "core": p.core} for k, p in v.procs.items()},
                    "runs": {"warmup": [], "c1": [], "c64": [], "stream": []},
                }
                for n, v in vs.items()
            }
            warm = 1.0 if self.args.quick else 2.0
            for n in names:
                res[n]["runs"]["warmup"].append(
                    self.measure_wrk(vs[n], "warm-up", "chat", 64, "seconds", warm)
                )
            phases = load_phases(self.c1_requests, self.seconds)
            for rnd in range(self.rounds):
                k = rnd % len(names)
                order = [*names[k:], *names[:k]]  # rotate so no variant always runs first
                for phase, label, body, conns, mode, value in phases:
                    for n in order:
                        res[n]["runs"][phase].append(
                            self.measure_wrk(
                                vs[n], f"{label}, round {rnd + 1}/{self.rounds}", body, conns, mode, value
                            )
                        )
            for n in names:
                res[n]["ttfb"] = self.measure_ttfb(vs[n])
            for n in names:
                for phase in ("c1", "c64", "stream"):
                    res[n][phase] = summarize(res[n]["runs"][phase])
                v = vs[n]
                if v.logs:
                    stored = v.stored()  # every row, once: the final check
                    res[n]["logged"] = {"stored": stored, "sent": v.expected}
                    if v.drain is not None:
                        res[n]["logged"]["drain_worker_cpu_s"] = round(v.drain_cpu_s, 2)
                    if v.logdir is not None:
                        res[n]["data_dir"] = dir_usage(v.logdir)
                    progress(f"{n}: logged {stored}/{v.expected}")
            return res
        finally:
            for v in reversed(list(vs.values())):
                for p in reversed(list(v.procs.values())):
                    p.stop()
            self.bench_procs = [p for p in self.bench_procs if p.alive()]
            progress("stopped all variants")

    def run_profile(self) -> dict[str, Any]:
        """`llmtap up` under cProfile: the same loads, then the top functions by own time."""
        import pstats

        prof = self.workdir / "llmtap-up.prof"
        progress("== profile: llmtap up under cProfile (numbers here are slowed by the profiler)")
        v = self.start_variant("profile", profile_to=prof)
        try:
            proc = v.procs["proxy"]
            proc.name = "llmtap-up (cProfile)"
            threads0, cpu0 = thread_cpu(proc.pid), proc.cpu()  # main = the event loop's thread
            proc.popen.send_signal(signal.SIGUSR1)
            res: dict[str, Any] = {}
            if self.args.profile_load in ("chat", "both"):
                res["c64"] = self.measure_wrk(v, "profiled non-stream", "chat", 64, "seconds", self.seconds)
            if self.args.profile_load in ("stream", "both"):
                res["stream"] = self.measure_wrk(v, "profiled stream", "stream", 64, "seconds", self.seconds)
            proc.popen.send_signal(signal.SIGUSR2)
            threads1, cpu1 = thread_cpu(proc.pid), proc.cpu()
            res["process_cpu_s"] = round(cpu1 - cpu0, 2)
        finally:
            v.procs["proxy"].stop(60)
        main_s = threads1["main"] - threads0["main"]
        # Executor threads come and go (their CPU vanishes from /proc when they exit), so the
        # other threads' share is the process total minus the event loop's.
        res["thread_cpu_s"] = {
            "event loop": round(main_s, 2),
            "other threads": round(res["process_cpu_s"] - main_s, 2),
        }
        if not prof.exists():
            progress(f"no profile written ({prof}); llmtap did not exit cleanly:\n{v.procs['proxy'].tail()}")
            return res
        dest = Path(self.args.profile_out).resolve()
        shutil.copyfile(prof, dest)
        res["prof_file"] = str(dest)
        st = pstats.Stats(str(prof))
        total = sum(t[2] for t in st.stats.values())  # type: ignore[attr-defined]
        rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
        top = []
        for (file, line, fn), (_cc, nc, tt, ct, _callers) in rows[: self.args.profile_top]:
            where = f"{shorten(file)}:{line}({fn})"
            top.append({"function": where, "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)})
        res["profiled_main_thread_s"] = round(total, 2)
        res["top_by_own_time"] = top
        areas = []
        for label, file_part, fn_name in PROFILE_AREAS:
            cum = sum(
                s[3]
                for (f, _ln, fn), s in st.stats.items()  # type: ignore[attr-defined]
                if fn == fn_name and f.endswith(file_part)
            )
            areas.append(
                {"area": label, "cumtime_s": round(cum, 3), "pct": round(100 * cum / max(total, 1e-9), 1)}
            )
        res["areas"] = areas
        llm = sorted(
            ((k, s) for k, s in st.stats.items() if "/llmtap/" in k[0]),  # type: ignore[attr-defined]
            key=lambda kv: kv[1][3],
            reverse=True,
        )
        res["llmtap_by_cumulative"] = [
            {
                "function": f"{shorten(f)}:{ln}({fn})",
                "calls": s[1],
                "tottime_s": round(s[2], 3),
                "cumtime_s": round(s[3], 3),
            }
            for (f, ln, fn), s in llm[: self.args.profile_top]
        ]
        return res


# Task roots on llmtap's event loop (they do not nest), to say where its thread's CPU went.
PROFILE_AREAS = (
    ("gateway: relaying requests (Proxy.handle)", "llmtap/gateway/proxy.py", "handle"),
    ("gateway: building + publishing records (Publisher._run)", "llmtap/gateway/publisher.py", "_run"),
    ("worker: fetch, handler chain, ack (WorkerService._run)", "llmtap/worker/worker.py", "_run"),
    ("aiohttp server: parsing requests (data_received)", "aiohttp/web_protocol.py", "data_received"),
    ("aiohttp client: parsing upstream answers (data_received)", "aiohttp/client_proto.py", "data_received"),
)


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of every number (and of every number in nested dicts) over the rounds' runs."""

    def med(key: str, vals: list[Any]) -> Any:
        if isinstance(vals[0], dict):
            return {k: med(k, [v[k] for v in vals if k in v]) for k in vals[0]}
        if key in ("sent", "ok", "errors", "fillers"):
            return sum(vals)
        if key == "stored":
            return sum(vals)
        return round(statistics.median(vals), 3)

    out = {k: med(k, [r[k] for r in runs if k in r]) for k in runs[0]}
    out["rounds"] = len(runs)
    out["rps_min"] = min(r["rps"] for r in runs)
    out["rps_max"] = max(r["rps"] for r in runs)
    if "cpu_s_per_1k" in runs[0]:
        out["cpu_s_per_1k_min"] = min(r["cpu_s_per_1k"] for r in runs)
    return out


def shorten(path: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# -- report -----------------------------------------------------------------------------------


def fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def util(u: dict[str, float]) -> str:
    if not u:
        return "-"
    if len(u) == 1:
        return f"{next(iter(u.values())):.0f}"
    return " ".join(f"{k[:2]} {x:.0f}" for k, x in u.items())  # gateway/worker/server: ga/wo/se


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(
        h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    out = [title, line, "-" * len(line)]
    for r in rows:
        out.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    return "\n".join(out)


def report(results: dict[str, Any]) -> str:
    v = results["variants"]
    names = [n for n in VARIANTS if n in v]
    d = v.get("direct")
    out: list[str] = []

    def added(name: str, phase: str, key: str) -> str:
        if d is None or name == "direct":
            return "-"
        return f"{v[name][phase][key] - d[phase][key]:+.2f}"

    rows = []
    for n in names:
        r = v[n]
        rows.append(
            [
                n,
                fmt(r["c1"]["p50_ms"], 3),
                fmt(r["c1"]["p99_ms"], 3),
                added(n, "c1", "p50_ms"),
                added(n, "c1", "p99_ms"),
                fmt(r["c64"]["p50_ms"]),
                fmt(r["c64"]["p99_ms"]),
                added(n, "c64", "p50_ms"),
                added(n, "c64", "p99_ms"),
            ]
        )
    out.append(
        table(
            "Latency, non-streaming chat (ms; 'added' = minus direct; c64 is at saturation, so queueing)",
            ["variant", "c1 p50", "c1 p99", "+p50", "+p99", "c64 p50", "c64 p99", "+p50", "+p99"],
            rows,
        )
    )

    rows = []
    for n in names:
        r = v[n]
        rows.append(
            [
                n,
                f"{r['c64']['rps']:.0f}",
                f"{r['c64']['rps_min']:.0f}-{r['c64']['rps_max']:.0f}",
                f"{r['stream']['rps']:.0f}",
                f"{r['stream']['rps_min']:.0f}-{r['stream']['rps_max']:.0f}",
                util(r["c64"]["util_pct"]),
                f"{r['c64']['upstream_util_pct']:.0f}+{r['c64']['wrk_util_pct']:.0f}",
                util(r["stream"]["util_pct"]),
                f"{r['stream']['upstream_util_pct']:.0f}+{r['stream']['wrk_util_pct']:.0f}",
                f"{max(r['c64']['foreign_util_pct'], r['stream']['foreign_util_pct']):.0f}",
            ]
        )
    out.append(
        table(
            "Max throughput (wrk -t1 -c64; median and range over rounds; util = % of one core; "
            "(s) = stream; other = CPU % used by anything else on the machine)",
            [
                "variant",
                "chat rps",
                "range",
                "stream rps",
                "range",
                "proxy util",
                "upstr+wrk",
                "proxy util(s)",
                "upstr+wrk(s)",
                "other",
            ],
            rows,
        )
    )

    rows = []
    for n in names:
        r = v[n]
        if "cpu_s_per_1k" not in r["c64"]:
            continue

        def by(phase: str, r: dict[str, Any] = r) -> str:
            parts = r[phase]["cpu_s_per_1k_by_proc"]
            return " + ".join(f"{k} {x:.3f}" for k, x in parts.items()) if len(parts) > 1 else ""

        rows.append(
            [
                n,
                fmt(r["c1"]["cpu_s_per_1k"], 3),
                fmt(r["c64"]["cpu_s_per_1k"], 3),
                fmt(r["stream"]["cpu_s_per_1k"], 3),
                fmt(r["c64"]["catch_up_s"], 1),
                by("c64"),
            ]
        )
    if rows:
        out.append(
            table(
                "CPU seconds per 1,000 requests of the proxy process(es), storage catch-up included "
                "(but for `gateway`, whose worker runs between loads: see its logged line)",
                ["variant", "c1", "c64 chat", "c64 stream", "catch-up s", "c64 chat by process"],
                rows,
            )
        )

    rows = []
    for n in names:
        t = v[n]["ttfb"]
        dt = d["ttfb"] if d else None
        rows.append(
            [
                n,
                fmt(t["ttfb_p50_ms"]),
                fmt(t["ttfb_p99_ms"]),
                "-" if dt is None or n == "direct" else f"{t['ttfb_p50_ms'] - dt['ttfb_p50_ms']:+.2f}",
                "-" if dt is None or n == "direct" else f"{t['ttfb_p99_ms'] - dt['ttfb_p99_ms']:+.2f}",
                fmt(t["total_p50_ms"], 1),
                f"{t['reads_p50']:g}",
            ]
        )
    out.append(
        table(
            f"Streaming time to first byte (slow stream, {results['config']['chunk_delay_ms']} ms between "
            "events; a buffering proxy would show TTFB ~ total)",
            ["variant", "ttfb p50", "ttfb p99", "+p50", "+p99", "total p50", "reads"],
            rows,
        )
    )

    rat = results.get("ratios", {})
    if rat:
        rows = []
        for label, key, target, ok_if_low in (
            ("CPU/1k chat, up ÷ passthrough", "cpu_chat", CPU_RATIO_TARGET, True),
            ("CPU/1k stream, up ÷ passthrough", "cpu_stream", STREAM_CPU_RATIO_TARGET, True),
            ("max rps chat, up ÷ passthrough", "rps_chat", RPS_RATIO_TARGET, False),
            ("max rps stream, up ÷ passthrough", "rps_stream", RPS_RATIO_TARGET, False),
            ("CPU/1k chat, split (all) ÷ passthrough", "split_cpu_chat", None, True),
            ("CPU/1k chat, split gateway ÷ passthrough", "split_gw_cpu_chat", None, True),
            ("max rps chat, split ÷ passthrough", "split_rps_chat", None, False),
            ("CPU/1k chat, gateway alone ÷ passthrough", "gw_cpu_chat", GATEWAY_CPU_TARGET, True),
            ("CPU/1k stream, gateway alone ÷ passthrough", "gw_cpu_stream", None, True),
            ("max rps chat, gateway alone ÷ passthrough", "gw_rps_chat", None, False),
        ):
            if key not in rat:
                continue
            x, best = rat[key], rat.get("best_" + key)
            if target is None:
                verdict, tgt = "", ""
            else:

                def met(val: float, target: float = target, ok_if_low: bool = ok_if_low) -> bool:
                    return val <= target if ok_if_low else val >= target

                verdict = "met" if met(x) else "MISSED"
                if best is not None and met(best) != met(x):
                    verdict += " (best rounds: " + ("met" if met(best) else "missed") + ")"
                tgt = ("≤ " if ok_if_low else "≥ ") + f"{target:g}"
            rows.append([label, f"{x:.3f}", "-" if best is None else f"{best:.3f}", tgt, verdict])
        out.append(
            table(
                "Ratios against the passthrough (same run; median rounds, and best round of each side)",
                ["ratio", "median", "best", "target", "verdict (median)"],
                rows,
            )
        )

    logged = []
    for n in names:
        lg = v[n].get("logged")
        if lg:
            ok = "OK" if lg["stored"] == lg["sent"] else "MISMATCH"
            line = f"{n}: logged {lg['stored']}/{lg['sent']} {ok} (rows in the store / requests sent)"
            if "drain_worker_cpu_s" in lg:
                line += (
                    f"; its worker, between loads: {lg['drain_worker_cpu_s']:.1f} s CPU "
                    f"({1000 * lg['drain_worker_cpu_s'] / max(lg['sent'], 1):.3f} s/1k, start-ups included)"
                )
            du = v[n].get("data_dir")
            if du:
                line += (
                    f"; data dir {du['bytes_on_disk'] / 2**20:.0f} MiB in {du['files']} files "
                    f"({du['bytes_on_disk'] / max(lg['sent'], 1):.0f} B and "
                    f"{du['files'] / max(lg['sent'], 1):.2f} files per request)"
                )
            logged.append(line)
    if logged:
        out.append("\n".join(logged))
    return "\n\n".join(out)


def ratios(v: dict[str, Any]) -> dict[str, float]:
    """llmtap against the passthrough, from the medians and (`best_*`) from each side's best round.

    Interference from other work on the machine only ever makes a round slower, so the best
    rounds are the least disturbed estimate; the medians are shown beside them.
    """
    r: dict[str, float] = {}
    pt = v.get("passthrough")
    if pt is None:
        return r
    for name, prefix in (("up", ""), ("split", "split_")):
        x = v.get(name)
        if x is None:
            continue
        for phase, kind in (("c64", "chat"), ("stream", "stream")):
            a, b = x[phase], pt[phase]
            r[f"{prefix}cpu_{kind}"] = a["cpu_s_per_1k"] / b["cpu_s_per_1k"]
            r[f"{prefix}rps_{kind}"] = a["rps"] / b["rps"]
            r[f"best_{prefix}cpu_{kind}"] = a["cpu_s_per_1k_min"] / b["cpu_s_per_1k_min"]
            r[f"best_{prefix}rps_{kind}"] = a["rps_max"] / b["rps_max"]
        if name == "split":
            gw = [run["cpu_s_per_1k_by_proc"]["gateway"] for run in x["runs"]["c64"]]
            r["split_gw_cpu_chat"] = statistics.median(gw) / pt["c64"]["cpu_s_per_1k"]
            r["best_split_gw_cpu_chat"] = min(gw) / pt["c64"]["cpu_s_per_1k_min"]
    g = v.get("gateway")
    if g is not None:  # the gateway process alone (the idle server beside it not counted)
        for phase, kind in (("c64", "chat"), ("stream", "stream")):
            gw = [run["cpu_s_per_1k_by_proc"]["gateway"] for run in g["runs"][phase]]
            r[f"gw_cpu_{kind}"] = statistics.median(gw) / pt[phase]["cpu_s_per_1k"]
            r[f"best_gw_cpu_{kind}"] = min(gw) / pt[phase]["cpu_s_per_1k_min"]
            r[f"gw_rps_{kind}"] = g[phase]["rps"] / pt[phase]["rps"]
            r[f"best_gw_rps_{kind}"] = g[phase]["rps_max"] / pt[phase]["rps_max"]
    return {k: round(val, 3) for k, val in r.items()}


def profile_report(p: dict[str, Any]) -> str:
    out = [
        "Profile of `llmtap up`: cProfile timed by the event-loop thread's own CPU clock (other "
        "threads are in the per-thread line only); the profiler slows everything down",
        f"  profile file: {p.get('prof_file', '-')}   (python -m pstats FILE, or snakeviz FILE)",
        f"  process CPU during the profiled loads: {p.get('process_cpu_s', '-')} s: "
        + ", ".join(f"{k} {x} s" for k, x in p.get("thread_cpu_s", {}).items()),
        f"  event-loop thread, profiled: {p.get('profiled_main_thread_s', '-')} s",
    ]
    for a in p.get("areas", []):
        out.append(f"    {a['pct']:5.1f}%  {a['cumtime_s']:8.3f} s  {a['area']}")
    for key, title in (
        ("top_by_own_time", "top by own time"),
        ("llmtap_by_cumulative", "llmtap by cumulative"),
    ):
        rows = p.get(key)
        if not rows:
            continue
        out.append("")
        out.append(
            table(
                f"  {title}",
                ["function", "calls", "own s", "cum s"],
                [
                    [r["function"][-90:], str(r["calls"]), f"{r['tottime_s']:.3f}", f"{r['cumtime_s']:.3f}"]
                    for r in rows
                ],
            )
        )
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------------


def pick_cores(no_pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """Proxy on one core, upstream + load generator on another, the same for every variant."""
    cores = sorted(os.sched_getaffinity(0))
    if no_pin or len(cores) < 2:
        return None, None
    return {cores[0]}, {cores[1]}


def preflight() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit(
            "wrk not found. Install it (Debian/Ubuntu, as root): apt-get update && apt-get install -y wrk"
        )
    try:
        import aiohttp  # noqa: F401

        import llmtap  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"{e}: run this with the project's venv, e.g. .venv/bin/python bench/bench_gateway.py"
        ) from None


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="llmtap-bench-"))
    try:
        yield path
    finally:
        if keep:
            progress(f"kept {path} (process logs, data dirs)")
        else:
            shutil.rmtree(path, ignore_errors=True)


SESSION_MARK = "_BENCH_GATEWAY_OWN_SESSION"


def rerun_in_own_session() -> int:
    """Run this script again as the leader of a new session, and wait for it.

    The kernel's autogroup is per session: raising its priority from the caller's session would
    leave the caller's shell, and everything it starts later, at that priority. A session of our
    own ends with the benchmark. SIGINT/SIGTERM are passed on, so Ctrl-C still stops it cleanly.
    """
    child: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child:
            child[0].send_signal(signum)
        else:
            pending.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    child.append(
        subprocess.Popen(
            [sys.executable, *sys.argv], env={**os.environ, SESSION_MARK: "1"}, start_new_session=True
        )
    )
    for signum in pending:
        child[0].send_signal(signum)
    return child[0].wait()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short runs (3 s loads, fewer requests)")
    ap.add_argument("--seconds", type=float, help="length of each max-throughput run (default 10, quick 3)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds of each phase (default 3, quick 1)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    ap.add_argument("--profile", action="store_true", help="also run `llmtap up` under cProfile and report")
    ap.add_argument("--profile-out", default="llmtap-up.prof", help="where --profile saves the .prof file")
    ap.add_argument(
        "--profile-load", choices=("chat", "stream", "both"), default="both", help="load(s) to profile under"
    )
    ap.add_argument("--profile-top", type=int, default=25, help="functions to list per profile table")
    ap.add_argument("--chunk-delay-ms", type=int, default=20, help="delay between events of the TTFB stream")
    ap.add_argument("--catch-up-timeout", type=float, default=180.0, help="max seconds to wait for storage")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra env for llmtap (repeat)")
    ap.add_argument(
        "--nice", type=int, default=-10, help="niceness for all benchmark processes (root; 0 = off)"
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (process logs, data dirs)")
    args = ap.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) must unwind like Ctrl-C so that every process we started is
    # stopped; and SIGINT may arrive ignored from a non-interactive shell's background job.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    preflight()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    for n in names:
        if n not in VARIANTS:
            ap.error(f"unknown variant {n!r}")
    if args.nice and os.geteuid() == 0:
        if os.environ.get(SESSION_MARK) != "1":
            return rerun_in_own_session()
        # Inherited by every process started here: on a shared machine the benchmark then wins
        # the CPU from ordinary jobs instead of measuring their time slices. No effect when idle.
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        with contextlib.suppress(OSError):  # with autogroups, nice only counts inside the session
            Path("/proc/self/autogroup").write_text(str(args.nice))
    proxy_cores, load_cores = pick_cores(args.no_pin)
    if load_cores:
        os.sched_setaffinity(0, load_cores)  # this script is a client too (TTFB, polling)
    cpu_model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        "?",
    )
    results: dict[str, Any] = {
        "config": {
            "quick": args.quick,
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model,
            "proxy_cores": sorted(proxy_cores) if proxy_cores else None,
            "load_cores": sorted(load_cores) if load_cores else None,
            "chunk_delay_ms": args.chunk_delay_ms,
            "python": sys.version.split()[0],
            "env": args.env,
        },
        "variants": {},
    }
    progress(
        f"pinning: proxies on cores {results['config']['proxy_cores']}, "
        f"upstream + wrk + this script on {results['config']['load_cores']}"
    )
    with workdir(args.keep) as wd:
        b = Bench(args, wd, proxy_cores, load_cores)
        with b.upstream_running():
            results["variants"] = b.run_all(names)
            results["ratios"] = ratios(results["variants"])
            if args.profile:
                results["profile"] = b.run_profile()
        # Report before the work dir goes: llmtap leaves a body file per request to delete.
        print()
        print(report(results))
        if "profile" in results:
            print()
            print(profile_report(results["profile"]))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
            progress(f"wrote {args.json}")
        if not args.keep:
            progress("removing the work dir (stores and body files)...")
    bad = [
        n
        for n, r in results["variants"].items()
        if r.get("logged") and r["logged"]["stored"] != r["logged"]["sent"]
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; every process the benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)
