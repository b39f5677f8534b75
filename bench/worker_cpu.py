"""CPU per record of `llmtap worker` (SQLite queue and store, rollups and search on), by thread.

    .venv/bin/python bench/worker_cpu.py [SRC]     # SRC: another llmtap src/ to measure (A/B)
    N=6000 PROFILE=1 SORT=cumulative TOP=40 .venv/bin/python bench/worker_cpu.py
    STORE=postgresql://... .venv/bin/python bench/worker_cpu.py     # the PostgreSQL store
    SHAPE=stream .venv/bin/python bench/worker_cpu.py               # 20-chunk stream records
    SHAPE=stream WHOLE=1 .venv/bin/python bench/worker_cpu.py       # ... their message built by the gateway
    TEXT=prose .venv/bin/python bench/worker_cpu.py                 # a different answer per record
    TEXT=conversation TURNS=10 .venv/bin/python bench/worker_cpu.py # turns resending their history
    BASE=/tmp/llmtap-scale-....db .venv/bin/python bench/worker_cpu.py  # into a store of many rows
    DROP_INDEXES=requests_tenant_user,requests_created .venv/bin/python bench/worker_cpu.py  # what they cost
    LAG=1 .venv/bin/python bench/worker_cpu.py      # + how long the worker holds the event loop

Publishes WARM + N records shaped like bench_gateway's chat traffic (a one-line prompt, a
~800-byte answer, inline bodies) into a fresh SQLite queue, starts a `WorkerService` and waits
until the queue is drained, then prints records per second (wall) and the CPU per record of the
process and of each thread (the event loop, the SQLite queue's thread, the store's writer
thread). Both are taken from the end of the first batch: start-up, lazy imports and the pricing
table are paid once per process, not per record. STORE (a PostgreSQL URL; default the SQLite
store) picks the store; the CPU of the local PostgreSQL server's processes is printed apart.
PROFILE=1 profiles the event-loop thread by its CPU time. TEXT=prose gives every record its own
prompt (30 words) and answer (150 words) drawn from `scale_data`'s Zipf vocabulary: the default
answer repeats one phrase, whose few distinct trigrams flatter the search index (it costs per
distinct trigram of a document). TEXT=conversation makes the records turns of conversations of
TURNS turns (default 10), as chat clients send them: a 60-word system prompt and every earlier
question (30 words) and answer (150 words) resent, then the new question; compare
LLMTAP_SEARCH_SCOPE=turn with the default (the whole request indexed). LAG=1 runs a probe on the
event loop that asks to wake every millisecond and prints how late it woke (p50, p99, max): in
`llmtap up` the gateway's requests share that loop, so a late wake-up is how long a request
arriving then would wait. For an A/B, run it alternately with SRC = `git archive` of the other
commit's src/: on a shared machine only alternating runs compare.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import pstats
import resource
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1] / "src"))

import msgspec

from llmtap.config import Settings
from llmtap.queue.base import Message
from llmtap.queue.sqlite import SQLiteQueue
from llmtap.record import Body, LogRecord, Usage, encode
from llmtap.worker import WorkerService

SRC = sys.path[0]
N = int(os.environ.get("N", "6000"))
WARM = 500  # one batch
REQ = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}
).encode()
RESP = json.dumps(
    {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! " + "lorem ipsum dolor sit amet " * 22},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 150, "total_tokens": 162},
    }
).encode()


def _sse_events(words: int = 20) -> bytes:
    """A 20-delta OpenAI chat stream as the fake upstream sends it: role, deltas, finish, usage."""

    def ev(choices: list[Any], **extra: Any) -> bytes:
        chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
        return b"data: " + json.dumps({**chunk, "choices": choices, **extra}).encode() + b"\n\n"

    out = [ev([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    out += [
        ev([{"index": 0, "delta": {"content": f"word{n} "}, "finish_reason": None}]) for n in range(words)
    ]
    out.append(ev([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    out.append(ev([], usage={"prompt_tokens": 12, "completion_tokens": words, "total_tokens": 12 + words}))
    return b"".join(out) + b"data: [DONE]\n\n"


EVENTS = _sse_events()
REASSEMBLED = json.dumps(
    {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(f"word{n} " for n in range(20))},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32},
    }
).encode()
STREAM = os.environ.get("SHAPE", "chat") == "stream"
WHOLE = os.environ.get("WHOLE", "") == "1"
PROSE = os.environ.get("TEXT", "") == "prose"
CONVERSATION = os.environ.get("TEXT", "") == "conversation"
TURNS = int(os.environ.get("TURNS", "10"))


def _prose_bodies(i: int) -> tuple[bytes, bytes]:
    """A prompt and an answer of their own for record i (TEXT=prose), like real traffic's."""
    from random import Random

    from scale_data import _CUM, VOCAB

    r = Random(i)
    words = r.choices(VOCAB, cum_weights=_CUM, k=180)
    req = json.loads(REQ)
    req["messages"][0]["content"] = " ".join(words[:30])
    resp = json.loads(RESP)
    resp["choices"][0]["message"]["content"] = " ".join(words[30:])
    return json.dumps(req).encode(), json.dumps(resp).encode()


