"""Issue 15 spike: what would `llmtap up` cost with a Rust relay and the logging left in Python?

A measurement, not a product change. `serve` runs `llmtap up` as the CLI does (`llmtap.cli._serve`
with the same services, settings, uvloop, gc freeze) but for one swap: the gateway's requests go
through `bench/spike_capture` (a PyO3 extension: hyper 1 server + hyper-util pooled client on one
current-thread tokio runtime, on an OS thread of its own). No Python runs per request. For each
finished request the relay keeps the facts `llmtap.gateway.capture.Capture` holds and hands them
over in batches; Python turns each into a real `Capture` and `Publisher.submit`s it, and from
there everything is llmtap's own: `RecordBuilder`, the SQLite queue (with the ingest and spool
fallbacks), the worker (store with rollups and search, body files) and the API, in one process.
(The aiohttp gateway of `GatewayService` still starts, on its own port, and idles: it is the
cheapest way to reuse the service's queue, sinks, spool replayer and shutdown order as they are.)

Hand-over (`--wake`): `fd` (default): the relay writes one byte to a socketpair when its list of
finished captures goes from empty to non-empty; the asyncio loop watches the other end
(`loop.add_reader`) and takes the whole list (`Relay.drain`). `thread`: a Python thread blocks in
`Relay.next_batch` with the GIL released and passes each batch to the loop with
`call_soon_threadsafe` (a second thread, a GIL hand-over and the loop's self-pipe per batch).

    (cd bench/spike_capture && maturin build --release)         # or: cargo build --release
    .venv/bin/python bench/spike_capture.py check               # correctness against `llmtap up`
    .venv/bin/python bench/spike_capture.py bench --rounds 3    # passthrough, up, rust-up: ~5 min
    .venv/bin/python bench/spike_capture.py bench --variants passthrough,up,rust-up,rust-up-thread
    LLMTAP_...=... .venv/bin/python bench/spike_capture.py serve  # the stack alone (SPIKE_RELAY_PORT)

`bench` reuses bench_gateway.py's helpers: processes, pinning and priority, wrk loads with exact
counts (`measure_wrk`), CPU from /proc until the store holds every request of a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CRATE = HERE / "spike_capture"
RUST = {"rust-up": "fd", "rust-up-thread": "thread"}
VARIANTS = ("passthrough", "up", "rust-up", "rust-up-thread")
DEFAULT_VARIANTS = "passthrough,up,rust-up"


# -- the extension ---------------------------------------------------------------------------------


def load_ext() -> Any:
    """`_spike_capture` from the crate's target dir (built by hand; never installed)."""
    so = None
    for cand in (CRATE / "target" / "release" / "lib_spike_capture.so",):
        if cand.exists():
            so = cand
    if so is None:
        raise SystemExit(f"build the extension first: (cd {CRATE} && maturin build --release)")
    pydir = CRATE / "target" / "py"
    pydir.mkdir(exist_ok=True)
    link = pydir / "_spike_capture.abi3.so"
    if not link.exists():
        link.symlink_to(so)
    sys.path.insert(0, str(pydir))
    import _spike_capture

    return _spike_capture


