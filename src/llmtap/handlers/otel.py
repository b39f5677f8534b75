"""OpenTelemetry export: every stored record as a span over OTLP/HTTP (GenAI semantic conventions).

Enabled by `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`); the exporter reads the
standard `OTEL_EXPORTER_OTLP_*` variables itself (headers, timeout, compression). Two steps:
`OtelCapture` runs first in the chain and reads the response id and model (and, with
`LLMTAP_OTLP_CONTENT=true`, the messages) from the bodies while they are still inline;
`OtelExport` runs after the store, so only stored records become spans. Ending a span only puts
it in the SDK's bounded in-memory queue: the batch processor exports from its own thread, and an
unreachable collector costs dropped *exports* (counted), never a delay or a lost record.

A client's W3C `traceparent` request header (the record keeps it) makes the span a child of the
client's trace.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter

from llmtap.backends import require_modules
from llmtap.handlers.base import Handler, Item
from llmtap.record import Body, LogRecord, decompress
from llmtap.redact import REDACT_MARGIN, redact_body

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExportResult

log = logging.getLogger("llmtap.otel")

SPANS = Counter(
    "llmtap_otlp_spans_total",
    "Spans of stored records: queued for export, exported, or dropped (collector down / queue full)",
    ["result"],
)
#: Route → `gen_ai.provider.name` where the conventions spell it otherwise (a named upstream
#: is its own name: `groq`, `deepseek`, `perplexity` are the conventions' names too).
_PROVIDERS = {"gemini": "gcp.gemini", "azure": "azure.ai.openai", "mistral": "mistral_ai", "xai": "x_ai"}
#: Gemini's `models/{model}:{method}` → the conventions' operation.
_GEMINI_OPERATIONS = {
    "generateContent": "generate_content",
    "streamGenerateContent": "generate_content",
    "embedContent": "embeddings",
    "batchEmbedContents": "embeddings",
}
#: Content attributes are capped: a span is not a body store.
CONTENT_CAP = 16 * 1024


_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: What span export imports: `pip install 'llmtap[otel]'` brings it, the embedded install does not.
SDK_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")


def enabled() -> bool:
    return any(os.environ.get(name) for name in _ENDPOINT_VARS)


def endpoint() -> str:
    """Where spans go, for the start-up banner (credentials in the URL masked)."""
    from llmtap.redact import redact_url

    return redact_url(next((os.environ[n] for n in _ENDPOINT_VARS if os.environ.get(n)), ""))


def require_sdk() -> None:
    """Stop start-up with one sentence when export is asked for but the SDK is not installed."""
    var = next((name for name in _ENDPOINT_VARS if os.environ.get(name)), _ENDPOINT_VARS[-1])
    require_modules(SDK_MODULES, f"{var} is set: exporting spans needs the OpenTelemetry SDK", "otel")


def operation(path: str) -> str:
    p = path.split("?", 1)[0].rstrip("/")
    last = p.rsplit("/", 1)[-1]
    if ":" in last:  # Gemini: the model, then its method
        method = last.rsplit(":", 1)[-1]
        return _GEMINI_OPERATIONS.get(method, method)
    if p.endswith(("/chat/completions", "/messages", "/responses")):
        return "chat"
    if p.endswith("/embeddings"):
        return "embeddings"
    if p.endswith("/completions"):
        return "text_completion"
    return p.rsplit("/", 1)[-1] or "request"


def _json(body: Body | None) -> Any:
    if body is None or body.data is None:
        return None
    raw = body.data
    try:
        if body.encoding == "zstd":
            raw = decompress(raw)
        return orjson.loads(raw)
    except Exception:  # not JSON, damaged: the span simply has no such attribute
        return None


def _capped(value: Any) -> str:
    """Content for a span: JSON, credentials masked as in webhook payloads, cut to the cap
    (what is redacted is cut first, `REDACT_MARGIN` past the cap)."""
    whole = orjson.dumps(value).decode()
    text = redact_body(whole[: CONTENT_CAP + REDACT_MARGIN])
    if len(whole) <= CONTENT_CAP + REDACT_MARGIN and len(text) <= CONTENT_CAP:
        return text
    return text[:CONTENT_CAP] + "…"


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Chat messages in the GenAI conventions' shape: role + parts."""
    out = []
    for m in raw if isinstance(raw, list) else []:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, str):
            parts: list[Any] = [{"type": "text", "content": content}]
        elif isinstance(content, list):
            parts = [
                {"type": "text", "content": c["text"]} if isinstance(c, dict) and "text" in c else c
                for c in content
            ]
        else:
            parts = []
        out.append({"role": m.get("role"), "parts": parts})
    return out


def facts(record: LogRecord, with_content: bool) -> dict[str, Any]:
    """What the span needs from the bodies, read while they are inline."""
    out: dict[str, Any] = {}
    resp = _json(record.response_body)
    if isinstance(resp, dict):
        for key, note in (("id", "response_id"), ("responseId", "response_id"), ("model", "response_model"),
                          ("modelVersion", "response_model")):  # fmt: skip  # OpenAI, Anthropic; Gemini
            if isinstance(resp.get(key), str):
                out[note] = resp[key]
        reasons = [c.get("finish_reason") for c in resp.get("choices") or [] if isinstance(c, dict)]
        if isinstance(resp.get("stop_reason"), str):
            reasons = [resp["stop_reason"]]
        elif isinstance(resp.get("candidates"), list):
            reasons = [c.get("finishReason") for c in resp["candidates"] if isinstance(c, dict)]
        if reasons and all(isinstance(r, str) for r in reasons):
            out["finish_reasons"] = reasons
    if with_content:
        req = _json(record.request_body)
        if isinstance(req, dict):
            if req.get("messages"):
                out["input"] = _capped(_messages(req["messages"]))
            if req.get("system"):
                system = req["system"]
                out["system"] = _capped(
                    [{"type": "text", "content": system}] if isinstance(system, str) else system
                )
        if isinstance(resp, dict):
            if isinstance(resp.get("choices"), list):  # OpenAI
                msgs = [c.get("message") for c in resp["choices"] if isinstance(c, dict)]
                out["output"] = _capped(_messages([m for m in msgs if isinstance(m, dict)]))
            elif isinstance(resp.get("content"), list):  # Anthropic
                out["output"] = _capped(_messages([{"role": "assistant", "content": resp["content"]}]))
    return out


