"""Request cost from the maintained `genai-prices` table, fast enough to run on every record.

`genai_prices.calc_price` costs ~120-150 µs a call (model matching, unit decomposition, Decimal
arithmetic), far too slow per record for a worker that should do thousands per second. So:

- the model lookup is cached per (provider, model), misses included;
- the model's price object is resolved once per (provider, model, UTC day) — prices change by
  date (`StartDateConstraint`), never within a day except for time-of-day prices, which we leave
  to the library;
- the plain token case (input, cache read, cache write, output; flat or tiered by input size) is
  computed here with integers: prices per million tokens scaled by 1e6 are integers, so the sum
  is exact in pico-USD and `cost_nanos` is the exact cost rounded half-up to 1e-9 USD;
- anything else (per-request fees, server-side web searches, audio and image tokens, 1-hour
  cache writes, time-of-day prices, prices with more than six decimals) falls back to the library's
  own calculation on the cached price object;
- a reported `service_tier` of `flex` or `priority` selects that tier's prices (the table's
  price variants); every other tier is the standard price;
- Anthropic's US-only inference multiplies the token prices by 1.1; its fast mode, whose
  multiplier differs by model and is not in the table, leaves the cost unknown;
- audio billed by its length (whisper-1's `seconds`) and speech by its input's characters
  (tts-1) are priced per those units, where the table has them.

Usage semantics: the record follows OpenAI's convention for every provider (the gateway's
provider parsers normalise to it, see `llmtap.providers.anthropic`), which is also genai-prices'
(its `input_tokens` counts *all* input tokens):

- `prompt_tokens` includes `cached_tokens` (billed at the cache-read price) and
  `cache_write_tokens` (billed at the cache-write price). OpenAI reports it so; Anthropic's own
  `input_tokens` excludes cache reads and writes, so the gateway adds them.
- `reasoning_tokens` are part of `completion_tokens` (billed as output).

Unknown model, unknown provider, missing or inconsistent usage → no cost (`None`), never a
made-up 0; so are a cut stream's provisional counts (`usage.source == "partial"`: Anthropic's
placeholder output count) and audio or image tokens on a model whose entry has no price for them. A call
that generated nothing (an error answered without usage, a 429; a look-up; counting tokens)
costs `0`, so that "unpriced" counts only the costs we do not know.

Prices come from the data bundled with the installed genai-prices release: we never start its
`UpdatePrices` background fetcher, so nothing is fetched at run time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

import genai_prices
import msgspec
from genai_prices import data_snapshot
from genai_prices import types as gp

from llmtap.limits import MAX_BILLED_USD, MAX_NARROW_COUNT, NARROW_USAGE
from llmtap.providers import pricing_id, provider_for

if TYPE_CHECKING:
    from llmtap.record import LogRecord, Usage

__all__ = ["PRICE_LIB_VERSION", "Cost", "apply_cost", "genai_usage", "price_usage"]

PRICE_LIB_VERSION: str = genai_prices.__version__

_TOKEN_KEYS = ("input_mtok", "cache_read_mtok", "cache_write_mtok", "output_mtok")
# Priced units whose usage we never report (and that no reported usage descends from): they
# contribute nothing, exactly as in the library's decomposition.
_ZERO_KEYS = frozenset(
    {
        "cache_write_5m_mtok",
        "cache_write_1h_mtok",
        "web_searches_kcount",
        "storage_searches_kcount",
        "code_executions_kcount",
        "social_searches_kcount",
        "rerank_searches_kcount",
    }
)
_MAX_CACHE = 10_000  # model names come from clients: bound the caches
#: Gaps in the bundled table, filled with a sibling's entry that has the same published prices
#: (checked against the providers' price pages; `test_pricing.py` says when a release fixes one).
#: Claude Sonnet 4 costs what Sonnet 4.5 does, long-context tiers (> 200k input tokens) included,
#: but genai-prices 0.2.3-0.2.5 gives it the base rates at any size.
_BORROWED = {("anthropic", "claude-sonnet-4-0"): "claude-sonnet-4-5"}


@dataclass(frozen=True, slots=True)
class Cost:
    usd: float
    nanos: int  # exact, in 1e-9 USD
    version: str  # which price data: genai-prices release + the day whose prices applied


# A rate is the price per million tokens scaled by 1e6 (= pico-USD per token), as a ladder of
# (threshold, rate) from the base (-1) up: the last threshold the total input exceeds applies.
_Ladder = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class _Fast:
    input: _Ladder
    cache_read: _Ladder | None
    cache_write: _Ladder | None
    output: _Ladder | None
    price: gp.ModelPrice  # for usage with more than the four plain counts (audio, 1-hour writes)


@dataclass(frozen=True, slots=True)
class _Slow:
    """The library computes it: `price` for the day, or per timestamp when `model` is set."""

    price: gp.ModelPrice | None
    model: gp.ModelInfo | None = None


_Plan = _Fast | _Slow

_models: dict[tuple[str, str], gp.ModelInfo | None] = {}
_plans: dict[tuple[str, str, date, str | None], _Plan] = {}
#: Service tiers with their own prices in the table (OpenAI's `flex` and `priority`); any other
#: reported tier (`default`, `standard`, `auto`) is the standard price.
_PRICED_TIERS = frozenset({"flex", "priority"})


def _snapshot() -> data_snapshot.DataSnapshot:
    return data_snapshot.get_snapshot()


def _find_model(provider: str, model: str) -> gp.ModelInfo | None:
    key = (provider, model)
    try:
        return _models[key]
    except KeyError:
        pass
    try:
        snap = _snapshot()
        _, info = snap.find_provider_model(model, None, provider, None)
        found: gp.ModelInfo | None = info
        sibling = _BORROWED.get((provider, info.id))
        if sibling is not None:
            found = snap.find_provider_model(sibling, None, provider, None)[1]
    except LookupError:
        found = None
    if len(_models) >= _MAX_CACHE:
        _models.clear()
    _models[key] = found
    return found


def _rate(value: Decimal) -> int | None:
    scaled = value * 1_000_000
    return int(scaled) if scaled == scaled.to_integral_value() else None


def _ladder(value: object) -> _Ladder | None:
    """The value as an integer ladder, or None when it cannot be exact."""
    if isinstance(value, Decimal):
        r = _rate(value)
        return None if r is None else ((-1, r),)
    if isinstance(value, gp.TieredPrices):
        steps = [(-1, _rate(value.base))] + [(t.start, _rate(t.price)) for t in value.tiers]
        if any(r is None for _, r in steps):
            return None
        return tuple(sorted((s, r) for s, r in steps if r is not None))
    return None


def _plan_for(info: gp.ModelInfo, when: datetime, context: dict[str, str] | None) -> _Plan:
    prices = info.prices
    if not isinstance(prices, gp.ModelPrice) and any(
        isinstance(c.constraint, gp.TimeOfDateConstraint) for c in prices
    ):
        return _Slow(price=None, model=info)  # prices change within the day
    price = info.get_prices(when, context)
    keys = {k for k, v in price.__dict__.items() if v is not None and not k.startswith("_")}
    if keys - _ZERO_KEYS - set(_TOKEN_KEYS) or "input_mtok" not in keys:
        return _Slow(price=price)
    ladders = {k: _ladder(getattr(price, k)) for k in _TOKEN_KEYS if k in keys}
    if any(v is None for v in ladders.values()):
        return _Slow(price=price)
    inp = ladders["input_mtok"]
    assert inp is not None
    return _Fast(
        input=inp,
        cache_read=ladders.get("cache_read_mtok"),
        cache_write=ladders.get("cache_write_mtok"),
        output=ladders.get("output_mtok"),
        price=price,
    )


def _pick(ladder: _Ladder, total_input: int) -> int:
    for start, rate in reversed(ladder):
        if total_input > start:
            return rate
    return ladder[0][1]


def _counts(usage: Usage) -> tuple[int, int, int, int] | None:
    """(all input tokens, cache reads, cache writes, output tokens) in genai-prices' terms."""
    prompt = usage.prompt_tokens
    if prompt is None:
        return None
    completion = usage.completion_tokens
    if completion is None:
        # Embeddings report prompt and total only; anything else without output is unknown.
        if usage.total_tokens is None or usage.total_tokens != prompt:
            return None
        completion = 0
    read = usage.cached_tokens or 0
    write = usage.cache_write_tokens or 0
    if min(prompt, completion, read, write) < 0 or read + write > prompt:
        return None  # inconsistent: cached parts larger than the whole
    if any((getattr(usage, name) or 0) > MAX_NARROW_COUNT for name in NARROW_USAGE):
        return None  # garbage the store keeps as unknown: 3e9 web searches priced $30M
    return prompt, read, write, completion


