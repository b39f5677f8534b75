"""Azure OpenAI, named OpenAI-compatible upstreams and OpenAI's Responses API through the
gateway, with the real `openai` SDK, and the validation of `LLMTAP_UPSTREAMS`.

Expected costs are computed here from published prices (USD per 1M tokens), never with llmtap's
pricing code.
"""

from __future__ import annotations

import asyncio
import base64
import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway_support import MemoryQueue, fake_requests, running_gateway, settings_for, tiny_upstream, wait_for
from llmtap.config import load_settings
from llmtap.errors import ConfigError
from llmtap.handlers import streams
from llmtap.pricing import apply_cost
from llmtap.record import LogRecord, body_bytes, encode
from llmtap.store.search import record_text
from llmtap.testing.fake_openai import AZURE_SERVED_MODEL
from llmtap.testing.fake_upstream import expected_usage

pytestmark = pytest.mark.timeout(60)

AZURE_KEY = "azure-secret-key-0123456789"
API_VERSION = "2024-10-21"
# Azure OpenAI gpt-4o-mini (2024-07-18), global deployment: input 0.15, output 0.60.
AZ_IN, AZ_OUT = 0.15, 0.60
# Groq llama-3.3-70b-versatile: input 0.59, output 0.79.
GROQ_IN, GROQ_OUT = 0.59, 0.79
MESSAGES = [{"role": "user", "content": "hello from azure"}]


async def records(q: MemoryQueue, n: int) -> list[LogRecord]:
    await wait_for(lambda: len(q.messages) >= n, timeout=20)
    await asyncio.sleep(0.05)
    recs = q.records()
    assert len(recs) == n, [r.path for r in recs]
    return recs


def cost_nanos(prompt: int, completion: int, price_in: float, price_out: float) -> int:
    return round((prompt * price_in + completion * price_out) / 1e6 * 1e9)