def set_thread_name(name: str) -> None:
    """The OS thread's name (comm), so /proc/<pid>/task/*/comm tells the threads apart."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


# -- serve: `llmtap up` with the relay swapped ----------------------------------------------------


def serve() -> None:
    ext = load_ext()
    from llmtap import cli
    from llmtap.config import load_settings
    from llmtap.errors import ConfigError
    from llmtap.gateway import app as gw_app
    from llmtap.gateway.capture import Capture

    wake = os.environ.get("SPIKE_WAKE", "fd")
    relay_port = int(os.environ.get("SPIKE_RELAY_PORT", "0"))

    class RustGatewayService(gw_app.GatewayService):
        """`GatewayService` as it is (queue, sinks, spool, publisher), fed by the Rust relay."""

        async def start(self) -> list[str]:
            lines = await super().start()
            s = self.settings
            if s.multi_tenant:
                raise ConfigError("the spike relay is single-tenant (no Llmtap-Auth key lookup)")
            self.tenant = s.default_tenant
            self.max_bytes = s.max_body_bytes
            self.stats: dict[str, float] = {
                "batches": 0, "captures": 0, "max_batch": 0, "drain_cpu_s": 0.0, "submit_cpu_s": 0.0,
            }  # fmt: skip
            self.relay = ext.Relay(
                openai_base=s.openai_base_url,
                anthropic_base=s.anthropic_base_url,
                host=s.host,
                port=relay_port,
                max_body_bytes=s.max_body_bytes,
                stream_usage=s.openai_stream_usage,
                wake=wake,
            )
            self.loop = asyncio.get_running_loop()
            self._stopping = False
            self._pump: threading.Thread | None = None
            if wake == "fd":
                self.loop.add_reader(self.relay.fileno(), self._on_readable)
            else:
                self._pump = threading.Thread(target=self._pump_run, name="spike-pump", daemon=True)
                self._pump.start()
            return [*lines, f"rust relay http://{s.host}:{self.relay.port}  (wake={wake})"]

        def _on_readable(self) -> None:
            t0 = time.thread_time()
            batch = self.relay.drain()
            self.stats["drain_cpu_s"] += time.thread_time() - t0
            if batch:
                self._submit(batch)

        def _pump_run(self) -> None:
            set_thread_name("spike-pump")
            relay, loop = self.relay, self.loop
            while not self._stopping:
                t0 = time.thread_time()
                batch = relay.next_batch(0.2)
                self.stats["drain_cpu_s"] += time.thread_time() - t0
                if batch:
                    loop.call_soon_threadsafe(self._submit, batch)

        def _submit(self, batch: list[tuple[Any, ...]]) -> None:
            t0 = time.thread_time()
            submit, tenant, mb = self.publisher.submit, self.tenant, self.max_bytes
            for (rid, provider, method, path, target, rq_h, llmtap, body, size, started, t_0, t_h, t_f,
                 t_e, status, rs_h, chunks, rsize, truncated, tail, tail_size, streamed, outcome,
                 error) in batch:  # fmt: skip
                cap = Capture(rid, tenant, provider, method, path, target, rq_h, llmtap, body, size,
                              started, t_0, mb)  # fmt: skip
                cap.t_headers = t_h
                cap.t_first = t_f
                cap.t_end = t_e
                cap.status = status
                cap.response_headers = rs_h
                cap.chunks = chunks
                cap.response_size = rsize
                cap.truncated = truncated
                if tail:
                    cap.tail = deque(tail)
                    cap.tail_size = tail_size
                cap.streamed = streamed
                cap.outcome = outcome
                cap.error = error
                submit(cap)
            st = self.stats
            st["submit_cpu_s"] += time.thread_time() - t0
            st["batches"] += 1
            st["captures"] += len(batch)
            st["max_batch"] = max(st["max_batch"], len(batch))

        async def stop(self) -> None:
            relay = getattr(self, "relay", None)
            if relay is not None:
                self._stopping = True
                if self._pump is None:
                    self.loop.remove_reader(relay.fileno())
                relay.close()  # stops listening; answers in flight get 200 ms
                if self._pump is not None:
                    self._pump.join(1.0)
                    await asyncio.sleep(0)  # run the batches it scheduled
                rest = relay.drain()
                if rest:
                    self._submit(rest)
                pushed, wakes, taken = relay.stats()
                pub = self.publisher
                out = {**self.stats, "relay_pushed": pushed, "relay_wakes": wakes, "relay_batches": taken,
                       "published": pub.published, "publish_batches": pub.batches, "spilled": pub.spilled,
                       "dropped": pub.dropped, "routes": dict(pub.routes)}  # fmt: skip
                print("SPIKE_STATS " + json.dumps(out), flush=True)
            await super().stop()

    gw_app.GatewayService = RustGatewayService  # type: ignore[misc]  # what cli._serve imports
    settings = load_settings(None)
    cli._serve(settings, "up", ["worker", "server", "gateway"])


# -- bench -----------------------------------------------------------------------------------------


def _bg() -> Any:
    import bench_gateway as bg  # bench/ is this script's directory, hence on sys.path

    return bg


VOLATILE = re.compile(rb'"(id|created)": ?("[^"]*"|\d+)')


async def _fetch(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, int]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as r:
        data, reads = b"", 0
        while chunk := await r.content.readany():
            data += chunk
            reads += 1
        return r.status, data, reads


def _norm(x: Any) -> Any:
    """A stored record without what differs by run: ids, times, latencies, the gateway's name."""
    skip = {"id", "started_at", "ended_at", "first_byte_at", "latency_ms", "time_to_first_token_ms",
            "gateway", "created_at", "created", "stored_at", "system_fingerprint", "llmtap-request-id",
            "date", "x-request-id"}  # fmt: skip
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items() if k not in skip}
    if isinstance(x, list):
        return [_norm(v) for v in x]
    if isinstance(x, str):
        return VOLATILE.sub(b"", x.encode()).decode()
    return x


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:160]!r} != {str(b)[:160]!r}"]


