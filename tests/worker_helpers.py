"""Shared by the handler and worker tests: synthetic log records shaped like the gateway's."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from llmtap.record import Body, LogRecord, Usage, compress

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def make_record(i: int = 0, **kw: Any) -> LogRecord:
    fields: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "tenant": "acme",
        "provider": "openai",
        "target_url": "https://api.openai.com/v1/chat/completions?api-key=secret",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "started_at": T0,
        "ended_at": T0,
        "latency_ms": 12.5,
        "status": 200,
        "usage": Usage(source="provider", prompt_tokens=100 + i, completion_tokens=20, total_tokens=120 + i),
        "request_headers": {"content-type": "application/json"},
        "request_body": Body(
            content_type="application/json", size=20, encoding="zstd", data=compress(b'{"q": %d}' % i)
        ),
        "response_body": Body(content_type="application/json", size=9, data=b'{"a": %d}' % i),
    }
    fields.update(kw)
    return LogRecord(**fields)