async def test_azure_deployment_and_v1_urls(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    s = settings_for(upstream, tmp_path, azure_base_url=f"http://127.0.0.1:{upstream}")
    async with running_gateway(s, q) as (_, gw):
        az = openai.AsyncAzureOpenAI(
            azure_endpoint=f"{gw}/azure", api_version=API_VERSION, api_key=AZURE_KEY, max_retries=0
        )
        r = await az.chat.completions.create(model="my-mini-deployment", messages=MESSAGES)  # type: ignore[arg-type]
        text = ""
        stream = await az.chat.completions.create(
            model="my-mini-deployment",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        saw_usage_chunk = False
        async for chunk in stream:
            if chunk.usage is not None:
                saw_usage_chunk = True
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        v1 = openai.AsyncOpenAI(base_url=f"{gw}/azure/openai/v1", api_key=AZURE_KEY, max_retries=0)
        r1 = await v1.chat.completions.create(model="my-mini-deployment", messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError):
            await az.chat.completions.create(
                model="my-mini-deployment",
                messages=MESSAGES,  # type: ignore[arg-type]
                extra_headers={"x-fake-status": "429"},
            )
        await az.close()
        await v1.close()
        plain, streamed, via_v1, failed = await records(q, 4)
    assert r.model == AZURE_SERVED_MODEL and r1.model == AZURE_SERVED_MODEL
    assert text == r.choices[0].message.content == "echo: hello from azure"
    assert not saw_usage_chunk  # the gateway asked for stream usage and hid it again
    want = expected_usage("openai", {"model": "x", "messages": MESSAGES})
    for rec in (plain, streamed, via_v1):
        assert rec.provider == "azure"
        assert rec.model == AZURE_SERVED_MODEL  # what served it, not the deployment name
        assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (
            want["prompt_tokens"],
            want["completion_tokens"],
        )
        assert rec.usage.source == "provider"
        assert AZURE_KEY.encode() not in encode(rec)
        apply_cost(rec)
        assert rec.cost_nanos == cost_nanos(want["prompt_tokens"], want["completion_tokens"], AZ_IN, AZ_OUT)
    assert plain.path == "/openai/deployments/my-mini-deployment/chat/completions"
    assert f"api-version={API_VERSION}" in plain.target_url
    assert via_v1.path == "/openai/v1/chat/completions"
    assert streamed.streamed
    # An error names no served model: the deployment name is not taken for one.
    assert failed.status == 429 and failed.model is None and failed.error


async def test_azure_route_off_until_configured(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    async with (
        running_gateway(settings_for(upstream, tmp_path), q) as (_, gw),
        aiohttp.ClientSession() as http,
    ):
        async with http.post(f"{gw}/azure/openai/v1/chat/completions", json={}) as r:
            body = await r.json()
    assert r.status == 404 and body["error"]["type"] == "llmtap_not_found"
    assert "LLMTAP_AZURE_BASE_URL" in body["error"]["message"]  # how to turn it on
    assert q.messages == []


async def test_a_browser_or_api_call_at_the_gateway_is_sent_to_the_servers_port(
    upstream: int, tmp_path: Path
) -> None:
    """Opening the gateway's port in a browser said only "no route for /"."""
    settings = settings_for(upstream, tmp_path, server_port=18788)
    async with running_gateway(settings) as (_, gw), aiohttp.ClientSession() as http:
        for path in ("/", "/api/v1/requests"):
            async with http.get(gw + path) as r:
                body = await r.json()
            assert (
                r.status == 404
                and "on the server's port, LLMTAP_SERVER_PORT: 18788" in body["error"]["message"]
            )


async def test_named_upstreams_priced_by_their_own_provider(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    url = f"http://127.0.0.1:{upstream}"
    s = settings_for(upstream, tmp_path, upstreams=f"groq={url}, vllm={url}/")
    async with running_gateway(s, q) as (_, gw):
        groq = openai.AsyncOpenAI(base_url=f"{gw}/groq/v1", api_key="gsk-test", max_retries=0)
        vllm = openai.AsyncOpenAI(base_url=f"{gw}/vllm/v1", api_key="none", max_retries=0)
        g = await groq.chat.completions.create(model="llama-3.3-70b-versatile", messages=MESSAGES)  # type: ignore[arg-type]
        # A self-hosted server may serve a model under an OpenAI name: still not OpenAI's price.
        v = await vllm.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        await groq.close()
        await vllm.close()
        rg, rv = await records(q, 2)
    assert g.choices[0].message.content == v.choices[0].message.content == "echo: hello from azure"
    want = expected_usage("openai", {"model": "x", "messages": MESSAGES})
    assert (rg.provider, rg.model, rv.provider, rv.model) == (
        "groq",
        "llama-3.3-70b-versatile",
        "vllm",
        "gpt-4o-mini",
    )
    assert rv.usage.prompt_tokens == want["prompt_tokens"]  # usage is read all the same
    apply_cost(rg)
    apply_cost(rv)
    assert rg.cost_nanos == cost_nanos(want["prompt_tokens"], want["completion_tokens"], GROQ_IN, GROQ_OUT)
    assert rv.cost_usd is None and rv.cost_nanos is None


async def test_a_named_upstream_records_the_model_that_answered(upstream: int, tmp_path: Path) -> None:
    """OpenRouter's `openrouter/auto` (and its `models` fallbacks) answer with the model it
    routed to, which is the one billed: the record kept the model asked for (unpriced, or
    priced 21x too low on a fallback)."""
    q = MemoryQueue()
    url = f"http://127.0.0.1:{upstream}"
    s = settings_for(upstream, tmp_path, upstreams=f"openrouter={url}")
    served = "anthropic/claude-3.5-sonnet"
    async with running_gateway(s, q) as (_, gw):
        client = openai.AsyncOpenAI(
            base_url=f"{gw}/openrouter/v1",
            api_key="sk-or-test",
            max_retries=0,
            default_headers={"x-fake-served-model": served},
        )
        answer = await client.chat.completions.create(model="openrouter/auto", messages=MESSAGES)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(model="openrouter/auto", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        async for _ in stream:
            pass
        await client.close()
        recs = await records(q, 2)
    assert answer.model == served
    for rec in recs:
        assert (rec.provider, rec.model) == ("openrouter", served), rec.streamed
        u = rec.usage
        assert u.source == "provider" and u.prompt_tokens and u.completion_tokens
        apply_cost(rec)  # OpenRouter's anthropic/claude-3.5-sonnet: input 3, output 15
        assert rec.cost_nanos == cost_nanos(u.prompt_tokens, u.completion_tokens, 3.0, 15.0)


async def test_stream_usage_skipped_where_the_upstream_sends_it_unasked(
    upstream: int, tmp_path: Path
) -> None:
    """A vLLM started with `--enable-force-include-usage` (and OpenRouter, always) sends the
    usage chunk unasked: asking and stripping took it from the client. `LLMTAP_STREAM_USAGE_SKIP`
    names such routes; OpenRouter's host needs no naming."""
    from llmtap.providers import routes

    q = MemoryQueue()
    url = f"http://127.0.0.1:{upstream}"
    s = settings_for(upstream, tmp_path, upstreams=f"vllm={url},groq={url}", stream_usage_skip="vllm")
    req = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    h = {"Authorization": "Bearer none", "Content-Type": "application/json"}
    async with running_gateway(s, q) as (_, gw), aiohttp.ClientSession() as http:
        async with http.post(f"{gw}/vllm/v1/chat/completions", data=req, headers=h) as r:
            assert r.status == 200
            await r.read()
        sent = await fake_requests(http, url)
        await records(q, 1)
    assert base64.b64decode(sent[-1]["body_b64"]) == req  # the client's request, not rewritten
    table = routes(s)
    assert table["vllm"].provider.rewrite_request("POST", "/v1/chat/completions", req) is None
    assert table["groq"].provider.rewrite_request("POST", "/v1/chat/completions", req) is not None
    assert table["openai"].provider.rewrite_request("POST", "/v1/chat/completions", req) is not None
    other = load_settings(upstreams="or=https://openrouter.ai/api,x=https://evil-openrouter.ai.example")
    assert routes(other)["or"].provider.rewrite_request("POST", "/v1/chat/completions", req) is None
    assert routes(other)["x"].provider.rewrite_request("POST", "/v1/chat/completions", req) is not None
    with pytest.raises(ConfigError, match="invalid setting LLMTAP_STREAM_USAGE_SKIP: 'V LLM' is not a route"):
        load_settings(stream_usage_skip="openai, V LLM")
    for typo in ("vlm", "anthropic"):  # a route that is not there, or not OpenAI-shaped: was taken
        with pytest.raises(
            ConfigError, match=f"LLMTAP_STREAM_USAGE_SKIP: '{typo}' is not an OpenAI-shaped route"
        ):
            load_settings(upstreams="vllm=http://10.0.0.5:8000", stream_usage_skip=f"vllm,{typo}")
    # OpenRouter behind the built-in route is known by its host too
    via_openai = routes(load_settings(openai_base_url="https://openrouter.ai/api"))["openai"]
    assert via_openai.provider.rewrite_request("POST", "/v1/chat/completions", req) is None


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("openai=http://10.0.0.5:8000", "taken by llmtap's own /openai/ route"),
        ("gemini=http://10.0.0.5:8000", "taken by llmtap's own /gemini/ route"),
        ("healthz=http://10.0.0.5:8000", "taken"),
        ("vllm", "is not name=url"),
        ("vllm=ftp://10.0.0.5", "must be an http:// or https:// URL"),
        ("vllm=http://a,vllm=http://b", "given twice"),
        ("Big Name=http://a", "must be lowercase letters"),
        ("vllm=http://a?x=1", "must not have a query"),
    ],
)
def test_upstreams_config_errors_are_one_sentence(value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(upstreams=value)
    msg = str(e.value)
    assert msg.startswith("invalid setting LLMTAP_UPSTREAMS: ") and needle in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("setting", "value", "needle"),
    [
        ("openai_base_url", "http://oa:PASSWORD-1@10.0.0.5", "must not hold credentials"),
        ("azure_base_url", "https://res.openai.azure.com?api-key=PASSWORD-2", "must not have a query"),
        ("upstreams", "vllm=http://u:PASSWORD-3@10.0.0.5:8000", "must not hold credentials"),
        ("upstreams", "vllm=http://u:PASSWORD-4@h:1,bad", "must not hold credentials"),
        ("webhook_url", "notaurl://u:PASSWORD-5@x", "must be an http:// or https:// URL"),
        ("ingest_url", "ftp://u:PASSWORD-6@h", "must be an http:// or https:// URL"),
        ("s3_endpoint", "http://ak:PASSWORD-7@127.0.0.1:1", "must not hold credentials"),
        # sent as is in every request line (`POST /a b/chat/completions`): refused at start
        ("upstreams", "w=http://127.0.0.1:1/a b", "must not hold spaces or control characters"),
        ("openai_base_url", "http://127.0.0.1:1/v\t1", "must not hold spaces or control characters"),
        ("bodies", "s3://u:PASSWORD-8@bucket/prefix", "takes no credentials"),
        ("ingest_token", 12345678901234, "valid string"),
        # a password with raw `#` `?` `/` `@`: urllib quoted its head as the port, the tail showed
        ("store", "postgresql://app:PASSWORD-10#x@db/llmtap", "a port is not a number"),
        ("queue", "rediss://u:PASSWORD-11?x@h:6380/0", "a port is not a number"),
        ("store", "postgresql://app:PASSWORD/12@db:x/llmtap", "a port is not a number"),
        ("webhook_secret", ["whsec_PASSWORD-9"], "valid string"),
        # an `@` in the user name, a raw `?`/`#` in the password; a fragment's after a query (rev26)
        ("queue", "redis://app@corp.com:PASSWORD?13@127.0.0.1:1/0", "a port is not a number"),
        ("store", "postgresql://app@corp.com:PASSWORD#14@127.0.0.1:1/db", "a port is not a number"),
        ("openai_base_url", "https://api.x.com/v1?x=1#Qx7PASSWORD@Zk9", "must not hold credentials"),
    ],
)
def test_a_wrong_setting_never_shows_its_secret(setting: str, value: object, needle: str) -> None:
    """Upstream base URLs take no credentials (requests are built on them and their errors
    quote them); and no error line shows a password, a token or a secret."""
    with pytest.raises(ConfigError) as e:
        load_settings(**{setting: value})
    msg = str(e.value)
    assert needle in msg and "PASSWORD" not in msg and "12345678901234" not in msg, msg
    assert msg.startswith(f"invalid setting LLMTAP_{setting.upper()}: ") and "\n" not in msg


def test_multi_host_backend_urls_are_taken() -> None:
    """`kafka://host:port[,host:port]/topic`, as documented, was refused at start."""
    assert load_settings(queue="kafka://k1:9092,k2:9092/llmtap").queue == "kafka://k1:9092,k2:9092/llmtap"
    load_settings(store="postgresql://u:p@db1:5432,db2:5432/llmtap")
    with pytest.raises(ConfigError, match="a port is not a number"):
        load_settings(queue="kafka://k1:x,k2:9092/llmtap")


def test_upstreams_parsed() -> None:
    s = load_settings(upstreams=" vllm=http://10.0.0.5:8000/ ,groq=https://api.groq.com/openai")
    assert s.upstream_map == {"vllm": "http://10.0.0.5:8000", "groq": "https://api.groq.com/openai"}


async def test_exact_cost_through_the_sdks_flex_tier_and_1h_cache(upstream: int, tmp_path: Path) -> None:
    """The real SDKs through the gateway: an OpenAI flex request and Anthropic 1-hour cache
    writes (plain and streamed) cost what the published prices say."""
    import anthropic

    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (_, gw):
        oa = openai.AsyncOpenAI(base_url=f"{gw}/openai/v1", api_key="sk-test", max_retries=0)
        msgs = [{"role": "user", "content": "price me exactly"}]
        flex = await oa.chat.completions.create(model="gpt-5", messages=msgs, service_tier="flex")  # type: ignore[arg-type]
        std = await oa.chat.completions.create(model="gpt-5", messages=msgs)  # type: ignore[arg-type]
        await oa.close()
        an = anthropic.AsyncAnthropic(base_url=f"{gw}/anthropic", api_key="sk-ant-test", max_retries=0)
        h = {
            "x-fake-cache-creation-tokens": "1000",
            "x-fake-cache-1h-tokens": "2000",
            "x-fake-cached-tokens": "500",
        }
        m = await an.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=100,
            messages=msgs,
            extra_headers=h,  # type: ignore[arg-type]
        )
        async with an.messages.stream(
            model="claude-sonnet-4-6",
            max_tokens=100,
            messages=msgs,
            extra_headers=h,  # type: ignore[arg-type]
        ) as s:
            await s.get_final_message()
        await an.close()
        r_flex, r_std, r_msg, r_stream = await records(q, 4)
    assert flex.service_tier == "flex" and r_flex.usage.service_tier == "flex"
    assert flex.usage is not None and std.usage is not None
    p, c = flex.usage.prompt_tokens, flex.usage.completion_tokens
    for rec in (r_flex, r_std, r_msg, r_stream):
        apply_cost(rec)
    # gpt-5 per 1M: standard 1.25 in / 10 out, flex 0.625 / 5.
    assert r_flex.cost_nanos == cost_nanos(p, c, 0.625, 5) and r_std.cost_nanos == cost_nanos(p, c, 1.25, 10)
    # claude-sonnet-4-6 per 1M: input 3, 5-minute write 3.75, 1-hour write 6, read 0.30, output 15.
    assert m.usage.cache_creation is not None and m.usage.cache_creation.ephemeral_1h_input_tokens == 2000
    inp, out = m.usage.input_tokens, m.usage.output_tokens
    want = round((inp * 3 + 1000 * 3.75 + 2000 * 6 + 500 * 0.30 + out * 15) / 1e6 * 1e9)
    assert r_msg.cost_nanos == want and r_stream.cost_nanos == want
    assert r_stream.streamed and r_stream.usage.cache_write_1h_tokens == 2000


def nanos(*terms: tuple[int, str]) -> int:
    """Sum of count * USD-per-million, in 1e-9 USD rounded half-up (exact decimal arithmetic)."""
    total = sum((Decimal(n) * Decimal(p) for n, p in terms), Decimal(0)) / Decimal(1_000_000)
    return int((total * 1_000_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def upstream_bodies(port: int) -> list[dict[str, object]]:
    """The JSON request bodies the fake upstream received, in order."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/_fake/requests") as r,
    ):
        got = await r.json()
    return [json.loads(base64.b64decode(x["body_b64"])) for x in got["requests"]]


RESPONSES_INPUT = [{"role": "user", "content": [{"type": "input_text", "text": "what is the weather"}]}]
RESPONSES_KNOBS = {"x-fake-cached-tokens": "40", "x-fake-reasoning-tokens": "30", "x-fake-web-searches": "2"}
# What the fake reports for that request, written out: input = PROMPT_OVERHEAD 8 + "be brief" 2 +
# "what is the weather" 4 visible, + 40 cached; output = "echo: what is the weather" 5 + 30 reasoning.
R_VISIBLE, R_CACHED, R_REPLY, R_REASONING = 14, 40, 5, 30
R_PROMPT, R_COMPLETION = R_VISIBLE + R_CACHED, R_REPLY + R_REASONING
# gpt-5 per 1M: input 1.25, cached input 0.125, output (reasoning included) 10; the web search
# tool 10 USD per 1,000 calls, i.e. 10,000 per 1M.
GPT5_RESPONSES_COST = nanos((R_VISIBLE, "1.25"), (R_CACHED, "0.125"), (R_COMPLETION, "10"), (2, "10000"))


async def test_openai_responses_api_through_the_sdk(upstream: int, tmp_path: Path) -> None:
    """`client.responses.create`, plain and streamed, and an error: the SDK parses what the
    gateway relays, and the record has the provider's exact usage, web searches and cost."""
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (_, gw):
        oa = openai.AsyncOpenAI(base_url=f"{gw}/openai/v1", api_key="sk-test", max_retries=0)
        plain = await oa.responses.create(
            model="gpt-5",
            instructions="be brief",
            input=RESPONSES_INPUT,  # type: ignore[arg-type]
            extra_headers=RESPONSES_KNOBS,
        )
        stream = await oa.responses.create(
            model="gpt-5",
            instructions="be brief",
            input=RESPONSES_INPUT,  # type: ignore[arg-type]
            stream=True,
            extra_headers=RESPONSES_KNOBS,
        )
        events = [event async for event in stream]
        with pytest.raises(openai.BadRequestError) as info:
            await oa.responses.create(model="gpt-5", input="hi", extra_headers={"x-fake-status": "400"})
        await oa.close()
        r_plain, r_stream, r_err = await records(q, 3)
        sent = await upstream_bodies(upstream)
    assert plain.status == "completed" and plain.output_text == "echo: what is the weather"
    assert [o.type for o in plain.output] == ["reasoning", "web_search_call", "web_search_call", "message"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "echo: what is the weather"
    done = events[-1]
    assert done.type == "response.completed" and done.response.status == "completed"
    assert done.response.output_text == "echo: what is the weather"
    for u in (plain.usage, done.response.usage):
        assert u is not None
        assert (u.input_tokens, u.output_tokens, u.total_tokens) == (
            R_PROMPT,
            R_COMPLETION,
            R_PROMPT + R_COMPLETION,
        )
        assert u.input_tokens_details.cached_tokens == R_CACHED
        assert u.output_tokens_details.reasoning_tokens == R_REASONING
    # The gateway asks for no stream usage here: a Responses stream always ends with it.
    assert sent[1].get("stream") is True and "stream_options" not in sent[1]
    for rec, streamed in ((r_plain, False), (r_stream, True)):
        assert rec.provider == "openai" and rec.model == "gpt-5" and rec.status == 200
        assert rec.path == "/v1/responses" and rec.streamed is streamed
        u = rec.usage
        assert u.source == "provider"
        assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
            R_PROMPT,
            R_COMPLETION,
            R_PROMPT + R_COMPLETION,
        )
        assert (u.cached_tokens, u.reasoning_tokens, u.web_search_requests) == (R_CACHED, R_REASONING, 2)
        assert u.cache_write_tokens is None
        apply_cost(rec)
        assert rec.cost_nanos == GPT5_RESPONSES_COST, streamed
    assert info.value.status_code == 400
    assert r_err.status == 400 and r_err.provider == "openai" and r_err.path == "/v1/responses"
    assert r_err.error == "Invalid request (forced by x-fake-status)."
    assert r_err.usage.source != "provider" and r_err.usage.prompt_tokens is None


async def test_a_cut_responses_stream_stores_the_output_the_client_got(upstream: int, tmp_path: Path) -> None:
    """rev28c: a Responses stream cut before `response.completed` was stored with the last
    `response` object's `output: []` (`response.in_progress`) although the client had text."""
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (_, gw):
        oa = openai.AsyncOpenAI(base_url=f"{gw}/openai/v1", api_key="sk-test", max_retries=0)
        ask = {"model": "gpt-5", "input": "one two three four five six", "stream": True}
        whole = [e async for e in await oa.responses.create(**ask)]  # type: ignore[call-overload]
        got: dict[int, str] = {}
        for cut in (8, len(whole) - 1):  # in the message's text; all but `response.completed`
            text = ""
            with pytest.raises(openai.APIConnectionError):
                stream = await oa.responses.create(**ask, extra_headers={"x-fake-cut-after": str(cut)})
                async for e in stream:
                    text += e.delta if e.type == "response.output_text.delta" else ""
            got[cut] = text
        await oa.close()
        recs = await records(q, 3)
    stored = [json.loads(body_bytes(r.response_body) or b"") for r in recs if r.response_body]
    assert len(stored) == 3
    done, part, all_but_end = stored
    assert whole[-1].type == "response.completed"
    assert done == whole[-1].response.model_dump(mode="json", exclude_unset=True)  # as before
    assert got[8] and part["status"] == "in_progress"
    (message,) = (i for i in part["output"] if i["type"] == "message")
    assert message["status"] == "in_progress" and message["content"][0]["text"] == got[8]
    # Every item finished before the cut: the output the completed stream has.
    assert got[len(whole) - 1] == whole[-1].response.output_text

    def unnamed(output: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in item.items() if k != "id"} for item in output]  # ids are per call

    assert all_but_end["status"] == "in_progress" and unnamed(all_but_end["output"]) == unnamed(
        done["output"]
    )


async def test_a_cut_responses_stream_keeps_the_text_its_item_and_part_came_with(tmp_path: Path) -> None:
    """rev29c: a cut stream's stored output held only the deltas: a part added with text "Hel"
    then a delta "lo" stored "lo", a call added with arguments `{"a":` then `1}` stored `1}`.
    The SDK appends each delta to what the item or part holds: the record has what it had."""
    pending = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1",
        "status": "in_progress",
        "output": [],
    }
    call = {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":'}
    msg = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "Hel", "annotations": []}
    at = {"item_id": "msg_1", "output_index": 1, "content_index": 0}
    events = [
        {"type": "response.created", "sequence_number": 0, "response": pending},
        {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": call},
        {"type": "response.function_call_arguments.delta", "sequence_number": 2, "item_id": "fc_1"}
        | {"output_index": 0, "delta": "1}"},
        {"type": "response.output_item.added", "sequence_number": 3, "output_index": 1, "item": msg},
        {"type": "response.content_part.added", "sequence_number": 4, **at, "part": part},
        {"type": "response.output_text.delta", "sequence_number": 5, **at, "delta": "lo", "logprobs": []},
    ]
    sse = b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events
    )

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=sse, content_type="text/event-stream")

    runner, port = await tiny_upstream(answer)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (_, gw):
            oa = openai.AsyncOpenAI(base_url=f"{gw}/openai/v1", api_key="sk-test", max_retries=0)
            async with oa.responses.stream(model="gpt-4.1", input="hi") as stream:
                got = {e.type: e.snapshot async for e in stream if e.type.endswith(".delta")}
            await oa.close()
            (rec,) = await records(q, 1)
    finally:
        await runner.cleanup()
    assert got == {"response.function_call_arguments.delta": '{"a":1}', "response.output_text.delta": "Hello"}
    stored = json.loads(body_bytes(rec.response_body) or b"")
    assert stored["output"] == [
        {**call, "arguments": '{"a":1}'},
        {**msg, "content": [{**part, "text": "Hello"}]},
    ]


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-X",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_x",
        "choices": [{"index": 0, "delta": delta, **choice, "finish_reason": finish}],
    }


