"""`/api/v1/webhooks`: the same endpoint management and delivery log as `llmtap webhooks`.

Tenant-scoped like every other API route (the tenant comes from the caller's key in
multi-tenant mode): a tenant sees, changes and redelivers only its own endpoints and deliveries.
Secrets are returned once, when an endpoint is created, and never listed.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from llmtap.server import api
from llmtap.store import query
from llmtap.webhooks.manage import Invalid, create_endpoint, test_endpoint

_ADD_FIELDS = frozenset({"url", "events", "filters", "sample", "include_bodies", "secret", "format"})


def _id(request: web.Request) -> str:
    return api.path_id(request)


async def list_endpoints(request: web.Request) -> web.Response:
    api.no_params(request)
    eps = await request.app[api.STORE].webhooks().list_endpoints(api._tenant(request))
    return api.json_response({"items": [e.public() for e in eps]})


async def add_endpoint(request: web.Request) -> web.Response:
    api.no_params(request)
    try:
        body: Any = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return api.error_response(400, "the body is not JSON")
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        return api.error_response(400, "send a JSON object with at least a url")
    unknown = set(body) - _ADD_FIELDS
    if unknown:
        return api.error_response(400, f"unknown field {sorted(unknown)[0]!r}")
    events, filters = body.get("events") or [], body.get("filters") or []
    if isinstance(filters, dict):  # {"model": "gpt-4o"} is accepted as well as ["model=gpt-4o"]
        filters = [f"{k}={v}" for k, v in filters.items()]
    sample = body.get("sample", 1.0)
    if (
        not isinstance(events, list) or not all(isinstance(e, str) for e in events)
        or not isinstance(filters, list) or not all(isinstance(f, str) for f in filters)
        or not isinstance(sample, int | float) or isinstance(sample, bool)
        or not isinstance(body.get("include_bodies", False), bool)
        or not isinstance(body.get("secret") or "", str)
        or not isinstance(body.get("format", "standard"), str)
    ):  # fmt: skip
        return api.error_response(400, "events and filters are lists of text, sample a number")
    settings = request.app[api.SETTINGS]
    try:
        ep = await create_endpoint(
            request.app[api.STORE].webhooks(), api._tenant(request), body["url"], events=events,
            filters=filters, sample=float(sample), include_bodies=body.get("include_bodies", False),
            secret=body.get("secret"), allow_private=settings.webhook_allow_private,
            format=body.get("format", "standard"),
        )  # fmt: skip
    except Invalid as e:
        return api.error_response(400, str(e))
    return api.json_response({**ep.public(), "secret": ep.secret}, status=201)


async def remove_endpoint(request: web.Request) -> web.Response:
    api.no_params(request)
    if not await request.app[api.STORE].webhooks().remove_endpoint(api._tenant(request), _id(request)):
        return api.error_response(404, f"no webhook endpoint {_id(request)!r}")
    return web.Response(status=204)


async def enable_endpoint(request: web.Request) -> web.Response:
    api.no_params(request)
    if not await request.app[api.STORE].webhooks().enable_endpoint(api._tenant(request), _id(request)):
        return api.error_response(404, f"no webhook endpoint {_id(request)!r}")
    return api.json_response({"enabled": True})


async def test(request: web.Request) -> web.Response:
    api.no_params(request)
    ep = await request.app[api.STORE].webhooks().get_endpoint(api._tenant(request), _id(request))
    if ep is None:
        return api.error_response(404, f"no webhook endpoint {_id(request)!r}")
    settings = request.app[api.SETTINGS]
    result = await test_endpoint(
        ep, allow_private=settings.webhook_allow_private, timeout=settings.webhook_timeout_s
    )
    return api.json_response(result)


async def deliveries(request: web.Request) -> web.Response:
    q = request.rel_url.query
    unknown = set(q) - query.DELIVERY_PARAMS
    if unknown:
        name = sorted(unknown)[0]
        return api.error_response(400, f"unknown parameter {name!r}", parameter=name)
    status = q.get("status")
    if status not in (None, "pending", "delivered", "failed"):
        return api.error_response(400, "status is pending, delivered or failed", parameter="status")
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= query.MAX_LIMIT:
        return api.error_response(400, f"limit is an integer in [1, {query.MAX_LIMIT}]", parameter="limit")
    rows = (
        await request.app[api.STORE]
        .webhooks()
        .list_deliveries(api._tenant(request), q.get("endpoint"), status, limit)
    )
    return api.json_response({"items": rows})


async def redeliver(request: web.Request) -> web.Response:
    api.no_params(request)
    if not await request.app[api.STORE].webhooks().redeliver(api._tenant(request), _id(request)):
        return api.error_response(404, f"no delivery {_id(request)!r}")
    return api.json_response({"queued": True}, status=202)


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/v1/webhooks", list_endpoints)
    r.add_post("/api/v1/webhooks", add_endpoint)
    r.add_get("/api/v1/webhooks/deliveries", deliveries)
    r.add_post("/api/v1/webhooks/deliveries/{id}/redeliver", redeliver)
    r.add_delete("/api/v1/webhooks/{id}", remove_endpoint)
    r.add_post("/api/v1/webhooks/{id}/test", test)
    r.add_post("/api/v1/webhooks/{id}/enable", enable_endpoint)