def attributes(record: LogRecord, notes: dict[str, Any]) -> dict[str, Any]:
    u = record.usage
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation(record.path),
        "gen_ai.provider.name": _PROVIDERS.get(record.provider, record.provider),
        "http.request.method": record.method,
        "url.full": record.target_url.split("?", 1)[0],
        "llmtap.request.id": record.id,
        "llmtap.tenant": record.tenant,
        "llmtap.streamed": record.streamed,
        "llmtap.latency_ms": record.latency_ms,
        "llmtap.usage_source": u.source,
    }
    optional = {
        "gen_ai.request.model": record.model,
        "gen_ai.response.model": notes.get("response_model"),
        "gen_ai.response.id": notes.get("response_id"),
        "gen_ai.response.finish_reasons": notes.get("finish_reasons"),
        "gen_ai.usage.input_tokens": u.prompt_tokens,
        "gen_ai.usage.output_tokens": u.completion_tokens,
        "gen_ai.usage.cache_read.input_tokens": u.cached_tokens,
        "gen_ai.usage.cache_creation.input_tokens": u.cache_write_tokens,
        "gen_ai.usage.reasoning.output_tokens": u.reasoning_tokens,
        "gen_ai.conversation.id": record.session_id,
        "http.response.status_code": record.status,
        "llmtap.time_to_first_token_ms": record.time_to_first_token_ms,
        "llmtap.cost_usd": record.cost_usd,
        "llmtap.price_version": record.price_version,
        "llmtap.user_id": record.user_id,
        "gen_ai.input.messages": notes.get("input"),
        "gen_ai.system_instructions": notes.get("system"),
        "gen_ai.output.messages": notes.get("output"),
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    for name, value in record.properties.items():
        attrs[f"llmtap.property.{name}"] = value
    if record.outcome != "completed" or (record.status or 0) >= 400:
        attrs["error.type"] = str(record.status) if record.status and record.status >= 400 else record.outcome
    return attrs


def _ns(dt: Any) -> int:
    return int(dt.timestamp() * 1_000_000) * 1000


class OtelCapture(Handler):
    """First in the chain: notes what the span will need from the bodies."""

    name = "otel-capture"

    def __init__(self, content: bool = False) -> None:
        self.content = content  # `LLMTAP_OTLP_CONTENT`

    async def handle(self, items: Sequence[Item]) -> None:
        for item in items:
            item.notes["otel"] = facts(item.record, self.content)


class OtelExport(Handler):
    """After the store: one span per stored record, handed to the batch processor."""

    name = "otel"

    def __init__(self, provider: TracerProvider | None = None, *, max_queue: int = 20_000) -> None:
        if provider is None:
            require_sdk()
        self._provider = provider
        self._max_queue = max_queue
        self._tracer: Any = None

    async def start(self) -> None:
        if self._tracer is not None:
            return
        if self._provider is None:
            self._provider = build_provider(self._max_queue)
        self._tracer = self._provider.get_tracer("llmtap")

    async def close(self) -> None:
        if self._provider is not None:
            provider, self._provider, self._tracer = self._provider, None, None
            # Flushing may wait on an unreachable collector: bounded, and off the event loop.
            try:
                await asyncio.wait_for(asyncio.to_thread(provider.shutdown), timeout=5)
            except TimeoutError:
                log.warning("OpenTelemetry exporter did not flush within 5 s; its queued spans are dropped")

    async def handle(self, items: Sequence[Item]) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if self._tracer is None:
            await self.start()
        propagator = TraceContextTextMapPropagator()
        for item in items:
            r = item.record
            parent = None
            tp = r.request_headers.get("traceparent")
            if tp:
                carrier = {"traceparent": tp}
                if "tracestate" in r.request_headers:
                    carrier["tracestate"] = r.request_headers["tracestate"]
                parent = propagator.extract(carrier)
            attrs = attributes(r, item.notes.get("otel", {}))
            op = attrs["gen_ai.operation.name"]
            span = self._tracer.start_span(
                f"{op} {r.model}" if r.model else op,
                context=parent, kind=trace.SpanKind.CLIENT, attributes=attrs, start_time=_ns(r.started_at),
            )  # fmt: skip
            if "error.type" in attrs:
                span.set_status(trace.Status(trace.StatusCode.ERROR, r.error or attrs["error.type"]))
            span.end(end_time=_ns(r.ended_at))
            SPANS.labels("queued").inc()


class _CountingExporter:
    """Wraps the OTLP exporter to count exported and dropped spans (never records)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result: SpanExportResult = self._inner.export(spans)
        except Exception as e:  # an exporter bug must not kill the processor's thread
            log.warning("OTLP export failed: %s", e)
            result = SpanExportResult.FAILURE
        SPANS.labels("exported" if result == SpanExportResult.SUCCESS else "dropped").inc(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


def build_provider(max_queue: int = 20_000) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "llmtap")})
    provider = TracerProvider(resource=resource)
    exporter = _CountingExporter(OTLPSpanExporter())
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=max_queue, max_export_batch_size=512)  # type: ignore[arg-type]
    )
    return provider
