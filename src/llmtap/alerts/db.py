"""Alert rules and states in the store, one implementation for both (the webhook tables' `Conn`).

Who decides. Any number of servers evaluate. Each takes a rule for one interval with a
conditional update of `next_eval_at` (`claim`), so a rule is normally evaluated once per interval
in all. That is economy, not safety: the state changes themselves are conditional updates of
the rule x group row — `firing` only from not-firing (`_fire`), `resolved` only from `firing`
(`_clear`) — in the transaction that writes the events into the outbox (one per evaluation,
its rows taken in key order). PostgreSQL's row lock (an UPDATE waits for a concurrent one, then
re-checks its WHERE) and SQLite's single writer make the second of two racing evaluators change
nothing and write nothing. A delivery's id is derived from (endpoint, event, rule, group,
episode, its firing time) as well, so even a repeated insert is a no-op: a receiver sees each
firing and each resolution once, under one `webhook-id`, never reused for another firing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llmtap.alerts.rules import AlertRule
from llmtap.webhooks.db import (
    INSERT_DELIVERY,
    SELECT_ENDPOINTS,
    Conn,
    WebhookDB,
    delivery_params,
    endpoint_from_row,
)
from llmtap.webhooks.outbox import ALERT_FIRING, ALERT_RESOLVED, Endpoint, NewDelivery, delivery_id, envelope

_COLS = (
    "id, tenant, metric, op, threshold, window_s, group_by, min_requests, name, created_at,"
    " next_eval_at, evaluated_at"
)
_SELECT = f"SELECT {_COLS} FROM alert_rules"
_STATE_COLS = ("rule_id", "group_key", "state", "episode", "value", "count", "fired_at", "resolved_at",
               "clear_since", "updated_at")  # fmt: skip

_FIRE = (
    "INSERT INTO alert_states (rule_id, group_key, tenant, state, episode, value, count, fired_at,"
    " updated_at) VALUES ($1, $2, $3, 'firing', 1, $4, $5, $6, $6)"
    " ON CONFLICT (rule_id, group_key) DO UPDATE SET state = 'firing',"
    " episode = alert_states.episode + 1, value = excluded.value, count = excluded.count,"
    " fired_at = excluded.fired_at, resolved_at = NULL, clear_since = NULL,"
    " updated_at = excluded.updated_at"
    " WHERE alert_states.state <> 'firing'"
    " RETURNING episode"
)
_RESOLVE = (
    "UPDATE alert_states SET state = 'resolved', resolved_at = $3, value = $4, count = $5,"
    " clear_since = NULL, updated_at = $3"
    " WHERE rule_id = $1 AND group_key = $2 AND state = 'firing' AND clear_since IS NOT NULL"
    " AND clear_since <= $6"
    " RETURNING episode, fired_at"
)


@dataclass(slots=True)
class Outcome:
    """One group's evaluation: whether the condition held, the value and request count, whether
    it was firing when the evaluation began, and the event's payload (if it comes to one)."""

    key: str
    held: bool
    value: float | None
    count: int
    was_firing: bool
    data: dict[str, Any] = field(default_factory=dict)


def _rule(row: Any) -> AlertRule:
    return AlertRule(
        id=row[0], tenant=row[1], metric=row[2], op=row[3], threshold=float(row[4]), window_s=int(row[5]),
        group_by=row[6], min_requests=int(row[7]), name=row[8], created_at=int(row[9]),
        next_eval_at=int(row[10]), evaluated_at=None if row[11] is None else int(row[11]),
    )  # fmt: skip