def verify(bg: Any, upstream: str, vs: dict[str, Any], bodies: dict[str, Path]) -> dict[str, Any]:
    """Each llmtap variant answers a chat and a stream (openai SDK, user id, a property) as the
    upstream does, and stores the same record as `llmtap up` (the reference) does."""
    import uuid

    import openai

    out: dict[str, Any] = {}
    logging_vs = {n: v for n, v in vs.items() if v.logs}
    recs: dict[str, dict[str, Any]] = {}
    for name, v in logging_vs.items():
        client = openai.OpenAI(
            base_url=v.base + "/v1",
            api_key="sk-spike",
            default_headers={"Llmtap-User-Id": "u-spike", "Llmtap-Property-Feature": "spike-check"},
        )
        ids = {k: str(uuid.uuid4()) for k in ("chat", "stream")}
        msgs = [{"role": "user", "content": "say something about hyper and tokio"}]
        chat = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=msgs, extra_headers={"Llmtap-Request-Id": ids["chat"]}
        )
        answer = chat.parse().choices[0].message.content or ""
        if chat.headers.get("llmtap-request-id") != ids["chat"]:
            raise SystemExit(f"{name}: Llmtap-Request-Id {chat.headers.get('llmtap-request-id')!r} != ours")
        text, usage_chunks = [], 0
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=msgs,
            stream=True,
            extra_headers={"Llmtap-Request-Id": ids["stream"]},
        )
        for ch in stream:
            if not ch.choices:
                usage_chunks += 1
            else:
                text.append(ch.choices[0].delta.content or "")
        if usage_chunks:
            raise SystemExit(f"{name}: the client got {usage_chunks} usage chunk(s) it did not ask for")
        v.expected += 2
        srv = v.stats_url.rsplit("/stats", 1)[0]
        for kind, rid in ids.items():
            deadline = time.monotonic() + 30
            while True:
                status, raw = bg.http_get(f"{srv}/requests/{rid}", 5.0)
                if status == 200:
                    recs.setdefault(kind, {})[name] = json.loads(raw)
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name}: request {rid} not stored after 30 s ({status})")
                time.sleep(0.1)
        keys = ("model", "status", "outcome", "streamed", "prompt_tokens", "completion_tokens",
                "total_tokens", "usage_source", "cost_usd", "user_id", "properties", "route")  # fmt: skip
        r = recs["chat"][name]
        s = recs["stream"][name]
        out[name] = {
            "chat": {k: r.get(k) for k in keys} | {"answer_chars": len(answer)},
            "stream": {k: s.get(k) for k in keys} | {"answer_chars": len("".join(text))},
        }
        for kind, rec in (("chat", r), ("stream", s)):
            # The SDK got the same answer the store holds.
            body = rec.get("response_body") or {}
            stored = ((body.get("choices") or [{}])[0].get("message") or {}).get("content")
            got = answer if kind == "chat" else "".join(text)
            if stored != got:
                raise SystemExit(f"{name}: stored {kind} answer {stored!r} != the one the client got {got!r}")
        # Search (the worker's index): the prompt's word finds both records.
        status, raw = bg.http_get(f"{srv}/requests?q=tokio", 10.0)
        found = {row["id"] for row in json.loads(raw)["items"]} if status == 200 else set()
        out[name]["search_q_tokio"] = {"status": status, "found_both": set(ids.values()) <= found}
        bg.progress(f"{name}: stored chat {out[name]['chat']}")
        bg.progress(f"{name}: stored stream {out[name]['stream']}")
    # The reference: `up`'s records. Every other llmtap variant must store the same fields.
    if "up" in logging_vs:
        for name in logging_vs:
            if name == "up":
                continue
            for kind in ("chat", "stream"):
                d = _diff(_norm(recs[kind]["up"]), _norm(recs[kind][name]))
                out[name][f"{kind}_diff_vs_up"] = d
                if d:
                    bg.progress(f"{name}: {kind} record differs from up's:\n  " + "\n  ".join(d))
                else:
                    bg.progress(f"{name}: {kind} record equals up's (ids, times, latencies aside)")
    # What the client sees: the upstream's bytes (without the usage rewrite), blanked ids aside.
    for kind in ("chat", "stream"):
        body = bodies[kind].read_bytes()
        h = {"Authorization": "Bearer x", "Content-Type": "application/json"}
        if kind == "stream":
            h["x-fake-chunk-delay-ms"] = "20"
        want = asyncio.run(_fetch(upstream + "/v1/chat/completions", body, h))
        for name, v in vs.items():
            got = asyncio.run(_fetch(v.base + "/v1/chat/completions", body, h))
            if v.logs:
                v.expected += 1
            same = got[0] == want[0] and VOLATILE.sub(b"", got[1]) == VOLATILE.sub(b"", want[1])
            if not same or (kind == "stream" and got[2] < 2):
                raise SystemExit(f"{name}: {kind} bytes differ from the upstream's or were buffered:\n"
                                 f"{got[1][:600]!r}\n{want[1][:600]!r}")  # fmt: skip
            out.setdefault(name, {})[f"{kind}_bytes"] = {"bytes": len(got[1]), "reads": got[2]}
            bg.progress(f"{name}: {kind} relayed as the upstream sent it ({len(got[1])} B, {got[2]} reads)")
    return out


