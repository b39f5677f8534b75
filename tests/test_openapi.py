"""The OpenAPI document (`server/openapi.json`) against the server it describes.

The document is data, written by hand; these tests are what keeps it true. Routes come from
the running app's router, parameters from asking the running server (an undocumented name is
refused, a documented one is not) and from the query vocabulary, limits and enums from
`llmtap.store.query`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llmtap.config import Settings
from llmtap.ingest_token import ingest_token
from llmtap.server.app import ServerService
from llmtap.server.openapi import document
from llmtap.store import query
from llmtap.store.base import ROW_FIELDS
from llmtap.webhooks.outbox import EVENTS, FORMATS

PROPERTY = "property.<Name>"
#: The query parameters each endpoint takes, by the vocabulary (every other route takes none).
TAKES: dict[tuple[str, str], frozenset[str]] = {
    ("/api/v1/requests", "get"): query.LIST_PARAMS | {PROPERTY},
    ("/api/v1/requests/export", "get"): query.EXPORT_PARAMS | {PROPERTY},
    ("/api/v1/requests/stream", "get"): query.TAIL_PARAMS | {PROPERTY},
    ("/api/v1/stats", "get"): query.STATS_PARAMS | {PROPERTY},
    ("/api/v1/users", "get"): query.USERS_PARAMS,
    ("/api/v1/sessions", "get"): query.SESSIONS_PARAMS | {PROPERTY},
    ("/api/v1/webhooks/deliveries", "get"): query.DELIVERY_PARAMS,
}
#: Routes the app serves that are no API (the dashboard's page and files).
NOT_API = {("/", "get"), ("/static", "get")}


def resolve(doc: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    ref = obj.get("$ref")
    if ref is None:
        return obj
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return resolve(doc, node)


def query_params(doc: dict[str, Any], op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    params = [resolve(doc, p) for p in op.get("parameters", [])]
    return {p["name"]: p for p in params if p["in"] == "query"}


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(path, m): op for path, ops in doc["paths"].items() for m, op in ops.items() if m != "parameters"}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[ServerService, aiohttp.ClientSession]]:
    settings = Settings(
        data_dir=tmp_path,
        server_port=0,
        store=f"sqlite:{tmp_path / 'store.db'}",
        bodies=f"file:{tmp_path / 'bodies'}",
        queue="sqlite",
    )
    svc = ServerService(settings)
    await svc.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield svc, http
    finally:
        await svc.stop()


def test_document_is_openapi_3_1_with_the_package_version() -> None:
    from llmtap import __version__

    doc = document()
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == __version__
    doc["paths"].clear()  # a copy: the next caller still gets every path
    assert document()["paths"]


async def test_every_served_route_is_documented_and_nothing_else(
    server: tuple[ServerService, aiohttp.ClientSession],
) -> None:
    svc, http = server
    assert svc._runner is not None
    served = {
        (r.resource.canonical, r.method.lower())
        for r in svc._runner.app.router.routes()
        if r.resource is not None and r.method not in ("HEAD", "*")
    }
    documented = set(operations(document()))
    assert served - NOT_API == documented
    async with http.get(f"http://127.0.0.1:{svc.port}/api/v1/openapi.json") as r:
        assert r.status == 200 and orjson.loads(await r.read()) == document()


async def test_each_route_documents_exactly_the_parameters_the_server_takes(
    server: tuple[ServerService, aiohttp.ClientSession],
) -> None:
    svc, http = server
    doc = document()
    base = f"http://127.0.0.1:{svc.port}"

    async def refused(method: str, path: str, name: str) -> bool:
        """Whether the server answers `?<name>=x` with 400 'unknown parameter <name>'."""
        url = base + path.replace("{id}", "x")
        auth = {"Authorization": f"Bearer {ingest_token(svc.settings)}"}  # ingest needs it first
        async with http.request(method, url, params={name: "x"}, json={}, headers=auth) as r:
            if r.status != 400:
                return False
            err = orjson.loads(await r.read())["error"]
            return bool(err.get("parameter") == name and err["message"].startswith("unknown parameter"))

    for (path, method), op in operations(doc).items():
        names = set(query_params(doc, op))
        assert names == TAKES.get((path, method), set()), (path, method)
        if not path.startswith("/api/"):
            continue  # /healthz and /metrics ignore query strings
        for name in sorted(names):
            probe = "property.feature" if name == PROPERTY else name
            assert not await refused(method, path, probe), (path, method, name)
        assert await refused(method, path, "modle"), (path, method)


def test_limits_and_enums_are_the_vocabulary() -> None:
    doc = document()
    ops = operations(doc)

    def param(path: str, name: str) -> dict[str, Any]:
        return query_params(doc, ops[(path, "get")])[name]

    for path in ("/api/v1/requests", "/api/v1/users", "/api/v1/webhooks/deliveries"):
        assert param(path, "limit")["schema"]["maximum"] == query.MAX_LIMIT, path
    assert param("/api/v1/requests", "limit")["schema"]["default"] == query.DEFAULT_LIMIT
    assert param("/api/v1/users", "limit")["schema"]["default"] == query.DEFAULT_USERS_LIMIT
    for path in ("/api/v1/requests", "/api/v1/requests/export"):
        assert tuple(param(path, "sort")["schema"]["enum"]) == query.SORTS
        assert tuple(param(path, "order")["schema"]["enum"]) == query.ORDERS
    assert tuple(param("/api/v1/requests/export", "format")["schema"]["enum"]) == query.EXPORT_FORMATS
    assert tuple(param("/api/v1/stats", "bucket")["schema"]["enum"]) == query.BUCKETS
    group_by = param("/api/v1/stats", "group_by")["description"]
    assert all(g in group_by for g in query.STAT_GROUPS) and query.PROPERTY in group_by
    assert f"1-{query.MAX_SEARCH} characters" in param("/api/v1/requests", "q")["description"]
    stats = ops[("/api/v1/stats", "get")]["description"]
    assert f"at most {query.MAX_GROUPS}," in stats and f"at most {query.MAX_BUCKETS}," in stats
    assert f"at most {query.MAX_SESSION_REQUESTS})" in ops[("/api/v1/sessions/{id}", "get")]["summary"]
    add = ops[("/api/v1/webhooks", "post")]["requestBody"]["content"]["application/json"]["schema"]
    assert tuple(add["properties"]["events"]["items"]["enum"]) == EVENTS
    assert tuple(add["properties"]["format"]["enum"]) == FORMATS


def test_alert_rule_schema_is_the_rules_vocabulary() -> None:
    from llmtap.alerts import rules

    doc = document()
    for name in ("AlertRuleInput", "AlertRulePatch", "AlertRule"):
        props = resolve(doc, {"$ref": f"#/components/schemas/{name}"})["properties"]
        assert tuple(props["metric"]["enum"]) == tuple(rules.METRICS), name
        assert tuple(props["op"]["enum"]) == rules.OPS, name
        window = props["window_s"]
        assert (window["minimum"], window["maximum"]) == (rules.MIN_WINDOW_S, rules.MAX_WINDOW_S), name
        assert all(g in props["group_by"]["description"] for g in rules.GROUPS), name
        assert props["name"]["maxLength"] == rules.MAX_NAME
    body = resolve(doc, {"$ref": "#/components/schemas/AlertRuleInput"})
    from llmtap.server.alerts_api import _FIELDS, _REQUIRED

    assert set(body["properties"]) == set(_FIELDS) and tuple(body["required"]) == _REQUIRED


def test_request_schemas_hold_every_row_field() -> None:
    doc = document()
    summary = resolve(doc, {"$ref": "#/components/schemas/RequestSummary"})["properties"]
    full = resolve(doc, {"$ref": "#/components/schemas/Request"})["allOf"][1]["properties"]
    assert set(summary) | set(full) == {*ROW_FIELDS, "bodies"}


def test_every_path_parameter_is_declared_for_every_operation() -> None:
    """`{id}` undeclared on seven operations made the document invalid (schemathesis could test
    none of them; code generators choke): declared on the path item or on the operation."""
    import re

    doc = document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            declared = {
                p["name"]
                for p in [*item.get("parameters", []), *op.get("parameters", [])]
                if p.get("in") == "path"
            }
            assert declared == set(re.findall(r"\{(\w+)\}", path)), (path, method)
