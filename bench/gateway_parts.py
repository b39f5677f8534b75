"""What each stage of the gateway's logging costs, measured live: relay, + record, + queue, raw.

`bench_gateway.py` gives the gateway's whole cost against the passthrough; this one splits it.
Five processes on the proxy core, the same wrk chat load on each in turn (interleaved rounds,
medians), CPU per 1,000 requests from /proc:

  passthrough  bench/passthrough.py (the floor for one Python hop)
  relay-bare   (only with --stages) the relay without asking OpenAI for a stream's usage
               (`LLMTAP_OPENAI_STREAM_USAGE=false`): no request rewrite, no usage chunk stripped
  relay        llmtap's `Proxy` on llmtap's server, every capture dropped at `submit`
  record       + the real `Publisher`: records built in batches, handed to a sink that drops them
  gateway      `llmtap gateway` itself: + encoding, the SQLite queue's insert and commit (fsync)
  raw          what shipping raw captures would cost (issue 15's idea, not the product): the real
               `Publisher` and SQLite queue, but each capture published as it was caught (headers
               filtered and held to their limits, bodies compressed as `inline_body` does, no
               parsing, no usage, no stream reassembly), leaving the record's building to a worker

`--shape stream` sends streams of 20 content chunks (the fake upstream echoes a 19-word prompt).
No worker runs (the queue just grows; its data dir is removed at the end), so nothing else
shares the gateway's core. The steps between the rows are what the relay, the record building
and the queue cost per request; `raw`'s step is against `gateway`: what shipping raw captures
would save.

    .venv/bin/python bench/gateway_parts.py [--rounds 5] [--seconds 5] [--conns 64] [--shape stream] [SRC]
    .venv/bin/python bench/gateway_parts.py --shape stream --stages passthrough,relay-bare,relay

SRC (another llmtap src/, e.g. `git archive <commit> src`) measures that tree instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gateway import (  # noqa: E402 - the sibling script's helpers
    PROMPT,
    STREAM_PROMPT,
    Proc,
    free_port,
    pick_cores,
    progress,
    run_wrk,
    spawn,
    wait_ready,
)

STAGES = ("passthrough", "relay", "record", "gateway", "raw")


def stage_server(stage: str, port: int, upstream: str, data_dir: str) -> None:
    """`relay`, `record` or `raw`: llmtap's proxy and server; captures dropped, built then
    dropped, or published raw to the SQLite queue."""
    from aiohttp import web

    from llmtap.bodies.file import FileBodyStore
    from llmtap.config import Settings
    from llmtap.gateway.app import _freeze_startup_objects, make_server
    from llmtap.gateway.capture import Capture
    from llmtap.gateway.proxy import Proxy
    from llmtap.gateway.publisher import Publisher, Sink
    from llmtap.runtime import install_uvloop

    class Dropped:
        def submit(self, capture: Capture) -> None:
            pass

    class Drop(Sink):
        async def send(self, records: object) -> None:
            pass

    async def serve() -> None:
        # relay-bare: what asking for a stream's usage (and stripping it again) costs the relay
        usage = stage != "relay-bare"
        s = Settings(openai_base_url=upstream, data_dir=Path(data_dir), openai_stream_usage=usage)
        sink: Dropped | Publisher = Dropped()
        if stage in ("record", "raw"):
            bodies = FileBodyStore(str(Path(data_dir) / "bodies"))
            await bodies.connect()
            sinks: list[Sink] = [Drop()]
            if stage == "raw":
                from raw_capture import RawBuilder, RawQueueSink

                from llmtap.queue.sqlite import SQLiteQueue

                queue = SQLiteQueue(str(Path(data_dir) / "queue.db"), partitions=s.partitions)
                await queue.connect("producer")
                sinks = [RawQueueSink(queue)]
            sink = Publisher(s, sinks, bodies)
            if stage == "raw":
                sink.builder = RawBuilder(s.inline_body_bytes, sink.gateway_id)  # type: ignore[assignment]
            await sink.start()
        proxy = Proxy(s, sink, lambda auth: s.default_tenant)

        async def healthz(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(text="ok")

        proxy.local = {"/healthz": healthz}
        await proxy.start()
        runner = web.ServerRunner(make_server(proxy, s.header_timeout))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        _freeze_startup_objects()  # as the gateway service does once it is ready
        print("ready", flush=True)
        await asyncio.Event().wait()

    install_uvloop()
    asyncio.run(serve())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--shape", choices=("chat", "stream"), default="chat", help="chat or 20-chunk streams")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in this order")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage's server
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("src", nargs="?", default=str(HERE.parent / "src"))
    args = ap.parse_args()
    stages = tuple(args.stages.split(","))
    unknown = set(stages) - {*STAGES, "relay-bare"}
    if unknown or "passthrough" not in stages:
        ap.error(f"--stages: passthrough and any of {', '.join(STAGES[1:])}, relay-bare")
    sys.path.insert(0, args.src)
    if args.stage:
        stage_server(args.stage, args.port, args.upstream, args.data_dir)
        return 0

    proxy_cores, load_cores = pick_cores(False)
    if load_cores:
        os.sched_setaffinity(0, load_cores)
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")}
    env["PYTHONPATH"] = args.src
    with tempfile.TemporaryDirectory(prefix="gateway-parts-") as tmp:
        work = Path(tmp)
        body = work / "chat.json"
        request: dict[str, object] = {"model": "gpt-4o-mini", "stream": args.shape == "stream"}
        prompt = STREAM_PROMPT if args.shape == "stream" else PROMPT
        request["messages"] = [{"role": "user", "content": prompt}]
        body.write_text(json.dumps(request))
        up_port = free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        procs: dict[str, Proc] = {}
        bases: dict[str, str] = {}
        try:
            cmd = [py, "-m", "llmtap.cli", "fake-upstream", "--port", str(up_port), "--record-limit", "0"]
            procs["upstream"] = spawn("upstream", cmd, work, load_cores, env)
            wait_ready(procs["upstream"], upstream + "/healthz")
            for stage in stages:
                port, data = free_port(), tempfile.mkdtemp(prefix=f"{stage}-", dir=work)
                if stage == "passthrough":
                    cmd = [py, str(HERE / "passthrough.py"), "--port", str(port), "--upstream", upstream]
                    stage_env = env
                elif stage == "gateway":
                    cmd = [py, "-m", "llmtap.cli", "gateway"]
                    stage_env = dict(
                        env,
                        LLMTAP_HOST="127.0.0.1",
                        LLMTAP_GATEWAY_PORT=str(port),
                        LLMTAP_DATA_DIR=data,
                        LLMTAP_OPENAI_BASE_URL=upstream,
                    )
                else:
                    cmd = [py, __file__, "--stage", stage, "--port", str(port), "--upstream", upstream]
                    cmd += ["--data-dir", data, args.src]
                    stage_env = env
                procs[stage] = spawn(stage, cmd, work, proxy_cores, stage_env)
                wait_ready(procs[stage], f"http://127.0.0.1:{port}/healthz")
                bases[stage] = f"http://127.0.0.1:{port}/openai/v1/chat/completions"
            runs: dict[str, list[tuple[float, float]]] = {s: [] for s in stages}
            for stage in stages:  # warm-up: pools, caches, the allocator's arenas
                run_wrk(bases[stage], body, args.conns, "seconds", 1.0, "/healthz")
            for rnd in range(args.rounds):
                order = stages[rnd % len(stages) :] + stages[: rnd % len(stages)]
                for stage in order:
                    p = procs[stage]
                    c0 = p.cpu()
                    w = run_wrk(bases[stage], body, args.conns, "seconds", args.seconds, "/healthz")
                    cpu = p.cpu() - c0
                    if w.errors():
                        progress(f"  WARNING: {stage}: {w.errors()} failed requests")
                    runs[stage].append((1000 * cpu / max(w.sent, 1), w.rps))
                    cpu1k, rps = runs[stage][-1]
                    progress(f"round {rnd + 1} {stage:12s} {rps:7.0f} rps  {cpu1k:.3f} s/1k")
        finally:
            for p in reversed(list(procs.values())):
                p.stop(10.0)
    med = {
        s: (statistics.median(c for c, _ in r), statistics.median(x for _, x in r)) for s, r in runs.items()
    }
    base = med["passthrough"][0]
    load = f"wrk -c{args.conns}, {args.rounds} rounds of {args.seconds:g} s"
    print(f"\nCPU per 1,000 {args.shape} requests ({load}, medians)")
    print(f"{'stage':12s} {'s/1k':>7s} {'range':>13s} {'÷ pass':>7s} {'step us/req':>12s} {'rps':>7s}")
    prev = None
    for s in stages:
        cpu, rps = med[s]
        lo, hi = min(c for c, _ in runs[s]), max(c for c, _ in runs[s])
        step = "" if prev is None else f"{1000 * (cpu - prev):+.1f}"
        print(f"{s:12s} {cpu:7.3f} {lo:6.3f}-{hi:.3f} {cpu / base:7.2f} {step:>12s} {rps:7.0f}")
        prev = cpu
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
