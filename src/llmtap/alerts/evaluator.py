"""The alert evaluator: every `alert_interval_s`, each due rule is evaluated on the store's stats.

The window of an evaluation at `now` is `[m - window, m)` where `m` is `now` rounded down to the
minute: whole minutes, so the minute rollups answer it exactly when the grouping is rolled up
(overall, model, provider, status); per property (rolled up per hour) the whole hours inside it
come from rollups and the partial hours at its ends from raw rows; per user raw rows answer;
all through the same `Store.stats` the API uses. A record counts once the worker has
stored it: a record stored late counts in the evaluations whose window still holds its start
time (a queue lagging by more than a rule's window hides that record from the rule).

Firing and resolving, per rule x group (the groups of `stats`: its 100 largest by count):

- fires at the first evaluation where the condition holds with at least `min_requests` requests
  (a window with fewer is no evidence and counts as clear);
- resolves only once the condition has been clear at every evaluation for `alert_resolve_after_s`
  (default 300 s; so at least two evaluations): a value hovering around the threshold fires once
  and stays firing, and a firing/resolved pair takes at least that long, never a storm;
- a firing group absent from a later answer (no requests in the window) is evaluated on an empty
  window: `requests below N` keeps firing, the other metrics count as clear; for a grouped
  `requests below N`, so are the groups of the window before (a group that went silent fires).

Several servers may evaluate at once; `llmtap.alerts.db` says why that neither doubles nor
loses an event. The clock is injectable (`now` in microseconds), so tests need no sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from llmtap.alerts.db import AlertDB, Outcome, iso_us
from llmtap.alerts.rules import AlertRule, duration_text, group_key, group_value, holds
from llmtap.errors import BackendUnavailable, TransientError
from llmtap.runtime import OnBackends, SharedBackends, cancel, open_when_back
from llmtap.store.base import StatsQuery, Store
from llmtap.store.query import MAX_GROUPS, PROPERTY, ListQuery, from_micros

if TYPE_CHECKING:
    from llmtap.config import Settings

log = logging.getLogger("llmtap.alerts")

_MINUTE_US = 60_000_000
#: Firing groups missing from a cut answer asked for alone per evaluation (one query each), in
#: turns: the others keep their state until their turn (or the answer) comes.
_ALONE_MAX = 50
#: The totals of a window without requests (a firing group that had none this time).
_EMPTY: dict[str, Any] = {
    "count": 0, "error_rate": 0.0, "total_tokens": 0, "cost_usd": 0.0,
    "latency_ms": {"p95": None}, "time_to_first_token_ms": {"p95": None},
}  # fmt: skip


def _clock_us() -> int:
    return time.time_ns() // 1000


def window_of(rule: AlertRule, now_us: int) -> tuple[int, int]:
    end = now_us // _MINUTE_US * _MINUTE_US
    return end - rule.window_s * 1_000_000, end


class Evaluator:
    def __init__(
        self,
        store: Store,
        *,
        interval_s: float = 60.0,
        resolve_after_s: float = 300.0,
        clock: Callable[[], int] = _clock_us,
    ) -> None:
        self.store = store
        self.db = AlertDB(store.webhooks())
        self.interval_us = int(interval_s * 1e6)
        self.resolve_after_us = int(resolve_after_s * 1e6)
        self.clock = clock
        self.fired = 0
        self.resolved = 0
        self._turns: dict[str, int] = {}  # rule -> where the next turn of outranked groups starts

    async def run_once(self, now_us: int | None = None) -> int:
        """Evaluate every due rule this evaluator can claim; how many it evaluated."""
        now = self.clock() if now_us is None else now_us
        n = 0
        for rule in await self.db.due_rules(now):
            if not await self.db.claim(rule.id, now, self.interval_us):
                continue  # another evaluator has it for this interval
            try:
                await self.evaluate(rule, now)
            except (TransientError, BackendUnavailable):
                raise
            except Exception:  # one broken rule must not stop the others
                log.exception("alert rule %s could not be evaluated", rule.id)
            n += 1
        return n

    async def evaluate(self, rule: AlertRule, now_us: int) -> None:
        """One evaluation of `rule` at `now_us` (no claim: `run_once` takes it)."""
        since, until = window_of(rule, now_us)
        stats = await self.store.stats(
            rule.tenant,
            StatsQuery(since=from_micros(since), until=from_micros(until), group_by=rule.group_by),
        )
        if rule.group_by is None:
            seen = {"": stats["overall"]}
        else:
            seen = {group_key(g["key"]): g for g in stats["groups"]}
            if rule.metric == "requests" and rule.op == "below" and len(seen) < MAX_GROUPS:
                # A group that went silent is in no answer of this window: the groups of the one
                # before are evaluated too, on an empty window (then `requests below N` fires).
                # Not when this answer is cut at its largest groups: a group missing from it may
                # be a small one still sending.
                before = await self.store.stats(
                    rule.tenant,
                    StatsQuery(
                        since=from_micros(2 * since - until), until=from_micros(since), group_by=rule.group_by
                    ),
                )
                for g in before["groups"]:
                    seen.setdefault(group_key(g["key"]), _EMPTY)
        firing = await self.db.firing(rule.id)
        unknown: set[str] = set()
        if rule.group_by is not None and len(stats["groups"]) >= MAX_GROUPS:
            # The answer holds the largest groups only: a firing group missing from it may still
            # be sending (and its condition holding). Ask for it alone; not knowable: unchanged.
            missing = sorted(firing - seen.keys())
            turn = self._turns.get(rule.id, 0) % max(1, len(missing))  # others' turn next time
            self._turns[rule.id] = turn + _ALONE_MAX
            for n, key in enumerate(missing[turn:] + missing[:turn]):
                own = await self._one_group(rule, since, until, key) if n < _ALONE_MAX else None
                if own is None:
                    unknown.add(key)
                else:
                    seen[key] = own
        base = {"window_start": iso_us(since), "window_end": iso_us(until), "source": stats.get("source")}
        outcomes = []
        for key in (seen.keys() | firing) - unknown:
            totals = seen.get(key, _EMPTY)
            held, value = holds(rule, totals)
            count = int(totals["count"])
            if held or key in firing:
                data = {**base, **_event_data(rule, key, value, count, held)}
                outcomes.append(Outcome(key, held, value, count, key in firing, data))
        if not outcomes:
            return
        fired, resolved = await self.db.apply(rule, now_us, self.resolve_after_us, outcomes)
        self.fired += len(fired)
        self.resolved += len(resolved)
        by_key = {o.key: o for o in outcomes}
        for key in fired:
            log.warning("alert firing: %s", by_key[key].data["summary"])
        for key in resolved:
            log.warning("alert resolved: %s", by_key[key].data["summary"])

    async def _one_group(self, rule: AlertRule, since: int, until: int, key: str) -> dict[str, Any] | None:
        """The totals of one group of `rule` over the window (None: the group of requests
        without a value, which no filter selects)."""
        value = group_value(key)
        if value is None or rule.group_by is None:
            return None
        if rule.group_by.startswith(PROPERTY):
            filters = ListQuery(properties={rule.group_by[len(PROPERTY) :]: value})
        elif rule.group_by == "status":
            if not value.isdigit():
                return None
            filters = ListQuery(status=int(value))
        else:  # model, provider, user_id, session_id
            filters = ListQuery()
            setattr(filters, rule.group_by, value)
        stats = await self.store.stats(
            rule.tenant, StatsQuery(since=from_micros(since), until=from_micros(until), filters=filters)
        )
        return cast(dict[str, Any], stats["overall"])


def _event_data(rule: AlertRule, key: str, value: float | None, count: int, held: bool) -> dict[str, Any]:
    group = group_value(key)
    where = f" for {rule.group_by}={group if key != 'null' else '(none)'}" if rule.group_by else ""
    shown = "no value" if value is None else f"{value:.6g}"
    summary = (
        f"{rule.name or rule.id}: {rule.metric}{where} is {shown}"
        f" ({'' if held else 'no longer '}{rule.op} {rule.threshold:g}) over the last"
        f" {duration_text(rule.window_s)}, {count} requests"
    )
    return {
        "alert_id": rule.id, "name": rule.name, "tenant": rule.tenant, "metric": rule.metric,
        "op": rule.op, "threshold": rule.threshold, "window_s": rule.window_s,
        "group_by": rule.group_by, "group": group, "value": value, "count": count,
        "min_requests": rule.min_requests, "summary": summary,
    }  # fmt: skip


class AlertService(OnBackends):
    """`llmtap server` / `llmtap up` part: evaluates the rules every `alert_interval_s`."""

    name = "alerts"

    def __init__(self, settings: Settings, *, backends: SharedBackends | None = None) -> None:
        self.settings = settings
        self._use_backends(settings, backends)
        self.evaluator: Evaluator | None = None

    async def start(self) -> list[str]:
        self._stack = self._start_stack()
        try:
            return await self._open()
        except (BackendUnavailable, TransientError) as e:
            connect = asyncio.create_task(self._open_later(str(e)), name="llmtap-alerts-connect")
            self._stack.push_async_callback(cancel, connect)
            return ["alerts    evaluating once the store is back"]
        except BaseException:
            await self._stack.aclose()
            raise

    async def _open_later(self, reason: str) -> None:
        if await open_when_back("alerts", reason, self._open, quiet=True):
            log.warning("alerts: store is back; evaluating")

    async def _open(self) -> list[str]:
        store = await self.backends.connect_store()
        try:
            store.webhooks()
        except NotImplementedError:  # a store without an outbox has no alert tables either
            return []
        s = self.settings
        self.evaluator = Evaluator(
            store, interval_s=s.alert_interval_s, resolve_after_s=s.alert_resolve_after_s
        )
        task = asyncio.create_task(self._loop(self.evaluator), name="llmtap-alerts")
        self._stack.push_async_callback(cancel, task)
        return [f"alerts    evaluated every {s.alert_interval_s:g} s"]

    async def _loop(self, ev: Evaluator) -> None:
        outage = False
        while True:
            try:
                await ev.run_once()
                if outage:
                    outage = False
                    log.warning("alerts: store available again, evaluating")
            except (BackendUnavailable, TransientError) as e:
                if not outage:  # one line when it goes and one when it is back, not per round
                    outage = True
                    log.warning("alerts: store unavailable, evaluating again later: %s", e)
            except Exception:
                log.exception("alert evaluation failed")
            await asyncio.sleep(self.settings.alert_interval_s)

    async def stop(self) -> None:
        await self._unwind()
