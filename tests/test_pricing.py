"""Cost: our fast path must agree with genai-prices' own `calc_price`, to the nano-dollar."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
from genai_prices import calc_price, data_snapshot

from llmtap import pricing
from llmtap.record import LogRecord, Usage

NOW = datetime.now(UTC)

OPENAI = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-5", "o3-mini", "o4-mini", "gpt-4o-2024-08-06"]
ANTHROPIC = ["claude-sonnet-4-5", "claude-3-5-haiku-20241022", "claude-opus-4", "claude-sonnet-4-5-20250929"]

# (prompt, completion, cached, cache_write, reasoning) in each provider's own reporting terms
USAGES = [
    (1000, 200, None, None, None),
    (1234, 567, 1024, None, None),
    (50_000, 4_000, 49_152, None, 3_000),
    (1, 0, None, None, None),
    (0, 0, None, None, None),
]
# Anthropic's own counts: (input_tokens, output_tokens, cache_read, cache_creation) — disjoint.
ANTHROPIC_RAW = [
    (1000, 200, None, None),
    (12, 345, 20_000, None),
    (12, 345, 20_000, 3_000),
    (3, 10, None, 150_000),
    (150_000, 2_000, 60_000, None),  # 210k input in total: over the 200k tier
    (199_999, 1, None, None),
    (200_000, 1, None, None),  # the tier applies above 200k, not at it
    (200_001, 1, None, None),
]


def _usage(
    prompt: int, completion: int, cached: int | None, write: int | None, reasoning: int | None
) -> Usage:
    """A record's usage (OpenAI convention: prompt includes cached and cache-write tokens)."""
    return Usage(
        source="provider",
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=cached,
        cache_write_tokens=write,
        reasoning_tokens=reasoning,
    )


def _anthropic_record_usage(inp: int, out: int, read: int | None, write: int | None) -> Usage:
    """What the gateway records for an Anthropic response (see llmtap.providers.anthropic)."""
    return _usage(inp + (read or 0) + (write or 0), out, read, write, None)


def _expected_raw(
    model: str, provider: str, inp: int, out: int, read: int | None, write: int | None
) -> Decimal:
    """genai-prices' answer from the provider's raw numbers, translated by hand."""
    from genai_prices import Usage as GUsage

    g = GUsage(input_tokens=inp, output_tokens=out, cache_read_tokens=read, cache_write_tokens=write)
    return calc_price(g, model, provider_id=provider, genai_request_timestamp=NOW).total_price


def _expected(provider: str, model: str, usage: Usage) -> Decimal:
    assert usage.prompt_tokens is not None and usage.completion_tokens is not None
    return _expected_raw(
        model,
        provider,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_tokens or None,
        usage.cache_write_tokens or None,
    )