def thread_split(bg: Any, pid: int) -> dict[str, float]:
    try:
        return bg.thread_cpu(pid)
    except OSError:
        return {}


#: The 20-chunk stream of the issue's targets (and of capture_cpu.py): chat.lua plus one header,
#: `x-fake-chunks` (the fake upstream then answers with exactly that many content deltas).
CHUNKS_ENV = "SPIKE_FAKE_CHUNKS"


def chunked_lua(bg: Any, workdir: Path) -> Path:
    src = bg.LUA.read_text()
    anchor = 'headers["Authorization"] = "Bearer x"\n'
    assert anchor in src, "bench/wrk/chat.lua changed: update spike_capture.chunked_lua"
    extra = f'  local fc = os.getenv("{CHUNKS_ENV}")\n'
    extra += '  if fc and fc ~= "" then headers["x-fake-chunks"] = fc end\n'
    path = workdir / "chat_chunks.lua"
    path.write_text(src.replace(anchor, anchor + extra))
    return path


def make_bench_cls(bg: Any) -> Any:
    @dataclass
    class CaptureBench(bg.Bench):  # type: ignore[misc,name-defined]
        @property
        def c1_requests(self) -> int:
            return int(self.args.c1_requests)

        def start_variant(self, name: str, profile_to: Path | None = None) -> Any:
            if name not in RUST:
                return super().start_variant(name, profile_to)
            data = Path(tempfile.mkdtemp(prefix=f"data-{name}-", dir=self.workdir))
            gw, srv, relay = bg.free_port(), bg.free_port(), bg.free_port()
            env = self.llmtap_env(data, gw, srv)
            env.update(SPIKE_RELAY_PORT=str(relay), SPIKE_WAKE=RUST[name])
            cmd = [sys.executable, str(Path(__file__).resolve()), "serve"]
            p = bg.spawn(name, cmd, self.workdir, self.proxy_cores, env)
            v = bg.Variant(
                name, f"http://127.0.0.1:{relay}/openai", {"proxy": p},
                stats_url=f"http://127.0.0.1:{srv}/api/v1/stats",
            )  # fmt: skip
            v.logdir = data
            bg.wait_ready(p, f"http://127.0.0.1:{relay}/healthz")
            bg.wait_ready(p, f"http://127.0.0.1:{srv}/healthz")
            return v

        def run(self, names: Sequence[str]) -> dict[str, Any]:
            assert self.upstream is not None
            direct = bg.Variant("direct", self.upstream_url)
            vs: dict[str, Any] = {}
            res: dict[str, Any] = {"direct": {"runs": {"c1": []}}}
            try:
                for n in names:
                    bg.progress(f"starting {n}")
                    vs[n] = self.start_variant(n)
                    self.bench_procs += list(vs[n].procs.values())
                res["verify"] = verify(bg, self.upstream_url, vs, self.bodies)
                if self.args.check_only:
                    return res
                for n in names:
                    res[n] = {"runs": {"warmup": [], "c1": [], "c64": [], "stream": [], "stream20": []}}
                    res[n]["runs"]["warmup"].append(
                        self.measure_wrk(vs[n], "warm-up", "chat", 64, "seconds", 2)
                    )
                threads0 = {n: thread_split(bg, vs[n].procs["proxy"].pid) for n in names}
                bg.LUA = chunked_lua(bg, self.workdir)  # run_wrk reads it at each call
                phases = (
                    *bg.load_phases(self.c1_requests, self.seconds),
                    ("stream20", "20-chunk stream max throughput", "stream", 64, "seconds", self.seconds),
                )
                for rnd in range(self.rounds):
                    k = rnd % len(names)
                    order = [*names[k:], *names[:k]]  # rotate so that no variant always runs first
                    for phase, label, body, conns, mode, value in phases:
                        if phase == "stream20":
                            os.environ[CHUNKS_ENV] = "20"
                        else:
                            os.environ.pop(CHUNKS_ENV, None)
                        targets = [*order, "direct"] if phase == "c1" else order
                        for n in targets:
                            v = direct if n == "direct" else vs[n]
                            lab = f"{label}, round {rnd + 1}/{self.rounds}"
                            res[n]["runs"][phase].append(self.measure_wrk(v, lab, body, conns, mode, value))
                os.environ.pop(CHUNKS_ENV, None)
                for n in names:
                    t1 = thread_split(bg, vs[n].procs["proxy"].pid)
                    t0 = threads0[n]
                    res[n]["thread_cpu_s"] = {k: round(t1[k] - t0.get(k, 0.0), 2) for k in t1}
                    res[n]["measured_sent"] = sum(
                        r["sent"] for ph in ("c1", "c64", "stream", "stream20") for r in res[n]["runs"][ph]
                    )
                for n in ("direct", *names):
                    for phase, runs in res[n]["runs"].items():
                        if phase != "warmup":
                            res[n][phase] = bg.summarize(runs)
                for n in names:
                    v = vs[n]
                    if v.logs:
                        stored = v.stored()
                        res[n]["logged"] = {"stored": stored, "sent": v.expected}
                        bg.progress(f"{n}: logged {stored}/{v.expected}")
                return res
            finally:
                for v in reversed(list(vs.values())):
                    for p in v.procs.values():
                        p.stop()
                for n, v in vs.items():
                    if n in RUST and n in res:
                        log = v.procs["proxy"].log.read_text(errors="replace")
                        for line in log.splitlines():
                            if line.startswith("SPIKE_STATS "):
                                res[n]["handover"] = json.loads(line[len("SPIKE_STATS ") :])
                bg.progress("stopped all variants")

    return CaptureBench


