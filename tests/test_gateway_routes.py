"""Azure OpenAI and named OpenAI-compatible upstreams through the gateway, with the real `openai`
SDK, and the validation of `LLMTAP_UPSTREAMS`.

Expected costs are computed here from published prices (USD per 1M tokens), never with llmtap's
pricing code.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import openai
import pytest

from gateway_support import MemoryQueue, running_gateway, settings_for, wait_for
from llmtap.config import load_settings
from llmtap.errors import ConfigError
from llmtap.pricing import apply_cost
from llmtap.record import LogRecord, encode
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
    assert q.messages == []


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


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("openai=http://10.0.0.5:8000", "taken by llmtap's own /openai/ route"),
        ("gemini=http://10.0.0.5:8000", "taken by llmtap's own /gemini/ route"),
        ("healthz=http://10.0.0.5:8000", "taken"),
        ("vllm", "is not name=url"),
        ("vllm=ftp://10.0.0.5", "needs an http:// or https:// URL"),
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
            model="claude-sonnet-4-5",
            max_tokens=100,
            messages=msgs,
            extra_headers=h,  # type: ignore[arg-type]
        )
        async with an.messages.stream(
            model="claude-sonnet-4-5",
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
    # claude-sonnet-4-5 per 1M: input 3, 5-minute write 3.75, 1-hour write 6, read 0.30, output 15.
    assert m.usage.cache_creation is not None and m.usage.cache_creation.ephemeral_1h_input_tokens == 2000
    inp, out = m.usage.input_tokens, m.usage.output_tokens
    want = round((inp * 3 + 1000 * 3.75 + 2000 * 6 + 500 * 0.30 + out * 15) / 1e6 * 1e9)
    assert r_msg.cost_nanos == want and r_stream.cost_nanos == want
    assert r_stream.streamed and r_stream.usage.cache_write_1h_tokens == 2000