def _nanos(d: Decimal) -> int:
    return int((d * 1_000_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.mark.parametrize("model", OPENAI)
@pytest.mark.parametrize("u", USAGES)
def test_openai_models_match_calc_price(
    model: str, u: tuple[int, int, int | None, int | None, int | None]
) -> None:
    usage = _usage(*u)
    cost = pricing.price_usage("openai", model, usage, NOW)
    assert cost is not None
    want = _expected("openai", model, usage)
    assert cost.nanos == _nanos(want)
    assert cost.usd == pytest.approx(float(want), rel=1e-12, abs=1e-15)
    assert cost.version.startswith(f"genai-prices=={pricing.PRICE_LIB_VERSION}@")


@pytest.mark.parametrize("model", ANTHROPIC)
@pytest.mark.parametrize("raw", ANTHROPIC_RAW)
def test_anthropic_models_match_calc_price(model: str, raw: tuple[int, int, int | None, int | None]) -> None:
    inp, out, read, write = raw
    cost = pricing.price_usage("anthropic", model, _anthropic_record_usage(*raw), NOW)
    assert cost is not None
    # genai-prices' input_tokens are all input tokens: Anthropic's input + cache read + write
    want = _expected_raw(model, "anthropic", inp + (read or 0) + (write or 0), out, read, write)
    assert cost.nanos == _nanos(want)
    assert cost.usd == pytest.approx(float(want), rel=1e-12, abs=1e-15)


def test_cached_tokens_are_cheaper_and_semantics_differ_by_provider() -> None:
    # OpenAI: 1000 prompt tokens of which 800 cached cost less than 1000 uncached.
    plain = pricing.price_usage("openai", "gpt-4o", _usage(1000, 0, None, None, None), NOW)
    cached = pricing.price_usage("openai", "gpt-4o", _usage(1000, 0, 800, None, None), NOW)
    assert plain and cached and cached.nanos < plain.nanos
    # gpt-4o: $2.50/MTok input, $1.25/MTok cached: (200*2.5 + 800*1.25) / 1e6 = $0.0015
    assert cached.nanos == 1_500_000
    # Anthropic: 1000 uncached input tokens plus 800 cache reads cost more than the 1000 alone,
    # and 800 cache writes cost more than 800 plain input tokens (claude-opus-4: $15 in,
    # $1.50 read, $18.75 write per MTok).
    a_plain = pricing.price_usage(
        "anthropic", "claude-opus-4", _anthropic_record_usage(1000, 0, None, None), NOW
    )
    a_read = pricing.price_usage(
        "anthropic", "claude-opus-4", _anthropic_record_usage(1000, 0, 800, None), NOW
    )
    a_write = pricing.price_usage(
        "anthropic", "claude-opus-4", _anthropic_record_usage(1000, 0, None, 800), NOW
    )
    assert a_plain and a_read and a_write
    assert a_plain.nanos == 15_000_000
    assert a_read.nanos == 15_000_000 + 1_200_000
    assert a_write.nanos == 15_000_000 + 15_000_000


def test_unknown_model_or_missing_usage_is_none_not_zero() -> None:
    assert pricing.price_usage("openai", "no-such-model-xyz", _usage(10, 10, None, None, None), NOW) is None
    assert pricing.price_usage("nosuchprovider", "gpt-4o", _usage(10, 10, None, None, None), NOW) is None
    assert pricing.price_usage("openai", None, _usage(10, 10, None, None, None), NOW) is None
    assert pricing.price_usage("openai", "gpt-4o", Usage(), NOW) is None
    assert pricing.price_usage("openai", "gpt-4o", Usage(prompt_tokens=10, total_tokens=15), NOW) is None
    # more cached tokens than prompt tokens: inconsistent, no cost
    assert pricing.price_usage("openai", "gpt-4o", _usage(10, 10, 20, None, None), NOW) is None
    # embeddings: prompt == total and no completion: input only
    emb = pricing.price_usage(
        "openai", "text-embedding-3-small", Usage(prompt_tokens=1000, total_tokens=1000), NOW
    )
    want = calc_price(
        __import__("genai_prices").Usage(input_tokens=1000, output_tokens=0),
        "text-embedding-3-small",
        provider_id="openai",
    ).total_price
    assert emb is not None and emb.nanos == _nanos(want)


def test_every_openai_and_anthropic_model_agrees_with_the_library() -> None:
    """Fast path and fallback together, over the whole bundled table."""
    snap = data_snapshot.get_snapshot()
    checked = 0
    for provider in snap.providers:
        if provider.id not in ("openai", "anthropic"):
            continue
        for model in provider.models:
            ref = model.id
            # An entry llmtap fills from a sibling is checked against the sibling's prices.
            lib_ref = pricing._BORROWED.get((provider.id, ref), ref)
            for u in [(5000, 700, 1000, None, None), (300_000, 10, None, None, None)]:
                usage = _usage(*u)
                try:
                    want = _expected(provider.id, lib_ref, usage)
                except (LookupError, ValueError):
                    continue
                cost = pricing.price_usage(provider.id, ref, usage, NOW)
                assert cost is not None, ref
                assert cost.nanos == _nanos(want), (ref, u, cost, want)
                checked += 1
    assert checked > 100


def _record(provider: str, path: str, **fields: Any) -> LogRecord:
    """A record of a call to `path`, for `apply_cost`."""
    return LogRecord(
        id="r1",
        provider=provider,
        target_url="https://upstream.example" + path,
        method=fields.pop("method", "POST"),
        path=path,
        started_at=NOW,
        ended_at=NOW,
        latency_ms=1.0,
        **fields,
    )


def test_apply_cost_fills_the_record() -> None:
    rec = _record(
        "openai", "/v1/chat/completions", model="gpt-4o-mini", usage=_usage(1000, 100, None, None, None)
    )
    pricing.apply_cost(rec)
    assert rec.cost_nanos == _nanos(_expected("openai", "gpt-4o-mini", rec.usage))
    assert rec.cost_usd == pytest.approx(rec.cost_nanos / 1e9)
    assert rec.price_version and rec.price_version.endswith(NOW.date().isoformat())
    rec.model = "unknown-model"
    pricing.apply_cost(rec)
    assert rec.cost_usd is None and rec.cost_nanos is None and rec.price_version is None


@pytest.mark.parametrize(
    ("status", "outcome", "source", "want"),
    [
        (429, "completed", "missing", 0),  # the provider refused: nothing generated, nothing billed
        (400, "completed", "missing", 0),
        (529, "client_disconnected", "missing", 0),
        (502, "upstream_unreachable", "missing", 0),  # never connected
        (None, "upstream_unreachable", "missing", 0),
        (504, "upstream_timeout", "missing", None),  # the provider may have finished and billed
        (200, "completed", "missing", None),  # an answer without usage: its cost is unknown
        (200, "upstream_cut", "partial", None),  # provisional counts: the real cost is higher
        (200, "completed", "partial", None),  # an error event ended the stream before its usage
        (200, "completed", "provider", "priced"),
        (400, "completed", "provider", "priced"),  # an error with usage is billed as reported
    ],
)
def test_what_a_request_without_final_usage_costs(
    status: int | None, outcome: str, source: str, want: int | str | None
) -> None:
    """Unknown is None ("unpriced", never a guess); a failed call the provider did not bill is 0."""
    counted = source != "missing"
    rec = _record(
        "anthropic",
        "/v1/messages",
        model="claude-sonnet-4-5",
        status=status,
        outcome=outcome,  # type: ignore[arg-type]
        usage=Usage(
            source=source,  # type: ignore[arg-type]
            prompt_tokens=12 if counted else None,
            completion_tokens=1 if counted else None,
            total_tokens=13 if counted else None,
        ),
    )
    pricing.apply_cost(rec)
    if want == "priced":
        assert rec.cost_nanos == _nanos(_expected("anthropic", "claude-sonnet-4-5", rec.usage)) > 0
        assert rec.price_version is not None
    elif want == 0:
        assert (rec.cost_usd, rec.cost_nanos) == (0.0, 0)
    else:
        assert (rec.cost_usd, rec.cost_nanos, rec.price_version) == (None, None, None)


@pytest.mark.parametrize(
    ("provider", "method", "path", "want"),
    [
        ("openai", "GET", "/v1/responses/resp_1", 0),  # a look-up of an answer billed once already
        ("openai", "GET", "/v1/models", 0),
        ("openai", "POST", "/v1/responses/resp_1/cancel", 0),
        ("openai", "POST", "/v1/moderations", 0),
        ("anthropic", "POST", "/v1/messages/count_tokens", 0),
        ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:countTokens", 0),
        # Uploads and batches or jobs created generate nothing yet (an outside check, 2026-12-05)
        ("openai", "POST", "/v1/files", 0),
        ("openai", "POST", "/v1/batches", 0),
        ("openai", "POST", "/v1/uploads", 0),
        ("anthropic", "POST", "/v1/complete", None),  # legacy text completions: billed
        ("openai", "POST", "/v1/fine_tuning/jobs", 0),
        ("anthropic", "POST", "/v1/messages/batches", 0),
        ("gemini", "POST", "/upload/v1beta/files", 0),
        ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", 0),
        ("gemini", "POST", "/v1beta/models/gemini-embedding-001:batchEmbedContents", None),  # billed now
        ("openai", "POST", "/v1/chat/completions", None),  # generated, but no usage came: unknown
        ("gemini", "POST", "/v1beta/models/gemini-embedding-001:embedContent", None),
    ],
)
def test_calls_that_are_never_billed_cost_zero(
    provider: str, method: str, path: str, want: int | None
) -> None:
    rec = _record(provider, path, method=method, model="gpt-4o-mini", status=200)
    pricing.apply_cost(rec)
    assert rec.cost_nanos == want


def test_borrowed_entries_are_still_gaps_in_the_table() -> None:
    """When a genai-prices release prices a borrowed model itself, `_BORROWED` can lose it."""
    snap = data_snapshot.get_snapshot()
    for (provider, model), sibling in pricing._BORROWED.items():
        big = __import__("genai_prices").Usage(input_tokens=300_000, output_tokens=1_000)
        own = calc_price(big, model, provider_id=provider, genai_request_timestamp=NOW).total_price
        theirs = calc_price(big, sibling, provider_id=provider, genai_request_timestamp=NOW).total_price
        assert own != theirs, f"genai-prices {pricing.PRICE_LIB_VERSION} prices {model} itself now"
        assert snap.find_provider_model(model, None, provider, None)[1].id == model


def test_cost_is_cheap_per_record() -> None:
    usages = [_usage(1000 + i, 200, 512, None, None) for i in range(2000)]
    models = ["gpt-4o", "gpt-4.1", "claude-sonnet-4-5"]
    for m in models:  # warm the caches
        pricing.price_usage("anthropic" if "claude" in m else "openai", m, usages[0], NOW)
    t = time.perf_counter()
    n = 0
    for u in usages:
        for m in models:
            pricing.price_usage("anthropic" if "claude" in m else "openai", m, u, NOW)
            n += 1
    per = (time.perf_counter() - t) / n * 1e6
    print(f"\ncost: {per:.2f} µs per record")
    assert per < 40, f"{per:.1f} µs per record: the fast path is not being used"


def test_auto_update_is_off() -> None:
    assert not data_snapshot.get_snapshot().from_auto_update