def genai_usage(usage: Usage) -> gp.Usage | None:
    """Our usage as a `genai_prices.Usage` (None when it is missing)."""
    counts = _counts(usage)
    if counts is None:
        return None
    total_input, read, write, output = counts
    kw: dict[str, Any] = {"input_tokens": total_input, "output_tokens": output}
    if read:
        kw["cache_read_tokens"] = read
    if write:
        kw["cache_write_tokens"] = write
        if usage.cache_write_1h_tokens:
            kw["cache_write_1h_tokens"] = min(usage.cache_write_1h_tokens, write)
    if usage.input_audio_tokens:
        kw["input_audio_tokens"] = min(usage.input_audio_tokens, total_input)
    if usage.output_audio_tokens:
        kw["output_audio_tokens"] = min(usage.output_audio_tokens, output)
    if usage.input_image_tokens:
        kw["input_image_tokens"] = min(usage.input_image_tokens, total_input)
    if usage.output_image_tokens:
        kw["output_image_tokens"] = min(usage.output_image_tokens, output)
    if usage.web_search_requests:
        kw["web_searches"] = usage.web_search_requests
    return gp.Usage(**kw)


def _extra(usage: Usage) -> bool:
    """Usage the integer fast path does not price: the library decomposes it."""
    return bool(
        usage.cache_write_1h_tokens
        or usage.input_audio_tokens
        or usage.output_audio_tokens
        or usage.input_image_tokens
        or usage.output_image_tokens
        or usage.web_search_requests
    )


