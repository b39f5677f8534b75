"""Endpoint management shared by `llmtap webhooks` and the API: one set of checks for both."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp

from llmtap.errors import TransientError
from llmtap.webhooks.db import WebhookDB, new_endpoint_id
from llmtap.webhooks.deliverer import Refused, check_target, send
from llmtap.webhooks.outbox import (
    EVENTS,
    FORMATS,
    REQUEST_COMPLETED,
    Endpoint,
    check_secret,
    envelope,
    new_secret,
    parse_filters,
)


class Invalid(ValueError):
    """A request to add an endpoint that cannot be honoured; the message says why."""


#: Longer than any URL a browser or an HTTP server takes (2,048 is the web's de facto limit).
MAX_URL_CHARS = 8192


async def create_endpoint(
    db: WebhookDB,
    tenant: str,
    url: str,
    *,
    events: Sequence[str] = (),
    filters: Sequence[str] = (),
    sample: float = 1.0,
    include_bodies: bool = False,
    secret: str | None = None,
    allow_private: bool = False,
    format: str = "standard",
) -> Endpoint:
    """Validate and add an endpoint; the returned one holds its secret (shown once)."""
    bad = [e for e in events if e not in EVENTS]
    if bad:
        raise Invalid(f"unknown event {bad[0]!r}; events are {', '.join(EVENTS)}")
    if format not in FORMATS:
        raise Invalid(f"unknown format {format!r}; formats are {', '.join(FORMATS)}")
    if not 0.0 < sample <= 1.0:
        raise Invalid("sample is a fraction in (0, 1]")
    if len(url) > MAX_URL_CHARS:  # a 20 MB URL was stored, and printed by every `webhooks list`
        raise Invalid(f"the URL is {len(url):,} characters long; at most {MAX_URL_CHARS:,} are taken")
    try:
        parsed = parse_filters(filters)
        secret = check_secret(secret) if secret else new_secret()
        await check_target(url, allow_private)
    except (ValueError, Refused) as e:
        raise Invalid(str(e)) from None
    except TransientError:
        # A name this host cannot resolve (yet) may resolve where the server runs, which checks
        # it again at each send.
        secret = secret or new_secret()
    ep = Endpoint(
        new_endpoint_id(), tenant, url, secret, events=list(events or EVENTS), filters=parsed,
        sample=sample, include_bodies=include_bodies, format=format,
    )  # fmt: skip
    return await db.add_endpoint(ep)


async def test_endpoint(ep: Endpoint, *, allow_private: bool, timeout: float = 10.0) -> dict[str, Any]:
    """Send a sample `request.completed` now (outside the outbox) and report what came back."""
    now = datetime.now(UTC)
    data = {
        "id": f"test-{uuid.uuid4()}", "tenant": ep.tenant, "provider": "openai", "model": "gpt-4o-mini",
        "status": 200, "outcome": "completed", "test": True, "started_at": now.isoformat(),
        "ended_at": now.isoformat(), "latency_ms": 0.0,
    }  # fmt: skip
    msg_id = "msg_test_" + uuid.uuid4().hex
    body = envelope(REQUEST_COMPLETED, now.isoformat(), data)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        status, error, _ = await send(session, ep, msg_id, body, allow_private)
    return {
        "ok": error is None,
        "status": status,
        "error": error,
        "webhook_id": msg_id,
        "ms": round((time.monotonic() - t0) * 1000, 1),
    }
