"""The deliverer: sends the outbox, off the logging path.

It runs in `llmtap server` and `llmtap up` (several may run against one store: claims are
leases, and PostgreSQL claims skip rows another deliverer holds). Each round it claims up to the
free slots of every healthy endpoint and one probe for each failing endpoint whose backoff is
over, and sends each claimed delivery as its own task: a slow endpoint fills only its own slots,
never another endpoint's. A failure backs the *endpoint* off (exponential with jitter, capped at
`webhook_max_backoff_s` so a receiver back after minutes is found within that cap; `Retry-After`
honoured); the first success after a failure makes its whole backlog due at once. An endpoint
failing for `webhook_disable_after_s` (or answering 410 Gone, as Standard Webhooks asks) is
disabled and the tenant's other endpoints get a `delivery.disabled` event. One event the receiver
keeps refusing with a 4xx while it takes the others is given up (`WebhookDB.failed`).

Endpoints added with `--include-bodies` get the record's bodies read into the payload just before
it is sent (`webhooks.bodies`); when they cannot be read (store or body store down) the delivery
is postponed, not counted as the endpoint's failure, and the endpoint's other deliveries go on.

SSRF guard: the target's addresses are resolved at send time and loopback, link-local,
private, multicast and reserved ones are refused unless `LLMTAP_WEBHOOK_ALLOW_PRIVATE=true`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from llmtap.errors import BackendUnavailable, ConfigError, TransientError
from llmtap.redact import redact_webhook_url
from llmtap.runtime import OnBackends, SharedBackends, cancel, open_when_back
from llmtap.webhooks.bodies import BodiesUnavailable, PayloadBodies
from llmtap.webhooks.db import Claimed, WebhookDB
from llmtap.webhooks.outbox import (
    EVENTS,
    REQUEST_COMPLETED,
    Endpoint,
    check_secret,
    signature_header,
    slack_text,
)

if TYPE_CHECKING:
    from llmtap.config import Settings

log = logging.getLogger("llmtap.webhooks")

#: The endpoint configured by LLMTAP_WEBHOOK_URL / LLMTAP_WEBHOOK_SECRET.
ENV_ENDPOINT_ID = "ep_env"


class Refused(Exception):
    """The target is not allowed (SSRF guard) or not a URL we send to."""


def env_endpoint(settings: Settings) -> Endpoint | None:
    if not settings.webhook_url:
        return None
    if not settings.webhook_secret:
        raise ConfigError("LLMTAP_WEBHOOK_URL needs LLMTAP_WEBHOOK_SECRET (a whsec_... signing secret)")
    try:
        secret = check_secret(settings.webhook_secret)
    except ValueError as e:
        raise ConfigError(f"invalid setting LLMTAP_WEBHOOK_SECRET: {e}") from None
    return Endpoint(ENV_ENDPOINT_ID, settings.default_tenant, settings.webhook_url, secret, list(EVENTS))


def _bad_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified
    )  # fmt: skip


async def check_target(url: str, allow_private: bool) -> None:
    """Refuse URLs that are not http(s) or resolve to an internal address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(f"{redact_webhook_url(url)} is not an http(s) URL")
    if allow_private:
        return
    host = parts.hostname
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except OSError as e:
            raise TransientError(f"cannot resolve {host}: {e}") from e
        addrs = [ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]) for i in infos]
    for ip in addrs:
        if _bad_address(ip):
            raise Refused(
                f"{host} resolves to {ip}, a private address (LLMTAP_WEBHOOK_ALLOW_PRIVATE=true allows it)"
            )


