"""A capture published as it was caught: what issue 15's "ship raw captures, build records in
the worker" would put on the queue. A benchmark prototype (`gateway_parts.py`'s `raw` stage),
not a product path: the contract's queue carries `LogRecord` v1.

It keeps what may not leave the gateway as caught: credentials and `Llmtap-*` headers are
filtered out and headers held to their limits (`HeaderFilter`, `limits.headers`), URLs lose
their secrets, bodies are compressed from 1 KiB on (`inline_body`, as records carry them).
Everything a record derives from the bytes (JSON parsing, model, usage, stream reassembly, error
text, the `Llmtap-*` fields) would be the worker's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from llmtap import limits
from llmtap.bodies.offload import inline_body
from llmtap.gateway.capture import Capture
from llmtap.gateway.headers import REQUEST_DROP, RESPONSE_DROP, HeaderFilter
from llmtap.gateway.publisher import Sink
from llmtap.queue.base import Message, Queue
from llmtap.record import Body
from llmtap.redact import redact_url


class RawCapture(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="v", tag=2):
    id: str
    tenant: str
    provider: str
    method: str
    path: str
    target_url: str
    started: float
    headers_ms: float | None = None
    first_ms: float | None = None
    end_ms: float
    status: int | None = None
    streamed: bool = False
    outcome: str = "completed"
    error: str | None = None
    llmtap: list[tuple[str, str]] = []
    request_headers: dict[str, str] = {}
    response_headers: dict[str, str] = {}
    request_body: Body | None = None
    response_body: Body | None = None  # the response as caught (a stream's SSE bytes)
    response_events: Body | None = None  # unused: `offload.fits` reads it
    tail: bytes | None = None  # a long stream's end, past `LLMTAP_MAX_BODY_BYTES`
    truncated: list[str] = []
    gateway: str | None = None


class RawBuilder:
    """Stands in for `RecordBuilder` in a `Publisher`: capture -> `RawCapture`."""

    def __init__(self, inline: int, gateway: str) -> None:
        self.inline = inline
        self.gateway = gateway
        self._request_headers = HeaderFilter(REQUEST_DROP)
        self._response_headers = HeaderFilter(RESPONSE_DROP)

    def build(self, cap: Capture) -> RawCapture:
        truncated: list[str] = []
        req = limits.headers(self._request_headers(cap.request_headers), "request_headers", truncated)
        resp = limits.headers(self._response_headers(cap.response_headers), "response_headers", truncated)
        t0 = cap.t0
        raw = b"".join(cap.chunks)
        return RawCapture(
            id=cap.id,
            tenant=cap.tenant,
            provider=cap.provider,
            method=cap.method,
            path=cap.path,
            target_url=redact_url(cap.target_url),
            started=cap.started,
            headers_ms=(cap.t_headers - t0) * 1000.0 if cap.t_headers else None,
            first_ms=(cap.t_first - t0) * 1000.0 if cap.t_first else None,
            end_ms=((cap.t_end or t0) - t0) * 1000.0,
            status=cap.status,
            streamed=cap.streamed,
            outcome=cap.outcome,
            error=cap.error,
            llmtap=[(str(k), v) for k, v in cap.llmtap] if cap.llmtap else [],  # names: `istr`
            request_headers=req,
            response_headers=resp,
            request_body=inline_body(
                cap.request_body,
                size=cap.request_size,
                truncated=cap.request_size > len(cap.request_body),
                content_type=req.get("content-type"),
                limit=self.inline,
            ),
            response_body=inline_body(
                raw,
                size=cap.response_size,
                truncated=cap.truncated,
                content_type=resp.get("content-type"),
                limit=self.inline,
            ),
            tail=b"".join(cap.tail) if cap.tail else None,
            truncated=truncated,
            gateway=self.gateway,
        )

    def fallback(self, cap: Capture, exc: BaseException) -> Any:
        raise exc


_encode = msgspec.json.Encoder().encode


class RawQueueSink(Sink):
    """`QueueSink`'s work for raw captures: one message per capture, keyed by tenant."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    async def send(self, records: Sequence[Any]) -> None:
        messages = [Message(key=r.tenant, value=_encode(r), id=f"{r.tenant}/{r.id}") for r in records]
        await self.queue.publish(messages)
