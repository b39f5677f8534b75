"""Webhook: POST each stored record's metadata to `LLMTAP_WEBHOOK_URL`, off the critical path.

Last in the chain, so a receiver only hears of records that are stored. One POST per record,
JSON, with `Idempotency-Key: <request id>`: delivery is at least once (a redelivered batch posts
again), and the key lets the receiver drop repeats. The payload has no bodies, no headers and no
query string (where credentials could hide): metadata, usage and cost only.

A receiver that is down or slow must never hold back storing (the worker would retry the same
batch forever and nothing later would be stored). So `handle` only *enqueues* a delivery and
returns: a bounded background deliverer posts with retries and backoff (connection failures,
timeouts, 5xx, 408, 429), and the batch is acknowledged once stored. What cannot be delivered is
dropped and counted, never a record: the queue is full (the receiver is away longer than the
buffer lasts), retries are exhausted, the receiver refused the record (another 4xx), or the
process stops before the backlog is out. Each cause counts in
`llmtap_webhook_deliveries_dropped_total{cause}` and logs one line per episode, not per record.
A durable outbox with replay is a later design; this keeps the pipeline moving today.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec
from prometheus_client import Counter

from llmtap.config import redact_url
from llmtap.handlers.base import Handler, Item
from llmtap.record import LogRecord

log = logging.getLogger("llmtap.webhook")

_DROP = frozenset({"request_body", "response_body", "response_events", "request_headers", "response_headers"})
_encoder = msgspec.json.Encoder()

DELIVERED = Counter("llmtap_webhook_deliveries_total", "Webhook posts the receiver accepted")
DROPPED = Counter(
    "llmtap_webhook_deliveries_dropped_total",
    "Webhook deliveries given up (the record is stored regardless)",
    ["cause"],
)
WARN_EVERY = 30.0  # seconds between repeated warnings of one drop cause


def webhook_payload(record: LogRecord) -> dict[str, Any]:
    """The record's metadata as sent to webhooks."""
    data: dict[str, Any] = msgspec.to_builtins(record)
    for k in _DROP:
        data.pop(k, None)
    data["target_url"] = record.target_url.split("?", 1)[0]
    data["v"] = record.v
    return data


class _Retry(Exception):
    """The receiver is away or overloaded: try this delivery again later."""


class WebhookHandler(Handler):
    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        concurrency: int = 16,
        max_pending: int = 10_000,
        max_attempts: int = 8,
        backoff_start: float = 0.5,
        backoff_cap: float = 30.0,
        drain_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self._shown = redact_url(url)  # for messages: never a password from the URL
        self.timeout = timeout
        self.concurrency = concurrency
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.drain_timeout = drain_timeout
        self._session: aiohttp.ClientSession | None = None
        self._pending: asyncio.Queue[tuple[str, bytes]] | None = None
        self._senders: list[asyncio.Task[None]] = []
        self._warned: dict[str, float] = {}
        self.delivered = 0
        self.dropped: dict[str, int] = {}

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
            )
        if self._pending is None:
            self._pending = asyncio.Queue(self.max_pending)
            self._senders = [
                asyncio.create_task(self._sender(self._pending), name=f"llmtap-webhook-{i}")
                for i in range(self.concurrency)
            ]

    async def close(self) -> None:
        """Give the backlog `drain_timeout` to go out, then drop (and count) the rest."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pending.join(), self.drain_timeout)
            for t in self._senders:
                t.cancel()
            for t in self._senders:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self._senders = []
            left = pending.qsize()
            if left:
                self._drop("stopped", left)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle(self, items: Sequence[Item]) -> None:
        await self.start()
        assert self._pending is not None
        full = 0
        for i in items:
            try:
                self._pending.put_nowait((i.record.id, _encoder.encode(webhook_payload(i.record))))
            except asyncio.QueueFull:
                full += 1
        if full:
            self._drop("overflow", full)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every enqueued delivery is done (sent or dropped); for tests and drains."""
        if self._pending is None:
            return True
        try:
            await asyncio.wait_for(self._pending.join(), timeout)
            return True
        except TimeoutError:
            return False

    # -- the deliverer ---------------------------------------------------------------------------
    async def _sender(self, pending: asyncio.Queue[tuple[str, bytes]]) -> None:
        while True:
            rid, body = await pending.get()
            try:
                await self._deliver(rid, body)
            except asyncio.CancelledError:
                self._drop("stopped", 1)  # cut off mid-delivery at close
                raise
            except Exception:  # never let a sender die: the others would carry on short-handed
                log.exception("webhook: delivering %s failed unexpectedly", rid)
                self._drop("error", 1)
            finally:
                pending.task_done()

    async def _deliver(self, rid: str, body: bytes) -> None:
        delay = self.backoff_start
        for attempt in range(1, self.max_attempts + 1):
            try:
                status = await self._post(rid, body)
            except _Retry as e:
                if attempt == self.max_attempts:
                    self._drop("retries", 1, str(e))
                    return
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.backoff_cap)
                continue
            if status >= 400:
                self._drop("refused", 1, f"{self._shown} answered HTTP {status}")
            else:
                self.delivered += 1
                DELIVERED.inc()
            return

    async def _post(self, rid: str, body: bytes) -> int:
        assert self._session is not None
        headers = {"Content-Type": "application/json", "Idempotency-Key": rid}
        try:
            async with self._session.post(self.url, data=body, headers=headers) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise _Retry(f"{self._shown} unreachable: {type(e).__name__}: {e}") from e
        if status >= 500 or status in (408, 429):
            raise _Retry(f"{self._shown} answered HTTP {status}")
        return status

    def _drop(self, cause: str, n: int, why: str = "") -> None:
        self.dropped[cause] = self.dropped.get(cause, 0) + n
        DROPPED.labels(cause).inc(n)
        now = time.monotonic()
        if now - self._warned.get(cause, -WARN_EVERY) >= WARN_EVERY:
            self._warned[cause] = now
            what = {
                "overflow": f"the buffer of {self.max_pending} is full",
                "retries": f"{self.max_attempts} attempts failed",
                "refused": "the receiver refused it",
                "stopped": "stopping with deliveries still pending",
                "error": "an unexpected error",
            }.get(cause, cause)
            log.warning(
                "webhook: dropped %d deliveries (%s)%s; the records are stored; %d dropped so far",
                n,
                what,
                f": {why}" if why else "",
                sum(self.dropped.values()),
            )
