"""Outbox and endpoint tables, one implementation for both stores.

The SQL is written once with `$n` placeholders (SQLite reads them as `?n`); times are integer
microseconds in both schemas, so no conversion differs. A `Conn` runs statements inside one
transaction; `WebhookDB.tx()` opens it (SQLite: `BEGIN IMMEDIATE` on a connection of its own;
PostgreSQL: a pooled connection, and claims use `FOR UPDATE SKIP LOCKED` so several deliverers
never take the same row).
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from llmtap.redact import redact_webhook_url
from llmtap.webhooks.outbox import (
    DELIVERY_DISABLED,
    EVENTS,
    Endpoint,
    NewDelivery,
    delivery_id,
    envelope,
)

ENDPOINT_COLS = (
    "id, tenant, url, secret, previous_secret, events, filters, sample, include_bodies,"
    " created_at, disabled_at, failing_since, retry_at, failures, format"
)
SELECT_ENDPOINTS = f"SELECT {ENDPOINT_COLS} FROM webhook_endpoints"
INSERT_DELIVERY = (
    "INSERT INTO webhook_deliveries (id, endpoint_id, tenant, event, subject, payload, status,"
    " attempts, next_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7)"
    " ON CONFLICT (id) DO NOTHING"
)

_LEASE = "UPDATE webhook_deliveries SET lease_until = $2 WHERE id = $1"
# Only the rows still waiting are rewritten: most of a backlog was due when it was written.
_ALL_DUE = (
    "UPDATE webhook_deliveries SET next_at = $2"
    " WHERE endpoint_id = $1 AND status = 'pending' AND next_at > $2"
)


def now_us() -> int:
    return time.time_ns() // 1000


def endpoint_from_row(row: Sequence[Any]) -> Endpoint:
    return Endpoint(
        id=row[0], tenant=row[1], url=row[2], secret=row[3], previous_secret=row[4],
        events=orjson.loads(row[5]), filters=orjson.loads(row[6]), sample=float(row[7]),
        include_bodies=bool(row[8]), created_at=row[9], disabled_at=row[10],
        failing_since=row[11], retry_at=row[12], failures=row[13], format=row[14],
    )  # fmt: skip


def delivery_params(d: NewDelivery) -> tuple[Any, ...]:
    return (d.id, d.endpoint_id, d.tenant, d.event, d.subject, d.payload.decode(), d.created_at)


#: 4xx answers that refuse this event, not the receiver's state at the moment (408, 409, 423,
#: 425 and 429 say "later"): an event refused this way while the endpoint takes others is given
#: up after `max_rejections` attempts.
_NOT_PERMANENT = frozenset({408, 409, 423, 425, 429})
#: Standard Webhooks: 410 Gone means the receiver wants no more webhooks from us at all.
GONE = 410


def rejected(status: int | None) -> bool:
    """A permanent refusal of one event (a 4xx other than the "try later" ones)."""
    return status is not None and 400 <= status < 500 and status not in _NOT_PERMANENT


@dataclass(slots=True)
class Claimed:
    id: str
    endpoint: Endpoint
    event: str
    payload: bytes
    attempts: int
    probe: bool
    subject: str = ""
    last_status: int | None = None


class Conn(Protocol):
    async def fetch(self, query: str, *args: Any) -> list[Sequence[Any]]: ...

    async def execute(self, query: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""
        ...


class WebhookDB:
    """Endpoint management, claims and outcomes. Subclasses provide `tx()`."""

    skip_locked = ""  # PostgreSQL: " FOR UPDATE SKIP LOCKED"

    def tx(self) -> AbstractAsyncContextManager[Conn]:
        raise NotImplementedError

    # -- endpoints ----------------------------------------------------------------------------
    async def add_endpoint(self, ep: Endpoint) -> Endpoint:
        ep.created_at = ep.created_at or now_us()
        async with self.tx() as c:
            await c.execute(
                "INSERT INTO webhook_endpoints (id, tenant, url, secret, previous_secret, events,"
                " filters, sample, include_bodies, created_at, failures, format)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11)",
                ep.id, ep.tenant, ep.url, ep.secret, ep.previous_secret,
                orjson.dumps(ep.events).decode(), orjson.dumps(ep.filters).decode(),
                ep.sample, int(ep.include_bodies), ep.created_at, ep.format,
            )  # fmt: skip
        return ep

    async def put_endpoint(self, ep: Endpoint) -> None:
        """Create or update an endpoint with a fixed id (the one configured by environment)."""
        async with self.tx() as c:
            rows = await c.fetch(f"{SELECT_ENDPOINTS} WHERE id = $1", ep.id)
            if not rows:
                ep.created_at = now_us()
                await c.execute(
                    "INSERT INTO webhook_endpoints (id, tenant, url, secret, events, filters,"
                    " sample, include_bodies, created_at, failures)"
                    " VALUES ($1, $2, $3, $4, $5, '{}', 1.0, 0, $6, 0)",
                    ep.id, ep.tenant, ep.url, ep.secret, orjson.dumps(ep.events).decode(), ep.created_at,
                )  # fmt: skip
                return
            old = endpoint_from_row(rows[0])
            if old.events != ep.events:  # event types added since (alerts): this endpoint gets all
                await c.execute(
                    "UPDATE webhook_endpoints SET events = $2 WHERE id = $1",
                    ep.id, orjson.dumps(ep.events).decode(),
                )  # fmt: skip
            if (old.url, old.secret, old.tenant) != (ep.url, ep.secret, ep.tenant):
                # A changed secret keeps signing with the old one too, so receivers can roll over.
                prev = old.secret if old.secret != ep.secret else old.previous_secret
                await c.execute(
                    "UPDATE webhook_endpoints SET url = $2, secret = $3, previous_secret = $4,"
                    " tenant = $5, disabled_at = NULL WHERE id = $1",
                    ep.id, ep.url, ep.secret, prev, ep.tenant,
                )  # fmt: skip

    async def rotate_secret(self, tenant: str, endpoint_id: str, secret: str) -> bool:
        async with self.tx() as c:
            n = await c.execute(
                "UPDATE webhook_endpoints SET previous_secret = secret, secret = $3"
                " WHERE id = $1 AND tenant = $2",
                endpoint_id, tenant, secret,
            )  # fmt: skip
        return n > 0

    async def list_endpoints(self, tenant: str | None = None) -> list[Endpoint]:
        async with self.tx() as c:
            if tenant is None:
                rows = await c.fetch(f"{SELECT_ENDPOINTS} ORDER BY created_at")
            else:
                rows = await c.fetch(f"{SELECT_ENDPOINTS} WHERE tenant = $1 ORDER BY created_at", tenant)
        return [endpoint_from_row(r) for r in rows]

    async def get_endpoint(self, tenant: str, endpoint_id: str) -> Endpoint | None:
        async with self.tx() as c:
            rows = await c.fetch(f"{SELECT_ENDPOINTS} WHERE id = $1 AND tenant = $2", endpoint_id, tenant)
        return endpoint_from_row(rows[0]) if rows else None

    async def remove_endpoint(self, tenant: str, endpoint_id: str) -> bool:
        async with self.tx() as c:
            where = "WHERE tenant = $2 AND"
            n = await c.execute(f"DELETE FROM webhook_endpoints {where} id = $1", endpoint_id, tenant)
            await c.execute(f"DELETE FROM webhook_deliveries {where} endpoint_id = $1", endpoint_id, tenant)
        return n > 0

    async def enable_endpoint(self, tenant: str, endpoint_id: str) -> bool:
        async with self.tx() as c:
            n = await c.execute(
                "UPDATE webhook_endpoints SET disabled_at = NULL, failing_since = NULL, failures = 0,"
                " retry_at = NULL WHERE id = $1 AND tenant = $2",
                endpoint_id, tenant,
            )  # fmt: skip
            if n:  # another tenant's endpoint id reschedules nothing of theirs
                await c.execute(_ALL_DUE, endpoint_id, now_us())
        return n > 0

    # -- the delivery log ---------------------------------------------------------------------
    async def list_deliveries(
        self, tenant: str, endpoint_id: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        where, args = ["tenant = $1"], [tenant]
        for col, value in (("endpoint_id", endpoint_id), ("status", status)):
            if value is not None:
                args.append(value)
                where.append(f"{col} = ${len(args)}")
        q = (
            "SELECT id, endpoint_id, event, subject, status, attempts, last_status, last_error,"
            f" created_at, next_at, delivered_at FROM webhook_deliveries WHERE {' AND '.join(where)}"
            f" ORDER BY created_at DESC, id LIMIT {int(limit)}"
        )
        async with self.tx() as c:
            rows = await c.fetch(q, *args)
        keys = ("id", "endpoint_id", "event", "subject", "status", "attempts", "last_status",
                "last_error", "created_at", "next_at", "delivered_at")  # fmt: skip
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def redeliver(self, tenant: str, msg_id: str) -> bool:
        """Send a delivery again (same `webhook-id`: a receiver that has it can drop it)."""
        async with self.tx() as c:
            n = await c.execute(
                "UPDATE webhook_deliveries SET status = 'pending', next_at = $3, lease_until = NULL"
                " WHERE id = $1 AND tenant = $2",
                msg_id, tenant, now_us(),
            )  # fmt: skip
        return n > 0

    # -- the deliverer ------------------------------------------------------------------------
    def claim_sql(self, due: bool) -> str:
        """An endpoint's next deliveries, oldest first ($1 endpoint, $2 now, $3 how many).

        Read in the order of the `webhook_deliveries_due` index, so a claim stops after `$3`
        rows: a receiver back from an outage has its whole backlog due at one `next_at`, and
        ordered by an index of `next_at` alone, each claim sorted all of it (0.4 s for 300k
        rows, holding SQLite's write lock the worker needs, every 50 ms).
        """
        return (
            "SELECT id, event, payload, attempts, subject, last_status FROM webhook_deliveries"
            " WHERE endpoint_id = $1 AND status = 'pending'"
            " AND (lease_until IS NULL OR lease_until <= $2)"
            + (" AND next_at <= $2" if due else "")
            + f" ORDER BY next_at, created_at, id LIMIT $3{self.skip_locked}"
        )

    async def claim(self, slots: dict[str, int], default_slots: int, lease_s: float) -> list[Claimed]:
        """Lease due deliveries: up to the free slots per healthy endpoint, one probe per failing one.

        `slots` holds the free slots of endpoints that have requests in flight here; an endpoint
        that is failing and waiting (`retry_at` in the future) gets nothing, so a dead receiver's
        backlog costs one request per backoff period, not one per delivery.
        """
        now = now_us()
        lease = now + int(lease_s * 1e6)
        out: list[Claimed] = []
        async with self.tx() as c:
            rows = await c.fetch(
                f"{SELECT_ENDPOINTS} WHERE disabled_at IS NULL AND (retry_at IS NULL OR retry_at <= $1)"
                f" ORDER BY id{self.skip_locked}",
                now,
            )
            for ep in map(endpoint_from_row, rows):
                probe = ep.failing_since is not None
                n = min(slots.get(ep.id, default_slots), 1 if probe else default_slots)
                if n <= 0:
                    continue
                got = await c.fetch(self.claim_sql(due=not probe), ep.id, now, n)
                for r in got:
                    await c.execute(_LEASE, r[0], lease)
                    out.append(Claimed(r[0], ep, r[1], r[2].encode(), r[3], probe, r[4], r[5]))
                if probe and got:
                    # No second probe (here or in another deliverer) while this one is out.
                    await c.execute("UPDATE webhook_endpoints SET retry_at = $2 WHERE id = $1", ep.id, lease)
        return out

    async def succeeded(self, done: Sequence[tuple[Claimed, int]]) -> None:
        """Record successful sends (one transaction for many: one fsync on SQLite)."""
        now = now_us()
        async with self.tx() as c:
            for d, status in done:
                await c.execute(
                    "UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts + 1,"
                    " last_status = $2, last_error = NULL, delivered_at = $3, lease_until = NULL"
                    " WHERE id = $1",
                    d.id, status, now,
                )  # fmt: skip
            for ep_id in {d.endpoint.id for d, _ in done if d.probe}:
                recovered = await c.execute(
                    "UPDATE webhook_endpoints SET failing_since = NULL, failures = 0, retry_at = NULL"
                    " WHERE id = $1 AND failing_since IS NOT NULL",
                    ep_id,
                )
                if recovered:
                    # The receiver is back: its whole backlog is due now, whatever each row's backoff.
                    await c.execute(_ALL_DUE, ep_id, now)

    async def failed(
        self,
        d: Claimed,
        status: int | None,
        error: str,
        *,
        retry_after: float | None,
        max_backoff: float,
        disable_after: float,
        max_rejections: int = 5,
    ) -> str | None:
        """Record a failed attempt and back the endpoint off. Returns "disabled" when the
        endpoint got disabled (failing for `disable_after`, or 410 Gone), "given_up" when this
        delivery was given up, else None.

        A delivery is given up (status `failed`, its last answer kept in the log) when a receiver
        that is taking other events refuses this one for good: a permanent 4xx (`rejected`) on
        an attempt made while the endpoint was healthy (not a probe, not failing), the previous
        attempt refused too, after at least `max_rejections` attempts. Without this, one event
        a receiver can never accept would be retried for days, and each failure would send the
        whole endpoint back to probing. A receiver refusing everything never gets a success,
        so its events stay pending (for `llmtap webhooks enable`) and the endpoint is disabled.
        """
        now = now_us()
        async with self.tx() as c:
            rows = await c.fetch(
                f"SELECT failing_since, failures, disabled_at, tenant FROM webhook_endpoints WHERE id = $1"
                f"{' FOR UPDATE' if self.skip_locked else ''}",
                d.endpoint.id,
            )
            attempts = d.attempts + 1
            healthy = bool(rows) and rows[0][0] is None and rows[0][2] is None and not d.probe
            if (
                healthy and status != GONE and rejected(status) and rejected(d.last_status)
                and attempts >= max_rejections
            ):  # fmt: skip
                await c.execute(
                    "UPDATE webhook_deliveries SET status = 'failed', attempts = $2, last_status = $3,"
                    " last_error = $4, next_at = $5, lease_until = NULL WHERE id = $1",
                    d.id, attempts, status, f"given up: {error}"[:500], now,
                )  # fmt: skip
                return "given_up"
            await c.execute(
                "UPDATE webhook_deliveries SET attempts = $2, last_status = $3, last_error = $4,"
                " next_at = $5, lease_until = NULL WHERE id = $1",
                d.id, attempts, status, error[:500], now + backoff_us(attempts, max_backoff),
            )  # fmt: skip
            if not rows or rows[0][2] is not None:
                return None
            if rows[0][0] is not None and not d.probe and status != GONE:
                # Sent while the endpoint was healthy, failed after another request of the same
                # round marked it failing: one outage counts once, not once per request in
                # flight (8 of them took the first wait straight to the longest).
                return None
            since = rows[0][0] if rows[0][0] is not None else now
            failures = rows[0][1] + 1
            wait = backoff_us(failures, max_backoff)
            if retry_after is not None:  # honoured, within reason (an hour)
                wait = max(wait, int(min(retry_after, 3600.0) * 1e6))
            if status == GONE or now - since >= disable_after * 1e6:
                await c.execute(
                    "UPDATE webhook_endpoints SET disabled_at = $2, failures = $3, retry_at = NULL"
                    " WHERE id = $1",
                    d.endpoint.id, now, failures,
                )  # fmt: skip
                await self._announce_disabled(c, d.endpoint, rows[0][3], since, now, error)
                return "disabled"
            await c.execute(
                "UPDATE webhook_endpoints SET failing_since = $2, failures = $3, retry_at = $4 WHERE id = $1",
                d.endpoint.id, since, failures, now + wait,
            )  # fmt: skip
        return None

    async def postpone(self, d: Claimed, error: str, delay_s: float) -> None:
        """Send this delivery later without an attempt (its bodies could not be read): the
        endpoint's state is untouched, so its other deliveries go on (a probe's endpoint may
        probe again after `delay_s`, not only once the probe's lease has lapsed)."""
        later = now_us() + int(delay_s * random.uniform(0.5, 1.0) * 1e6)
        async with self.tx() as c:
            await c.execute(
                "UPDATE webhook_deliveries SET next_at = $2, last_error = $3, lease_until = NULL"
                " WHERE id = $1 AND status = 'pending'",
                d.id, later, error[:500],
            )  # fmt: skip
            if d.probe:
                await c.execute(
                    "UPDATE webhook_endpoints SET retry_at = $2 WHERE id = $1 AND failing_since IS NOT NULL",
                    d.endpoint.id, later,
                )  # fmt: skip

    async def purge_deliveries(self, before_us: int, limit: int = 10_000) -> int:
        """Delete up to `limit` delivered or given-up deliveries finished before `before_us`
        (pending ones never); returns how many. The retention task calls it in a loop."""
        async with self.tx() as c:
            return await c.execute(
                "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries"
                " WHERE status <> 'pending' AND COALESCE(delivered_at, next_at) < $1 LIMIT $2)",
                before_us, limit,
            )  # fmt: skip

    async def _announce_disabled(
        self, c: Conn, ep: Endpoint, tenant: str, since: int, now: int, error: str
    ) -> None:
        """A `delivery.disabled` event to the tenant's other endpoints that subscribe to it."""
        rows = await c.fetch(f"{SELECT_ENDPOINTS} WHERE tenant = $1 AND disabled_at IS NULL", tenant)
        shown = redact_webhook_url(ep.url).split("?", 1)[0]
        data = {"endpoint_id": ep.id, "url": shown, "failing_since_us": since,
                "disabled_at_us": now, "last_error": error[:500]}  # fmt: skip
        for other in map(endpoint_from_row, rows):
            if DELIVERY_DISABLED not in other.events:
                continue
            body = envelope(DELIVERY_DISABLED, _iso(now), data)
            nd = NewDelivery(
                delivery_id(other.id, DELIVERY_DISABLED, tenant, f"{ep.id}@{now}"),
                other.id, tenant, DELIVERY_DISABLED, ep.id, body, now,
            )  # fmt: skip
            await c.execute(INSERT_DELIVERY, *delivery_params(nd))


def _iso(us: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()


def backoff_us(n: int, cap_s: float) -> int:
    """Exponential from 1 s, capped, with full jitter in its upper half."""
    base = min(cap_s, 2.0 ** min(n - 1, 30))
    return int(base * random.uniform(0.5, 1.0) * 1e6)


def new_endpoint_id() -> str:
    return "ep_" + secrets.token_hex(8)


__all__ = ["EVENTS", "Claimed", "Conn", "WebhookDB", "backoff_us", "new_endpoint_id", "rejected"]