_talk: dict[int, tuple[str, list[tuple[str, str]]]] = {}


def _conversation_bodies(i: int) -> tuple[bytes, bytes]:
    """Turn i % TURNS of conversation i // TURNS (TEXT=conversation): the request resends the
    system prompt and every earlier question and answer; the response is this turn's answer."""
    from random import Random

    from scale_data import _CUM, VOCAB

    c, k = divmod(i, TURNS)
    if c not in _talk:
        _talk.clear()  # records are made in order: one conversation at a time
        r = Random(c)
        system = " ".join(r.choices(VOCAB, cum_weights=_CUM, k=60))
        pairs = []
        for _ in range(TURNS):
            words = r.choices(VOCAB, cum_weights=_CUM, k=180)
            pairs.append((" ".join(words[:30]), " ".join(words[30:])))
        _talk[c] = (system, pairs)
    system, pairs = _talk[c]
    messages = [{"role": "system", "content": system}]
    for ask, answer in pairs[:k]:
        messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": pairs[k][0]})
    req = json.loads(REQ)
    req["messages"] = messages
    resp = json.loads(RESP)
    resp["choices"][0]["message"]["content"] = pairs[k][1]
    return json.dumps(req).encode(), json.dumps(resp).encode()


def _ids() -> Any:
    """Request ids as the measured tree's gateway makes them (IDS=uuid4: random ones)."""
    try:
        from llmtap.ids import new_id as made  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # a tree from before `llmtap.ids`: uuid4
        made = None
    if made is None or os.environ.get("IDS") == "uuid4":
        return lambda: str(uuid.uuid4())
    return made


new_id = _ids()


def record(i: int, t0: datetime) -> LogRecord:
    return stream_record(i, t0) if STREAM else chat_record(i, t0)


def chat_record(i: int, t0: datetime) -> LogRecord:
    at = t0 + timedelta(milliseconds=i)
    if CONVERSATION:
        req, resp = _conversation_bodies(i)
    else:
        req, resp = _prose_bodies(i) if PROSE else (REQ, RESP)
    return LogRecord(
        id=new_id(),
        tenant="default",
        provider="openai",
        target_url="http://127.0.0.1:9/v1/chat/completions",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        started_at=at,
        first_byte_at=at + timedelta(milliseconds=3),
        ended_at=at + timedelta(milliseconds=4),
        latency_ms=4.0,
        time_to_first_token_ms=3.0,
        status=200,
        usage=Usage(source="provider", prompt_tokens=12, completion_tokens=150, total_tokens=162),
        request_headers={"content-type": "application/json", "user-agent": "wrk"},
        response_headers={"content-type": "application/json", "content-length": str(len(resp))},
        request_body=Body(content_type="application/json", size=len(req), data=req),
        response_body=Body(content_type="application/json", size=len(resp), data=resp),
        route="queue",
        gateway="bench:1",
    )


def stream_record(i: int, t0: datetime) -> LogRecord:
    """What the gateway publishes for a 20-chunk stream: the events, its message left to the
    worker (`llmtap.handlers.streams`; before `handlers/streams.py` existed, the gateway sent the
    reassembled message too: `WHOLE=1` publishes that shape)."""
    at = t0 + timedelta(milliseconds=i)
    return msgspec.structs.replace(
        chat_record(i, t0),
        streamed=True,
        ended_at=at + timedelta(milliseconds=9),
        latency_ms=9.0,
        usage=Usage(source="provider", prompt_tokens=12, completion_tokens=20, total_tokens=32),
        response_headers={"content-type": "text/event-stream"},
        response_body=(
            Body(content_type="application/json", size=len(REASSEMBLED), data=REASSEMBLED) if WHOLE else None
        ),
        response_events=Body(content_type="text/event-stream", size=len(EVENTS), data=EVENTS),
    )


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread name (numbered pool threads summed)."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        if t.ident is None:
            continue
        try:
            v = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except OSError:
            continue
        name = t.name.rstrip("_0123456789")
        out[name] = out.get(name, 0.0) + v
    return out


