"""CPU per request of the gateway's own logging work: capture -> record -> queue message.

    .venv/bin/python bench/capture_cpu.py [SRC]     # SRC: another llmtap src/ to measure (A/B)
    PROFILE=1 .venv/bin/python bench/capture_cpu.py

`bench_gateway.py` measures the whole process against a passthrough, where one round differs
from the next by +-15% on a shared 2-core machine: too coarse to see a cut of a few microseconds.
This one times only llmtap's part, in one process and without sockets in the loop, so it
repeats to within a few percent and an A/B of two source trees shows small changes.

It runs the real gateway (in-process, on an ephemeral port) in front of the fake upstream and
sends one chat request and one 20-chunk stream with the `openai` SDK (its real headers, plus a
user id and two properties), a 20-chunk Anthropic Messages stream with the `anthropic` SDK and
a 20-chunk Gemini stream (`streamGenerateContent?alt=sse`, plain aiohttp), keeping the `Capture`
the proxy made of each. Then it times, per
request, what the publisher does with a capture off the latency path: `RecordBuilder.build`,
the inline-limit check, the queue message (`encode`, partition key). Also the request id a
request without `Llmtap-Request-Id` gets. Figures: the best of REPEAT runs of N requests each.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1] / "src"))

import aiohttp
import anthropic
import openai

from llmtap.bodies import offload
from llmtap.config import Settings
from llmtap.gateway.app import GatewayService
from llmtap.gateway.capture import Capture, RecordBuilder
from llmtap.record import LogRecord, encode, partition_key
from llmtap.testing.fake_upstream import make_app, serve
from llmtap.testing.sinks import ListSink

SRC = sys.path[0]
N = int(os.environ.get("N", "20000"))
REPEAT = int(os.environ.get("REPEAT", "5"))


async def captures() -> dict[str, Capture]:
    runner, up_port = await serve(make_app(record_limit=0))
    with tempfile.TemporaryDirectory() as d:
        settings = Settings(
            data_dir=Path(d),
            host="127.0.0.1",
            gateway_port=0,
            openai_base_url=f"http://127.0.0.1:{up_port}",
            anthropic_base_url=f"http://127.0.0.1:{up_port}",
            gemini_base_url=f"http://127.0.0.1:{up_port}",
        )
        sink = ListSink(large_bodies=True)
        service = GatewayService(settings, sinks=[sink])
        kept: list[Capture] = []
        submit = service.publisher.submit

        def keep(cap: Capture) -> None:
            kept.append(cap)
            submit(cap)

        service.publisher.submit = keep  # type: ignore[method-assign]
        await service.start()
        try:
            client = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{service.port}/openai/v1",
                api_key="sk-bench",
                default_headers={
                    "Llmtap-User-Id": "user-42",
                    "Llmtap-Property-Feature": "summarize",
                    "Llmtap-Property-Env": "bench",
                },
            )
            messages: Any = [{"role": "user", "content": "hello from the benchmark"}]
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,
                stream=True,
                extra_headers={"x-fake-chunks": "20"},
            )
            async for _ in stream:
                pass
            await client.close()
            gw = f"http://127.0.0.1:{service.port}"
            claude = anthropic.AsyncAnthropic(base_url=f"{gw}/anthropic", api_key="sk-ant-bench")
            async with claude.messages.stream(
                model="claude-sonnet-4-5",
                max_tokens=256,
                messages=messages,
                extra_headers={"x-fake-chunks": "20"},
            ) as s:
                async for _ in s:
                    pass
            await claude.close()
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{gw}/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                    json={"contents": [{"role": "user", "parts": [{"text": "hello from the benchmark"}]}]},
                    headers={"x-goog-api-key": "AIza-bench", "x-fake-chunks": "20"},
                ) as r,
            ):
                await r.read()
            await service.publisher.flush()
        finally:
            await service.stop()
            await runner.cleanup()
    chat, streamed, claude_stream, gemini_stream = kept
    assert not chat.streamed and streamed.streamed, (chat.streamed, streamed.streamed)
    assert claude_stream.streamed and gemini_stream.streamed
    assert len(sink.records) == 4 and all(r.usage.source == "provider" for r in sink.records)
    return {"chat": chat, "stream": streamed, "anthropic": claude_stream, "gemini": gemini_stream}


def per_request(fn: Any, n: int) -> float:
    """Best of REPEAT: microseconds per call of fn(), fn called n times per run."""
    best = float("inf")
    for _ in range(REPEAT):
        gc.collect()
        gc.disable()  # a collection lands in one run and not the next: it was most of the spread
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, time.thread_time() - t0)
        gc.enable()
    return best / n * 1e6


def main() -> None:
    caps = asyncio.run(captures())
    builder = RecordBuilder(inline_body_bytes=64 * 1024, gateway="bench:1")
    prof = cProfile.Profile(time.thread_time) if os.environ.get("PROFILE") else None
    new_id = _request_id()
    print(f"llmtap from {SRC}; N={N} per figure, best of {REPEAT}; CPU microseconds per request")
    rows: list[tuple[str, float]] = [("request id (no Llmtap-Request-Id)", per_request(new_id, N))]
    for name, cap in caps.items():
        record = builder.build(cap)
        if cap.streamed:
            left = record.response_body is None  # the worker reassembles it (`handlers.streams`)
            print(f"  {name}: {'message left to the worker' if left else 'reassembled in the gateway'}")

        def build(cap: Capture = cap) -> None:
            builder.build(cap)

        def message(record: LogRecord = record) -> None:
            offload.fits(record, 64 * 1024)
            encode(record)
            partition_key(record, "tenant")

        def both(cap: Capture = cap) -> None:
            r = builder.build(cap)
            offload.fits(r, 64 * 1024)
            encode(r)
            partition_key(r, "tenant")

        if prof is not None:
            prof.enable()
        rows += [
            (f"{name}: build the record", per_request(build, N)),
            (f"{name}: queue message (fits, encode, key)", per_request(message, N)),
            (f"{name}: capture -> message", per_request(both, N)),
        ]
        if prof is not None:
            prof.disable()
    for label, us in rows:
        print(f"  {label:<46} {us:7.2f}")
    if prof is not None:
        pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(
            int(os.environ.get("TOP", "30"))
        )


def _request_id() -> Any:
    """What the proxy calls for a request id in this source tree."""
    try:
        from llmtap import ids  # type: ignore[attr-defined]

        return ids.new_id
    except ImportError:
        import uuid

        return lambda: str(uuid.uuid4())


if __name__ == "__main__":
    main()