def spread(runs: Sequence[dict[str, Any]], key: str, nd: int) -> str:
    xs = [r[key] for r in runs]
    return f"{statistics.median(xs):.{nd}f} ({min(xs):.{nd}f}-{max(xs):.{nd}f})"


def report(bg: Any, results: dict[str, Any]) -> str:
    res, names = results["variants"], results["config"]["variants"]
    d = res["direct"]["c1"]["p50_ms"]
    phases = (("c64", "chat"), ("stream", "stream"), ("stream20", "stream20"))
    rows = []
    for n in names:
        r = res[n]["runs"]
        rows.append([
            n,
            *(spread(r[ph], "cpu_s_per_1k", 3) for ph, _ in phases),
            *(spread(r[ph], "rps", 0) for ph, _ in phases),
            f"{res[n]['c1']['p50_ms'] - d:+.3f}",
            "/".join(f"{res[n][ph]['util_pct']['proxy']:.0f}" for ph, _ in phases),
            f"{res[n]['c64']['upstream_util_pct']:.0f}+{res[n]['c64']['wrk_util_pct']:.0f}",
            f"{max(res[n][ph]['foreign_util_pct'] for ph, _ in phases):.0f}",
            "/".join(f"{statistics.median(x.get('catch_up_s', 0) for x in r[ph]):.1f}" for ph, _ in phases),
        ])  # fmt: skip
    out = [bg.table(
        "Medians (range) over rounds; CPU = the whole process, all threads, until the store holds every "
        f"request of the run; +p50 = c1 p50 minus direct ({d:.3f} ms); util = % of its core; stream20 = "
        "20-chunk streams",
        ["variant", *(f"CPU s/1k {k}" for _, k in phases), *(f"rps {k}" for _, k in phases), "+p50 c1 ms",
         "util", "upstr+wrk", "other", "catch-up s"],
        rows,
    )]  # fmt: skip
    base = res.get("passthrough")
    if base:
        rows = []
        for n in names:
            if n == "passthrough":
                continue
            x = res[n]
            row = [n]
            for key, best in (("cpu_s_per_1k", "cpu_s_per_1k_min"), ("rps", "rps_max")):
                for ph, _ in phases:
                    row.append(f"{x[ph][key] / base[ph][key]:.2f} ({x[ph][best] / base[ph][best]:.2f})")
            rows.append(row)
        out.append(bg.table(
            "Ratios against passthrough: median rounds (best round of each side); "
            "targets: CPU <= 1.25, rps >= 0.80",
            ["variant", *(f"CPU {k}" for _, k in phases), *(f"rps {k}" for _, k in phases)], rows,
        ))  # fmt: skip
    for n in names:
        th = res[n].get("thread_cpu_s")
        if th:
            top = sorted(th.items(), key=lambda kv: -kv[1])
            out.append(f"{n}: CPU s by thread over the measured rounds: "
                       + ", ".join(f"{k} {s:.2f}" for k, s in top if s >= 0.01))  # fmt: skip
        h = res[n].get("handover")
        if h:
            nb, nc = max(h["batches"], 1), max(h["captures"], 1)
            drain, submit = 1e6 * h["drain_cpu_s"], 1e6 * h["submit_cpu_s"]
            out.append(
                f"{n}: hand-over: {h['captures']} captures in {h['batches']} batches (mean "
                f"{h['captures'] / nb:.1f}, max {h['max_batch']}); Rust->Python objects "
                f"{drain / nb:.0f} us/batch = {drain / nc:.1f} us/capture; Capture + submit "
                f"{submit / nb:.0f} us/batch = {submit / nc:.1f} us/capture; relay wake-ups "
                f"{h['relay_wakes']}; publisher: {h['published']} published in {h['publish_batches']} "
                f"batches, routes {h['routes']}, spilled {h['spilled']}, dropped {h['dropped']}"
            )
        lg = res[n].get("logged")
        if lg:
            ok = "OK" if lg["stored"] == lg["sent"] else "MISMATCH"
            out.append(f"{n}: logged {lg['stored']}/{lg['sent']} {ok} (rows in the store / requests sent)")
    out.append("load average (1/5/15 min) before: {before}; after: {after}".format(**results["loadavg"]))
    return "\n\n".join(out)