@functools.lru_cache(maxsize=64)
def _version(day: date) -> str:
    snap = _snapshot()
    extra = f"+update-{snap.timestamp:%Y%m%dT%H%M}" if snap.from_auto_update else ""
    return f"genai-prices=={PRICE_LIB_VERSION}{extra}@{day.isoformat()}"


def _to_nanos(total: Decimal) -> int:
    return int((total * 1_000_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


#: Anthropic's US-only inference (`inference_geo: "us"`, Opus 4.6 and later: the only models
#: that take it) costs 1.1x on every token price; web searches are not tokens.
_GEO_PREMIUM = {"us": Decimal("1.1")}


def _premium(usage: Usage) -> Decimal | None:
    """The multiplier a reported mode puts on the table's token prices; None when unknown.

    Fast mode (`speed: "fast"`) is not one number: 6x on Opus 4.6 and 4.7, 2x on Opus 4.8 and 5,
    and the table has no fast prices. Priced at standard it was 2-6x too low; unpriced, it is
    counted as such."""
    if usage.speed is not None:
        return None
    if usage.inference_geo is None:
        return _ONE
    return _GEO_PREMIUM.get(usage.inference_geo)


_ONE = Decimal(1)


def price_usage(provider: str, model: str | None, usage: Usage, at: datetime) -> Cost | None:
    """The cost of one request, or None when the model or the usage is unknown."""
    if not model:
        return None
    by_length = usage.audio_seconds is not None or usage.input_characters is not None
    if by_length and usage.prompt_tokens is None:
        return _by_length(provider, model, usage, at)
    if usage.speed is not None or usage.inference_geo is not None:
        return _with_premium(provider, model, usage, at)
    counts = _counts(usage)
    if counts is None:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    day = at.astimezone(UTC).date()
    tier = usage.service_tier if usage.service_tier in _PRICED_TIERS else None
    context = {"service_tier": tier} if tier is not None else None
    key = (provider, model, day, tier)
    plan = _plans.get(key)
    if plan is None:
        info = _find_model(provider, model)
        if info is None:
            return None
        plan = _plan_for(info, at, context)
        if len(_plans) >= _MAX_CACHE:
            _plans.clear()
        _plans[key] = plan
    total_input, read, write, output = counts
    if isinstance(plan, _Fast) and _extra(usage):
        plan = _Slow(price=plan.price)
    if isinstance(plan, _Fast):
        leaf = total_input
        pico = 0
        if plan.cache_read is not None:
            leaf -= read
            pico += read * _pick(plan.cache_read, total_input)
        if plan.cache_write is not None:
            leaf -= write
            pico += write * _pick(plan.cache_write, total_input)
        if leaf < 0:
            return None  # more cached than input tokens: inconsistent usage
        pico += leaf * _pick(plan.input, total_input)
        if plan.output is not None:
            pico += output * _pick(plan.output, total_input)
        return Cost(usd=pico / 1e12, nanos=(pico + 500) // 1000, version=_version(day))
    gusage = genai_usage(usage)
    assert gusage is not None
    price = plan.price if plan.model is None else plan.model.get_prices(at, context)
    assert price is not None
    if (
        (usage.input_audio_tokens and price.input_audio_mtok is None)
        or (usage.output_audio_tokens and price.output_audio_mtok is None)
        or (usage.input_image_tokens and price.input_image_mtok is None)
        or (usage.output_image_tokens and price.output_image_mtok is None)
        or (usage.web_search_requests and getattr(price, "web_searches_kcount", None) is None)
    ):
        # The library would price the audio or image as text, and a search at $0 (rev17: a
        # grounded gemini-1.5-pro call priced as its tokens alone): unknown, not a guess.
        return None
    try:
        total = price.calc_price(gusage)["total_price"]
    except ValueError:
        return None  # the library judged the usage inconsistent
    return Cost(usd=float(total), nanos=_to_nanos(total), version=_version(day))


def _by_length(provider: str, model: str, usage: Usage, at: datetime) -> Cost | None:
    """Audio billed by its length (whisper-1's seconds) or input by its characters (tts-1),
    where the table prices that unit; unknown otherwise (a $0 from a price that has none)."""
    info = _find_model(provider, model)
    if info is None:
        return None
    price = info.get_prices(at, None)
    units = set(price.__dict__)
    if usage.audio_seconds is not None:
        if not any("audio_hours" in u or "audio_seconds" in u for u in units):
            return None
        gusage = gp.Usage(audio_seconds=usage.audio_seconds)
    else:
        if not any("chars" in u for u in units):
            return None
        gusage = gp.Usage(input_characters=usage.input_characters)
    try:
        total = price.calc_price(gusage)["total_price"]
    except ValueError:
        return None
    return Cost(usd=float(total), nanos=_to_nanos(total), version=_version(at.astimezone(UTC).date()))


def _with_premium(provider: str, model: str, usage: Usage, at: datetime) -> Cost | None:
    """The table's cost with a reported mode's multiplier on its token part (`_premium`)."""
    factor = _premium(usage)
    plain = msgspec.structs.replace(usage, speed=None, inference_geo=None)
    whole = price_usage(provider, model, plain, at)
    tokens = price_usage(provider, model, msgspec.structs.replace(plain, web_search_requests=None), at)
    if factor is None or whole is None or tokens is None:
        return None
    extra = Decimal(tokens.nanos) * (factor - 1)
    nanos = whole.nanos + int(extra.quantize(_ONE, rounding=ROUND_HALF_UP))
    return Cost(usd=whole.usd + tokens.usd * float(factor - 1), nanos=nanos, version=whole.version)


def apply_cost(record: LogRecord) -> None:
    """Fill `cost_usd`, `cost_nanos` and `price_version` (all None when the cost is unknown).

    A record's `provider` is its route; the route's provider names the price table's id
    (`gemini` → `google`; a named upstream its own name, so `vllm` stays unpriced).
    """
    usage = record.usage
    if usage.source == "missing" and _not_billed(record):
        record.cost_usd, record.cost_nanos, record.price_version = 0.0, 0, None
        return
    if usage.billed_usd is not None and not 0 <= usage.billed_usd <= MAX_BILLED_USD:
        usage.billed_usd = None  # no charge (a queue's record; ingest refuses it): the table's
    if usage.billed_usd is not None and usage.source == "provider":
        # What the provider billed beats what the table says it lists: an aggregator's routing
        # (another upstream, a cache, a discount) or a model missing from the table.
        billed = Decimal(repr(usage.billed_usd))
        record.cost_usd, record.cost_nanos = float(billed), _to_nanos(billed)
        record.price_version = f"billed by {record.provider}"
        return
    provider = pricing_id(record.provider)
    cost = None
    if provider is not None and usage.source != "partial":
        cost = price_usage(provider, record.model, usage, record.started_at)
    if cost is None:
        record.cost_usd = record.cost_nanos = record.price_version = None
    else:
        record.cost_usd, record.cost_nanos, record.price_version = cost.usd, cost.nanos, cost.version


def _not_billed(record: LogRecord) -> bool:
    """A call that generated nothing: an error answer from the provider, no connection at all,
    or a call the provider never bills (`Provider.bills`: a look-up, counting tokens).

    A timeout is not one: the provider may have finished, and billed, after the gateway gave up.
    """
    if record.outcome == "upstream_unreachable":
        return True
    if not provider_for(record.provider, record.path).bills(record.method, record.path):
        return True
    return record.status is not None and record.status >= 400 and record.outcome != "upstream_timeout"
