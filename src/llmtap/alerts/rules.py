"""What an alert rule is, and the checks shared by `llmtap alerts add` and `POST /api/v1/alerts`.

A rule compares one metric of the requests of a sliding window with a threshold:
`error_rate above 0.05 over 5m per model, once at least 20 requests`. The window is whole
minutes and ends at the last whole minute before the evaluation, so the minute rollups answer
it when the grouping allows (see `llmtap.alerts.evaluator`).
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from llmtap.store.query import PROPERTY, is_group_by

#: Metrics a rule can watch, read from a `stats` answer's totals (see `metric_value`).
METRICS: dict[str, str] = {
    "cost_usd": "cost in USD (unpriced requests count as 0)",
    "error_rate": "share of requests that failed (0 to 1)",
    "requests": "number of requests",
    "tokens": "total tokens",
    "p95_latency_ms": "95th percentile latency in ms",
    "p95_ttft_ms": "95th percentile time to first token in ms",
}
OPS = ("above", "below")
MIN_WINDOW_S = 300
MAX_WINDOW_S = 86_400
#: A per-group rule's groups, besides `property.<Name>`.
GROUPS = ("model", "user_id", "provider", "status")
MAX_NAME = 200

_DURATION = re.compile(r"^(\d{1,6})([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Invalid(ValueError):
    """A rule that cannot be added; the message says why in one sentence."""


@dataclass(slots=True)
class AlertRule:
    id: str
    tenant: str
    metric: str
    op: str
    threshold: float
    window_s: int
    group_by: str | None = None
    min_requests: int = 1
    name: str | None = None
    created_at: int = 0  # microseconds
    next_eval_at: int = 0  # the claim (see `llmtap.alerts.db`)
    evaluated_at: int | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "metric": self.metric,
            "op": self.op,
            "threshold": self.threshold,
            "window_s": self.window_s,
            "group_by": self.group_by,
            "min_requests": self.min_requests,
            "created_at": self.created_at,
            "evaluated_at": self.evaluated_at,
        }

    def describe(self) -> str:
        """`error_rate above 0.05 over 5m per model (min 20 requests)`."""
        per = f" per {self.group_by}" if self.group_by else ""
        return (
            f"{self.metric} {self.op} {_num(self.threshold)} over {duration_text(self.window_s)}{per}"
            f" (min {self.min_requests} requests)"
        )


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


def new_rule_id() -> str:
    return "al_" + secrets.token_hex(8)


def parse_duration(text: str) -> int:
    """`300`, `300s`, `5m`, `1h`, `1d` → seconds; `Invalid` otherwise."""
    m = _DURATION.match(text.strip().lower())
    if m is None:
        raise Invalid(f"window {text!r} is not a duration such as 5m, 1h or 1d")
    return int(m[1]) * _UNITS[m[2]]


def duration_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def make_rule(
    tenant: str,
    *,
    metric: Any,
    op: Any,
    threshold: Any,
    window_s: Any,
    group_by: Any = None,
    min_requests: Any = 1,
    name: Any = None,
) -> AlertRule:
    """A checked rule, or `Invalid` naming the first thing wrong (values may come from JSON)."""
    if not isinstance(metric, str) or metric not in METRICS:
        raise Invalid(f"unknown metric {metric!r}; metrics are {', '.join(METRICS)}")
    if op not in OPS:
        raise Invalid(f"op must be above or below, got {op!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise Invalid("threshold must be a finite number")
    if threshold < 0:  # every metric is a count, an amount, a rate or a duration
        raise Invalid(f"threshold must be 0 or more (a {metric} is never negative)")
    if metric == "error_rate" and not 0 <= threshold <= 1:
        raise Invalid("an error_rate threshold is a fraction between 0 and 1 (0.05 is 5%)")
    if isinstance(window_s, bool) or not isinstance(window_s, int):
        raise Invalid("window_s must be a whole number of seconds")
    if not MIN_WINDOW_S <= window_s <= MAX_WINDOW_S or window_s % 60:
        raise Invalid("the window must be whole minutes from 5m to 1d")
    if group_by is not None:
        if not isinstance(group_by, str) or not (
            group_by in GROUPS or (group_by.startswith(PROPERTY) and is_group_by(group_by))
        ):
            choices = f"{', '.join(GROUPS)} or {PROPERTY}<Name>"
            raise Invalid(f"group_by must be one of {choices}, got {group_by!r}")
        if group_by.startswith(PROPERTY):
            group_by = PROPERTY + group_by[len(PROPERTY) :].lower()  # names are case-insensitive
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or not 0 <= min_requests <= 10**9:
        raise Invalid("min_requests must be a whole number from 0 up")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME or "\x00" in name):
        raise Invalid(f"name must be text of at most {MAX_NAME} characters")
    return AlertRule(
        new_rule_id(), tenant, metric, op, float(threshold), window_s, group_by, min_requests, name or None
    )


def metric_value(metric: str, totals: dict[str, Any]) -> float | None:
    """The rule's value from one `stats` totals dict; None when there is none (no TTFT at all)."""
    if metric == "requests":
        return float(totals["count"])
    if metric == "tokens":
        return float(totals.get("total_tokens") or 0)
    if metric == "cost_usd":
        return float(totals.get("cost_usd") or 0.0)
    if metric == "error_rate":
        return float(totals["error_rate"]) if totals["count"] else None
    pcts = totals["latency_ms" if metric == "p95_latency_ms" else "time_to_first_token_ms"]
    v = pcts.get("p95")
    return None if v is None else float(v)


def holds(rule: AlertRule, totals: dict[str, Any]) -> tuple[bool, float | None]:
    """(whether the condition holds, the value). A window with fewer than `min_requests`
    requests is no evidence either way and counts as clear (except for the `requests` metric,
    whose value is the count itself: `requests below 1` must fire on silence)."""
    value = metric_value(rule.metric, totals)
    if value is None or (rule.metric != "requests" and totals["count"] < rule.min_requests):
        return False, value
    return (value > rule.threshold if rule.op == "above" else value < rule.threshold), value


def group_key(value: Any) -> str:
    """A group's key in `alert_states`: `""` for a rule without groups, `"="` + the value, or
    `"null"` for the group of requests without one (NULL and "" stay apart)."""
    return "null" if value is None else "=" + str(value)


def group_value(key: str) -> str | None:
    return key[1:] if key.startswith("=") else None
