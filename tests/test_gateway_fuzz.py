"""Fuzz the whole real gateway (issue 7, item 2): every request it answers is stored.

`llmtap up` (gateway + worker + server, on embedded SQLite and on PostgreSQL) in front of the
fake upstream gets a seeded stream of requests with random bytes and sizes in every header, in
`Llmtap-Request-Id`, property names and values, user and session ids, query strings and bodies
(valid and invalid JSON, streams, gzip that is not gzip), mixed with normal ones, over raw
sockets (HTTP clients refuse most of these bytes). Afterwards the ids the store holds must be
exactly the `Llmtap-Request-Id`s the gateway answered with, and the gateway must be healthy.

The default run sends `LLMTAP_FUZZ_REQUESTS` (300) requests; the `slow` variant 3000. The seed is
`LLMTAP_FUZZ_SEED` (fixed by default, printed with the figures), so a run can be replayed.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from procs import Proc, fake_upstream, http_json, list_records, running_up, stored_count, wait_until
from rawhttp import exchange, request_bytes
from store_helpers import pg_url, store_params

TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Header value bytes a parser may accept: visible ASCII, space, tab and obs-text (0x80-0xFF).
VALUE = bytes(range(0x20, 0x7F)) + b"\t" + bytes(range(0x80, 0x100))
#: Bytes no parser should accept in a header value (the request is refused, never answered).
CONTROL = bytes(range(0x00, 0x09)) + bytes(range(0x0B, 0x20)) + b"\x7f"
REAL_NAMES = [
    b"Content-Encoding",
    b"Accept-Encoding",
    b"Authorization",
    b"x-api-key",
    b"api-key",
    b"Cookie",
    b"Referer",
    b"User-Agent",
    b"Accept",
    b"OpenAI-Organization",
    b"anthropic-version",
    b"traceparent",
    b"X-Forwarded-For",
    b"Llmtap-Omit-Request",
    b"Llmtap-Omit-Response",
    b"Llmtap-Auth",
]


@dataclass
class Stack:
    gw_port: int
    gw: str
    api: str
    proc: Proc


@contextmanager
def _store(kind: str) -> Iterator[dict[str, str]]:
    """Settings for the store: embedded SQLite, or a fresh database on the test PostgreSQL."""
    if kind == "sqlite":
        yield {}
        return
    admin = pg_url()
    assert admin is not None
    name = "llmtap_fuzz_" + uuid.uuid4().hex[:12]

    async def sql(q: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(q)
        finally:
            await conn.close()

    asyncio.run(sql(f'CREATE DATABASE "{name}"'))
    try:
        yield {"store": urlunsplit(urlsplit(admin)._replace(path="/" + name))}
    finally:
        asyncio.run(sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module", params=store_params())
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with (
        fake_upstream(tmp) as fake,
        _store(request.param) as store,
        running_up(tmp, openai_base_url=fake, anthropic_base_url=fake, **store) as up,
    ):
        yield Stack(up.gw_port, up.gw, up.api, up.proc)


# -- the generator ---------------------------------------------------------------------------------


def _size(rng: random.Random) -> int:
    """Mostly small, sometimes large: sizes spread over orders of magnitude."""
    return int(10 ** rng.uniform(0, rng.choice([1.5, 2.5, 3.5, 4.2])))


def _bytes(rng: random.Random, alphabet: bytes, n: int) -> bytes:
    return bytes(rng.choice(alphabet) for _ in range(n))


def _value(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.3:
        return _bytes(rng, bytes(range(0x21, 0x7F)), rng.randint(1, 40))
    if kind < 0.6:
        return _bytes(rng, VALUE, _size(rng)).strip(b" \t") or b"x"
    if kind < 0.8:  # valid UTF-8 beyond ASCII
        text = "".join(rng.choice("aé€𝄞中\u200b\ufeff\u202e") for _ in range(rng.randint(1, 60)))
        return text.encode()
    return b"v" + _bytes(rng, b"\x80\xbf\xc0\xc1\xc3\xe2\xed\xf0\xf5\xfe\xff(", rng.randint(1, 30))


def _name(rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return rng.choice(REAL_NAMES)
    return b"X-" + _bytes(rng, TOKEN, rng.randint(1, 1 + _size(rng) % 200))


def _query(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return b""
    pairs = []
    for _ in range(rng.randint(1, 12)):
        name = rng.choice([b"key", b"api-key", b"api%2Dkey", b"sig", b"password", b"a", b"x%00y", b"%ff"])
        if rng.random() < 0.5:
            name = _bytes(rng, b"abcdefXYZ09-_.~%", rng.randint(1, 20))
        raw = _bytes(rng, bytes(range(256)), rng.randint(0, 30))
        value = b"".join(b"%%%02X" % c for c in raw) if rng.random() < 0.98 else raw  # raw: refused
        pairs.append(name + b"=" + value)
    return b"?" + b"&".join(pairs)


def _chat_body(rng: random.Random, provider: str) -> bytes:
    stream = rng.random() < 0.3
    content = "".join(rng.choice('hello wörld 🙂 \\"\n\t') for _ in range(_size(rng) % 3000))
    if provider == "anthropic":
        obj: dict[str, object] = {
            "model": "claude-3-5-haiku-latest",
            "max_tokens": rng.randint(1, 50),
            "messages": [{"role": "user", "content": content}],
        }
    else:
        obj = {
            "model": rng.choice(["gpt-4o-mini", "gpt-4o", "m\u0000odel", "x" * 300]),
            "messages": [{"role": "user", "content": content}],
        }
    if stream:
        obj["stream"] = True
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()


def _body(rng: random.Random, provider: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    kind = rng.random()
    headers: list[tuple[bytes, bytes]] = [(b"Content-Type", b"application/json")]
    if kind < 0.55:
        body = _chat_body(rng, provider)
    elif kind < 0.65:
        body = _chat_body(rng, provider)[: rng.randint(0, 50)]  # truncated JSON
    elif kind < 0.75:
        body = _bytes(rng, bytes(range(256)), _size(rng))
    elif kind < 0.8:
        body = b""
    elif kind < 0.9:
        body = _chat_body(rng, provider)
        if rng.random() < 0.5:
            body = gzip.compress(body)
        headers.append((b"Content-Encoding", rng.choice([b"gzip", b"deflate", b"zstd", b"br", b"x-bogus"])))
    else:
        body = _bytes(rng, bytes(range(256)), _size(rng))  # "gzip" that is not gzip
        headers.append((b"Content-Encoding", b"gzip"))
    return body, headers


def make_request(rng: random.Random, used_ids: list[str]) -> bytes:
    provider = rng.choice(["openai", "openai", "anthropic"])
    path = b"/openai/v1/chat/completions" if provider == "openai" else b"/anthropic/v1/messages"
    if rng.random() < 0.05:
        path = b"/openai/v1/" + _bytes(rng, b"abcxyz-_.~%20!$&'()*+,;=:@", rng.randint(0, 30))
    auth = (b"Authorization", b"Bearer sk-fuzz") if provider == "openai" else (b"x-api-key", b"sk-ant-fuzz")
    body, headers = _body(rng, provider)
    headers.append(auth)
    if provider == "anthropic":
        headers.append((b"anthropic-version", b"2023-06-01"))
    if rng.random() < 0.35:  # a normal request: nothing odd beyond the body
        return request_bytes(b"POST", path, headers, body)
    for _ in range(rng.randint(0, 20)):
        headers.append((_name(rng), _value(rng)))
    r = rng.random()
    if r < 0.3:
        headers.append((b"Llmtap-Request-Id", str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()))
    elif r < 0.45 and used_ids:
        headers.append((b"Llmtap-Request-Id", rng.choice(used_ids).encode()))  # an id used before
    elif r < 0.6:
        headers.append((b"Llmtap-Request-Id", _value(rng)))
    for _ in range(rng.choice([0, 0, 1, 3, 10, 80])):
        pname = _bytes(rng, TOKEN, rng.randint(1, 1 + _size(rng) % 300))
        headers.append((b"Llmtap-Property-" + pname, _value(rng)))
    if rng.random() < 0.4:
        headers.append((b"Llmtap-User-Id", _value(rng)))
    if rng.random() < 0.4:
        headers.append((b"Llmtap-Session-Id", _value(rng)))
    if rng.random() < 0.05:  # a header the HTTP parser refuses: the request is never proxied
        headers.append((_name(rng), b"bad" + bytes([rng.choice(CONTROL)]) + b"value"))
    if rng.random() < 0.1:
        headers.append((b"x-fake-status", rng.choice([b"400", b"429", b"500", b"503"])))
    rng.shuffle(headers)
    method = b"POST" if rng.random() < 0.9 else rng.choice([b"GET", b"PUT", b"DELETE", b"PATCH"])
    return request_bytes(method, path + _query(rng), headers, body)


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Figures:
    requests: int
    answered: int  # distinct Llmtap-Request-Ids the gateway answered with
    refused: int  # closed or answered without an id (the HTTP parser's 400: nothing proxied)
    stored: int
    lost: int
    extra: int


def run_fuzz(stack: Stack, n: int, seed: int) -> Figures:
    rng = random.Random(seed)
    used: list[str] = []
    reqs = []
    for _ in range(n):
        req = make_request(rng, used)
        reqs.append(req)
        if rng.random() < 0.2:
            used.append(str(uuid.UUID(int=rng.getrandbits(128), version=4)))
    baseline = {r["id"] for r in list_records(stack.api)}  # earlier tests' records
    answered: set[str] = set()
    refused = 0

    def send(data: bytes) -> str | None:
        ans = exchange(stack.gw_port, data, timeout=120)
        return ans.header("llmtap-request-id") if ans is not None else None

    with ThreadPoolExecutor(max_workers=8) as pool:
        for rid in pool.map(send, reqs):
            if rid:
                answered.add(rid)
            else:
                refused += 1

    def all_stored() -> bool:
        return stored_count(stack.api) >= len(baseline | answered)

    try:
        wait_until(all_stored, timeout=max(120, n / 10), interval=0.5, what="every answered record stored")
    except AssertionError:
        pass  # compared below, with the ids missing
    stored = {r["id"] for r in list_records(stack.api)} - (baseline - answered)
    return Figures(
        requests=n,
        answered=len(answered),
        refused=refused,
        stored=len(stored),
        lost=len(answered - stored),
        extra=len(stored - answered),
    )


def check(stack: Stack, figures: Figures, seed: int, before: int) -> None:
    print(f"\nfuzz seed={seed}: {figures}")
    out = stack.proc.output()
    assert figures.lost == 0 and figures.extra == 0, (seed, figures, out[-5000:])
    assert figures.answered > figures.requests // 2, figures  # the fuzz must mostly get through
    assert stack.proc.alive(), out[-5000:]
    new = out[before:]
    assert "Traceback" not in new, new[-5000:]
    assert "gave up" not in new, new[-5000:]
    # healthy: health check, metrics, and a normal request logged end to end
    status, body = http_json("GET", f"{stack.gw}/healthz")
    assert status == 200 and body["status"] == "ok", body
    with urllib.request.urlopen(f"{stack.gw}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert "llmtap_gateway_records_dropped_total 0.0" in metrics, metrics
    body_ok = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "after"}]}
    ).encode()
    ans = exchange(
        stack.gw_port,
        request_bytes(
            b"POST",
            b"/openai/v1/chat/completions",
            [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer sk-after")],
            body_ok,
        ),
    )
    assert ans is not None and ans.status == 200, ans
    rid = ans.header("llmtap-request-id")
    wait_until(
        lambda: http_json("GET", f"{stack.api}/api/v1/requests/{rid}")[0] == 200, 60, what="record after fuzz"
    )


def _seed() -> int:
    return int(os.environ.get("LLMTAP_FUZZ_SEED", "") or 20261202)


def test_fuzz_every_answered_request_is_stored(stack: Stack) -> None:
    n = int(os.environ.get("LLMTAP_FUZZ_REQUESTS", "300"))
    seed = _seed()
    before = len(stack.proc.output())
    check(stack, run_fuzz(stack, n, seed), seed, before)


@pytest.mark.slow
def test_fuzz_thousands_every_answered_request_is_stored(stack: Stack, tmp_path: Path) -> None:
    seed = _seed() + 1
    before = len(stack.proc.output())
    check(stack, run_fuzz(stack, 3000, seed), seed, before)