async def probe(lates: list[float]) -> None:
    """Wake every millisecond; record how late each wake-up was (the loop was busy)."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lates.append(time.perf_counter() - t - 0.001)


def postgres_cpu() -> float:
    """CPU seconds of every `postgres` process on this machine (the store's server, when local;
    other databases' work lands here too, so run it on a quiet server)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if name == "postgres" or name.startswith("postgres:"):
            total += (int(rest[11]) + int(rest[12])) / tick
    return total


async def drop_indexes(path: Path, names: list[str]) -> None:
    from llmtap.store.sqlite import SQLiteStore

    store = SQLiteStore(path)  # migrated as the worker would, then the indexes dropped
    await store.connect()
    await store.close()
    with sqlite3.connect(path) as db:
        for name in names:
            db.execute(f"DROP INDEX {name}")


async def main() -> None:
    prof = cProfile.Profile(time.thread_time) if os.environ.get("PROFILE") else None
    with tempfile.TemporaryDirectory() as d:
        store = os.environ.get("STORE", "sqlite")
        if os.environ.get("BASE"):  # a store that already holds many rows (store_bench.py scale --keep)
            shutil.copyfile(os.environ["BASE"], Path(d) / "store.db")
        settings = Settings(data_dir=Path(d), default_tenant="default", store=store)
        if os.environ.get("DROP_INDEXES"):  # the SQLite store without these indexes of `requests`
            await drop_indexes(Path(d) / "store.db", os.environ["DROP_INDEXES"].split(","))
        producer = SQLiteQueue(str(Path(d) / "queue.db"), partitions=settings.partitions)
        await producer.connect("producer")
        t0 = datetime.now(UTC) - timedelta(seconds=N / 1000 + 5)
        for i in range(0, N + WARM, 500):
            batch = [record(j, t0) for j in range(i, min(N + WARM, i + 500))]
            await producer.publish([Message(r.id, encode(r)) for r in batch])
        worker = WorkerService(settings)
        s0 = time.monotonic()
        banner = await worker.start()  # not measured: migrations, imports, connections
        if any("WAITING" in line for line in banner):  # e.g. STORE names a database not there
            await worker.stop()
            raise SystemExit("\n".join(banner))
        try:  # what `llmtap worker` does once started (a tree from before it has no such step)
            from llmtap.runtime import settle_heap  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            pass
        else:
            settle_heap()
        while (await producer.status()).lag > N:  # nor the first batch (lazy imports, caches)
            await asyncio.sleep(0.01)
        startup = time.monotonic() - s0
        before, r0, pg0 = thread_cpu(), resource.getrusage(resource.RUSAGE_SELF), postgres_cpu()
        if prof:
            prof.enable()
        lates: list[float] = []
        lag = asyncio.create_task(probe(lates)) if os.environ.get("LAG") else None
        w0 = time.monotonic()
        while (await producer.status()).lag:
            await asyncio.sleep(0.01)
        wall = time.monotonic() - w0
        if lag is not None:
            lag.cancel()
        if prof:
            prof.disable()
        after, r1, pg1 = thread_cpu(), resource.getrusage(resource.RUSAGE_SELF), postgres_cpu()
        await worker.stop()
        await producer.close()
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    threads = " ".join(
        f"{k}={(v - before.get(k, 0.0)) / N * 1e6:.0f}"
        for k, v in after.items()
        if v - before.get(k, 0.0) > 0.01
    )
    print(
        f"{SRC}: {N / wall:.0f} records/s, {cpu / N * 1e6:.0f} us CPU/record, wall {wall:.2f} s"
        f" (start-up {startup:.2f} s, not counted); by thread (us/record): {threads}"
        + (f"; PostgreSQL's processes {(pg1 - pg0) / N * 1e6:.0f} us/record" if store != "sqlite" else "")
    )
    if lates:
        lates.sort()
        at = [lates[int(q * (len(lates) - 1))] * 1000 for q in (0.5, 0.99, 1.0)]
        print(f"event loop: {len(lates)} wake-ups, late by", end=" ")
        print(f"p50 {at[0]:.2f} / p99 {at[1]:.2f} / max {at[2]:.2f} ms")
    if prof:
        stats: Any = pstats.Stats(prof)
        stats.sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "25")))


if __name__ == "__main__":
    asyncio.run(main())
