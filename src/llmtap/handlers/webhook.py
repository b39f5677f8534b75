"""Webhook: POST each stored record's metadata to `LLMTAP_WEBHOOK_URL`.

Last in the chain, so a receiver only hears of records that are stored. One POST per record,
JSON, with `Idempotency-Key: <request id>`: delivery is at least once (a retried batch posts
again), and the key lets the receiver drop repeats. The payload has no bodies, no headers and no
query string (where credentials could hide): metadata, usage and cost only.

A connection failure, a timeout, a 5xx, 408 or 429 is an outage of the receiver: the batch is
retried later (`TransientError`). Another 4xx is the receiver refusing this record: it is
failed (retried, then dead-lettered, where it can be replayed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec

from llmtap.config import redact_url
from llmtap.errors import TransientError
from llmtap.handlers.base import Handler, Item
from llmtap.record import LogRecord

_DROP = frozenset({"request_body", "response_body", "response_events", "request_headers", "response_headers"})
_encoder = msgspec.json.Encoder()


def webhook_payload(record: LogRecord) -> dict[str, Any]:
    """The record's metadata as sent to webhooks."""
    data: dict[str, Any] = msgspec.to_builtins(record)
    for k in _DROP:
        data.pop(k, None)
    data["target_url"] = record.target_url.split("?", 1)[0]
    data["v"] = record.v
    return data


class WebhookHandler(Handler):
    name = "webhook"

    def __init__(self, url: str, *, timeout: float = 10.0, concurrency: int = 16) -> None:
        self.url = url
        self._shown = redact_url(url)  # for messages: never a password from the URL
        self.timeout = timeout
        self.concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle(self, items: Sequence[Item]) -> None:
        await self.start()
        sem = asyncio.Semaphore(self.concurrency)
        results = await asyncio.gather(*(self._post(i, sem) for i in items), return_exceptions=True)
        for r in results:
            if isinstance(r, TransientError):
                raise r
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _post(self, item: Item, sem: asyncio.Semaphore) -> None:
        assert self._session is not None
        body = _encoder.encode(webhook_payload(item.record))
        headers = {"Content-Type": "application/json", "Idempotency-Key": item.record.id}
        async with sem:
            try:
                async with self._session.post(self.url, data=body, headers=headers) as resp:
                    status = resp.status
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise TransientError(f"webhook {self._shown} unreachable: {type(e).__name__}: {e}") from e
        if status >= 500 or status in (408, 429):
            raise TransientError(f"webhook {self._shown} answered HTTP {status}")
        if status >= 400:
            item.fail(f"{self.name}: {self._shown} refused the record with HTTP {status}")