def bench(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="spike_capture.py bench")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--c1-requests", type=int, default=1000)
    ap.add_argument("--catch-up-timeout", type=float, default=180.0)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--nice", type=int, default=-10)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--check-only", action="store_true", help="only the correctness checks")
    args = ap.parse_args(argv)
    args.quick, args.env = False, []
    bg = _bg()
    signal.signal(signal.SIGINT, bg._interrupt)
    signal.signal(signal.SIGTERM, bg._interrupt)
    bg.preflight()
    load_ext()  # fail early if not built
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    for n in names:
        if n not in VARIANTS:
            ap.error(f"unknown variant {n!r}")
    if args.nice and os.geteuid() == 0:
        if os.environ.get(bg.SESSION_MARK) != "1":
            return bg.rerun_in_own_session()
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(args.nice))
    proxy_cores, load_cores = bg.pick_cores(args.no_pin)
    if load_cores:
        os.sched_setaffinity(0, load_cores)
    loadavg = lambda: " ".join(Path("/proc/loadavg").read_text().split()[:3])  # noqa: E731
    results: dict[str, Any] = {
        "config": {"variants": names, "rounds": args.rounds, "seconds": args.seconds,
                   "c1_requests": args.c1_requests, "python": sys.version.split()[0],
                   "proxy_cores": sorted(proxy_cores) if proxy_cores else None,
                   "load_cores": sorted(load_cores) if load_cores else None},
        "loadavg": {"before": loadavg()},
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }  # fmt: skip
    bg.progress(f"load average {results['loadavg']['before']}; variants: {', '.join(names)}")
    t0 = time.monotonic()
    with bg.workdir(args.keep) as wd:
        b = make_bench_cls(bg)(args, wd, proxy_cores, load_cores)
        with b.upstream_running():
            results["variants"] = b.run(names)
    results["loadavg"]["after"] = loadavg()
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["ended_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        bg.progress(f"wrote {args.json}")
    if args.check_only:
        print(json.dumps(results["variants"]["verify"], indent=2))
        return 0
    print()
    print(report(bg, results))
    bad = [n for n, r in results["variants"].items() if isinstance(r, dict) and r.get("logged")
           and r["logged"]["stored"] != r["logged"]["sent"]]  # fmt: skip
    return 1 if bad else 0


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("serve", "bench", "check"):
        print(__doc__)
        return 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve()
        return 0
    if cmd == "check":
        return bench(["--check-only", "--variants", "passthrough,up,rust-up,rust-up-thread", *rest])
    return bench(rest)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; every process the spike started has been stopped", file=sys.stderr)
        sys.exit(130)