def iso_us(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()


class AlertDB:
    """Rules and states through the store's webhook connection (`WebhookDB.tx`)."""

    def __init__(self, hooks: WebhookDB) -> None:
        self.hooks = hooks

    # -- rules --------------------------------------------------------------------------------
    async def add_rule(self, rule: AlertRule, now_us: int) -> AlertRule:
        rule.created_at = rule.created_at or now_us
        rule.next_eval_at = 0  # due at once
        async with self.hooks.tx() as c:
            await c.execute(
                f"INSERT INTO alert_rules ({_COLS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL)",
                rule.id, rule.tenant, rule.metric, rule.op, rule.threshold, rule.window_s, rule.group_by,
                rule.min_requests, rule.name, rule.created_at, rule.next_eval_at,
            )  # fmt: skip
        return rule

    async def list_rules(self, tenant: str | None = None) -> list[AlertRule]:
        async with self.hooks.tx() as c:
            if tenant is None:
                rows = await c.fetch(f"{_SELECT} ORDER BY created_at, id")
            else:
                rows = await c.fetch(f"{_SELECT} WHERE tenant = $1 ORDER BY created_at, id", tenant)
        return [_rule(r) for r in rows]

    async def get_rule(self, tenant: str, rule_id: str) -> AlertRule | None:
        async with self.hooks.tx() as c:
            rows = await c.fetch(f"{_SELECT} WHERE id = $1 AND tenant = $2", rule_id, tenant)
        return _rule(rows[0]) if rows else None

    async def update_rule(self, rule: AlertRule) -> bool:
        """Store a changed rule (its id and tenant fixed); due again at once. A new `group_by`
        starts it afresh: the old groups are no groups of the new answer (an ungrouped alert
        firing stayed firing for ever, scored on an empty window), and like a removed rule's
        they send no resolution."""
        async with self.hooks.tx() as c:
            rows = await c.fetch(
                "SELECT group_by FROM alert_rules WHERE id = $1 AND tenant = $2", rule.id, rule.tenant
            )
            if rows and rows[0][0] != rule.group_by:
                await c.execute("DELETE FROM alert_states WHERE rule_id = $1", rule.id)
            n = await c.execute(
                "UPDATE alert_rules SET metric = $3, op = $4, threshold = $5, window_s = $6, group_by = $7,"
                " min_requests = $8, name = $9, next_eval_at = 0 WHERE id = $1 AND tenant = $2",
                rule.id, rule.tenant, rule.metric, rule.op, rule.threshold, rule.window_s, rule.group_by,
                rule.min_requests, rule.name,
            )  # fmt: skip
        return n > 0

    async def remove_rule(self, tenant: str, rule_id: str) -> bool:
        """Remove a rule and its states (an alert firing then sends no resolution)."""
        async with self.hooks.tx() as c:
            n = await c.execute("DELETE FROM alert_rules WHERE id = $1 AND tenant = $2", rule_id, tenant)
            if n:
                await c.execute("DELETE FROM alert_states WHERE rule_id = $1", rule_id)
        return n > 0

    async def states(self, tenant: str, rule_id: str | None = None) -> list[dict[str, Any]]:
        """The tenant's rule x group states (firing and resolved), newest change first."""
        q = f"SELECT {', '.join(_STATE_COLS)} FROM alert_states WHERE tenant = $1"
        args: list[Any] = [tenant]
        if rule_id is not None:
            q += " AND rule_id = $2"
            args.append(rule_id)
        async with self.hooks.tx() as c:
            rows = await c.fetch(q + " ORDER BY updated_at DESC, rule_id, group_key", *args)
        return [dict(zip(_STATE_COLS, r, strict=True)) for r in rows]

    # -- evaluation ---------------------------------------------------------------------------
    async def due_rules(self, now_us: int) -> list[AlertRule]:
        async with self.hooks.tx() as c:
            rows = await c.fetch(f"{_SELECT} WHERE next_eval_at <= $1 ORDER BY next_eval_at, id", now_us)
        return [_rule(r) for r in rows]

    async def claim(self, rule_id: str, now_us: int, interval_us: int) -> bool:
        """Take the rule for this interval; False when another evaluator has it."""
        async with self.hooks.tx() as c:
            n = await c.execute(
                "UPDATE alert_rules SET next_eval_at = $2, evaluated_at = $3"
                " WHERE id = $1 AND next_eval_at <= $3",
                rule_id, now_us + interval_us, now_us,
            )  # fmt: skip
        return n > 0

    async def firing(self, rule_id: str) -> set[str]:
        """Group keys of the rule that are firing now."""
        async with self.hooks.tx() as c:
            rows = await c.fetch(
                "SELECT group_key FROM alert_states WHERE rule_id = $1 AND state = 'firing'", rule_id
            )
        return {r[0] for r in rows}

    async def apply(
        self, rule: AlertRule, now_us: int, resolve_after_us: int, outcomes: Sequence[Outcome]
    ) -> tuple[list[str], list[str]]:
        """One evaluation's state changes, in one transaction (one commit, not one per group):
        (keys fired, keys resolved). Keys are taken in order, so two evaluators lock rows in the
        same order (PostgreSQL: no deadlock)."""
        fired: list[str] = []
        resolved: list[str] = []
        async with self.hooks.tx() as c:
            # The rule's row, locked until commit: a rule removed (or being removed) meanwhile
            # changes nothing and sends nothing (it left a firing state and event behind).
            if not await c.execute(
                "UPDATE alert_rules SET evaluated_at = evaluated_at WHERE id = $1 AND tenant = $2",
                rule.id, rule.tenant,
            ):  # fmt: skip
                return fired, resolved
            endpoints: list[Endpoint] | None = None
            for o in sorted(outcomes, key=lambda o: o.key):
                if o.held and not o.was_firing:
                    episode = await self._fire(c, rule, o, now_us)
                    event, done = ALERT_FIRING, fired
                elif o.held:
                    await self._hold(c, rule, o, now_us)
                    continue
                elif o.was_firing:
                    episode = await self._clear(c, rule, o, now_us, resolve_after_us)
                    event, done = ALERT_RESOLVED, resolved
                else:
                    continue
                if episode is None:
                    continue
                if endpoints is None:
                    endpoints = await self._endpoints(c, rule.tenant)
                await self._announce(c, endpoints, rule, o.key, episode, event, o.data, now_us)
                done.append(o.key)
        return fired, resolved

    async def fire(self, rule: AlertRule, o: Outcome, now_us: int) -> int | None:
        """Fire one rule x group unless it is firing already: the new episode, or None."""
        async with self.hooks.tx() as c:
            episode = await self._fire(c, rule, o, now_us)
            if episode is not None:
                eps = await self._endpoints(c, rule.tenant)
                await self._announce(c, eps, rule, o.key, episode, ALERT_FIRING, o.data, now_us)
        return episode

    async def clear(self, rule: AlertRule, o: Outcome, now_us: int, resolve_after_us: int) -> int | None:
        """One firing rule x group found clear: the episode it resolved, or None."""
        async with self.hooks.tx() as c:
            episode = await self._clear(c, rule, o, now_us, resolve_after_us)
            if episode is not None:
                eps = await self._endpoints(c, rule.tenant)
                await self._announce(c, eps, rule, o.key, episode, ALERT_RESOLVED, o.data, now_us)
        return episode

    @staticmethod
    async def _fire(c: Conn, rule: AlertRule, o: Outcome, now_us: int) -> int | None:
        rows = await c.fetch(_FIRE, rule.id, o.key, rule.tenant, o.value, o.count, now_us)
        if not rows:
            return None
        episode = int(rows[0][0])
        o.data = {**o.data, "episode": episode, "fired_at": iso_us(now_us)}
        return episode

    @staticmethod
    async def _hold(c: Conn, rule: AlertRule, o: Outcome, now_us: int) -> None:
        """A firing group whose condition still holds: any clear streak is over."""
        await c.execute(
            "UPDATE alert_states SET clear_since = NULL, value = $3, count = $4, updated_at = $5"
            " WHERE rule_id = $1 AND group_key = $2 AND state = 'firing'",
            rule.id, o.key, o.value, o.count, now_us,
        )  # fmt: skip

    @staticmethod
    async def _clear(c: Conn, rule: AlertRule, o: Outcome, now_us: int, resolve_after_us: int) -> int | None:
        """A firing group whose condition is clear: start its clear streak, and resolve it once
        the streak is `resolve_after_us` old."""
        await c.execute(
            "UPDATE alert_states SET clear_since = $3, updated_at = $3"
            " WHERE rule_id = $1 AND group_key = $2 AND state = 'firing' AND clear_since IS NULL",
            rule.id, o.key, now_us,
        )  # fmt: skip
        rows = await c.fetch(_RESOLVE, rule.id, o.key, now_us, o.value, o.count, now_us - resolve_after_us)
        if not rows:
            return None
        episode, fired_at = int(rows[0][0]), int(rows[0][1])
        o.data = {**o.data, "episode": episode, "fired_at": iso_us(fired_at), "resolved_at": iso_us(now_us)}
        return episode

    @staticmethod
    async def _endpoints(c: Conn, tenant: str) -> list[Endpoint]:
        rows = await c.fetch(f"{SELECT_ENDPOINTS} WHERE tenant = $1 AND disabled_at IS NULL", tenant)
        return [endpoint_from_row(r) for r in rows]

    @staticmethod
    async def _announce(
        c: Conn, endpoints: Sequence[Endpoint], rule: AlertRule, key: str, episode: int, event: str,
        data: dict[str, Any], now_us: int,
    ) -> None:  # fmt: skip
        """The event to each enabled endpoint of the tenant that subscribes to it (filters and
        sampling are about requests: they do not apply)."""
        subject = f"{rule.id}{' ' + key if key else ''} #{episode}"
        # The episode's firing time as well: a store restored from an older backup counts
        # episodes again from an earlier one, and a receiver that drops ids it has seen must
        # not drop a new firing for it (restore check).
        fired = data.get("fired_at", "")
        body = envelope(event, iso_us(now_us), data)
        for ep in endpoints:
            if event not in ep.events:
                continue
            d = NewDelivery(
                delivery_id(ep.id, event, rule.tenant, f"{rule.id}\x00{key}\x00{episode}\x00{fired}"),
                ep.id, rule.tenant, event, subject, body, now_us,
            )  # fmt: skip
            await c.execute(INSERT_DELIVERY, *delivery_params(d))