class PublicOnly(AbstractResolver):
    """aiohttp's resolver, keeping only public addresses: the session connects to an address
    checked here, not to whatever a second lookup answers. `check_target` resolves once to say
    why a URL is refused; without this, a name that answers a public address to that lookup and
    a private one to the connection's (DNS rebinding) would reach an internal service."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if not _bad_address(ipaddress.ip_address(r["host"].split("%", 1)[0]))]
        if not public:
            why = "a private address (LLMTAP_WEBHOOK_ALLOW_PRIVATE=true allows it)"
            raise OSError(f"{host} resolves to {why}")
        return public

    async def close(self) -> None:
        await self._inner.close()


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def send(
    session: aiohttp.ClientSession, ep: Endpoint, msg_id: str, body: bytes, allow_private: bool
) -> tuple[int | None, str | None, float | None]:
    """POST one signed delivery: (status, error or None, Retry-After seconds)."""
    try:
        await check_target(ep.url, allow_private)
    except (Refused, TransientError) as e:
        return None, str(e), None
    if ep.format == "slack":
        body = slack_text(body)
    ts = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature_header(ep, msg_id, ts, body),
        "user-agent": "llmtap-webhooks",
    }
    try:
        async with session.post(ep.url, data=body, headers=headers, allow_redirects=False) as resp:
            await resp.content.read(4096)  # the receiver's answer is not kept beyond its status
            status = resp.status
            retry = retry_after_seconds(resp.headers.get("Retry-After"))
    except aiohttp.ClientConnectorDNSError as e:  # `PublicOnly`'s refusal says why in its own words
        return None, f"cannot connect to {redact_webhook_url(ep.url)}: {e.os_error}"[:500], None
    except TimeoutError:  # its message is empty: "TimeoutError: " said nothing
        return None, f"no answer within {session.timeout.total or '?'} s", None
    except (aiohttp.ClientError, OSError) as e:
        return None, (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:500], None
    if 200 <= status < 300:
        return status, None, None
    return status, f"HTTP {status}", retry


class Deliverer:
    def __init__(
        self,
        db: WebhookDB,
        *,
        concurrency: int = 8,
        timeout: float = 10.0,
        max_backoff: float = 60.0,
        disable_after: float = 3 * 86400.0,
        allow_private: bool = False,
        poll: float = 0.25,
        bodies: PayloadBodies | None = None,
        max_rejections: int = 5,
    ) -> None:
        self.db = db
        self.bodies = bodies
        self.max_rejections = max_rejections
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.disable_after = disable_after
        self.allow_private = allow_private
        self.poll = poll
        self.lease = timeout * 3 + 30  # longer than any attempt, so a lease never lapses mid-send
        self._inflight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._done: list[tuple[Claimed, int]] = []
        self._done_ready = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.sent = 0
        self.failures = 0
        self.postponed = 0
        #: Endpoints whose last attempt failed, logged once when they start and stop failing
        #: (not once per retry): the log says an endpoint is down, the delivery log says why.
        self._failing: set[str] = set()

    async def start(self) -> None:
        resolver = None if self.allow_private else PublicOnly()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, resolver=resolver),
        )
        self._loop = asyncio.create_task(self._run())
        self._flusher = asyncio.create_task(self._flush_successes())

    async def stop(self) -> None:
        for task in (self._loop, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # In-flight sends are abandoned: their leases lapse and another round sends them again.
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._done:  # what was sent is not sent again after a restart, if the store allows
            with contextlib.suppress(TransientError):
                await self.db.succeeded(self._done)
            self._done = []
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        quiet = 0
        outage = False
        while True:
            got = 0
            try:
                slots = {e: self.concurrency - n for e, n in self._inflight.items()}
                claimed = await self.db.claim(slots, self.concurrency, self.lease)
                got = len(claimed)
                for d in claimed:
                    self._inflight[d.endpoint.id] = self._inflight.get(d.endpoint.id, 0) + 1
                    t = asyncio.create_task(self._deliver(d))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
                if outage:
                    outage = False
                    log.warning("webhook outbox available again")
            except TransientError as e:
                if not outage:  # one line when it goes (and one when it is back), not per round
                    outage = True
                    log.warning("webhook outbox unavailable: %s", e)
            except Exception:
                log.exception("webhook deliverer round failed")
            quiet = 0 if got else min(quiet + 1, 8)
            self._wake.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that races with the event being set, and then stop() waits forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll / 5 if got else self.poll * (1 + quiet)):
                    await self._wake.wait()

    async def _flush_successes(self) -> None:
        """Successes land in batches: one transaction for all that finished meanwhile.

        Until a success lands its row stays leased; if it never lands (store down past the lease)
        the delivery is sent again, under the same id: at least once, never lost."""
        while True:
            await self._done_ready.wait()
            self._done_ready.clear()
            batch, self._done = self._done, []
            while True:
                try:
                    await self.db.succeeded(batch)
                    break
                except TransientError as e:
                    log.warning("webhook outbox unavailable: %s", e)
                    await asyncio.sleep(1.0)
            self._wake.set()

    async def _with_bodies(self, d: Claimed) -> bytes | None:
        """The payload to send: with the record's bodies for an endpoint that asked for them;
        None (and the delivery postponed) when they cannot be read now."""
        if self.bodies is None or not d.endpoint.include_bodies or d.event != REQUEST_COMPLETED:
            return d.payload
        try:
            async with asyncio.timeout(self.timeout):
                return await self.bodies.payload(d.endpoint.tenant, d.subject, d.payload)
        except (BodiesUnavailable, TimeoutError) as e:
            error = f"bodies unavailable, sending later: {str(e) or 'timed out'}"
        self.postponed += 1
        for attempt in range(5):
            try:
                await self.db.postpone(d, error, min(self.max_backoff, 10.0))
                break
            except TransientError:  # the lease lapses and the delivery is claimed again anyway
                await asyncio.sleep(0.5 * (attempt + 1))
        return None

    async def _deliver(self, d: Claimed) -> None:
        assert self._session is not None
        try:
            payload = await self._with_bodies(d)
            if payload is None:
                return
            status, error, retry = await send(self._session, d.endpoint, d.id, payload, self.allow_private)
            for attempt in range(5):  # the outcome must land, or the row is sent again later
                try:
                    if error is None:
                        self._done.append((d, status or 200))
                        self._done_ready.set()
                        self.sent += 1
                        if d.endpoint.id in self._failing:
                            self._failing.discard(d.endpoint.id)
                            log.warning(
                                "webhook endpoint %s (%s) delivers again",
                                d.endpoint.id,
                                redact_webhook_url(d.endpoint.url),
                            )
                    else:
                        self.failures += 1
                        if d.endpoint.id not in self._failing:
                            self._failing.add(d.endpoint.id)
                            log.warning(
                                "webhook endpoint %s (%s) failing: %s; retried with backoff"
                                " (llmtap webhooks deliveries)",
                                d.endpoint.id, redact_webhook_url(d.endpoint.url), error,
                            )  # fmt: skip
                        outcome = await self.db.failed(
                            d, status, error, retry_after=retry, max_backoff=self.max_backoff,
                            disable_after=self.disable_after, max_rejections=self.max_rejections,
                        )  # fmt: skip
                        if outcome == "disabled":
                            log.warning(
                                "webhook endpoint %s (%s) disabled: %s; last error: %s",
                                d.endpoint.id, redact_webhook_url(d.endpoint.url),
                                "410 Gone" if status == 410 else "failing for too long", error,
                            )  # fmt: skip
                        elif outcome == "given_up":
                            log.warning(
                                "webhook delivery %s to %s given up after %d attempts: %s",
                                d.id, d.endpoint.id, d.attempts + 1, error,
                            )  # fmt: skip
                    break
                except TransientError:
                    await asyncio.sleep(0.5 * (attempt + 1))
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", d.id)
        finally:
            n = self._inflight.get(d.endpoint.id, 1) - 1
            if n > 0:
                self._inflight[d.endpoint.id] = n
            else:
                self._inflight.pop(d.endpoint.id, None)
            self._wake.set()


class DelivererService(OnBackends):
    """`llmtap server` / `llmtap up` part: the deliverer, on the store of `backends` (shared, its
    maker's to close) or of a `SharedBackends` of its own."""

    name = "webhooks"

    def __init__(self, settings: Settings, *, backends: SharedBackends | None = None) -> None:
        self.settings = settings
        self._use_backends(settings, backends)

    async def start(self) -> list[str]:
        """Deliver now, or, while the store is down, say so and start once it is back."""
        self._stack = self._start_stack()
        try:
            return await self._open()
        except (BackendUnavailable, TransientError) as e:
            connect = asyncio.create_task(self._open_later(str(e)), name="llmtap-webhooks-connect")
            self._stack.push_async_callback(cancel, connect)
            # The server's own banner line names the outage; this one only says what waits.
            return ["webhooks  delivering the outbox once the store is back"]
        except BaseException:
            await self._stack.aclose()
            raise

    async def _open_later(self, reason: str) -> None:
        if await open_when_back("webhooks", reason, self._open, quiet=True):
            logging.getLogger("llmtap.webhooks").warning("webhooks: store is back; delivering the outbox")

    async def _open(self) -> list[str]:
        s = self.settings
        ep = env_endpoint(s)
        store = await self.backends.connect_store()
        try:
            db = store.webhooks()
        except NotImplementedError:  # a store without an outbox: nothing to deliver
            if self._private is not None:
                await self._private.stop()
            return []
        if ep is not None:
            await db.put_endpoint(ep)
        deliverer = Deliverer(
            db,
            concurrency=s.webhook_concurrency,
            timeout=s.webhook_timeout_s,
            max_backoff=s.webhook_max_backoff_s,
            disable_after=s.webhook_disable_after_s,
            allow_private=s.webhook_allow_private,
            bodies=PayloadBodies(store, self.backends.connect_bodies, s.webhook_body_bytes),
            max_rejections=s.webhook_max_rejections,
        )
        await deliverer.start()
        self._stack.push_async_callback(deliverer.stop)
        return ["webhooks: delivering the outbox" + (f" (and {redact_webhook_url(ep.url)})" if ep else "")]

    async def stop(self) -> None:
        """Undo `start` in reverse: the connector or the deliverer, then own backends."""
        await self._unwind()