async def stored_stream(
    tmp_path: Path, events: list[dict[str, Any]], *, usage_chunk: bool = True, **create: Any
) -> tuple[list[Any], LogRecord]:
    """Stream `events` (OpenAI's wire chunks, then its usage chunk and `[DONE]`) to the SDK
    through the gateway; what the SDK got and the record as the worker stores it."""
    usage = {**chat_chunk({}), "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 6}}
    ends = [usage] if usage_chunk else []
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in [*events, *ends])

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=sse + b"data: [DONE]\n\n", content_type="text/event-stream")

    runner, port = await tiny_upstream(answer)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (_, gw):
            oa = openai.AsyncOpenAI(base_url=f"{gw}/openai/v1", api_key="sk-test", max_retries=0)
            got = [
                c async for c in await oa.chat.completions.create(messages=MESSAGES, stream=True, **create)
            ]
            await oa.close()
            (rec,) = await records(q, 1)
    finally:
        await runner.cleanup()
    if streams.deferred(rec):
        streams.finish(rec, 1 << 20)  # the worker's first handler
    return got, rec


async def test_a_streamed_legacy_function_call_is_stored_as_a_non_stream_answer_has_it(
    tmp_path: Path,
) -> None:
    """rev28c: `delta.function_call` (`functions=`) was dropped: the record said
    `finish_reason: "function_call"` with no call, and search did not find its arguments."""
    events = [
        chat_chunk(
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ""}}
        ),
        chat_chunk({"function_call": {"arguments": '{"city":'}}),
        chat_chunk({"function_call": {"arguments": '"Paris"}'}}),
        chat_chunk({}, "function_call"),
    ]
    fn = [{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    got, rec = await stored_stream(tmp_path, events, model="gpt-4o-mini", functions=fn)
    calls = [c.choices[0].delta.function_call for c in got if c.choices and c.choices[0].delta.function_call]
    sent = {"name": calls[0].name, "arguments": "".join(c.arguments or "" for c in calls)}
    assert sent == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    (choice,) = json.loads(body_bytes(rec.response_body) or b"")["choices"]
    # OpenAI's non-stream answer: {"role": "assistant", "content": null, "function_call": {...}, ...}
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": None, "function_call": sent},
        "finish_reason": "function_call",
    }
    assert '"paris"' in (record_text(rec) or "")


async def test_streamed_logprobs_annotations_and_audio_are_stored_as_a_non_stream_answer_has_them(
    tmp_path: Path,
) -> None:
    """rev28c: `choices[].logprobs` (a list per chunk), `delta.annotations` (a search model's
    citations) and `delta.audio` were dropped from a stream's rebuilt message."""

    def lp(token: str) -> dict[str, Any]:
        return {"token": token, "logprob": -0.01, "bytes": list(token.encode()), "top_logprobs": []}

    cite = {"type": "url_citation", "url_citation": {"url": "https://example.com", "title": "Ex"}}
    cite["url_citation"] |= {"start_index": 0, "end_index": 5}
    events = [
        chat_chunk({"role": "assistant", "content": "", "refusal": None, "annotations": []}, logprobs=None),
        chat_chunk({"content": "Paris"}, logprobs={"content": [lp("Paris")], "refusal": None}),
        chat_chunk({"content": " is"}, logprobs={"content": [lp(" is")], "refusal": None}),
        chat_chunk({"annotations": [cite]}),
        chat_chunk({"audio": {"id": "audio_1", "transcript": "Paris", "expires_at": 1700000000}}),
        chat_chunk({"audio": {"data": "UklGRg=="}}),
        chat_chunk({"audio": {"data": "AAAA", "transcript": " is"}}),
        chat_chunk({}, "stop", logprobs=None),
    ]
    got, rec = await stored_stream(tmp_path, events, model="gpt-4o-search-preview", logprobs=True)
    tokens = [
        t.model_dump()
        for c in got
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or ()
    ]
    assert [t["token"] for t in tokens] == ["Paris", " is"]
    deltas = [c.choices[0].delta.model_dump() for c in got if c.choices]  # (not in the SDK's types)
    assert [a for d in deltas for a in d.get("annotations") or ()] == [cite]
    (choice,) = json.loads(body_bytes(rec.response_body) or b"")["choices"]
    assert choice["logprobs"] == {"content": tokens, "refusal": None}
    assert choice["message"] == {
        "role": "assistant",
        "content": "Paris is",
        "annotations": [cite],
        "audio": {
            "id": "audio_1",
            "data": "UklGRg==AAAA",
            "expires_at": 1700000000,
            "transcript": "Paris is",
        },
    }


async def test_a_streamed_audio_member_of_any_shape_keeps_the_record_whole(tmp_path: Path) -> None:
    """rev29c: a `delta.audio` member holding a list of non-strings (`"id": ["a", 1]`) raised out
    of the rebuild: without a usage chunk the gateway stored a bare record (no bodies, no tokens,
    `upstream_error`), with one the worker stored it without its message."""
    events = [
        chat_chunk({"role": "assistant", "content": "Hi", "audio": {"id": ["a", 1], "transcript": "Hi"}}),
        chat_chunk({"audio": {"data": "AAAA", "extra": [1, 2]}}),
        chat_chunk({}, "stop"),
    ]
    for usage_chunk in (False, True):
        _, rec = await stored_stream(tmp_path, events, usage_chunk=usage_chunk, model="gpt-4o-audio-preview")
        assert rec.outcome == "completed" and rec.error is None
        (choice,) = json.loads(body_bytes(rec.response_body) or b"")["choices"]
        assert choice["message"] == {
            "role": "assistant",
            "content": "Hi",
            "audio": {"id": ["a", 1], "data": "AAAA", "expires_at": None, "transcript": "Hi"}
            | {"extra": [1, 2]},
        }
        assert rec.usage.source == ("provider" if usage_chunk else "missing")


async def test_openai_responses_cache_writes_priced_at_the_write_rate(upstream: int, tmp_path: Path) -> None:
    """Responses `cache_write_tokens` (streamed) are part of the input and billed at the write price."""
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (_, gw):
        oa = openai.AsyncOpenAI(base_url=f"{gw}/openai/v1", api_key="sk-test", max_retries=0)
        async with oa.responses.stream(
            model="gpt-5.6-cyber",
            input="price my cache writes",
            extra_headers={"x-fake-cached-tokens": "2000", "x-fake-cache-creation-tokens": "3000"},
        ) as stream:
            final = await stream.get_final_response()
        await oa.close()
        (rec,) = await records(q, 1)
    # input = PROMPT_OVERHEAD 8 + 4 words + 2000 read + 3000 written; output "echo: price my cache writes" 5.
    assert final.usage is not None and final.usage.input_tokens == 5_012
    assert final.usage.input_tokens_details.cache_write_tokens == 3_000
    assert rec.streamed and rec.usage.source == "provider"
    assert (rec.usage.prompt_tokens, rec.usage.cached_tokens, rec.usage.cache_write_tokens) == (
        5_012,
        2_000,
        3_000,
    )
    assert rec.usage.completion_tokens == 5
    apply_cost(rec)
    # gpt-5.6-cyber per 1M: 12.5 in / 15.625 cache write / 1.25 cache read / 75 out.
    assert rec.cost_nanos == nanos((12, "12.5"), (3_000, "15.625"), (2_000, "1.25"), (5, "75"))


async def test_a_stopped_gateway_gives_its_process_the_collector_back(upstream: int, tmp_path: Path) -> None:
    """Start-up freezes what exists and raises gen0's threshold; an application (or a test
    session) embedding the gateway kept both after stopping it, for good."""
    import gc

    frozen, threshold = gc.get_freeze_count(), gc.get_threshold()
    async with running_gateway(settings_for(upstream, tmp_path)):
        assert gc.get_freeze_count() > frozen
    assert (gc.get_freeze_count(), gc.get_threshold()) == (frozen, threshold)
    # Two, stopped in the order they started: the collector is back once the last stopped.
    a = running_gateway(settings_for(upstream, tmp_path / "a"))
    b = running_gateway(settings_for(upstream, tmp_path / "b"))
    await a.__aenter__()
    await b.__aenter__()
    await a.__aexit__(None, None, None)
    assert gc.get_freeze_count() > frozen and gc.get_threshold() != threshold  # b still serves
    await b.__aexit__(None, None, None)
    assert (gc.get_freeze_count(), gc.get_threshold()) == (frozen, threshold)
