"""`/api/v1/alerts`: the same rule management as `llmtap alerts`, and each rule's state.

Tenant-scoped like every other API route: a tenant sees, changes and removes only its own
rules. Rules are checked by `llmtap.alerts.rules.make_rule` (a 400 names the first mistake).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from llmtap.alerts.db import AlertDB
from llmtap.alerts.rules import AlertRule, Invalid, group_value, make_rule
from llmtap.server import api
from llmtap.webhooks.db import now_us

_FIELDS = ("metric", "op", "threshold", "window_s", "group_by", "min_requests", "name")
_REQUIRED = ("metric", "op", "threshold", "window_s")


def _db(request: web.Request) -> AlertDB:
    return AlertDB(request.app[api.STORE].webhooks())


def _state(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "group": group_value(s["group_key"]),
        "state": s["state"],
        "episode": s["episode"],
        "value": s["value"],
        "count": s["count"],
        "fired_at": s["fired_at"],
        "resolved_at": s["resolved_at"],
        "clear_since": s["clear_since"],
    }


async def _with_states(db: AlertDB, tenant: str, rules: list[AlertRule]) -> list[dict[str, Any]]:
    states = await db.states(tenant, rules[0].id if len(rules) == 1 else None)
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for s in states:
        by_rule.setdefault(s["rule_id"], []).append(_state(s))
    out = []
    for r in rules:
        mine = by_rule.get(r.id, [])
        out.append({**r.public(), "firing": sum(s["state"] == "firing" for s in mine), "states": mine})
    return out


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body: Any = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return api.error_response(400, "the body is not JSON")
    if not isinstance(body, dict):
        return api.error_response(400, "send a JSON object")
    unknown = set(body) - set(_FIELDS)
    if unknown:
        return api.error_response(400, f"unknown field {sorted(unknown)[0]!r}")
    return body


async def list_rules(request: web.Request) -> web.Response:
    api.no_params(request)
    db, tenant = _db(request), api._tenant(request)
    rules = await db.list_rules(tenant)
    return api.json_response({"items": await _with_states(db, tenant, rules) if rules else []})


async def add_rule(request: web.Request) -> web.Response:
    api.no_params(request)
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    missing = [f for f in _REQUIRED if f not in body]
    if missing:
        return api.error_response(400, f"missing field {missing[0]!r} (required: {', '.join(_REQUIRED)})")
    try:
        rule = make_rule(api._tenant(request), **body)
    except Invalid as e:
        return api.error_response(400, str(e))
    rule = await _db(request).add_rule(rule, now_us())
    return api.json_response(rule.public(), status=201)


async def get_rule(request: web.Request) -> web.Response:
    api.no_params(request)
    db, tenant, rule_id = _db(request), api._tenant(request), api.path_id(request)
    rule = await db.get_rule(tenant, rule_id)
    if rule is None:
        return api.error_response(404, f"no alert rule {rule_id!r}")
    return api.json_response((await _with_states(db, tenant, [rule]))[0])


async def update_rule(request: web.Request) -> web.Response:
    """Change some fields; the whole rule is checked again. Its states stay: the next
    evaluation fires or resolves by the new condition."""
    api.no_params(request)
    db, tenant, rule_id = _db(request), api._tenant(request), api.path_id(request)
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    rule = await db.get_rule(tenant, rule_id)
    if rule is None:
        return api.error_response(404, f"no alert rule {rule_id!r}")
    fields = {f: getattr(rule, f) for f in _FIELDS}
    fields.update(body)
    try:
        checked = make_rule(tenant, **fields)
    except Invalid as e:
        return api.error_response(400, str(e))
    checked.id = rule.id
    if not await db.update_rule(checked):
        return api.error_response(404, f"no alert rule {rule_id!r}")
    updated = await db.get_rule(tenant, rule_id)
    assert updated is not None
    return api.json_response(updated.public())


async def remove_rule(request: web.Request) -> web.Response:
    api.no_params(request)
    rule_id = api.path_id(request)
    if not await _db(request).remove_rule(api._tenant(request), rule_id):
        return api.error_response(404, f"no alert rule {rule_id!r}")
    return web.Response(status=204)


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/v1/alerts", list_rules)
    r.add_post("/api/v1/alerts", add_rule)
    r.add_get("/api/v1/alerts/{id}", get_rule)
    r.add_patch("/api/v1/alerts/{id}", update_rule)
    r.add_delete("/api/v1/alerts/{id}", remove_rule)
